"""celery-sqlresults: the SQL result backend for Celery.

Use it with ``result_backend = "sql+<SQLAlchemy URL>"``. The tables are
Celery's own (``db+`` reads what we write and vice versa) and exist as soon
as the backend is constructed.
"""

from __future__ import annotations

from .backend import SQLResultsBackend
from .compat import SessionManager, create_tables
from .exceptions import DatabaseUnavailable, SchemaMissing, SQLResultsError

__all__ = [
    "DatabaseUnavailable",
    "SQLResultsBackend",
    "SQLResultsError",
    "SchemaMissing",
    "SessionManager",
    "create_tables",
]

__version__ = "0.1.0"
