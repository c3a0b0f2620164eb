"""All SQL the backend runs, readable top to bottom.

Each public method is one statement per call (one per batch for
:meth:`Store.get_ready`), executed in autocommit on the process's pooled
engine. Statements are built once per table layout and reused; the task
read and write, the hot path, run through :mod:`celery_sqlresults.fastpath`.

Missing tables never make a read fail: a read of a table that does not
exist answers "nothing stored". A write to a missing table creates the
schema first (that is how lazy mode creates it), then writes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar

import sqlalchemy as sa
from celery import states
from sqlalchemy.engine import Connection, Engine, RowMapping
from sqlalchemy.exc import DBAPIError, NoSuchTableError

from . import fastpath
from .dialects import NOTICE_LIMIT, Dialect, dialect_for
from .engine import get_engine, is_current
from .exceptions import ResultTooLarge, SchemaMissing
from .schema import DATE_COLUMNS, EXTENDED_COLUMNS, Tables, build_tables
from .settings import Settings

__all__ = ["BATCH_SIZE", "Store"]

#: Ids per query in :meth:`Store.get_ready`: well inside every driver's parameter limit.
BATCH_SIZE = 1000
#: Rows per DELETE in :meth:`Store.cleanup`: short transactions, short locks.
CLEANUP_BATCH = 5000

_READY = sorted(states.READY_STATES)
#: Columns a notification's row must have to stand for a read (Celery's own meta).
_NOTICE_NEEDS = frozenset({"status", "result", "traceback", "date_done"})
#: Columns of a write that are not part of Celery's meta, so no notification carries them.
_NOT_CARRIED = frozenset({"id", "task_id", *DATE_COLUMNS})
#: json.dumps() with non-default arguments builds an encoder per call: one, kept.
_compact_json = json.JSONEncoder(separators=(",", ":")).encode
#: Task columns whose values can be large (checked against what the column holds).
_SIZED_COLUMNS = ("result", "traceback", "children", "args", "kwargs", "stamps")
#: Seconds before a refused oversized value makes the layout be reflected again.
_RECHECK_AFTER = 10.0
#: Seconds ``sqlresults_notify_rows = "auto"`` trusts its look at the roles and grants.
ROLES_CHECKED_FOR = 60.0
#: Bytes of a task upsert besides its values (SQL text, other columns), for the packet check.
_STATEMENT_OVERHEAD = 4096
T = TypeVar("T")
_Expiry = Callable[[Connection], tuple[int, bool]]


@dataclass
class _Layout:
    """What the tables in the database actually look like, and the statements for them."""

    task_columns: frozenset[str]
    group_columns: frozenset[str]
    task_seq: bool
    group_seq: bool
    has_chord: bool
    has_chord_part: bool
    #: Bytes each binary/text column of the task table holds, where that is a real limit.
    task_capacity: dict[str, int] = field(default_factory=dict)
    #: Bytes one statement may take (MySQL's ``max_allowed_packet``), if limited.
    packet_limit: int | None = None
    statements: dict[Any, sa.Executable] = field(default_factory=dict)
    reflected_at: float = field(default_factory=time.monotonic)


class Store:
    """The result tables of one configuration, and every statement run against them."""

    def __init__(
        self, settings: Settings, on_new_database: Callable[[Store], None] | None = None
    ) -> None:
        self.settings = settings
        #: Called when this store finds its database replaced (a SQLite file deleted and
        #: recreated): the backend hands in its start-up creation here.
        self.on_new_database = on_new_database
        self.tables: Tables = build_tables(settings.table_names, settings.table_schemas)
        self.dialect: Dialect = dialect_for(settings.url.get_backend_name())
        self.channel = _channel_name(self.tables.task)
        self._layout: _Layout | None = None
        self._layout_lock = threading.Lock()
        self._engine: tuple[int, Engine] | None = None
        self._rows_travel: tuple[float, bool] | None = None  # (when looked, answer)
        self._binary = frozenset(
            c.name for c in self.tables.task.c if isinstance(c.type, sa.LargeBinary)
        )

    @property
    def engine(self) -> Engine:
        """This process's engine; remembered per process (a fork gets a new one).

        An engine whose SQLite file was replaced is given up for one on the file
        there now, and the store treats that as a new database: the layout is
        reflected again and :attr:`on_new_database` runs.
        """
        pid = os.getpid()
        known = self._engine
        if known is not None and known[0] == pid and is_current(known[1]):
            return known[1]
        engine = get_engine(self.settings)
        self._engine = (pid, engine)
        if known is not None and known[0] == pid and known[1] is not engine:
            self.forget_layout()
            if self.on_new_database is not None:
                self.on_new_database(self)
        return engine

    # ---- writes -------------------------------------------------------
    def store_task(self, values: Mapping[str, Any], notify: bool = False) -> None:
        """Insert or update one task row; a stored SUCCESS is never replaced.

        ``date_created`` is kept from the first insert (a publish-time row's, say).
        """

        def write(layout: _Layout) -> bool:
            row = {k: v for k, v in values.items() if k in layout.task_columns}
            try:
                self._check_sizes(layout, row)
            except ResultTooLarge:
                # The layout is cached per process: the columns may have grown since
                # (`celery results upgrade`). Look again before refusing, at most every
                # _RECHECK_AFTER seconds (reflection is several catalog queries).
                if time.monotonic() - layout.reflected_at < _RECHECK_AFTER:
                    raise
                self.forget_layout()
                fresh = self.layout()
                if fresh is None:
                    raise
                layout = fresh
                self._check_sizes(layout, row)
            stmt = self._task_upsert(layout, tuple(row), notify)
            if notify:
                row["notice"] = self._notice(row, carry=self.rows_travel())
            fastpath.execute(self.engine, stmt, row)
            return True

        self._create_if_missing(lambda: self._pooled(write, False))

    def _check_sizes(self, layout: _Layout, row: Mapping[str, Any]) -> None:
        """Refuse a row the database would reject or, worse, cut (MySQL without strict mode).

        Raised before sending: a statement over ``max_allowed_packet`` makes
        MySQL drop the connection, which would look like an outage and be retried.
        """
        if not layout.task_capacity and layout.packet_limit is None:
            return  # PostgreSQL, SQLite: nothing a result could overflow
        values = {k: v for k, v in row.items() if isinstance(v, (bytes, str))}
        # Most rows are far inside every limit: bound their sizes from above (a
        # character is at most 4 bytes of UTF-8, an escaped byte 2 on the wire)
        # and skip the exact count, a third of a MariaDB store's own CPU.
        bounds = {k: len(v) * 4 if isinstance(v, str) else len(v) for k, v in values.items()}
        capacity = layout.task_capacity
        if all(n <= capacity.get(k, n) for k, n in bounds.items()) and (
            layout.packet_limit is None
            or 2 * sum(bounds.values()) + _STATEMENT_OVERHEAD <= layout.packet_limit
        ):
            return
        stored = {k: len(v.encode() if isinstance(v, str) else v) for k, v in values.items()}
        too_big = {
            k: (n, layout.task_capacity[k])
            for k, n in stored.items()
            if k in layout.task_capacity and n > layout.task_capacity[k]
        }
        # The packet carries the values escaped (PyMySQL sends them inline).
        sizes = {k: self.dialect.wire_size(v) for k, v in values.items()}
        t = self.tables.task.fullname
        problems = [
            f"{k} is {n} bytes, column {t}.{k} holds {cap}" for k, (n, cap) in too_big.items()
        ]
        total = sum(sizes.values()) + _STATEMENT_OVERHEAD
        if layout.packet_limit is not None and total > layout.packet_limit:
            biggest = max(sizes, key=lambda k: sizes[k])
            too_big.setdefault(biggest, (sizes[biggest], layout.packet_limit))
            problems.append(
                f"the row is ~{total} bytes, the server's max_allowed_packet is "
                f"{layout.packet_limit}"
            )
        if problems:
            raise ResultTooLarge(
                f"task {row.get('task_id')}: cannot store state {row.get('status')} at "
                f"{self.settings.masked_url}: {'; '.join(problems)}. Return a smaller value "
                "(e.g. store it elsewhere and return its key), or let the database hold it: "
                "MySQL/MariaDB BLOB columns (tables made by Celery's db+) hold 64 KB, run "
                "`celery -A proj results upgrade` to make them LONGBLOB; raise "
                "max_allowed_packet on the server.",
                tuple(too_big),
            )

    def save_group(self, group_id: str, result: bytes, date_done: datetime) -> None:
        def run(conn: Connection, layout: _Layout) -> None:
            key = ("group_upsert",)
            stmt = layout.statements.get(key)
            if stmt is None:
                stmt = layout.statements[key] = self.dialect.replace(
                    self.tables.group,
                    "taskset_id",
                    ("taskset_id", "result", "date_done"),
                    layout.group_seq,
                )
            conn.execute(stmt, {"taskset_id": group_id, "result": result, "date_done": date_done})

        self._write(run)

    def forget(self, task_id: str) -> None:
        t = self.tables.task
        self.run(lambda c, _: c.execute(sa.delete(t).where(t.c.task_id == task_id)), None)

    def delete_group(self, group_id: str) -> None:
        g = self.tables.group
        self.run(lambda c, _: c.execute(sa.delete(g).where(g.c.taskset_id == group_id)), None)

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
        counts = dict.fromkeys(self.tables.expiring, 0)
        for key, table, timestamp, old, filtered in passes:
            if dry_run:
                count = sa.select(sa.func.count()).select_from(table).where(old)

                def counted(conn: Connection, _: _Layout, q: sa.Select[Any] = count) -> int:
                    return int(conn.execute(q).scalar() or 0)

                counts[key] += self.run(counted, 0)
                continue
            expire = self.dialect.expiry(table, timestamp, old, batch, filtered)

            def run(conn: Connection, _: _Layout, step: _Expiry = expire) -> tuple[int, bool]:
                return step(conn)

            while True:
                deleted, last = self.run(run, (0, True))
                counts[key] += deleted
                if last:
                    break
        counts.pop("chord_part", None)  # bookkeeping of the chord counters, not reported
        return counts

    # ---- chords -------------------------------------------------------
    def chord_start(self, group_id: str, now: datetime) -> None:
        """(Re)start the counter of a chord: a re-applied frozen chord is a new run."""

        def run(conn: Connection, layout: _Layout) -> None:
            if not layout.has_chord:
                raise SchemaMissing(f"chord table {self.tables.chord.fullname} is missing")
            values = {"group_id": group_id, "chord_size": None, "done": 0, "date_created": now}
            key = ("chord_start",)
            stmt = layout.statements.get(key)
            if stmt is None:
                stmt = layout.statements[key] = self.dialect.replace(
                    self.tables.chord, "group_id", tuple(values), id_seq=False
                )
            if layout.has_chord_part:  # a re-applied chord reuses its header's task ids
                p = self.tables.chord_part
                conn.execute(sa.delete(p).where(p.c.group_id == group_id))
            conn.execute(stmt, values)

        self._write(run)

    def chord_set_size(self, group_id: str, size: int) -> None:
        c = self.tables.chord
        stmt = sa.update(c).where(c.c.group_id == group_id).values(chord_size=size)
        self.run(lambda conn, _: conn.execute(stmt), None)

    def chord_part_done(
        self, group_id: str, task_id: str, now: datetime
    ) -> tuple[int, int | None] | None:
        """Count one finished header task once; ``(done, size)``, or ``None`` when this
        task was counted already or the chord has no counter."""
        part = {"group_id": group_id, "task_id": task_id, "date_created": now}

        def count(layout: _Layout) -> tuple[int, int | None] | None:
            counter = self._part_counter(layout)
            if counter is not None:  # one statement, on the hot path's cursor: once per task
                row = fastpath.fetch_one(self.engine, counter, part)
                return None if row is None else (int(row["done"]), row["chord_size"])
            parts = self.tables.chord_part if layout.has_chord_part else None
            with self.connect() as conn:
                return self.dialect.count_part(conn, self.tables.chord, parts, part)

        return self._pooled(count, None)

    def _part_counter(self, layout: _Layout) -> sa.Executable | None:
        """The dialect's one-statement chord count for these tables, built once per layout."""
        if not layout.has_chord_part:
            return None
        key = ("chord_count",)
        counter = layout.statements.get(key)
        if counter is None:
            counter = self.dialect.part_counter(self.tables.chord, self.tables.chord_part)
            if counter is None:
                return None
            layout.statements[key] = counter
        return counter

    def chord_delete(self, group_id: str) -> None:
        """Drop a finished chord's counter and its counted parts."""

        def run(conn: Connection, layout: _Layout) -> None:
            c, p = self.tables.chord, self.tables.chord_part
            conn.execute(sa.delete(c).where(c.c.group_id == group_id))
            if layout.has_chord_part:
                conn.execute(sa.delete(p).where(p.c.group_id == group_id))

        self.run(run, None)

    # ---- reads --------------------------------------------------------
    def get_task(self, task_id: str, extended: bool = True) -> Mapping[str, Any] | None:
        """One task's row; ``extended=False`` skips the ``result_extended`` columns."""

        def read(layout: _Layout) -> Mapping[str, Any] | None:
            stmt = self._task_select(layout, "one", extended)
            row = fastpath.fetch_one(self.engine, stmt, {"task_id": task_id})
            if row is not None:
                row["task_id"] = task_id  # not selected: known, and each column costs
            return row

        return self._pooled(read, None)

    def get_ready(self, task_ids: Sequence[str], extended: bool = True) -> list[RowMapping]:
        """Rows of the given tasks that are in a ready state, one query per batch of ids."""

        def run(conn: Connection, layout: _Layout) -> list[RowMapping]:
            stmt = self._task_select(layout, "ready", extended)
            out: list[RowMapping] = []
            for start in range(0, len(task_ids), BATCH_SIZE):
                chunk = list(task_ids[start : start + BATCH_SIZE])
                out.extend(r._mapping for r in conn.execute(stmt, {"ids": chunk}))
            return out

        return self.run(run, []) if task_ids else []

    def row_from_notice(
        self, task_id: str, body: str, extended: bool = True
    ) -> dict[str, Any] | None:
        """The row :meth:`get_ready` would return, from a notification's JSON ``body``.

        ``None`` if the body is not one (a writer of another version), or lacks
        columns this reader reads (a writer without ``result_extended``): read
        the table.
        """
        needs = _NOTICE_NEEDS
        if extended:
            layout = self._layout
            needs = needs.union(
                c for c in EXTENDED_COLUMNS if layout is None or c in layout.task_columns
            )
        try:
            fields = json.loads(body)
            if not isinstance(fields, dict) or not needs <= fields.keys():
                return None
            if not isinstance(fields["status"], str):
                return None
            row: dict[str, Any] = {"task_id": task_id}
            for column in self.tables.task.c:
                name = column.name
                if name not in fields or (not extended and name in EXTENDED_COLUMNS):
                    continue
                value = fields[name]
                if value is not None and isinstance(column.type, sa.LargeBinary):
                    value = base64.b64decode(value)
                elif value is not None and isinstance(column.type, sa.DateTime):
                    value = datetime.fromisoformat(value)
                row[name] = value
        except (ValueError, TypeError):  # not what our writers send: read the table instead
            return None
        return row

    def _notice(self, row: Mapping[str, Any], carry: bool) -> str:
        """A notification's payload: ``<length of task_id>:<task_id>``, then, if ``carry``,
        the written columns as a JSON object (binary values in base64, dates as ISO text).

        Only what this write stores travels (a column it leaves alone may hold an
        older value), which :meth:`row_from_notice` checks against what its
        reader needs. The values are taken as stored: true of the columns Celery
        and we create (a ``timestamptz`` or a rounding ``timestamp(p)`` column
        made by hand would not be). A row too large for a notification sends
        the id alone, and its waiter reads the table.
        """
        task_id = row["task_id"]
        head = f"{len(task_id)}:{task_id}"
        if not carry or fastpath.weight(row) >= NOTICE_LIMIT:  # cannot fit: skip the encoding
            return head
        fields: dict[str, Any] = {}
        for name, value in row.items():
            if name in _NOT_CARRIED:
                continue
            if name in self._binary and value is not None:
                if type(value) is not bytes:  # what the reader could not decode as sent
                    return head
                value = base64.b64encode(value).decode("ascii")
            elif isinstance(value, datetime):
                if value.tzinfo is not None:  # our writers store naive UTC; anything else is read
                    return head
                value = value.isoformat(timespec="microseconds")  # what Python 3.10 parses
            fields[name] = value
        try:
            notice = head + _compact_json(fields)
        except (TypeError, ValueError):  # a value JSON cannot hold: the waiter reads the row
            return head
        return notice if len(notice.encode()) < NOTICE_LIMIT else head

    def rows_travel(self) -> bool:
        """Whether notifications carry rows, and rows they carry are believed.

        ``sqlresults_notify_rows``: ``True``/``False`` as set; ``"auto"`` asks the
        database whether every role that may connect may also read and write the
        task table (:meth:`Dialect.only_writers_connect`), and asks again after
        :data:`ROLES_CHECKED_FOR` seconds, so a role created since is noticed.
        """
        mode = self.settings.notify_rows
        if mode != "auto":
            return bool(mode)
        known = self._rows_travel
        now = time.monotonic()
        if known is not None and now - known[0] < ROLES_CHECKED_FOR:
            return known[1]
        try:
            answer = bool(
                self.run(lambda c, _: self.dialect.only_writers_connect(c, self.tables.task), False)
            )
        except DBAPIError:  # the catalogs could not be read: keep rows out of notifications
            answer = False
        self._rows_travel = (now, answer)
        return answer

    def task_exists(self, task_id: str) -> bool:
        t = self.tables.task
        stmt = sa.select(sa.literal(1)).where(t.c.task_id == task_id)
        return bool(self.run(lambda c, _: c.execute(stmt).first() is not None, False))

    def get_group(self, group_id: str) -> RowMapping | None:
        g = self.tables.group
        stmt = sa.select(g.c.taskset_id, g.c.result, g.c.date_done).where(
            g.c.taskset_id == group_id
        )

        def run(conn: Connection, _: _Layout) -> RowMapping | None:
            row = conn.execute(stmt).first()
            return None if row is None else row._mapping

        return self.run(run, None)

    # ---- schema -------------------------------------------------------
    def layout(self, conn: Connection | None = None) -> _Layout | None:
        """The reflected layout (cached per process); ``None`` while the tables are missing."""
        if self._layout is not None:
            return self._layout
        with self._layout_lock:
            if self._layout is None:
                if conn is None:
                    with self.connect() as own:
                        self._layout = self._reflect(own)
                else:
                    self._layout = self._reflect(conn)
        return self._layout

    def forget_layout(self) -> None:
        """Reflect again on next use (after DDL, or when a table vanished)."""
        self._layout = None

    def missing_tables(self, conn: Connection) -> list[sa.Table]:
        """Tables of ours that do not exist (one catalog query per schema)."""
        insp = sa.inspect(conn)
        existing: dict[str | None, set[str]] = {}
        missing = []
        for table in self.tables.all:
            if table.schema not in existing:
                existing[table.schema] = set(insp.get_table_names(schema=table.schema))
            if table.name not in existing[table.schema]:
                missing.append(table)
        return missing

    def missing_columns(self, layout: _Layout) -> list[tuple[sa.Table, sa.Column[Any]]]:
        """Columns of Celery's layout that the existing tables lack (older Celery versions)."""
        out: list[tuple[sa.Table, sa.Column[Any]]] = []
        for table, present in (
            (self.tables.task, layout.task_columns),
            (self.tables.group, layout.group_columns),
        ):
            out.extend((table, c) for c in table.columns if c.name not in present)
        return out

    def _reflect(self, conn: Connection) -> _Layout | None:
        insp = sa.inspect(conn)
        try:
            task = {
                c["name"]: c
                for c in insp.get_columns(self.tables.task.name, self.tables.task.schema)
            }
            group = {
                c["name"]: c
                for c in insp.get_columns(self.tables.group.name, self.tables.group.schema)
            }
        except NoSuchTableError:
            return None
        chord, part = self.tables.chord, self.tables.chord_part
        capacity = {
            name: cap
            for name, col in task.items()
            if name in _SIZED_COLUMNS
            and (cap := self.dialect.column_capacity(col["type"])) is not None
        }
        return _Layout(
            task_capacity=capacity,
            packet_limit=self.dialect.packet_limit(conn),
            task_columns=frozenset(task) & frozenset(self.tables.task.c.keys()),
            group_columns=frozenset(group) & frozenset(self.tables.group.c.keys()),
            task_seq=self.dialect.id_from_sequence(dict(task["id"])),
            group_seq=self.dialect.id_from_sequence(dict(group["id"])),
            has_chord=insp.has_table(chord.name, chord.schema),
            has_chord_part=insp.has_table(part.name, part.schema),
        )

    # ---- statements ---------------------------------------------------
    def _task_upsert(
        self, layout: _Layout, columns: tuple[str, ...], notify: bool
    ) -> sa.Executable:
        """``notify``: the statement also notifies waiters (its ``notice`` parameter)."""
        key = ("task_upsert", columns, notify)
        stmt = layout.statements.get(key)
        if stmt is None:
            t = self.tables.task
            stmt = self.dialect.upsert(t, columns, layout.task_seq, insert_only=("date_created",))
            if notify:
                stmt = self.dialect.notifying(stmt, t, self.channel)
            layout.statements[key] = stmt
        return stmt

    def _meta_columns(self, layout: _Layout, extended: bool) -> list[sa.Column[Any]]:
        """The task columns Celery's meta is made of (those the table has)."""
        # The monitoring timestamps are not part of Celery's meta: left to ResultQuery.
        skip = {"id", *DATE_COLUMNS, *(() if extended else EXTENDED_COLUMNS)}
        kept = layout.task_columns - skip
        return [c for c in self.tables.task.c if c.name in kept]

    def _task_select(self, layout: _Layout, kind: str, extended: bool) -> sa.Executable:
        key = ("task_select", kind, extended)
        stmt = layout.statements.get(key)
        if stmt is None:
            t = self.tables.task
            cols = self._meta_columns(layout, extended)
            if kind == "one":
                # PyMySQL parses each column's metadata per query (~7 µs): the id is known.
                cols = [c for c in cols if c.name != "task_id"]
                stmt = sa.select(*cols).where(t.c.task_id == sa.bindparam("task_id"))
            else:
                stmt = sa.select(*cols).where(
                    t.c.task_id.in_(sa.bindparam("ids", expanding=True)),
                    t.c.status.in_(_READY),
                )
            layout.statements[key] = stmt
        return stmt

    # ---- running ------------------------------------------------------
    def run(self, fn: Callable[[Connection, _Layout], T], default: T) -> T:
        """Run ``fn``; a missing table means "nothing there", not an error."""
        with self.connect() as conn:
            return self._pooled(lambda layout: fn(conn, layout), default, conn)

    def connect(self) -> Connection:
        """A pooled connection for a statement off the hot path.

        The calling thread's kept hot-path connection goes back to the pool
        first (:func:`fastpath.release`), so a thread never holds two.
        """
        fastpath.release(self.engine)
        return self.engine.connect()

    def _pooled(self, fn: Callable[[_Layout], T], default: T, conn: Connection | None = None) -> T:
        """:meth:`run` for ``fn`` that takes its own pooled connection (the fast path)."""
        layout = self.layout(conn)
        if layout is None:
            return default
        try:
            return fn(layout)
        except DBAPIError as exc:
            if not self.dialect.is_missing_table(exc):
                raise
            self.forget_layout()
            return default

    def _write(self, fn: Callable[[Connection, _Layout], None]) -> None:
        """Run ``fn``; if the tables are missing, create them first (lazy mode's creation)."""

        def attempt(conn: Connection, layout: _Layout) -> bool:
            fn(conn, layout)
            return True

        self._create_if_missing(lambda: self.run(attempt, False))

    def _create_if_missing(self, attempt: Callable[[], bool]) -> None:
        """Run ``attempt``; if it found the tables missing (``False``), create them and retry."""
        if attempt():
            return
        from .startup import create_schema  # startup builds on this module

        create_schema(self)
        if not attempt():
            raise SchemaMissing(
                f"result tables still missing after creating them at {self.settings.masked_url}"
            )

    # ---- record on publish ------------------------------------------------
    def insert_task_if_absent(self, values: Mapping[str, Any]) -> None:
        """Insert a task row unless its ``task_id`` has one: a stored state is never replaced."""

        def run(conn: Connection, layout: _Layout) -> None:
            row = {k: v for k, v in values.items() if k in layout.task_columns}
            key = ("task_insert_if_absent", tuple(row))
            stmt = layout.statements.get(key)
            if stmt is None:
                stmt = layout.statements[key] = self.dialect.insert_if_absent(
                    self.tables.task, "task_id", tuple(row), layout.task_seq
                )
            conn.execute(stmt, row)

        self._write(run)


def _channel_name(table: sa.Table) -> str:
    """NOTIFY channel for a task table: stable, short, one per table."""
    digest = hashlib.sha1(table.fullname.encode()).hexdigest()[:12]
    return f"sqlresults_{digest}"
