"""The Celery app the end-to-end tests run in a real worker (configured by environment)."""

from __future__ import annotations

import os

from celery import Celery


def make_app(backend: str, broker: str, queue: str) -> Celery:
    app = Celery("worker_app", broker=broker, backend="sql+" + backend, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        result_extended=True,
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=4,
        sqlresults_startup_timeout=float(os.environ.get("SQLRESULTS_TEST_STARTUP_TIMEOUT", "60")),
        database_create_tables_on_startup=os.environ.get("SQLRESULTS_TEST_CREATE", "1") == "1",
        sqlresults_retry_timeout=float(os.environ.get("SQLRESULTS_TEST_RETRY_TIMEOUT", "60")),
        sqlresults_pooler=os.environ.get("SQLRESULTS_TEST_POOLER") or None,
    )

    @app.task(name="t.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="t.fail", shared=False)
    def fail(msg: str) -> None:
        raise ValueError(msg)

    @app.task(name="t.big", shared=False)
    def big(n: int) -> str:
        return "x" * n

    @app.task(name="t.unencodable", shared=False)
    def unencodable() -> object:
        return object()  # JSON cannot encode it

    @app.task(name="t.tsum", shared=False)
    def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task(name="t.spawn", bind=True, shared=False)
    def spawn(self, n: int) -> str:  # type: ignore[no-untyped-def]
        return add.delay(n, n).id

    @app.task(name="t.collect", shared=False)
    def collect(values: list[int], key: str) -> list[int]:
        """Chord body: counts its own calls in Redis so tests can prove 'exactly once'."""
        _redis(broker).incr(key)
        return values

    @app.task(name="t.on_error", shared=False)
    def on_error(request: object, exc: BaseException, traceback: str, key: str) -> None:
        _redis(broker).rpush(key, f"{type(exc).__name__}: {exc}")

    return app


def _redis(url: str):  # type: ignore[no-untyped-def]
    import redis

    return redis.Redis.from_url(url)


app = make_app(
    os.environ.get("SQLRESULTS_TEST_BACKEND", "sqlite:///worker-results.db"),
    os.environ.get("SQLRESULTS_TEST_BROKER", "redis://127.0.0.1:6379/15"),
    os.environ.get("SQLRESULTS_TEST_QUEUE", "celery"),
)
