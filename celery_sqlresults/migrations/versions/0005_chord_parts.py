"""The header tasks each chord has counted, so a redelivered task counts once.

Revision ID: 0005
Revises: 0004

With ``acks_late`` a header task can run again after its result was stored
(a worker killed before the ack); Celery then reports the part a second
time. One row per ``(group_id, task_id)``, inserted with the count, lets
the count ignore the repeat. Rows go when their chord completes, or with
``cleanup()`` by ``date_created``. Only creates a table: additive.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

from celery_sqlresults.schema import Tables

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None
#: Only creates a table: safe to run automatically at start-up.
additive = True


def _table(tables: Tables) -> sa.Table:
    """The table as of this revision (frozen here: later revisions change it, not this file)."""
    return sa.Table(
        tables.chord_part.name,
        sa.MetaData(),
        sa.Column("group_id", sa.String(155), primary_key=True),
        sa.Column("task_id", sa.String(155), primary_key=True),
        sa.Column("date_created", sa.DateTime, nullable=False),
        schema=tables.chord_part.schema,
    )


def upgrade() -> None:
    table = _table(context.config.attributes["tables"])
    if not context.is_offline_mode() and sa.inspect(op.get_bind()).has_table(
        table.name, schema=table.schema
    ):
        return
    op.create_table(table.name, *(c._copy() for c in table.columns), schema=table.schema)


def downgrade() -> None:
    table = context.config.attributes["tables"].chord_part
    op.drop_table(table.name, schema=table.schema)
