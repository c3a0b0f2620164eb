"""Behind PgBouncer in transaction pooling mode: ``sqlresults_pooler = "transaction"``.

PgBouncer (tests/clusters.py) stands in front of the shared PostgreSQL server;
each statement may run on another server session, so nothing may rely on one
(prepared statements, session settings and locks, ``LISTEN``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from celery.exceptions import ImproperlyConfigured
from celery.exceptions import TimeoutError as WaitTimeout
from celery.result import AsyncResult
from sqlalchemy.engine import make_url

from celery_sqlresults import aget, dialects
from celery_sqlresults.aiowait import AsyncListener, AsyncPoller, async_waiter_for
from celery_sqlresults.dialects.postgresql import SCHEMA_LOCK_KEY
from celery_sqlresults.settings import Settings
from celery_sqlresults.wait import Listener, Poller

from .conftest import (
    FLEET_POOL,
    REDIS_URL,
    ROOT,
    Worker,
    client_app,
    listening,
    raw_engine,
    reset_database,
)
from .fleet import run_fleet

pytestmark = pytest.mark.pgcluster

POOLED = {"sqlresults_pooler": "transaction"}


def _app(url: str, **conf: Any) -> Celery:
    app = Celery("pooled", backend="sql+" + url, set_as_current=False)
    app.conf.update(conf)
    return app


def _settings(url: str, **conf: Any) -> Settings:
    return Settings.from_app(_app(url, **conf), url)


@pytest.fixture
def direct_url(tmp_path: Path) -> str:
    """An empty database on the shared server, reached directly."""
    return reset_database("postgresql", tmp_path)


@pytest.fixture
def pooled_url(pg_bouncer: Any, direct_url: str) -> str:
    """The same database through PgBouncer."""
    url = make_url(direct_url).set(host="127.0.0.1", port=pg_bouncer.port)
    return url.render_as_string(hide_password=False)


# ---- the setting ----------------------------------------------------------
@pytest.mark.parametrize("bad", ["transactions", "statement", 1, True])
def test_a_bad_pooler_value_is_refused_by_name(bad: object) -> None:
    with pytest.raises(ImproperlyConfigured, match=r"sqlresults_pooler must be None or"):
        _settings("postgresql+psycopg://u@h/db", sqlresults_pooler=bad)


def test_the_pooler_setting_is_for_postgresql_only(tmp_path: Path) -> None:
    with pytest.raises(ImproperlyConfigured, match="is for PostgreSQL behind PgBouncer"):
        _settings(f"sqlite:///{tmp_path / 'r.db'}", **POOLED)


def test_a_listen_url_of_another_database_is_refused() -> None:
    with pytest.raises(ImproperlyConfigured, match="sqlresults_listen_url must be a URL"):
        _settings("postgresql+psycopg://u@h/db", **POOLED, sqlresults_listen_url="mysql://u@h/db")


def test_relaxed_commits_behind_a_pooler_are_refused_with_the_server_side_fix() -> None:
    with pytest.raises(ImproperlyConfigured, match="ALTER ROLE"):
        _settings("postgresql+psycopg://u@h/db", **POOLED, sqlresults_durable_commit=False)


def test_the_pooled_variant_prepares_nothing_and_sets_no_session_state() -> None:
    pooled = dialects.PostgreSQL().behind_pooler()
    assert isinstance(pooled, dialects.TransactionPooled)
    assert pooled.connect_args() == {"prepare_threshold": None}
    url = make_url("postgresql+psycopg://u@h/db")
    assert pooled.session_statements(url, 30, True) == []
    assert dialects.PostgreSQL().session_statements(url, 30, True)  # direct: SET lock_timeout
    assert dialects.SQLite().behind_pooler() is None


# ---- through PgBouncer ------------------------------------------------------
_RACER = textwrap.dedent(
    """
    import sys, time
    from celery import Celery
    url, start, n = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    app = Celery("racer", backend="sql+" + url, set_as_current=False)
    app.conf.sqlresults_pooler = "transaction"
    while time.time() < start:
        time.sleep(0.001)
    backend = app.backend
    for i in range(20):
        backend.store_result(f"task-{n}-{i}", i, "SUCCESS")
        assert backend.get_task_meta(f"task-{n}-{i}")["result"] == i
    print("ok", n)
    """
)


def test_eight_processes_start_at_once_through_pgbouncer(
    pooled_url: str, direct_url: str, tmp_path: Path
) -> None:
    script = tmp_path / "racer.py"
    script.write_text(_RACER)
    start = time.time() + 3  # every process imports first, then all go together
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), pooled_url, str(start), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            text=True,
        )
        for i in range(8)
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "ok" in out
        for bad in ("already exists", "Duplicate", "eadlock", "Traceback", "schema not checked"):
            assert bad not in err, err
    eng = raw_engine(direct_url)
    with eng.connect() as conn:
        stored = conn.exec_driver_sql("SELECT count(*) FROM celery_taskmeta").scalar_one()
        # No server session kept the schema lock: it went with its transaction.
        held = conn.execute(
            sa.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = :k"),
            {"k": SCHEMA_LOCK_KEY},
        ).scalar_one()
        version = conn.exec_driver_sql("SELECT version_num FROM celery_sqlresults_version").all()
    eng.dispose()
    assert (stored, held, len(version)) == (8 * 20, 0, 1)


def test_without_a_listen_url_waiters_poll_and_warn_at_their_first_wait(
    pooled_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A process that never waits (a worker's parent) says nothing; one that waits, once."""

    def warnings() -> int:
        return sum("sqlresults_listen_url" in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.WARNING, "celery_sqlresults"):
        first, second = _app(pooled_url, **POOLED), _app(pooled_url, **POOLED)
        assert isinstance(first.backend._waiter, Poller) and isinstance(
            second.backend._waiter, Poller
        )
        assert first.backend._waiter.notifies, "writes still notify, for those who can listen"
        first.backend.store_result("t1", 7, "SUCCESS")
        assert first.backend.get_task_meta("t1")["result"] == 7
        assert warnings() == 0, "nothing waited yet"
        for _ in range(2):
            with pytest.raises(WaitTimeout):
                first.backend.wait_for("never-stored", timeout=0.05, interval=0.01)
        assert warnings() == 1, "one warning, at the first wait"
        assert first.backend.wait_for("t1", timeout=5)["result"] == 7
        with pytest.raises(WaitTimeout):
            second.backend.wait_for("never-stored", timeout=0.05, interval=0.01)
        assert warnings() == 2, "each backend warns at its own first wait"


@pytest.mark.worker
def test_a_worker_through_pgbouncer_and_get_woken_by_the_direct_listener(
    pooled_url: str, direct_url: str, worker_factory: Callable[..., Worker]
) -> None:
    worker = worker_factory(pooled_url, SQLRESULTS_TEST_POOLER="transaction")
    app = client_app(pooled_url, worker.queue, **POOLED, sqlresults_listen_url=direct_url)
    add = app.tasks["t.add"]
    assert [add.delay(i, i).get(timeout=30) for i in range(20)] == [i + i for i in range(20)]

    listener = listening(app)
    assert isinstance(listener, Listener)
    # Listening, a waiter wakes only by a notification or after the interval: an
    # interval longer than the timeout makes a missing notification a TimeoutError.
    later = add.apply_async((20, 22), countdown=1)
    assert later.get(timeout=20, interval=60) == 42
    assert "Traceback" not in worker.output()


def test_awaits_poll_behind_the_pooler_and_listen_on_the_listen_url(
    pooled_url: str, direct_url: str
) -> None:
    """``aget()`` follows the same rule as ``.get()``: no LISTEN through the pooler."""
    deaf = _app(pooled_url, **POOLED)
    heard = _app(pooled_url, **POOLED, sqlresults_listen_url=direct_url)

    async def run() -> tuple[object, object, int]:
        kinds = async_waiter_for(deaf.backend.store), async_waiter_for(heard.backend.store)
        pending = asyncio.ensure_future(aget(AsyncResult("a1", app=heard), timeout=20))
        await asyncio.sleep(0.5)
        await asyncio.to_thread(heard.backend.store_result, "a1", 5, "SUCCESS")
        return (*kinds, await pending)

    deaf_waiter, heard_waiter, value = asyncio.run(run())
    assert isinstance(deaf_waiter, AsyncPoller)
    assert isinstance(heard_waiter, AsyncListener)
    assert value == 5


# ---- a fleet of workers through a small pool (tests/fleet.py) ----------------------
@pytest.mark.worker
def test_sixteen_worker_processes_start_at_once_through_a_pool_of_four(
    fleet_bouncer: Any, direct_url: str, tmp_path: Path
) -> None:
    """Issue #23's scale proof, small: 4 prefork workers x 4 on an empty database, all
    started before any is ready, through a server pool of four."""
    pooled = make_url(direct_url).set(host="127.0.0.1", port=fleet_bouncer.port)
    out = run_fleet(
        pooled.render_as_string(hide_password=False),
        direct_url,
        REDIS_URL,
        workers=4,
        concurrency=4,
        tasks=160,
        log_dir=tmp_path / "fleet",
        ready_timeout=120,
        join_timeout=120,
        nap=0.25,  # longer than sending takes: every child gets tasks, all at once
    )
    assert (out.exited, out.startup_errors, out.run_errors) == ([], [], [])
    assert (out.lost, out.failed) == (0, 0)
    assert out.creators == 1  # the others found the schema made, under the lock
    assert out.children == 16  # every process stored through the pool
    seen = out.activity
    assert seen.samples > 0
    # The server sees the pool's sessions and the client's direct LISTEN; others are
    # this test process's own (a listener an earlier test left; not the sampler).
    assert 0 < seen.pooled <= FLEET_POOL, seen
    assert seen.listeners <= 1, seen
