"""Figures, ratios, targets and the Markdown of ``docs/benchmarks.md``."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata

from . import config
from .config import Sizes


@dataclass
class Results:
    """Figures by key: Redis once, sql+ and db+ per database (``per_db[kind][backend]``).

    ``per_db[kind]["redis"]`` holds the Redis figures measured next to that
    database (figure 2); they take precedence over the run-wide ones.
    """

    redis: dict[str, float] = field(default_factory=dict)
    per_db: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    #: Figure 9 (PostgreSQL): ``sql`` (default), ``sql_off``, ``redis`` -> figures, taking turns.
    interleaved: dict[str, dict[str, float]] = field(default_factory=dict)
    #: What ``sqlresults_notify_rows = "auto"`` decided on PostgreSQL (None: not measured).
    rows_travel: bool | None = None

    def value(self, kind: str, backend: str, key: str) -> float | None:
        if backend == "redis":
            beside = self.per_db.get(kind, {}).get("redis", {})
            return beside.get(key, self.redis.get(key))
        return self.per_db.get(kind, {}).get(backend, {}).get(key)


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str  # "/s" (higher is better), "ms" or "s" (lower is better)
    others: str | None = None  # key of db+'s and Redis' figure, if not ``key``
    own: str | None = None  # key of sql+'s figure, if not ``key`` (a variant of the others)

    def key_for(self, backend: str) -> str:
        if backend == "sql":
            return self.own or self.key
        return self.others or self.key

    @property
    def higher_is_better(self) -> bool:
        return self.unit == "/s"

    def format(self, value: float | None) -> str:
        if value is None:
            return "—"
        if self.unit == "/s":
            return f"{value:,.0f}/s"
        if self.unit == "s":
            return f"{value:.2f} s"
        return f"{value:.1f} ms" if value < 100 else f"{value:,.0f} ms"


def figures(sizes: Sizes) -> list[Figure]:
    return [
        Figure("store_client", "1. store_result, client", "/s"),
        Figure("get_client", "1. get_task_meta, client", "/s"),
        Figure("store_child", "2. store_result, prefork child", "/s"),
        Figure("get_child", "2. get_task_meta, prefork child", "/s"),
        Figure(
            "store_child_relaxed",
            "2. store_result, prefork child, sql+ with sqlresults_durable_commit=False",
            "/s",
            others="store_child",
        ),
        Figure(
            "store_child_durable",
            "2. store_result, prefork child, vs Redis with `appendfsync always` (durable)",
            "/s",
            own="store_child",
        ),
        Figure(
            "store_driver_child",
            "2. ceiling: sql+'s upsert on the bare driver in the child (no Celery, no SQLAlchemy)",
            "/s",
            others="store_child",
        ),
        Figure(
            "store_driver_child_relaxed",
            "2. ceiling: the same upsert on the bare driver, durable commit off",
            "/s",
            others="store_child",
        ),
        Figure(
            "get_driver_child",
            "2. ceiling: sql+'s read on the bare driver in the child (no Celery, no SQLAlchemy)",
            "/s",
            others="get_child",
        ),
        Figure("read", f"3. read {sizes.read} stored results (ResultSet join)", "ms"),
        Figure("rt_p50", "4. add.delay().get() p50", "ms"),
        Figure("rt_p90", "4. add.delay().get() p90", "ms"),
        Figure("group", f"5. group of {sizes.group}: send + join", "s"),
        Figure("chord", f"6. chord of {sizes.chord}: call to body result", "s"),
        Figure("big_chord", f"6. chord of {sizes.big_chord}: call to body result", "s"),
        Figure("startup_empty", "7. startup, empty db: construct backend", "ms"),
        Figure("startup_empty_first", "7. startup, empty db: construct + first call", "ms"),
        Figure("startup_ready", "7. startup, ready db: construct backend", "ms"),
        Figure("startup_ready_first", "7. startup, ready db: construct + first call", "ms"),
        Figure("publish", "8. apply_async, no worker (sql+: record on publish off)", "/s"),
        Figure(
            "publish_recorded",
            "8. apply_async, no worker, sql+ record on publish on",
            "/s",
            "publish",
        ),
    ]


def ratio(fig: Figure, ours: float | None, other: float | None) -> float | None:
    """How many times better ``sql+`` is than ``other`` (> 1: sql+ is better)."""
    if ours is None or other is None or ours <= 0 or other <= 0:
        return None
    return ours / other if fig.higher_is_better else other / ours


def _fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


# ---- targets ---------------------------------------------------------------
@dataclass(frozen=True)
class Goal:
    """``sql+`` must be at least ``min_ratio`` times as good as ``against`` on ``key``."""

    key: str
    against: str  # "db" or "redis"
    min_ratio: float
    text: str
    #: Judged on figure 9 (side by side, taking turns) where it was measured.
    interleaved: bool = False


_PG_GOALS = [
    Goal("store_child", "db", 5.0, "store_result in prefork child ≥ 5x db+"),
    Goal("get_child", "db", 5.0, "get_task_meta in prefork child ≥ 5x db+"),
    Goal("store_child", "redis", 1.0, "store_result in prefork child ≥ 1.0x Redis"),
    Goal("get_child", "redis", 1.0, "get_task_meta in prefork child ≥ 1.0x Redis"),
    Goal("store_client", "db", 20.0, "store_result in client ≥ 20x db+"),
    Goal("get_client", "db", 20.0, "get_task_meta in client ≥ 20x db+"),
    Goal("read", "db", 50.0, "reading the stored results ≥ 50x faster than db+"),
    Goal("read", "redis", 0.5, "reading the stored results within 2x of Redis' time"),
    Goal(
        "rt_p50",
        "redis",
        1 / 1.2,
        ".get() round trip p50 ≤ 1.2x Redis' time (figure 9: side by side)",
        interleaved=True,
    ),
    Goal(
        "group",
        "redis",
        1 / 1.2,
        "group send + join ≤ 1.2x Redis' time (figure 9: side by side)",
        interleaved=True,
    ),
    Goal(
        "chord",
        "redis",
        1.0,
        "chord no slower than Redis (figure 9: side by side)",
        interleaved=True,
    ),
    Goal("big_chord", "redis", 1.0, "big chord no slower than Redis"),
]
_OTHER_GOALS = [
    Goal("store_client", "db", 5.0, "store_result in client ≥ 5x db+"),
    Goal("get_client", "db", 5.0, "get_task_meta in client ≥ 5x db+"),
    Goal("store_child", "db", 5.0, "store_result in prefork child ≥ 5x db+"),
    Goal("get_child", "db", 5.0, "get_task_meta in prefork child ≥ 5x db+"),
]
#: db+ does nothing when a task is published: with record on publish off, neither do we.
_PUBLISH_GOAL = Goal(
    "publish",
    "db",
    0.9,
    "record on publish off costs nothing extra: publish rate ≥ 0.9x db+ (noise)",
)
_PG_GOALS.append(_PUBLISH_GOAL)
_OTHER_GOALS.append(_PUBLISH_GOAL)
GOALS = {"postgresql": _PG_GOALS, "mysql": _OTHER_GOALS, "sqlite": _OTHER_GOALS}


@dataclass(frozen=True)
class Verdict:
    database: str
    goal: Goal
    value: float | None

    @property
    def passed(self) -> bool:
        return self.value is not None and self.value >= self.goal.min_ratio - 1e-9


def verdicts(results: Results, kinds: list[str], sizes: Sizes) -> list[Verdict]:
    figs = {f.key: f for f in figures(sizes)}
    out = []
    for kind in kinds:
        for goal in GOALS[kind]:
            fig = figs[goal.key]
            if goal.interleaved and results.interleaved:
                side = results.interleaved
                value = ratio(fig, side["sql"].get(goal.key), side[goal.against].get(goal.key))
            else:
                other = results.value(kind, goal.against, fig.key_for(goal.against))
                value = ratio(fig, results.value(kind, "sql", goal.key), other)
            out.append(Verdict(kind, goal, value))
    return out


# ---- Markdown ----------------------------------------------------------------
def table(results: Results, kind: str, sizes: Sizes) -> str:
    head = ["Figure", "sql+", "db+", "Redis", "sql+/db+", "sql+/Redis"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for fig in figures(sizes):
        ours, db, red = (results.value(kind, b, fig.key_for(b)) for b in config.BACKENDS)
        if ours is None and fig.others is not None:
            continue  # a sql+ variant not measured on this database
        if red is None and fig.own is not None:
            continue  # a Redis variant not measured
        cells = [fig.label, fig.format(ours), fig.format(db), fig.format(red)]
        cells += [_fmt_ratio(ratio(fig, ours, db)), _fmt_ratio(ratio(fig, ours, red))]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


#: Figures whose ceiling (the same statements on the bare driver) is measured too.
CEILINGS = {"store_child": "store_driver_child", "get_child": "get_driver_child"}


def targets_section(results: Results, kinds: list[str], sizes: Sizes) -> str:
    lines = ["## Targets", ""]
    lines.append("Ratios oriented as in the tables (> 1 means sql+ is better).")
    lines.append("")
    figs = {f.key: f for f in figures(sizes)}
    for verdict in verdicts(results, kinds, sizes):
        mark = "PASS" if verdict.passed else "FAIL"
        title = config.DB_TITLES[verdict.database]
        line = (
            f"- **{mark}** {title}: {verdict.goal.text} — measured "
            f"{_fmt_ratio(verdict.value)} vs {verdict.goal.against}, "
            f"needs ≥ {verdict.goal.min_ratio:.2f}x"
        )
        bare = CEILINGS.get(verdict.goal.key)
        if bare is not None and not verdict.passed:
            fig, kind, against = figs[bare], verdict.database, verdict.goal.against
            best = ratio(
                fig,
                results.value(kind, "sql", bare),
                results.value(kind, against, fig.key_for(against)),
            )
            line += f"; the bare driver alone reaches {_fmt_ratio(best)}"
            line += _flush_share(results, kind, against, bare)
        lines.append(line)
    lines += ["", *publish_overhead(results, kinds)]
    return "\n".join(lines)


def _flush_share(results: Results, kind: str, against: str, bare: str) -> str:
    """What flushing each commit costs a store (bare driver, with and without), against
    Redis, and the ratio to a Redis that flushes each write too."""
    durable = results.value(kind, "sql", bare)
    relaxed = results.value(kind, "sql", f"{bare}_relaxed")
    other = results.value(kind, against, "store_child")
    if against != "redis" or not durable or not relaxed or not other:
        return ""
    flush_us = 1e6 / durable - 1e6 / relaxed
    line = (
        f", and {relaxed / other:.2f}x with durable commit off: flushing each commit to disk"
        f" costs {flush_us:.0f} µs of its {1e6 / durable:.0f} µs per store, against"
        f" {1e6 / other:.0f} µs for a whole store on {config.LABELS[against]}"
    )
    ours = results.value(kind, "sql", "store_child")
    flushed = results.value(kind, against, "store_child_durable")
    if ours and flushed:
        line += (
            f"; against Redis flushing each write too (`appendfsync always`): {ours / flushed:.2f}x"
        )
    return line


def publish_overhead(results: Results, kinds: list[str]) -> list[str]:
    """What record on publish costs per publish (figure 8, sql+ on vs off): reported, no target."""
    lines = ["Record on publish (one insert-if-absent per publish; reported, no target):", ""]
    for kind in kinds:
        off = results.value(kind, "sql", "publish")
        on = results.value(kind, "sql", "publish_recorded")
        if not off or not on:
            continue
        extra_ms = 1000 / on - 1000 / off
        lines.append(
            f"- {config.DB_TITLES[kind]}: {on:,.0f} publishes/s with it on vs {off:,.0f}/s off "
            f"({on / off:.2f}x the rate, {extra_ms:+.2f} ms per publish)"
        )
    return lines


def machine(servers: Mapping[str, str], load: str) -> list[str]:
    packages = ["celery", "kombu", "SQLAlchemy", "psycopg", "mysqlclient", "PyMySQL", "redis"]
    versions = ", ".join(f"{p} {_version(p)}" for p in packages)
    server_text = ", ".join(f"{name} {version}" for name, version in servers.items())
    return [
        f"- CPU: {_cpu_model()}, {os.cpu_count()} cores; RAM {_ram_gib():.1f} GiB",
        f"- Python {platform.python_version()} on {platform.system()} {platform.release()}",
        f"- celery-sqlresults {_version('celery-sqlresults')} ({_git_state()}); {versions}",
        f"- Servers (all on 127.0.0.1): {server_text}",
        f"- Load average (1 min) {load}",
    ]


def _git_state() -> str:
    """The commit measured, and whether the package had uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=config.ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "celery_sqlresults"],
            cwd=config.ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "git state unknown"
    return f"commit {commit}" + (" + uncommitted changes" if dirty else "")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def method(sizes: Sizes) -> str:
    s = sizes
    return f"""## Method

One run, everything on this machine, backends measured one at a time (never
concurrently) so they do not compete for the cores. `result_extended=True`
everywhere. sql+ and db+ use separate databases on the same server
(`{config.DB_SQL}` and `{config.DB_DBPLUS}`, dropped and recreated at the start; SQLite:
two files in a temporary directory); Redis uses db 14 (flushed at the start) and is
measured once, shown as the reference column of every table, except figures 2 and 8,
measured next to each database. The workers' broker is Redis db 13. Where a figure is
repeated ({s.rounds} rounds), the median is shown.

1. In a plain client process (`app.backend`): {s.ops} `store_result` calls (SUCCESS,
   fresh ids, with a worker-like request so the extended columns are written), then
   {s.ops} `get_task_meta(id, cache=False)` of those ids; {s.warmup} warm-up calls of
   each first; {s.rounds} rounds. **db+ is capped at {s.dbplus_client_ops} calls and
   1 round** here: outside a worker it opens a new connection per call (NullPool). A
   rate needs no scaling.
2. The same, inside the task `bench.measure` executed by a real
   `celery worker --pool=prefork --concurrency=1` (so it uses the worker child's
   engine/pool): {s.ops} calls of each, no cap. sql+, db+ and Redis each have such a
   worker, started side by side, and they **take turns**: {2 * s.rounds} rounds, each
   backend once per round (figures measured minutes apart drifted by up to 40 % for one
   backend and 5 % for another on this machine). On PostgreSQL and SQLite a fourth worker
   takes its turn with `sqlresults_durable_commit = False` (opt-in: PostgreSQL's
   `synchronous_commit = off`, SQLite's `synchronous = NORMAL`): reported, no target (the
   targets are for the durable default). One more worker stores in Redis made durable
   for its turns (`CONFIG SET appendonly yes` and `appendfsync always`, after the
   append-only file's first rewrite; the previous settings put back after each
   turn): reported, no target (Redis' own settings are in the servers line). The
   "ceiling" rows: in sql+'s task, after
   its store and get, sql+'s own upsert and read statements (compiled by SQLAlchemy,
   NOTIFY with its payload included on PostgreSQL; on psycopg prepared and run
   with libpq's blocking `exec_prepared`, the parameters converted before the clock
   starts; the backend sends the same prepared statements and waits through psycopg,
   a few µs more) executed
   {s.ops} times each on one bare DBAPI connection with prebuilt parameters: the
   database and its driver alone, no Celery, SQLAlchemy or pool. The backend can
   approach that rate, not pass it; a failed target below says what ratio even the
   bare driver reaches. The durable-commit-off worker runs the same ceiling loop
   (its own row): the difference between the two is what flushing each commit to
   disk costs a store. A Redis store waits for no disk unless Redis runs with
   `appendfsync always` (its persistence is in the servers line above). The
   ceiling is a tight loop whose code stays in the CPU's caches:
   sampled with py-spy in the worker child (3000 stores, before the libpq path),
   the same psycopg `execute()` of the same statement took 143 µs of CPU per call in
   this loop and 255 µs inside `store_result`, between Celery's, SQLAlchemy's pool
   and our own code. On
   PostgreSQL the client waits for each `bench.measure` with `.get()`, so it listens
   on the results' one channel while the task runs, and every store of the task
   (the ceiling's too) wakes it, as it would wake any waiting client: measured apart,
   one listening process costs a store loop 45-70 µs per store on this machine.
3. The first {s.read} results stored in figure 1 (last round) read with a fresh
   backend instance: `ResultSet([...]).join_native()` if the backend supports native
   join, else `.join()`; {s.rounds} rounds. **db+ reads its {s.dbplus_client_ops}
   stored ids once and the time is scaled by {s.read}/{s.dbplus_client_ops}** (its
   join reads id by id, so its time is linear in ids).
4. `add.delay(1, 1).get()` with a `--concurrency=2` prefork worker: p50/p90 of
   {s.rounds} rounds of {s.roundtrips} calls, each after {s.warmup} warm-up calls, pooled.
   **db+: 1 round of {s.dbplus_roundtrips} calls** (its `.get()` sleeps 0.5 s whenever its
   first check finds the task unfinished).
5. `group(add.s(i, i) for i in range({s.group})).apply_async().get()` wall time,
   same worker; {s.rounds} rounds (db+: 1).
6. `chord(add.s(i, i) for i in range({s.chord}))(tsum.s()).get()` wall time, same
   worker; {s.rounds} rounds (db+: 1); then once with {s.big_chord} header tasks.
7. In-process, as a new process would start (engines closed, schema memo cleared,
   imports not counted): the backend's constructor, and constructor + first
   `get_task_meta`, on an empty database (all tables dropped first) and on a ready
   one; median of {s.startup_repeats}. Celery's db+ creates its tables in its
   constructor too (`database_create_tables_at_setup`, on by default).
8. In a plain client process, `add.apply_async((1, 1))` to a queue of the Redis broker
   that no worker consumes: {s.publish} calls after {s.warmup} warm-up calls, {s.rounds}
   rounds; the queue is purged afterwards (every message must be there). This is what
   publishing costs the caller, backend included: nothing for db+, a result subscription
   for Redis, and for sql+ nothing with `sqlresults_record_on_publish` off (the first row)
   and one insert-if-absent of a PENDING row with it on (the second row, compared with the
   same db+ and Redis figures). Measured after each database's other figures, the
   backends taking turns within each round (sql+ off, sql+ on, db+, Redis); Redis' column
   is the median over its rounds next to every database.
9. PostgreSQL only: figures 4, 5 and 6 (the {s.chord}-task chord) again for sql+ as
   configured by default (`sqlresults_notify_rows = "auto"`), for sql+ with rows off
   (`False`: notifications carry ids, every woken waiter reads its row) and for Redis,
   with the three workers running side by side and taking turns, {2 * s.rounds} rounds
   (its own table below). Figures 4-6 measure the backends minutes apart, and the
   machine's drift between them was as large as their difference (one run: Redis 2.2 ms
   in figure 4, 2.9 ms here; another: a group at 0.66x Redis in figure 5, 1.28x here):
   the `.get()` p50, group and chord targets are judged here, where all run under the
   same conditions.

Ratios: `sql+/db+` and `sql+/Redis` are oriented so that **> 1 means sql+ is better**
(rate ÷ rate for rates, inverted time ÷ time for times). One run on a small machine:
expect ±10-20 % noise when it is otherwise idle, more on the latency figures, and up
to 2x on any figure if something else runs meanwhile (see the load average above)."""


def header(title: str, command: str, date: str, servers: Mapping[str, str], load: str) -> list[str]:
    """A report's first lines: what ran, when, and on what machine."""
    return [
        f"# {title}",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {date}",
        "",
        "Machine:",
        "",
        *machine(servers, load),
        "",
    ]


#: Figure 9's setups, by key, as the report names them.
_SIDE_BY_SIDE = {
    "sql": 'sql+, default (`sqlresults_notify_rows = "auto"`)',
    "sql_off": "sql+, `sqlresults_notify_rows = False`",
    "redis": "Redis",
}


def interleaved_section(results: Results, sizes: Sizes) -> list[str]:
    """Figure 9: the three setups taking turns, and each one's ratio to Redis."""
    figs = results.interleaved
    redis = figs.get("redis", {})
    decided = {True: "rows carried", False: "ids only", None: "not known"}[results.rows_travel]
    lines = [
        "## PostgreSQL: side by side (figure 9, interleaved)",
        "",
        "Three workers side by side, taking turns round after round "
        f"({2 * sizes.rounds} rounds of {max(sizes.roundtrips // 2, 1)} `.get()` calls, "
        f"one group of {sizes.group} and one chord of {sizes.chord} each): differences this "
        "small drown in the drift between figures measured one after another. `auto` "
        f"decided on this server: **{decided}** (rows travel when every role that may log "
        "in to the database may also read and write the results).",
        "",
        f"| Setup | .get() p50 | .get() p90 | group of {sizes.group} | chord of {sizes.chord} "
        "| p50 vs Redis | group vs Redis | chord vs Redis |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def versus(f: Mapping[str, float], key: str) -> float:
        return redis.get(key, 0) / f[key] if f.get(key) else 0

    for key, f in figs.items():
        lines.append(
            f"| {_SIDE_BY_SIDE.get(key, key)} | {f['rt_p50']:.2f} ms | {f['rt_p90']:.2f} ms "
            f"| {f['group']:.2f} s | {f['chord']:.2f} s | {versus(f, 'rt_p50'):.2f}x "
            f"| {versus(f, 'group'):.2f}x | {versus(f, 'chord'):.2f}x |"
        )
    return lines


def render(
    results: Results,
    kinds: list[str],
    sizes: Sizes,
    command: str,
    date: str,
    servers: Mapping[str, str],
    load: str,
) -> str:
    parts = [
        *header("Benchmarks: sql+ vs Celery's db+ vs Redis", command, date, servers, load),
        method(sizes),
        "",
    ]
    for kind in kinds:
        parts += [f"## {config.DB_TITLES[kind]}", "", table(results, kind, sizes), ""]
    if results.interleaved:
        parts += [*interleaved_section(results, sizes), ""]
    parts += [targets_section(results, kinds, sizes), ""]
    return "\n".join(parts)
