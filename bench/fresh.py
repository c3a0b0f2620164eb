"""Fresh processes: what the first call costs a process that has just started.

Short-lived processes (``worker_max_tasks_per_child=1``, CLI calls, serverless
handlers) pay it on every run. The parent stores results through each backend,
then starts new Python processes one after another, the backends taking turns
(sql+, db+, Redis, sql+, …) so that a busy moment of the shared machine falls
on all of them alike. Each child (``python -m bench.fresh --child``) times:

* ``imports``: ``import celery`` and the backend's module with its driver
  (Celery's Redis backend imports ``redis`` with its module; sql+ and db+
  import SQLAlchemy's dialect and the driver when they first connect, so
  the child imports those here, for every backend alike);
* ``first``: building the app's backend and its first ``get_task_meta`` of a
  stored id: connect, session set-up, schema check, reading the layout;
* ``join``: in another child, the first thing done is ``backend.get_many``
  of 1000 stored ids (what ``ResultSet.join_native`` runs); ``join_again`` is
  the same call once more in that child. db+ has no ``get_many`` (a join
  reads id after id, a session each: tens of seconds): not measured.

Two more children show the floor under sql+'s first call, on the same stored row
and URL, outside Celery: ``core`` is SQLAlchemy Core's ``create_engine``, a
connection and one text ``SELECT`` of the row; ``driver`` is the driver's own
connect and that ``SELECT``. Nothing built on SQLAlchemy Core and that driver
starts below ``core``.

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
#: The floors, measured for the first call only (see the module's docstring).
FLOORS = ("core", "driver")
_READ = "SELECT status, result FROM celery_taskmeta WHERE task_id = "


def _floor(kind: str, url: str, task_id: str) -> dict[str, float]:
    """The first read of ``task_id`` through SQLAlchemy Core or the bare driver."""
    import sqlalchemy as sa

    target = sa.engine.make_url(url.removeprefix("sql+"))
    driver = target.get_dialect().driver  # imports SQLAlchemy's dialect: not timed
    modules = {"psycopg": "psycopg", "mysqldb": "MySQLdb", "pymysql": "pymysql"}
    module = __import__(modules.get(driver, "sqlite3"))  # imports as sql+'s do: not timed
    t0 = time.perf_counter()
    if kind == "core":
        engine = sa.create_engine(target)
        with engine.connect() as conn:
            row = conn.execute(sa.text(_READ + ":id"), {"id": task_id}).first()
    elif driver == "psycopg":
        with module.connect(
            host=target.host, port=target.port, user=target.username, dbname=target.database
        ) as raw:
            row = raw.execute(_READ + "%s", (task_id,)).fetchone()
    elif driver in ("mysqldb", "pymysql"):
        raw = module.connect(
            host=target.host,
            port=target.port or 3306,
            user=target.username or "",
            password=target.password or "",
            database=target.database,
        )
        cur = raw.cursor()
        cur.execute(_READ + "%s", (task_id,))
        row = cur.fetchone()
        raw.close()
    else:
        raw = module.connect(target.database or "")
        row = raw.execute(_READ + "?", (task_id,)).fetchone()
        raw.close()
    out = {"first": (time.perf_counter() - t0) * 1000}
    if row is None or row[0] != "SUCCESS":
        raise RuntimeError(f"{kind}: stored result not found: {row}")
    return out


def _import_driver(url: str) -> None:
    """Import SQLAlchemy's dialect for ``url`` and its driver (sql+ and db+ import them late)."""
    import sqlalchemy as sa

    sa.engine.make_url(url.split("+", 1)[1]).get_dialect().import_dbapi()


def _child(kind: str, url: str, ids_file: str, mode: str) -> dict[str, float]:
    """Run in the new process: imports, then the first call (``mode`` "get" or "join")."""
    if kind in FLOORS:
        return _floor(kind, url, json.loads(Path(ids_file).read_text())[0])
    t0 = time.perf_counter()
    import importlib

    from celery import Celery

    importlib.import_module(_MODULES[kind])
    if kind != "redis":  # the driver, as importing Celery's Redis backend imports redis
        _import_driver(url)
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
    """``urls`` may hold the :data:`FLOORS` too (sql+'s URL): they read sql+'s stored row."""
    files: dict[str, Path] = {}
    for kind, url in urls.items():
        files[kind] = tmp / f"fresh-{kind}.json"
        if kind in FLOORS:
            continue
        n = 1 if kind == "db" else join_ids  # db+ is not joined (no get_many)
        files[kind].write_text(json.dumps(store_ids(url, n)))
    for kind in FLOORS:
        if kind in files:
            files[kind] = files["sql"]
    samples: dict[str, dict[str, list[float]]] = {k: {} for k in urls}
    kinds = list(urls)
    for r in range(repeats):
        order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]  # each goes first in turn
        for mode in ("get", "join"):
            for kind in order:
                if mode == "join" and kind in ("db", *FLOORS):
                    continue
                for key, value in _spawn(kind, urls[kind], files[kind], mode).items():
                    samples[kind].setdefault(key, []).append(value)
        if log is not None:
            log(f"fresh processes: round {r + 1}/{repeats}")
    return {k: {key: median(v) for key, v in s.items()} for k, s in samples.items()}


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    print(json.dumps(_child(*sys.argv[2:6])))
