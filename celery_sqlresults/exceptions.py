"""Errors raised by celery-sqlresults.

Configuration mistakes raise :class:`celery.exceptions.ImproperlyConfigured`
(what Celery users see for every other setting); everything else derives from
:class:`SQLResultsError`. Every message names the setting, table or URL
involved and says what to do about it.
"""

from __future__ import annotations

from typing import Any

from celery.exceptions import ImproperlyConfigured
from kombu.exceptions import EncodeError

__all__ = [
    "DatabaseMisconfigured",
    "DatabaseUnavailable",
    "LockTimeout",
    "ResultTooLarge",
    "SQLResultsError",
    "SchemaMissing",
    "one_line",
]

#: Characters of a driver's message kept in a one-line error text.
_KEPT = 300


def one_line(exc: BaseException, url: Any = None) -> str:
    """The driver's message of ``exc`` on one line, cut short, ``url``'s password masked.

    What every log line and error message of this package quotes of an error.
    """
    text = " ".join(str(getattr(exc, "orig", None) or exc).split())
    password = getattr(url, "password", None)
    if password:
        text = text.replace(str(password), "***")
    return text if len(text) <= _KEPT else text[: _KEPT - 1] + "…"


class SQLResultsError(Exception):
    """Base class of this package's runtime errors."""


class DatabaseUnavailable(SQLResultsError):
    """The result database could not be reached within the start-up bound."""


class DatabaseMisconfigured(SQLResultsError, ImproperlyConfigured):
    """The database refused us for a reason waiting cannot fix: raised at once, not retried.

    An unknown database, user or host, a wrong password or no right to connect:
    the message names the setting to fix (``result_backend``).
    """


class SchemaMissing(SQLResultsError):
    """Result tables are missing and this process may not (or could not) create them."""


class LockTimeout(SQLResultsError):
    """Another session held a lock longer than ``sqlresults_lock_timeout``, on every retry."""


class ResultTooLarge(SQLResultsError, EncodeError):
    """A value is larger than its column (or the server's packet limit) can hold.

    An :class:`~kombu.exceptions.EncodeError`, so a worker records the task
    as FAILURE with this message, exactly as for a value the serializer
    cannot encode, and carries on. ``columns`` names the columns at fault.
    """

    def __init__(self, message: str, columns: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.columns = columns

    def __reduce__(self) -> tuple[type, tuple[str, tuple[str, ...]]]:
        return (type(self), (str(self), self.columns))
