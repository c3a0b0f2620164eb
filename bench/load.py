"""Load and memory: N worker processes x M tasks with ``result_extended``, a client polling.

    python -m bench.load                       # PostgreSQL, 4 workers x 20 000 tasks
    python -m bench.load --db mysql --tasks 5000
    python -m bench.load --url postgresql+psycopg://user@host/db   # your own database

Starts a private throwaway server (``tests/servers.py``; the shared ones are left
alone) unless ``--url`` is given, then ``--workers`` prefork workers of
``--concurrency`` each on one queue (Redis broker), a polling client process
(task states, lists and stats, as a monitoring page would) and sends
``workers x tasks`` ``add`` tasks. Every ``--every`` seconds it samples the RSS
of every worker, pool and client process (Linux ``/proc``) and the stored count.
At the end it checks every result (state and value), counts errors in the
logs and in the poller, and prints a Markdown report (also written as JSON).
Exit status 1 if anything was lost, wrong or failed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from celery import Celery, states

from . import config
from .worker import running_worker

BROKER = "redis://127.0.0.1:6379/12"


def make_app(url: str, queue: str = "load") -> Celery:
    from .app import make_app as bench_app

    return bench_app("sql+" + url, BROKER, queue)


# ---- process memory -------------------------------------------------------------
def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with suppress(OSError):
            out += [int(p) for p in (task / "children").read_text().split()]
    return out


# ---- the polling client -------------------------------------------------------
def poll(url: str, total: int, stop: Any, counts: Any) -> None:
    """Ask what a monitoring page or a web app asks, as fast as it can, until told to stop."""
    from celery_sqlresults import ResultQuery

    app = make_app(url)
    query = ResultQuery(app)
    polls = errors = 0
    while not stop.is_set():
        try:
            for i in random.sample(range(total), 20):
                app.AsyncResult(f"load-{i}").state  # noqa: B018
            query.stats()
            query.filter(state=states.SUCCESS).limit(50).all()
            polls += 22
        except Exception as exc:
            errors += 1
            print(f"poller error: {exc!r}", file=sys.stderr)
        counts[0], counts[1] = polls, errors


# ---- the run ---------------------------------------------------------------------
def stored(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.exec_driver_sql(
                "SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'"
            ).scalar_one()
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from celery_sqlresults import create_tables

    sys.path.insert(0, str(config.ROOT))
    from tests.servers import PrivateMariaDB, PrivatePostgres

    total = args.workers * args.tasks
    report: dict[str, Any] = {"args": vars(args), "total": total}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sqlr-load-")))
        if args.url:
            url = args.url
        elif args.db == "sqlite":
            url = f"sqlite:///{tmp / 'load.db'}"
        else:
            server = PrivatePostgres(fsync=True) if args.db == "postgresql" else PrivateMariaDB()
            stack.callback(server.close)
            url = server.start().url()
        report["server"] = server_version(url)
        create_tables(make_app(url))
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        if stored(engine):
            raise SystemExit(f"{url}: celery_taskmeta is not empty; use an empty database")

        # workers (their main processes and pool children are sampled)
        queue = f"load-{os.getpid()}"
        mains: list[subprocess.Popen[bytes]] = []
        for _ in range(args.workers):
            stack.enter_context(
                running_worker(
                    "sql+" + url, args.concurrency, tmp, queue=queue, broker=BROKER, procs=mains
                )
            )
        worker_pids = [p for m in mains for p in [m.pid, *children(m.pid)]]

        # the polling client
        ctx = multiprocessing.get_context("spawn")
        stop = ctx.Event()
        counts = ctx.Array("q", 2)
        poller = ctx.Process(target=poll, args=(url, total, stop, counts), daemon=True)
        poller.start()

        samples: list[dict[str, Any]] = []
        done = threading.Event()
        started = time.monotonic()

        def sample() -> None:
            while not done.is_set():
                rss = {pid: rss_kb(pid) for pid in [*worker_pids, poller.pid or 0]}
                samples.append(
                    {
                        "t": round(time.monotonic() - started, 1),
                        "stored": stored(engine),
                        "rss": rss,
                    }
                )
                done.wait(args.every)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        app = make_app(url, queue)
        add = app.tasks["bench.add"]
        for i in range(total):
            add.apply_async((i, i), task_id=f"load-{i}")
        sent = time.monotonic() - started
        deadline = time.monotonic() + args.timeout
        while stored(engine) < total and time.monotonic() < deadline:
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        done.set()
        sampler.join()
        stop.set()
        poller.join(30)

        # every result: state and value
        backend = app.backend
        wrong = 0
        ids = [f"load-{i}" for i in range(total)]
        got: dict[str, Any] = {}
        for start in range(0, total, 5000):
            got.update(backend.get_many(ids[start : start + 5000], max_iterations=1))
        for i, task_id in enumerate(ids):
            meta = got.get(task_id)
            if meta is None or meta["status"] != states.SUCCESS or meta["result"] != 2 * i:
                wrong += 1
        with engine.connect() as conn:
            not_ready = int(
                conn.exec_driver_sql(
                    "SELECT count(*) FROM celery_taskmeta WHERE status <> 'SUCCESS'"
                ).scalar_one()
            )
        logs = "".join(p.read_text(errors="replace") for p in tmp.glob("*.log"))
        report.update(
            url=url.split("@")[-1],
            sent_s=round(sent, 1),
            elapsed_s=round(elapsed, 1),
            throughput=round(total / elapsed),
            lost=total - len(got),
            wrong=wrong,
            not_success_rows=not_ready,
            worker_errors=logs.count("ERROR/") + logs.count("Traceback"),
            retries=logs.count("failed at"),
            polls=counts[0],
            poll_errors=counts[1],
            samples=samples,
            pids={"workers": worker_pids, "poller": poller.pid},
        )
        engine.dispose()
    return report


def server_version(url: str) -> str:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                return "SQLite " + str(conn.exec_driver_sql("select sqlite_version()").scalar())
            return str(conn.exec_driver_sql("select version()").scalar()).split(" on ")[0]
    finally:
        engine.dispose()


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = Path("/proc/meminfo").read_text().split()[1]
    gib = int(mem) // 1024 // 1024
    return f"{os.cpu_count()} CPUs ({cpu}), {gib} GiB, Python {platform.python_version()}"


def markdown(r: dict[str, Any]) -> str:
    samples = r["samples"]
    pids = [*r["pids"]["workers"], r["pids"]["poller"]]
    names = {pid: f"worker {n // (1 + r['args']['concurrency']) + 1} "
             + ("main" if n % (1 + r["args"]["concurrency"]) == 0 else "pool")
             for n, pid in enumerate(r["pids"]["workers"])}  # fmt: skip
    names[r["pids"]["poller"]] = "polling client"
    lines = [
        f"- machine: {machine()}; server: {r['server']}",
        f"- command: `python -m bench.load {' '.join(sys.argv[1:])}`".replace("  ", " "),
        f"- {r['total']} tasks ({r['args']['workers']} workers x {r['args']['tasks']}, "
        f"concurrency {r['args']['concurrency']}, result_extended): all stored in "
        f"{r['elapsed_s']} s = **{r['throughput']} tasks/s** (sent in {r['sent_s']} s)",
        f"- lost {r['lost']}, wrong {r['wrong']}, rows not SUCCESS {r['not_success_rows']}, "
        f"worker errors {r['worker_errors']}, retried writes {r['retries']}; "
        f"poller: {r['polls']} reads, {r['poll_errors']} errors",
        "",
        "| process | RSS at 10 % (MB) | RSS at end (MB) | peak RSS (MB) |",
        "|---|---|---|---|",
    ]
    total = r["total"]
    early = next((s for s in samples if s["stored"] >= total * 0.1), samples[0])
    for pid in pids:
        series = [s["rss"].get(pid) or s["rss"].get(str(pid)) for s in samples]
        series = [v for v in series if v]
        if not series:
            continue
        first = early["rss"].get(pid) or early["rss"].get(str(pid)) or series[0]
        lines.append(
            f"| {names.get(pid, pid)} | {first / 1024:.1f} | {series[-1] / 1024:.1f} | "
            f"{max(series) / 1024:.1f} |"
        )
    lines += ["", "RSS (MB) over the run:", "", "| t (s) | stored | " + " | ".join(
        names.get(p, str(p)) for p in pids) + " |", "|---" * (len(pids) + 2) + "|"]  # fmt: skip
    step = max(1, len(samples) // 12)
    shown = samples[::step]
    if shown[-1] is not samples[-1]:
        shown.append(samples[-1])
    for s in shown:
        cells = [f"{(s['rss'].get(p) or s['rss'].get(str(p)) or 0) / 1024:.1f}" for p in pids]
        lines.append(f"| {s['t']} | {s['stored']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", choices=("postgresql", "mysql", "sqlite"), default="postgresql")
    parser.add_argument("--url", help="an empty database of your own (SQLAlchemy URL)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=1, help="pool processes per worker")
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks per worker")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--json", type=Path, default=Path("bench-load.json"))
    args = parser.parse_args()
    report = run(args)
    args.json.write_text(json.dumps(report, indent=1, default=str))
    print(markdown(report))
    bad = report["lost"] or report["wrong"] or report["worker_errors"] or report["poll_errors"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
