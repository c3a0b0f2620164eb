"""Monitoring queries on a large task table: ``python -m bench.monitoring [--rows N] [--out FILE]``.

Fills a fresh PostgreSQL database (``bench_monitoring``, dropped first) through
the package's own schema with ``--rows`` task results in one
``INSERT … SELECT … generate_series`` (a month of history, newest rows with the
highest ids, as a running system writes them; a realistic mix of states,
skewed task names, eight workers), saves a few groups through the backend,
runs ``VACUUM ANALYZE`` (what autovacuum does to a table that size), then times
what the monitoring page and ``celery results`` ask for, twice each: through
:class:`~celery_sqlresults.ResultQuery` and through the HTTP app in-process
(Starlette's TestClient, JSON encoding included). Each figure is the median of
``--runs`` runs after one warm-up. The SQL each API call ran is captured from
the engine and shown with its ``EXPLAIN (ANALYZE, BUFFERS)`` plan; a list or
filter query that scans the whole task table is flagged.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import shlex
import statistics
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from celery import Celery
from celery.result import AsyncResult, GroupResult
from sqlalchemy.engine import make_url

from celery_sqlresults import ResultQuery, create_tables
from celery_sqlresults import engine as engine_mod
from celery_sqlresults.web import app as web_app
from celery_sqlresults.web import create_app

from . import config
from .databases import admin_engine, server_versions
from .report import header

with warnings.catch_warnings():  # Starlette >= 1 prefers httpx2; httpx still works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

DATABASE = "bench_monitoring"
PAGE = 50
DEEP_PAGE = 50
#: Measured groups (size: id); plus small ones so the group table is not trivially tiny.
GROUP_SIZES = (100, 1000)
SMALL_GROUPS = 200

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def task_id(i: int) -> str:
    """The id of generated row ``i``: what ``md5(i::text)::uuid::text`` gives in SQL."""
    return str(uuid.UUID(hashlib.md5(str(i).encode()).hexdigest()))


# ---- filling -------------------------------------------------------------------
# States by i % 100: 90 SUCCESS, 6 FAILURE, 2 STARTED, 1 RETRY, 1 PENDING. Names: 20,
# skewed (t0 about 22 % of rows, t19 about 1 %). A month of history, one row every
# 30 days / rows, newest last; date_done is naive UTC as Celery stores it.
_FILL = """
INSERT INTO celery_taskmeta
    (id, task_id, status, result, date_done, traceback, name, args, kwargs, worker,
     retries, queue)
SELECT
    nextval('task_id_sequence'),
    md5(i::text)::uuid::text,
    s.status,
    CASE WHEN s.status = 'FAILURE'
        THEN convert_to('{"exc_type": "ValueError", "exc_message": ["boom ' || i
                        || '"], "exc_module": "builtins"}', 'UTF8')
        WHEN s.status = 'SUCCESS' THEN convert_to((i % 1000)::text, 'UTF8')
    END,
    :now - (:rows - i) * (interval '30 days' / :rows) - (i % 7) * interval '1 second',
    CASE WHEN s.status = 'FAILURE' THEN
        'Traceback (most recent call last):' || chr(10) || '  File "proj/tasks.py", line '
        || (i % 300) || ', in run' || chr(10) || 'ValueError: boom ' || i
    END,
    'proj.tasks.t' || floor(20 * power(((i::bigint * 2654435761) % 1000) / 1000.0, 2))::int,
    convert_to('[' || i || ', ' || (i % 97) || ']', 'UTF8'),
    convert_to('{}', 'UTF8'),
    'w' || (i % 8) || '@host',
    CASE WHEN s.status = 'RETRY' THEN 1 ELSE 0 END,
    CASE WHEN i % 10 = 0 THEN 'slow' ELSE 'celery' END
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
"""


def prepare(rows: int) -> tuple[Celery, dict[int, str]]:
    """A fresh database holding ``rows`` results and the groups: its app, group ids by size."""
    admin = admin_engine(config.PG_ADMIN)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
            conn.exec_driver_sql(f"CREATE DATABASE {DATABASE}")
    finally:
        admin.dispose()
    url = make_url(config.PG_ADMIN).set(database=DATABASE).render_as_string(hide_password=False)
    app = Celery("bench-monitoring", set_as_current=False)
    app.conf.update(result_backend="sql+" + url, result_extended=True)
    create_tables(app)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    engine = app.backend.store.engine
    start = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(sa.text(_FILL), {"rows": rows, "now": now})
    log(f"filled {rows:,} rows in {time.perf_counter() - start:.1f} s")
    groups: dict[int, str] = {}
    first = max(1, rows - 5000)  # recent tasks, as a group being watched would be
    for n, size in enumerate((*GROUP_SIZES, *([10] * SMALL_GROUPS))):
        group_id = f"group-{n}-{size}"
        lo = first + (n * 7) % max(1, rows - first - size)
        members = [AsyncResult(task_id(i), app=app) for i in range(lo, lo + size)]
        GroupResult(group_id, members, app=app).save(backend=app.backend)
        groups.setdefault(size, group_id)
    with admin_engine(url).connect() as conn:
        start = time.perf_counter()
        conn.exec_driver_sql("VACUUM ANALYZE celery_taskmeta")
        conn.exec_driver_sql("VACUUM ANALYZE celery_tasksetmeta")
        log(f"VACUUM ANALYZE in {time.perf_counter() - start:.1f} s")
    return app, groups


def drop_database() -> None:
    """Drop the benchmark database: a million rows are a few hundred MB on a shared server."""
    engine_mod.dispose_all()
    admin = admin_engine(config.PG_ADMIN)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    finally:
        admin.dispose()


# ---- measuring -------------------------------------------------------------------
@dataclass
class Case:
    """One monitoring request: the Python call and the HTTP path answering the same thing."""

    label: str
    api: Callable[[], Any]
    http: str
    listing: bool  # a list/filter query: must not scan the whole task table
    statements: list[tuple[str, Any]] = field(default_factory=list)
    api_ms: float = 0.0
    http_ms: float = 0.0
    rows: int = 0
    plans: list[str] = field(default_factory=list)


@contextmanager
def captured(engine: sa.Engine) -> Iterator[list[tuple[str, Any]]]:
    """The SQL statements (with parameters) run on ``engine`` inside the block."""
    out: list[tuple[str, Any]] = []

    def grab(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        out.append((statement, params))

    sa.event.listen(engine, "before_cursor_execute", grab)
    try:
        yield out
    finally:
        sa.event.remove(engine, "before_cursor_execute", grab)


def p50_ms(call: Callable[[], Any], runs: int) -> float:
    call()  # warm-up: connections open, statements prepared
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def explain(engine: sa.Engine, statement: str, params: Any) -> str:
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, params)
        text = "\n".join(row[0] for row in cursor.fetchall())
        raw.rollback()
        return text
    finally:
        raw.close()


def _size(value: Any) -> int:
    if isinstance(value, tuple):  # page(): (records, cursor)
        return len(value[0])
    if isinstance(value, (list, dict)):
        return len(value)
    return 1 if value is not None else 0


def cases(app: Celery, groups: dict[int, str], rows: int) -> list[Case]:
    query = ResultQuery(app)
    cursor: str | None = None
    for _ in range(DEEP_PAGE - 1):  # the cursor of page DEEP_PAGE, as a reader paging would get
        _, cursor = query.after(cursor).page(PAGE)
    assert cursor is not None
    single = task_id(rows // 2)
    out = [
        Case("list, first page", lambda: query.page(PAGE), f"/api/tasks?limit={PAGE}", True),
        Case(
            "list, state=FAILURE",
            lambda: query.filter(state="FAILURE").page(PAGE),
            f"/api/tasks?state=FAILURE&limit={PAGE}",
            True,
        ),
        Case(
            "list, state=RETRY (1 %)",
            lambda: query.filter(state="RETRY").page(PAGE),
            f"/api/tasks?state=RETRY&limit={PAGE}",
            True,
        ),
        Case(
            "list, name=proj.tasks.t19 (about 1 %)",
            lambda: query.filter(name="proj.tasks.t19").page(PAGE),
            f"/api/tasks?name=proj.tasks.t19&limit={PAGE}",
            True,
        ),
        Case(
            "list, name=proj.tasks.t1* (glob)",
            lambda: query.filter(name="proj.tasks.t1*").page(PAGE),
            f"/api/tasks?name=proj.tasks.t1*&limit={PAGE}",
            True,
        ),
        Case(
            "list, name=other.* (glob, no match: worst case)",
            lambda: query.filter(name="other.*").page(PAGE),
            f"/api/tasks?name=other.*&limit={PAGE}",
            True,
        ),
        Case(
            "list, state=FAILURE and name=proj.tasks.t19",
            lambda: query.filter(state="FAILURE", name="proj.tasks.t19").page(PAGE),
            f"/api/tasks?state=FAILURE&name=proj.tasks.t19&limit={PAGE}",
            True,
        ),
        Case(
            f"list, page {DEEP_PAGE} (keyset cursor)",
            lambda: query.after(cursor).page(PAGE),
            f"/api/tasks?limit={PAGE}&cursor={cursor}",
            True,
        ),
        Case(
            "list, since=1h",
            lambda: query.filter(since="1h").page(PAGE),
            f"/api/tasks?since=1h&limit={PAGE}",
            True,
        ),
        Case(
            "stats, since=1h",
            lambda: query.filter(since="1h").stats(True),
            "/api/stats?since=1h",
            False,
        ),
        Case(
            "stats, since=24h",
            lambda: query.filter(since="24h").stats(True),
            "/api/stats?since=24h",
            False,
        ),
        Case(
            "stats, all time (the page's default)", lambda: query.stats(True), "/api/stats", False
        ),
        Case("single task", lambda: query.get(single), f"/api/tasks/{single}", False),
    ]
    for size, group_id in sorted(groups.items()):
        if size in GROUP_SIZES:
            out.append(
                Case(
                    f"group of {size}",
                    functools.partial(_group, query, group_id),
                    f"/api/groups/{group_id}",
                    False,
                )
            )
    return out


def _group(query: ResultQuery, group_id: str) -> dict[str, Any]:
    """What ``/api/groups/{id}`` reads: the group row, then its members in one batch."""
    group = query.backend.restore_group(group_id, cache=False)
    assert group is not None
    return query.get_many(r.id for r in group.results)


def measure(app: Celery, groups: dict[int, str], rows: int, runs: int) -> list[Case]:
    query = ResultQuery(app)
    engine = query.store.engine
    # Every HTTP run counts for real: the app's short stats cache would answer repeats.
    web_app.STATS_TTL = 0.0
    client = TestClient(create_app(query), base_url="http://localhost")
    out = cases(app, groups, rows)
    for case in out:
        with captured(engine) as statements:
            case.rows = _size(case.api())
        case.statements = statements
        case.api_ms = p50_ms(case.api, runs)

        def get(path: str = case.http) -> None:
            response = client.get(path)
            if response.status_code != 200:
                raise RuntimeError(f"{path}: {response.status_code} {response.text[:200]}")

        case.http_ms = p50_ms(get, runs)
        case.plans = [explain(engine, sql, params) for sql, params in case.statements]
        log(f"{case.label}: {case.api_ms:.1f} ms / {case.http_ms:.1f} ms, {case.rows} rows")
    return out


def seq_scan(case: Case) -> bool:
    return any("Seq Scan on celery_taskmeta" in plan for plan in case.plans)


# ---- report ----------------------------------------------------------------------
def render(
    results: list[Case], rows: int, runs: int, command: str, fill: str, load_before: float
) -> str:
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = f"{load_before:.2f} before the run, {os.getloadavg()[0]:.2f} at its end"
    lines = [
        *header(
            f"Monitoring queries on {rows:,} stored results (PostgreSQL)",
            command,
            date,
            server_versions(["postgresql"]),
            load,
        ),
        "## Method",
        "",
        f"A fresh database `{DATABASE}` with the package's schema (`create_tables`), filled by "
        f"one `INSERT … SELECT … generate_series` ({fill}): {rows:,} task results over 30 "
        "days, newest with the highest ids; by `i % 100`: 90 % SUCCESS, 6 % FAILURE (with "
        "traceback), 2 % STARTED, 1 % RETRY, 1 % PENDING; 20 task names, skewed "
        "(`proj.tasks.t0` about 22 % of rows, `t19` about 1 %); 8 workers; "
        "`result_extended` columns filled. "
        f"{len(GROUP_SIZES) + SMALL_GROUPS} groups saved through the backend "
        f"(sizes {', '.join(map(str, GROUP_SIZES))} measured, {SMALL_GROUPS} of 10), recent "
        "members. Then `VACUUM ANALYZE`, as autovacuum would.",
        "",
        f"Each row: the median of {runs} runs after one warm-up, through `ResultQuery` (the "
        "Python API: SQL, decoding) and through the HTTP app in-process (`TestClient` on "
        "`create_app`: routing, the same `ResultQuery`, JSON encoding). Pages hold "
        f"{PAGE} rows; page {DEEP_PAGE} is reached with the keyset cursor of page "
        f"{DEEP_PAGE - 1}. The SQL is what the API ran, captured on the engine; its plans "
        "(`EXPLAIN (ANALYZE, BUFFERS)`, one more run) are below. *Items*: what the answer "
        "holds (tasks, task names in the stats, group members). The HTTP runs turn off the "
        "app's stats cache (`STATS_TTL`, 2 s), so each one counts; in service every open page "
        "and client shares one count per 2 s for each distinct stats query.",
        "",
        "## Figures",
        "",
        "| request | items | ResultQuery p50 | HTTP p50 | how `celery_taskmeta` is read |",
        "|---|---|---|---|---|",
    ]
    for case in results:
        plan = "**Seq Scan**" if seq_scan(case) else _access(case)
        lines.append(
            f"| {case.label} (`{_short(case.http)}`) | {case.rows} | {case.api_ms:.1f} ms "
            f"| {case.http_ms:.1f} ms | {plan} |"
        )
    flagged = [c.label for c in results if c.listing and seq_scan(c)]
    lines += [
        "",
        "List and filter queries scanning the whole task table: "
        + (", ".join(flagged) if flagged else "none")
        + ".",
        "",
        "## Plans",
        "",
    ]
    for case in results:
        lines += [f"### {case.label}", ""]
        for (sql, params), plan in zip(case.statements, case.plans, strict=True):
            lines += ["```sql", " ".join(sql.split()), f"-- parameters: {params!r}", "```", ""]
            lines += ["```", plan, "```", ""]
    return "\n".join(lines)


def _access(case: Case) -> str:
    """How the plans reach the task table, e.g. ``Index Scan Backward (ix_…_date_done)``."""
    found: list[str] = []
    for plan in case.plans:
        for line in plan.splitlines():
            text = line.strip().removeprefix("->").strip()
            if "Index" not in text and "Scan on celery_taskmeta" not in text:
                continue
            if " using " in text:  # "Index Scan Backward using ix on celery_taskmeta"
                kind, rest = text.split(" using ", 1)
                index = rest.split(" on ", 1)[0]
            elif " on " in text:  # "Bitmap Index Scan on ix"
                kind, rest = text.split(" on ", 1)
                index = rest.split()[0]
            else:
                continue
            if not index.startswith(("ix_celery_taskmeta", "celery_taskmeta")):
                continue
            entry = f"{kind} ({index})" if index != "celery_taskmeta" else kind
            if entry not in found:
                found.append(entry)
    return ", ".join(found) or "—"


def _short(path: str) -> str:
    return path if len(path) <= 60 else path[:57] + "…"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.monitoring", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="task results to store")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per figure (median)")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown report here")
    parser.add_argument(
        "--keep", action="store_true", help=f"keep the database {DATABASE} (default: drop it)"
    )
    args = parser.parse_args(argv)
    if args.rows < 10_000:
        parser.error("--rows: at least 10000 (the deep page and the groups need them)")
    command = shlex.join([".venv/bin/python", "-m", "bench.monitoring", *sys.argv[1:]])
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    app, groups = prepare(args.rows)
    fill = f"{time.perf_counter() - start:.0f} s in all, with the groups and VACUUM ANALYZE"
    try:
        results = measure(app, groups, args.rows, args.runs)
    finally:
        if not args.keep:
            drop_database()
    text = render(results, args.rows, args.runs, command, fill, load_before)
    table = text.split("## Figures", 1)[1].split("## Plans", 1)[0]
    print(table.strip())
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
