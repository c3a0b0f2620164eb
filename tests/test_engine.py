"""Connections: pooled per process, never shared across fork, reconnected after a drop."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery, states
from celery.exceptions import ImproperlyConfigured

from celery_sqlresults.engine import get_engine

from .conftest import fork_with_lock_held, kill_session, session_id


def test_client_reuses_one_pooled_connection(make_app: Callable[..., Celery]) -> None:
    backend = make_app().backend
    engine = backend.store.engine
    connects: list[object] = []
    sa.event.listen(engine, "connect", lambda dbapi_conn, rec: connects.append(dbapi_conn))
    for i in range(50):
        backend.store_result(f"t{i}", i, states.SUCCESS)
        backend.get_task_meta(f"t{i}", cache=False)
    assert len(connects) <= 1  # Celery's db+ opens one per call outside a worker
    assert backend.store.engine is engine


def test_forked_child_gets_its_own_engine(make_app: Callable[..., Celery]) -> None:
    backend = make_app().backend
    backend.store_result("parent", 1, states.SUCCESS)
    parent_engine = get_engine(backend.settings)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            child_engine = get_engine(backend.settings)
            backend.store_result("child", 2, states.SUCCESS)
            ok = (
                child_engine is not parent_engine and backend.get_task_meta("parent")["result"] == 1
            )
            code = 0 if ok else 2
        finally:
            os.write(w, str(code).encode())
            os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    assert os.read(r, 10) == b"0"
    assert os.waitstatus_to_exitcode(status) == 0
    # the parent's pooled connection still works after the child exited
    assert get_engine(backend.settings) is parent_engine
    assert backend.get_task_meta("child", cache=False)["result"] == 2
    backend.store_result("parent-again", 3, states.SUCCESS)


@pytest.mark.parametrize("db_kind", ["postgresql", "mysql"])
def test_killed_connection_is_replaced_without_losing_the_write(
    make_app: Callable[..., Celery], db_url: str, db_kind: str
) -> None:
    backend = make_app().backend
    backend.store_result("before", 1, states.SUCCESS)
    # Through the store: the hot path's kept connection goes back first, so this is the
    # pool's only connection, the one the next call takes.
    victim = backend.store.run(lambda conn, _: session_id(conn, db_kind), 0)
    kill_session(db_url, db_kind, victim)
    invalidated: list[object] = []
    sa.event.listen(backend.store.engine, "invalidate", lambda *a: invalidated.append(a))
    backend.store_result("after", 2, states.SUCCESS)  # retried on a fresh connection
    assert invalidated, "the dead connection should have been noticed and replaced"
    assert backend.get_task_meta("after")["result"] == 2


@pytest.mark.parametrize("db_kind", ["mysql"])
def test_connection_closed_by_wait_timeout_is_replaced(make_app: Callable[..., Celery]) -> None:
    """MariaDB closes connections idle past ``wait_timeout``; the next call reconnects."""

    def short_idle(engine: sa.Engine) -> None:
        def set_idle(dbapi_conn: Any, _: Any) -> None:
            with dbapi_conn.cursor() as cur:  # this session only: the server is shared
                cur.execute("SET SESSION wait_timeout = 1")

        sa.event.listen(engine, "connect", set_idle)

    backend = make_app(database_engine_callback=short_idle).backend
    backend.store_result("before", 1, states.SUCCESS)
    invalidated: list[object] = []
    sa.event.listen(backend.store.engine, "invalidate", lambda *a: invalidated.append(a))
    time.sleep(2.5)  # the server closes the idle pooled connection
    backend.store_result("after", 2, states.SUCCESS)
    assert invalidated, "the closed connection should have been noticed and replaced"
    time.sleep(2.5)
    assert backend.get_task_meta("after", cache=False)["result"] == 2  # a read, too
    assert len(invalidated) == 2


# ---- sqlresults_durable_commit ------------------------------------------------------------
_COMMIT_SETTING = {
    "postgresql": ("SHOW synchronous_commit", "on", "off"),
    "sqlite": ("PRAGMA synchronous", 2, 1),  # FULL, NORMAL
}


@pytest.mark.parametrize("db_kind", ["postgresql", "sqlite"])
def test_durable_commit_can_be_relaxed_per_session(
    make_app: Callable[..., Celery], db_kind: str
) -> None:
    query, durable, relaxed = _COMMIT_SETTING[db_kind]

    def session_value(app: Celery) -> object:
        backend = app.backend
        backend.store_result("t", 1, "SUCCESS")  # the write works either way
        assert backend.get_task_meta("t", cache=False)["result"] == 1
        return backend.store.run(lambda conn, _: conn.exec_driver_sql(query).scalar(), None)

    assert session_value(make_app()) == durable
    fast = make_app(sqlresults_durable_commit=False)
    assert session_value(fast) == relaxed
    assert session_value(make_app()) == durable  # its own engine: settings never leak


@pytest.mark.parametrize("db_kind", ["mysql"])
def test_durable_commit_off_is_refused_on_mysql(make_app: Callable[..., Celery]) -> None:
    with pytest.raises(ImproperlyConfigured, match="innodb_flush_log_at_trx_commit"):
        make_app(sqlresults_durable_commit=False).backend  # noqa: B018
    with pytest.raises(ImproperlyConfigured, match="True or False"):
        make_app(sqlresults_durable_commit="no").backend  # noqa: B018


def test_forked_child_leaves_the_parents_kept_connection_alone(
    make_app: Callable[..., Celery],
) -> None:
    """The parent's hot-path lease is neither used nor closed by a child, and a lock another
    parent thread held at the fork does not hang the child."""
    from celery_sqlresults import lease

    backend = make_app().backend
    backend.store_result("parent", 1, states.SUCCESS)
    parent_engine = get_engine(backend.settings)
    parent_lease = lease.leased(parent_engine)
    assert parent_lease is not None

    def in_child() -> bool:
        backend.store_result("child", 2, states.SUCCESS)  # takes a lease of its own
        child_engine = get_engine(backend.settings)
        return (
            lease.leased(parent_engine) is None
            and lease.leased(child_engine) is not None
            and backend.get_task_meta("parent", cache=False)["result"] == 1
        )

    assert fork_with_lock_held(lease._leases_lock, in_child) == 0
    assert lease.leased(parent_engine) is parent_lease  # untouched in the parent
    invalidated: list[object] = []
    sa.event.listen(parent_engine, "invalidate", lambda *a: invalidated.append(a))
    assert backend.get_task_meta("child", cache=False)["result"] == 2
    assert not invalidated  # the parent's connection survived the child


# ---- a SQLite file deleted or replaced under the process --------------------------
def _remove_sqlite(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)


def _rows_on_disk(path: str) -> list[str]:
    """Task ids in the file at ``path``, read by a connection of its own."""
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT task_id FROM celery_taskmeta ORDER BY task_id")]
    finally:
        conn.close()


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_replaced_sqlite_file_is_a_new_database(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    path = sa.engine.make_url(db_url).database
    assert path is not None
    make_app().backend.store_result("old", 1, states.SUCCESS)
    _remove_sqlite(path)
    second = make_app().backend  # same path: start-up creation runs against the new file
    assert _rows_on_disk(path) == []
    second.store_result("new", 2, states.SUCCESS)
    assert _rows_on_disk(path) == ["new"]  # on disk, not in the deleted file
    assert second.get_task_meta("old", cache=False)["status"] == states.PENDING


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_running_backend_follows_a_replaced_sqlite_file(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    path = sa.engine.make_url(db_url).database
    assert path is not None
    backend = make_app().backend
    backend.store_result("old", 1, states.SUCCESS)
    _remove_sqlite(path)
    # Celery's db+ makes the new file and writes a result into it.
    dbplus = Celery("dbplus", backend="db+" + db_url, set_as_current=False)
    dbplus.backend.store_result("theirs", 3, states.SUCCESS)
    dbplus.backend.ResultSession().get_bind().dispose()
    assert backend.get_task_meta("theirs", cache=False)["result"] == 3
    assert backend.get_task_meta("old", cache=False)["status"] == states.PENDING
    backend.store_result("ours", 4, states.SUCCESS)
    assert _rows_on_disk(path) == ["ours", "theirs"]


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_deleted_sqlite_file_is_never_read(make_app: Callable[..., Celery], db_url: str) -> None:
    path = sa.engine.make_url(db_url).database
    assert path is not None
    backend = make_app().backend
    backend.store_result("old", 1, states.SUCCESS)
    _remove_sqlite(path)
    assert backend.get_task_meta("old", cache=False)["status"] == states.PENDING
    assert _rows_on_disk(path) == []  # the tables were created in the file there now
