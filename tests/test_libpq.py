"""PostgreSQL's hot path through libpq: prepared per parameter types, psycopg's errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery, states

from celery_sqlresults import fastpath, libpq

from .conftest import (
    ONE_CONNECTION,
    pool_info,
    raw_engine,
    task_request,
)


def _prepared_here(backend: Any) -> list[str]:
    """Names of the statements prepared on the pool's (only) session."""
    sql = "SELECT name FROM pg_prepared_statements ORDER BY name"
    return list(backend.store.run(lambda c, _: c.exec_driver_sql(sql).scalars().all(), []))


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_postgresql_calls_libpq_with_statements_prepared_per_parameter_types(
    make_app: Callable[..., Celery],
) -> None:
    """psycopg sends an int as int2, int4 or int8 by its size: each combination is its own
    prepared statement, else the server refuses an int4's bytes for an int2 parameter."""
    backend = make_app(result_extended=True, database_engine_options=ONE_CONNECTION).backend
    for task_id, retries in (("small", 1), ("large", 70_000), ("small2", 2)):
        request = task_request(retries=retries)
        backend.store_result(task_id, {"r": retries}, states.SUCCESS, request=request)
        meta = backend.get_task_meta(task_id, cache=False)
        assert (meta["result"], meta["retries"]) == ({"r": retries}, retries)
    backend.store_result("failed", KeyError("k"), states.FAILURE, traceback="Traceback: k")
    meta = backend.get_task_meta("failed", cache=False)
    assert (type(meta["result"]), meta["traceback"]) == (KeyError, "Traceback: k")
    ours = [n for n in _prepared_here(backend) if n.startswith("_sqlresults_")]
    # The read, the upsert with an int2 and with an int4, the FAILURE's upsert.
    assert len(ours) == 4, ours
    assert sorted(n.decode() for n in _libpq_prepared(backend).values()) == ours


def _libpq_prepared(backend: Any) -> dict[Any, bytes]:
    """The libpq path's record of what it prepared on the pool's (only) connection."""
    dbapi_conn, info = pool_info(backend.store.engine)
    conn, prepared = info[libpq.PREPARED]  # KeyError: the path was not taken
    assert conn is dbapi_conn
    return dict(prepared)


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_statements_deallocated_under_us_are_prepared_again(
    make_app: Callable[..., Celery],
) -> None:
    """``DEALLOCATE ALL``/``DISCARD ALL`` (a pooler, an administrator) costs one retry."""
    backend = make_app(database_engine_options=ONE_CONNECTION).backend
    backend.store_result("t", 1, states.SUCCESS)
    assert backend.get_task_meta("t", cache=False)["result"] == 1
    assert any(n.startswith("_sqlresults_") for n in _prepared_here(backend))
    backend.store.run(lambda c, _: c.exec_driver_sql("DEALLOCATE ALL"), None)
    assert _prepared_here(backend) == []
    backend.store_result("u", 2, states.SUCCESS)
    assert backend.get_task_meta("u", cache=False)["result"] == 2
    assert backend.get_task_meta("t", cache=False)["result"] == 1
    assert len([n for n in _prepared_here(backend) if n.startswith("_sqlresults_")]) == 2


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_prepare_threshold_none_prepares_nothing(make_app: Callable[..., Celery]) -> None:
    """psycopg's switch for PgBouncer in transaction mode holds on the hot path too."""
    options = {**ONE_CONNECTION, "connect_args": {"prepare_threshold": None}}
    backend = make_app(result_extended=True, database_engine_options=options).backend
    for i in range(3):
        backend.store_result(f"t{i}", i, states.SUCCESS, request=task_request())
        assert backend.get_task_meta(f"t{i}", cache=False)["result"] == i
    assert _prepared_here(backend) == []
    info = pool_info(backend.store.engine)[1]
    # The libpq path ran: no cursor kept (it records statements only when it prepares).
    assert libpq.PREPARED not in info and fastpath._CURSOR not in info


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_libpq_errors_are_psycopgs_wrapped_by_sqlalchemy(make_app: Callable[..., Celery]) -> None:
    import psycopg

    backend = make_app(database_engine_options=ONE_CONNECTION).backend
    engine = backend.store.engine
    number = sa.select(sa.cast(sa.bindparam("v", type_=sa.String), sa.Integer).label("n"))
    assert fastpath.fetch_one(engine, backend.store.dialect, number, {"v": "12"}) == {"n": 12}
    with pytest.raises(sa.exc.DataError) as caught:
        fastpath.fetch_one(engine, backend.store.dialect, number, {"v": "twelve"})
    assert isinstance(caught.value.orig, psycopg.errors.InvalidTextRepresentation)
    assert not caught.value.connection_invalidated
    seven = fastpath.fetch_one(engine, backend.store.dialect, number, {"v": "7"})
    assert seven == {"n": 7}  # the session goes on
    assert _libpq_prepared(backend)  # on the libpq path


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_a_signal_interrupts_a_statement_and_the_server_cancels_it(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    """Ctrl-C or a soft time limit during a store stuck on a lock: raised in the caller at
    once (not when the lock goes, up to sqlresults_lock_timeout later), the statement is
    cancelled on the server and the connection serves the next call."""
    import signal

    class Interrupted(BaseException):
        pass

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    backend = make_app(database_engine_options=ONE_CONNECTION, sqlresults_lock_timeout=60).backend
    backend.store_result("locked", 1, states.STARTED)
    holder = raw_engine(db_url).connect()
    holder.exec_driver_sql("BEGIN")
    holder.exec_driver_sql("SELECT 1 FROM celery_taskmeta WHERE task_id = 'locked' FOR UPDATE")
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(Interrupted):
            backend.store_result("locked", 2, states.SUCCESS)  # waits on the row lock
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        holder.exec_driver_sql("ROLLBACK")
        holder.close()
    assert backend.get_task_meta("locked", cache=False)["status"] == states.STARTED  # cancelled
    backend.store_result("locked", 3, states.SUCCESS)
    assert backend.get_task_meta("locked", cache=False)["result"] == 3
