"""Monitoring indexes on the task table: ``status`` and ``name``, and ``date_done`` kept.

Revision ID: 0002
Revises: 0001

Serve ``celery results list --state/--name`` and ``stats`` without a full
scan. Built without blocking writes: ``CREATE INDEX CONCURRENTLY`` on
PostgreSQL (outside a transaction, hence the autocommit block; an invalid
index left by an interrupted build is dropped and rebuilt), InnoDB's online
index build on MySQL/MariaDB. ``date_done`` (Celery's own index) is created
only where a table lacks it.
"""

from __future__ import annotations

import contextlib
from typing import Any

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.schema import CreateIndex, DropIndex

from celery_sqlresults.dialects import dialect_for
from celery_sqlresults.schema import Tables

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None
#: Only adds indexes: safe to run automatically at start-up.
additive = True

_NEW = ("status", "name")


def _indexes(tables: Tables) -> dict[str, sa.Index]:
    task = sa.Table(
        tables.task.name,
        sa.MetaData(),
        sa.Column("status", sa.String(50)),
        sa.Column("name", sa.String(155)),
        sa.Column("date_done", sa.DateTime),
        schema=tables.task.schema,
    )
    # Unnamed: the naming convention gives the names ``index=True`` gives.
    return {
        c: sa.Index(None, task.c[c], postgresql_concurrently=True)
        for c in ("status", "name", "date_done")
    }


def upgrade() -> None:
    tables: Tables = context.config.attributes["tables"]
    indexes = _indexes(tables)
    with _outside_transaction():
        if context.is_offline_mode():  # a new database: 0001 made date_done's index
            wanted = [indexes[c] for c in _NEW]
        else:
            bind = op.get_bind()
            if dialect_for(bind).builds_indexes_online:
                _drop_invalid(bind, tables.task)
            existing = sa.inspect(bind).get_indexes(tables.task.name, schema=tables.task.schema)
            first = {ix["column_names"][0] for ix in existing if ix["column_names"]}
            wanted = [ix for c, ix in indexes.items() if c not in first]
        for index in wanted:
            op.execute(CreateIndex(index))


def downgrade() -> None:
    tables: Tables = context.config.attributes["tables"]
    indexes = _indexes(tables)
    with _outside_transaction():
        if context.is_offline_mode():
            names = set(_NEW)
        else:
            existing = sa.inspect(op.get_bind()).get_indexes(
                tables.task.name, schema=tables.task.schema
            )
            names = {str(ix["name"]) for ix in existing}
            names = {c for c in _NEW if str(indexes[c].name) in names}
        for column in sorted(names):
            op.execute(DropIndex(indexes[column]))


def _outside_transaction() -> contextlib.AbstractContextManager[Any]:
    """PostgreSQL builds concurrently, which it refuses inside a transaction block."""
    ctx = op.get_context()
    if dialect_for(ctx.dialect).builds_indexes_online:
        return ctx.autocommit_block()
    return contextlib.nullcontext()


def _drop_invalid(bind: sa.Connection, task: sa.Table) -> None:
    """Drop indexes an interrupted ``CREATE INDEX CONCURRENTLY`` left invalid on the table."""
    preparer = bind.dialect.identifier_preparer
    rows = bind.execute(
        sa.text(
            "SELECT n.nspname, c.relname FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE i.indrelid = to_regclass(:t) AND NOT i.indisvalid"
        ),
        {"t": preparer.format_table(task)},
    ).all()
    for schema, name in rows:
        bind.exec_driver_sql(
            f"DROP INDEX CONCURRENTLY IF EXISTS {preparer.quote(schema)}.{preparer.quote(name)}"
        )
