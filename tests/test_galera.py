"""MariaDB Galera Cluster: three primaries, one result store (issue 24).

Run against the three-node cluster ``scripts/galera.sh`` starts (``tests/galera.py``).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
import sqlalchemy as sa
from celery import Celery, chord, states
from celery.result import ResultSet
from click.testing import CliRunner

from celery_sqlresults.cli import results
from celery_sqlresults.dialects import Galera, MySQL
from celery_sqlresults.dialects.galera import is_galera
from celery_sqlresults.migrate import head

from .conftest import REDIS_URL, Worker, client_app
from .galera import PROXY_PORT, Cluster, HAProxy, galera, galera_cluster, haproxy, start_spread

pytestmark = pytest.mark.galera
__all__ = ["galera", "galera_cluster", "haproxy"]  # fixtures, used by name

TABLES = {
    "celery_taskmeta",
    "celery_tasksetmeta",
    "celery_sqlresults_chord",
    "celery_sqlresults_chord_part",
}


def run(*args: str) -> tuple[int, str]:
    app = Celery("galera-test", set_as_current=False)
    done = CliRunner().invoke(results, list(args), obj=SimpleNamespace(app=app))
    return done.exit_code, done.output


def app_on(url: str, **conf: object) -> Celery:
    app = Celery(f"g-{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.result_backend = "sql+" + url
    app.conf.update(conf)
    return app


def inspected(url: str) -> tuple[set[str], list[str], str]:
    """Tables, sequences, and the task table's DDL, as one node sees them."""
    eng = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with eng.connect() as conn:
            conn.exec_driver_sql("SET SESSION wsrep_sync_wait = 1")
            tables = set(sa.inspect(conn).get_table_names())
            sequences = list(
                conn.exec_driver_sql(
                    "SELECT table_name FROM information_schema.tables "
                    "WHERE table_schema = DATABASE() AND table_type = 'SEQUENCE'"
                ).scalars()
            )
            ddl = conn.exec_driver_sql("SHOW CREATE TABLE celery_taskmeta").one()[1]
            return tables, sequences, ddl
    finally:
        eng.dispose()


def versions(url: str) -> list[str]:
    eng = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with eng.connect() as conn:
            conn.exec_driver_sql("SET SESSION wsrep_sync_wait = 1")
            return list(
                conn.exec_driver_sql("SELECT version_num FROM celery_sqlresults_version").scalars()
            )
    finally:
        eng.dispose()


# ---- the dialect --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "value", "message"),
    [
        ("sqlite:///x.db", True, "sqlresults_galera = True needs a MariaDB URL"),
        ("mysql+pymysql://root@127.0.0.1/x", "yes", "sqlresults_galera must be True, False"),
    ],
)
def test_bad_galera_setting_is_refused_by_name(url: str, value: object, message: str) -> None:
    from celery.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match=message):
        _ = app_on(url, sqlresults_galera=value).backend


@pytest.mark.parametrize("db_kind", ["mysql"])
def test_a_plain_mariadb_is_not_taken_for_galera(make_app: Callable[..., Celery]) -> None:
    backend = make_app().backend
    assert not is_galera(backend.store.engine)
    assert type(backend.store.dialect) is MySQL


def test_galera_is_detected_and_can_be_forced_or_refused(galera: Cluster) -> None:
    detected = app_on(galera.url(0)).backend
    assert type(detected.store.dialect) is Galera
    for _ in range(2):  # the connection that detected it, and a new one
        with detected.store.engine.connect() as conn, detected.store.engine.connect() as other:
            for c in (conn, other):
                assert c.exec_driver_sql("SELECT @@wsrep_sync_wait").scalar() == 1
    assert type(app_on(galera.url(1), sqlresults_galera=False).backend.store.dialect) is MySQL
    forced = app_on(galera.url(2), sqlresults_galera=True).backend
    assert type(forced.settings.dialect) is Galera
    with forced.store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT @@wsrep_sync_wait").scalar() == 1


# ---- 1. the schema ------------------------------------------------------------------
def test_init_creates_every_table_with_auto_increment(galera: Cluster) -> None:
    code, out = run("init", "--url", galera.url(1))
    assert code == 0, out
    for url in galera.urls:  # replicated to every node
        tables, sequences, ddl = inspected(url)
        assert tables >= TABLES | {"celery_sqlresults_version"}
        assert sequences == []  # Galera refuses CREATE SEQUENCE … CACHE
        assert "AUTO_INCREMENT" in ddl
        assert versions(url) == [head()]


def test_start_up_creates_the_tables_and_ids_have_gaps(galera: Cluster) -> None:
    backends = [app_on(url).backend for url in galera.urls]
    for i, backend in enumerate(backends):
        backend.store_result(f"t{i}", i, states.SUCCESS)
    for backend in backends:
        assert [backend.get_task_meta(f"t{i}")["result"] for i in range(3)] == [0, 1, 2]
    assert galera.count(2) == 3


def test_eight_processes_on_three_nodes_start_together_on_an_empty_cluster(
    galera: Cluster, tmp_path: Path
) -> None:
    errors = start_spread(galera.urls, tmp_path, 8)
    for err in errors:
        for bad in ("Duplicate", "already exists", "CommandError", "Traceback", "1684"):
            assert bad not in err, err
    assert versions(galera.url(2)) == [head()]
    assert galera.count(0) == 8
    assert galera.count(1, table="celery_sqlresults_lock") == 0  # every lease given back


def test_eight_processes_on_three_nodes_upgrade_from_0001_together(
    galera: Cluster, tmp_path: Path
) -> None:
    code, out = run("upgrade", "0001", "--url", galera.url(0))
    assert code == 0, out
    assert versions(galera.url(1)) == ["0001"]
    errors = start_spread(galera.urls, tmp_path, 8)
    for err in errors:
        for bad in ("Duplicate", "already exists", "CommandError", "Traceback", "1684"):
            assert bad not in err, err
    assert versions(galera.url(2)) == [head()]
    assert galera.count(1) == 8


def test_a_lease_left_by_a_dead_process_is_taken_over(galera: Cluster) -> None:
    from celery_sqlresults.dialects import galera as galera_dialect

    assert run("init", "--url", galera.url(0))[0] == 0
    eng = sa.create_engine(galera.url(1), poolclass=sa.pool.NullPool)
    with eng.connect() as conn:  # a holder that died: its lease expired a moment ago
        conn.exec_driver_sql(
            f"INSERT INTO {galera_dialect.LOCK_TABLE} VALUES "
            "('schema', 'dead', UTC_TIMESTAMP(6) - INTERVAL 1 SECOND)"
        )
        conn.commit()
    eng.dispose()
    code, out = run("upgrade", "--url", galera.url(2))
    assert code == 0, out
    assert galera.count(0, table=galera_dialect.LOCK_TABLE) == 0


def test_a_live_lease_is_renewed_and_makes_others_time_out(
    galera: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lease of 1 s renewed every 0.2 s: held for 3 s, no other node may take it."""
    from celery_sqlresults.dialects import galera as galera_dialect

    monkeypatch.setattr(galera_dialect, "LEASE_SECONDS", 1)
    monkeypatch.setattr(galera_dialect, "RENEW_SECONDS", 0.2)
    assert run("init", "--url", galera.url(0))[0] == 0
    holder = app_on(galera.url(1)).backend.store
    other = app_on(galera.url(2)).backend.store
    with (
        holder.connect() as conn,
        holder.dialect.schema_lock(conn, 5),
        other.connect() as waiting,
        pytest.raises(TimeoutError, match=galera_dialect.LOCK_TABLE),
        other.dialect.schema_lock(waiting, 3),
    ):
        pass
    with other.connect() as waiting, other.dialect.schema_lock(waiting, 5):
        pass  # given back: free at once


# ---- 2. what holds across nodes -------------------------------------------------------
def test_success_through_one_node_is_not_overwritten_through_another(galera: Cluster) -> None:
    one, two, three = (app_on(url).backend for url in galera.urls)
    one.store_result("t", 42, states.SUCCESS)
    two.store_result("t", None, states.STARTED)  # a late STARTED on another node
    three.store_result("t", None, states.RETRY)
    for backend in (one, two, three):
        meta = backend.get_task_meta("t", cache=False)
        assert (meta["status"], meta["result"]) == (states.SUCCESS, 42)


def test_a_read_through_another_node_sees_the_write_just_made(galera: Cluster) -> None:
    """``wsrep_sync_wait``: the reading node applies the commit before it answers."""
    writer, reader = app_on(galera.url(0)).backend, app_on(galera.url(1)).backend
    writer.store_result("warm-up", 0, states.SUCCESS)
    stale = []
    for i in range(300):
        writer.store_result(f"r{i}", i, states.SUCCESS)
        meta = reader.get_task_meta(f"r{i}", cache=False)
        if (meta["status"], meta["result"]) != (states.SUCCESS, i):
            stale.append(i)
    assert stale == []


def test_three_writers_on_three_nodes_on_the_same_ids_end_consistent(galera: Cluster) -> None:
    backends = [app_on(url).backend for url in galera.urls]
    backends[0].store_result("warm-up", 0, states.SUCCESS)  # tables exist before the race
    ids = [f"same-{i}" for i in range(150)]
    failures: list[BaseException] = []

    def write(n: int) -> None:
        backend = backends[n]
        try:
            for task_id in ids:
                backend.store_result(task_id, None, states.STARTED)
                backend.store_result(task_id, n, states.SUCCESS)
                backend.store_result(task_id, None, states.RETRY)  # never replaces SUCCESS
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not failures
    seen = [
        [(m["status"], m["result"]) for m in (b.get_task_meta(i, cache=False) for i in ids)]
        for b in backends
    ]
    assert seen[0] == seen[1] == seen[2]  # every node holds the same rows
    assert {status for status, _ in seen[0]} == {states.SUCCESS}
    assert galera.count(2, "status = 'SUCCESS' AND LEFT(task_id, 5) = 'same-'") == len(ids)


# ---- 3. real workers on different nodes -----------------------------------------------
@pytest.mark.worker
def test_a_chord_with_workers_on_two_nodes_runs_its_body_once(
    galera: Cluster, worker_factory: Callable[..., Worker]
) -> None:
    first = worker_factory(galera.url(0), concurrency=2)
    worker_factory(galera.url(1), concurrency=2, queue=first.queue)
    app = client_app(galera.url(2), first.queue)
    add, collect = app.tasks["t.add"], app.tasks["t.collect"]
    r = redis.Redis.from_url(REDIS_URL)
    keys = [f"sqlresults-test:{uuid.uuid4().hex}" for _ in range(4)]
    big = chord(add.s(i, 0) for i in range(500))(collect.s(keys[0]))
    small = [
        chord(add.s(i, j) for i in range(6))(collect.s(k)) for j, k in enumerate(keys[1:], start=1)
    ]
    assert big.get(timeout=240) == list(range(500))
    for j, res in enumerate(small, start=1):
        assert res.get(timeout=120) == [i + j for i in range(6)]
    assert [int(r.get(k) or 0) for k in keys] == [1] * len(keys)
    assert galera.count(0, table="celery_sqlresults_chord") == 0


@pytest.mark.worker
def test_killing_a_node_mid_burst_loses_no_result(
    galera: Cluster, haproxy: HAProxy, worker_factory: Callable[..., Worker]
) -> None:
    """Workers and client through HAProxy; a node is killed mid-burst and rejoins after."""
    url = galera.url(0, port=PROXY_PORT)
    burst = 2000
    worker = worker_factory(url, concurrency=2)
    other = worker_factory(url, concurrency=2, queue=worker.queue)
    app = client_app(url, worker.queue)
    add = app.tasks["t.add"]
    sent = [add.delay(i, i) for i in range(burst)]
    deadline = time.monotonic() + 120
    while galera.count(0, "status = 'SUCCESS'") < 300:
        assert time.monotonic() < deadline, "the first results never came"
        time.sleep(0.2)
    # HAProxy sends every connection to the first node that is up: the one to lose.
    lost = next(n for n in range(3) if galera.sessions(n) > 0)
    alive = [n for n in range(3) if n != lost]
    galera.kill(lost)
    try:
        # Counted after the kill: every result still missing is written after the node died.
        stored = galera.count(alive[0], "status = 'SUCCESS'")
        assert stored < burst, "the burst ended before the kill: not a mid-burst kill"
        values = ResultSet(sent).join_native(timeout=300, interval=0.5)
        assert values == [2 * i for i in range(burst)]
        assert galera.count(alive[0], "status = 'SUCCESS'") == burst == galera.count(alive[1])
        assert galera.count(alive[1], "status = 'FAILURE'") == 0
        log = worker.output() + other.output()
        assert "Still failing after" not in log and "BackendStoreError" not in log
    finally:
        galera.restart(lost)
    assert galera.count(lost, "status = 'SUCCESS'") == burst  # the rejoined node caught up
