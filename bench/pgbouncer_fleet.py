"""Many prefork workers through PgBouncer (transaction mode) with a small server pool.

Issue #23's scale proof: ``--workers`` prefork workers of ``--concurrency``
children each, all started at once on an empty database, store their results
through PgBouncer (``sqlresults_pooler = "transaction"``, a server pool of
``--pool``); a client sends ``--tasks`` tasks through it and joins them with
``LISTEN`` on the direct URL (``sqlresults_listen_url``). Every result is looked
for in the table, the workers' logs are searched for errors, and the server's
sessions on the database are counted throughout (tests/fleet.py). Prints Markdown.

    python -m bench.pgbouncer_fleet --workers 25 --concurrency 8 --tasks 4000 [--nap 1]

``--nap S``: each task sleeps S seconds, so that every child holds tasks at once
(instant tasks are kept up with by fewer children). Figures: docs/scaling.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from tests.clusters import ROOT, PgBouncer
from tests.fleet import run_fleet

PG = os.environ.get("SQLRESULTS_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BROKER = os.environ.get("BENCH_FLEET_BROKER", "redis://127.0.0.1:6379/7")
DATABASE = "sqlr_bench_fleet"
#: Its own PgBouncer (port, directory): the test suite's on 56432 may be running.
BOUNCER_PORT = 56440


def _empty_database(name: str) -> str:
    admin = sa.create_engine(PG, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    admin.dispose()
    return sa.engine.make_url(PG).set(database=name).render_as_string(hide_password=False)


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=25)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=4000)
    parser.add_argument("--pool", type=int, default=20, help="PgBouncer's default_pool_size")
    parser.add_argument("--nap", type=float, default=0.0, help="each task sleeps this long")
    parser.add_argument("--ready-timeout", type=float, default=900)
    parser.add_argument("--logs", type=Path, default=None, help="keep the workers' logs here")
    args = parser.parse_args()

    direct = _empty_database(DATABASE)
    bouncer = PgBouncer(
        sa.engine.make_url(PG).port or 5432,
        root=ROOT / "pgbouncer-fleet",
        pool_size=args.pool,
        port=BOUNCER_PORT,
    ).start()
    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="sqlr-fleet-"))
    load_before = _load()
    started = time.monotonic()
    try:
        out = run_fleet(
            bouncer.url(DATABASE),
            direct,
            BROKER,
            args.workers,
            args.concurrency,
            args.tasks,
            log_dir,
            ready_timeout=args.ready_timeout,
            nap=args.nap,
        )
    finally:
        bouncer.close()
    total_s = time.monotonic() - started
    seen = out.activity
    print(f"machine: {platform.node()}, {os.cpu_count()} cores (shared with other sessions)")
    print(f"load average (1/5/15 min) before: {load_before}; after: {_load()}")
    print(f"workers' logs: {log_dir}\n")
    print(
        "| workers | processes | start-up errors | all ready after | tasks | lost | failed "
        "| max server sessions (pool + listeners + others) | pool size | wall time | stores/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {out.workers} | {out.processes} | {len(out.startup_errors) + len(out.exited)} "
        f"| {out.ready_s:.0f} s | {out.tasks} | {out.lost} | {out.failed} "
        f"| {seen.total} ({seen.pooled} + {seen.listeners} + {seen.others}) | {args.pool} "
        f"| {out.wall_s:.1f} s | {out.stores_per_s:.0f} |"
    )
    print(
        f"\n{seen.samples} samples of pg_stat_activity; errors after start-up: "
        f"{len(out.run_errors)}; workers that created the tables: {out.creators}; "
        f"children that ran tasks: {out.children} of {out.processes}; "
        f"whole run {total_s:.0f} s"
    )
    kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(seen.by_kind.items()))
    print(f"most sessions at once by backend_type/application_name: {kinds}")
    for line in (out.exited + out.startup_errors + out.run_errors)[:20]:
        print("  ", line)


if __name__ == "__main__":
    main()
