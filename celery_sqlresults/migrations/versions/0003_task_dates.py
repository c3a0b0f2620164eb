"""When a task was created and when it started: ``date_created``, ``date_started``.

Revision ID: 0003
Revises: 0002

Two nullable timestamps on the task table for monitoring: ``date_created``
is written when the row is first inserted (at publish time with
``sqlresults_record_on_publish``, else with the first state a worker
stores) and never updated; ``date_started`` is written with each STARTED
state (``task_track_started``). Celery's ``db+`` does not map them and
ignores them. Adding a nullable column without a default is a catalog-only
change on PostgreSQL, instant on MariaDB/MySQL and SQLite.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None
#: Only adds nullable columns: safe to run automatically at start-up.
additive = True

COLUMNS = ("date_created", "date_started")


def upgrade() -> None:
    task = context.config.attributes["tables"].task
    for name in _wanted(task, present=False):
        op.add_column(task.name, sa.Column(name, sa.DateTime, nullable=True), schema=task.schema)


def downgrade() -> None:
    task = context.config.attributes["tables"].task
    for name in _wanted(task, present=True):
        op.drop_column(task.name, name, schema=task.schema)


def _wanted(task: sa.Table, present: bool) -> list[str]:
    """Our columns that are (``present``) or are not in the table; offline: all of them."""
    if context.is_offline_mode():
        return list(COLUMNS)
    have = {c["name"] for c in sa.inspect(op.get_bind()).get_columns(task.name, task.schema)}
    return [c for c in COLUMNS if (c in have) == present]
