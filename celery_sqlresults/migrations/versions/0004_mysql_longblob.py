"""MySQL/MariaDB: ``LONGBLOB`` for result, args, kwargs, children and stamps.

Revision ID: 0004
Revises: 0003

Celery's ``db+`` declares these columns as SQLAlchemy's ``LargeBinary``,
which MySQL and MariaDB make a ``BLOB``: 64 KB at most, so a bigger result
cannot be stored. Tables we create have had ``LONGBLOB`` since 0001; this
revision converts tables adopted from ``db+``. Changing a column's type
copies the table (``ALGORITHM=COPY``) and blocks writes meanwhile, so on
such tables it is not run at start-up: ``celery -A proj results upgrade``
runs it, ideally in a maintenance window. Where there is nothing to convert
(PostgreSQL's ``bytea`` and SQLite's ``BLOB`` have no such limit, and our own
MySQL tables are ``LONGBLOB`` already) it is a no-op and runs at start-up.

Downgrading keeps ``LONGBLOB``: shrinking the columns could cut stored results.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection

from celery_sqlresults.dialects import dialect_for
from celery_sqlresults.schema import Tables

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_BINARY = {
    "task": ("result", "children", "args", "kwargs", "stamps"),
    "group": ("result",),
}


def additive(conn: Connection, tables: Tables) -> bool:
    """Safe at start-up exactly when there is nothing to convert."""
    return not _to_convert(conn, tables)


def upgrade() -> None:
    tables: Tables = context.config.attributes["tables"]
    if context.is_offline_mode():
        if not dialect_for(op.get_context().dialect).has_narrow_blobs:
            return
        todo = [(getattr(tables, key), c) for key, cols in _BINARY.items() for c in cols]
    else:
        todo = _to_convert(op.get_bind(), tables)
    for table, column in todo:
        op.alter_column(
            table.name,
            column,
            type_=mysql.LONGBLOB(),
            existing_nullable=True,
            schema=table.schema,
        )


def downgrade() -> None:
    pass


def _to_convert(conn: Connection, tables: Tables) -> list[tuple[sa.Table, str]]:
    """The binary columns that are narrower than ``LONGBLOB`` (MySQL/MariaDB only)."""
    if not dialect_for(conn).has_narrow_blobs:
        return []
    insp = sa.inspect(conn)
    out: list[tuple[sa.Table, str]] = []
    for key, columns in _BINARY.items():
        table = getattr(tables, key)
        if not insp.has_table(table.name, schema=table.schema):
            continue
        types = {c["name"]: c["type"] for c in insp.get_columns(table.name, schema=table.schema)}
        out.extend(
            (table, c) for c in columns if c in types and not isinstance(types[c], mysql.LONGBLOB)
        )
    return out
