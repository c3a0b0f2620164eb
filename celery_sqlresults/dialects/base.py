"""What every database does alike, and the questions each subclass answers its own way."""

from __future__ import annotations

import abc
import contextlib
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import sqlalchemy as sa
from celery import states
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, NoSuchTableError

__all__ = ["Dialect", "Expiry", "OnConflict"]

#: Deletes the next batch of expired rows: ``(rows deleted, whether that was the last batch)``.
Expiry = Callable[[Connection], tuple[int, bool]]

#: What :meth:`Dialect.constant` writes into SQL text as it is.
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_]+")

# What to do about a connection error that waiting cannot fix.
FIX_DATABASE = "create the database, or fix its name in result_backend"
FIX_LOGIN = "fix the user name or password in result_backend, or create that user"
FIX_HOST = "fix the host name in result_backend"
FIX_GRANT = "grant that user access to the database (CONNECT), or use another user"


class Dialect(abc.ABC):
    """One database family's way of doing the few things SQL does not standardise."""

    #: SQLAlchemy's names for this database (``url.get_backend_name()``).
    names: ClassVar[tuple[str, ...]]
    #: Our pip extra for this database's drivers, and the extra of each driver we ship.
    extra: ClassVar[str | None] = None
    driver_extras: ClassVar[Mapping[str, str]] = {}
    #: The DBAPI drivers the fast path runs on (:mod:`celery_sqlresults.fastpath`).
    fast_drivers: ClassVar[frozenset[str]] = frozenset()
    #: ``create_engine`` options our engines take unless the settings give their own.
    engine_defaults: ClassVar[Mapping[str, Any]] = {}
    #: Whether writers can wake waiters (``LISTEN/NOTIFY``).
    notifies: ClassVar[bool] = False
    #: Whether rows without ``date_done`` come first in ``ORDER BY date_done DESC``.
    nulls_first_descending: ClassVar[bool] = False
    #: Whether indexes are built without blocking writers, outside a transaction
    #: (PostgreSQL's ``CREATE INDEX CONCURRENTLY``), by the schema revisions.
    builds_indexes_online: ClassVar[bool] = False
    #: Whether one connection is one server session from start to end, so session state
    #: (``SET``, session locks, ``LISTEN``) stays with it: not behind a transaction pooler.
    keeps_sessions: ClassVar[bool] = True
    #: Whether the binary columns Celery's ``db+`` creates hold only 64 KB (MySQL ``BLOB``).
    has_narrow_blobs: ClassVar[bool] = False
    #: Whether name globs need an index of their own to be prefix matches (PostgreSQL).
    has_pattern_index: ClassVar[bool] = False
    #: Statement that opens a transaction which writes (and so takes its locks at once).
    begin_write: ClassVar[str] = "START TRANSACTION"
    #: Whether ``id`` must be written explicitly (the sequence's ``nextval``, or ``DEFAULT``).
    writes_id: ClassVar[bool] = True
    #: Whether ``substr`` of a binary value loads only the part asked for into this process
    #: (the server cuts it); SQLite's, run in this process, loads the whole value first, so
    #: parts of large values are read with :meth:`read_blob` there.
    cuts_blobs_in_sql: ClassVar[bool] = True
    #: Whether a session's ``SET``/``PRAGMA`` statements leave a transaction to commit.
    set_opens_transaction: ClassVar[bool] = True

    # ---- reads --------------------------------------------------------
    def one_of(self, column: sa.ColumnElement[Any], name: str) -> sa.ColumnElement[bool]:
        """``column`` is one of the list bound as ``name``: an ``IN`` list, one
        parameter per value, rendered at each call for its length."""
        return column.in_(sa.bindparam(name, expanding=True))

    # ---- writes -------------------------------------------------------
    @abc.abstractmethod
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

    @abc.abstractmethod
    def replace(self, table: sa.Table, key: str, columns: Sequence[str], id_seq: bool) -> sa.Insert:
        """Plain upsert on ``key`` (group rows: the newest save wins)."""

    @abc.abstractmethod
    def insert_if_absent(
        self, table: sa.Table, key: str, columns: Sequence[str], id_seq: bool
    ) -> sa.Insert:
        """INSERT a row unless one with the same ``key`` exists; an existing row is untouched."""

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

    def values(self, table: sa.Table, columns: Sequence[str], id_seq: bool) -> dict[str, Any]:
        """Bound parameters for ``columns``, and ``id`` as this database needs it written."""
        values: dict[str, Any] = {c: sa.bindparam(c) for c in columns}
        if self.writes_id and "id" in table.c:
            values["id"] = _id_value(table, id_seq)
        return values

    def notifying(self, upsert: sa.Insert, table: sa.Table, channel: str) -> sa.Executable:
        """The upsert plus a notification of waiters, still one statement (where there is one)."""
        return upsert

    # ---- chords -------------------------------------------------------
    def part_counter(
        self, table: sa.Table, parts: sa.Table, columns: Sequence[str]
    ) -> sa.Executable | None:
        """The one statement that counts a part, where the database has one.

        Elsewhere ``None``: counting takes a transaction (:meth:`count_part`).
        """
        return None

    def count_part(
        self,
        conn: Connection,
        table: sa.Table,
        parts: sa.Table | None,
        part: Mapping[str, Any],
    ) -> tuple[int, int | None] | None:
        """Atomically add one finished part to a chord; return ``(done, chord_size)``.

        ``part`` (``group_id``, ``task_id``, ``date_created``, ``group_index``
        where the table has it) is recorded in
        ``parts`` with the count, atomically, so the same task reported again
        is not counted again: the insert and the count in one explicit
        transaction. ``None`` when the part was counted already or the chord
        has no counter row. Without ``parts`` (a schema before revision 0005
        and no rights to upgrade it) parts are counted as they come.
        """
        if parts is None:
            return self.add_one(conn, table, part["group_id"])
        conn.exec_driver_sql(self.begin_write)
        try:
            try:
                conn.execute(sa.insert(parts).values(dict(part)))
            except IntegrityError:
                conn.exec_driver_sql("ROLLBACK")
                return None
            counted = self.add_one(conn, table, part["group_id"])
        except BaseException:
            with contextlib.suppress(DBAPIError):
                conn.exec_driver_sql("ROLLBACK")
            raise
        conn.exec_driver_sql("COMMIT")
        return counted

    @contextlib.contextmanager
    def writing(self, conn: Connection) -> Iterator[None]:
        """One explicit transaction on an autocommit connection: committed if the block
        returns, rolled back if it raises. Its first write takes the row locks it needs
        (SQLite: the database's write lock at once), so the block's reads see them held."""
        conn.exec_driver_sql(self.begin_write)
        try:
            yield
        except BaseException:
            with contextlib.suppress(DBAPIError):
                conn.exec_driver_sql("ROLLBACK")
            raise
        conn.exec_driver_sql("COMMIT")

    def add_one(
        self, conn: Connection, table: sa.Table, group_id: str
    ) -> tuple[int, int | None] | None:
        """``done = done + 1`` on a chord's counter, returning the new count and the size."""
        row = conn.execute(
            sa.update(table)
            .where(table.c.group_id == group_id)
            .values(done=table.c.done + 1)
            .returning(table.c.done, table.c.chord_size)
        ).first()
        return None if row is None else (int(row[0]), row[1])

    # ---- reading the layout -----------------------------------------------
    def table_columns(
        self, conn: Connection, tables: Sequence[sa.Table]
    ) -> list[dict[str, dict[str, Any]] | None]:
        """Each table's columns by name, described as SQLAlchemy's inspector does
        (``type``, ``default``, ``autoincrement``, ``identity``); ``None`` for a missing table.

        A subclass may answer with one catalog query and only the keys
        :meth:`id_from_sequence` and :meth:`column_capacity` read: this runs on
        the first call of every process.
        """
        insp = sa.inspect(conn)
        out: list[dict[str, dict[str, Any]] | None] = []
        for table in tables:
            try:
                columns = insp.get_columns(table.name, table.schema)
            except NoSuchTableError:
                out.append(None)
                continue
            out.append({str(c["name"]): dict(c) for c in columns})
        return out

    @abc.abstractmethod
    def id_from_sequence(self, id_column: Mapping[str, Any]) -> bool:
        """Whether inserts must draw ``id`` from Celery's sequence (else it auto-increments).

        Decided from the reflected table, so tables made by any Celery or
        SQLAlchemy version (sequence or auto-increment) are written correctly.
        """

    def only_writers_connect(self, conn: Connection, table: sa.Table) -> bool:
        """Whether every role that may connect may also read and write ``table``.

        Asked before notifications carry rows; ``False`` where there are none.
        """
        return False

    # ---- expiry -----------------------------------------------------------
    def expiry(
        self,
        table: sa.Table,
        timestamp: sa.Column[Any],
        old: sa.ColumnElement[bool],
        limit: int,
        filtered: bool = False,
    ) -> Expiry:
        """A function deleting the next batch of about ``limit`` of the ``old`` rows.

        ``old`` is an age on ``timestamp`` (``filtered``: and more, failed
        tasks only, say). Each batch is its own short statement (autocommit),
        so locks are held for one batch at a time, and every DELETE checks
        ``old`` itself: a row written meanwhile (a task re-run under its id)
        stays. Filtered passes walk the timestamp index: "the oldest N that
        match" would wade through the old rows kept (failures kept longer)
        each time.
        """
        if filtered:
            return walk_expired(table, timestamp, old, limit)
        key = list(table.primary_key.columns)
        target = key[0] if len(key) == 1 else sa.tuple_(*key)  # row values, composite key
        stmt = sa.delete(table).where(target.in_(sa.select(*key).where(old).limit(limit)), old)

        def step(conn: Connection) -> tuple[int, bool]:
            n = int(conn.execute(stmt).rowcount)
            return n, n < limit

        return step

    # ---- schema -------------------------------------------------------
    @abc.abstractmethod
    def schema_lock(
        self, conn: Connection, timeout: float
    ) -> contextlib.AbstractContextManager[None]:
        """Hold the database's own lock for schema changes while the block runs.

        Any number of processes may start at once: the lock makes them change
        each object exactly once. Raises :class:`TimeoutError` after ``timeout``.
        """

    def storage_statements(self, conn: Connection | None, table: sa.Table) -> list[sa.Executable]:
        """Statements giving ``table``, one that grows between cleanups, our storage settings
        (revision 0008), leaving any its owner set; ``conn`` ``None``: offline SQL, all of them.

        None by default: only PostgreSQL needs a vacuum to reuse the space of deleted rows.
        """
        return []

    def storage_reset_statements(
        self, conn: Connection | None, table: sa.Table
    ) -> list[sa.Executable]:
        """The settings of :meth:`storage_statements` back to the server's defaults, where
        they still hold our values (``conn`` ``None``: all of them)."""
        return []

    def end_version_read(self, conn: Connection) -> None:
        """End the transaction reading the version left open (SQLite keeps its lock)."""
        conn.commit()

    # ---- connections --------------------------------------------------
    def galera(self) -> Dialect | None:
        """This database's Galera Cluster variant (``sqlresults_galera = True``), if it has one."""
        return None

    def resolve(self, engine: Engine, detect: bool) -> Dialect:
        """The dialect for what ``engine`` reaches, set up for it (asked once per engine).

        ``detect``: look at the server (a MariaDB that is a Galera node gets the
        Galera variant). May connect; raises the driver's error if it cannot.
        """
        return self

    @abc.abstractmethod
    def lock_timeout_statements(self, seconds: float) -> list[str]:
        """Statements that bound, for one session, how long a statement waits for a lock.

        Run on every new connection, so a table or row locked by someone else
        (a long migration, a stuck transaction) makes a write fail after
        ``seconds`` instead of hanging the worker; the backend's retry policy
        then takes over. ``0`` keeps the server's default.
        """

    def commit_statements(self, durable: bool) -> list[str]:
        """Statements that relax, for one session, how a commit reaches the disk."""
        return []

    def relaxed_commit_refusal(self) -> str | None:
        """Why ``sqlresults_durable_commit = False`` cannot work here (``None``: it can)."""
        return None

    def session_statements(self, url: URL, lock_timeout: float, durable: bool) -> list[str]:
        """Everything run on each new connection: lock bound, then commit durability."""
        return self.lock_timeout_statements(lock_timeout) + self.commit_statements(durable)

    def set_up_session(self, dbapi_conn: Any, statements: list[str]) -> None:
        """Run :meth:`session_statements` on a new raw connection.

        Each statement in turn, then (:attr:`set_opens_transaction`) a commit ending
        the transaction the driver opened for them; dialects that can do it in fewer
        round trips do.
        """
        cur = dbapi_conn.cursor()
        try:
            for statement in statements:
                cur.execute(statement)
        finally:
            cur.close()
        if self.set_opens_transaction:
            dbapi_conn.commit()

    def behind_pooler(self) -> Dialect | None:
        """This database reached through a transaction pooler (``sqlresults_pooler =
        "transaction"``), where there is such a variant; ``None`` where there is none."""
        return None

    def connect_args(self) -> dict[str, Any]:
        """Driver arguments every connection of the backend's engine is opened with."""
        return {}

    def install_hint(self, driver: str) -> str:
        """How to install the missing DBAPI module of ``driver``."""
        if driver in self.driver_extras:
            return f"pip install 'celery-sqlresults[{self.driver_extras[driver]}]'."
        if self.extra is not None:
            return (
                f"pip install 'celery-sqlresults[{self.extra}]' and use "
                "'postgresql+psycopg://', 'mysql+pymysql://' or 'mysql+mysqldb://' in the URL."
            )
        return "install the driver's package."

    def database_file(self, url: URL) -> str | None:
        """The path of the file holding the database, if it is one (SQLite on disk)."""
        return None

    def in_autocommit(self, dbapi_conn: Any) -> bool:
        """Whether a raw connection of one of :attr:`fast_drivers` commits each statement."""
        return bool(dbapi_conn.get_autocommit())

    def uses_libpq(self, driver: str) -> bool:
        """Whether the fast path sends statements through libpq itself (psycopg)."""
        return False

    def listener_connect(self, url: URL) -> Callable[[], Any] | None:
        """A function opening a dedicated connection for notifications, where there are any."""
        return None

    def async_listener_connect(self, url: URL) -> Callable[[], Awaitable[Any]] | None:
        """Like :meth:`listener_connect`, a coroutine function, for an event loop's listener."""
        return None

    # ---- value sizes ----------------------------------------------------
    def packet_limit(self, conn: Connection) -> int | None:
        """Bytes one statement may take on the wire, where the server caps it."""
        return None

    def column_capacity(self, column_type: Any) -> int | None:
        """Bytes a reflected binary/text column holds, or ``None`` for "more than we'd send"."""
        return None

    def check_sizes(
        self,
        row: Mapping[str, Any],
        capacity: Mapping[str, int],
        packet_limit: int | None,
        table: str,
        where: str,
    ) -> None:
        """Refuse (:class:`ResultTooLarge`) a row the database would reject or cut.

        Nothing to check where columns hold more than a result message can carry.
        """
        return None

    def read_blob(
        self, conn: Connection, column: sa.Column[Any], row_id: int, start: int, size: int
    ) -> bytes:
        """``size`` bytes from ``start`` (from 0) of the binary value in row ``row_id``."""
        table = column.table
        stmt = sa.select(sa.func.substr(column, start + 1, size, type_=column.type))
        value = conn.execute(stmt.where(table.c.id == row_id)).scalar()
        return b"" if value is None else bytes(value)

    # ---- reads --------------------------------------------------------
    @abc.abstractmethod
    def seconds_between(
        self, start: sa.ColumnElement[Any], end: sa.ColumnElement[Any]
    ) -> sa.ColumnElement[float]:
        """Seconds from timestamp ``start`` to ``end``, as a float computed by the server.

        SQL has no portable interval arithmetic; the metrics' histograms count
        durations in SQL rather than reading rows.
        """

    # ---- errors -------------------------------------------------------
    @abc.abstractmethod
    def is_lock_timeout(self, exc: BaseException) -> bool:
        """True when ``exc`` says a statement gave up waiting for another session's lock."""

    @abc.abstractmethod
    def is_missing_table(self, exc: BaseException) -> bool:
        """True when ``exc`` says a table does not exist (and nothing else went wrong)."""

    @abc.abstractmethod
    def is_missing_column(self, exc: BaseException) -> bool:
        """True when ``exc`` says a column does not exist: the table is older than assumed."""

    @abc.abstractmethod
    def permanent_error_fix(self, exc: BaseException) -> str | None:
        """What to do about ``exc`` if waiting cannot fix it (else ``None``: worth a retry).

        An unknown database, role or host, a refused login or no right to
        connect stays so however long one waits: such errors are reported at
        once, not retried for ``sqlresults_retry_timeout``.
        """


class OnConflict(Dialect):
    """Upserts written ``INSERT … ON CONFLICT`` (PostgreSQL and SQLite share the syntax)."""

    @abc.abstractmethod
    def insert(self, table: sa.Table) -> Any:
        """The database's own ``insert()``, the one with ``on_conflict_do_update``."""

    def upsert(
        self,
        table: sa.Table,
        columns: Sequence[str],
        id_seq: bool,
        insert_only: Sequence[str] = (),
    ) -> sa.Insert:
        ins = self.insert(table).values(self.values(table, columns, id_seq))
        updated = [c for c in columns if c != "task_id" and c not in insert_only]
        return ins.on_conflict_do_update(
            index_elements=[table.c.task_id],
            set_={c: ins.excluded[c] for c in updated},
            where=sa.or_(table.c.status.is_(None), table.c.status != self.constant(states.SUCCESS)),
        )

    def replace(self, table: sa.Table, key: str, columns: Sequence[str], id_seq: bool) -> sa.Insert:
        ins = self.insert(table).values(self.values(table, columns, id_seq))
        return ins.on_conflict_do_update(
            index_elements=[table.c[key]], set_={c: ins.excluded[c] for c in columns if c != key}
        )

    def insert_if_absent(
        self, table: sa.Table, key: str, columns: Sequence[str], id_seq: bool
    ) -> sa.Insert:
        ins = self.insert(table).values(self.values(table, columns, id_seq))
        return ins.on_conflict_do_nothing(index_elements=[table.c[key]])


def driver_error(exc: BaseException) -> BaseException | None:
    """The DBAPI error under an SQLAlchemy error (``None`` if there is none)."""
    return getattr(exc, "orig", None)


def error_text(exc: BaseException) -> str:
    """The driver's message of ``exc``, whitespace collapsed."""
    return " ".join(str(driver_error(exc) or exc).split())


def error_number(exc: BaseException) -> Any:
    """The first argument of the driver's error: MySQL's error number."""
    args: tuple[Any, ...] = tuple(getattr(driver_error(exc) or exc, "args", ()))
    return args[0] if args else None


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


def walk_expired(
    table: sa.Table, timestamp: sa.Column[Any], old: sa.ColumnElement[bool], limit: int
) -> Expiry:
    """Batches as ranges of the timestamp index, each starting where the last one ended.

    Asking for "the oldest N" again and again would wade through every earlier
    batch's leftovers (InnoDB keeps deleted index entries until its purge
    catches up; a filter keeps rows): instead find where the next ``limit``
    rows end (an index-only read) and delete that range.
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
