"""The result tables, laid out exactly as Celery's ``db+`` backend lays them out.

Same names, columns, types, sequences and the ``date_done`` index, so a
``db+`` user who switches to ``sql+`` keeps every row and ``db+`` can still
read what we write. The deliberate differences, all invisible to ``db+``:
on MySQL/MariaDB the binary columns are ``LONGBLOB`` (revision 0004 converts
adopted tables), so results over 64 KB fit; the task table has two more
nullable timestamps, ``date_created`` and ``date_started``; and the chord
counter table is ours.

This is the layout at the newest schema revision (``migrations/versions``);
the revisions get a database there, and a test checks they agree.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from celery import states
from sqlalchemy.dialects import mysql

__all__ = ["DATE_COLUMNS", "DEFAULT_NAMES", "EXTENDED_COLUMNS", "Tables", "build_tables", "utc_now"]

#: Table names Celery uses unless ``database_table_names`` says otherwise.
DEFAULT_NAMES = {
    "task": "celery_taskmeta",
    "group": "celery_tasksetmeta",
    "chord": "celery_sqlresults_chord",
    "chord_part": "celery_sqlresults_chord_part",
    "version": "celery_sqlresults_version",
}

#: Columns Celery fills only with ``result_extended`` (always created, as Celery does).
EXTENDED_COLUMNS = ("name", "args", "kwargs", "worker", "retries", "queue", "stamps")

#: Our monitoring timestamps on the task table (not Celery's; revision 0003).
DATE_COLUMNS = ("date_created", "date_started")


def utc_now() -> datetime:
    """Now, as the date columns hold it: UTC without a time zone, as Celery's ``db+`` writes."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


_Blob = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")


class Tables:
    """The tables of one configuration, in their own ``MetaData``.

    ``task`` and ``group`` are Celery's; ``chord`` (one counter row per running
    chord) and ``chord_part`` (the header tasks counted so far, so a redelivered
    task is not counted twice, with their place in the header) are ours and
    invisible to Celery's ``db+``. ``version`` names the
    table holding our schema revision (Alembic's ``version_table``, kept in
    the task table's schema and managed by Alembic, not part of ``metadata``).

    Each table is built on first use: a new process whose first call reads a
    task builds only the task table (a ``Table`` costs more to build than the
    read does to run).
    """

    def __init__(self, names: dict[str, str], schemas: dict[str, str | None]) -> None:
        self.metadata = sa.MetaData()
        self.version = names["version"]
        self._names = names
        self._schemas = {"task": schemas.get("task"), "group": schemas.get("group")}
        self._lock = threading.Lock()

    @functools.cached_property
    def task(self) -> sa.Table:
        return self._build("task", _task_table)

    @functools.cached_property
    def group(self) -> sa.Table:
        return self._build("group", _group_table)

    @functools.cached_property
    def chord(self) -> sa.Table:
        return self._build("chord", _chord_table)

    @functools.cached_property
    def chord_part(self) -> sa.Table:
        return self._build("chord_part", _chord_part_table)

    @property
    def all(self) -> tuple[sa.Table, ...]:
        return (self.task, self.group, self.chord, self.chord_part)

    @property
    def fullnames(self) -> tuple[str, ...]:
        """The four tables' schema-qualified names, without building them."""
        out = []
        for key in ("task", "group", "chord", "chord_part"):
            schema = self._schemas["task" if key == "task" else "group"]
            out.append(self._names[key] if schema is None else f"{schema}.{self._names[key]}")
        return tuple(out)

    @property
    def growing(self) -> tuple[sa.Table, ...]:
        """The tables that grow to millions of rows between cleanups (Celery's two), which
        get storage settings of their own where the database has any (revision 0008)."""
        return (self.task, self.group)

    @property
    def expiring(self) -> dict[str, tuple[sa.Table, sa.Column[Any]]]:
        """Each table (by its settings key) with the timestamp ``cleanup()`` expires it by."""
        return {
            "task": (self.task, self.task.c.date_done),
            "group": (self.group, self.group.c.date_done),
            "chord": (self.chord, self.chord.c.date_created),
            "chord_part": (self.chord_part, self.chord_part.c.date_created),
        }

    def _build(
        self, key: str, make: Callable[[sa.MetaData, str, str | None], sa.Table]
    ) -> sa.Table:
        """``make`` the table once, whichever thread asks first."""
        schema = self._schemas["task" if key == "task" else "group"]
        name = self._names[key]
        with self._lock:
            made = self.metadata.tables.get(name if schema is None else f"{schema}.{name}")
            return made if made is not None else make(self.metadata, name, schema)


def _id_column(sequence: str, schema: str | None) -> sa.Column[int]:
    """Celery's surrogate key: a named sequence where the database has them."""
    return sa.Column(
        "id", sa.Integer, sa.Sequence(sequence, schema=schema), primary_key=True, autoincrement=True
    )


def build_tables(
    names: dict[str, str] | None = None, schemas: dict[str, str | None] | None = None
) -> Tables:
    """The tables for the given ``database_table_names``/``database_table_schemas``."""
    return Tables({**DEFAULT_NAMES, **(names or {})}, schemas or {})


def _task_table(md: sa.MetaData, name: str, schema: str | None) -> sa.Table:
    task = sa.Table(
        name,
        md,
        _id_column("task_id_sequence", schema),
        sa.Column("task_id", sa.String(155), unique=True),
        sa.Column("status", sa.String(50), default=states.PENDING, index=True),
        sa.Column("result", _Blob, nullable=True),
        sa.Column("date_done", sa.DateTime, nullable=True, index=True),
        sa.Column("traceback", sa.Text, nullable=True),
        sa.Column("children", _Blob, nullable=True),
        sa.Column("name", sa.String(155), nullable=True, index=True),
        sa.Column("args", _Blob, nullable=True),
        sa.Column("kwargs", _Blob, nullable=True),
        sa.Column("worker", sa.String(155), nullable=True),
        sa.Column("retries", sa.Integer, nullable=True),
        sa.Column("queue", sa.String(155), nullable=True),
        sa.Column("stamps", _Blob, nullable=True),
        # Ours (revision 0003); Celery's db+ does not map them.
        sa.Column("date_created", sa.DateTime, nullable=True),
        sa.Column("date_started", sa.DateTime, nullable=True),
        schema=schema,
        sqlite_autoincrement=True,
    )
    # Revision 0006: name globs as prefix matches under any collation (PostgreSQL only).
    sa.Index(
        f"ix_{task.name}_name_pattern"[:63],
        task.c.name,
        postgresql_ops={"name": "varchar_pattern_ops"},
    ).ddl_if(dialect="postgresql")
    return task


def _group_table(md: sa.MetaData, name: str, schema: str | None) -> sa.Table:
    return sa.Table(
        name,
        md,
        _id_column("taskset_id_sequence", schema),
        sa.Column("taskset_id", sa.String(155), unique=True),
        sa.Column("result", _Blob, nullable=True),
        sa.Column("date_done", sa.DateTime, nullable=True, index=True),
        schema=schema,
        sqlite_autoincrement=True,
    )


def _chord_table(md: sa.MetaData, name: str, schema: str | None) -> sa.Table:
    return sa.Table(
        name,
        md,
        sa.Column("group_id", sa.String(155), primary_key=True),
        sa.Column("chord_size", sa.Integer, nullable=True),
        sa.Column("done", sa.Integer, nullable=False, server_default="0"),
        sa.Column("date_created", sa.DateTime, nullable=False, index=True),
        schema=schema,
    )


def _chord_part_table(md: sa.MetaData, name: str, schema: str | None) -> sa.Table:
    return sa.Table(
        name,
        md,
        sa.Column("group_id", sa.String(155), primary_key=True),
        sa.Column("task_id", sa.String(155), primary_key=True),
        sa.Column("date_created", sa.DateTime, nullable=False),
        sa.Column("group_index", sa.Integer, nullable=True),
        schema=schema,
    )
