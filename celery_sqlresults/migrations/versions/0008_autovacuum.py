"""PostgreSQL: autovacuum on the task and group tables after 2 % of their rows, not 20 %.

Revision ID: 0008
Revises: 0007

PostgreSQL reuses the space of deleted rows only once a vacuum has run, and
autovacuum waits, by default, for dead rows to pass 20 % of the table. A
cleanup that expires less (a day's results out of a week's) leaves the table
and its indexes to grow by the next results until a later cleanup tips it
over (docs/growth.md, "Churn"). The settings are the dialect's
(``dialects.postgresql.AUTOVACUUM``); settings the tables have already (their
owner's) are kept, and a downgrade resets only those still at our values.
``ALTER TABLE … SET`` takes the lock a ``VACUUM`` takes, so reads and writes
carry on: additive. MySQL/MariaDB and SQLite reuse freed pages without a
vacuum: nothing to do there.
"""

from __future__ import annotations

from alembic import context, op

from celery_sqlresults.dialects import dialect_for

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None
#: Only changes when autovacuum runs; reads and writes are not blocked: safe at start-up.
additive = True


def upgrade() -> None:
    dialect = dialect_for(op.get_context().dialect)
    bind = None if context.is_offline_mode() else op.get_bind()
    for table in context.config.attributes["tables"].growing:
        for statement in dialect.storage_statements(bind, table):
            op.execute(statement)


def downgrade() -> None:
    dialect = dialect_for(op.get_context().dialect)
    bind = None if context.is_offline_mode() else op.get_bind()
    for table in context.config.attributes["tables"].growing:
        for statement in dialect.storage_reset_statements(bind, table):
            op.execute(statement)
