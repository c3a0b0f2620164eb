"""Faults with a real prefork worker: database restarts and outages, values the database
cannot hold or the serializer cannot encode, connections closed by the server.

Outages are made on private throwaway servers (``tests/servers.py``), never on the
shared ones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from celery import Celery, states
from celery.result import ResultSet
from kombu.exceptions import EncodeError

from celery_sqlresults.exceptions import ResultTooLarge

from .conftest import Worker, client_app, raw_engine, table_names
from .servers import PrivateMariaDB, PrivatePostgres

pytestmark = pytest.mark.worker

BURST = 2000
TABLES = {"celery_taskmeta", "celery_tasksetmeta", "celery_sqlresults_chord"}


def wait_until(check: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def count_rows(url: str, status: str | None = None) -> int:
    eng = raw_engine(url)
    try:
        with eng.connect() as conn:
            where = "" if status is None else f" WHERE status = '{status}'"
            return int(
                conn.exec_driver_sql(f"SELECT count(*) FROM celery_taskmeta{where}").scalar()
            )
    except sa.exc.DBAPIError:
        return 0  # down, or no table yet
    finally:
        eng.dispose()


@pytest.fixture(params=["postgresql", "mysql"])
def private(request: pytest.FixtureRequest) -> Iterator[PrivatePostgres | PrivateMariaDB]:
    """A private server of each kind, for tests that take it down."""
    server: PrivatePostgres | PrivateMariaDB
    server = PrivatePostgres() if request.param == "postgresql" else PrivateMariaDB()
    try:
        yield server.start()
    finally:
        server.close()


# ---- 1. restart in the middle of a burst ----------------------------------------
def test_restart_mid_burst_loses_no_result(
    private: PrivatePostgres | PrivateMariaDB, worker_factory: Callable[..., Worker]
) -> None:
    url = private.url()
    worker = worker_factory(url, concurrency=2)
    app = client_app(url, worker.queue)
    add = app.tasks["t.add"]
    results = [add.delay(i, i) for i in range(BURST)]
    wait_until(lambda: count_rows(url, states.SUCCESS) >= 300, "the first results")
    private.stop()  # every connection is cut; writes now meet a refused connection
    time.sleep(2)  # a few seconds of outage, not a blink
    private.start()
    values = ResultSet(results).join_native(timeout=300, interval=0.5)
    assert values == [2 * i for i in range(BURST)]
    log = worker.output()
    met = "Storing the result of task" in log and " failed at " in log
    assert met, "no write met the outage: not a mid-burst restart"
    assert "Still failing after" not in log and "BackendStoreError" not in log
    assert count_rows(url, states.SUCCESS) == BURST == count_rows(url)


# ---- 1b. down for longer than the retry bound --------------------------------------
@pytest.mark.parametrize("private", ["postgresql"], indirect=True)
def test_database_down_past_the_retry_bound(
    private: PrivatePostgres, worker_factory: Callable[..., Worker]
) -> None:
    """The write gives up with a clear error after the bound; the worker lives on."""
    url = private.url(password="hunter2")  # trust auth: carried, never checked
    worker = worker_factory(url, SQLRESULTS_TEST_RETRY_TIMEOUT="2")
    app = client_app(url, worker.queue)
    assert app.tasks["t.add"].delay(1, 1).get(timeout=30) == 2
    private.stop()
    lost = app.tasks["t.add"].delay(2, 2)
    # Celery: storing SUCCESS gives up in the pool process ("Exception raised outside
    # body"), which then tries to store FAILURE (the BackendStoreError); that gives up
    # too, and the main process tries FAILURE once more ("Pool callback raised exception").
    wait_until(lambda: "Pool callback raised exception" in worker.output(), "the last give-up")
    private.start()
    log = worker.output()
    assert "BackendStoreError" in log and "Still failing after" in log
    assert "sqlresults_retry_timeout=2s" in log and "postgres:***@127.0.0.1" in log
    assert "hunter2" not in log
    assert worker.proc is not None and worker.proc.poll() is None, "the worker must live on"
    # Celery acknowledged the message (acks_late is off) and stored nothing: no false SUCCESS
    assert app.AsyncResult(lost.id).state == states.PENDING
    assert app.tasks["t.add"].delay(3, 3).get(timeout=60) == 6


# ---- 3. a worker started while the database is down ---------------------------------
@pytest.mark.parametrize("private", ["postgresql", "mysql"], indirect=True)
def test_worker_started_while_the_database_is_down_serves_once_it_is_up(
    private: PrivatePostgres | PrivateMariaDB, tmp_path: Path
) -> None:
    url = private.url(password="hunter2")
    private.stop()
    worker = Worker(url, tmp_path, SQLRESULTS_TEST_STARTUP_TIMEOUT="120")

    def bring_up_once_waiting() -> None:
        wait_until(lambda: "not reachable" in worker.output(), "the worker to wait")
        private.start()

    helper = threading.Thread(target=bring_up_once_waiting)
    helper.start()
    try:
        worker.start(timeout=150)
        helper.join()
        app = client_app(url, worker.queue)
        assert app.tasks["t.add"].delay(20, 22).get(timeout=30) == 42
        log = worker.output()
        assert "not reachable" in log and "***@127.0.0.1" in log and "hunter2" not in log
        assert log.count("result schema ready") == 1 and "Traceback" not in log
        assert TABLES | {"celery_sqlresults_version"} <= table_names(url)
    finally:
        helper.join()
        worker.stop()


# ---- 8. values the database cannot hold, or the serializer cannot encode -----------------
@pytest.mark.parametrize("db_kind", ["mysql"])
def test_too_large_for_a_db_plus_blob_column_fails_the_task_clearly(
    db_url: str, worker_factory: Callable[..., Worker]
) -> None:
    dbplus = Celery("dbplus", backend="db+" + db_url, set_as_current=False)
    dbplus.backend.store_result("seed", 1, states.SUCCESS)  # db+ makes BLOB/TEXT columns
    eng = raw_engine(db_url)
    with eng.connect() as conn:
        kinds = {
            c["name"]: type(c["type"]).__name__
            for c in sa.inspect(conn).get_columns("celery_taskmeta")
        }
    eng.dispose()
    assert kinds["result"] == "BLOB" and kinds["traceback"] == "TEXT"

    # no start-up migration: the db+ layout (BLOB) must stay as a db+ user has it
    worker = worker_factory(db_url, SQLRESULTS_TEST_CREATE="0")
    app = client_app(db_url, worker.queue, database_create_tables_on_startup=False)
    big = app.tasks["t.big"].delay(100_000)
    with pytest.raises(ResultTooLarge, match=r"result is \d+ bytes, column celery_taskmeta"):
        big.get(timeout=30)
    assert big.state == states.FAILURE and "65535" in str(big.result)
    # a failure whose exception, traceback and args are all too big is still recorded
    failed = app.tasks["t.fail"].delay("y" * 100_000)
    with pytest.raises(ResultTooLarge) as err:
        failed.get(timeout=30)
    assert {"result", "traceback", "args"} <= set(str(err.value).replace(",", " ").split())
    assert failed.state == states.FAILURE and "… (cut to fit) …" in failed.traceback
    assert failed.traceback.startswith("Traceback") and "ValueError" in failed.traceback
    # a success whose result fits keeps SUCCESS; only its too-large args give way
    values = list(range(20_000))  # about 110 KB of JSON args, a small result
    summed = app.tasks["t.tsum"].delay(values)
    assert summed.get(timeout=30) == sum(values)
    meta = app.backend.get_task_meta(summed.id, cache=False)
    assert meta["status"] == states.SUCCESS and meta["args"] is None
    assert app.tasks["t.add"].delay(1, 2).get(timeout=30) == 3  # the worker carries on
    assert worker.proc is not None and worker.proc.poll() is None


def test_result_over_max_allowed_packet_fails_the_task_clearly(
    tmp_path: Path, worker_factory: Callable[..., Worker]
) -> None:
    server = PrivateMariaDB(None, "--max-allowed-packet=1M").start()
    try:
        url = server.url()
        worker = worker_factory(url)
        app = client_app(url, worker.queue)
        big = app.tasks["t.big"].delay(2_000_000)  # fits LONGBLOB, not one 1 MB packet
        with pytest.raises(ResultTooLarge, match="max_allowed_packet is 1048576"):
            big.get(timeout=30)
        assert big.state == states.FAILURE
        assert "Storing the result of task" not in worker.output(), "must not look like an outage"
        assert app.tasks["t.big"].delay(500_000).get(timeout=30) == "x" * 500_000
    finally:
        server.close()


def test_unencodable_result_fails_the_task_and_the_worker_carries_on(
    db_url: str, worker_factory: Callable[..., Worker]
) -> None:
    worker = worker_factory(db_url)
    app = client_app(db_url, worker.queue)
    bad = app.tasks["t.unencodable"].delay()
    with pytest.raises(EncodeError, match="not JSON serializable"):
        bad.get(timeout=30)
    assert bad.state == states.FAILURE
    assert app.tasks["t.add"].delay(2, 2).get(timeout=30) == 4
