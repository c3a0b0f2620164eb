"""Failover of a pg_auto_failover formation under a real worker: nothing lost, nothing stuck.

The app's URL names both nodes with ``target_session_attrs=read-write``; the
formation's standby is synchronous, so every commit the worker saw is on the
standby before the primary confirmed it (docs/scaling.md).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from celery import Celery, chord
from celery.exceptions import ImproperlyConfigured

from celery_sqlresults import ResultQuery
from celery_sqlresults.exceptions import DatabaseMisconfigured

from .conftest import REDIS_URL, Worker, client_app

pytestmark = [pytest.mark.pgcluster, pytest.mark.worker]


def _app(url: str) -> Celery:
    return Celery("formation", backend="sql+" + url, set_as_current=False)


def _stored(url: str) -> int:
    eng = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with eng.connect() as conn:
            return int(
                conn.exec_driver_sql(
                    "SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'"
                ).scalar_one()
            )
    finally:
        eng.dispose()


def test_failover_mid_burst_loses_nothing(
    pg_formation: Any, formation_url: str, worker_factory: Callable[..., Worker]
) -> None:
    assert pg_formation.sync_standby_names().startswith("ANY 1"), "the standby must be sync"
    old_primary = pg_formation.primary_port()
    worker = worker_factory(formation_url, concurrency=2)
    app = client_app(formation_url, worker.queue)
    add, tsum, collect = app.tasks["t.add"], app.tasks["t.tsum"], app.tasks["t.collect"]
    assert add.delay(1, 1).get(timeout=30) == 2
    app.backend.wait_for(add.delay(0, 0).id, timeout=30)  # the listener is up on the primary

    # Waiting across the failover: tasks that run only after it, waited for from before.
    later = [add.apply_async((i, 1000), countdown=6) for i in range(10)]
    waiting = ThreadPoolExecutor(len(later))
    waits = [waiting.submit(r.get, timeout=120) for r in later]
    # A chord whose header straddles the failover; its body counts its runs in Redis.
    runs = f"runs-{uuid.uuid4().hex}"
    header = [add.s(i, 1) for i in range(5)] + [add.s(i, 1).set(countdown=6) for i in range(5, 10)]
    body = chord(header)(collect.s(key=runs))

    # A steady stream of stores from before the failover until after it.
    sent: list[Any] = []
    stop = threading.Event()

    def send() -> None:
        i = 0
        while not stop.is_set():
            sent.append(add.delay(i, i))
            i += 1
            time.sleep(0.005)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        time.sleep(1)
        pg_formation.failover()
        time.sleep(1)
    finally:
        stop.set()
        sender.join(30)
    assert pg_formation.primary_port() != old_primary

    values = [r.get(timeout=120) for r in sent]
    assert values == [i + i for i in range(len(sent))], "every store landed, in its own row"
    assert [w.result(timeout=120) for w in waits] == [i + 1000 for i in range(10)]
    assert body.get(timeout=120) == [i + 1 for i in range(10)]
    assert tsum.delay([1, 2]).get(timeout=30) == 3  # the new primary serves new work
    waiting.shutdown()

    new_primary = pg_formation.node_url(pg_formation.primary_port())
    assert _stored(new_primary) == len(sent) + len(later) + 10 + 4  # + body, tsum, 2 first
    assert int(redis.Redis.from_url(REDIS_URL).get(runs) or 0) == 1, "chord body ran once"
    log = worker.output()
    # The worker's stores met the gap and were retried onto the new primary.
    assert "celery-sqlresults: " in log and "; retry 1 in" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_a_url_reaching_only_the_standby_reads_and_refuses_writes_by_name(
    pg_formation: Any, formation_url: str
) -> None:
    primary = _app(formation_url)
    primary.backend.store_result("on-primary", 5, "SUCCESS")
    standby_port = next(p for p, s in pg_formation.states().items() if s == "secondary")
    standby = _app(pg_formation.node_url(standby_port))
    deadline = time.monotonic() + 30
    while standby.backend.get_task_meta("on-primary")["status"] != "SUCCESS":
        assert time.monotonic() < deadline, "the row never reached the standby"
        time.sleep(0.1)
    assert standby.backend.get_task_meta("on-primary")["result"] == 5  # reading works
    with pytest.raises(DatabaseMisconfigured, match="target_session_attrs=read-write"):
        standby.backend.store_result("on-standby", 1, "SUCCESS")


def test_queries_read_the_replica_while_waiters_read_the_primary(
    pg_formation: Any, formation_url: str
) -> None:
    standby_port = next(p for p, s in pg_formation.states().items() if s == "secondary")
    standby = pg_formation.node_url(standby_port)
    app = _app(formation_url)
    app.conf.sqlresults_read_url = standby
    query = ResultQuery(app)
    app.backend.store_result("first", 1, "SUCCESS")
    deadline = time.monotonic() + 30
    while query.get("first") is None:  # replayed on the replica
        assert time.monotonic() < deadline, "never replayed on the replica"
        time.sleep(0.1)
    paused = sa.create_engine(standby, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with paused.connect() as conn:
        conn.exec_driver_sql("SELECT pg_wal_replay_pause()")
        try:
            app.backend.store_result("second", 2, "SUCCESS")  # committed on the primary
            # A lagging replica: the query does not see it yet, a waiter does.
            assert query.get("second") is None
            assert query.count() == 1
            assert app.AsyncResult("second").get(timeout=10) == 2
            assert query.forget("first") == 1  # writes go to the primary
        finally:
            conn.exec_driver_sql("SELECT pg_wal_replay_resume()")
    paused.dispose()
    while query.get("second") is None or query.get("first") is not None:
        assert time.monotonic() < deadline + 30, "the replica never caught up"
        time.sleep(0.1)


def test_a_read_url_of_another_database_is_refused(formation_url: str) -> None:
    app = _app(formation_url)
    app.conf.sqlresults_read_url = "mysql+pymysql://u@h/db"
    with pytest.raises(ImproperlyConfigured, match="sqlresults_read_url must be a URL"):
        ResultQuery(app)


def test_a_crash_of_the_primary_loses_no_acknowledged_store(
    pg_formation: Any, formation_url: str
) -> None:
    """SIGKILL of the primary's keeper and server: what a store returned from is on the
    promoted standby (synchronous replication). Last here: it restarts the dead node."""
    pg_formation.quick_monitor()
    backend = _app(formation_url).backend
    backend.store_result("before", 1, "SUCCESS")
    acked: list[str] = []
    stop = threading.Event()

    def write() -> None:
        while not stop.is_set():
            task_id = uuid.uuid4().hex
            backend.store_result(task_id, task_id, "SUCCESS")
            acked.append(task_id)

    writer = threading.Thread(target=write)
    writer.start()
    dead = pg_formation.primary_port()
    try:
        time.sleep(1)
        survivor = pg_formation.crash_primary()
        time.sleep(0.5)
    finally:
        stop.set()
        writer.join(120)
    eng = sa.create_engine(pg_formation.node_url(survivor), poolclass=sa.pool.NullPool)
    with eng.connect() as conn:
        found = set(conn.exec_driver_sql("SELECT task_id FROM celery_taskmeta").scalars())
    eng.dispose()
    assert acked and not set(acked) - found, f"{len(set(acked) - found)} acknowledged lost"
    pg_formation.restart_node(dead)
