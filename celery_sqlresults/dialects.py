"""Everything that differs between PostgreSQL, MySQL/MariaDB and SQLite.

The rest of the package asks this module for a :class:`Dialect` and never
looks at the dialect name itself. Each dialect knows how to write the
never-overwrite-SUCCESS upsert, how to serialise schema creation with the
database's own lock, how to delete in bounded batches and how to recognise
"that table does not exist".
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from celery import states
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError

__all__ = ["SUPPORTED", "Dialect", "dialect_for"]

#: Names a user may put in front of ``+driver`` in the URL.
SUPPORTED = ("postgresql", "mysql", "mariadb", "sqlite")

#: Stable key for PostgreSQL's advisory lock and MySQL's named lock.
_LOCK_NAME = "celery_sqlresults.schema"
_PG_LOCK_KEY = 0x53514C52  # "SQLR"

_MISSING_TABLE = re.compile(r"no such table|doesn't exist|does not exist|undefined_?table", re.I)
# PostgreSQL SQLSTATE for undefined table, MySQL/MariaDB errno for the same.
_PG_UNDEFINED_TABLE = "42P01"
_MYSQL_NO_SUCH_TABLE = 1146
# "Gave up waiting for a lock": PostgreSQL lock_not_available (lock_timeout),
# MySQL/MariaDB ER_LOCK_WAIT_TIMEOUT (row and metadata locks), SQLite SQLITE_BUSY.
_PG_LOCK_NOT_AVAILABLE = "55P03"
_MYSQL_LOCK_WAIT_TIMEOUT = 1205
_MYSQL_CAPACITY = {
    "TINYBLOB": 255,
    "TINYTEXT": 255,
    "BLOB": 65_535,
    "TEXT": 65_535,
    "MEDIUMBLOB": 16_777_215,
    "MEDIUMTEXT": 16_777_215,
    "LONGBLOB": 4_294_967_295,
    "LONGTEXT": 4_294_967_295,
}
_MYSQL_ESCAPED = (b"\\", b"'", b'"', b"\0", b"\n", b"\r", b"\x1a")
_SQLITE_BUSY = re.compile(r"database is locked|database table is locked", re.I)
#: Connection errors that waiting cannot fix, each with what to do about it. PostgreSQL's
#: arrive as text only (libpq gives no SQLSTATE before a session exists); English messages.
_FIX_DATABASE = "create the database, or fix its name in result_backend"
_FIX_LOGIN = "fix the user name or password in result_backend, or create that user"
_FIX_HOST = "fix the host name in result_backend"
_FIX_GRANT = "grant that user access to the database (CONNECT), or use another user"
_PG_PERMANENT = (
    (re.compile(r'database "[^"]*" does not exist'), _FIX_DATABASE),
    (re.compile(r'role "[^"]*" does not exist'), _FIX_LOGIN),
    (re.compile(r"password authentication failed|no password supplied", re.I), _FIX_LOGIN),
    (re.compile(r"no pg_hba\.conf entry|(peer|ident) authentication failed", re.I), _FIX_LOGIN),
    (re.compile(r"permission denied for database", re.I), _FIX_GRANT),
    (re.compile(r"failed to resolve host|could not translate host name", re.I), _FIX_HOST),
)
#: MySQL/MariaDB error numbers: unknown database, access denied (login, database, socket
#: auth), unknown host (mysqlclient's own; PyMySQL says 2003 with the resolver's text).
_MYSQL_PERMANENT = {1049: _FIX_DATABASE, 1045: _FIX_LOGIN, 1698: _FIX_LOGIN, 1044: _FIX_GRANT}
_MYSQL_UNKNOWN_HOST = 2005
_UNRESOLVED = re.compile(r"Name or service not known|nodename nor servname|No address associated")
_SQLITE_UNOPENABLE = re.compile(r"unable to open database file", re.I)
_FIX_SQLITE = (
    "fix the path in result_backend: its directory must exist and this user must be "
    "able to write there"
)
#: PostgreSQL refuses a notification payload of this many bytes or more.
NOTICE_LIMIT = 8000
#: What :meth:`Dialect.constant` writes into SQL text as it is.
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_]+")


@dataclass(frozen=True)
class Dialect:
    """One database family's way of doing the few things SQL does not standardise."""

    name: str

    # ---- writes -------------------------------------------------------
    def upsert(
        self,
        table: sa.Table,
        columns: Sequence[str],
        id_seq: bool,
        insert_only: Sequence[str] = (),
    ) -> sa.Insert:
        """INSERT … or UPDATE the row for ``task_id``, unless it already holds SUCCESS.

        The SUCCESS rule lives in the statement, so it holds against any
        concurrent writer without a read first or a row lock held by Python.
        Columns in ``insert_only`` are written by the insert, never updated.
        """
        values: dict[str, Any] = {c: sa.bindparam(c) for c in columns}
        if self.name != "sqlite" and "id" in table.c:
            values["id"] = _id_value(table, id_seq)
        updated = [c for c in columns if c != "task_id" and c not in insert_only]
        if self.name == "mysql":
            stmt = mysql.insert(table).values(values)
            guard = table.c.status == self.constant(states.SUCCESS)
            # MySQL applies assignments left to right: status must come last,
            # or the guard would see the freshly written value.
            ordered = sorted(updated, key=lambda c: c == "status")
            return stmt.on_duplicate_key_update(
                [(c, sa.case((guard, table.c[c]), else_=stmt.inserted[c])) for c in ordered]
            )
        ins = (postgresql if self.name == "postgresql" else sqlite).insert(table).values(values)
        return ins.on_conflict_do_update(
            index_elements=[table.c.task_id],
            set_={c: ins.excluded[c] for c in updated},
            where=sa.or_(table.c.status.is_(None), table.c.status != self.constant(states.SUCCESS)),
        )

    def constant(self, value: str) -> sa.ColumnElement[str]:
        """``value`` written into the statement's text instead of bound to it.

        A bound constant is a parameter the driver converts and sends on every
        execution (the SUCCESS guard of every store, the channel of every
        notification); in the text, the server's prepared statement holds it
        once. Only plain words are accepted: quoted the same way by every
        database, with nothing a driver or ``NO_BACKSLASH_ESCAPES`` reads
        differently (``%``, ``\\``, quotes).
        """
        if not _PLAIN_WORD.fullmatch(value):
            raise ValueError(f"not a plain word, cannot be written into SQL: {value!r}")
        return sa.literal_column(f"'{value}'", sa.String())

    def replace(self, table: sa.Table, key: str, columns: Sequence[str], id_seq: bool) -> sa.Insert:
        """Plain upsert on ``key`` (group rows: the newest save wins)."""
        values: dict[str, Any] = {c: sa.bindparam(c) for c in columns}
        if self.name != "sqlite" and "id" in table.c:
            values["id"] = _id_value(table, id_seq)
        updated = [c for c in columns if c != key]
        if self.name == "mysql":
            stmt = mysql.insert(table).values(values)
            return stmt.on_duplicate_key_update({c: stmt.inserted[c] for c in updated})
        ins = (postgresql if self.name == "postgresql" else sqlite).insert(table).values(values)
        return ins.on_conflict_do_update(
            index_elements=[table.c[key]], set_={c: ins.excluded[c] for c in updated}
        )

    def part_counter(self, table: sa.Table, parts: sa.Table) -> sa.Executable | None:
        """The one statement that counts a part, where the database has one (PostgreSQL).

        The part's insert runs in a CTE and the counter's ``UPDATE … RETURNING
        done, chord_size`` only if it inserted; parameters ``group_id``,
        ``task_id`` and ``date_created``. Elsewhere ``None``: counting takes a
        transaction (:meth:`count_part`).
        """
        if self.name != "postgresql":
            return None
        inserted = (
            postgresql.insert(parts)
            .values({c: sa.bindparam(c) for c in ("group_id", "task_id", "date_created")})
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

    def count_part(
        self,
        conn: Connection,
        table: sa.Table,
        parts: sa.Table | None,
        part: Mapping[str, Any],
    ) -> tuple[int, int | None] | None:
        """Atomically add one finished part to a chord; return ``(done, chord_size)``.

        ``part`` (``group_id``, ``task_id``, ``date_created``) is recorded in
        ``parts`` with the count, atomically, so the same task reported again
        is not counted again: the insert and the count in one explicit
        transaction (where :meth:`part_counter` has one statement, that is
        quicker). ``None`` when the part was counted already or the chord has
        no counter row. Without ``parts`` (a schema before revision 0005 and no
        rights to upgrade it) parts are counted as they come.
        """
        if parts is None:
            return self._count(conn, table, part["group_id"])
        conn.exec_driver_sql("BEGIN IMMEDIATE" if self.name == "sqlite" else "START TRANSACTION")
        try:
            try:
                conn.execute(sa.insert(parts).values(dict(part)))
            except IntegrityError:
                conn.exec_driver_sql("ROLLBACK")
                return None
            counted = self._count(conn, table, part["group_id"])
        except BaseException:
            with contextlib.suppress(DBAPIError):
                conn.exec_driver_sql("ROLLBACK")
            raise
        conn.exec_driver_sql("COMMIT")
        return counted

    def _count(
        self, conn: Connection, table: sa.Table, group_id: str
    ) -> tuple[int, int | None] | None:
        """``done = done + 1`` returning the new count and the size.

        MySQL/MariaDB have no ``UPDATE … RETURNING``: the new count goes
        through the connection-local ``LAST_INSERT_ID(expr)``, read back on
        the same connection.
        """
        where = table.c.group_id == group_id
        if self.name == "mysql":
            updated = conn.execute(
                sa.update(table).where(where).values(done=sa.func.last_insert_id(table.c.done + 1))
            )
            if not updated.rowcount:
                return None
            row = conn.execute(
                sa.select(sa.func.last_insert_id(), table.c.chord_size).where(where)
            ).first()
        else:
            row = conn.execute(
                sa.update(table)
                .where(where)
                .values(done=table.c.done + 1)
                .returning(table.c.done, table.c.chord_size)
            ).first()
        return None if row is None else (int(row[0]), row[1])

    def notifying(self, upsert: sa.Insert, table: sa.Table, channel: str) -> sa.Executable:
        """The upsert plus a ``pg_notify`` of the written row, still one statement.

        Only PostgreSQL has notifications; elsewhere the upsert is returned as is.
        The payload is the statement's ``notice`` parameter, sent at commit and
        only if the row was written (a stored SUCCESS refuses the write, and
        the notification with it). The writer composes the payload from the
        values it sends: JSON built in the statement from ``RETURNING`` made a
        store slower (238 against 229 µs median, interleaved, one connection).
        """
        if self.name != "postgresql":
            return upsert
        written = upsert.returning(table.c.task_id).cte("written")
        notice = sa.bindparam("notice", type_=sa.Text)
        return sa.select(sa.func.pg_notify(self.constant(channel), notice)).select_from(written)

    def only_writers_connect(self, conn: Connection, table: sa.Table) -> bool:
        """Whether every role that may log in to this database may read and write ``table``.

        Then a notification that carries a row shows no role anything it could
        not read, and a forged one gives no role a power it lacks: what
        ``sqlresults_notify_rows = "auto"`` asks before rows travel (any
        session may ``LISTEN``/``NOTIFY`` on any channel: PostgreSQL has no
        grants on them). Superusers hold every privilege. Only PostgreSQL
        notifies; elsewhere ``False``.
        """
        if self.name != "postgresql":
            return False
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

    def id_from_sequence(self, id_column: dict[str, Any]) -> bool:
        """Whether inserts must draw ``id`` from Celery's sequence (else it auto-increments).

        Decided from the reflected table, so tables made by any Celery or
        SQLAlchemy version (sequence or auto-increment) are written correctly.
        """
        if self.name == "sqlite":
            return False
        if self.name == "mysql":
            return not id_column.get("autoincrement", False)
        return id_column.get("default") is None and not id_column.get("identity")

    def expiry(
        self,
        table: sa.Table,
        timestamp: sa.Column[Any],
        old: sa.ColumnElement[bool],
        limit: int,
        filtered: bool = False,
    ) -> Callable[[Connection], tuple[int, bool]]:
        """A function deleting the next batch of about ``limit`` of the ``old`` rows.

        ``old`` is an age on ``timestamp`` (``filtered``: and more, failed
        tasks only, say). It answers ``(rows deleted, whether that was the last
        batch)``. Each batch is its own short statement (autocommit), so locks
        are held for one batch at a time, and every DELETE checks ``old``
        itself: a row written meanwhile (a task re-run under its id) stays.
        """
        step: Callable[[Connection], tuple[int, bool]]
        if self.name == "mysql" or filtered:
            # MySQL: see _walk_expired. Filtered passes everywhere: "the oldest N that
            # match" would wade through the old rows kept (failures kept longer) each time.
            step = _walk_expired(table, timestamp, old, limit)
        else:
            key = list(table.primary_key.columns)
            target = key[0] if len(key) == 1 else sa.tuple_(*key)  # row values, composite key
            stmt = sa.delete(table).where(target.in_(sa.select(*key).where(old).limit(limit)), old)

            def step(conn: Connection) -> tuple[int, bool]:
                n = int(conn.execute(stmt).rowcount)
                return n, n < limit

        if self.name != "sqlite":
            return step

        def paced(conn: Connection) -> tuple[int, bool]:
            started = time.monotonic()
            n, last = step(conn)
            if not last:
                # SQLite has one write lock for the whole database, and a writer
                # waiting for it sleeps between tries: without a pause the next
                # batch would take the lock again before that writer wakes.
                time.sleep(time.monotonic() - started)
            return n, last

        return paced

    # ---- schema -------------------------------------------------------
    @contextlib.contextmanager
    def schema_lock(self, conn: Connection, timeout: float) -> Iterator[None]:
        """Hold the database's own lock for schema changes while the block runs.

        PostgreSQL: a session-level advisory lock taken by polling
        ``pg_try_advisory_lock``, so it survives the commits between
        revisions (``CREATE INDEX CONCURRENTLY`` needs them) and a waiting
        process holds no snapshot an index build would wait for; DDL gives
        up after ``timeout`` instead of queueing writers behind it.
        MySQL/MariaDB: ``GET_LOCK``. SQLite: ``BEGIN IMMEDIATE``, the
        database write lock, with everything in that one transaction.
        """
        if self.name == "postgresql":
            with _pg_session_lock(conn, timeout):
                yield
        elif self.name == "mysql":
            conn.execution_options(isolation_level="READ COMMITTED")
            got = conn.execute(
                sa.text("SELECT GET_LOCK(:n, :t)"), {"n": _LOCK_NAME, "t": int(timeout)}
            ).scalar()
            conn.commit()
            if got != 1:
                raise TimeoutError(f"waited {timeout:.0f}s for MySQL lock {_LOCK_NAME!r}")
            try:
                yield
                conn.commit()
            finally:
                conn.execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": _LOCK_NAME})
                conn.commit()
        else:
            # The pysqlite driver opens transactions lazily and never for DDL;
            # take manual control so the DDL runs inside our write lock.
            conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                conn.exec_driver_sql("ROLLBACK")
                raise
            conn.exec_driver_sql("COMMIT")

    # ---- connections --------------------------------------------------
    def lock_timeout_statements(self, seconds: float) -> list[str]:
        """Statements that bound, for one session, how long a statement waits for a lock.

        Run on every new connection, so a table or row locked by someone else
        (a long migration, a stuck transaction) makes a write fail after
        ``seconds`` instead of hanging the worker; the backend's retry policy
        then takes over. ``0`` keeps the server's default.
        """
        if seconds <= 0:
            return []
        ms = max(1, round(seconds * 1000))
        if self.name == "postgresql":
            return [f"SET lock_timeout = {ms}"]
        if self.name == "mysql":
            # InnoDB row locks, and metadata locks (LOCK TABLES, DDL); whole seconds only.
            whole = max(1, math.ceil(seconds))
            return [
                f"SET SESSION innodb_lock_wait_timeout = {whole}",
                f"SET SESSION lock_wait_timeout = {whole}",
            ]
        return [f"PRAGMA busy_timeout = {ms}"]

    def commit_statements(self, durable: bool) -> list[str]:
        """Statements that relax, for one session, how a commit reaches the disk.

        ``durable=False`` (``sqlresults_durable_commit``): PostgreSQL confirms a
        commit before its WAL is flushed (``synchronous_commit = off``: a crash
        of the *database server* may lose the last fraction of a second of
        results, never corrupts); SQLite in WAL mode syncs at checkpoints only
        (``synchronous = NORMAL``: a power loss may lose the last commits).
        MySQL/MariaDB cannot do this per session (settings refuse it there).
        """
        if durable:
            return []
        if self.name == "postgresql":
            return ["SET synchronous_commit = off"]
        if self.name == "sqlite":
            return ["PRAGMA synchronous = NORMAL"]
        return []

    def database_file(self, url: Any) -> str | None:
        """The path of the file holding the database (SQLite on disk), else ``None``."""
        if self.name != "sqlite":
            return None
        database = url.database
        if not database or database == ":memory:" or database.startswith("file:"):
            return None
        return str(database)

    # ---- value sizes ----------------------------------------------------
    def column_capacity(self, column_type: Any) -> int | None:
        """Bytes a reflected binary/text column holds, or ``None`` for "more than we'd send".

        MySQL/MariaDB ``BLOB``/``TEXT`` (what Celery's ``db+`` creates there)
        hold 64 KB; in strict mode a longer value is an error, otherwise it is
        cut silently. PostgreSQL ``bytea``/``text`` and SQLite hold up to 1 GB,
        more than a result message can carry: not checked.
        """
        if self.name != "mysql":
            return None
        return _MYSQL_CAPACITY.get(type(column_type).__name__.upper())

    def packet_limit(self, conn: Connection) -> int | None:
        """Bytes one statement may take on the wire (MySQL's ``max_allowed_packet``)."""
        if self.name != "mysql":
            return None
        value = conn.exec_driver_sql("SELECT @@max_allowed_packet").scalar()
        return None if value is None else int(value)

    def wire_size(self, value: bytes | str) -> int:
        """Bytes ``value`` takes inside a statement.

        PyMySQL sends parameters inline, escaping quotes, backslashes, NUL,
        newlines and ^Z with a backslash; PostgreSQL and SQLite bind them as is.
        """
        data = value.encode() if isinstance(value, str) else value
        if self.name != "mysql":
            return len(data)
        return len(data) + sum(data.count(c) for c in _MYSQL_ESCAPED)

    # ---- errors -------------------------------------------------------
    def is_lock_timeout(self, exc: BaseException) -> bool:
        """True when ``exc`` says a statement gave up waiting for another session's lock."""
        return self._error_is(exc, _PG_LOCK_NOT_AVAILABLE, _MYSQL_LOCK_WAIT_TIMEOUT, _SQLITE_BUSY)

    def permanent_error_fix(self, exc: BaseException) -> str | None:
        """What to do about ``exc`` if waiting cannot fix it (else ``None``: worth a retry).

        An unknown database, role or host, a refused login or no right to connect
        stays so however long one waits: such errors are reported at once, not
        retried for ``sqlresults_retry_timeout``.
        """
        orig = getattr(exc, "orig", None) or exc
        text = " ".join(str(orig).split())
        if self.name == "postgresql":
            return next((fix for pattern, fix in _PG_PERMANENT if pattern.search(text)), None)
        if self.name == "mysql":
            args: tuple[Any, ...] = tuple(getattr(orig, "args", ()))
            code = args[0] if args else None
            if code == _MYSQL_UNKNOWN_HOST or (code == 2003 and _UNRESOLVED.search(text)):
                return _FIX_HOST
            return _MYSQL_PERMANENT.get(code) if isinstance(code, int) else None
        return _FIX_SQLITE if _SQLITE_UNOPENABLE.search(text) else None

    def is_missing_table(self, exc: BaseException) -> bool:
        """True when ``exc`` says a table does not exist (and nothing else went wrong)."""
        return self._error_is(exc, _PG_UNDEFINED_TABLE, _MYSQL_NO_SUCH_TABLE, _MISSING_TABLE)

    def _error_is(
        self, exc: BaseException, sqlstate: str, errno: int, sqlite_text: re.Pattern[str]
    ) -> bool:
        """Whether the driver error under ``exc`` is this PostgreSQL SQLSTATE, this
        MySQL/MariaDB error number, or (SQLite has neither) a message matching the text."""
        orig = getattr(exc, "orig", None)
        if orig is None:
            return False
        if self.name == "postgresql":
            return getattr(orig, "sqlstate", None) == sqlstate
        if self.name == "mysql":
            args: tuple[Any, ...] = tuple(getattr(orig, "args", ()))
            return bool(args) and args[0] == errno
        return bool(sqlite_text.search(str(orig)))

    # ---- record on publish ------------------------------------------------
    def insert_if_absent(
        self, table: sa.Table, key: str, columns: Sequence[str], id_seq: bool
    ) -> sa.Insert:
        """INSERT a row unless one with the same ``key`` exists; an existing row is untouched."""
        values: dict[str, Any] = {c: sa.bindparam(c) for c in columns}
        if self.name != "sqlite" and "id" in table.c:
            values["id"] = _id_value(table, id_seq)
        if self.name == "mysql":
            stmt = mysql.insert(table).values(values)
            return stmt.on_duplicate_key_update({key: table.c[key]})  # a no-op update
        ins = (postgresql if self.name == "postgresql" else sqlite).insert(table).values(values)
        return ins.on_conflict_do_nothing(index_elements=[table.c[key]])


def _id_value(table: sa.Table, from_sequence: bool) -> Any:
    """What to insert into ``id``: Celery's sequence, or the column's own default.

    Celery's layout gives ``id`` a named sequence (PostgreSQL, MariaDB): its
    ``nextval`` is drawn inline so the write stays one statement. Tables whose
    ``id`` is SERIAL/IDENTITY/AUTO_INCREMENT get ``DEFAULT`` explicitly, or
    SQLAlchemy would still draw from the (absent) sequence our ``Table`` names.
    """
    if not from_sequence:
        return sa.literal_column("DEFAULT")
    seq = table.c.id.default
    assert isinstance(seq, sa.Sequence)
    return seq.next_value()


def dialect_for(name: str) -> Dialect:
    """The :class:`Dialect` for an SQLAlchemy dialect name (``mariadb`` is ``mysql``)."""
    family = "mysql" if name in ("mysql", "mariadb") else name
    if family not in ("postgresql", "mysql", "sqlite"):
        raise ValueError(name)
    return Dialect(family)


@contextlib.contextmanager
def _pg_session_lock(conn: Connection, timeout: float) -> Iterator[None]:
    conn.execution_options(isolation_level="AUTOCOMMIT")
    deadline = time.monotonic() + timeout
    delay = 0.005
    try_lock = sa.text("SELECT pg_try_advisory_lock(:k)")
    while not conn.execute(try_lock, {"k": _PG_LOCK_KEY}).scalar():
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
        # DDL waiting longer than this for a table lock gives up instead of
        # queueing every writer behind it.
        conn.exec_driver_sql(f"SET lock_timeout = '{int(timeout * 1000)}ms'")
        conn.commit()
        conn.execution_options(isolation_level="READ COMMITTED")
        yield
        conn.commit()
    finally:
        try:
            conn.rollback()
            conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.execute(sa.text("SELECT set_config('lock_timeout', :v, false)"), {"v": previous})
            conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
            conn.commit()
        except DBAPIError:
            conn.invalidate()  # closing the session releases the lock


def _walk_expired(
    table: sa.Table, timestamp: sa.Column[Any], old: sa.ColumnElement[bool], limit: int
) -> Callable[[Connection], tuple[int, bool]]:
    """MySQL/MariaDB batches: ranges of the timestamp index, each starting where the last ended.

    InnoDB keeps deleted index entries until its purge catches up, so asking
    for "the oldest N" again and again would wade through every earlier
    batch's entries (quadratic: minutes on a million rows). Instead find where
    the next ``limit`` rows end (an index-only read) and delete that range.
    """
    since: Any = None  # where the previous batch ended (an old row's timestamp, never NULL)

    def walk(conn: Connection) -> tuple[int, bool]:
        nonlocal since
        after = () if since is None else (timestamp >= since,)
        pick = sa.select(timestamp).where(old, *after).order_by(timestamp)
        last = conn.execute(pick.offset(limit - 1).limit(1)).scalar()
        if last is None:  # fewer than `limit` left: the rest in one go
            return int(conn.execute(sa.delete(table).where(old, *after)).rowcount), True
        since = last
        batch = sa.delete(table).where(old, *after, timestamp <= last)
        return int(conn.execute(batch).rowcount), False

    return walk
