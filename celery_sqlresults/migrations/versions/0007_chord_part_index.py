"""Each counted chord part's place in the header: ``group_index``.

Revision ID: 0007
Revises: 0006

A header given as a generator is sent as it is generated, so no list of its
tasks is saved before they run; the body's values are then read from the
counted parts in header order, as Celery's Redis backend does. A nullable
column on our own table: catalog-only on PostgreSQL, instant on MariaDB/MySQL
and SQLite.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None
#: Only adds a nullable column: safe to run automatically at start-up.
additive = True

COLUMN = "group_index"


def upgrade() -> None:
    parts = context.config.attributes["tables"].chord_part
    if _present(parts) is not True:
        op.add_column(parts.name, sa.Column(COLUMN, sa.Integer, nullable=True), schema=parts.schema)


def downgrade() -> None:
    parts = context.config.attributes["tables"].chord_part
    if _present(parts) is not False:
        op.drop_column(parts.name, COLUMN, schema=parts.schema)


def _present(parts: sa.Table) -> bool | None:
    """Whether the column is there; offline: ``None`` (unknown)."""
    if context.is_offline_mode():
        return None
    have = sa.inspect(op.get_bind()).get_columns(parts.name, parts.schema)
    return any(c["name"] == COLUMN for c in have)
