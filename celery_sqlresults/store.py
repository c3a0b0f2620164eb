"""All SQL the backend runs against the result tables, one method per operation.

Each public method runs one statement per call (one per batch of ids for
:meth:`Store.get_ready`), in autocommit, on the process's pooled engine. The
statements come from :class:`~celery_sqlresults.statements.Statements`, built
once per table layout; a task's read and write, the hot path, run through
:mod:`celery_sqlresults.fastpath`.

Missing tables never make a read fail: a read of a table that does not
exist answers "nothing stored". A write to a missing table has the schema
created first, by the ``create_schema`` function the store was handed (that
is how lazy mode creates it), then writes; without one it raises
:class:`~celery_sqlresults.exceptions.SchemaMissing`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, TypeVar

import sqlalchemy as sa
from celery import states
from sqlalchemy.engine import Connection, Engine, RowMapping
from sqlalchemy.exc import DBAPIError

from . import fastpath, lease
from .dialects import Dialect, Expiry
from .engine import get_engine, is_current
from .exceptions import ResultTooLarge, SchemaMissing
from .layout import Layout, missing_columns, missing_tables, newest, reflect
from .notices import Notices
from .schema import Tables, build_tables
from .settings import Settings
from .statements import Statements

__all__ = ["BATCH_SIZE", "CLEANUP_BATCH", "Grow", "Store"]

#: Ids per query in :meth:`Store.get_ready`: well inside every driver's parameter limit.
BATCH_SIZE = 1000
#: Rows per DELETE in :meth:`Store.cleanup`: short transactions, short locks.
CLEANUP_BATCH = 5000
#: Seconds before a refused oversized value makes the layout be reflected again.
_RECHECK_AFTER = 10.0
T = TypeVar("T")
#: Makes a group's new ``result`` payload from the stored one (``None``: no row);
#: returns ``None`` to leave the row as it is.
Grow = Callable[[bytes | None], bytes | None]


class Store:
    """The result tables of one configuration, and every statement run against them.

    ``create_schema`` creates the tables when a write finds them missing;
    ``on_new_database`` runs when the store finds its database replaced (a
    SQLite file deleted and made again): the backend hands in its start-up
    creation for both, keeping schema policy out of the SQL layer.
    """

    def __init__(
        self,
        settings: Settings,
        create_schema: Callable[[Store], object] | None = None,
        on_new_database: Callable[[Store], None] | None = None,
    ) -> None:
        self.settings = settings
        self.dialect: Dialect = settings.dialect
        self.tables: Tables = build_tables(settings.table_names, settings.table_schemas)
        self.create_schema = create_schema
        self.on_new_database = on_new_database
        self.notices = Notices(
            self.tables.task,
            settings.notify_rows,
            ask=lambda: bool(
                self.run(lambda c, _: self.dialect.only_writers_connect(c, self.tables.task), False)
            ),
            columns=lambda: None if self._known is None else self._known.layout.task_columns,
        )
        self._known: Statements | None = None  # the layout's statements (None: reflect first)
        # A task read before anything is reflected assumes the newest layout, until one
        # finds a column missing (tables of an older Celery that could not be altered).
        self._assumed: Statements | None = None
        self._may_assume = True
        self._known_lock = threading.Lock()
        self._engine: tuple[int, Engine] | None = None
        self._resolved = False  # the dialect asked the server what it is (Galera?)

    @property
    def channel(self) -> str:
        return self.notices.channel

    @property
    def engine(self) -> Engine:
        """This process's engine; remembered per process (a fork gets a new one).

        An engine whose SQLite file was replaced is given up for one on the file
        there now, and the store treats that as a new database: the layout is
        reflected again and :attr:`on_new_database` runs.
        """
        pid = os.getpid()
        known = self._engine
        if known is not None and known[0] == pid and is_current(known[1]) and self._resolved:
            return known[1]
        engine = get_engine(self.settings)
        self._engine = (pid, engine)
        self._resolve(engine)
        if known is not None and known[0] == pid and known[1] is not engine:
            self.forget_layout()
            if self.on_new_database is not None:
                self.on_new_database(self)
        return engine

    def _resolve(self, engine: Engine) -> None:
        """Let the dialect look at the server once (a Galera node?); again if unreachable."""
        self._resolved = False
        try:
            self.dialect = self.settings.dialect.resolve(engine, self.settings.galera == "auto")
        except DBAPIError:
            return  # the operation about to run meets the same error and is retried
        self._resolved = True

    # ---- tasks --------------------------------------------------------
    def store_task(self, values: Mapping[str, Any], notify: bool = False) -> None:
        """Insert or update one task row; a stored SUCCESS is never replaced.

        ``date_created`` is kept from the first insert (a publish-time row's,
        say). ``notify``: waiters are woken by the same statement.
        """

        def write(statements: Statements) -> None:
            statements, row = self._fitting(statements, values)
            stmt = statements.task_upsert(tuple(row), notify)
            if notify:
                row["notice"] = self.notices.payload(row)
            fastpath.execute(self.engine, self.dialect, stmt, row)

        self._write(write)

    def insert_task_if_absent(self, values: Mapping[str, Any]) -> None:
        """Insert a task row unless its ``task_id`` has one: a stored state is never replaced."""

        def write(statements: Statements) -> None:
            row = statements.layout.task_row(values)
            with self.connect() as conn:
                conn.execute(statements.task_insert_if_absent(tuple(row)), row)

        self._write(write)

    def get_task(self, task_id: str, extended: bool = True) -> Mapping[str, Any] | None:
        """One task's row; ``extended=False`` skips the ``result_extended`` columns."""

        def read(statements: Statements) -> Mapping[str, Any] | None:
            stmt = statements.task_read(extended)
            row = fastpath.fetch_one(self.engine, self.dialect, stmt, {"task_id": task_id})
            if row is not None:
                row["task_id"] = task_id
            return row

        return self._read(read, None, assume=True)

    def get_ready(self, task_ids: Sequence[str], extended: bool = True) -> list[RowMapping]:
        """Rows of the given tasks that are in a ready state, one query per batch of ids."""

        def read(conn: Connection, statements: Statements) -> list[RowMapping]:
            stmt = statements.ready_tasks(extended)
            out: list[RowMapping] = []
            for start in range(0, len(task_ids), BATCH_SIZE):
                chunk = list(task_ids[start : start + BATCH_SIZE])
                out.extend(r._mapping for r in conn.execute(stmt, {"ids": chunk}))
            return out

        return self.run(read, [], assume=True) if task_ids else []

    def task_exists(self, task_id: str) -> bool:
        return bool(
            self.run(
                lambda c, s: c.execute(s.task_exists(), {"task_id": task_id}).first() is not None,
                False,
            )
        )

    def forget(self, task_id: str) -> None:
        self.run(lambda c, s: c.execute(s.task_delete(), {"task_id": task_id}), None)

    # ---- groups -------------------------------------------------------
    def save_group(self, group_id: str, result: bytes, date_done: datetime) -> None:
        values = {"taskset_id": group_id, "result": result, "date_done": date_done}

        def write(statements: Statements) -> None:
            with self.connect() as conn:
                conn.execute(statements.group_upsert(), values)

        self._write(write)

    def get_group(self, group_id: str) -> RowMapping | None:
        def read(conn: Connection, statements: Statements) -> RowMapping | None:
            row = conn.execute(statements.group_read(), {"taskset_id": group_id}).first()
            return None if row is None else row._mapping

        return self.run(read, None)

    def delete_group(self, group_id: str) -> None:
        self.run(lambda c, s: c.execute(s.group_delete(), {"taskset_id": group_id}), None)

    # ---- chords -------------------------------------------------------
    def chord_start(self, group_id: str, now: datetime) -> None:
        """(Re)start the counter of a chord: a re-applied frozen chord is a new run."""
        values = {"group_id": group_id, "chord_size": None, "done": 0, "date_created": now}

        def write(statements: Statements) -> None:
            if not statements.layout.has_chord:
                raise SchemaMissing(f"chord table {self.tables.chord.fullname} is missing")
            with self.connect() as conn:
                if statements.layout.has_chord_part:  # a re-applied chord reuses its task ids
                    conn.execute(statements.chord_parts_delete(), {"group_id": group_id})
                conn.execute(statements.chord_start(), values)

        self._write(write)

    def chord_set_size(self, group_id: str, size: int) -> tuple[int, int | None] | None:
        """Fix a chord's size; ``(done, size)`` as they are then, ``None`` without a counter."""
        return self._chord_change(group_id, "chord_set_size", {"size": size}, None)

    def chord_add(self, group_id: str, now: datetime, grow: Grow) -> tuple[int, int | None] | None:
        """Make a chord wait for one more task, and add it to the header group's row
        (``grow`` makes the new row from the old, if there is one) in the same transaction;
        ``(done, size)``, or ``None`` when the chord has no counter (done, or expired)."""
        return self._chord_change(group_id, "chord_add", {}, (now, grow))

    def _chord_change(
        self,
        group_id: str,
        change: str,
        values: dict[str, Any],
        grow: tuple[datetime, Grow] | None,
    ) -> tuple[int, int | None] | None:
        """Change a chord's counter row and, under its lock, its header group's row.

        The counter's UPDATE comes first and locks the row until the commit: a
        part being counted, a size being set or a task being added to the
        same chord waits, so each sees the others' changes whole.
        """

        def write(statements: Statements) -> tuple[int, int | None] | None:
            params = {"chord": group_id, **values}
            with self.connect() as conn, self.dialect.writing(conn):
                conn.execute(getattr(statements, change)(), params)
                row = conn.execute(statements.chord_read_locked(), {"chord": group_id}).first()
                if row is None:
                    return None
                if grow is not None:
                    now, grown_from = grow
                    key = {"taskset_id": group_id}
                    old = conn.execute(statements.group_read_locked(), key).first()
                    grown = grown_from(None if old is None else old[0])
                    if grown is not None:
                        new = {**key, "result": grown, "date_done": now}
                        conn.execute(statements.group_upsert(), new)
                return int(row[0]), row[1]

        return self._read(write, None)

    def chord_part_done(
        self, group_id: str, task_id: str, now: datetime, group_index: int | None = None
    ) -> tuple[int, int | None] | None:
        """Count one finished header task once; ``(done, size)``, or ``None`` when this
        task was counted already or the chord has no counter. ``group_index``: its
        place in the header (kept where the table has the column)."""
        given = {"group_id": group_id, "task_id": task_id, "date_created": now}

        def count(statements: Statements) -> tuple[int, int | None] | None:
            part = {**given, "group_index": group_index}
            part = {c: part[c] for c in statements.part_columns}
            counter = statements.chord_count()
            if counter is not None:  # one statement, on the hot path's connection
                row = fastpath.fetch_one(self.engine, self.dialect, counter, part)
                return None if row is None else (int(row["done"]), row["chord_size"])
            parts = self.tables.chord_part if statements.layout.has_chord_part else None
            with self.connect() as conn:
                return self.dialect.count_part(conn, self.tables.chord, parts, part)

        return self._read(count, None)

    def chord_parts(self, group_id: str) -> list[str] | None:
        """The ids of the parts counted for a chord, in header order; ``None`` where
        the parts' places are not recorded (a schema before revision 0007)."""

        def read(conn: Connection, statements: Statements) -> list[str] | None:
            if not statements.layout.has_part_index:
                return None
            rows = conn.execute(statements.chord_parts_read(), {"group_id": group_id})
            return [row[0] for row in rows]

        return self.run(read, None)

    def generated_headers(self) -> bool:
        """Whether a chord's header can be sent as it is generated: the counted parts
        record their place (revision 0007), so no list of the header is needed first."""
        layout = self.layout()
        return layout is not None and layout.has_part_index

    def chord_delete(self, group_id: str) -> None:
        """Drop a finished chord's counter and its counted parts."""

        def delete(conn: Connection, statements: Statements) -> None:
            conn.execute(statements.chord_delete(), {"group_id": group_id})
            if statements.layout.has_chord_part:
                conn.execute(statements.chord_parts_delete(), {"group_id": group_id})

        self.run(delete, None)

    # ---- expiry -------------------------------------------------------
    def cleanup(
        self,
        cutoff: datetime | None,
        batch: int = CLEANUP_BATCH,
        dry_run: bool = False,
        failures: datetime | Literal["same", "keep"] = "same",
    ) -> dict[str, int]:
        """Delete rows finished before ``cutoff``, ``batch`` per statement (short locks).

        ``failures`` (``result_failure_expires``): FAILURE results go with the
        rest (``"same"``), stay (``"keep"``), or go when finished before the
        given time instead; ``cutoff`` may be ``None``: only those go. Returns
        the count per table (``task``, ``group``, ``chord``; the counted parts
        of expired chords go too, unreported); with ``dry_run`` the counts of
        what would go, deleting nothing.
        """
        counts = dict.fromkeys(self.tables.expiring, 0)
        for key, table, timestamp, old, filtered in self._expired(cutoff, failures):
            if dry_run:
                counts[key] += self._count(sa.select(sa.func.count()).select_from(table).where(old))
                continue
            step = self.dialect.expiry(table, timestamp, old, batch, filtered)
            while True:
                deleted, last = self._delete_batch(step)
                counts[key] += deleted
                if last:
                    break
        counts.pop("chord_part", None)  # bookkeeping of the chord counters, not reported
        return counts

    def _count(self, query: sa.Select[Any]) -> int:
        return self.run(lambda conn, _: int(conn.execute(query).scalar() or 0), 0)

    def _delete_batch(self, step: Expiry) -> tuple[int, bool]:
        return self.run(lambda conn, _: step(conn), (0, True))

    def _expired(
        self, cutoff: datetime | None, failures: datetime | Literal["same", "keep"]
    ) -> list[tuple[str, sa.Table, sa.Column[Any], sa.ColumnElement[bool], bool]]:
        """The deletion passes of a cleanup: table, timestamp, what is old, and whether
        that is filtered by more than age."""
        status = self.tables.task.c.status
        passes: list[tuple[str, sa.Table, sa.Column[Any], sa.ColumnElement[bool], bool]] = []
        for key, (table, timestamp) in self.tables.expiring.items():
            if key == "task" and failures != "same":
                if cutoff is not None:
                    kept = sa.or_(status.is_(None), status != states.FAILURE)
                    passes.append((key, table, timestamp, sa.and_(timestamp < cutoff, kept), True))
                if isinstance(failures, datetime):
                    failed = sa.and_(timestamp < failures, status == states.FAILURE)
                    passes.append((key, table, timestamp, failed, True))
            elif cutoff is not None:
                passes.append((key, table, timestamp, timestamp < cutoff, False))
        return passes

    # ---- the schema as found ----------------------------------------------
    def layout(self, conn: Connection | None = None) -> Layout | None:
        """The reflected layout (kept per process); ``None`` while the tables are missing."""
        statements = self.statements(conn)
        return None if statements is None else statements.layout

    def statements(self, conn: Connection | None = None) -> Statements | None:
        """The statements for the tables as they are; ``None`` while they are missing."""
        known = self._known
        if known is not None:
            return known
        with self._known_lock:
            if self._known is None:
                if conn is None:
                    with self.connect() as own:
                        layout = reflect(own, self.tables, self.dialect)
                else:
                    layout = reflect(conn, self.tables, self.dialect)
                if layout is not None:
                    self._known = self._statements(layout)
            return self._known

    def forget_layout(self) -> None:
        """Reflect again on next use (after DDL, or when a table vanished)."""
        self._known = None
        self._assumed = None

    def missing_tables(self, conn: Connection) -> list[sa.Table]:
        """Tables of ours that do not exist."""
        return missing_tables(conn, self.tables)

    def missing_columns(self, layout: Layout) -> list[tuple[sa.Table, sa.Column[Any]]]:
        """Columns of Celery's layout that the existing tables lack (older Celery versions)."""
        return missing_columns(layout, self.tables)

    # ---- running ------------------------------------------------------
    def connect(self) -> Connection:
        """A pooled connection for a statement off the hot path.

        The calling thread's kept hot-path connection goes back to the pool
        first, so a thread never holds two.
        """
        lease.release(self.engine)
        return self.engine.connect()

    def run(self, fn: Callable[[Connection, Statements], T], default: T, assume: bool = False) -> T:
        """Run ``fn`` on a connection of its own; a missing table means "nothing there"."""
        with self.connect() as conn:
            return self._read(lambda statements: fn(conn, statements), default, conn, assume)

    def _read(
        self,
        fn: Callable[[Statements], T],
        default: T,
        conn: Connection | None = None,
        assume: bool = False,
        again: bool = True,
    ) -> T:
        """Run ``fn`` (which takes its own connection); ``default`` if a table is missing.

        ``assume``: a read that may run with the newest layout while none is
        reflected yet, which spares a new process's first read the catalog
        queries. A column found missing (the newest layout assumed, or a
        column dropped since the layout was reflected) makes it run once more
        on the tables as they are now, rather than fail, or be retried, on
        statements that can never succeed.
        """
        assumed = assume and self._known is None and self._may_assume
        statements = self._newest() if assumed else self.statements(conn)
        if statements is None:
            return default
        try:
            return fn(statements)
        except DBAPIError as exc:
            if again and self.dialect.is_missing_column(exc):
                if assumed:
                    self._may_assume = False
                else:
                    self.forget_layout()
                return self._read(fn, default, conn, again=False)
            if not self.dialect.is_missing_table(exc):
                raise
            self.forget_layout()
            return default

    def _newest(self) -> Statements:
        """The statements for the newest layout, built for the dialect the server resolved."""
        self.engine  # noqa: B018 (resolves the dialect: a Galera node, a transaction pooler)
        assumed = self._assumed
        if assumed is None:
            assumed = self._assumed = self._statements(newest(self.tables))
        return assumed

    def _statements(self, layout: Layout) -> Statements:
        quoting = self.engine.dialect.identifier_preparer
        return Statements(self.tables, self.dialect, layout, self.channel, quoting)

    def _write(self, fn: Callable[[Statements], None]) -> None:
        """Run ``fn``; if the tables are missing, have them created and run it once more."""
        missing = object()
        if self._read(fn, missing) is not missing:
            return
        if self.create_schema is None:
            raise SchemaMissing(
                f"result tables are missing at {self.settings.masked_url}: create them with "
                "`celery -A proj results init`"
            )
        self.create_schema(self)
        if self._read(fn, missing) is missing:
            raise SchemaMissing(
                f"result tables still missing after creating them at {self.settings.masked_url}"
            )

    def _fitting(
        self, statements: Statements, values: Mapping[str, Any]
    ) -> tuple[Statements, dict[str, Any]]:
        """The row to write, and the statements for it, if it fits the task table's columns.

        The layout is kept per process: the columns may have grown since
        (`celery results upgrade`). Look again before refusing, at most every
        ``_RECHECK_AFTER`` seconds (reflection is several catalog queries).
        """
        row = statements.layout.task_row(values)
        try:
            self._check_sizes(statements.layout, row)
        except ResultTooLarge:
            if time.monotonic() - statements.layout.reflected_at < _RECHECK_AFTER:
                raise
            self.forget_layout()
            fresh = self.statements()
            if fresh is None:
                raise
            row = fresh.layout.task_row(values)
            self._check_sizes(fresh.layout, row)
            return fresh, row
        return statements, row

    def _check_sizes(self, layout: Layout, row: Mapping[str, Any]) -> None:
        self.dialect.check_sizes(
            row,
            layout.task_capacity,
            layout.packet_limit,
            self.tables.task.fullname,
            self.settings.masked_url,
        )
