"""celery-sqlresults: the SQL result backend for Celery.

Use it with ``result_backend = "sql+<SQLAlchemy URL>"``. The tables are
Celery's own (``db+`` reads what we write and vice versa) and exist as soon
as the backend is constructed.
"""

from __future__ import annotations

from . import hooks as _hooks  # noqa: F401  (connects the worker and beat start-up hooks)
from .aio import aget, as_completed
from .backend import SQLResultsBackend
from .compat import SessionManager, create_tables
from .exceptions import (
    DatabaseMisconfigured,
    DatabaseUnavailable,
    SchemaMissing,
    SQLResultsError,
)
from .query import ResultQuery, TaskRecord, Undecodable, parse_when

__all__ = [
    "DatabaseMisconfigured",
    "DatabaseUnavailable",
    "ResultQuery",
    "SQLResultsBackend",
    "SQLResultsError",
    "SchemaMissing",
    "SessionManager",
    "TaskRecord",
    "Undecodable",
    "aget",
    "as_completed",
    "create_tables",
    "parse_when",
]

__version__ = "0.1.0"
