"""End to end with a real prefork worker (Redis broker), on all three databases."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from celery import chord, group, states

from .conftest import REDIS_URL, ROOT, Worker, client_app, table_names

pytestmark = pytest.mark.worker

TABLES = {
    "celery_taskmeta",
    "celery_tasksetmeta",
    "celery_sqlresults_chord",
    "celery_sqlresults_chord_part",
}


def test_worker_creates_schema_before_first_task_and_runs_tasks(
    db_url: str, worker_factory: Callable[..., Worker]
) -> None:
    assert not TABLES & table_names(db_url)
    worker = worker_factory(db_url)
    assert TABLES <= table_names(db_url), "tables must exist once the worker is up"
    log = worker.output()
    assert log.count("celery-sqlresults: result schema ready") == 1
    assert log.index("result schema ready") < log.index(" ready.")

    app = client_app(db_url, worker.queue)
    add, fail, tsum, spawn = (app.tasks[n] for n in ("t.add", "t.fail", "t.tsum", "t.spawn"))
    assert app.AsyncResult("never-sent").state == states.PENDING

    assert add.delay(2, 3).get(timeout=30) == 5
    bad = fail.delay("broken on purpose")
    with pytest.raises(ValueError, match="broken on purpose"):
        bad.get(timeout=30)
    assert bad.state == states.FAILURE and "ValueError" in bad.traceback

    res = add.delay(20, 22)
    assert res.get(timeout=30) == 42
    assert (res.name, res.args, res.queue) == ("t.add", [20, 22], worker.queue)
    assert res.worker and res.worker.startswith(worker.queue)

    parent = spawn.delay(4)
    child_id = parent.get(timeout=30)
    assert [c.id for c in parent.children] == [child_id]
    assert app.AsyncResult(child_id).get(timeout=30) == 8

    g = group(add.s(i, i) for i in range(50)).apply_async()
    assert g.get(timeout=60) == [i * 2 for i in range(50)]
    c = chord(add.s(i, 1) for i in range(10))(tsum.s())
    assert c.get(timeout=60) == sum(i + 1 for i in range(10))


def test_worker_waits_for_a_database_that_is_down(
    tmp_path: Path, worker_factory: Callable[..., Worker]
) -> None:
    """Database unreachable at start-up: bounded retries, masked URL, then a clear exit."""
    down = "postgresql+psycopg://user:hunter2@127.0.0.1:9/nowhere"
    w = Worker(down, tmp_path, SQLRESULTS_TEST_STARTUP_TIMEOUT="2")
    with pytest.raises(RuntimeError, match="worker exited early") as err:
        w.start(timeout=60)
    out = str(err.value)
    assert "unreachable after" in out and "user:***@127.0.0.1:9/nowhere" in out
    assert "hunter2" not in out
    w.stop()


def test_worker_exits_at_once_on_a_database_that_does_not_exist(
    tmp_path: Path, worker_factory: Callable[..., Worker]
) -> None:
    """No minute of retries for a typo: one line naming result_backend and the fix."""
    missing = "postgresql+psycopg://postgres@127.0.0.1:5432/sqlr_no_such_database"
    w = Worker(missing, tmp_path, SQLRESULTS_TEST_STARTUP_TIMEOUT="120")
    with pytest.raises(RuntimeError, match="worker exited early") as err:
        w.start(timeout=60)
    out = str(err.value)
    assert 'database "sqlr_no_such_database" does not exist' in out
    assert "Waiting will not fix this: create the database, or fix its name in result_" in out
    assert "retrying" not in out and "unreachable after" not in out
    w.stop()


def test_beat_creates_schema_at_startup(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'beat.db'}"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SQLRESULTS_TEST_BACKEND": db_url,
        "SQLRESULTS_TEST_BROKER": REDIS_URL,
    }
    log = tmp_path / "beat.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tests.worker_app",
                "beat",
                "--loglevel=INFO",
                "-s",
                str(tmp_path / "schedule"),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and "result schema ready" not in log.read_text():
                time.sleep(0.1)
        finally:
            proc.terminate()
            proc.wait(20)
    text = log.read_text()
    assert "celery-sqlresults: result schema ready" in text, text
    assert TABLES <= table_names(db_url)
