"""Store and read through a MariaDB Galera Cluster, next to one MariaDB, db+ and Redis.

    bash scripts/galera.sh start
    python -m bench.galera --rounds 5 --n 300

One client process, one call at a time (``store_result`` of a SUCCESS, then
``get_task_meta`` uncached), the targets interleaved in each round so a busy
machine slows them alike. Targets: ``sql+`` on a single MariaDB started for
the run with the nodes' own settings (``tests/servers.py``: no grant checks,
``innodb_flush_log_at_trx_commit = 0``), Celery's ``db+`` there and the Redis
backend as the references, ``sql+`` through Galera node 1 alone, and ``sql+`` spread over
the three nodes (each result stored through one node and read through the
next, which makes every read wait for the cluster: ``wsrep_sync_wait``).
Celery's ``db+`` cannot run on Galera at all (its ``CREATE SEQUENCE`` is
refused), so it appears on the single server only. Prints medians of the
rounds as calls per second and as ratios to ``sql+`` on the single server.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from celery import Celery, states
from celery.utils import uuid

from tests.servers import PrivateMariaDB

from .ops import store

NODES = [f"mysql+pymysql://root@127.0.0.1:{p}/{{db}}" for p in (33061, 33062, 33063)]
REDIS = "redis://127.0.0.1:6379/14"
DB = "bench_galera"


def _reset(url: str, *names: str) -> None:
    admin = sa.create_engine(url.format(db="mysql"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for name in names:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
    admin.dispose()


def _backend(url: str) -> Any:
    app = Celery(f"bench-{uuid()[:6]}", set_as_current=False)
    app.conf.result_backend = url
    app.conf.result_extended = True
    backend = app.backend
    store(backend, "warm-up")  # tables made, engine and statements warm
    backend.get_task_meta("warm-up", cache=False)
    return backend


def _rates(writers: list[Any], readers: list[Any], n: int) -> tuple[float, float]:
    """Stores/s and gets/s; the i-th result through ``writers[i % k]``, read through readers'."""
    ids = [uuid() for _ in range(n)]
    start = time.perf_counter()
    for i, task_id in enumerate(ids):
        store(writers[i % len(writers)], task_id)
    stored = time.perf_counter()
    for i, task_id in enumerate(ids):
        meta = readers[i % len(readers)].get_task_meta(task_id, cache=False)
        if meta["status"] != states.SUCCESS:
            raise RuntimeError(f"read {meta['status']} for {task_id}, stored SUCCESS")
    done = time.perf_counter()
    return n / (stored - start), n / (done - stored)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=300, help="stores (then gets) per target")
    parser.add_argument(
        "--dbplus-n", type=int, default=30, help="for db+, which is slow (a rate all the same)"
    )
    args = parser.parse_args()
    server = PrivateMariaDB().start()
    try:
        _run(args, server.url("{db}"))
    finally:
        server.close()


def _run(args: argparse.Namespace, single_url: str) -> None:
    _reset(single_url, DB, DB + "_dbplus")
    _reset(NODES[0], DB)
    time.sleep(1)  # the other nodes apply CREATE DATABASE after node 1 answers
    nodes = [_backend("sql+" + url.format(db=DB)) for url in NODES]
    targets: dict[str, Callable[[], tuple[float, float]]] = {}
    single = _backend("sql+" + single_url.format(db=DB))
    dbplus = _backend("db+" + single_url.format(db=DB + "_dbplus"))
    redis_backend = _backend(REDIS)
    targets["sql+ single MariaDB"] = lambda: _rates([single], [single], args.n)
    targets["db+ single MariaDB"] = lambda: _rates([dbplus], [dbplus], args.dbplus_n)
    targets["redis"] = lambda: _rates([redis_backend], [redis_backend], args.n)
    targets["sql+ Galera, one node"] = lambda: _rates([nodes[0]], [nodes[0]], args.n)
    targets["sql+ Galera, spread"] = lambda: _rates(nodes, nodes[1:] + nodes[:1], args.n)
    seen: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
    for _ in range(args.rounds):
        for name, measure in targets.items():
            seen[name].append(measure())
    base = [statistics.median(r[k] for r in seen["sql+ single MariaDB"]) for k in (0, 1)]
    print(f"{'target':<24} {'stores/s':>9} {'gets/s':>9} {'store x':>8} {'get x':>7}")
    for name, rows in seen.items():
        rate = [statistics.median(r[k] for r in rows) for k in (0, 1)]
        print(
            f"{name:<24} {rate[0]:>9.0f} {rate[1]:>9.0f} "
            f"{rate[0] / base[0]:>8.2f} {rate[1] / base[1]:>7.2f}"
        )


if __name__ == "__main__":
    main()
