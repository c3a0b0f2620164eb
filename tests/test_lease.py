"""The kept connection: one per busy thread, given back whenever the pool's checks matter."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery, states
from celery.result import ResultSet

from celery_sqlresults import lease as lease_mod

from .conftest import (
    kill_session,
    leased,
    session_id,
    task_request,
)

#: The protocol on MariaDB through mysqlclient (MySQLdb) too: the fast path knows both drivers.
ALSO_ON = ["mysqlclient"]


def test_a_busy_thread_keeps_its_connection(
    make_app: Callable[..., Celery], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls in a row share one checked-out connection; idle, it goes back through the pool."""
    backend = make_app(result_extended=True).backend
    backend.store_result("t", 0, states.SUCCESS)
    lease = leased(backend)
    assert lease is not None
    first = lease.pooled.dbapi_connection
    pool = backend.store.engine.pool
    for i in range(5):
        backend.store_result(f"t{i}", i, states.SUCCESS, request=task_request())
        assert backend.get_task_meta(f"t{i}", cache=False)["result"] == i
    assert leased(backend) is lease and lease.pooled.dbapi_connection is first
    assert pool.checkedout() == 1
    monkeypatch.setattr(lease_mod, "IDLE", 0.05)
    time.sleep(0.1)
    assert backend.get_task_meta("t", cache=False)["result"] == 0
    assert lease.pooled is None  # given back; the call took a new lease through the pool
    assert leased(backend) not in (None, lease)
    assert pool.checkedout() == 1


def test_a_busy_connection_is_still_recycled(make_app: Callable[..., Celery]) -> None:
    """A lease goes back through the pool when its connection reaches pool_recycle."""
    backend = make_app(database_engine_options={"pool_recycle": 0.3}).backend
    backend.store_result("t", 1, states.SUCCESS)
    first = leased(backend).pooled.dbapi_connection
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # never idle
        assert backend.get_task_meta("t", cache=False)["result"] == 1
    assert leased(backend).pooled.dbapi_connection is not first


@pytest.mark.parametrize(
    "options",
    [{"pool_size": 1, "max_overflow": 0}, {"pool_pre_ping": True}, {"poolclass": sa.pool.NullPool}],
    ids=["single-connection", "pre-ping", "no-pool"],
)
def test_no_lease_where_the_pool_cannot_spare_it(
    make_app: Callable[..., Celery], options: dict[str, Any]
) -> None:
    """A one-connection pool, pre-ping (which must run on every use), or no pool at all."""
    backend = make_app(database_engine_options=options).backend
    backend.store_result("t", 1, states.SUCCESS)
    assert backend.get_task_meta("t", cache=False)["result"] == 1
    assert leased(backend) is None
    pool = backend.store.engine.pool
    assert not isinstance(pool, sa.pool.QueuePool) or pool.checkedout() == 0


def test_a_thread_never_holds_two_connections(make_app: Callable[..., Celery]) -> None:
    """The store's other statements give the lease back first; two threads share a pool of two."""
    app = make_app(database_engine_options={"pool_size": 2, "max_overflow": 0, "pool_timeout": 5})
    backend = app.backend
    backend.store_result("t", 1, states.SUCCESS)
    assert leased(backend) is not None
    assert len(list(backend.get_many(["t"], timeout=5))) == 1  # a batch read: Store.run
    assert leased(backend) is None and backend.store.engine.pool.checkedout() == 0
    backend.store_result("t", 1, states.SUCCESS)
    with backend.store.connect():  # what start-up, the CLI and the web view use
        assert leased(backend) is None and backend.store.engine.pool.checkedout() == 1
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            for i in range(30):
                tid = f"{name}-{i}"
                backend.store_result(tid, i, states.SUCCESS)
                assert backend.get_task_meta(tid, cache=False)["result"] == i
                if i % 5 == 0:  # another checkout by the lease's thread
                    assert ResultSet([app.AsyncResult(tid)], app=app).join_native(timeout=5)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"
    assert not errors, errors


def test_another_thread_ends_an_idle_lease(
    make_app: Callable[..., Celery], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lease_mod, "IDLE", 0.05)
    backend = make_app().backend
    backend.store_result("t", 1, states.SUCCESS)
    idle = leased(backend)
    assert idle.owner == threading.get_ident()
    time.sleep(0.1)
    owners: list[int] = []

    def other() -> None:
        assert backend.get_task_meta("t", cache=False)["result"] == 1
        owners.append(leased(backend).owner)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(30)
    assert idle.pooled is None and owners == [thread.ident]
    assert backend.store.engine.pool.checkedout() == 1


@pytest.mark.parametrize("db_kind", ["postgresql", "mysql"])
def test_a_killed_leased_connection_is_replaced(
    make_app: Callable[..., Celery], db_url: str, db_kind: str
) -> None:
    """A disconnect on the kept connection: invalidated, the lease ended, the call retried."""
    backend = make_app().backend
    backend.store_result("t", 1, states.SUCCESS)
    lease = leased(backend)
    dbapi = lease.pooled.dbapi_connection
    victim = dbapi.info.backend_pid if db_kind == "postgresql" else dbapi.thread_id()
    invalidated: list[object] = []
    sa.event.listen(backend.store.engine, "invalidate", lambda *a: invalidated.append(a))
    kill_session(db_url, db_kind, victim)
    assert backend.get_task_meta("t", cache=False)["result"] == 1
    assert invalidated and lease.pooled is None
    assert leased(backend).pooled.dbapi_connection is not dbapi


def test_disposing_ends_the_leases(make_app: Callable[..., Celery]) -> None:
    from celery_sqlresults.engine import dispose_all

    backend = make_app().backend
    backend.store_result("t", 1, states.SUCCESS)
    lease, pool = leased(backend), backend.store.engine.pool
    dispose_all()
    assert lease.pooled is None and pool.checkedout() == 0
    assert backend.get_task_meta("t", cache=False)["result"] == 1  # a new engine


@pytest.mark.parametrize("db_kind", ["postgresql", "mysql"])
def test_a_pool_invalidated_elsewhere_ends_a_busy_lease(
    make_app: Callable[..., Celery],
    db_url: str,
    db_kind: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A disconnect seen on another connection invalidates the pool's older connections;
    the busy lease is one of them, and is replaced at its next call."""
    monkeypatch.setattr(lease_mod, "IDLE", 60.0)
    backend = make_app().backend
    backend.store_result("t", 1, states.SUCCESS)
    lease = leased(backend)
    first = lease.pooled.dbapi_connection
    with backend.store.engine.connect() as conn:  # a second connection of the same pool
        kill_session(db_url, db_kind, session_id(conn, db_kind))
        with pytest.raises(sa.exc.DBAPIError):
            conn.exec_driver_sql("SELECT 1")
    assert backend.get_task_meta("t", cache=False)["result"] == 1
    assert lease.pooled is None
    assert leased(backend).pooled.dbapi_connection is not first
