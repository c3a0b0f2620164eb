"""Retrying the database: transient errors for a bounded time, permanent ones never.

Celery bounds its backends' retries by count, with full-jitter backoff, so
how long a write keeps trying varies from run to run: a database restart of
a few seconds can outlast ten quick retries. Here a transient error (a
refused or dropped connection, a deadlock, a lock timeout) is retried with
Celery's backoff for up to ``sqlresults_retry_timeout`` seconds; an error
that waiting cannot fix (an unknown database, user or host, a refused
login) is raised at once; and every message names the operation in words.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.backends.base import BaseBackend
from celery.utils.time import get_exponential_backoff_interval
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from .exceptions import DatabaseMisconfigured, LockTimeout, one_line
from .settings import Settings
from .store import Store

__all__ = ["RetryMixin"]

logger = logging.getLogger("celery_sqlresults")


class RetryMixin(BaseBackend):
    """Celery's ``_ensure_retryable`` hook, bounded in time, for a backend with a store."""

    settings: Settings
    store: Store

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        """Disconnects, refused connections, deadlocks and lock timeouts: worth another try.

        Not errors that waiting cannot fix (an unknown database, user or host, a
        refused login): those are raised at once.
        """
        if self.store.dialect.permanent_error_fix(exc) is not None:
            return False
        if isinstance(exc, (OperationalError, InterfaceError)):
            return True
        return isinstance(exc, DBAPIError) and exc.connection_invalidated

    def _ensure_retryable(
        self,
        func: Any,
        *args: Any,
        fallback_exc: Any = None,
        fallback_msg: str | None = None,
        max_retries: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``func`` with Celery's retry policy, bounded in time as well.

        Transient errors are retried with Celery's backoff
        (``result_backend_base_sleep_between_retries_ms`` up to
        ``result_backend_max_sleep_between_retries_ms``) for up to
        ``sqlresults_retry_timeout`` seconds from the first failure, and at
        most ``result_backend_max_retries`` times if that is set. Giving up
        raises an error naming the operation, the masked URL and both bounds.
        """
        limit = self.max_retries if max_retries is None else max_retries
        bound = self.settings.retry_timeout
        started: float | None = None
        retries = 0
        while True:
            try:
                return func(*args, **kwargs)
            except Exception as exc:
                fix = self.store.dialect.permanent_error_fix(exc)
                if fix is not None:
                    reason = one_line(exc, self.settings.url)
                    raise DatabaseMisconfigured(
                        f"{_operation(func, fallback_exc)} failed: the result database "
                        f"{self.settings.masked_url} refused the connection: {reason}. "
                        f"Waiting will not fix this: {fix}."
                    ) from None
                now = time.monotonic()
                started = now if started is None else started
                retryable = self.always_retry and self.exception_safe_to_retry(exc)
                left = (started + bound - now) if bound else float("inf")
                if not retryable or retries >= limit or left <= 0:
                    self._give_up(exc, func, retries, now - started, retryable, fallback_exc)
                    raise
                retries += 1
                pause = min(
                    left,
                    get_exponential_backoff_interval(
                        self.base_sleep_between_retries_ms,
                        retries,
                        self.max_sleep_between_retries_ms,
                        True,
                    )
                    / 1000,
                )
                logger.warning(
                    "celery-sqlresults: %s failed at %s (%s); retry %d in %.2fs",
                    _operation(func, fallback_exc),
                    self.settings.masked_url,
                    one_line(exc, self.settings.url),
                    retries,
                    pause,
                )
                hook = getattr(self, "on_backend_retryable_error", None)  # Celery >= 5.6
                if hook is not None:
                    try:
                        hook(exc)
                    except Exception:
                        logger.exception("celery-sqlresults: on_backend_retryable_error failed")
                self._sleep(pause)

    def _give_up(
        self,
        exc: Exception,
        func: Any,
        retries: int,
        elapsed: float,
        retried: bool,
        fallback_exc: Any,
    ) -> None:
        """Raise the error a caller sees once retrying is over (returns: re-raise ``exc``)."""
        lock = self.store.dialect.is_lock_timeout(exc)
        if not (lock or (retried and fallback_exc is not None)):
            return
        reason = one_line(exc, self.settings.url)
        message = f"{_operation(func, fallback_exc)} failed at {self.settings.masked_url}: {reason}"
        if lock:
            message += (
                f". Another session held a lock longer than sqlresults_lock_timeout="
                f"{self.settings.lock_timeout:g}s (a migration, a long transaction?)"
            )
        if retried:
            message += (
                f". Still failing after {retries} retr{'y' if retries == 1 else 'ies'} in "
                f"{elapsed:.1f}s (sqlresults_retry_timeout={self.settings.retry_timeout:g}s, "
                f"result_backend_max_retries={self.max_retries:g}): check that the database "
                "is up and reachable; to ride out longer outages, raise "
                "sqlresults_retry_timeout"
            )
        raise (fallback_exc or LockTimeout)(message) from exc


#: What each retried operation does, for messages (by the function's name).
_OPERATIONS = {
    "_store_result": "storing the result of task {task_id}",
    "_get_task_meta_for": "reading the state of task {task_id}",
    "_forget": "forgetting a task result",
    "_save_group": "saving a group result",
    "_restore_group": "reading a group result",
    "_delete_group": "deleting a group result",
    "get_ready": "reading task results",
    "task_exists": "looking up a task result",
    "chord_start": "starting a chord",
    "chord_set_size": "setting a chord's size",
    "chord_part_done": "counting a finished chord part",
    "chord_add": "adding a task to a chord",
    "chord_parts": "reading a chord's counted parts",
    "chord_delete": "removing a finished chord's counter",
    "cleanup": "deleting expired results",
}


def _operation(func: Any, fallback_exc: Any) -> str:
    """What ``func`` was doing, as a sentence's start: "Reading the state of task …"."""
    name = getattr(func, "__name__", "")
    task_id = getattr(fallback_exc, "keywords", {}).get("task_id")
    text = _OPERATIONS.get(name, "a result backend operation")
    if task_id is None:
        text = text.replace(" of task {task_id}", " of a task")
    text = text.format(task_id=task_id)
    return text[:1].upper() + text[1:]  # not capitalize(): it would lower the task id
