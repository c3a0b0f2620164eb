"""Read and prune stored results: the API behind ``celery results list/show/stats/cleanup``.

:class:`ResultQuery` runs SQLAlchemy Core on the backend's own tables and
engine, so a script, a monitoring page and the command line see exactly what
the backend stores, decoded with the backend's serializer and
``accept_content``. Every filter value is a bound parameter. As everywhere in
this package, missing tables read as "nothing stored", never as an error.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, TypeVar, cast, overload

import sqlalchemy as sa
from celery import Celery, states
from celery.result import GroupResult, result_from_tuple
from sqlalchemy.engine import Connection

from .backend import SQLResultsBackend
from .exceptions import one_line
from .layout import Layout
from .statements import Statements
from .store import BATCH_SIZE, Store

__all__ = [
    "Durations",
    "ResultQuery",
    "TaskRecord",
    "Truncated",
    "Undecodable",
    "decode_cursor",
    "encode_cursor",
    "parse_when",
]

T = TypeVar("T")
When = str | datetime | timedelta

#: Largest id a cursor may name: a signed 64-bit integer (SQLite's rowid; BIGINT elsewhere).
_MAX_ID = 2**63 - 1
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_COLUMNS = (
    "task_id",
    "status",
    "name",
    "worker",
    "queue",
    "retries",
    "date_created",
    "date_started",
    "date_done",
    "args",
    "kwargs",
    "result",
    "traceback",
)

#: The columns that can be large: what ``values_up_to`` bounds.
_VALUES = ("args", "kwargs", "result", "traceback")
#: Suffix of the label of a value's stored size in a bounded read.
_SIZE = "__size"


def parse_when(value: When, now: datetime | None = None) -> datetime:
    """The moment ``value`` names, as an aware UTC datetime.

    One parser for every "since", "until" and "older than", so the API and the
    command line agree: ``"90s"``, ``"30m"``, ``"1h"``, ``"7d"``, ``"2w"`` or a
    ``timedelta`` mean that long before ``now``; ISO-8601 text
    (``"2024-05-01"``, ``"2024-05-01T12:00:00+02:00"``, ``…Z``) or a datetime
    is taken as is, naive meaning UTC because that is what the tables store.
    Anything else raises a :class:`ValueError` naming the value.
    """
    now = datetime.now(timezone.utc) if now is None else _utc(now)
    if isinstance(value, timedelta):
        return now - value
    if isinstance(value, datetime):
        return _utc(value)
    text = value.strip()
    relative = _RELATIVE.fullmatch(text)
    try:
        if relative:
            return now - timedelta(seconds=float(relative[1]) * _SECONDS[relative[2].lower()])
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        return _utc(datetime.fromisoformat(text))
    except (ValueError, OverflowError):
        raise ValueError(
            f"invalid time {value!r}: use a relative time like 30m, 1h, 7d or 2w, "
            "or an ISO-8601 time like 2024-05-01T12:00:00Z"
        ) from None


@dataclass(frozen=True)
class TaskRecord:
    """One stored task result, decoded as ``AsyncResult`` would see it.

    ``name``, ``worker``, ``queue``, ``retries``, ``args`` and ``kwargs`` are
    stored only with ``result_extended = True`` (else ``None``). Dates are
    aware UTC: ``date_created`` when the row was first written (publish time
    with ``sqlresults_record_on_publish``), ``date_started`` the last STARTED
    (``task_track_started``), ``date_done`` ``None`` while the task has not
    finished; each ``None`` where the table lacks the column (``db+`` tables
    before revision 0003) or nothing wrote it. The ``result`` of a
    failed task is the exception. A value the app may not decode is an
    :class:`Undecodable`.
    """

    task_id: str
    status: str
    name: str | None
    worker: str | None
    queue: str | None
    retries: int | None
    date_created: datetime | None
    date_started: datetime | None
    date_done: datetime | None
    args: Any
    kwargs: Any
    result: Any
    traceback: str | None


@dataclass(frozen=True)
class Durations:
    """A histogram of durations in seconds, as :meth:`ResultQuery.durations` counts them.

    ``buckets``: ``(upper bound, how many took at most that long)`` pairs,
    cumulative as Prometheus' ``le`` buckets; ``count`` and ``sum`` over all.
    """

    buckets: tuple[tuple[float, int], ...]
    count: int
    sum: float


@dataclass(frozen=True, repr=False)
class Undecodable:
    """Stands in for a stored value this app may not (or cannot) decode.

    A row written with a serializer outside ``accept_content`` (pickle read by
    a JSON-only app, say) is reported, never decoded, and does not make the
    rest of a listing fail.
    """

    reason: str

    def __repr__(self) -> str:
        return f"<undecodable: {self.reason}>"


@dataclass(frozen=True, repr=False)
class Truncated:
    """Stands in for a stored value larger than the read asked for (``values_up_to``).

    ``size`` is what is stored: bytes for ``args``, ``kwargs`` and ``result``
    (the serializer's output), characters for ``traceback``. ``head`` is its
    first ``values_up_to`` of them, undecoded (a serialized prefix cannot be
    decoded); :meth:`ResultQuery.read_value` reads the rest piece by piece.
    """

    size: int
    head: bytes | str

    def __repr__(self) -> str:
        return f"<truncated: {self.size} stored>"


class ResultQuery:
    """An immutable, chainable query over the stored task results.

    ``ResultQuery(app).filter(state="FAILURE", since="1h").limit(20).all()``:
    :meth:`filter` and :meth:`limit` return new queries; nothing runs until
    :meth:`all`, :meth:`count`, :meth:`stats` or :meth:`get`. Rows come newest
    first (``date_done`` descending, then ``id``) so the ``date_done`` index
    serves the order; unfinished rows (no ``date_done``) come first on
    PostgreSQL and last on MySQL/SQLite, each database's own order for that
    index. Given an app, the query uses ``app.backend``.
    """

    def __init__(self, app_or_backend: Celery | SQLResultsBackend) -> None:
        backend = app_or_backend.backend if isinstance(app_or_backend, Celery) else app_or_backend
        if not isinstance(backend, SQLResultsBackend):
            raise TypeError(
                "ResultQuery needs the celery-sqlresults backend (result_backend = 'sql+…'), "
                f"got {type(backend).__name__}"
            )
        self.backend = backend
        self._where: tuple[tuple[str, Any], ...] = ()
        self._limit: int | None = None
        reading = backend.settings.for_reading()
        self._reader = backend.store if reading is backend.settings else Store(reading)

    @property
    def store(self) -> Store:
        """Where writes go (``forget``, ``cleanup``): the backend's own database."""
        return self.backend.store

    @property
    def reader(self) -> Store:
        """Where reads go: ``sqlresults_read_url`` (a replica) if set, else :attr:`store`."""
        return self._reader

    # ---- building -----------------------------------------------------
    def filter(
        self,
        *,
        state: str | Iterable[str] | None = None,
        name: str | None = None,
        worker: str | None = None,
        since: When | None = None,
        until: When | None = None,
    ) -> ResultQuery:
        """A query that also requires every given condition (calls add up, too).

        ``state`` is one state or several. ``name`` and ``worker`` match
        exactly, or as a glob where ``*`` is any text. ``since`` (inclusive)
        and ``until`` (exclusive) bound ``date_done`` and take whatever
        :func:`parse_when` does, relative times counting from this call;
        unfinished tasks have no ``date_done`` and never match them.
        """
        where = list(self._where)
        if state is not None:
            where.append(("state", (state,) if isinstance(state, str) else tuple(state)))
        where += [(k, v) for k, v in (("name", name), ("worker", worker)) if v is not None]
        where += [
            (k, parse_when(v)) for k, v in (("since", since), ("until", until)) if v is not None
        ]
        new = copy.copy(self)
        new._where = tuple(where)
        return new

    def limit(self, n: int | None) -> ResultQuery:
        """A query returning at most ``n`` rows (``None``: no limit)."""
        if n is not None and n < 0:
            raise ValueError(f"limit must be >= 0 or None, got {n!r}")
        new = copy.copy(self)
        new._limit = n
        return new

    def after(self, cursor: str | None) -> ResultQuery:
        """A query for the rows that come after ``cursor`` in the listing order.

        Keyset pagination: ``cursor`` is the ``next_cursor`` of a previous
        :meth:`page` (it encodes ``date_done`` and ``id`` of that page's last
        row), so a page costs one index range scan, however deep, and rows
        stored meanwhile never shift later pages. ``None`` means from the
        start. A malformed cursor raises :class:`ValueError`.
        """
        if cursor is None:
            return self
        new = copy.copy(self)
        new._where = (*self._where, ("after", decode_cursor(cursor)))
        return new

    # ---- reading ------------------------------------------------------
    def all(self, values_up_to: int | None = None) -> list[TaskRecord]:
        """The matching results, newest first, decoded.

        With ``values_up_to``, a value stored larger than that is not read
        whole: it comes back as a :class:`Truncated` holding its first part
        (see :meth:`page`).
        """
        t = self.reader.tables.task

        def run(conn: Connection, statements: Statements) -> list[Mapping[str, Any]]:
            layout = statements.layout
            cols = self._columns(layout, values_up_to)
            stmt = sa.select(*cols).where(*self._clauses(layout))
            stmt = stmt.order_by(t.c.date_done.desc(), t.c.id.desc()).limit(self._limit)
            return self._fetch(conn, stmt, values_up_to)

        rows: list[Mapping[str, Any]] = self.reader.run(run, [])
        return [self._record(row, values_up_to) for row in rows]

    def get(self, task_id: str, values_up_to: int | None = None) -> TaskRecord | None:
        """The stored result of ``task_id`` (if it also matches the filters), else ``None``.

        ``values_up_to`` bounds what is read of each value, as for :meth:`page`.
        """
        t = self.reader.tables.task

        def run(conn: Connection, statements: Statements) -> Mapping[str, Any] | None:
            layout = statements.layout
            cols = self._columns(layout, values_up_to)
            stmt = sa.select(*cols).where(t.c.task_id == task_id, *self._clauses(layout))
            return next(iter(self._fetch(conn, stmt, values_up_to)), None)

        row = self.reader.run(run, None)
        return None if row is None else self._record(row, values_up_to)

    def read_value(
        self, task_id: str, column: str, start: int, size: int
    ) -> tuple[bytes | str, int] | None:
        """Part of one stored value, and the whole value's size; ``None`` if nothing is stored.

        ``column`` is ``args``, ``kwargs``, ``result`` (bytes, as the serializer
        wrote them) or ``traceback`` (text); ``start`` and ``size`` count bytes,
        or characters for ``traceback``, from 0. Reading a large value piece by
        piece this way never holds more than one piece. Filters do not apply.
        """
        if column not in _VALUES:
            raise ValueError(f"column must be one of {', '.join(_VALUES)}, got {column!r}")
        if start < 0 or size < 1:
            raise ValueError(f"start must be >= 0 and size >= 1, got {start!r} and {size!r}")
        t = self.reader.tables.task
        col = t.c[column]
        by_blob = self._by_blob(col)
        part = t.c.id if by_blob else sa.func.substr(col, start + 1, size, type_=col.type)
        stmt = sa.select(part, _length(col)).where(t.c.task_id == task_id)

        def run(conn: Connection, statements: Statements) -> tuple[bytes | str, int] | None:
            if column not in statements.layout.task_columns:
                return None
            row = conn.execute(stmt).first()
            if row is None or row[1] is None:
                return None
            piece = (
                self.reader.dialect.read_blob(conn, col, row[0], start, size) if by_blob else row[0]
            )
            return piece, int(row[1])

        return self.reader.run(run, None)

    def count(self) -> int:
        """How many results match (at most the limit, if one is set)."""
        t = self.reader.tables.task

        def run(conn: Connection, statements: Statements) -> int:

            layout = statements.layout
            stmt = sa.select(sa.func.count()).select_from(t).where(*self._clauses(layout))
            return int(conn.execute(stmt).scalar_one())

        n = self.reader.run(run, 0)
        return n if self._limit is None else min(n, self._limit)

    @overload
    def stats(self, by_name: Literal[False] = False) -> dict[str, int]: ...
    @overload
    def stats(self, by_name: Literal[True]) -> dict[str | None, dict[str, int]]: ...
    def stats(self, by_name: bool = False) -> dict[str, int] | dict[str | None, dict[str, int]]:
        """Matching results per state, or per task name then state; the limit does not apply.

        ``{"SUCCESS": 10, "FAILURE": 2}``, or with ``by_name``
        ``{"proj.add": {"SUCCESS": 10}, None: {...}}`` (``None``: no name stored).
        """
        t = self.reader.tables.task

        def run(conn: Connection, statements: Statements) -> list[tuple[str | None, str, int]]:

            layout = statements.layout
            named = by_name and "name" in layout.task_columns
            keys = [t.c.name, t.c.status] if named else [t.c.status]
            stmt = (
                sa.select(*keys, sa.func.count())
                .where(*self._clauses(layout))
                .group_by(*keys)
                .order_by(*keys)
            )
            rows = conn.execute(stmt).all()
            return [(r[0], r[1], r[2]) if named else (None, r[0], r[1]) for r in rows]

        rows: list[tuple[str | None, str, int]] = self.reader.run(run, [])
        if not by_name:
            return {status: n for _, status, n in rows}
        out: dict[str | None, dict[str, int]] = {}
        for name, status, n in rows:
            out.setdefault(name, {})[status] = n
        return out

    def durations(
        self, buckets: Iterable[float], newest: int
    ) -> dict[str, dict[str | None, Durations]]:
        """Queue wait and run time of the matching finished tasks, as histograms per task name.

        ``{"queue_wait": {name: Durations}, "run_time": {...}}``: queue wait is
        ``date_created`` to ``date_started`` (the publish time with
        ``sqlresults_record_on_publish``, the start needs ``task_track_started``),
        run time ``date_started`` to ``date_done``. Only the ``newest`` rows by
        ``date_done`` are read, down the ``date_done`` index, and the buckets
        (upper bounds in seconds) are counted in SQL: the cost is bounded
        however large the table. Give a ``since`` filter for a recent window.
        Empty where the table has no ``date_started`` (``db+`` before revision 0003).
        """
        bounds = sorted(float(b) for b in buckets)
        if not all(math.isfinite(b) for b in bounds):  # written into the SQL as literals
            raise ValueError(f"bucket bounds must be finite numbers, got {bounds!r}")
        t = self.store.tables.task
        seconds = self.store.dialect.seconds_between
        out: dict[str, dict[str | None, Durations]] = {"queue_wait": {}, "run_time": {}}

        def run(conn: Connection, statements: Statements) -> list[Any]:
            layout = statements.layout
            if not {"date_created", "date_started"} <= set(layout.task_columns):
                return []
            name = t.c.name if "name" in layout.task_columns else sa.null()
            recent = (
                sa.select(
                    name.label("name"),
                    seconds(t.c.date_created, t.c.date_started).label("queue_wait"),
                    seconds(t.c.date_started, t.c.date_done).label("run_time"),
                )
                .where(t.c.date_done.is_not(None), *self._clauses(layout))
                .order_by(t.c.date_done.desc())
                .limit(newest)
                .subquery()
            )
            r = recent.c
            cols: list[sa.ColumnElement[Any]] = [r.name]
            for took in (r.queue_wait, r.run_time):
                cols += [
                    sa.func.sum(sa.case((took <= sa.literal_column(repr(b)), 1), else_=0))
                    for b in bounds
                ]
                cols += [sa.func.count(took), sa.func.sum(took)]
            return list(conn.execute(sa.select(*cols).group_by(r.name)).all())

        width = len(bounds) + 2
        rows: list[Any] = self.store.run(run, [])
        for row in rows:
            for i, key in enumerate(out):
                part = row[1 + i * width : 1 + (i + 1) * width]
                count = int(part[-2] or 0)
                if count:
                    counts = tuple(int(n or 0) for n in part[:-2])
                    pairs = tuple(zip(bounds, counts, strict=True))
                    out[key][row[0]] = Durations(pairs, count, float(part[-1]))
        return out

    def page(
        self, size: int, values_up_to: int | None = None
    ) -> tuple[list[TaskRecord], str | None]:
        """Up to ``size`` matching results (newest first) and the cursor of the next page.

        The cursor is ``None`` on the last page; pass it to :meth:`after` for
        the next one. The query's own :meth:`limit` does not apply here.

        With ``values_up_to``, each of ``args``, ``kwargs``, ``result`` and
        ``traceback`` stored larger than that many bytes (characters for the
        traceback) is read only that far, in SQL (``substr``, with ``length``
        for its size), and comes back as a :class:`Truncated`: one large
        result then costs a listing no more than a small one.
        """
        if size < 1:
            raise ValueError(f"page size must be >= 1, got {size!r}")
        t = self.reader.tables.task

        def run(conn: Connection, statements: Statements) -> list[Mapping[str, Any]]:
            layout = statements.layout
            cols = self._columns(layout, values_up_to, ("id",))
            stmt = sa.select(*cols).where(*self._clauses(layout))
            stmt = stmt.order_by(t.c.date_done.desc(), t.c.id.desc()).limit(size + 1)
            return self._fetch(conn, stmt, values_up_to)

        rows: list[Mapping[str, Any]] = self.reader.run(run, [])
        more = len(rows) > size
        rows = rows[:size]
        cursor = encode_cursor(rows[-1]["date_done"], rows[-1]["id"]) if more else None
        return [self._record(row, values_up_to) for row in rows], cursor

    def get_many(
        self, task_ids: Iterable[str], values_up_to: int | None = None
    ) -> dict[str, TaskRecord]:
        """The stored results of ``task_ids`` (those that also match the filters), by id.

        One query per batch of ids; ids with nothing stored are left out.
        ``values_up_to`` bounds what is read of each value, as for :meth:`page`.
        """
        ids = list(dict.fromkeys(task_ids))
        t = self.reader.tables.task

        def run(conn: Connection, statements: Statements) -> list[Mapping[str, Any]]:
            layout = statements.layout
            cols = self._columns(layout, values_up_to)
            out: list[Mapping[str, Any]] = []
            for start in range(0, len(ids), BATCH_SIZE):
                chunk = ids[start : start + BATCH_SIZE]
                stmt = sa.select(*cols).where(t.c.task_id.in_(chunk), *self._clauses(layout))
                out.extend(self._fetch(conn, stmt, values_up_to))
            return out

        rows: list[Mapping[str, Any]] = self.reader.run(run, []) if ids else []
        return {row["task_id"]: self._record(row, values_up_to) for row in rows}

    def group(self, group_id: str) -> GroupResult | Undecodable | None:
        """The stored group ``group_id`` (its members' results), ``None`` if none is stored.

        One read, never retried, as every read here: ``backend.restore_group``
        goes through the backend's retry loop, which keeps a caller waiting for
        ``sqlresults_retry_timeout`` while the database is down. Filters do not apply.
        """
        g = self.reader.tables.group
        stmt = sa.select(g.c.result).where(g.c.taskset_id == group_id)

        def run(conn: Connection, _: Statements) -> tuple[bytes | None] | None:
            row = conn.execute(stmt).first()
            return None if row is None else (row[0],)

        found = self.reader.run(run, None)
        if found is None:
            return None
        value = self._decode(found[0])
        if isinstance(value, Undecodable):
            return value
        if value is None:
            return GroupResult(group_id, [], app=self.backend.app)
        try:
            group = result_from_tuple(value, self.backend.app)
        except Exception as exc:
            return Undecodable(f"not a group result: {type(exc).__name__}")
        if not isinstance(group, GroupResult):
            return Undecodable(f"not a group result: {type(group).__name__}")
        return group

    # ---- deleting -----------------------------------------------------
    def forget(self, task_ids: str | Iterable[str]) -> int:
        """Delete the stored results of ``task_ids``; return how many existed."""
        self._whole_table("forget")
        ids = list(dict.fromkeys([task_ids] if isinstance(task_ids, str) else task_ids))
        t = self.store.tables.task
        for task_id in ids:
            self.backend._cache.pop(task_id, None)

        def run(conn: Connection, _: Statements) -> int:
            deleted = 0
            for start in range(0, len(ids), BATCH_SIZE):
                chunk = ids[start : start + BATCH_SIZE]
                deleted += conn.execute(sa.delete(t).where(t.c.task_id.in_(chunk))).rowcount
            return deleted

        return self.store.run(run, 0) if ids else 0

    def cleanup(self, older_than: When, dry_run: bool = False) -> dict[str, int]:
        """Delete what finished before ``older_than``, as beat's daily cleanup does.

        ``older_than`` is an age (``timedelta(days=7)``, ``"7d"``) or a moment
        (see :func:`parse_when`). Task and group results go by ``date_done``,
        counters of chords that never completed by their start; unfinished
        tasks are kept. Deletes in batches (short locks). Returns the counts
        per table, ``{"task": n, "group": n, "chord": n}``; with ``dry_run``
        the counts of what would go, deleting nothing.
        """
        self._whole_table("cleanup")
        cutoff = _naive(parse_when(older_than))
        return self.store.cleanup(cutoff, dry_run=dry_run)

    # ---- internals ----------------------------------------------------
    def _clauses(self, layout: Layout) -> list[sa.ColumnElement[bool]]:
        t = self.reader.tables.task
        out: list[sa.ColumnElement[bool]] = []
        for key, value in self._where:
            if key == "state":
                out.append(t.c.status.in_(value))
            elif key == "since":
                out.append(t.c.date_done >= _naive(value))
            elif key == "until":
                out.append(t.c.date_done < _naive(value))
            elif key == "after":
                done, row_id = value
                first = self.reader.dialect.nulls_first_descending
                out.append(_keyset(t, done, row_id, nulls_first=first))
            elif key in layout.task_columns:
                out.append(_match(t.c[key], value))
            else:  # tables of an old Celery without the extended columns: nothing matches
                out.append(sa.false())
        return out

    def _whole_table(self, what: str) -> None:
        """Deletes ignore filters; refuse a filtered query rather than surprise anyone."""
        if self._where or self._limit is not None:
            raise ValueError(f"{what}() works on whole tables: call it on an unfiltered query")

    def _columns(
        self, layout: Layout, values_up_to: int | None, extra: tuple[str, ...] = ()
    ) -> list[sa.ColumnElement[Any]]:
        """The task columns to select: values cut to ``values_up_to``, with their sizes."""
        t = self.reader.tables.task
        if values_up_to is not None and not self.reader.dialect.cuts_blobs_in_sql:
            extra = (*extra, "id")  # for the blob reads
        out: list[sa.ColumnElement[Any]] = []
        for name in dict.fromkeys((*extra, *_COLUMNS)):
            if name not in layout.task_columns:
                continue
            col = t.c[name]
            if values_up_to is None or name not in _VALUES:
                out.append(col)
                continue
            if self._by_blob(col):  # whole if small; the head of a large one: _fetch
                whole = sa.case((_length(col) <= values_up_to, col), else_=sa.null())
                out.append(sa.type_coerce(whole, col.type).label(name))
            else:
                out.append(sa.func.substr(col, 1, values_up_to, type_=col.type).label(name))
            out.append(_length(col).label(name + _SIZE))
        return out

    def _by_blob(self, col: sa.Column[Any]) -> bool:
        """Whether parts of ``col`` are read by ``dialect.read_blob`` rather than ``substr``.

        Where ``substr`` would load the whole value into this process (SQLite).
        """
        return not self.reader.dialect.cuts_blobs_in_sql and isinstance(col.type, sa.LargeBinary)

    def _fetch(
        self, conn: Connection, stmt: sa.Select[Any], values_up_to: int | None
    ) -> list[Mapping[str, Any]]:
        """Run a select built by :meth:`_columns`, reading the heads :meth:`_by_blob` left out."""
        rows = cast("list[Mapping[str, Any]]", list(conn.execute(stmt).mappings()))
        if values_up_to is None or self.reader.dialect.cuts_blobs_in_sql:
            return rows
        t = self.reader.tables.task
        out = []
        for row in rows:
            big = [
                name
                for name in _VALUES
                if self._by_blob(t.c[name]) and (row.get(name + _SIZE) or 0) > values_up_to
            ]
            if big:
                row = dict(row)
                for name in big:
                    row[name] = self.reader.dialect.read_blob(
                        conn, t.c[name], row["id"], 0, values_up_to
                    )
            out.append(row)
        return out

    def _value(self, row: Mapping[str, Any], name: str, values_up_to: int | None) -> Any:
        """A value column decoded, or a :class:`Truncated` if it was cut short."""
        value = row.get(name)
        size = row.get(name + _SIZE)
        if values_up_to is not None and size is not None and size > values_up_to:
            return Truncated(int(size), value if value is not None else b"")
        return value if name == "traceback" else self._decode(value)

    def _record(self, row: Mapping[str, Any], values_up_to: int | None = None) -> TaskRecord:
        status = row["status"]
        result = self._value(row, "result", values_up_to)
        if status in states.EXCEPTION_STATES and isinstance(result, dict):
            # A payload that is no safe exception stays the plain dict it was stored as.
            with contextlib.suppress(Exception):
                result = self.backend.exception_to_python(result)
        return TaskRecord(
            task_id=row["task_id"],
            status=status,
            name=row.get("name"),
            worker=row.get("worker"),
            queue=row.get("queue"),
            retries=row.get("retries"),
            date_created=_utc_or_none(row.get("date_created")),
            date_started=_utc_or_none(row.get("date_started")),
            date_done=_utc_or_none(row["date_done"]),
            args=self._value(row, "args", values_up_to),
            kwargs=self._value(row, "kwargs", values_up_to),
            result=result,
            traceback=self._value(row, "traceback", values_up_to),
        )

    def _decode(self, payload: Any) -> Any:
        try:
            return self.backend.decode_value(payload)
        except Exception as exc:
            return Undecodable(one_line(exc) or type(exc).__name__)


def _length(column: sa.Column[Any]) -> sa.ColumnElement[int]:
    """Stored size: bytes of a binary column, characters of a text one (every database)."""
    if isinstance(column.type, sa.LargeBinary):
        return sa.func.length(column, type_=sa.BigInteger)
    return sa.func.char_length(column, type_=sa.BigInteger)


def _match(column: sa.ColumnElement[Any], pattern: str) -> sa.ColumnElement[bool]:
    """Equality, or ``LIKE`` when the pattern has ``*`` (``%`` and ``_`` stay literal)."""
    if "*" not in pattern:
        return column == pattern
    like = pattern.replace("!", "!!").replace("%", "!%").replace("_", "!_").replace("*", "%")
    return column.like(like, escape="!")


def encode_cursor(date_done: datetime | None, row_id: int) -> str:
    """An opaque page cursor for the row with this (stored, naive UTC) ``date_done`` and ``id``."""
    raw = json.dumps([None if date_done is None else date_done.isoformat(), int(row_id)])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime | None, int]:
    """The ``(date_done, id)`` a cursor encodes; :class:`ValueError` if it is malformed."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        done, row_id = json.loads(raw)
        if type(row_id) is not int or not (done is None or isinstance(done, str)):
            raise ValueError
        if not 0 <= row_id <= _MAX_ID:
            raise ValueError
        return (None if done is None else _naive(datetime.fromisoformat(done))), row_id
    except (ValueError, TypeError, OverflowError, RecursionError, binascii.Error):
        raise ValueError(f"invalid cursor {cursor!r}: use the next_cursor of a page") from None


def _keyset(
    t: sa.Table, done: datetime | None, row_id: int, nulls_first: bool
) -> sa.ColumnElement[bool]:
    """Rows after ``(done, row_id)`` in ``date_done DESC, id DESC`` order.

    Unfinished rows (``date_done IS NULL``) come first on PostgreSQL and
    last on MySQL/SQLite, as the listing's ``ORDER BY`` puts them.
    """
    # As BIGINT: a cursor may name an id beyond PostgreSQL's INTEGER (it compares fine).
    d, i = t.c.date_done, sa.type_coerce(t.c.id, sa.BigInteger)
    if done is None:
        among_unfinished = sa.and_(d.is_(None), i < row_id)
        return sa.or_(among_unfinished, d.is_not(None)) if nulls_first else among_unfinished
    later = sa.or_(d < done, sa.and_(d == done, i < row_id))
    return later if nulls_first else sa.or_(later, d.is_(None))


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def _utc_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else _utc(value)


def _naive(value: datetime) -> datetime:
    """UTC wall-clock time, as Celery's naive ``date_done`` column holds it."""
    return _utc(value).replace(tzinfo=None)
