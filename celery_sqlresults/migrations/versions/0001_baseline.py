"""Baseline: Celery's two result tables and our chord counter table.

Revision ID: 0001
Revises: (none)

Adopts tables that already exist, made by Celery's ``db+`` backend of any
version: creates only the tables that are missing and adds the nullable
columns older Celery versions lack (``children``, ``stamps``, the
``result_extended`` ones), keeping every row. The layout below is frozen as
of this revision; later revisions change it, never this file.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from celery import states
from sqlalchemy.dialects import mysql
from sqlalchemy.schema import CreateIndex, CreateSequence, CreateTable

from celery_sqlresults.schema import Tables

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None
#: Only creates and adds: safe to run automatically at start-up.
additive = True

_Blob = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")


def _id(sequence: str, schema: str | None) -> sa.Column[int]:
    return sa.Column(
        "id", sa.Integer, sa.Sequence(sequence, schema=schema), primary_key=True, autoincrement=True
    )


def layout(tables: Tables) -> list[sa.Table]:
    """The three tables as of this revision, named as the settings say."""
    md = sa.MetaData()
    task_schema, group_schema = tables.task.schema, tables.group.schema
    task = sa.Table(
        tables.task.name,
        md,
        _id("task_id_sequence", task_schema),
        sa.Column("task_id", sa.String(155), unique=True),
        sa.Column("status", sa.String(50), default=states.PENDING),
        sa.Column("result", _Blob, nullable=True),
        sa.Column("date_done", sa.DateTime, nullable=True, index=True),
        sa.Column("traceback", sa.Text, nullable=True),
        sa.Column("children", _Blob, nullable=True),
        sa.Column("name", sa.String(155), nullable=True),
        sa.Column("args", _Blob, nullable=True),
        sa.Column("kwargs", _Blob, nullable=True),
        sa.Column("worker", sa.String(155), nullable=True),
        sa.Column("retries", sa.Integer, nullable=True),
        sa.Column("queue", sa.String(155), nullable=True),
        sa.Column("stamps", _Blob, nullable=True),
        schema=task_schema,
        sqlite_autoincrement=True,
    )
    group = sa.Table(
        tables.group.name,
        md,
        _id("taskset_id_sequence", group_schema),
        sa.Column("taskset_id", sa.String(155), unique=True),
        sa.Column("result", _Blob, nullable=True),
        sa.Column("date_done", sa.DateTime, nullable=True, index=True),
        schema=group_schema,
        sqlite_autoincrement=True,
    )
    chord = sa.Table(
        tables.chord.name,
        md,
        sa.Column("group_id", sa.String(155), primary_key=True),
        sa.Column("chord_size", sa.Integer, nullable=True),
        sa.Column("done", sa.Integer, nullable=False, server_default="0"),
        sa.Column("date_created", sa.DateTime, nullable=False, index=True),
        schema=group_schema,
    )
    return [task, group, chord]


def upgrade() -> None:
    inspector = None if context.is_offline_mode() else sa.inspect(op.get_bind())
    for table in layout(context.config.attributes["tables"]):
        if inspector is None or not inspector.has_table(table.name, schema=table.schema):
            _create(table)
            continue
        present = {c["name"] for c in inspector.get_columns(table.name, schema=table.schema)}
        for column in table.columns:
            if column.name not in present:
                op.add_column(table.name, column._copy(), schema=table.schema)


def downgrade() -> None:
    """Drop only our chord table: Celery's tables and their rows stay, as ``db+`` made them."""
    chord = context.config.attributes["tables"].chord
    op.drop_table(chord.name, schema=chord.schema)


def _create(table: sa.Table) -> None:
    """CREATE SEQUENCE/TABLE/INDEX as ``create_all`` would, also as offline SQL text."""
    if op.get_context().dialect.supports_sequences:
        for column in table.columns:
            if isinstance(column.default, sa.Sequence):
                op.execute(CreateSequence(column.default, if_not_exists=True))
    op.execute(CreateTable(table))
    for index in sorted(table.indexes, key=lambda ix: str(ix.name)):
        op.execute(CreateIndex(index))
