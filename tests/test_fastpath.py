"""The task read and write on the driver's cursor: same values, same errors, listeners respected."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery, states
from celery.result import ResultSet

from celery_sqlresults import fastpath, lease, libpq
from celery_sqlresults.query import ResultQuery

from .conftest import kill_session, raw_engine, session_id, task_request

#: The protocol on MariaDB through mysqlclient (MySQLdb) too: the fast path knows both drivers.
ALSO_ON = ["mysqlclient"]


def test_hot_path_runs_on_the_cursor(make_app: Callable[..., Celery], db_url: str) -> None:
    app = make_app(result_extended=True)
    backend = app.backend
    fastpath._compiled.clear()
    backend.store_result("t", {"x": [1, "é"]}, states.SUCCESS, request=task_request())
    meta = backend.get_task_meta("t", cache=False)
    assert (meta["status"], meta["result"]) == (states.SUCCESS, {"x": [1, "é"]})
    assert (meta["name"], meta["args"], meta["kwargs"]) == ("proj.add", [1, 2], {"k": "v"})
    assert isinstance(meta["date_done"], datetime)  # SQLite's text converted as SQLAlchemy would
    assert abs(meta["date_done"] - datetime.now(timezone.utc)) < timedelta(minutes=1)
    record = ResultQuery(app).get("t")  # the date columns, read the ordinary way
    assert record is not None and record.date_created is not None
    sql = [c.sql for c in fastpath._compiled.values()]
    assert any(s.lstrip().startswith(("INSERT", "WITH")) for s in sql)  # the upsert
    assert any(s.lstrip().startswith("SELECT") for s in sql)  # the read


def test_hot_statements_bind_only_the_row(make_app: Callable[..., Celery], db_url: str) -> None:
    """Constants (the SUCCESS guard, the notification's channel) are in the SQL text.

    Each bound constant is converted and sent on every execution.
    """
    backend = make_app(result_extended=True).backend
    fastpath._compiled.clear()
    backend.store_result("t", 1, states.SUCCESS, request=task_request())
    backend.store_result("t", 2, states.STARTED)  # refused by the guard, in the statement
    assert backend.get_task_meta("t", cache=False)["result"] == 1
    compiled = list(fastpath._compiled.values())
    assert len(compiled) >= 3  # two upserts (different columns) and the read
    for c in compiled:
        assert [name for name, value in c.defaults.items() if value is not None] == [], c.sql
    assert any("'SUCCESS'" in c.sql for c in compiled)


def test_listeners_see_every_statement(make_app: Callable[..., Celery], db_url: str) -> None:
    """Instrumentation (tracing, statement counters) makes the hot path use execute()."""
    backend = make_app().backend
    backend.store_result("warm", 0, states.SUCCESS)  # reflection and the listener's set-up
    backend.get_task_meta("warm", cache=False)
    seen: list[str] = []
    sa.event.listen(
        backend.store.engine, "before_cursor_execute", lambda c, cur, s, *a: seen.append(s)
    )
    backend.store_result("t", 1, states.SUCCESS)
    assert backend.get_task_meta("t", cache=False)["result"] == 1
    assert _lease(backend) is None  # the normal path: the kept connection went back
    assert [s.lstrip().split()[0].upper() for s in seen] in (
        ["INSERT", "SELECT"],
        ["WITH", "SELECT"],
    )


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_errors_are_sqlalchemys(make_app: Callable[..., Celery], db_url: str) -> None:
    """A dropped table reads as PENDING; a killed connection is invalidated and retried."""
    backend = make_app().backend
    backend.store_result("t", 1, states.SUCCESS)
    pid = backend.store.run(lambda c, _: session_id(c, "postgresql"), 0)
    kill_session(db_url, "postgresql", pid)
    eng = raw_engine(db_url)
    assert backend.get_task_meta("t", cache=False)["result"] == 1  # reconnected
    with eng.begin() as conn:
        conn.exec_driver_sql("DROP TABLE celery_taskmeta")
    eng.dispose()
    assert backend.get_task_meta("t", cache=False)["status"] == states.PENDING
    backend.store_result("u", 2, states.SUCCESS)  # a write recreates the table
    assert backend.get_task_meta("u", cache=False)["result"] == 2


#: A pool of one connection: the fast path's records on it can be looked at between calls.
_ONE_CONNECTION = {"pool_size": 1, "max_overflow": 0}


def _pool_info(engine: sa.Engine) -> tuple[Any, dict[str, Any]]:
    """The pool's (only) connection and what the fast path recorded with it."""
    pooled = engine.raw_connection()
    try:
        return pooled.dbapi_connection, dict(pooled.info)
    finally:
        pooled.close()


def _kept_cursor(engine: sa.Engine) -> object:
    """The cursor the fast path keeps with the pool's (only) connection, if any."""
    kept = _pool_info(engine)[1].get(fastpath._CURSOR)
    return None if kept is None else kept[1]


@pytest.mark.parametrize("db_kind", ["mysql", "mysqlclient", "sqlite"])  # PostgreSQL: libpq
def test_cursor_kept_unless_values_are_large(make_app: Callable[..., Celery], db_url: str) -> None:
    """One cursor per pooled connection is reused; a call with large values closes its own."""
    app = make_app(database_engine_options=_ONE_CONNECTION)
    backend = app.backend
    backend.store_result("small", 1, states.SUCCESS)
    engine = backend.store.engine
    first = _kept_cursor(engine)
    assert first is not None
    assert backend.get_task_meta("small", cache=False)["result"] == 1
    assert _kept_cursor(engine) is first  # the same cursor served the read
    big = "x" * (fastpath._KEEP_BYTES + 1)
    backend.store_result("big", big, states.SUCCESS)
    assert _kept_cursor(engine) is None  # it held the 64 KB parameters: closed
    assert backend.get_task_meta("small", cache=False)["result"] == 1
    assert _kept_cursor(engine) is not None
    assert backend.get_task_meta("big", cache=False)["result"] == big
    assert _kept_cursor(engine) is None  # and the 64 KB row


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_autocommit_turned_off_still_commits(make_app: Callable[..., Celery], db_url: str) -> None:
    """A listener that leaves connections in a transaction gets SQLAlchemy's path, committed."""

    def transactional(engine: sa.Engine) -> None:
        def checkout(dbapi_conn: object, record: object, proxy: object) -> None:
            dbapi_conn.autocommit = False  # type: ignore[attr-defined]

        sa.event.listen(engine, "checkout", checkout)

    backend = make_app(database_engine_callback=transactional).backend
    backend.store_result("t", {"v": 1}, states.SUCCESS)
    assert backend.get_task_meta("t", cache=False)["result"] == {"v": 1}
    with raw_engine(db_url).connect() as conn:  # another session sees it: committed
        status = conn.execute(sa.text("SELECT status FROM celery_taskmeta WHERE task_id = 't'"))
        assert status.scalar() == states.SUCCESS
    pooled = backend.store.engine.raw_connection()
    try:  # and no transaction is left open on the pooled connection
        assert pooled.dbapi_connection.info.transaction_status.name == "IDLE"
    finally:
        pooled.close()


def _lease(backend: Any) -> Any:
    """The hot path's kept connection on the backend's engine (None: none kept)."""
    return lease.leased(backend.store.engine)


def test_a_busy_thread_keeps_its_connection(
    make_app: Callable[..., Celery], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls in a row share one checked-out connection; idle, it goes back through the pool."""
    backend = make_app(result_extended=True).backend
    backend.store_result("t", 0, states.SUCCESS)
    lease = _lease(backend)
    assert lease is not None
    first = lease.pooled.dbapi_connection
    pool = backend.store.engine.pool
    for i in range(5):
        backend.store_result(f"t{i}", i, states.SUCCESS, request=task_request())
        assert backend.get_task_meta(f"t{i}", cache=False)["result"] == i
    assert _lease(backend) is lease and lease.pooled.dbapi_connection is first
    assert pool.checkedout() == 1
    monkeypatch.setattr(fastpath, "_LEASE_IDLE", 0.05)
    time.sleep(0.1)
    assert backend.get_task_meta("t", cache=False)["result"] == 0
    assert lease.pooled is None  # given back; the call took a new lease through the pool
    assert _lease(backend) not in (None, lease)
    assert pool.checkedout() == 1


def test_a_busy_connection_is_still_recycled(make_app: Callable[..., Celery]) -> None:
    """A lease goes back through the pool when its connection reaches pool_recycle."""
    backend = make_app(database_engine_options={"pool_recycle": 0.3}).backend
    backend.store_result("t", 1, states.SUCCESS)
    first = _lease(backend).pooled.dbapi_connection
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # never idle
        assert backend.get_task_meta("t", cache=False)["result"] == 1
    assert _lease(backend).pooled.dbapi_connection is not first


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
    assert _lease(backend) is None
    pool = backend.store.engine.pool
    assert not isinstance(pool, sa.pool.QueuePool) or pool.checkedout() == 0


def test_a_thread_never_holds_two_connections(make_app: Callable[..., Celery]) -> None:
    """The store's other statements give the lease back first; two threads share a pool of two."""
    app = make_app(database_engine_options={"pool_size": 2, "max_overflow": 0, "pool_timeout": 5})
    backend = app.backend
    backend.store_result("t", 1, states.SUCCESS)
    assert _lease(backend) is not None
    assert len(list(backend.get_many(["t"], timeout=5))) == 1  # a batch read: Store.run
    assert _lease(backend) is None and backend.store.engine.pool.checkedout() == 0
    backend.store_result("t", 1, states.SUCCESS)
    with backend.store.connect():  # what start-up, the CLI and the web view use
        assert _lease(backend) is None and backend.store.engine.pool.checkedout() == 1
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
    monkeypatch.setattr(fastpath, "_LEASE_IDLE", 0.05)
    backend = make_app().backend
    backend.store_result("t", 1, states.SUCCESS)
    idle = _lease(backend)
    assert idle.owner == threading.get_ident()
    time.sleep(0.1)
    owners: list[int] = []

    def other() -> None:
        assert backend.get_task_meta("t", cache=False)["result"] == 1
        owners.append(_lease(backend).owner)

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
    lease = _lease(backend)
    dbapi = lease.pooled.dbapi_connection
    victim = dbapi.info.backend_pid if db_kind == "postgresql" else dbapi.thread_id()
    invalidated: list[object] = []
    sa.event.listen(backend.store.engine, "invalidate", lambda *a: invalidated.append(a))
    kill_session(db_url, db_kind, victim)
    assert backend.get_task_meta("t", cache=False)["result"] == 1
    assert invalidated and lease.pooled is None
    assert _lease(backend).pooled.dbapi_connection is not dbapi


def test_disposing_ends_the_leases(make_app: Callable[..., Celery]) -> None:
    from celery_sqlresults.engine import dispose_all

    backend = make_app().backend
    backend.store_result("t", 1, states.SUCCESS)
    lease, pool = _lease(backend), backend.store.engine.pool
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
    monkeypatch.setattr(fastpath, "_LEASE_IDLE", 60.0)
    backend = make_app().backend
    backend.store_result("t", 1, states.SUCCESS)
    lease = _lease(backend)
    first = lease.pooled.dbapi_connection
    with backend.store.engine.connect() as conn:  # a second connection of the same pool
        kill_session(db_url, db_kind, session_id(conn, db_kind))
        with pytest.raises(sa.exc.DBAPIError):
            conn.exec_driver_sql("SELECT 1")
    assert backend.get_task_meta("t", cache=False)["result"] == 1
    assert lease.pooled is None
    assert _lease(backend).pooled.dbapi_connection is not first


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
    backend = make_app(result_extended=True, database_engine_options=_ONE_CONNECTION).backend
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
    dbapi_conn, info = _pool_info(backend.store.engine)
    conn, prepared = info[libpq.PREPARED]  # KeyError: the path was not taken
    assert conn is dbapi_conn
    return dict(prepared)


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_statements_deallocated_under_us_are_prepared_again(
    make_app: Callable[..., Celery],
) -> None:
    """``DEALLOCATE ALL``/``DISCARD ALL`` (a pooler, an administrator) costs one retry."""
    backend = make_app(database_engine_options=_ONE_CONNECTION).backend
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
    options = {**_ONE_CONNECTION, "connect_args": {"prepare_threshold": None}}
    backend = make_app(result_extended=True, database_engine_options=options).backend
    for i in range(3):
        backend.store_result(f"t{i}", i, states.SUCCESS, request=task_request())
        assert backend.get_task_meta(f"t{i}", cache=False)["result"] == i
    assert _prepared_here(backend) == []
    info = _pool_info(backend.store.engine)[1]
    # The libpq path ran: no cursor kept (it records statements only when it prepares).
    assert libpq.PREPARED not in info and fastpath._CURSOR not in info


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_libpq_errors_are_psycopgs_wrapped_by_sqlalchemy(make_app: Callable[..., Celery]) -> None:
    import psycopg

    backend = make_app(database_engine_options=_ONE_CONNECTION).backend
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

    backend = make_app(database_engine_options=_ONE_CONNECTION, sqlresults_lock_timeout=60).backend
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
