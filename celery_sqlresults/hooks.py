"""Worker and beat start-up: the schema is made sure of before the first task.

Connected when the package is imported (the ``sql`` backend alias imports
it), so every worker and beat whose app uses this backend checks the schema
once logging is set up and before its pool or scheduler starts.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals
from sqlalchemy.exc import DBAPIError

from .backend import SQLResultsBackend
from .exceptions import SQLResultsError, one_line
from .startup import ensure_schema

__all__: list[str] = []

logger = logging.getLogger("celery_sqlresults")


def _ensure_for_app(app: Any, process: str) -> None:
    """Create the schema for a starting worker/beat, or stop that process with a clear error.

    Celery's signal dispatch logs and swallows exceptions, so a failure here
    would let the worker consume tasks it cannot store; ``SystemExit`` is not
    swallowed and makes the worker (or beat) exit with status 1.
    """
    backend = app.backend
    if not isinstance(backend, SQLResultsBackend) or not backend.settings.create_tables_on_startup:
        return
    try:
        ensure_schema(backend.store)
    except (SQLResultsError, DBAPIError) as exc:
        reason = (
            str(exc) if isinstance(exc, SQLResultsError) else one_line(exc, backend.settings.url)
        )
        logger.critical("celery-sqlresults: %s cannot start: %s", process, reason)
        raise SystemExit(1) from exc
    logger.info(
        "celery-sqlresults: result schema ready (%s) at %s",
        ", ".join(t.fullname for t in backend.store.tables.all),
        backend.settings.masked_url,
    )


@signals.celeryd_after_setup.connect(weak=False)
def _on_worker_setup(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """Worker: logging is configured and neither the pool nor the consumer has started."""
    if instance is not None:
        _ensure_for_app(instance.app, "worker")


@signals.beat_init.connect(weak=False)
def _on_beat_init(sender: Any = None, **_: Any) -> None:
    if sender is not None:
        _ensure_for_app(sender.app, "beat")
