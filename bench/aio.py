"""Awaiting results: ``python -m bench.aio [--databases postgresql,mysql] [--n 1000] [--out F]``.

Each mode runs in a fresh child process that waits for ``--n`` task ids while
this process stores them (``backend.store_result``, the value being the time
just before the store), so each waiter's wake-up latency is its wake time
minus that value:

* ``aio``: ``--n`` concurrent ``aget()`` in one event loop;
* ``threads``: ``--n`` threads, each in ``AsyncResult.get()``;
* ``pool``: a thread pool of ``--pool`` (a web server's size) working through
  the same ``--n`` ``.get()`` calls;
* ``sync-1`` / ``aio-1``: one waiter at a time (``.get()`` / ``aget()``), each
  store 20 ms after the previous, for the added latency of one await;
* ``redis-threads`` / ``redis-pool``: the ``threads`` and ``pool`` modes with
  Celery's Redis result backend (``--redis``, a database of its own);
* ``db-threads``: ``--db-n`` threads in ``.get()`` with Celery's ``db+`` backend on
  the same server (a database of its own). It polls, and outside a worker it opens
  a connection per poll (``NullPool``), so ``--db-n`` stays under the server's
  connection limit; it is the pool's size by default, so no ``db+`` pool row.

The modes are interleaved, ``--rounds`` times; the figures are medians over
rounds; ``store_ms`` is the median store's own time (a wake-up cannot come
sooner, the commit being part of it). Memory is the child's RSS growth from
before its waiters start to while they all wait; connections are the child's
TCP sockets to the database server (or Redis) while they wait, the most of ten
looks over half a second (and, on PostgreSQL, its listening sessions, from
``pg_stat_activity``). See docs/benchmarks.md, "Awaiting results".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from celery import Celery, states
from sqlalchemy.engine import make_url

from celery_sqlresults import aget

from . import config
from .databases import admin_engine, server_versions

DB_NAME = "bench_aio"
DB_PLUS_NAME = "bench_aio_db"  # Celery's db+ has the same table names: a database of its own
APP_NAME = "bench-aio-waiter"  # PostgreSQL's application_name of the child's sessions
MODES = (
    "aio",
    "threads",
    "pool",
    "redis-threads",
    "redis-pool",
    "db-threads",
    "sync-1",
    "aio-1",
)
#: The backend each mode waits through: our ``sql+``, Redis or Celery's ``db+``.
FAMILY = {m: m.split("-")[0] if m.startswith(("redis-", "db-")) else "sql" for m in MODES}
SEQUENTIAL = 200  # waits in the one-at-a-time modes
PACE = 0.02  # seconds between stores in the one-at-a-time modes
SETTLE = 3.0  # seconds the concurrent waiters wait before the stores begin
LOOKS, LOOK = 10, 0.05  # looks at the waiter's connections, and the seconds between them


# ---- the child: waits ------------------------------------------------------------
def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _child(mode: str, url: str, ids: list[str], pool: int) -> None:
    app = Celery("bench-aio", backend=url, set_as_current=False)
    warm = app.AsyncResult("warm")  # engine, pool, schema check, as a running server has them
    woke: dict[str, float] = {}
    base = 0

    def get(task_id: str) -> None:
        app.AsyncResult(task_id).get(timeout=120)
        woke[task_id] = time.time()

    async def one(task_id: str) -> None:
        await aget(app.AsyncResult(task_id), timeout=120)
        woke[task_id] = time.time()

    def warm_up() -> None:
        nonlocal base
        warm.get(timeout=30)
        base = _rss_kib()

    async def warm_up_loop() -> None:
        nonlocal base
        await aget(warm, timeout=30)  # this loop's listener connects
        base = _rss_kib()

    def ready(rss: int) -> None:
        print(json.dumps({"ready": True, "rss_kib": rss - base}), flush=True)

    if mode == "sync-1":
        warm_up()
        ready(_rss_kib())
        for task_id in ids:
            get(task_id)
    elif mode == "aio-1":

        async def sequential() -> None:
            await warm_up_loop()
            ready(_rss_kib())
            for task_id in ids:
                await one(task_id)

        asyncio.run(sequential())
    elif mode == "aio":

        async def concurrent() -> None:
            await warm_up_loop()
            waiting = [asyncio.ensure_future(one(t)) for t in ids]
            await asyncio.sleep(SETTLE)
            ready(_rss_kib())
            await asyncio.gather(*waiting)

        asyncio.run(concurrent())
    elif mode in ("threads", "redis-threads", "db-threads"):
        warm_up()
        threads = [threading.Thread(target=get, args=(t,)) for t in ids]
        for t in threads:
            t.start()
        time.sleep(SETTLE)
        ready(_rss_kib())
        for t in threads:
            t.join()
    else:
        warm_up()
        with ThreadPoolExecutor(pool) as executor:
            futures = [executor.submit(get, t) for t in ids]
            time.sleep(SETTLE)
            ready(_rss_kib())
            for f in futures:
                f.result()
    print(json.dumps({"woke": woke}), flush=True)


# ---- the parent: stores, measures --------------------------------------------------
def _prepare(kind: str, name: str) -> str:
    admin_url = config.PG_ADMIN if kind == "postgresql" else config.MYSQL_ADMIN
    engine = admin_engine(admin_url)
    try:
        with engine.connect() as conn:
            force = " WITH (FORCE)" if kind == "postgresql" else ""
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}{force}")
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
    finally:
        engine.dispose()
    url = make_url(admin_url).set(database=name)
    if kind == "postgresql":
        url = url.update_query_dict({"application_name": APP_NAME})
    return url.render_as_string(hide_password=False)


def _sockets_to(pid: int, port: int) -> int:
    """The TCP connections process ``pid`` has open to ``port`` (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[9] in inodes and int(fields[2].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def _most_sockets_to(pid: int, port: int) -> int:
    """The most of a few looks at :func:`_sockets_to`: db+ opens and closes one per poll."""
    seen = []
    for _ in range(LOOKS):
        seen.append(_sockets_to(pid, port))
        time.sleep(LOOK)
    return max(seen)


def _listening_sessions(admin: sa.Engine) -> int:
    with admin.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    # A listening session's last statement is its LISTEN, or the SELECT 1
                    # it checks its connection with; the reads are SELECTs of the table.
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name "
                    "AND (query LIKE 'LISTEN %' OR query = 'SELECT 1')"
                ),
                {"name": APP_NAME},
            ).scalar_one()
        )


def run_mode(
    mode: str, kind: str, url: str, app: Celery, admin: sa.Engine, n: int, pool: int
) -> dict[str, float]:
    """One mode once: ``url`` and ``app`` are the backend's (full Celery URL), ``n`` waiters."""
    count = SEQUENTIAL if mode.endswith("-1") else n
    ids = [f"{mode}-{uuid.uuid4().hex}" for _ in range(count)]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ids, f)
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.aio",
            "--child",
            mode,
            "--url",
            url,
            "--ids",
            f.name,
            "--pool",
            str(pool),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=config.ROOT,
    )
    assert child.stdout is not None
    try:
        ready = json.loads(child.stdout.readline())
        default_port = {"postgresql": 5432, "mysql": 3306, "redis": 6379}
        family = "redis" if FAMILY[mode] == "redis" else kind
        port = make_url(url.split("+", 1)[1] if "+" in url else url).port
        figures: dict[str, float] = {
            "rss_mib": ready["rss_kib"] / 1024,
            "connections": _most_sockets_to(child.pid, port or default_port[family]),
        }
        if kind == "postgresql" and FAMILY[mode] == "sql":
            figures["listening"] = _listening_sessions(admin)
        backend = app.backend
        stored: dict[str, float] = {}
        took: list[float] = []  # each store's own time, the floor of the latency
        first = time.time()
        for task_id in ids:
            if mode.endswith("-1"):
                time.sleep(PACE)
            stored[task_id] = at = time.time()
            backend.store_result(task_id, at, states.SUCCESS)
            took.append((time.time() - at) * 1000)
        woke = json.loads(child.stdout.readline())["woke"]
        assert child.wait(60) == 0
    finally:
        if child.poll() is None:
            child.kill()
        os.unlink(f.name)
    latencies = sorted((woke[t] - stored[t]) * 1000 for t in ids)
    figures["p50_ms"] = statistics.median(latencies)
    figures["p99_ms"] = latencies[int(len(latencies) * 0.99) - 1]
    figures["store_ms"] = statistics.median(took)
    if not mode.endswith("-1"):
        figures["wall_s"] = max(woke.values()) - first
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.aio", description=__doc__)
    parser.add_argument("--databases", default="postgresql,mysql")
    parser.add_argument("--n", type=int, default=1000, help="concurrent waiters")
    parser.add_argument("--pool", type=int, default=40, help="threads of the pool mode")
    parser.add_argument(
        "--db-n", type=int, default=40, help="threads of the db+ mode (a connection per poll)"
    )
    parser.add_argument(
        "--redis",
        default=os.environ.get("BENCH_AIO_REDIS", "redis://127.0.0.1:6379/13"),
        help="the Redis result backend's URL (its database is flushed)",
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated subset of: " + ",".join(MODES)
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown here too")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.url, json.loads(Path(args.ids).read_text()), args.pool)
        return
    kinds = [k for k in args.databases.split(",") if k]
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; servers: "
        + "; ".join(f"{k} {v}" for k, v in server_versions(kinds).items() if k != "Redis"),
        f"Command: python -m bench.aio --databases {args.databases} --n {args.n} "
        f"--pool {args.pool} --db-n {args.db_n} --rounds {args.rounds}"
        + ("" if args.modes == ",".join(MODES) else f" --modes {args.modes}"),
        "",
    ]
    modes = [m for m in MODES if m in args.modes.split(",")]
    redis.Redis.from_url(args.redis).flushdb()
    for kind in kinds:
        urls = {"sql": "sql+" + _prepare(kind, DB_NAME), "redis": args.redis}
        if any(FAMILY[m] == "db" for m in modes):
            urls["db"] = "db+" + _prepare(kind, DB_PLUS_NAME)
        apps = {
            f: Celery("bench-aio-store", backend=u, set_as_current=False) for f, u in urls.items()
        }
        for store_app in apps.values():
            store_app.backend.store_result("warm", 0, states.SUCCESS)
        admin = admin_engine(config.PG_ADMIN if kind == "postgresql" else config.MYSQL_ADMIN)
        got: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for r in range(args.rounds):
            for mode in modes:
                f = FAMILY[mode]
                n = args.db_n if f == "db" else args.n
                figures = run_mode(mode, kind, urls[f], apps[f], admin, n, args.pool)
                print(f"[{kind} round {r + 1}] {mode}: {figures}", file=sys.stderr, flush=True)
                got[mode].append(figures)
        lines += _table(kind, got, args)
        for store_app in apps.values():
            store_app.close()
        admin.dispose()
    redis.Redis.from_url(args.redis).flushdb()
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


def _table(kind: str, got: dict[str, list[dict[str, float]]], args: Any) -> list[str]:
    labels = {
        "aio": f"sql+: {args.n} x `aget()`, one event loop",
        "threads": f"sql+: {args.n} threads x `.get()`",
        "pool": f"sql+: pool of {args.pool} threads x {args.n} `.get()`",
        "sync-1": "sql+: one `.get()` at a time",
        "aio-1": "sql+: one `aget()` at a time",
        "redis-threads": f"Redis: {args.n} threads x `.get()`",
        "redis-pool": f"Redis: pool of {args.pool} threads x {args.n} `.get()`",
        "db-threads": f"db+: {args.db_n} threads x `.get()`",
    }
    cols = ["wall_s", "p50_ms", "p99_ms", "store_ms", "rss_mib", "connections"]
    if kind == "postgresql":
        cols.append("listening")
    head = ["mode", *cols]
    out = [f"### {config.SERVER_TITLES[kind]}", "", "| " + " | ".join(head) + " |"]
    out.append("|" + "---|" * len(head))
    for mode in got:
        row = [labels[mode]]
        for col in cols:
            values = [f[col] for f in got[mode] if col in f]
            row.append(f"{statistics.median(values):.2f}" if values else "-")
        out.append("| " + " | ".join(row) + " |")
    return [*out, ""]


if __name__ == "__main__":
    main()
