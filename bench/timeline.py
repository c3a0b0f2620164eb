"""Where a new process's first call goes: a timeline of marks, median over new processes.

``python -m bench.timeline URL TASK_ID [--runs N]`` starts ``N`` new Python
processes; each builds an app on ``URL`` (a ``sql+`` result backend URL) and
calls ``get_task_meta(TASK_ID)``, marking the time (from ``app.backend``) when
Celery has found the backend class, when the settings, the tables, the engine
and the first connection are ready, and when each SQL statement that goes
through SQLAlchemy starts. The medians per mark say where the milliseconds of
docs/growth.md's "Fresh processes" go. The marks cost a little themselves:
read the gaps, not the total (bench.fresh times the total without them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from statistics import median

_CHILD = r"""
import json, sys, time
url, task_id = sys.argv[1], sys.argv[2]
from celery import Celery
import celery.app.backends as found
import sqlalchemy as sa
from sqlalchemy.engine import Engine
import celery_sqlresults.backend as backend
import celery_sqlresults.settings as settings
import celery_sqlresults.store as store
marks, start = [], [0.0]

def mark(name):
    marks.append((name, (time.perf_counter() - start[0]) * 1000))

def wrap(module, name, label):
    inner = getattr(module, name)
    def timed(*a, **k):
        mark(label + " start")
        out = inner(*a, **k)
        mark(label + " end")
        return out
    setattr(module, name, timed)

by_url = found.by_url
def timed_by_url(*a, **k):
    out = by_url(*a, **k)
    mark("Celery found the backend class")
    return out
found.by_url = timed_by_url
from_app = settings.Settings.from_app
def timed_settings(*a, **k):
    mark("settings start")
    out = from_app(*a, **k)
    mark("settings end")
    return out
settings.Settings.from_app = staticmethod(timed_settings)
wrap(store, "build_tables", "tables")
wrap(store, "get_engine", "engine")
wrap(backend, "try_schema", "start-up schema check")
sa.event.listen(Engine, "first_connect", lambda *a: mark("connected"))
sa.event.listen(
    Engine, "before_cursor_execute",
    lambda c, cur, stmt, *a: mark("SQL " + " ".join(stmt.split())[:48]),
)
app = Celery("bench-timeline", set_as_current=False)
app.conf.update(result_backend=url, result_extended=True)
start[0] = time.perf_counter()
meta = app.backend.get_task_meta(task_id, cache=False)
mark("first call done")
if meta["status"] == "PENDING":
    raise SystemExit(f"no result stored for {task_id}")
print(json.dumps(marks))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="a sql+ result backend URL")
    parser.add_argument("task_id", help="the id of a stored result")
    parser.add_argument("--runs", type=int, default=11)
    args = parser.parse_args(argv)
    root = str(Path(__file__).resolve().parent.parent)
    runs = []
    for _ in range(args.runs):
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, args.url, args.task_id],
            capture_output=True,
            text=True,
            cwd=root,
            timeout=120,
            check=True,
        )
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    names = [name for name, _ in runs[0]]
    same = [r for r in runs if [n for n, _ in r] == names]
    before = 0.0
    for i, name in enumerate(names):
        at = median(r[i][1] for r in same)
        print(f"{at:7.2f} ms  (+{at - before:5.2f})  {name}")
        before = at
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
