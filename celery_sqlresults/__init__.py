"""celery-sqlresults: the SQL result backend for Celery.

Use it with ``result_backend = "sql+<SQLAlchemy URL>"``. The tables are
Celery's own (``db+`` reads what we write and vice versa) and exist as soon
as the backend is constructed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import hooks as _hooks  # noqa: F401  (connects the worker and beat start-up hooks)
from .aio import aget, as_completed
from .backend import SQLResultsBackend
from .exceptions import (
    DatabaseMisconfigured,
    DatabaseUnavailable,
    SchemaMissing,
    SQLResultsError,
)

if TYPE_CHECKING:
    from .compat import SessionManager, create_tables
    from .query import ResultQuery, TaskRecord, Undecodable, parse_when

#: Names imported on first use: the backend's path needs neither the ``db+``
#: look-alikes (they import SQLAlchemy's ORM) nor the query layer, and every
#: short-lived process would pay for their imports.
_LAZY = {
    "SessionManager": "compat",
    "create_tables": "compat",
    "ResultQuery": "query",
    "TaskRecord": "query",
    "Undecodable": "query",
    "parse_when": "query",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


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
