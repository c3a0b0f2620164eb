"""Run the benchmark: ``python -m bench.run [--quick] [--databases …] [--out FILE]``.

sql+ (this package), Celery's db+ and Redis, one after another, on the
local servers only; see ``docs/benchmarks.md`` for the method.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from statistics import median
from typing import Any

from celery import Celery
from celery.signals import before_task_publish

from celery_sqlresults import publish as sqlresults_publish

from . import config, ops
from .app import make_app
from .config import Sizes
from .databases import (
    Target,
    add_arguments,
    chosen,
    flush_redis,
    prepare,
    redis_fsync_always,
    server_versions,
)
from .plots import BARS, draw_bars, from_results, save_results
from .report import Results, render, table, targets_section
from .startup import startup_figures
from .worker import running_worker

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.kinds = chosen(parser, args)
    return args


# ---- one backend ---------------------------------------------------------------
def client_figures(url: str, sizes: Sizes, capped: bool) -> dict[str, float]:
    """Figures 1 and 3, in this (client) process."""
    n = sizes.dbplus_client_ops if capped else sizes.ops
    rounds = 1 if capped else sizes.rounds
    backend = make_app(url).backend
    runs = [ops.store_get_rates(backend, n, sizes.warmup) for _ in range(rounds)]
    ids = runs[-1].ids[: sizes.read]
    # A fresh backend instance per read: nothing cached.
    reads = [ops.read_seconds(make_app(url), ids) for _ in range(rounds)]
    return {
        "store_client": median(r.store for r in runs),
        "get_client": median(r.get for r in runs),
        "read": median(reads) * 1000 * sizes.read / len(ids),
    }


@contextlib.contextmanager
def side_by_side(
    workers: dict[str, tuple[str, dict[str, str], dict[str, Any]]],
    concurrency: int,
    log_dir: Path,
) -> Iterator[dict[str, Celery]]:
    """A running prefork worker per key (backend URL, worker environment, client app
    options), all at once; yields a client app per key, routed to its worker's queue.
    The workers are stopped on exit."""
    with contextlib.ExitStack() as stack:
        apps = {}
        for key, (url, env, options) in workers.items():
            queue = stack.enter_context(running_worker(url, concurrency, log_dir, env=env))
            apps[key] = make_app(url, queue=queue, **options)
        yield apps


def child_figures(target: Target, sizes: Sizes, log_dir: Path) -> dict[str, dict[str, float]]:
    """Figure 2: the rates inside a task of a ``--concurrency=1`` prefork worker.

    sql+, db+ and Redis (and, where it exists, sql+ with
    ``sqlresults_durable_commit = False``: key ``sql_relaxed``; and Redis made
    durable for its turns: key ``redis_durable``) each get a worker, started
    side by side; the workers take turns, round after round, so the machine's
    drift between minutes hits every backend alike (measured one after
    another, minutes apart, Redis' rate moved by 40 % between runs while ours
    moved by 5 %). Each figure is the median of the rounds.
    """
    durable, relaxed = {config.ENV_RELAXED: "0"}, {config.ENV_RELAXED: "1"}
    workers: dict[str, tuple[str, dict[str, str], dict[str, Any]]] = {
        "sql": (target.backend_url("sql"), durable, {}),
        "db": (target.backend_url("db"), durable, {}),
        "redis": (config.REDIS_RESULTS, durable, {}),
        "redis_durable": (config.REDIS_RESULTS, durable, {}),
    }
    if target.kind in RELAXABLE:
        workers["sql_relaxed"] = (target.backend_url("sql"), relaxed, {})
    replies: dict[str, list[dict[str, list[float]]]] = {key: [] for key in workers}
    with side_by_side(workers, 1, log_dir) as apps:
        measures = {key: app.tasks["bench.measure"] for key, app in apps.items()}
        for _ in range(2 * sizes.rounds):
            for key, measure in measures.items():
                with contextlib.ExitStack() as turn:
                    if key == "redis_durable" and not turn.enter_context(redis_fsync_always()):
                        continue  # Redis refused CONFIG: not measured
                    reply = measure.delay(sizes.ops, sizes.warmup, 1).get(timeout=ops.BULK_TIMEOUT)
                replies[key].append(reply)

    def rate(key: str, name: str) -> float:
        return median(r[name][0] for r in replies[key])

    out = {
        key: {"store_child": rate(key, "store"), "get_child": rate(key, "get")}
        for key in replies
        if replies[key]
    }
    out["sql"]["store_driver_child"] = rate("sql", "driver_store")
    out["sql"]["get_driver_child"] = rate("sql", "driver_get")
    if "sql_relaxed" in out:  # its write's ceiling: what the commit's flush costs
        out["sql_relaxed"]["store_driver_child"] = rate("sql_relaxed", "driver_store")
    return out


def worker_figures(url: str, sizes: Sizes, log_dir: Path, capped: bool) -> dict[str, float]:
    """Figures 4-6 with a ``--concurrency=2`` prefork worker."""
    rounds = 1 if capped else sizes.rounds
    with running_worker(url, 2, log_dir) as queue:
        app = make_app(url, queue=queue)
        add, tsum = app.tasks["bench.add"], app.tasks["bench.tsum"]
        n = sizes.dbplus_roundtrips if capped else sizes.roundtrips
        # Every round's calls pooled: one noisy stretch moves a single round's p50.
        samples = [ms for _ in range(rounds) for ms in ops.roundtrips_ms(add, n, sizes.warmup)]
        return {
            "rt_p50": ops.percentile(samples, 50),
            "rt_p90": ops.percentile(samples, 90),
            "group": median(ops.group_seconds(add, sizes.group) for _ in range(rounds)),
            "chord": median(ops.chord_seconds(add, tsum, sizes.chord) for _ in range(rounds)),
            "big_chord": ops.chord_seconds(add, tsum, sizes.big_chord),
        }


def interleaved_figures(sql_url: str, sizes: Sizes, log_dir: Path) -> dict[str, dict[str, float]]:
    """Figure 9: ``.get()``, a group and a chord, sql+ by default and with rows off, and Redis.

    Their differences are smaller than this machine's drift from one figure to
    the next, so the three run side by side (a worker each) and take turns,
    round after round; each figure pools every round's samples. Keys: ``sql``
    (the default, ``sqlresults_notify_rows = "auto"``), ``sql_off`` and ``redis``.
    """
    setups = {
        "sql": (sql_url, None),
        "sql_off": (sql_url, False),
        "redis": (config.REDIS_RESULTS, None),
    }
    n = max(sizes.roundtrips // 2, 1)
    samples: dict[str, list[float]] = {key: [] for key in setups}
    groups: dict[str, list[float]] = {key: [] for key in setups}
    chords: dict[str, list[float]] = {key: [] for key in setups}
    workers = {
        key: (
            url,
            {} if rows is None else {config.ENV_NOTIFY_ROWS: "1" if rows else "0"},
            {"notify_rows": rows},
        )
        for key, (url, rows) in setups.items()
    }
    with side_by_side(workers, 2, log_dir) as apps:
        tasks = {
            key: (app.tasks["bench.add"], app.tasks["bench.tsum"]) for key, app in apps.items()
        }
        for _ in range(2 * sizes.rounds):
            for key, (add, tsum) in tasks.items():
                samples[key] += ops.roundtrips_ms(add, n, sizes.warmup)
                groups[key].append(ops.group_seconds(add, sizes.group))
                chords[key].append(ops.chord_seconds(add, tsum, sizes.chord))
    return {
        key: {
            "rt_p50": ops.percentile(samples[key], 50),
            "rt_p90": ops.percentile(samples[key], 90),
            "group": median(groups[key]),
            "chord": median(chords[key]),
        }
        for key in setups
    }


def rows_travel(sql_url: str) -> bool:
    """What ``sqlresults_notify_rows = "auto"`` decides on this database (for the report)."""
    return bool(make_app(sql_url).backend.store.notices.rows_travel())


def publish_figures(urls: dict[str, str], sizes: Sizes) -> dict[str, float]:
    """Figure 8: ``apply_async`` rates to the broker, no worker, for the backends in ``urls``.

    ``urls`` maps a label to a backend URL; an ``sql+`` URL is measured with
    record on publish off (label) and on (label + ``_recorded``). The backends
    take turns within each round so drift in the machine's load hits them
    alike; record on publish's signal handler is disconnected after each
    "on" so no later publish pays for a connected receiver.
    """
    samples: dict[str, list[float]] = {}
    for _ in range(sizes.rounds):
        for label, url in urls.items():
            add = make_app(url).tasks["bench.add"]
            samples.setdefault(label, []).append(ops.publish_rate(add, sizes.publish, sizes.warmup))
            if url.startswith("sql+"):
                add = make_app(url, record_on_publish=True).tasks["bench.add"]
                try:
                    rate = ops.publish_rate(add, sizes.publish, sizes.warmup)
                finally:
                    _disconnect_record_on_publish()
                samples.setdefault(label + "_recorded", []).append(rate)
    return {label: median(rates) for label, rates in samples.items()}


def _disconnect_record_on_publish() -> None:
    before_task_publish.disconnect(dispatch_uid=sqlresults_publish.__name__)
    sqlresults_publish._connected = False


def backend_figures(url: str, sizes: Sizes, log_dir: Path, capped: bool) -> dict[str, float]:
    out = client_figures(url, sizes, capped)
    log(f"  client done: {_brief(out)}")
    out.update(worker_figures(url, sizes, log_dir, capped))
    log(f"  worker done: {_brief(out)}")
    return out


def _brief(figs: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:,.1f}" for k, v in figs.items())


# ---- the run -----------------------------------------------------------------
#: Databases where ``sqlresults_durable_commit = False`` exists (not MySQL/MariaDB).
RELAXABLE = ("postgresql", "sqlite")
#: Databases where waiters are woken by notifications (``sqlresults_notify_rows`` applies).
NOTIFYING = ("postgresql",)


def database_figures(target: Target, sizes: Sizes, log_dir: Path) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for backend, url in (("sql", target.sql_url), ("db", target.db_url)):
        log(f"{target.kind} {config.LABELS[backend]}: startup")
        figs = startup_figures(backend, url, sizes.startup_repeats)
        log(f"{target.kind} {config.LABELS[backend]}: {_brief(figs)}")
        figs.update(backend_figures(target.backend_url(backend), sizes, log_dir, backend == "db"))
        out[backend] = figs
    log(f"{target.kind}: prefork child, sql+, db+ and Redis taking turns")
    child = child_figures(target, sizes, log_dir)
    for key, figs in child.items():
        log(f"  {key}: {_brief(figs)}")
    out["sql"].update(child["sql"])
    out["db"].update(child["db"])
    out["redis"] = child["redis"]
    if "redis_durable" in child:
        out["redis"]["store_child_durable"] = child["redis_durable"]["store_child"]
    if "sql_relaxed" in child:
        out["sql"]["store_child_relaxed"] = child["sql_relaxed"]["store_child"]
        out["sql"]["store_driver_child_relaxed"] = child["sql_relaxed"]["store_driver_child"]
    return out


def run(kinds: list[str], sizes: Sizes, tmp: Path) -> Results:
    results = Results()
    redis_publish: list[float] = []
    flush_redis()
    log("Redis")
    results.redis = backend_figures(config.REDIS_RESULTS, sizes, tmp, capped=False)
    for kind in kinds:
        target = prepare(kind, tmp)
        results.per_db[kind] = database_figures(target, sizes, tmp)
        if kind in NOTIFYING:
            log(f"{kind}: sql+ default, sql+ rows off and Redis, interleaved")
            results.rows_travel = rows_travel(target.backend_url("sql"))
            results.interleaved = interleaved_figures(target.backend_url("sql"), sizes, tmp)
            for key, figs in results.interleaved.items():
                log(f"  {key}: {_brief(figs)}")
        log(f"{kind}: publish rates")
        urls = {"sql": target.backend_url("sql"), "db": target.backend_url("db")}
        urls["redis"] = config.REDIS_RESULTS
        rates = publish_figures(urls, sizes)
        log(f"  {_brief(rates)}")
        results.per_db[kind]["sql"]["publish"] = rates["sql"]
        results.per_db[kind]["sql"]["publish_recorded"] = rates["sql_recorded"]
        results.per_db[kind]["db"]["publish"] = rates["db"]
        redis_publish.append(rates["redis"])
    if redis_publish:  # measured next to each database; one Redis column for all
        results.redis["publish"] = median(redis_publish)
    return results


KEPT_MARKER = "<!-- Sections below come from other bench scripts; bench.run keeps them. -->"


#: The bar chart under the tables (``bench.plots``), redrawn by every run with ``--out``.
BARS_SECTION = """
## The figures as bar charts

sql+ over db+ and over Redis for each figure of the tables above, per database (from 1:
to the right sql+ is better, to the left worse; log scale). `python -m bench.plots --json
FILE` draws it again from the figures a run keeps beside its report.

![sql+ against db+ and Redis, per figure]({png})
"""


def kept_sections(out: Path) -> str:
    """The part of an existing report below ``KEPT_MARKER``, so a new run keeps it.

    Other scripts (``bench.aio``, the growth figures) write their sections by hand into the
    same page; a fresh ``bench.run`` replaces only what it measured itself.
    """
    if not out.exists():
        return ""
    old = out.read_text()
    at = old.find(KEPT_MARKER)
    return "" if at < 0 else "\n" + old[at:]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes.full()
    command = shlex.join([".venv/bin/python", "-m", "bench.run", *sys.argv[1:]])
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    servers = server_versions(args.kinds)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="celery-sqlresults-bench-") as tmp:
        results = run(args.kinds, sizes, Path(tmp))
    load = f"{load_before:.2f} before the run, {os.getloadavg()[0]:.2f} at its end"
    for kind in args.kinds:
        print(f"\n## {config.DB_TITLES[kind]}\n\n{table(results, kind, sizes)}")
    print("\n" + targets_section(results, args.kinds, sizes))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_results(results, args.kinds, args.quick, args.out.with_suffix(".json"))
        bars = args.out.parent / BARS
        ratios = from_results(results, args.kinds, sizes)
        drawn = draw_bars(ratios, bars, f"{date}, {'--quick' if args.quick else 'full'} run")
        text = render(results, args.kinds, sizes, command, date, servers, load)
        if drawn:
            text += BARS_SECTION.format(png=BARS)
        args.out.write_text(text + kept_sections(args.out))
        log(f"wrote {args.out}, its figures as JSON beside it{' and ' + BARS if drawn else ''}")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
