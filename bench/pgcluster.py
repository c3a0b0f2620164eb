"""Stores per second direct vs through PgBouncer (transaction mode), and a failover's gap.

One process stores results one after another (``store_result`` with a worker-like
request), in interleaved rounds over: our backend direct (prepared statements, the
default), direct without prepared statements (``sqlresults_pooler`` on a direct URL),
through PgBouncer (``sqlresults_pooler = "transaction"``), Celery's ``db+`` direct and
Celery's Redis backend. Medians per target and ratios to ours direct are printed as
Markdown. ``--failover`` also runs a pg_auto_failover formation (tests/clusters.py) and
reports the longest pause between two successive stores across ``pg_autoctl perform
failover``, and whether every store landed.

    python -m bench.pgcluster --stores 2000 --rounds 3 [--failover] [--crash]

``--crash`` SIGKILLs the primary (keeper and PostgreSQL) while one client stores as
fast as it can, once with a synchronous and once with an asynchronous standby, and
counts the acknowledged stores the promoted standby lacks.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import threading
import time
from typing import Any

import sqlalchemy as sa
from celery import Celery
from celery.utils import uuid

from bench.ops import store
from tests.clusters import Formation, PgBouncer

PG = os.environ.get("SQLRESULTS_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("SQLRESULTS_REDIS_URL", "redis://127.0.0.1:6379/14")
DB_OURS, DB_THEIRS = "sqlr_bench_pgcluster", "sqlr_bench_pgcluster_dbplus"


def _database(name: str) -> str:
    admin = sa.create_engine(PG, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    admin.dispose()
    return sa.engine.make_url(PG).set(database=name).render_as_string(hide_password=False)


def _app(backend: str, **conf: Any) -> Celery:
    app = Celery("bench-pgcluster", backend=backend, set_as_current=False)
    app.conf.update(result_extended=True, **conf)
    return app


def _rate(app: Celery, n: int) -> float:
    backend = app.backend
    store(backend, uuid())  # connect, schema
    started = time.perf_counter()
    for _ in range(n):
        store(backend, uuid())
    return n / (time.perf_counter() - started)


def throughput(stores: int, rounds: int, bouncer: PgBouncer) -> dict[str, float]:
    ours, theirs = _database(DB_OURS), _database(DB_THEIRS)
    pooled = sa.engine.make_url(ours).set(host="127.0.0.1", port=bouncer.port)
    targets = {
        "sql+ direct (prepared)": _app("sql+" + ours),
        "sql+ direct, unprepared": _app("sql+" + ours, sqlresults_pooler="transaction"),
        "sql+ via PgBouncer (transaction)": _app(
            "sql+" + pooled.render_as_string(hide_password=False),
            sqlresults_pooler="transaction",
            sqlresults_listen_url=ours,
        ),
        "db+ direct (Celery)": _app("db+" + theirs),
        "redis (Celery)": _app(REDIS),
    }
    seen: dict[str, list[float]] = {name: [] for name in targets}
    for _ in range(rounds):
        for name, app in targets.items():
            seen[name].append(_rate(app, stores))
    return {name: statistics.median(rates) for name, rates in seen.items()}


def failover_gap(stores_per_s: float = 200) -> tuple[float, int, int]:
    """Longest pause between successive stores across a failover; stores sent, found."""
    formation = Formation().start()
    try:
        app = _app("sql+" + formation.url(), sqlresults_retry_timeout=120)
        backend = app.backend
        done: list[float] = []
        ids: list[str] = []
        stop = threading.Event()

        def run() -> None:
            while not stop.is_set():
                task_id = uuid()
                store(backend, task_id)
                ids.append(task_id)
                done.append(time.monotonic())
                time.sleep(1 / stores_per_s)

        writer = threading.Thread(target=run)
        writer.start()
        time.sleep(2)
        formation.failover()
        time.sleep(2)
        stop.set()
        writer.join(60)
        gap = max(b - a for a, b in itertools.pairwise(done))
        eng = sa.create_engine(formation.node_url(formation.primary_port()))
        with eng.connect() as conn:
            found = conn.exec_driver_sql("SELECT count(*) FROM celery_taskmeta").scalar_one()
        eng.dispose()
        return gap, len(ids), int(found)
    finally:
        formation.close()


def crash_loss(async_standby: bool) -> tuple[float, int, int]:
    """Stores acknowledged, then the primary SIGKILLed and the standby promoted: the
    promotion's seconds, the stores acknowledged, and how many of them the new primary lacks."""
    formation = Formation(async_standby=async_standby).start()
    try:
        formation.quick_monitor()
        app = _app("sql+" + formation.url(), sqlresults_retry_timeout=180)
        backend = app.backend
        acked: list[str] = []
        stop = threading.Event()

        def run() -> None:
            while not stop.is_set():
                task_id = uuid()
                store(backend, task_id)
                acked.append(task_id)

        writer = threading.Thread(target=run)
        writer.start()
        time.sleep(2)
        started = time.monotonic()
        survivor = formation.crash_primary()
        promotion = time.monotonic() - started
        time.sleep(1)
        stop.set()
        writer.join(120)
        eng = sa.create_engine(formation.node_url(survivor))
        with eng.connect() as conn:
            found = set(conn.exec_driver_sql("SELECT task_id FROM celery_taskmeta").scalars())
        eng.dispose()
        return promotion, len(acked), len(set(acked) - found)
    finally:
        formation.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stores", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--failover", action="store_true")
    parser.add_argument("--crash", action="store_true", help="SIGKILL the primary, sync and async")
    parser.add_argument("--no-throughput", action="store_true")
    args = parser.parse_args()
    if args.crash:
        for async_standby in (False, True):
            seconds, acked, lost = crash_loss(async_standby)
            kind = "asynchronous" if async_standby else "synchronous"
            print(f"crash, {kind} standby: promoted in {seconds:.0f} s; {acked} acked, {lost} lost")
    if args.no_throughput:
        return
    bouncer = PgBouncer(sa.engine.make_url(PG).port or 5432).start()
    try:
        rates = throughput(args.stores, args.rounds, bouncer)
    finally:
        bouncer.close()
    base = rates["sql+ direct (prepared)"]
    print(f"machine: {platform.node()}, {os.cpu_count()} cores (shared, busy)")
    print(f"{args.stores} stores x {args.rounds} interleaved rounds, one process, medians\n")
    print("| target | stores/s | vs sql+ direct |\n|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f} |")
    if args.failover:
        gap, sent, found = failover_gap()
        print(f"\nfailover: longest pause between stores {gap:.1f} s; {sent} stored, {found} found")


if __name__ == "__main__":
    main()
