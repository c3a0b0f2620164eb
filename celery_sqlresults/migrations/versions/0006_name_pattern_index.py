"""PostgreSQL: an index that serves ``name`` globs (``proj.tasks.*``) as prefix matches.

Revision ID: 0006
Revises: 0005

``--name 'proj.*'`` and ``?name=proj.*`` become ``name LIKE 'proj.%'``.
PostgreSQL uses a plain b-tree for ``LIKE 'prefix%'`` only under the C
collation; most databases use another (``en_US.UTF-8``, ``C.UTF-8``), and a
glob matching few rows then reads the whole table
(docs/monitoring-benchmarks.md). A ``varchar_pattern_ops`` index serves the
prefix under any collation. Built with ``CREATE INDEX CONCURRENTLY``, so it
runs at start-up without blocking writes. MySQL/MariaDB already use the
``name`` index for prefixes; SQLite's ``LIKE`` ignores case and uses none:
nothing to do there.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.schema import CreateIndex, DropIndex

from celery_sqlresults.dialects import dialect_for
from celery_sqlresults.schema import Tables

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None
#: Only adds an index, built without blocking writes: safe at start-up.
additive = True


def _index(tables: Tables) -> sa.Index:
    task = sa.Table(
        tables.task.name,
        sa.MetaData(),
        sa.Column("name", sa.String(155)),
        schema=tables.task.schema,
    )
    return sa.Index(
        f"ix_{tables.task.name}_name_pattern"[:63],
        task.c.name,
        postgresql_ops={"name": "varchar_pattern_ops"},
        postgresql_concurrently=True,
    )


def upgrade() -> None:
    if not dialect_for(op.get_context().dialect).has_pattern_index:
        return
    index = _index(context.config.attributes["tables"])
    with op.get_context().autocommit_block():
        if not context.is_offline_mode() and _exists(index):
            return
        op.execute(CreateIndex(index))


def downgrade() -> None:
    if not dialect_for(op.get_context().dialect).has_pattern_index:
        return
    index = _index(context.config.attributes["tables"])
    with op.get_context().autocommit_block():
        if context.is_offline_mode() or _exists(index):
            op.execute(DropIndex(index))


def _exists(index: sa.Index) -> bool:
    """Present and valid; an invalid one left by an interrupted build is dropped first."""
    table = index.table
    assert table is not None
    bind = op.get_bind()
    valid = bind.execute(
        sa.text(
            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relname = :name AND n.nspname = coalesce(:schema, current_schema())"
        ),
        {"name": index.name, "schema": table.schema},
    ).scalar()
    if valid is False:
        op.execute(DropIndex(index, if_exists=True))
        return False
    return bool(valid)
