"""The Celery app the end-to-end tests run in a real worker (configured by environment)."""

from __future__ import annotations

import os

from celery import Celery


def make_app(backend: str, broker: str, queue: str) -> Celery:
    # A redis:// backend runs the same canvas on Celery's Redis backend, for comparison.
    backend = backend if backend.startswith("redis://") else "sql+" + backend
    app = Celery("worker_app", broker=broker, backend=backend, set_as_current=False)
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

    @app.task(name="t.nap", shared=False)
    def nap(x: int, y: int, seconds: float) -> int:
        """``t.add`` that takes ``seconds``: keeps every child of a worker busy at once."""
        import time

        time.sleep(seconds)
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

    @app.task(name="t.tracked", track_started=True, shared=False)
    def tracked(x: int, y: int) -> int:
        """``t.add`` with a STARTED state, so its run time is stored."""
        return x + y

    @app.task(name="t.steps", bind=True, track_started=True, shared=False)
    def steps(self, key: str, total: int) -> int:  # type: ignore[no-untyped-def]
        """Report progress ``total`` times, each after the test pushes a token to Redis ``key``."""
        r = _redis(broker)
        for done in range(1, total + 1):
            if r.blpop(key, timeout=60) is None:
                raise TimeoutError(f"no go-ahead for step {done} on {key}")
            self.update_state(state="PROGRESS", meta={"current": done, "total": total})
        if r.blpop(key, timeout=60) is None:
            raise TimeoutError(f"no go-ahead to finish on {key}")
        return total

    @app.task(name="t.grow", bind=True, shared=False)
    def grow(self, x: int, n: int) -> int:  # type: ignore[no-untyped-def]
        """Chord header task adding ``n`` tasks to its chord (``add(x, i)``)."""
        for i in range(1, n + 1):
            self.add_to_chord(add.si(x, i))
        return x

    @app.task(name="t.replace_with_group", bind=True, shared=False)
    def replace_with_group(self, n: int) -> None:  # type: ignore[no-untyped-def]
        """Replaces itself with a group of ``n`` tasks (``add(i, i)``)."""
        from celery import group

        return self.replace(group(add.si(i, i) for i in range(n)))

    @app.task(name="t.on_error_old", shared=False)
    def on_error_old(task_id: str, key: str, label: str) -> None:
        """Old-style errback: called with the failed task's id only."""
        _redis(broker).rpush(key, f"{label} old({'id' if task_id else 'no id'})")

    @app.task(name="t.on_error_new", shared=False)
    def on_error_new(
        request: object, exc: BaseException, traceback: str, key: str, label: str
    ) -> None:
        """New-style errback: records the exception it was given."""
        _redis(broker).rpush(key, f"{label} new({type(exc).__name__}: {exc})")

    @app.task(name="t.mark", shared=False)
    def mark(key: str, label: str) -> None:
        """Immutable errback or callback: records that it ran."""
        _redis(broker).rpush(key, label)

    return app


def _redis(url: str):  # type: ignore[no-untyped-def]
    import redis

    return redis.Redis.from_url(url)


app = make_app(
    os.environ.get("SQLRESULTS_TEST_BACKEND", "sqlite:///worker-results.db"),
    os.environ.get("SQLRESULTS_TEST_BROKER", "redis://127.0.0.1:6379/15"),
    os.environ.get("SQLRESULTS_TEST_QUEUE", "celery"),
)
