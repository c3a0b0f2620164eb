"""Fresh processes: what the first call costs a process that has just started.

Short-lived processes (``worker_max_tasks_per_child=1``, CLI calls, serverless
handlers) pay it on every run. The parent stores results through each backend,
then starts new Python processes one after another, the backends taking turns
(sql+, db+, Redis, sql+, …) so that a busy moment of the shared machine falls
on all of them alike. Each child (``python -m bench.fresh --child``) times:

* ``imports``: ``import celery`` and the backend's module (with its driver);
* ``first``: building the app's backend and its first ``get_task_meta`` of a
  stored id: connect, session set-up, schema check, reading the layout;
* ``join``: in another child, the first thing done is ``backend.get_many``
  of 1000 stored ids (what ``ResultSet.join_native`` runs); ``join_again`` is
  the same call once more in that child. db+ has no ``get_many`` (a join
  reads id after id, a session each: tens of seconds): not measured.

Medians over the children; the report divides sql+ by Redis and by db+.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

#: The modules each backend's first use imports (its driver comes with it).
_MODULES = {
    "sql": "celery_sqlresults.backend",
    "db": "celery.backends.database",
    "redis": "celery.backends.redis",
}
#: What a child reports, in milliseconds.
MEASURES = ("imports", "first", "join", "join_again")


def _child(kind: str, url: str, ids_file: str, mode: str) -> dict[str, float]:
    """Run in the new process: imports, then the first call (``mode`` "get" or "join")."""
    t0 = time.perf_counter()
    import importlib

    from celery import Celery

    importlib.import_module(_MODULES[kind])
    t1 = time.perf_counter()
    ids = json.loads(Path(ids_file).read_text())
    app = Celery("bench-fresh", set_as_current=False)
    app.conf.update(result_backend=url, result_extended=True)
    out = {"imports": (t1 - t0) * 1000}
    if mode == "get":
        t2 = time.perf_counter()
        meta = app.backend.get_task_meta(ids[0], cache=False)
        out["first"] = (time.perf_counter() - t2) * 1000
        if meta["status"] != "SUCCESS":
            raise RuntimeError(f"{kind}: stored result not found: {meta}")
        return out
    for key in ("join", "join_again"):
        t2 = time.perf_counter()
        values = list(app.backend.get_many(set(ids), timeout=60))  # Redis empties the set
        out[key] = (time.perf_counter() - t2) * 1000
        if len(values) != len(ids):
            raise RuntimeError(f"{kind}: joined {len(values)} of {len(ids)}")
    return out


def store_ids(url: str, n: int) -> list[str]:
    """``n`` results stored through a backend of ``url`` (full Celery URL), their ids."""
    from celery import Celery, states
    from celery.utils import uuid

    app = Celery("bench-fresh", set_as_current=False)
    app.conf.update(result_backend=url, result_extended=True)
    ids = [uuid() for _ in range(n)]
    for task_id in ids:
        app.backend.store_result(task_id, 4, states.SUCCESS)
    return ids


def _spawn(kind: str, url: str, ids_file: Path, mode: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cmd = [sys.executable, "-m", "bench.fresh", "--child", kind, url, str(ids_file), mode]
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"fresh child for {kind} failed:\n{done.stderr[-3000:]}")
    out: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    out[f"process_{mode}"] = (time.perf_counter() - started) * 1000
    return out


def fresh_figures(
    urls: dict[str, str], repeats: int, join_ids: int, tmp: Path, log: Any = None
) -> dict[str, dict[str, float]]:
    """Median milliseconds per backend (``urls``: kind -> full Celery URL), interleaved."""
    files: dict[str, Path] = {}
    for kind, url in urls.items():
        files[kind] = tmp / f"fresh-{kind}.json"
        n = 1 if kind == "db" else join_ids  # db+ is not joined (no get_many)
        files[kind].write_text(json.dumps(store_ids(url, n)))
    samples: dict[str, dict[str, list[float]]] = {k: {} for k in urls}
    kinds = list(urls)
    for r in range(repeats):
        order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]  # each goes first in turn
        for mode in ("get", "join"):
            for kind in order:
                if mode == "join" and kind == "db":
                    continue
                for key, value in _spawn(kind, urls[kind], files[kind], mode).items():
                    samples[kind].setdefault(key, []).append(value)
        if log is not None:
            log(f"fresh processes: round {r + 1}/{repeats}")
    return {k: {key: median(v) for key, v in s.items()} for k, s in samples.items()}


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    print(json.dumps(_child(*sys.argv[2:6])))
