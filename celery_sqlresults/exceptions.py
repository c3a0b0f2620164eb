"""Errors raised by celery-sqlresults.

Configuration mistakes raise :class:`celery.exceptions.ImproperlyConfigured`
(what Celery users see for every other setting); everything else derives from
:class:`SQLResultsError`. Every message names the setting, table or URL
involved and says what to do about it.
"""

from __future__ import annotations

__all__ = ["DatabaseUnavailable", "SQLResultsError", "SchemaMissing"]


class SQLResultsError(Exception):
    """Base class of this package's runtime errors."""


class DatabaseUnavailable(SQLResultsError):
    """The result database could not be reached within the start-up bound."""


class SchemaMissing(SQLResultsError):
    """Result tables are missing and this process may not (or could not) create them."""
