"""What the result tables in the database actually look like, as opposed to Celery's layout.

Tables made by older Celery versions lack columns, ``id`` comes from a
sequence or auto-increments, MySQL's ``BLOB`` columns hold 64 KB: the store
writes what the tables there can take, read once per process
(:func:`reflect`) and again after DDL.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .dialects import Dialect
from .schema import Tables

__all__ = ["Layout", "missing_columns", "missing_tables", "newest", "reflect"]

#: Task columns whose values can be large (checked against what the column holds).
_SIZED_COLUMNS = ("result", "traceback", "children", "args", "kwargs", "stamps")


@dataclass(frozen=True)
class Layout:
    """The columns the tables have, how their ids are made and what their columns hold."""

    task_columns: frozenset[str]
    group_columns: frozenset[str]
    task_seq: bool
    group_seq: bool
    has_chord: bool
    has_chord_part: bool
    #: Whether counted parts record their place in the header (revision 0007).
    has_part_index: bool = False
    #: Bytes each binary/text column of the task table holds, where that is a real limit.
    task_capacity: dict[str, int] = field(default_factory=dict)
    #: Bytes one statement may take (MySQL's ``max_allowed_packet``), if limited.
    packet_limit: int | None = None
    reflected_at: float = field(default_factory=time.monotonic)

    def task_row(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` without the columns this task table lacks."""
        return {k: v for k, v in values.items() if k in self.task_columns}


def newest(tables: Tables) -> Layout:
    """The task table as our newest revision makes it, assumed by a task read before reflecting.

    Only task reads may use it: what a write needs to know (how ``id`` is made,
    what a column holds) is not assumed, nor anything of the other tables
    (which stay unbuilt). A read it does not fit fails with a missing column,
    and the store reflects then.
    """
    return Layout(
        task_columns=frozenset(tables.task.c.keys()),
        group_columns=frozenset(),
        task_seq=False,
        group_seq=False,
        has_chord=True,
        has_chord_part=True,
        has_part_index=True,
    )


def reflect(conn: Connection, tables: Tables, dialect: Dialect) -> Layout | None:
    """The layout of ``tables`` in the database; ``None`` while Celery's tables are missing."""
    chord, part = tables.chord, tables.chord_part
    task, group, chord_columns, part_columns = dialect.table_columns(
        conn, [tables.task, tables.group, chord, part]
    )
    if task is None or group is None:
        return None
    capacity = {
        name: cap
        for name, col in task.items()
        if name in _SIZED_COLUMNS and (cap := dialect.column_capacity(col.get("type"))) is not None
    }
    return Layout(
        task_capacity=capacity,
        packet_limit=dialect.packet_limit(conn),
        task_columns=frozenset(task) & frozenset(tables.task.c.keys()),
        group_columns=frozenset(group) & frozenset(tables.group.c.keys()),
        task_seq=dialect.id_from_sequence(dict(task["id"])),
        group_seq=dialect.id_from_sequence(dict(group["id"])),
        has_chord=chord_columns is not None,
        has_chord_part=part_columns is not None,
        has_part_index=part_columns is not None and "group_index" in part_columns,
    )


def missing_tables(conn: Connection, tables: Tables) -> list[sa.Table]:
    """Tables of ours that do not exist (one catalog query per schema)."""
    insp = sa.inspect(conn)
    existing: dict[str | None, set[str]] = {}
    missing = []
    for table in tables.all:
        if table.schema not in existing:
            existing[table.schema] = set(insp.get_table_names(schema=table.schema))
        if table.name not in existing[table.schema]:
            missing.append(table)
    return missing


def missing_columns(layout: Layout, tables: Tables) -> list[tuple[sa.Table, sa.Column[Any]]]:
    """Columns of Celery's layout that the existing tables lack (older Celery versions)."""
    out: list[tuple[sa.Table, sa.Column[Any]]] = []
    for table, present in (
        (tables.task, layout.task_columns),
        (tables.group, layout.group_columns),
    ):
        out.extend((table, c) for c in table.columns if c.name not in present)
    return out
