"""Every statement the store runs, each built by a method named after it, once per layout.

A statement depends on the tables as they are (:class:`~celery_sqlresults.layout.Layout`:
which columns exist, how ``id`` is made) and on the dialect; building and
compiling one costs far more than running it, so each is built on first use
and kept with the layout it was built for. ``Statements(...).task_upsert(cols,
notify=True)`` reads as what it runs; the parameters each statement binds are
in its docstring.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import sqlalchemy as sa
from celery import states
from sqlalchemy.sql.compiler import IdentifierPreparer

from .dialects import Dialect
from .layout import Layout
from .schema import DATE_COLUMNS, EXTENDED_COLUMNS, Tables

__all__ = ["Statements"]

P = ParamSpec("P")
R = TypeVar("R")
_READY = sorted(states.READY_STATES)


def _kept(
    build: Callable[Concatenate[Statements, P], R],
) -> Callable[Concatenate[Statements, P], R]:
    """Build the statement on the first call with these arguments, then return that one."""
    name = build.__name__

    @functools.wraps(build)
    def kept(self: Statements, *args: P.args, **kwargs: P.kwargs) -> R:
        key = (name, *args) if not kwargs else (name, args, tuple(sorted(kwargs.items())))
        try:
            found: R = self._built[key]
        except KeyError:
            found = self._built[key] = build(self, *args, **kwargs)
        return found

    return kept


class Statements:
    """The statements for ``tables`` as ``layout`` found them, on ``dialect``."""

    def __init__(
        self,
        tables: Tables,
        dialect: Dialect,
        layout: Layout,
        channel: str,
        quoting: IdentifierPreparer,
    ) -> None:
        self.tables = tables
        self.dialect = dialect
        self.layout = layout
        self.channel = channel
        self.quoting = quoting  # the database's rules for quoting names (SQLAlchemy's)
        self._built: dict[Any, Any] = {}

    # ---- tasks ----------------------------------------------------------
    @_kept
    def task_upsert(self, columns: tuple[str, ...], notify: bool) -> sa.Executable:
        """Insert or update a task's row (``columns``), never over a stored SUCCESS.

        ``date_created`` is written by the insert only. With ``notify`` it also
        notifies the waiters (parameter ``notice``: the payload).
        """
        t = self.tables.task
        stmt = self.dialect.upsert(t, columns, self.layout.task_seq, insert_only=("date_created",))
        return self.dialect.notifying(stmt, t, self.channel) if notify else stmt

    @_kept
    def task_insert_if_absent(self, columns: tuple[str, ...]) -> sa.Executable:
        """Insert a task's row unless its ``task_id`` has one (record on publish)."""
        t = self.tables.task
        return self.dialect.insert_if_absent(t, "task_id", columns, self.layout.task_seq)

    @_kept
    def task_read(self, extended: bool) -> sa.Executable:
        """One task's meta columns (parameter ``task_id``, not selected: it is known).

        Written as text, quoted by the database's rules, and typed by the table's
        columns (the values are converted as a select()'s are): a new process's
        first read would otherwise pay the SQL compiler's first use.
        """
        t, q = self.tables.task, self.quoting
        # A column the caller knows costs a driver's metadata parsing per query.
        cols = [c for c in self.meta_columns(extended) if c.name != "task_id"]
        sql = (
            f"SELECT {', '.join(q.quote(c.name) for c in cols)} FROM {q.format_table(t)}"
            f" WHERE {q.quote(t.c.task_id.name)} = :task_id"
        )
        task_id = sa.bindparam("task_id", type_=t.c.task_id.type)
        return sa.text(sql).bindparams(task_id).columns(*cols)

    @_kept
    def ready_tasks(self, extended: bool) -> sa.Executable:
        """The meta of those of ``ids`` (a list) that are in a ready state.

        The state is tested through ``coalesce`` (the same truth: a missing state is
        not ready) so that no planner takes the ``status`` index for it: SQLite's,
        without statistics, did, and a join then read every finished row of the
        table instead of its ids (docs/growth.md, "Table size").
        """
        t = self.tables.task
        return sa.select(*self.meta_columns(extended)).where(
            self.dialect.one_of(t.c.task_id, "ids"),
            sa.func.coalesce(t.c.status, "").in_(_READY),
        )

    @_kept
    def task_exists(self) -> sa.Executable:
        """1 if ``task_id`` has a row."""
        t = self.tables.task
        return sa.select(sa.literal(1)).where(t.c.task_id == sa.bindparam("task_id"))

    @_kept
    def task_delete(self) -> sa.Executable:
        """Delete the row of ``task_id``."""
        t = self.tables.task
        return sa.delete(t).where(t.c.task_id == sa.bindparam("task_id"))

    def meta_columns(self, extended: bool) -> list[sa.Column[Any]]:
        """The task columns Celery's meta is made of (those the table has).

        The monitoring timestamps are not part of Celery's meta: left to ResultQuery.
        """
        skip = {"id", *DATE_COLUMNS, *(() if extended else EXTENDED_COLUMNS)}
        kept = self.layout.task_columns - skip
        return [c for c in self.tables.task.c if c.name in kept]

    # ---- groups ---------------------------------------------------------
    @_kept
    def group_upsert(self) -> sa.Executable:
        """Insert or replace a group's row: ``taskset_id``, ``result``, ``date_done``."""
        columns = ("taskset_id", "result", "date_done")
        return self.dialect.replace(self.tables.group, "taskset_id", columns, self.layout.group_seq)

    @_kept
    def group_read(self) -> sa.Executable:
        """The row of group ``taskset_id``."""
        g = self.tables.group
        return sa.select(g.c.taskset_id, g.c.result, g.c.date_done).where(
            g.c.taskset_id == sa.bindparam("taskset_id")
        )

    @_kept
    def group_delete(self) -> sa.Executable:
        """Delete the row of group ``taskset_id``."""
        g = self.tables.group
        return sa.delete(g).where(g.c.taskset_id == sa.bindparam("taskset_id"))

    # ---- chords ---------------------------------------------------------
    @_kept
    def chord_start(self) -> sa.Executable:
        """(Re)start a chord's counter: ``group_id``, ``chord_size``, ``done``, ``date_created``."""
        columns = ("group_id", "chord_size", "done", "date_created")
        return self.dialect.replace(self.tables.chord, "group_id", columns, id_seq=False)

    @_kept
    def chord_set_size(self) -> sa.Executable:
        """Set the size (``size``) of chord ``chord``."""
        c = self.tables.chord
        return (
            sa.update(c)
            .where(c.c.group_id == sa.bindparam("chord"))
            .values(chord_size=sa.bindparam("size"))
        )

    @_kept
    def chord_count(self) -> sa.Executable | None:
        """Count a finished part in one statement, where the dialect has one
        (``group_id``, ``task_id``, ``date_created``; returns ``done``, ``chord_size``)."""
        if not self.layout.has_chord_part:
            return None
        return self.dialect.part_counter(
            self.tables.chord, self.tables.chord_part, self.part_columns
        )

    @property
    def part_columns(self) -> tuple[str, ...]:
        """The columns a counted part is recorded with, as the table has them."""
        columns = ("group_id", "task_id", "date_created")
        return (*columns, "group_index") if self.layout.has_part_index else columns

    @_kept
    def chord_parts_read(self) -> sa.Executable:
        """The task ids counted for chord ``group_id``, in header order (``group_index``;
        the tasks added to the header next to the task that added them)."""
        p = self.tables.chord_part
        return (
            sa.select(p.c.task_id)
            .where(p.c.group_id == sa.bindparam("group_id"))
            .order_by(p.c.group_index, p.c.date_created, p.c.task_id)
        )

    @_kept
    def chord_add(self) -> sa.Executable:
        """Make chord ``chord`` wait for one more part (a task added to its header):
        ``done`` goes down by one, so the count that completes it is one later."""
        c = self.tables.chord
        return sa.update(c).where(c.c.group_id == sa.bindparam("chord")).values(done=c.c.done - 1)

    @_kept
    def chord_read_locked(self) -> sa.Executable:
        """``done`` and ``chord_size`` of chord ``chord``, its row locked to the transaction."""
        c = self.tables.chord
        return (
            sa.select(c.c.done, c.c.chord_size)
            .where(c.c.group_id == sa.bindparam("chord"))
            .with_for_update()
        )

    @_kept
    def group_read_locked(self) -> sa.Executable:
        """The ``result`` of group ``taskset_id``, its row locked to the transaction."""
        g = self.tables.group
        return (
            sa.select(g.c.result)
            .where(g.c.taskset_id == sa.bindparam("taskset_id"))
            .with_for_update()
        )

    @_kept
    def chord_delete(self) -> sa.Executable:
        """Delete the counter of chord ``group_id``."""
        c = self.tables.chord
        return sa.delete(c).where(c.c.group_id == sa.bindparam("group_id"))

    @_kept
    def chord_parts_delete(self) -> sa.Executable:
        """Delete the counted parts of chord ``group_id``."""
        p = self.tables.chord_part
        return sa.delete(p).where(p.c.group_id == sa.bindparam("group_id"))
