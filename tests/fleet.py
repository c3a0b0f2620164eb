"""A fleet of prefork workers started at once behind PgBouncer, for the pooler's scale proof.

Shared by ``tests/test_pooler.py`` (a small fleet, in CI) and
``bench/pgbouncer_fleet.py`` (the full size, by hand): every worker is launched
before any is waited for, so all of them create or check the schema on an empty
database together; a client sends tasks through the same PgBouncer, joins them
with ``LISTEN`` on the direct URL, and every result is then looked for in the
table. Meanwhile a thread counts the server's sessions on the database
(``pg_stat_activity``): the pooler's, the listeners', and the maximum.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from celery.result import ResultSet
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
#: ``application_name`` of the fleet's connections to PgBouncer, which gives it to the server
#: sessions it opens or lends for them: the pool's sessions, told from any other.
POOLED_NAME = "sqlr-fleet"
#: ``application_name`` of the client's listening connection (direct).
LISTENER_NAME = "sqlr-fleet-listen"
#: Lines of a worker's log that count as errors.
ERROR_LINE = re.compile(
    r"\b(ERROR|CRITICAL)\b|Traceback|already exists|Duplicate|eadlock|"
    r"schema not checked|not reachable|; retry \d+ in "
)

#: What the worker that created the tables logs (startup.create_schema).
CREATED = "celery-sqlresults: created "

#: A task's success line, naming the prefork child that ran it.
CHILD_RAN = re.compile(r"/(ForkPoolWorker-\d+)\] Task t\.\w+\[[^]]+\] succeeded")


@dataclass
class Activity:
    """The most server sessions seen at once on one database, by kind.

    ``total`` counts client sessions: the pool's (``pooled``), the fleet's
    listeners, and ``others`` (any other process's on the database); ``by_kind``
    has the most seen of each ``backend_type/application_name`` (autovacuum too).
    """

    total: int = 0
    pooled: int = 0
    listeners: int = 0
    others: int = 0
    samples: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


@dataclass
class Outcome:
    """What a fleet run saw; the bench prints it, the test asserts on it."""

    workers: int
    processes: int
    tasks: int
    ready_s: float
    wall_s: float
    lost: int
    failed: int
    activity: Activity
    startup_errors: list[str] = field(default_factory=list)
    run_errors: list[str] = field(default_factory=list)
    exited: list[str] = field(default_factory=list)
    #: Workers whose log says they created the tables: one, the schema lock's holder.
    creators: int = 0
    #: Prefork children (of all workers) that ran at least one task.
    children: int = 0

    @property
    def stores_per_s(self) -> float:
        return self.tasks / self.wall_s if self.wall_s else 0.0


class _Sampler(threading.Thread):
    """Counts ``pg_stat_activity`` rows of ``database`` every ``period`` on a direct session."""

    def __init__(self, direct_url: str, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.url = direct_url
        self.period = period
        self.activity = Activity()
        self.failure: BaseException | None = None
        self._done = threading.Event()

    def run(self) -> None:
        database = make_url(self.url).database
        query = sa.text(
            "SELECT backend_type, coalesce(application_name, ''), count(*) "
            "FROM pg_stat_activity WHERE datname = :db AND pid <> pg_backend_pid() "
            "GROUP BY 1, 2"
        )
        engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                while not self._done.is_set():
                    rows = conn.execute(query, {"db": database}).all()
                    seen = self.activity
                    clients = [(name, n) for kind, name, n in rows if kind == "client backend"]
                    total = sum(n for _, n in clients)
                    pooled = sum(n for name, n in clients if name == POOLED_NAME)
                    listeners = sum(n for name, n in clients if name == LISTENER_NAME)
                    seen.total = max(seen.total, total)
                    seen.pooled = max(seen.pooled, pooled)
                    seen.listeners = max(seen.listeners, listeners)
                    seen.others = max(seen.others, total - pooled - listeners)
                    for kind, name, n in rows:
                        key = f"{kind}/{name or '-'}"
                        seen.by_kind[key] = max(seen.by_kind.get(key, 0), n)
                    seen.samples += 1
                    self._done.wait(self.period)
        except BaseException as exc:  # reported by stop(): a sampler that died saw nothing
            self.failure = exc
        finally:
            engine.dispose()

    def stop(self) -> Activity:
        self._done.set()
        self.join(30)
        if self.failure is not None:
            raise RuntimeError(f"pg_stat_activity sampler failed: {self.failure}")
        return self.activity


class _Launched:
    """One ``celery worker`` on ``tests/worker_app.py``, its own process group and log."""

    def __init__(self, name: str, log: Path, env: dict[str, str], concurrency: int) -> None:
        self.name = name
        self.log = log
        cmd = [
            sys.executable, "-m", "celery", "-A", "tests.worker_app", "worker",
            "--pool=prefork", f"--concurrency={concurrency}", "-Q", env["SQLRESULTS_TEST_QUEUE"],
            "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-n", f"{name}@%h",
        ]  # fmt: skip
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,  # its group: the worker and its children, ours to stop
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if ERROR_LINE.search(line)]


@contextlib.contextmanager
def _fleet(
    workers: int, concurrency: int, env: dict[str, str], log_dir: Path, stop_timeout: float
) -> Iterator[list[_Launched]]:
    fleet: list[_Launched] = []
    try:
        for i in range(workers):
            name = f"fleet{i}-{uuid.uuid4().hex[:4]}"
            fleet.append(_Launched(name, log_dir / f"{name}.log", env, concurrency))
        yield fleet
    finally:
        # Warm shutdown of all at once, then each waited for (a slow one is killed).
        for w in fleet:
            if w.proc.poll() is None:
                w.proc.terminate()
        for w in fleet:
            w.stop(stop_timeout)


def run_fleet(
    pooled_url: str,
    direct_url: str,
    broker: str,
    workers: int,
    concurrency: int,
    tasks: int,
    log_dir: Path,
    ready_timeout: float = 600,
    join_timeout: float = 600,
    nap: float = 0.0,
) -> Outcome:
    """Start ``workers`` prefork workers at once through ``pooled_url`` (PgBouncer,
    transaction mode) on an empty database, run ``tasks`` ``t.add`` tasks, and report.

    ``direct_url`` reaches the same database without the pooler: the client
    listens there, the sampler counts sessions there, the results are checked there.
    ``nap``: each task sleeps that long (``t.nap``), so that all children get tasks.
    """
    from tests import worker_app

    log_dir.mkdir(parents=True, exist_ok=True)
    tagged = make_url(pooled_url).update_query_dict({"application_name": POOLED_NAME})
    pooled_url = tagged.render_as_string(hide_password=False)
    queue = f"fleet-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "SQLRESULTS_TEST_BACKEND": pooled_url,
        "SQLRESULTS_TEST_BROKER": broker,
        "SQLRESULTS_TEST_QUEUE": queue,
        "SQLRESULTS_TEST_POOLER": "transaction",
        # Generous: on a busy machine the last of many processes may wait for the pool.
        "SQLRESULTS_TEST_STARTUP_TIMEOUT": str(ready_timeout),
        "PYTHONPATH": str(ROOT),
    }
    sampler = _Sampler(direct_url)
    sampler.start()
    exited: list[str] = []
    try:
        with _fleet(workers, concurrency, env, log_dir, stop_timeout=60) as fleet:
            started = time.monotonic()
            waiting = list(fleet)
            while waiting and time.monotonic() - started < ready_timeout:
                for w in list(waiting):
                    if w.proc.poll() is not None:
                        exited.append(f"{w.name} exited with {w.proc.returncode}")
                        waiting.remove(w)
                    elif " ready." in w.output():
                        waiting.remove(w)
                time.sleep(0.5)
            ready_s = time.monotonic() - started
            if waiting:
                raise RuntimeError(
                    f"{len(waiting)} of {workers} workers not ready in {ready_timeout:.0f}s; "
                    f"{waiting[0].name}'s log:\n{waiting[0].output()[-3000:]}"
                )
            startup = {w.name: _errors(w.output()) for w in fleet}

            listen = make_url(direct_url).update_query_dict({"application_name": LISTENER_NAME})
            app = worker_app.make_app(pooled_url, broker, queue)
            app.conf.update(
                sqlresults_pooler="transaction",
                sqlresults_listen_url=listen.render_as_string(hide_password=False),
            )
            began = time.monotonic()
            if nap:
                results = [app.tasks["t.nap"].delay(i, i, nap) for i in range(tasks)]
            else:
                results = [app.tasks["t.add"].delay(i, i) for i in range(tasks)]
            values = ResultSet(results, app=app).join(timeout=join_timeout, propagate=False)
            wall_s = time.monotonic() - began
            failed = sum(1 for i, v in enumerate(values) if v != i + i)
            ids = [r.id for r in results]
            app.close()
        logs = {w.name: w.output() for w in fleet}
    finally:
        activity = sampler.stop()
    engine = sa.create_engine(direct_url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        stored = set(
            conn.execute(
                sa.text("SELECT task_id FROM celery_taskmeta WHERE status = 'SUCCESS'")
            ).scalars()
        )
    engine.dispose()
    run_errors = [
        line for name, text in logs.items() for line in _errors(text) if line not in startup[name]
    ]
    return Outcome(
        workers=workers,
        processes=workers * concurrency,
        tasks=tasks,
        ready_s=ready_s,
        wall_s=wall_s,
        lost=len(set(ids) - stored),
        failed=failed,
        activity=activity,
        startup_errors=[line for lines in startup.values() for line in lines],
        run_errors=run_errors,
        exited=exited,
        creators=sum(1 for text in logs.values() if CREATED in text),
        children=sum(len(set(CHILD_RAN.findall(text))) for text in logs.values()),
    )
