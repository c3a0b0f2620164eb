"""The demo: a real worker, results in SQLite, broker in SQLite, no server needed.

Run it with ``bash scripts/demo.sh`` (or ``python -m examples.demo`` in the venv).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa
from celery import Celery, group

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("DEMO_DATA", ROOT / "demo-data"))
RESULTS_URL = f"sqlite:///{DATA / 'results.db'}"
BROKER_URL = f"sqla+sqlite:///{DATA / 'broker.db'}"

app = Celery("demo", broker=BROKER_URL, backend="sql+" + RESULTS_URL)
app.conf.update(
    result_extended=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="demo.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="demo.divide")
def divide(x: int, y: int) -> float:
    return x / y


def show(title: str, result: object) -> None:
    print(f"  {title:<28} {result}")


def main() -> int:
    shutil.rmtree(DATA, ignore_errors=True)
    DATA.mkdir(parents=True)

    print("1. Before any worker or task: the backend creates its tables at start-up")
    backend = app.backend
    tables = sa.inspect(sa.create_engine(RESULTS_URL)).get_table_names()
    show("tables in results.db:", ", ".join(sorted(tables)))
    show("state of an unknown task:", app.AsyncResult("no-such-task").state)

    print("2. Starting a real Celery worker (prefork, 2 processes)")
    log = open(DATA / "worker.log", "wb")  # noqa: SIM115 - closed below
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "examples.demo",
            "worker",
            "--pool=prefork",
            "--concurrency=2",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "DEMO_DATA": str(DATA)},
    )
    try:
        deadline = time.monotonic() + 60
        while " ready." not in (DATA / "worker.log").read_text(errors="replace"):
            if worker.poll() is not None or time.monotonic() > deadline:
                print((DATA / "worker.log").read_text(errors="replace"))
                return 1
            time.sleep(0.2)
        for line in (DATA / "worker.log").read_text().splitlines():
            if "celery-sqlresults" in line:
                show("worker log:", line.split("] ", 1)[-1])

        print("3. Running tasks")
        ok = add.delay(2, 3)
        bad = divide.delay(1, 0)
        many = group(add.s(i, i) for i in range(5)).apply_async()
        show("add(2, 3).get():", ok.get(timeout=60))
        try:
            bad.get(timeout=60)
        except ZeroDivisionError as exc:
            show("divide(1, 0).get() raised:", repr(exc))
        show("group of 5 adds:", many.get(timeout=60))

        print("4. What is stored (read back through the backend)")
        for res in [ok, bad, *many.results]:
            meta = backend.get_task_meta(res.id, cache=False)
            show(f"{meta['name']}{tuple(meta['args'])}", f"{meta['status']:<8} {meta['result']!r}")
        engine = sa.create_engine(RESULTS_URL)
        with engine.connect() as conn:
            count = conn.execute(sa.text("SELECT count(*) FROM celery_taskmeta")).scalar()
        show("rows in celery_taskmeta:", count)
        return 0
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
