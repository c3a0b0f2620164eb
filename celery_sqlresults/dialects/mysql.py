"""MySQL and MariaDB: ``ON DUPLICATE KEY UPDATE``, ``GET_LOCK``, 64 KB ``BLOB`` columns."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from celery import states
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, Engine

from ..exceptions import ResultTooLarge
from .base import (
    FIX_DATABASE,
    FIX_GRANT,
    FIX_HOST,
    FIX_LOGIN,
    Dialect,
    Expiry,
    driver_error,
    error_number,
    error_text,
    walk_expired,
)

__all__ = ["MySQL"]

#: Name of the ``GET_LOCK`` lock that serialises schema changes.
SCHEMA_LOCK_NAME = "celery_sqlresults.schema"
_NO_SUCH_TABLE = 1146
_NO_SUCH_COLUMN = 1054  # ER_BAD_FIELD_ERROR, "Unknown column"
_LOCK_WAIT_TIMEOUT = 1205  # row and metadata locks
#: Error numbers waiting cannot fix: unknown database, access denied (login, socket auth,
#: database), unknown host (mysqlclient's; PyMySQL says 2003 with the resolver's text).
_PERMANENT = {1049: FIX_DATABASE, 1045: FIX_LOGIN, 1698: FIX_LOGIN, 1044: FIX_GRANT}
_UNKNOWN_HOST = 2005
_CANNOT_CONNECT = 2003
_UNRESOLVED = re.compile(r"Name or service not known|nodename nor servname|No address associated")
_CAPACITY = {
    "TINYBLOB": 255,
    "TINYTEXT": 255,
    "BLOB": 65_535,
    "TEXT": 65_535,
    "MEDIUMBLOB": 16_777_215,
    "MEDIUMTEXT": 16_777_215,
    "LONGBLOB": 4_294_967_295,
    "LONGTEXT": 4_294_967_295,
}
#: Bytes PyMySQL escapes with a backslash when it sends a value inline.
_ESCAPED = (b"\\", b"'", b'"', b"\0", b"\n", b"\r", b"\x1a")
#: Bytes of a task upsert besides its values (SQL text, other columns), for the packet check.
_STATEMENT_OVERHEAD = 4096


class MySQL(Dialect):
    names = ("mysql", "mariadb")
    extra = "mysql"
    driver_extras = {"pymysql": "mysql", "mysqldb": "mysqlclient"}
    fast_drivers = frozenset({"pymysql", "mysqldb"})
    has_narrow_blobs = True
    set_opens_transaction = False  # a SET opens no transaction on MySQL/MariaDB

    # ---- writes -------------------------------------------------------
    def upsert(
        self,
        table: sa.Table,
        columns: Sequence[str],
        id_seq: bool,
        insert_only: Sequence[str] = (),
    ) -> sa.Insert:
        stmt = mysql.insert(table).values(self.values(table, columns, id_seq))
        guard = table.c.status == self.constant(states.SUCCESS)
        updated = [c for c in columns if c != "task_id" and c not in insert_only]
        # Assignments apply left to right: status must come last, or the guard
        # would see the freshly written value.
        ordered = sorted(updated, key=lambda c: c == "status")
        return stmt.on_duplicate_key_update(
            [(c, sa.case((guard, table.c[c]), else_=stmt.inserted[c])) for c in ordered]
        )

    def replace(self, table: sa.Table, key: str, columns: Sequence[str], id_seq: bool) -> sa.Insert:
        stmt = mysql.insert(table).values(self.values(table, columns, id_seq))
        return stmt.on_duplicate_key_update({c: stmt.inserted[c] for c in columns if c != key})

    def insert_if_absent(
        self, table: sa.Table, key: str, columns: Sequence[str], id_seq: bool
    ) -> sa.Insert:
        stmt = mysql.insert(table).values(self.values(table, columns, id_seq))
        return stmt.on_duplicate_key_update({key: table.c[key]})  # a no-op update

    # ---- chords -------------------------------------------------------
    def add_one(
        self, conn: Connection, table: sa.Table, group_id: str
    ) -> tuple[int, int | None] | None:
        """No ``UPDATE … RETURNING`` here: the new count goes through the
        connection-local ``LAST_INSERT_ID(expr)``, read back on the same connection
        (as signed: the count is below zero while tasks added to the header are pending,
        and ``LAST_INSERT_ID()`` is unsigned)."""
        where = table.c.group_id == group_id
        counted = sa.func.last_insert_id(table.c.done + 1)
        updated = conn.execute(
            sa.update(table).where(where).values(done=sa.cast(counted, mysql.INTEGER()))
        )
        if not updated.rowcount:
            return None
        done = sa.cast(sa.func.last_insert_id(), mysql.INTEGER())  # CAST(… AS SIGNED)
        row = conn.execute(sa.select(done, table.c.chord_size).where(where))
        first = row.first()
        return None if first is None else (int(first[0]), first[1])

    # ---- reading the layout -----------------------------------------------
    def id_from_sequence(self, id_column: Mapping[str, Any]) -> bool:
        return not id_column.get("autoincrement", False)

    def table_columns(
        self, conn: Connection, tables: Sequence[sa.Table]
    ) -> list[dict[str, dict[str, Any]] | None]:
        """One ``information_schema`` query for all the tables: the inspector parses
        ``SHOW CREATE TABLE`` of each, and compiling its parser costs a new process more
        than the queries. ``type`` is the column's type name, ``autoincrement`` whether
        ``id`` auto-increments (else it comes from Celery's sequence)."""
        found: dict[tuple[str | None, str], dict[str, dict[str, Any]]] = {}
        for schema in dict.fromkeys(t.schema for t in tables):
            names = [t.name for t in tables if t.schema == schema]
            # Constants for schema and names: the server then opens only these tables.
            rows = conn.execute(
                sa.text(
                    "SELECT table_name, column_name, data_type, extra"
                    " FROM information_schema.columns"
                    " WHERE table_schema = COALESCE(:schema, DATABASE())"
                    " AND table_name IN :names"
                ).bindparams(sa.bindparam("names", expanding=True)),
                {"schema": schema, "names": names},
            ).all()
            for table_name, name, data_type, extra in rows:
                found.setdefault((schema, str(table_name)), {})[str(name)] = {
                    "name": str(name),
                    "type": str(data_type),
                    "autoincrement": "auto_increment" in str(extra or "").lower(),
                }
        return [found.get((t.schema, t.name)) for t in tables]

    # ---- expiry -----------------------------------------------------------
    def expiry(
        self,
        table: sa.Table,
        timestamp: sa.Column[Any],
        old: sa.ColumnElement[bool],
        limit: int,
        filtered: bool = False,
    ) -> Expiry:
        """Always by ranges of the timestamp index: InnoDB keeps deleted index entries
        until its purge catches up, so "the oldest N" again and again is quadratic."""
        return walk_expired(table, timestamp, old, limit)

    # ---- schema -------------------------------------------------------
    @contextlib.contextmanager
    def schema_lock(self, conn: Connection, timeout: float) -> Iterator[None]:
        """``GET_LOCK``, a named lock held by the session."""
        conn.execution_options(isolation_level="READ COMMITTED")
        got = conn.execute(
            sa.text("SELECT GET_LOCK(:n, :t)"), {"n": SCHEMA_LOCK_NAME, "t": int(timeout)}
        ).scalar()
        conn.commit()
        if got != 1:
            raise TimeoutError(f"waited {timeout:.0f}s for MySQL lock {SCHEMA_LOCK_NAME!r}")
        try:
            yield
            conn.commit()
        finally:
            conn.execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": SCHEMA_LOCK_NAME})
            conn.commit()

    # ---- connections --------------------------------------------------
    def galera(self) -> Dialect:
        from .galera import Galera  # the subclass of this one

        return Galera()

    def resolve(self, engine: Engine, detect: bool) -> Dialect:
        """A MariaDB with ``wsrep_on`` is a Galera node: the Galera variant, set up."""
        if not detect:
            return self
        from .galera import is_galera

        return self.galera().resolve(engine, detect) if is_galera(engine) else self

    def lock_timeout_statements(self, seconds: float) -> list[str]:
        """InnoDB row locks and metadata locks (``LOCK TABLES``, DDL), in whole seconds."""
        if seconds <= 0:
            return []
        whole = max(1, math.ceil(seconds))
        return [f"SET SESSION innodb_lock_wait_timeout = {whole}, lock_wait_timeout = {whole}"]

    def relaxed_commit_refusal(self) -> str | None:
        return (
            "sqlresults_durable_commit = False is not available on MySQL/MariaDB (a session "
            "cannot relax durability there): set innodb_flush_log_at_trx_commit = 2 on the "
            "server instead, or remove the setting."
        )

    # ---- value sizes ----------------------------------------------------
    def packet_limit(self, conn: Connection) -> int | None:
        """``max_allowed_packet``: a longer statement makes the server drop the connection."""
        value = conn.exec_driver_sql("SELECT @@max_allowed_packet").scalar()
        return None if value is None else int(value)

    def column_capacity(self, column_type: Any) -> int | None:
        """``BLOB``/``TEXT`` (what Celery's ``db+`` creates) hold 64 KB; in strict mode a
        longer value is an error, otherwise it is cut silently. ``column_type``: a
        reflected type, or its name."""
        name = column_type if isinstance(column_type, str) else type(column_type).__name__
        return _CAPACITY.get(name.upper())

    def check_sizes(
        self,
        row: Mapping[str, Any],
        capacity: Mapping[str, int],
        packet_limit: int | None,
        table: str,
        where: str,
    ) -> None:
        """Raised before sending: a statement over ``max_allowed_packet`` makes the
        server drop the connection, which would look like an outage and be retried."""
        values = {k: v for k, v in row.items() if isinstance(v, (bytes, str))}
        # Most rows are far inside every limit: bound their sizes from above (a
        # character is at most 4 bytes of UTF-8, an escaped byte 2 on the wire)
        # and skip the exact count, a large share of a store's own CPU here.
        bounds = {k: len(v) * 4 if isinstance(v, str) else len(v) for k, v in values.items()}
        if all(n <= capacity.get(k, n) for k, n in bounds.items()) and (
            packet_limit is None or 2 * sum(bounds.values()) + _STATEMENT_OVERHEAD <= packet_limit
        ):
            return
        stored = {k: len(v.encode() if isinstance(v, str) else v) for k, v in values.items()}
        too_big = {
            k: (n, capacity[k]) for k, n in stored.items() if k in capacity and n > capacity[k]
        }
        problems = [
            f"{k} is {n} bytes, column {table}.{k} holds {cap}" for k, (n, cap) in too_big.items()
        ]
        # The packet carries the values escaped (PyMySQL sends them inline).
        sizes = {k: _wire_size(v) for k, v in values.items()}
        total = sum(sizes.values()) + _STATEMENT_OVERHEAD
        if packet_limit is not None and total > packet_limit:
            biggest = max(sizes, key=lambda k: sizes[k])
            too_big.setdefault(biggest, (sizes[biggest], packet_limit))
            problems.append(
                f"the row is ~{total} bytes, the server's max_allowed_packet is {packet_limit}"
            )
        if problems:
            raise ResultTooLarge(
                f"task {row.get('task_id')}: cannot store state {row.get('status')} at "
                f"{where}: {'; '.join(problems)}. Return a smaller value "
                "(e.g. store it elsewhere and return its key), or let the database hold it: "
                "MySQL/MariaDB BLOB columns (tables made by Celery's db+) hold 64 KB, run "
                "`celery -A proj results upgrade` to make them LONGBLOB; raise "
                "max_allowed_packet on the server.",
                tuple(too_big),
            )

    # ---- errors -------------------------------------------------------
    def seconds_between(
        self, start: sa.ColumnElement[Any], end: sa.ColumnElement[Any]
    ) -> sa.ColumnElement[float]:
        micro = sa.func.timestampdiff(sa.literal_column("MICROSECOND"), start, end)
        return sa.type_coerce(micro / 1e6, sa.Float)

    def is_lock_timeout(self, exc: BaseException) -> bool:
        return driver_error(exc) is not None and error_number(exc) == _LOCK_WAIT_TIMEOUT

    def is_missing_table(self, exc: BaseException) -> bool:
        return driver_error(exc) is not None and error_number(exc) == _NO_SUCH_TABLE

    def is_missing_column(self, exc: BaseException) -> bool:
        return driver_error(exc) is not None and error_number(exc) == _NO_SUCH_COLUMN

    def permanent_error_fix(self, exc: BaseException) -> str | None:
        code = error_number(exc)
        if code == _UNKNOWN_HOST or (
            code == _CANNOT_CONNECT and _UNRESOLVED.search(error_text(exc))
        ):
            return FIX_HOST
        return _PERMANENT.get(code) if isinstance(code, int) else None


def _wire_size(value: bytes | str) -> int:
    """Bytes ``value`` takes inside a statement: PyMySQL escapes some bytes with a backslash."""
    data = value.encode() if isinstance(value, str) else value
    return len(data) + sum(data.count(c) for c in _ESCAPED)
