"""``GET /metrics`` on a large task table: ``python -m bench.metrics [--rows N] [--out FILE]``.

Fills a fresh PostgreSQL database (``bench_metrics``, dropped first, and again at
the end unless ``--keep``) through the package's schema with ``--rows`` task
results in one ``INSERT … SELECT … generate_series``: a month of history, newest
rows with the highest ids, ``date_created``/``date_started``/``date_done`` all
filled (record on publish and ``task_track_started``), 20 task names. Then
``VACUUM ANALYZE`` and times the scrape in-process (Starlette's TestClient),
the first scrape (which counts the whole table) and later ones (which take the
count a background thread keeps), the count alone, and the histogram query
alone for several windows; prints the plans
(``EXPLAIN (ANALYZE, BUFFERS)``) of the two statements a scrape runs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from celery import Celery
from sqlalchemy.engine import make_url

from celery_sqlresults import ResultQuery, create_tables
from celery_sqlresults import engine as engine_mod
from celery_sqlresults.web import create_app
from celery_sqlresults.web import metrics as web_metrics

from . import config
from .databases import admin_engine, server_versions
from .monitoring import captured, explain
from .report import header

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

DATABASE = "bench_metrics"
WINDOWS = (("10 minutes (the default)", 600), ("1 hour", 3600), ("1 day", 86400))

# States by i % 100: 90 SUCCESS, 6 FAILURE, 2 STARTED, 1 RETRY, 1 PENDING; 20 names,
# skewed. Queue wait i % 50 seconds / 10, run time i % 300 / 100 seconds.
_FILL = """
INSERT INTO celery_taskmeta
    (id, task_id, status, result, date_done, name, worker, retries, queue,
     date_created, date_started)
SELECT
    nextval('task_id_sequence'),
    md5(i::text)::uuid::text,
    s.status,
    convert_to((i % 1000)::text, 'UTF8'),
    CASE WHEN s.status IN ('SUCCESS', 'FAILURE') THEN d.done END,
    'proj.tasks.t' || floor(20 * power(((i::bigint * 2654435761) % 1000) / 1000.0, 2))::int,
    'w' || (i % 8) || '@host',
    0,
    'celery',
    d.done - (i % 300) * interval '10 milliseconds' - (i % 50) * interval '100 milliseconds',
    CASE WHEN s.status <> 'PENDING' THEN d.done - (i % 300) * interval '10 milliseconds' END
FROM generate_series(1, :rows) AS i
CROSS JOIN LATERAL (
    SELECT CASE
        WHEN i % 100 < 90 THEN 'SUCCESS'
        WHEN i % 100 < 96 THEN 'FAILURE'
        WHEN i % 100 < 98 THEN 'STARTED'
        WHEN i % 100 < 99 THEN 'RETRY'
        ELSE 'PENDING'
    END AS status
) AS s
CROSS JOIN LATERAL (
    SELECT :now - (:rows - i) * (interval '30 days' / :rows) AS done
) AS d
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prepare(rows: int) -> Celery:
    admin = admin_engine(config.PG_ADMIN)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
            conn.exec_driver_sql(f"CREATE DATABASE {DATABASE}")
    finally:
        admin.dispose()
    url = make_url(config.PG_ADMIN).set(database=DATABASE).render_as_string(hide_password=False)
    app = Celery("bench-metrics", set_as_current=False)
    app.conf.update(result_backend="sql+" + url, result_extended=True)
    create_tables(app)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    start = time.perf_counter()
    task = app.backend.store.tables.task
    indexes = [i for i in task.indexes if not i.unique]
    with app.backend.store.engine.begin() as conn:  # indexes built once, after the rows
        for index in indexes:
            conn.execute(sa.schema.DropIndex(index, if_exists=True))
        conn.execute(sa.text(_FILL), {"rows": rows, "now": now})
        for index in indexes:
            conn.execute(sa.schema.CreateIndex(index))
    log(f"filled {rows:,} rows in {time.perf_counter() - start:.0f} s")
    with admin_engine(url).connect() as conn:
        conn.exec_driver_sql("VACUUM ANALYZE celery_taskmeta")
    log("VACUUM ANALYZE done")
    return app


def p50_ms(call: Callable[[], Any], runs: int) -> float:
    call()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def measure(app: Celery, runs: int) -> tuple[list[tuple[str, float, str]], list[str], float]:
    """The figures, the plans, and the seconds since the newest row (the windows add them)."""
    engine = app.backend.store.engine
    with engine.connect() as conn:
        newest = conn.execute(sa.text("SELECT max(date_done) FROM celery_taskmeta")).scalar()
    # The rows end when the fill began: each window reaches that much further back, so it
    # holds the rows a live system would have in it.
    lag = (datetime.now(timezone.utc).replace(tzinfo=None) - newest).total_seconds()
    # An app of its own: settings are read once, when its backend is made.
    served = Celery("bench-metrics-served", set_as_current=False)
    served.conf.update(
        result_backend=app.conf.result_backend,
        result_extended=True,
        sqlresults_metrics_window=WINDOWS[0][1] + lag,
    )
    client = TestClient(create_app(served), base_url="http://localhost")
    engine = served.backend.store.engine

    def scrape() -> None:
        assert client.get("/metrics").status_code == 200

    figures: list[tuple[str, float, str]] = []
    with captured(engine) as statements:
        start = time.perf_counter()
        scrape()  # the first: counts the table, then reads the histograms
        first = (time.perf_counter() - start) * 1000
    figures.append(("`GET /metrics`, the first scrape of a process", first, "count and histograms"))
    figures.append(
        ("`GET /metrics`, every later scrape", p50_ms(scrape, runs), "histograms (count: kept)")
    )
    query = ResultQuery(app)
    figures.append(
        (
            f"whole-table count alone (in the background, once per {web_metrics.COUNT_TTL:.0f} s)",
            p50_ms(lambda: query.stats(by_name=True), runs),
            "every row",
        )
    )
    for label, seconds in WINDOWS:
        recent = query.filter(since=timedelta(seconds=seconds + lag))
        n = recent.count()

        def histograms(recent: ResultQuery = recent) -> None:
            recent.durations(web_metrics.BUCKETS, web_metrics.NEWEST)

        read = min(n, web_metrics.NEWEST)
        figures.append(
            (f"histograms alone, window {label}", p50_ms(histograms, runs), f"{read:,} rows read")
        )
    plans = [
        f"```sql\n{statement}\n```\n\n```\n{explain(engine, statement, params)}\n```"
        for statement, params in statements
        if "celery_taskmeta" in statement
    ]
    return figures, plans, lag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics", description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="append the Markdown here")
    parser.add_argument("--keep", action="store_true", help=f"keep the database {DATABASE}")
    parser.add_argument("--reuse", action="store_true", help=f"measure {DATABASE} as it is")
    args = parser.parse_args(argv)
    command = shlex.join([".venv/bin/python", "-m", "bench.metrics", *sys.argv[1:]])
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    if args.reuse:
        url = make_url(config.PG_ADMIN).set(database=DATABASE)
        app = Celery("bench-metrics", set_as_current=False)
        app.conf.update(
            result_backend="sql+" + url.render_as_string(hide_password=False),
            result_extended=True,
        )
        fill = "reused"
    else:
        app = prepare(args.rows)
        fill = f"{time.perf_counter() - start:.0f} s with VACUUM ANALYZE"
    try:
        figures, plans, lag = measure(app, args.runs)
    finally:
        engine_mod.dispose_all()
        if not args.keep:
            with admin_engine(config.PG_ADMIN).connect() as conn:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = f"{load_before:.2f} before the run, {os.getloadavg()[0]:.2f} at its end"
    lines = [
        *header(
            f"`/metrics` on {args.rows:,} stored results (PostgreSQL)",
            command,
            date,
            server_versions(["postgresql"]),
            load,
        ),
        f"Filled in SQL by one `INSERT … SELECT … generate_series` ({fill}): a month of "
        "history, every date column set. The machine is shared with other jobs: figures are "
        f"medians of {args.runs} runs after a warm-up, in-process (`TestClient`). The newest "
        f"row finished {lag:.0f} s before the measuring began (when the fill started): each "
        "window is widened by that much, so it holds what it would on a live system. "
        f"The histograms read at most the newest {web_metrics.NEWEST:,} rows of a window; the "
        f"whole-table count is reused for {web_metrics.COUNT_TTL:.0f} s (`COUNT_TTL`).",
        "",
        "| what | p50 | reads |",
        "|---|---|---|",
        *(f"| {label} | {ms:,.1f} ms | {note} |" for label, ms, note in figures),
        "",
        "### Plans of one scrape",
        "",
        *plans,
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        with args.out.open("a") as out:
            out.write("\n" + text.replace("\n# ", "\n## ", 1).replace("# ", "## ", 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
