"""PostgreSQL: ``ON CONFLICT`` upserts, ``LISTEN/NOTIFY``, advisory locks, psycopg 3;
and the same behind a transaction pooler (PgBouncer's ``pool_mode = transaction``)."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError

from .base import (
    FIX_DATABASE,
    FIX_GRANT,
    FIX_HOST,
    FIX_LOGIN,
    OnConflict,
    driver_error,
    error_text,
)

__all__ = ["AUTOVACUUM", "PostgreSQL", "TransactionPooled"]

#: Stable key of the advisory lock that serialises schema changes ("SQLR").
SCHEMA_LOCK_KEY = 0x53514C52
_UNDEFINED_TABLE = "42P01"
_UNDEFINED_COLUMN = "42703"
_LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout
_READ_ONLY = "25006"  # a write on a standby (or a read-only session)
FIX_STANDBY = (
    "the URL reached a read-only standby: name every node and add "
    "target_session_attrs=read-write to result_backend (docs/scaling.md)"
)
#: Connection errors waiting cannot fix. They arrive as text only: libpq has no SQLSTATE
#: before a session exists (the server's English messages).
_PERMANENT = (
    (re.compile(r'database "[^"]*" does not exist'), FIX_DATABASE),
    (re.compile(r'role "[^"]*" does not exist'), FIX_LOGIN),
    (re.compile(r"password authentication failed|no password supplied", re.I), FIX_LOGIN),
    (re.compile(r"no pg_hba\.conf entry|(peer|ident) authentication failed", re.I), FIX_LOGIN),
    (re.compile(r"permission denied for database", re.I), FIX_GRANT),
    (re.compile(r"failed to resolve host|could not translate host name", re.I), FIX_HOST),
)

#: Autovacuum settings on the tables that grow between cleanups (task, group; revision
#: 0008). PostgreSQL reuses a deleted row's space only after a vacuum, which autovacuum
#: starts when dead rows pass 20 % of the table (analyze: changes pass 10 %). A cleanup
#: that expires less than that (a day's results out of a week's) then leaves the next
#: results to grow the table, and the indexes with it, until a later cleanup tips it over.
#: 2 % plus a fixed 10 000 rows: any cleanup of a table of millions starts a vacuum, while a
#: small table is not vacuumed for every few dozen rows; analyze follows at the same pace,
#: so the planner's counts by state and ``date_done`` keep up with the turnover. Inserts
#: leave nothing to reclaim: the insert trigger (PostgreSQL 13+) keeps its default. A TOAST
#: table without settings of its own (large results) is vacuumed by its table's.
AUTOVACUUM = {
    "autovacuum_vacuum_scale_factor": "0.02",
    "autovacuum_vacuum_threshold": "10000",
    "autovacuum_analyze_scale_factor": "0.02",
    "autovacuum_analyze_threshold": "10000",
}


class PostgreSQL(OnConflict):
    names = ("postgresql",)
    extra = "postgresql"
    driver_extras = {"psycopg": "postgresql"}
    fast_drivers = frozenset({"psycopg"})
    notifies = True
    nulls_first_descending = True
    builds_indexes_online = True
    has_pattern_index = True
    #: SQLAlchemy looks up ``hstore`` on each engine's first connection (a catalog
    #: query); our tables have no such column.
    engine_defaults = {"use_native_hstore": False}

    # ---- reads --------------------------------------------------------
    def one_of(self, column: sa.ColumnElement[Any], name: str) -> sa.ColumnElement[bool]:
        """``column = ANY(:name)``, the list bound as one array: the same statement text
        for any number of ids, so the server parses and plans one parameter, not a
        thousand, and a prepared statement serves every length."""
        return column == sa.any_(sa.bindparam(name, type_=postgresql.ARRAY(sa.String)))

    # ---- writes -------------------------------------------------------
    def insert(self, table: sa.Table) -> Any:
        return postgresql.insert(table)

    def notifying(self, upsert: sa.Insert, table: sa.Table, channel: str) -> sa.Executable:
        """The upsert plus a ``pg_notify`` of the written row, still one statement.

        The payload is the statement's ``notice`` parameter, sent at commit and
        only if the row was written (a stored SUCCESS refuses the write, and
        the notification with it). The writer composes the payload from the
        values it sends: building JSON from ``RETURNING`` in the statement
        made a store slower (docs/benchmarks.md, "notifications").
        """
        written = upsert.returning(table.c.task_id).cte("written")
        notice = sa.bindparam("notice", type_=sa.Text)
        return sa.select(sa.func.pg_notify(self.constant(channel), notice)).select_from(written)

    # ---- chords -------------------------------------------------------
    def part_counter(
        self, table: sa.Table, parts: sa.Table, columns: Sequence[str]
    ) -> sa.Executable | None:
        """The part's insert in a CTE, and the counter's ``UPDATE … RETURNING done,
        chord_size`` only if it inserted; parameters: ``columns`` (``group_id``,
        ``task_id``, ``date_created``, ``group_index``)."""
        inserted = (
            postgresql.insert(parts)
            .values({c: sa.bindparam(c, type_=parts.c[c].type) for c in columns})
            .on_conflict_do_nothing()
            .returning(parts.c.group_id)
            .cte("part")
        )
        return (
            sa.update(table)
            .where(table.c.group_id == inserted.c.group_id)
            .values(done=table.c.done + 1)
            .returning(table.c.done, table.c.chord_size)
        )

    # ---- reading the layout -----------------------------------------------
    def id_from_sequence(self, id_column: Mapping[str, Any]) -> bool:
        return id_column.get("default") is None and not id_column.get("identity")

    def table_columns(
        self, conn: Connection, tables: Sequence[sa.Table]
    ) -> list[dict[str, dict[str, Any]] | None]:
        """One query on ``pg_attribute`` for all the tables: the inspector's way takes
        several, and building them costs a new process more than running them.

        Names resolve as the statements' will (``to_regclass``: the search path
        when unqualified); a missing table comes back as no ``oid``.
        """
        if not tables:
            return []
        quote = conn.dialect.identifier_preparer.format_table
        params = {f"t{i}": quote(table) for i, table in enumerate(tables)}
        found = ", ".join(f"({i}, to_regclass(:t{i}))" for i in range(len(tables)))
        rows = conn.execute(
            sa.text(
                "SELECT t.k, a.attname, pg_get_expr(d.adbin, d.adrelid), a.attidentity"
                f" FROM (VALUES {found}) AS t(k, oid)"
                " LEFT JOIN pg_attribute a"
                " ON a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped"
                " LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
            ),
            params,
        ).all()
        out: list[dict[str, dict[str, Any]] | None] = [None] * len(tables)
        for k, name, default, identity in rows:
            if name is None:
                continue
            columns = out[k]
            if columns is None:
                columns = out[k] = {}
            columns[name] = {"name": name, "default": default, "identity": identity or None}
        return out

    def only_writers_connect(self, conn: Connection, table: sa.Table) -> bool:
        """Whether every role that may log in to this database may read and write ``table``.

        Then a notification that carries a row shows no role anything it could
        not read, and a forged one gives no role a power it lacks: what
        ``sqlresults_notify_rows = "auto"`` asks before rows travel (any
        session may ``LISTEN``/``NOTIFY`` on any channel: PostgreSQL has no
        grants on them). Superusers hold every privilege.
        """
        name = conn.dialect.identifier_preparer.format_table(table)
        outsiders = conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_roles r WHERE r.rolcanlogin"
                " AND has_database_privilege(r.oid, current_database(), 'CONNECT')"
                " AND NOT (has_table_privilege(r.oid, CAST(:t AS regclass), 'SELECT')"
                " AND has_table_privilege(r.oid, CAST(:t AS regclass), 'INSERT')"
                " AND has_table_privilege(r.oid, CAST(:t AS regclass), 'UPDATE'))"
            ),
            {"t": name},
        ).scalar()
        return outsiders == 0

    # ---- schema -------------------------------------------------------
    @contextlib.contextmanager
    def schema_lock(self, conn: Connection, timeout: float) -> Iterator[None]:
        """A session-level advisory lock, taken by polling ``pg_try_advisory_lock``.

        Session-level, so it survives the commits between revisions (``CREATE
        INDEX CONCURRENTLY`` needs them); polling, so a waiting process holds
        no snapshot an index build would wait for. DDL gives up after
        ``timeout`` instead of queueing writers behind it.
        """
        conn.execution_options(isolation_level="AUTOCOMMIT")
        deadline = time.monotonic() + timeout
        delay = 0.005
        try_lock = sa.text("SELECT pg_try_advisory_lock(:k)")
        while not conn.execute(try_lock, {"k": SCHEMA_LOCK_KEY}).scalar():
            conn.commit()
            if time.monotonic() >= deadline:
                raise TimeoutError(f"waited {timeout:.0f}s for the PostgreSQL schema lock")
            time.sleep(delay)
            delay = min(delay * 2, 0.25)
        conn.commit()
        # The session's own lock_timeout (sqlresults_lock_timeout) is put back afterwards.
        previous = conn.exec_driver_sql("SHOW lock_timeout").scalar()
        conn.commit()
        try:
            conn.exec_driver_sql(f"SET lock_timeout = '{int(timeout * 1000)}ms'")
            conn.commit()
            conn.execution_options(isolation_level="READ COMMITTED")
            yield
            conn.commit()
        finally:
            try:
                conn.rollback()
                conn.execution_options(isolation_level="AUTOCOMMIT")
                conn.execute(
                    sa.text("SELECT set_config('lock_timeout', :v, false)"), {"v": previous}
                )
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": SCHEMA_LOCK_KEY})
                conn.commit()
            except DBAPIError:
                conn.invalidate()  # closing the session releases the lock

    def storage_statements(self, conn: Connection | None, table: sa.Table) -> list[sa.Executable]:
        """``ALTER TABLE … SET`` the :data:`AUTOVACUUM` settings the table lacks.

        Takes the lock a ``VACUUM`` takes (``SHARE UPDATE EXCLUSIVE``): reads and
        writes carry on. A setting the table has (its owner's) is left as it is.
        """
        have = {} if conn is None else _reloptions(conn, table)
        wanted = {k: v for k, v in AUTOVACUUM.items() if k not in have}
        if not wanted:
            return []
        settings = ", ".join(f"{k} = {v}" for k, v in wanted.items())
        return [sa.text(f"ALTER TABLE {_quoted(table)} SET ({settings})")]

    def storage_reset_statements(
        self, conn: Connection | None, table: sa.Table
    ) -> list[sa.Executable]:
        have = None if conn is None else _reloptions(conn, table)
        ours = [k for k, v in AUTOVACUUM.items() if have is None or have.get(k) == v]
        if not ours:
            return []
        return [sa.text(f"ALTER TABLE {_quoted(table)} RESET ({', '.join(ours)})")]

    # ---- connections --------------------------------------------------
    def behind_pooler(self) -> PostgreSQL:
        return _POOLED

    def lock_timeout_statements(self, seconds: float) -> list[str]:
        return [] if seconds <= 0 else [f"SET lock_timeout = {max(1, round(seconds * 1000))}"]

    def set_up_session(self, dbapi_conn: Any, statements: list[str]) -> None:
        """One round trip: the ``SET`` statements sent together, in autocommit for the moment
        (no ``BEGIN`` before them, no ``COMMIT`` after); psycopg and psycopg2
        both take several statements in one call when it has no parameters."""
        was = dbapi_conn.autocommit
        dbapi_conn.autocommit = True
        try:
            cur = dbapi_conn.cursor()
            try:
                cur.execute("; ".join(statements))
            finally:
                cur.close()
        finally:
            dbapi_conn.autocommit = was

    def commit_statements(self, durable: bool) -> list[str]:
        """``synchronous_commit = off``: a commit is confirmed before its WAL is flushed.

        A crash of the database server may then lose the last fraction of a
        second of results; it never corrupts anything.
        """
        return [] if durable else ["SET synchronous_commit = off"]

    def in_autocommit(self, dbapi_conn: Any) -> bool:
        return bool(dbapi_conn.autocommit)

    def uses_libpq(self, driver: str) -> bool:
        return driver == "psycopg"

    def listener_connect(self, url: URL) -> Callable[[], Any] | None:
        """A dedicated psycopg connection outside the pool (psycopg 3 only)."""
        if url.get_dialect().driver != "psycopg":
            return None
        import psycopg

        cargs, cparams = url.get_dialect()().create_connect_args(url)

        def connect() -> Any:
            return psycopg.connect(*cargs, **cparams)

        return connect

    def async_listener_connect(self, url: URL) -> Callable[[], Awaitable[Any]] | None:
        """The same connection for an event loop: psycopg's ``AsyncConnection``, autocommit."""
        if url.get_dialect().driver != "psycopg":
            return None
        import psycopg

        cargs, cparams = url.get_dialect()().create_connect_args(url)

        async def connect() -> Any:
            return await psycopg.AsyncConnection.connect(*cargs, autocommit=True, **cparams)

        return connect

    # ---- errors -------------------------------------------------------
    def seconds_between(
        self, start: sa.ColumnElement[Any], end: sa.ColumnElement[Any]
    ) -> sa.ColumnElement[float]:
        return sa.extract("epoch", end - start).cast(sa.Float)

    def is_lock_timeout(self, exc: BaseException) -> bool:
        return _sqlstate(exc) == _LOCK_NOT_AVAILABLE

    def is_missing_table(self, exc: BaseException) -> bool:
        return _sqlstate(exc) == _UNDEFINED_TABLE

    def is_missing_column(self, exc: BaseException) -> bool:
        return _sqlstate(exc) == _UNDEFINED_COLUMN

    def permanent_error_fix(self, exc: BaseException) -> str | None:
        if _sqlstate(exc) == _READ_ONLY:
            return FIX_STANDBY
        text = error_text(exc)
        return next((fix for pattern, fix in _PERMANENT if pattern.search(text)), None)


class TransactionPooled(PostgreSQL):
    """PostgreSQL behind a pooler in transaction mode (PgBouncer's ``pool_mode = transaction``).

    Each transaction (each statement, in autocommit) may run on another server
    session, so nothing may rely on a session: statements are not prepared
    (a name prepared on one server connection is missing, or taken, on the
    next), the session settings are left to the server (``ALTER ROLE … SET``),
    the schema lock is a transaction's, and ``LISTEN`` needs a direct
    connection (``sqlresults_listen_url``).
    """

    keeps_sessions = False

    def behind_pooler(self) -> PostgreSQL:
        return self

    def connect_args(self) -> dict[str, Any]:
        return {"prepare_threshold": None}  # psycopg prepares nothing, nor does our libpq path

    def session_statements(self, url: URL, lock_timeout: float, durable: bool) -> list[str]:
        """None: a ``SET`` would stay with whichever server session ran it."""
        return []

    def relaxed_commit_refusal(self) -> str | None:
        return (
            "sqlresults_durable_commit = False cannot be set per session behind a transaction "
            "pooler (sqlresults_pooler = 'transaction'): set it for the backend's role on the "
            "server instead (ALTER ROLE … SET synchronous_commit = off) and leave "
            "sqlresults_durable_commit at True"
        )

    @contextlib.contextmanager
    def schema_lock(self, conn: Connection, timeout: float) -> Iterator[None]:
        """A transaction-scoped advisory lock, held by an open transaction on a second
        connection while ``conn`` changes the schema.

        A session lock would stay with whichever server session took it, held
        for ever or released by someone else's ``pg_advisory_unlock``; an open
        transaction keeps its server session to itself, and ends (the lock
        with it) when this process's connection goes. Polled, as the session
        lock is: a process that waits holds no snapshot an index build waits for.
        The holder's statement has no parameters, so psycopg sends it as a simple
        query, which leaves no portal open: an open one keeps a snapshot, and
        ``CREATE INDEX CONCURRENTLY`` on ``conn`` would wait for it for ever.
        """
        holder = conn.engine.connect().execution_options(isolation_level="READ COMMITTED")
        try:
            deadline = time.monotonic() + timeout
            delay = 0.005
            try_lock = f"SELECT pg_try_advisory_xact_lock({SCHEMA_LOCK_KEY})"
            while not holder.exec_driver_sql(try_lock).scalar():
                holder.rollback()
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"waited {timeout:.0f}s for the PostgreSQL schema lock")
                time.sleep(delay)
                delay = min(delay * 2, 0.25)
            conn.execution_options(isolation_level="READ COMMITTED")
            try:
                yield
                conn.commit()
            finally:
                try:
                    conn.rollback()
                    conn.execution_options(isolation_level="AUTOCOMMIT")
                except DBAPIError:
                    conn.invalidate()
            holder.rollback()  # ends the transaction, and the lock with it
        except BaseException:
            with contextlib.suppress(DBAPIError):
                holder.invalidate()  # closing the connection ends the transaction too
            raise
        finally:
            holder.close()


_POOLED = TransactionPooled()


def _sqlstate(exc: BaseException) -> str | None:
    return getattr(driver_error(exc), "sqlstate", None)


def _quoted(table: sa.Table) -> str:
    return str(postgresql.dialect().identifier_preparer.format_table(table))


def _reloptions(conn: Connection, table: sa.Table) -> dict[str, str]:
    """The table's storage settings (``pg_class.reloptions``), by name."""
    options = conn.execute(
        sa.text("SELECT reloptions FROM pg_class WHERE oid = to_regclass(:t)"),
        {"t": _quoted(table)},
    ).scalar()
    return dict(str(o).partition("=")[::2] for o in options or ())
