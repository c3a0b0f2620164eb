"""Alembic environment: online on the connection we hand over, offline to SQL text."""

from __future__ import annotations

from alembic import context

from celery_sqlresults.schema import Tables

config = context.config
tables: Tables = config.attributes["tables"]

# One transaction per revision, so a revision may leave its transaction
# (PostgreSQL's CREATE INDEX CONCURRENTLY) through autocommit_block().
if context.is_offline_mode():
    context.configure(
        url=config.attributes["url"],
        literal_binds=True,
        version_table=tables.version,
        version_table_schema=tables.task.schema,
        transaction_per_migration=True,
    )
else:
    context.configure(
        connection=config.attributes["connection"],
        version_table=tables.version,
        version_table_schema=tables.task.schema,
        transaction_per_migration=True,
    )

with context.begin_transaction():
    context.run_migrations()
