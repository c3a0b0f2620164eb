"""Figure 7: what constructing each SQL backend costs, on an empty and on a ready database.

Measured in this process, each time as a new process would start: the
schema-ready memo of ``celery_sqlresults`` cleared and every engine closed
(imports are not counted). Two numbers per run: the backend's constructor
(``sql+`` creates or checks its tables there; Celery 5.5+ ``db+`` does too,
``database_create_tables_at_setup`` being on by default) and constructor plus
the first ``get_task_meta`` call.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.backends.database import DatabaseBackend
from celery.utils import uuid

from celery_sqlresults import engine as sqlresults_engine
from celery_sqlresults import startup as sqlresults_startup
from celery_sqlresults.backend import SQLResultsBackend

from .databases import empty_database

Factory = Callable[[Celery, str], Any]


def _build_sql(app: Celery, url: str) -> Any:
    return SQLResultsBackend(app=app, url=url)


def _build_db(app: Celery, url: str) -> Any:
    return DatabaseBackend(app=app, url=url)


FACTORIES: dict[str, Factory] = {"sql": _build_sql, "db": _build_db}


def _fresh_process_state() -> None:
    sqlresults_startup._ready.clear()
    sqlresults_engine.dispose_all()


def _one(factory: Factory, url: str) -> tuple[float, float]:
    """Milliseconds to construct, and to construct plus one ``get_task_meta``."""
    app = Celery("bench-startup", set_as_current=False)
    app.conf.result_extended = True
    _fresh_process_state()
    start = time.perf_counter()
    backend = factory(app, url)
    built = time.perf_counter()
    backend.get_task_meta(uuid(), cache=False)
    done = time.perf_counter()
    return (built - start) * 1000, (done - start) * 1000


def startup_figures(backend: str, url: str, repeats: int) -> dict[str, float]:
    """Median startup costs of ``backend`` ("sql" or "db") against ``url`` (no prefix)."""
    factory = FACTORIES[backend]
    empty: list[tuple[float, float]] = []
    ready: list[tuple[float, float]] = []
    try:
        for _ in range(repeats):
            empty_database(url)
            empty.append(_one(factory, url))
        for _ in range(repeats):
            ready.append(_one(factory, url))
    finally:
        _fresh_process_state()
    return {
        "startup_empty": statistics.median(b for b, _ in empty),
        "startup_empty_first": statistics.median(f for _, f in empty),
        "startup_ready": statistics.median(b for b, _ in ready),
        "startup_ready_first": statistics.median(f for _, f in ready),
    }
