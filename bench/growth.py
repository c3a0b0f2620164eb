"""How cost grows: ``python -m bench.growth [--parts …] [--databases …] [--rows …] [--out FILE]``.

Three parts, each run with sql+, Celery's db+ and Redis side by side, their
turns interleaved so that the shared machine's busy moments fall on all alike:

* ``fresh``: new processes, the first call each makes (:mod:`bench.fresh`);
* ``size``: rates with the task table at 0 and ``--rows`` rows (bulk-loaded in
  SQL, not through Celery; with ``--roundtrips`` a ``.get()`` through a worker
  too), the table's and its indexes' size, then rounds of "store ``--churn``
  expired rows, run ``cleanup()``" for size creep, vacuumed only as autovacuum
  would (PostgreSQL: ``--pg-autovacuum ours|server``);
* ``writers``: 1, 2, 4, 8 prefork children storing at once, aggregate stores/s.

Writes the report (``--out``), its figures as JSON beside it, and the PNG plots
in ``docs/`` (matplotlib).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from statistics import median
from typing import Any

import sqlalchemy as sa
from celery import Celery

from celery_sqlresults.dialects import dialect_for
from celery_sqlresults.dialects.postgresql import AUTOVACUUM

from . import config, ops
from .app import make_app
from .databases import (
    Target,
    add_arguments,
    admin_engine,
    chosen,
    flush_redis,
    prepare,
    redis_fsync_always,
    server_versions,
)
from .fresh import FLOORS, fresh_figures
from .report import header
from .run import side_by_side
from .worker import running_worker

PARTS = ("fresh", "size", "writers")
DOCS = config.ROOT / "docs"
_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ---- bulk loading -----------------------------------------------------------------
#: Row numbers ``:lo`` to ``:hi``, per database.
_SERIES = {
    "postgresql": "generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint)) AS s(i)",
    "mysql": "seq_{lo}_to_{hi} AS s",
    "sqlite": (
        "(WITH RECURSIVE n(i) AS (SELECT :lo UNION ALL SELECT i + 1 FROM n WHERE i < :hi) "
        "SELECT i FROM n) AS s"
    ),
}
_I = {"postgresql": "s.i", "mysql": "s.seq", "sqlite": "s.i"}
#: A 36-character id, spread over the index as uuid4s are.
_TASK_ID = {
    "postgresql": "CAST(md5(:prefix || s.i) AS uuid)::text",
    "mysql": "CONCAT(MD5(CONCAT(:prefix, s.seq)), 'abcd')",
    "sqlite": "lower(hex(randomblob(16))) || 'abcd'",
}
_AGO = {
    "postgresql": "CAST(:now AS timestamp) - ({s}) * interval '1 second'",
    "mysql": "TIMESTAMPADD(SECOND, -({s}), :now)",
    "sqlite": "datetime(:now, '-' || ({s}) || ' seconds')",
}
_BYTES = {
    "postgresql": "convert_to({x}, 'UTF8')",
    "mysql": "CAST({x} AS BINARY)",
    "sqlite": "CAST({x} AS BLOB)",
}


def bulk_load(url: str, lo: int, hi: int, prefix: str, age: int, settle: bool = True) -> float:
    """Rows ``lo``..``hi`` finished ``age`` seconds ago (give or take an hour), in one
    ``INSERT … SELECT`` on the server, with the columns a worker writes; seconds the
    insert took (the vacuum and checkpoint after it, with ``settle``, not counted)."""
    engine = admin_engine(url)
    kind = engine.dialect.name
    try:
        with engine.connect() as conn:
            present = {c["name"]: c for c in sa.inspect(conn).get_columns("celery_taskmeta")}
            i = _I[kind]
            done = _AGO[kind].format(s=f":age + {i} % 3600")
            values = {
                "task_id": _TASK_ID[kind],
                "status": "'SUCCESS'",
                "result": _BYTES[kind].format(x="'4'"),
                "date_done": done,
                "date_created": done,
                "name": "'proj.tasks.add'",
                "args": _BYTES[kind].format(x="'[2, 2]'"),
                "kwargs": _BYTES[kind].format(x="'{}'"),
                "worker": "'celery@host-1'",
                "retries": "0",
                "queue": "'celery'",
            }
            values = {k: v for k, v in values.items() if k in present}
            if dialect_for(kind).id_from_sequence(dict(present["id"])):
                seq = "nextval('task_id_sequence')"
                if kind == "mysql":
                    seq = "NEXTVAL(task_id_sequence)"
                values = {"id": seq, **values}
            series = _SERIES[kind].format(lo=lo, hi=hi)
            sql = (
                f"INSERT INTO celery_taskmeta ({', '.join(values)}) "
                f"SELECT {', '.join(values.values())} FROM {series}"
            )
            now = datetime.now(timezone.utc).replace(tzinfo=None)
            start = time.perf_counter()
            params = {"lo": lo, "hi": hi, "prefix": prefix, "age": age}
            params["now"] = now.isoformat(sep=" ") if kind == "sqlite" else now  # type: ignore[assignment]
            conn.execute(sa.text(sql), params)
            loaded = time.perf_counter() - start
            if not settle:  # churn: what autovacuum does is what is measured
                return loaded
            # As a table that grew over days: vacuumed, analysed, its log checkpointed;
            # else the first stores after the load pay for that load's aftermath.
            if kind == "postgresql":
                conn.exec_driver_sql("VACUUM (ANALYZE) celery_taskmeta")
                conn.exec_driver_sql("CHECKPOINT")
            elif kind == "mysql":
                conn.exec_driver_sql("ANALYZE TABLE celery_taskmeta")
            else:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            return loaded
    finally:
        engine.dispose()


def table_bytes(url: str) -> tuple[float, float]:
    """The task table's bytes and its indexes' (SQLite: the whole file, as table)."""
    engine = admin_engine(url)
    kind = engine.dialect.name
    try:
        with engine.connect() as conn:
            if kind == "postgresql":
                row = conn.exec_driver_sql(
                    "SELECT pg_table_size('celery_taskmeta'), pg_indexes_size('celery_taskmeta')"
                ).one()
            elif kind == "mysql":
                conn.exec_driver_sql("ANALYZE TABLE celery_taskmeta")
                row = conn.exec_driver_sql(
                    "SELECT data_length, index_length FROM information_schema.tables"
                    " WHERE table_schema = DATABASE() AND table_name = 'celery_taskmeta'"
                ).one()
            else:
                pages = conn.exec_driver_sql("PRAGMA page_count").scalar() or 0
                size = conn.exec_driver_sql("PRAGMA page_size").scalar() or 0
                row = (pages * size, 0)
            return float(row[0]), float(row[1])
    finally:
        engine.dispose()


# ---- part 1: table size --------------------------------------------------------------
def _point(
    apps: dict[str, Celery],
    n_ops: int,
    join_ids: int,
    workers: dict[str, Celery] | None = None,
    roundtrips: int = 0,
) -> dict[str, dict[str, float]]:
    """Store/s, get/s (and for sql+ and Redis a join of ``join_ids`` stored ids, ms); with
    ``workers`` (an app per backend whose worker runs), the median ``add.delay().get()``."""
    out: dict[str, dict[str, float]] = {}
    for key, app in apps.items():
        n = n_ops if key != "db" else max(50, n_ops // 10)  # db+: a session per call
        rates = ops.store_get_rates(app.backend, n)
        fig = {"store": rates.store, "get": rates.get}
        if workers and key in workers:
            add = workers[key].tasks["bench.add"]
            calls = roundtrips if key != "db" else max(5, roundtrips // 5)  # db+ polls 0.5 s
            fig["rt"] = median(ops.roundtrips_ms(add, calls, warmup=3))
        if key != "db":
            ids = set(rates.ids[:join_ids])
            wanted = len(ids)  # Redis' get_many empties the set it is given
            start = time.perf_counter()
            got = list(app.backend.get_many(ids, timeout=60))
            fig["join"] = (time.perf_counter() - start) * 1000
            if len(got) != wanted:
                raise RuntimeError(f"{key}: get_many found {len(got)} of {wanted}")
        out[key] = fig
    return out


def autovacuums(url: str) -> int:
    """How many times autovacuum has vacuumed the task table (PostgreSQL)."""
    engine = admin_engine(url)
    try:
        with engine.connect() as conn:
            return int(
                conn.exec_driver_sql(
                    "SELECT autovacuum_count FROM pg_stat_user_tables"
                    " WHERE relid = to_regclass('celery_taskmeta')"
                ).scalar()
                or 0
            )
    finally:
        engine.dispose()


def server_autovacuum(url: str) -> None:
    """Back to the server's autovacuum settings on the task table (``--pg-autovacuum
    server``), to compare with those revision 0008 sets."""
    engine = admin_engine(url)
    names = ", ".join(AUTOVACUUM)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f"ALTER TABLE celery_taskmeta RESET ({names})")
            conn.commit()
    finally:
        engine.dispose()


def autovacuum_limit(url: str) -> tuple[bool, float]:
    """Whether the server runs autovacuum, and the dead rows past which it vacuums the task
    table: its threshold plus its scale factor times the rows (the table's settings, else
    the server's), as autovacuum decides."""
    engine = admin_engine(url)
    try:
        with engine.connect() as conn:
            on, rows, options, threshold, scale = conn.exec_driver_sql(
                "SELECT current_setting('autovacuum') = 'on', c.reltuples, c.reloptions,"
                " current_setting('autovacuum_vacuum_threshold'),"
                " current_setting('autovacuum_vacuum_scale_factor')"
                " FROM pg_class c WHERE c.oid = to_regclass('celery_taskmeta')"
            ).one()
    finally:
        engine.dispose()
    own = dict(str(o).partition("=")[::2] for o in options or ())
    threshold = float(own.get("autovacuum_vacuum_threshold", threshold))
    scale = float(own.get("autovacuum_vacuum_scale_factor", scale))
    return bool(on), threshold + scale * max(float(rows), 0.0)


def vacuum(url: str) -> None:
    engine = admin_engine(url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("VACUUM celery_taskmeta")
    finally:
        engine.dispose()


def wait_for_autovacuum(url: str, seen: int, wait: float) -> float | None:
    """Seconds until autovacuum vacuumed the task table again (``None``: not in ``wait``)."""
    start = time.perf_counter()
    while time.perf_counter() - start < wait:
        if autovacuums(url) > seen:
            return time.perf_counter() - start
        time.sleep(1.0)
    return None


def size_figures(
    target: Target,
    steps: list[int],
    rounds: int,
    churn: int,
    n_ops: int,
    join_ids: int,
    vacuum_wait: float = 0.0,
    server_defaults: bool = False,
    roundtrips: int = 0,
    log_dir: Path | None = None,
) -> dict[str, Any]:
    """Rates at each table size, sizes per million, cleanup time and size across rounds.

    Churn rounds on PostgreSQL wait up to ``vacuum_wait`` seconds after each cleanup for
    autovacuum to visit the table (it wakes once a minute by default), as the hours
    between a day's cleanup and its next results would let it. A server with autovacuum
    off gets the ``VACUUM`` autovacuum would have run, when the dead rows pass its limit
    (reported as emulated). ``roundtrips`` > 0: a worker per backend (``--concurrency=1``)
    and that many ``add.delay().get()`` at each size (db+ a fifth).
    """
    url = target.sql_url
    urls = {"sql": "sql+" + url, "db": "db+" + url, "redis": config.REDIS_RESULTS}
    apps = {key: make_app(u) for key, u in urls.items()}  # db+: on the same tables
    # The control: sql+ on tables that stay empty (the db+ database, unused here), measured
    # in the same rounds, so "vs empty" compares two figures taken a moment apart.
    apps[CONTROL] = make_app("sql+" + target.db_url)
    apps["sql"].backend.get_task_meta("warm")  # the schema
    apps[CONTROL].backend.get_task_meta("warm")
    # First calls (statements compiled and prepared, connections made): not counted. The
    # join is warmed at its full size: PostgreSQL prepares an IN list per length.
    _point(apps, join_ids, join_ids)
    points: list[dict[str, Any]] = []
    loaded = 0
    with contextlib.ExitStack() as stack:
        workers: dict[str, Celery] = {}
        if roundtrips > 0:
            assert log_dir is not None
            for key, u in urls.items():
                queue = stack.enter_context(running_worker(u, 1, log_dir))
                workers[key] = make_app(u, queue=queue)
        for rows in [0, *steps]:
            load_s = 0.0
            if rows > loaded:
                load_s = bulk_load(url, loaded + 1, rows, "live-", 0)
                loaded = rows
                log(f"{target.kind}: loaded {rows:,} rows in {load_s:.0f} s")
            figs = [_point(apps, n_ops, join_ids, workers, roundtrips) for _ in range(2)]
            table, index = table_bytes(url)
            points.append(
                {
                    "rows": rows,
                    "load_s": load_s,
                    "table_bytes": table,
                    "index_bytes": index,
                    **{
                        key: {m: median(f[key][m] for f in figs) for m in figs[0][key]}
                        for key in apps
                    },
                }
            )
            log(f"{target.kind}: {rows:,} rows: {points[-1]['sql']}")
    # Churn: expired rows stored and cleaned up, round after round, over the live ones.
    backend = apps["sql"].backend
    postgres = target.kind == "postgresql"
    if postgres and server_defaults:
        server_autovacuum(url)
    creep = []
    dead = 0  # rows deleted since the last vacuum
    emulated = False
    for r in range(rounds):
        seen = autovacuums(url) if postgres else 0
        load_s = bulk_load(url, 1, churn, f"old{r}-", 2 * 86400, settle=False)
        before = table_bytes(url)
        start = time.perf_counter()
        backend.cleanup()
        cleanup_s = time.perf_counter() - start
        dead += churn
        vacuumed = None
        if postgres:
            running, limit = autovacuum_limit(url)
            if running:
                vacuumed = wait_for_autovacuum(url, seen, vacuum_wait)
            elif dead > limit:
                emulated = True
                start = time.perf_counter()
                vacuum(url)
                vacuumed = time.perf_counter() - start
            if vacuumed is not None:
                dead = 0
        after = table_bytes(url)
        creep.append(
            {
                "round": r + 1,
                "load_s": load_s,
                "cleanup_s": cleanup_s,
                "table_before": before[0],
                "index_before": before[1],
                "table_after": after[0],
                "index_after": after[1],
                "autovacuum_s": vacuumed,
            }
        )
        log(
            f"{target.kind}: churn round {r + 1}: cleanup {cleanup_s:.1f} s, size {after},"
            f" autovacuum after {vacuumed}"
        )
    autovacuum = "server defaults" if server_defaults else "revision 0008"
    if emulated:
        autovacuum += ", emulated: the server runs no autovacuum"
    return {
        "points": points,
        "creep": creep,
        "churn": churn,
        "live": loaded,
        "autovacuum": autovacuum if postgres else None,
    }


# ---- part 2: many writers -------------------------------------------------------------
def writer_figures(
    target: Target, counts: list[int], n: int, repeats: int, log_dir: Path
) -> dict[str, dict[int, float]]:
    """Aggregate stores/s of ``c`` children storing ``n`` results each, per backend."""
    durable = {config.ENV_RELAXED: "0"}
    top = max(counts)
    workers: dict[str, tuple[str, dict[str, str], dict[str, Any]]] = {
        "sql": (target.backend_url("sql"), durable, {}),
        "db": (target.backend_url("db"), durable, {}),
        "redis": (config.REDIS_RESULTS, durable, {}),
    }
    keys = ["sql", "db", "redis", "redis_durable"]
    samples: dict[str, dict[int, list[float]]] = {k: {c: [] for c in counts} for k in keys}
    with side_by_side(workers, top, log_dir) as apps:
        apps["redis_durable"] = apps["redis"]
        for rep in range(repeats):
            for c in counts:
                order = keys[rep % len(keys) :] + keys[: rep % len(keys)]
                for key in order:
                    with contextlib.ExitStack() as turn:
                        if key == "redis_durable" and not turn.enter_context(redis_fsync_always()):
                            continue
                        task = apps[key].tasks["bench.store_many"]
                        # db+ opens a session per call: fewer results, same children
                        each = n if key != "db" else max(100, n // 4)
                        results = [task.delay(each) for _ in range(c)]
                        replies = [r.get(timeout=ops.BULK_TIMEOUT) for r in results]
                    span = max(x["end"] for x in replies) - min(x["start"] for x in replies)
                    samples[key][c].append(sum(x["n"] for x in replies) / span)
                log(
                    f"{target.kind}: {c} writers: "
                    + ", ".join(f"{k} {samples[k][c][-1]:.0f}/s" for k in keys if samples[k][c])
                )
    return {k: {c: median(v) for c, v in s.items() if v} for k, s in samples.items()}


# ---- plots ---------------------------------------------------------------------------
#: sql+ on tables that stay empty, measured beside sql+ at every size (see size_figures).
CONTROL = "sql_empty"


def versus_empty(point: dict[str, Any], empty: dict[str, Any], measure: str) -> float:
    """sql+'s speed at ``point`` over its speed on empty tables: against the control
    measured in the same rounds where the figures have one, else the empty point."""
    if CONTROL in point:
        return _speed(point, "sql", measure) / _speed(point, CONTROL, measure)
    return relative(point, empty, "sql", measure)


def _speed(p: dict[str, Any], key: str, measure: str) -> float:
    value = float(p[key][measure])
    return 1 / value if measure in ("join", "rt") else value  # ms: lower wins


def relative(point: dict[str, Any], empty: dict[str, Any], key: str, measure: str) -> float:
    """``key``'s speed at ``point`` over its speed on the empty table (above 1: faster).

    Redis's own ratio, which no table size touches, says how much of that is the
    machine drifting between the two points.
    """

    return _speed(point, key, measure) / _speed(empty, key, measure)


LABELS = {
    **config.LABELS,
    "redis_durable": "Redis (appendfsync always)",
    "core": "SQLAlchemy Core alone",
    "driver": "driver alone",
}
COLORS = {
    "sql": "#1f77b4",
    "db": "#d62728",
    "redis": "#2ca02c",
    "redis_durable": "#98df8a",
    "core": "#aec7e8",
    "driver": "#c7c7c7",
}


def plot_all(results: dict[str, Any], prefix: str, folder: Path = DOCS) -> list[str]:
    """PNG files in ``docs/`` (names returned); nothing when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    written: list[str] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(name)

    fresh = results.get("fresh", {})
    if fresh:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, measure, title in (
            (axes[0], "first", "first get_task_meta (incl. building the backend)"),
            (axes[1], "join", "first get_many of 1000 ids"),
        ):
            kinds = list(fresh)
            keys = ["sql", "db", "redis", *(f for f in FLOORS if measure == "first")]
            width = 0.8 / len(keys)
            for j, key in enumerate(keys):
                values = [fresh[k].get(key, {}).get(measure, 0.0) for k in kinds]
                xs = [x + (j - (len(keys) - 1) / 2) * width for x in range(len(kinds))]
                ax.bar(xs, values, width, label=LABELS[key], color=COLORS[key])
            ax.set_xticks(range(len(kinds)), [config.SERVER_TITLES[k] for k in kinds])
            ax.set_ylabel("ms (median, lower is better)")
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=8)
        save(fig, f"{prefix}-fresh.png")

    size = results.get("size", {})
    if size:
        db_colors = {"postgresql": "#1f77b4", "mysql": "#ff7f0e", "sqlite": "#9467bd"}
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for ax, measure, title in (
            (axes[0], "store", "store_result / s"),
            (axes[1], "get", "get_task_meta / s"),
            (axes[2], "join", "1000-id get_many (speed)"),
        ):
            for kind, data in size.items():
                rows = [p["rows"] / 1e6 for p in data["points"]]
                for key, style in (("sql", "-o"), ("db", "--s"), ("redis", ":^")):
                    if any(measure not in p[key] for p in data["points"]):
                        continue
                    first = data["points"][0]
                    values = [
                        versus_empty(p, first, measure)
                        if key == "sql"
                        else relative(p, first, key, measure)
                        for p in data["points"]
                    ]
                    label = f"{LABELS[key]} {config.SERVER_TITLES[kind]}"
                    ax.plot(rows, values, style, label=label, color=db_colors[kind])
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.axhspan(0.8, 1.2, color="grey", alpha=0.12, label="within 20 % of empty")
            ax.set_xlabel("rows in the task table (millions)")
            ax.set_ylabel("speed vs the empty table")
            ax.set_title(title, fontsize=10)
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7)
        save(fig, f"{prefix}-size.png")

    writers = results.get("writers", {})
    if writers:
        fig, axes = plt.subplots(1, len(writers), figsize=(5.5 * len(writers), 3.8), squeeze=False)
        for ax, (kind, data) in zip(axes[0], writers.items(), strict=True):
            for key, values in data.items():
                counts = sorted(int(c) for c in values)
                ax.plot(
                    counts,
                    [values[str(c)] if str(c) in values else values[c] for c in counts],
                    "-o",
                    label=LABELS[key],
                    color=COLORS[key],
                )
            ax.set_xscale("log", base=2)
            ax.set_xticks(counts, [str(c) for c in counts])
            ax.set_xlabel("prefork children storing at once")
            ax.set_ylabel("stores / s, all children")
            ax.set_title(f"{config.SERVER_TITLES[kind]}: many writers", fontsize=10)
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=8)
        save(fig, f"{prefix}-writers.png")
    return written


# ---- the report ------------------------------------------------------------------------
def _mb(value: float) -> str:
    return f"{value / 1e6:,.0f} MB"


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if not a or not b else f"{a / b:.2f}x"


def _taken(results: dict[str, Any], parts: list[str], kind: str, argv: list[str] | None) -> None:
    """Record when, by which command and on which server settings a part's figures were taken.

    A merged report holds figures of several runs; the header's servers line is
    only the last run's.
    """
    server = "; ".join(f"{k} {v}" for k, v in server_versions([kind]).items() if k != "Redis")
    command = shlex.join(argv if argv is not None else sys.argv[1:])
    at = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    for part in parts:
        results.setdefault("taken", {}).setdefault(part, {})[kind] = {
            "at": at,
            "args": command,
            "server": server,
        }


def _provenance(results: dict[str, Any]) -> list[str]:
    taken = results.get("taken", {})
    if not taken:
        return []
    lines = ["Where each part's figures come from (this report merges runs):", ""]
    lines += ["| part | database | taken | arguments | server |", "|---|---|---|---|---|"]
    for part in PARTS:
        for kind, run in taken.get(part, {}).items():
            name = config.SERVER_TITLES.get(kind, kind)
            lines.append(f"| {part} | {name} | {run['at']} | `{run['args']}` | {run['server']} |")
    return [*lines, ""]


def render(results: dict[str, Any], command: str, plots: list[str], servers: dict[str, str]) -> str:
    load = " ".join(f"{x:.2f}" for x in __import__("os").getloadavg())
    lines = header(
        "How cost grows: fresh processes, big tables, many writers",
        command,
        datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        servers,
        load,
    )
    lines += [
        "",
        "The backends took turns within each part, so a busy moment of the machine fell",
        "on all of them alike; docs/growth.md says what else ran while these were taken.",
        "",
        *_provenance(results),
    ]
    fresh = results.get("fresh", {})
    if fresh:
        lines += [
            "## Fresh processes",
            "",
            "Each figure is the median over new Python processes (`python -m bench.fresh"
            " --child`), the backends taking turns. *imports*: `import celery` and the"
            " backend's module; *first call*: building the app's backend and its first"
            " `get_task_meta` of a stored id (connect, session set-up, schema check, the"
            " tables' layout); *first join*: in another new process, `get_many` of 1000"
            " stored ids as the first call, then the same again. db+ has no `get_many`."
            " The floors, for the first call, read the same row outside Celery in new"
            " processes too: *Core alone* is SQLAlchemy Core's `create_engine`, a connection"
            " and one text `SELECT`; *driver alone* the driver's connect and that `SELECT`.",
            "",
            "| database | measure | sql+ | db+ | Redis | Core alone | driver alone |"
            " sql+ / Redis | Core alone / Redis | sql+ / db+ |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for kind, figs in fresh.items():
            for measure, title in (
                ("imports", "imports"),
                ("first", "first call"),
                ("join", "first join (1000 ids)"),
                ("join_again", "second join"),
            ):
                row = [figs.get(k, {}).get(measure) for k in ("sql", "db", "redis", *FLOORS)]
                cells = ["—" if v is None else f"{v:.1f} ms" for v in row]
                lines.append(
                    f"| {config.SERVER_TITLES[kind]} | {title} | {' | '.join(cells)} | "
                    f"{_ratio(row[0], row[2])} | {_ratio(row[3], row[2])} |"
                    f" {_ratio(row[0], row[1])} |"
                )
        lines.append("")
        if f"{PREFIX}-fresh.png" in plots:
            lines += [f"![first calls in fresh processes]({PREFIX}-fresh.png)", ""]
    size = results.get("size", {})
    if size:
        lines += [
            "## Table size",
            "",
            "Rows bulk-loaded in SQL (one `INSERT … SELECT`, then PostgreSQL's `VACUUM"
            " (ANALYZE)` and `CHECKPOINT`, MariaDB's `ANALYZE TABLE`, SQLite's WAL"
            " checkpoint, as a table grown over days would be), shaped as a"
            " worker writes them (uuid-like ids spread over the index). At each size: store/s"
            " and get/s of fresh ids in this process (db+ on the same tables, fewer calls),"
            " and a 1000-id `get_many`, the median of two rounds; Redis beside them as the"
            " machine's drift control. *vs empty*: sql+'s speed at that size over its speed"
            " on tables that stay empty (another database on the same server, measured in"
            " the same rounds; where a run has no such control, over the empty point),"
            " 1.00: unchanged, a join's speed is 1 / its time; *Redis drift*: Redis's store"
            " and get at that point over the empty point, which no table size touches.",
            "",
            "| database | rows | table | indexes | sql+ store/s | get/s | join ms |"
            " db+ store/s | get/s | Redis store/s | get/s | sql+ store vs empty |"
            " get vs empty | join vs empty | Redis drift (store / get) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for kind, data in size.items():
            base = data["points"][0]
            for p in data["points"]:
                norm_store = versus_empty(p, base, "store")
                norm_get = versus_empty(p, base, "get")
                norm_join = versus_empty(p, base, "join")
                lines.append(
                    f"| {config.SERVER_TITLES[kind]} | {p['rows']:,} | {_mb(p['table_bytes'])} |"
                    f" {_mb(p['index_bytes'])} | {p['sql']['store']:.0f} |"
                    f" {p['sql']['get']:.0f} | {p['sql']['join']:.1f} |"
                    f" {p['db']['store']:.0f} | {p['db']['get']:.0f} |"
                    f" {p['redis']['store']:.0f} | {p['redis']['get']:.0f} |"
                    f" {norm_store:.2f} | {norm_get:.2f} | {norm_join:.2f} |"
                    f" {relative(p, base, 'redis', 'store'):.2f} /"
                    f" {relative(p, base, 'redis', 'get'):.2f} |"
                )
        lines += ["", "Size per million results (table + indexes, at the largest size):", ""]
        for kind, data in size.items():
            last = data["points"][-1]
            if last["rows"]:
                per = (last["table_bytes"] + last["index_bytes"]) / (last["rows"] / 1e6)
                lines.append(
                    f"* {config.SERVER_TITLES[kind]}: {_mb(per)} per million "
                    f"({_mb(last['table_bytes'] / (last['rows'] / 1e6))} table, "
                    f"{_mb(last['index_bytes'] / (last['rows'] / 1e6))} indexes); "
                    f"loading {last['rows']:,} rows took {last['load_s']:.0f} s"
                )
        if any("rt" in p["sql"] for data in size.values() for p in data["points"]):
            lines += [
                "",
                "`.get()` round trip: `add.delay(1, 1).get()` with a worker per backend"
                " (`--concurrency=1`, all running at once), the median of `--roundtrips`"
                " calls (db+ a fifth: its `.get()` polls every 0.5 s), twice at each size;"
                " *vs empty* as above (speed, 1 / time), Redis's beside it.",
                "",
                "| database | rows | sql+ | db+ | Redis | sql+ / Redis | sql+ vs empty |"
                " Redis vs empty |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for kind, data in size.items():
                base = data["points"][0]
                for p in data["points"]:
                    if "rt" not in p["sql"]:
                        continue
                    lines.append(
                        f"| {config.SERVER_TITLES[kind]} | {p['rows']:,} |"
                        f" {p['sql']['rt']:.1f} ms | {p['db']['rt']:.0f} ms |"
                        f" {p['redis']['rt']:.1f} ms |"
                        f" {_ratio(p['redis']['rt'], p['sql']['rt'])} |"
                        f" {relative(p, base, 'sql', 'rt'):.2f} |"
                        f" {relative(p, base, 'redis', 'rt'):.2f} |"
                    )
        lines += [
            "",
            "Churn: each round bulk-loads the given number of rows finished two days ago"
            " over the live ones, then runs `backend.cleanup()` (what beat's"
            " `celery.backend_cleanup` runs; `result_expires` one day) and measures the"
            " sizes again (PostgreSQL: once autovacuum has visited the table, or after"
            " `--vacuum-wait` seconds without it, the autovacuum column). Steady sizes mean"
            " the space of deleted rows is reused.",
            "",
            "| database | live rows | round | expired rows | cleanup | autovacuum |"
            " table after | indexes after |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for kind, data in size.items():
            for c in data["creep"]:
                vacuumed = c.get("autovacuum_s")
                av = "—" if vacuumed is None else "vacuumed"
                if data.get("autovacuum"):
                    av += f" ({data['autovacuum']})"
                lines.append(
                    f"| {config.SERVER_TITLES[kind]} | {data['live']:,} | {c['round']} |"
                    f" {data['churn']:,} | {c['cleanup_s']:.1f} s | {av} |"
                    f" {_mb(c['table_after'])} | {_mb(c['index_after'])} |"
                )
        lines.append("")
        if f"{PREFIX}-size.png" in plots:
            lines += [f"![rates against table size]({PREFIX}-size.png)", ""]
    writers = results.get("writers", {})
    if writers:
        lines += [
            "## Many writers",
            "",
            "One prefork worker per backend, all running at once; for each count of"
            " children, that many `bench.store_many` tasks sent together, each storing"
            " its results one after another (after a warm-up); the aggregate is all"
            " results over the span from the first start to the last end. db+ stores a"
            " quarter as many per child (a session per call). Redis (appendfsync always)"
            " is the Redis worker while `CONFIG SET` makes every write wait for the disk.",
            "",
            "| database | children | sql+ | db+ | Redis | Redis (fsync always) |"
            " sql+ / Redis | sql+ / Redis (fsync) | sql+ / db+ |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for kind, data in writers.items():
            counts = sorted({int(c) for v in data.values() for c in v})
            for c in counts:
                v = {k: data.get(k, {}).get(c, data.get(k, {}).get(str(c))) for k in data}
                cells = [
                    "—" if v.get(k) is None else f"{v[k]:.0f}/s"
                    for k in ("sql", "db", "redis", "redis_durable")
                ]
                lines.append(
                    f"| {config.SERVER_TITLES[kind]} | {c} | {' | '.join(cells)} |"
                    f" {_ratio(v.get('sql'), v.get('redis'))} |"
                    f" {_ratio(v.get('sql'), v.get('redis_durable'))} |"
                    f" {_ratio(v.get('sql'), v.get('db'))} |"
                )
        lines.append("")
        if f"{PREFIX}-writers.png" in plots:
            lines += [f"![stores per second against writers]({PREFIX}-writers.png)", ""]
    return "\n".join(lines) + "\n"


PREFIX = "growth"


def _ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.growth", description=__doc__)
    add_arguments(parser)
    parser.add_argument("--parts", default=",".join(PARTS), help="subset of " + ",".join(PARTS))
    parser.add_argument("--rows", default="1000000,10000000", help="table sizes to measure")
    parser.add_argument("--sqlite-rows", default="1000000", help="table sizes on SQLite")
    parser.add_argument("--churn", type=int, default=1_000_000, help="expired rows per round")
    parser.add_argument(
        "--sqlite-churn",
        type=int,
        default=100_000,
        help="expired rows per round on SQLite (10 %% of its table, as --churn is of 10 million)",
    )
    parser.add_argument("--rounds", type=int, default=10, help="churn rounds")
    parser.add_argument(
        "--vacuum-wait",
        type=float,
        default=90.0,
        help="PostgreSQL: seconds each churn round waits for autovacuum after the cleanup",
    )
    parser.add_argument(
        "--roundtrips",
        type=int,
        default=0,
        help="add.delay().get() calls per backend at each table size, with a worker (0: none)",
    )
    parser.add_argument(
        "--pg-autovacuum",
        choices=("ours", "server"),
        default="ours",
        help="PostgreSQL churn with revision 0008's autovacuum settings, or the server's",
    )
    parser.add_argument(
        "--fresh", type=int, default=21, help="fresh processes per backend (fewer: noisier medians)"
    )
    parser.add_argument("--writers", default="1,2,4,8", help="children storing at once")
    parser.add_argument("--writes", type=int, default=2000, help="results per child")
    parser.add_argument("--writer-repeats", type=int, default=2)
    parser.add_argument("--ops", type=int, default=1000, help="calls per rate")
    parser.add_argument(
        "--merge", type=Path, default=None, help="figures (JSON) of an earlier run to keep"
    )
    args = parser.parse_args(argv)
    kinds = chosen(parser, args)
    parts = [p for p in args.parts.split(",") if p]
    out = args.out or DOCS / "growth-benchmarks.md"
    figures = out.with_suffix(".json")
    results: dict[str, Any] = {}
    if args.merge is not None and args.merge.exists():
        results = json.loads(args.merge.read_text())
    flush_redis()
    with tempfile.TemporaryDirectory(prefix="bench-growth-") as tmp_name:
        tmp = Path(tmp_name)
        for part in parts:  # a merged run keeps the other databases' figures of a part
            results.setdefault(part, {})
        for kind in kinds:
            if "fresh" in parts:
                target = prepare(kind, tmp)
                urls = {
                    "sql": target.backend_url("sql"),
                    "db": target.backend_url("db"),
                    "redis": config.REDIS_RESULTS,
                }
                urls.update(dict.fromkeys(FLOORS, urls["sql"]))  # they read sql+'s row
                results["fresh"][kind] = fresh_figures(urls, args.fresh, 1000, tmp, log)
                log(f"{kind}: fresh {results['fresh'][kind]}")
            if "size" in parts:
                steps = _ints(args.sqlite_rows if kind == "sqlite" else args.rows)
                earlier = results["size"].get(kind, {})
                results["size"][kind] = size_figures(
                    prepare(kind, tmp),
                    steps,
                    args.rounds,
                    args.sqlite_churn if kind == "sqlite" else args.churn,
                    args.ops,
                    1000,
                    args.vacuum_wait,
                    args.pg_autovacuum == "server",
                    args.roundtrips,
                    tmp,
                )
                if args.rounds == 0 and earlier.get("creep"):  # rates again, churn kept
                    for key in ("creep", "churn", "live", "autovacuum"):
                        results["size"][kind][key] = earlier.get(key)
            if "writers" in parts and kind != "sqlite":
                results["writers"][kind] = writer_figures(
                    prepare(kind, tmp),
                    _ints(args.writers),
                    args.writes,
                    args.writer_repeats,
                    tmp,
                )
            _taken(results, [p for p in parts if p != "writers" or kind != "sqlite"], kind, argv)
            figures.write_text(json.dumps(results, indent=1, default=str))
    plots = plot_all(json.loads(figures.read_text()), PREFIX, out.parent)  # beside the report
    command = "python -m bench.growth " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = render(json.loads(figures.read_text()), command, plots, server_versions(kinds))
    out.write_text(text)
    log(f"wrote {out} and {', '.join(plots) or 'no plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
