"""The Celery app of the benchmark: the same tasks in the client and in its workers.

Workers load it with ``celery -A bench.app worker``; the backend, broker and
queue come from the environment (see :mod:`bench.config`). The client builds
one app per backend with :func:`make_app`.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from celery.utils import uuid

from . import config
from .ops import driver_rates, store, store_get_rates


def make_app(
    backend: str,
    broker: str = config.BROKER,
    queue: str = "bench",
    record_on_publish: bool = False,
    notify_rows: bool | None = None,
) -> Celery:
    """An app storing results in ``backend`` (a full Celery URL: ``sql+…``, ``db+…``, ``redis://…``).

    ``record_on_publish`` turns on ``sqlresults_record_on_publish``; ``notify_rows``
    sets ``sqlresults_notify_rows`` (``None``: its default, ``"auto"``) (sql+ only).
    """
    app = Celery("bench", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        result_extended=True,
        broker_connection_retry_on_startup=True,
        sqlresults_record_on_publish=record_on_publish,
    )
    if notify_rows is not None:
        app.conf.sqlresults_notify_rows = notify_rows
    if os.environ.get(config.ENV_RELAXED) == "1":  # only the workers of that one figure
        app.conf.sqlresults_durable_commit = False
    _register_tasks(app)
    return app


def _register_tasks(app: Celery) -> None:
    @app.task(name="bench.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="bench.tsum", shared=False)
    def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task(name="bench.store_many", bind=True, shared=False)
    def store_many(self: Any, n: int, warmup: int = 10) -> dict[str, float]:
        """Store ``n`` results from this child; the wall-clock start and end (after a
        warm-up), so that the parent can add up children storing at the same time."""
        backend = self.app.backend
        for i in range(warmup):
            store(backend, f"warm-{uuid()}", i)
        ids = [uuid() for _ in range(n)]
        start = time.time()
        for task_id in ids:
            store(backend, task_id)
        return {"start": start, "end": time.time(), "n": n}

    @app.task(name="bench.measure", bind=True, shared=False)
    def measure(self: Any, n: int, warmup: int = 10, rounds: int = 1) -> dict[str, Any]:
        """Rates of ``n`` store_result and get_task_meta calls on this process's backend."""
        backend = self.app.backend
        runs = [store_get_rates(backend, n, warmup) for _ in range(rounds)]
        out = {"store": [r.store for r in runs], "get": [r.get for r in runs], "pid": os.getpid()}
        if hasattr(backend, "store"):  # sql+: and the same statements on the bare driver
            bare = [driver_rates(backend, n, warmup) for _ in range(rounds)]
            out.update(driver_store=[r.store for r in bare], driver_get=[r.get for r in bare])
        return out


app = make_app(
    os.environ.get(config.ENV_BACKEND, config.REDIS_RESULTS),
    os.environ.get(config.ENV_BROKER, config.BROKER),
    os.environ.get(config.ENV_QUEUE, "bench"),
    notify_rows={"1": True, "0": False}.get(os.environ.get(config.ENV_NOTIFY_ROWS, "")),
)
