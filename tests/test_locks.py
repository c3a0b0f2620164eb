"""Locks held by someone else: writes wait up to ``sqlresults_lock_timeout``, reads never wait."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery, states
from celery.exceptions import BackendStoreError

from celery_sqlresults.exceptions import LockTimeout

from .conftest import raw_engine


@contextlib.contextmanager
def row_locked(db_url: str, db_kind: str, task_id: str) -> Iterator[Callable[[], None]]:
    """Another session writes ``task_id``'s row and keeps its transaction open.

    Yields ``release()``, which rolls that transaction back.
    """
    eng = raw_engine(db_url)
    conn = eng.connect()
    if db_kind == "sqlite":
        # SQLite locks the whole database for writing, not a row.
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    conn.execute(
        sa.text("UPDATE celery_taskmeta SET status = 'BLOCKER' WHERE task_id = :t"), {"t": task_id}
    )
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            if db_kind == "sqlite":
                conn.exec_driver_sql("ROLLBACK")
            else:
                conn.rollback()

    try:
        yield release
    finally:
        release()
        conn.close()
        eng.dispose()


@contextlib.contextmanager
def table_locked(db_url: str, db_kind: str) -> Iterator[None]:
    """A migration-like table lock that lets readers in and keeps writers out."""
    eng = raw_engine(db_url)
    conn = eng.connect()
    if db_kind == "postgresql":
        conn.exec_driver_sql("LOCK TABLE celery_taskmeta IN EXCLUSIVE MODE")
    else:
        conn.exec_driver_sql("LOCK TABLES celery_taskmeta READ")
    try:
        yield
    finally:
        if db_kind == "mysql":
            conn.exec_driver_sql("UNLOCK TABLES")
        conn.rollback()
        conn.close()
        eng.dispose()


def test_a_locked_row_makes_the_write_fail_clearly_and_never_blocks_reads(
    make_app: Callable[..., Celery], db_url: str, db_kind: str
) -> None:
    app = make_app(sqlresults_lock_timeout=1, result_backend_always_retry=False)
    backend = app.backend
    backend.store_result("t", {"step": 1}, states.STARTED)
    with row_locked(db_url, db_kind, "t"):
        # the reader sees the last committed state at once (MVCC / SQLite WAL)
        assert backend.get_task_meta("t", cache=False)["result"] == {"step": 1}
        assert list(backend.get_many(["t"], max_iterations=1)) == []  # not ready, no wait
        with pytest.raises(BackendStoreError) as err:
            backend.store_result("t", "done", states.SUCCESS)
        with pytest.raises(LockTimeout, match="sqlresults_lock_timeout=1s"):
            backend.forget("t")  # other writes: our own error type
    message = str(err.value)
    assert "sqlresults_lock_timeout=1s" in message and "Storing the result of task" in message
    assert "Still failing after" not in message  # retries are off here
    assert backend.store.dialect.is_lock_timeout(err.value.__cause__)
    # the lock is gone: the same write now goes through
    backend.store_result("t", "done", states.SUCCESS)
    assert backend.get_task_meta("t", cache=False)["result"] == "done"


def test_a_lock_released_while_retrying_loses_nothing(
    make_app: Callable[..., Celery], db_url: str, db_kind: str
) -> None:
    """With the default retry policy a lock timeout is retried; here the lock goes meanwhile."""
    backend = make_app(sqlresults_lock_timeout=1).backend
    backend.store_result("t", {"step": 1}, states.STARTED)
    seen: list[BaseException] = []
    with row_locked(db_url, db_kind, "t") as release:

        def on_retry(exc: BaseException) -> None:
            seen.append(exc)
            release()  # the "migration" finishes while we back off

        backend.on_backend_retryable_error = on_retry  # type: ignore[method-assign]
        backend.store_result("t", "done", states.SUCCESS)
    assert len(seen) == 1 and backend.store.dialect.is_lock_timeout(seen[0])
    assert backend.get_task_meta("t", cache=False)["result"] == "done"


def test_a_lock_held_past_the_retry_bound_is_a_clear_store_error(
    make_app: Callable[..., Celery], db_url: str, db_kind: str
) -> None:
    backend = make_app(sqlresults_lock_timeout=0.5, sqlresults_retry_timeout=1.5).backend
    backend.store_result("t", 1, states.STARTED)
    retries: list[BaseException] = []
    backend.on_backend_retryable_error = retries.append  # type: ignore[method-assign]
    with row_locked(db_url, db_kind, "t"), pytest.raises(BackendStoreError) as err:
        backend.store_result("t", 2, states.SUCCESS)
    message = str(err.value)
    assert retries, "the lock timeout should have been retried"
    assert "sqlresults_lock_timeout=0.5s" in message
    assert "sqlresults_retry_timeout=1.5s" in message and "Still failing after" in message
    assert (err.value.task_id, err.value.state) == ("t", states.SUCCESS)


@pytest.mark.parametrize("db_kind", ["postgresql", "mysql"])
def test_a_table_locked_by_a_migration(
    make_app: Callable[..., Celery], db_url: str, db_kind: str
) -> None:
    backend = make_app(sqlresults_lock_timeout=1, result_backend_always_retry=False).backend
    backend.store_result("old", "kept", states.SUCCESS)
    with table_locked(db_url, db_kind):
        assert backend.get_task_meta("old", cache=False)["result"] == "kept"
        with pytest.raises(BackendStoreError, match="sqlresults_lock_timeout=1s"):
            backend.store_result("new", 1, states.SUCCESS)
    backend.store_result("new", 1, states.SUCCESS)
    assert backend.get_task_meta("new", cache=False)["result"] == 1


def test_lock_timeout_is_set_on_every_connection(
    make_app: Callable[..., Celery], db_kind: str
) -> None:
    queries: dict[str, tuple[str, Any]] = {
        "postgresql": ("SHOW lock_timeout", "2500ms"),
        "mysql": ("SELECT @@innodb_lock_wait_timeout, @@lock_wait_timeout", (3, 3)),
        "sqlite": ("PRAGMA busy_timeout", 2500),
    }
    sql, expected = queries[db_kind]
    engine = make_app(sqlresults_lock_timeout=2.5).backend.store.engine
    with engine.connect() as conn:
        row = conn.exec_driver_sql(sql).first()
    assert row is not None
    assert (row[0] if len(row) == 1 else tuple(row)) == expected


@pytest.mark.parametrize("db_kind", ["postgresql", "mysql"])
def test_the_session_set_up_leaves_no_transaction_behind(
    make_app: Callable[..., Celery], db_kind: str
) -> None:
    """The set-up runs outside any transaction (no ``BEGIN``/``COMMIT`` around it on
    PostgreSQL): a new connection is idle, and a rolled-back transaction keeps the bound."""
    sql, expected = {
        "postgresql": ("SHOW lock_timeout", "2500ms"),
        "mysql": ("SELECT @@innodb_lock_wait_timeout, @@lock_wait_timeout", (3, 3)),
    }[db_kind]
    engine = make_app(sqlresults_lock_timeout=2.5).backend.store.engine
    with engine.connect() as conn:
        if db_kind == "postgresql":
            import psycopg

            status = conn.connection.dbapi_connection.info.transaction_status  # type: ignore[union-attr]
            assert status == psycopg.pq.TransactionStatus.IDLE
        else:
            cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            cur.execute("SELECT @@in_transaction")
            assert cur.fetchone()[0] == 0
            cur.close()
        tx = conn.execution_options(isolation_level="READ COMMITTED")
        tx.exec_driver_sql("SELECT 1")
        tx.rollback()
        row = tx.exec_driver_sql(sql).first()
        assert row is not None
        assert (row[0] if len(row) == 1 else tuple(row)) == expected
