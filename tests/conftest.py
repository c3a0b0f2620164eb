"""Shared fixtures: one empty database per test on SQLite, PostgreSQL and MariaDB/MySQL.

Server addresses come from the environment (defaults: the local servers):
``SQLRESULTS_PG_URL`` and ``SQLRESULTS_MYSQL_URL`` point at an admin
database; tests run in their own database (``SQLRESULTS_TEST_DB``, default
``sqlresults_test``) which is reset before every test. A missing server skips
its tests locally and *fails* them when ``CI=true``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from sqlalchemy.engine import make_url

from celery_sqlresults import engine as engine_mod
from celery_sqlresults import startup

PG_ADMIN = os.environ.get("SQLRESULTS_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MYSQL_ADMIN = os.environ.get("SQLRESULTS_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
REDIS_URL = os.environ.get("SQLRESULTS_REDIS_URL", "redis://127.0.0.1:6379/15")
TEST_DB = os.environ.get("SQLRESULTS_TEST_DB", "sqlresults_test")
OTHER_SCHEMA = f"{TEST_DB}_other"
#: The login role of the least-privilege tests (no CREATE rights).
LIMITED = f"sqlr_lim_{TEST_DB}"[:32]
IN_CI = os.environ.get("CI", "").lower() == "true"
ROOT = Path(__file__).resolve().parent.parent

DATABASES = ["sqlite", "postgresql", "mysql"]
#: Other drivers for a database above; a test module runs on them if it lists them in
#: ``ALSO_ON`` (``mysqlclient``: MariaDB through MySQLdb instead of PyMySQL).
DRIVERS = {"mysqlclient": "mysql+mysqldb"}


def _unavailable(what: str, exc: BaseException) -> None:
    msg = f"{what} is not reachable: {exc}"
    if IN_CI:
        pytest.fail(msg + " (CI=true: servers are required)")
    pytest.skip(msg)


def _admin(url: str) -> sa.Engine:
    return sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


def reset_database(kind: str, tmp_path: Path) -> str:
    """Return the URL of an empty database of ``kind``."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'results.db'}"
    if kind == "postgresql":
        admin = _admin(PG_ADMIN)
        try:
            with admin.connect() as conn:
                exists = conn.execute(
                    sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": TEST_DB}
                ).first()
                if not exists:
                    conn.exec_driver_sql(f"CREATE DATABASE {TEST_DB}")
        except sa.exc.OperationalError as exc:
            _unavailable("PostgreSQL", exc)
        url = make_url(PG_ADMIN).set(database=TEST_DB)
        with _admin(url.render_as_string(hide_password=False)).connect() as conn:
            conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{TEST_DB}' AND pid <> pg_backend_pid()"
            )
            conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {OTHER_SCHEMA} CASCADE")
            conn.exec_driver_sql("CREATE SCHEMA public")
        return url.render_as_string(hide_password=False)
    admin = _admin(MYSQL_ADMIN)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {TEST_DB}")
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {OTHER_SCHEMA}")
            conn.exec_driver_sql(f"CREATE DATABASE {TEST_DB}")
    except sa.exc.OperationalError as exc:
        _unavailable("MariaDB/MySQL", exc)
    url = make_url(MYSQL_ADMIN).set(database=TEST_DB)
    if kind in DRIVERS:
        url = url.set(drivername=DRIVERS[kind])
        try:
            url.get_dialect().import_dbapi()
        except ImportError as exc:
            _unavailable(f"The {kind} driver", exc)
    return url.render_as_string(hide_password=False)


@pytest.fixture(autouse=True)
def _fresh_process_state() -> Iterator[None]:
    """Each test starts as a new process would: no cached schema checks or engines."""
    startup._ready.clear()
    yield
    engine_mod.dispose_all()
    startup._ready.clear()


@pytest.fixture(params=DATABASES + list(DRIVERS))
def db_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Runs on the extra drivers only for the modules that ask (``ALSO_ON``)."""
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        kind = callspec.params.get("db_kind") if callspec is not None else None
        module = getattr(item, "module", None)
        if kind in DRIVERS and kind not in getattr(module, "ALSO_ON", ()):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def db_url(db_kind: str, tmp_path: Path) -> str:
    """SQLAlchemy URL (no ``sql+`` prefix) of an empty database, for each of the three."""
    return reset_database(db_kind, tmp_path)


@pytest.fixture
def make_app(db_url: str) -> Callable[..., Celery]:
    """Build a Celery app whose result backend is ``sql+<db_url>``; keyword args go to conf."""
    apps: list[Celery] = []

    def make(url: str | None = None, **conf: Any) -> Celery:
        app = Celery(f"test-{uuid.uuid4().hex[:6]}", set_as_current=False)
        app.conf.result_backend = "sql+" + (url or db_url)
        app.conf.update(conf)
        apps.append(app)
        return app

    return make


@pytest.fixture
def drop_limited_role(db_url: str, db_kind: str) -> Iterator[None]:
    """Drop :data:`LIMITED` after the test: no stray login role outlives it (one without
    grants that can connect turns ``sqlresults_notify_rows = "auto"`` off)."""
    yield
    admin = raw_engine(db_url)
    with admin.connect() as conn:
        drop_limited(conn.execution_options(isolation_level="AUTOCOMMIT"), db_kind)
    admin.dispose()


#: Hosts the least-privilege tests' MySQL/MariaDB user is created for.
LIMITED_HOSTS = ("localhost", "127.0.0.1")


def drop_limited(conn: sa.Connection, db_kind: str) -> None:
    """Drop the :data:`LIMITED` login if it exists (PostgreSQL role, MySQL/MariaDB users)."""
    if db_kind == "postgresql":
        drop_role(conn, LIMITED)
    elif db_kind == "mysql":
        for host in LIMITED_HOSTS:
            conn.exec_driver_sql(f"DROP USER IF EXISTS '{LIMITED}'@'{host}'")


def drop_role(conn: sa.Connection, name: str) -> None:
    """PostgreSQL: drop login role ``name`` if it exists, with its grants in this database."""
    if conn.exec_driver_sql(f"SELECT 1 FROM pg_roles WHERE rolname = '{name}'").first():
        conn.exec_driver_sql(f"DROP OWNED BY {name}")
        conn.exec_driver_sql(f"DROP ROLE {name}")


def raw_engine(db_url: str) -> sa.Engine:
    """An engine of the test's own, outside the backend's pool, for inspecting the database."""
    return sa.create_engine(db_url, poolclass=sa.pool.NullPool)


def old_celery_tables(engine: sa.Engine, task_id: str, result: bytes) -> None:
    """Celery 5.4's tables (no ``children``/``stamps``, no extended columns), one result in."""
    md = sa.MetaData()
    seq = sa.Sequence("task_id_sequence")
    old_task = sa.Table(
        "celery_taskmeta",
        md,
        sa.Column("id", sa.Integer, seq, primary_key=True),
        sa.Column("task_id", sa.String(155), unique=True),
        sa.Column("status", sa.String(50)),
        sa.Column("result", sa.LargeBinary),
        sa.Column("date_done", sa.DateTime),
        sa.Column("traceback", sa.Text),
        sqlite_autoincrement=True,
    )
    sa.Table(
        "celery_tasksetmeta",
        md,
        sa.Column("id", sa.Integer, sa.Sequence("taskset_id_sequence"), primary_key=True),
        sa.Column("taskset_id", sa.String(155), unique=True),
        sa.Column("result", sa.LargeBinary),
        sa.Column("date_done", sa.DateTime),
        sqlite_autoincrement=True,
    )
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            old_task.insert().values(
                id=seq.next_value() if engine.dialect.supports_sequences else None,
                task_id=task_id,
                status="SUCCESS",
                result=result,
                date_done=sa.func.now(),
            )
        )


def session_id(conn: sa.Connection, db_kind: str) -> int:
    """The server's id of ``conn``'s session (PostgreSQL backend pid, MySQL connection id)."""
    own = "SELECT pg_backend_pid()" if db_kind == "postgresql" else "SELECT CONNECTION_ID()"
    return int(conn.exec_driver_sql(own).scalar_one())


def kill_session(db_url: str, db_kind: str, sid: int) -> None:
    """End a session from outside, as a server restart or an administrator would."""
    admin = raw_engine(db_url)
    with admin.connect() as conn:
        if db_kind == "postgresql":
            conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": sid})
        else:
            conn.exec_driver_sql(f"KILL {int(sid)}")
    admin.dispose()


def fork_with_lock_held(lock: Any, child: Callable[[], bool]) -> int:
    """Fork while another thread holds ``lock`` (as a parent's thread may at any fork),
    run ``child()`` in the child; its exit code: 0 if it returned true, 2 if false, 1 if it
    raised, -14 (SIGALRM) if it hung for 20 s."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(10)
    pid = os.fork()
    if pid == 0:  # child
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # not pytest-timeout's handler
        signal.alarm(20)  # a hang ends the child, not the test run
        code = 1
        try:
            code = 0 if child() else 2
        finally:
            os._exit(code)
    release.set()
    holder.join(10)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


#: A pool of one connection: the fast path's records on it can be looked at between calls.
ONE_CONNECTION = {"pool_size": 1, "max_overflow": 0}


def pool_info(engine: sa.Engine) -> tuple[Any, dict[str, Any]]:
    """The pool's (only) connection and what the fast path recorded with it."""
    pooled = engine.raw_connection()
    try:
        return pooled.dbapi_connection, dict(pooled.info)
    finally:
        pooled.close()


def leased(backend: Any) -> Any:
    """The hot path's kept connection on the backend's engine (None: none kept)."""
    from celery_sqlresults import lease

    return lease.leased(backend.store.engine)


def task_request(
    task: str = "proj.add", args: tuple = (1, 2), worker: str = "w1@host", retries: int = 2
) -> SimpleNamespace:
    """The parts of a worker's task request that ``result_extended`` stores."""
    return SimpleNamespace(
        task=task,
        args=list(args),
        kwargs={"k": "v"},
        hostname=worker,
        retries=retries,
        delivery_info={"routing_key": "q1"},
        group=None,
        parent_id=None,
        children=[],
        stamps=None,
        stamped_headers=None,
        chord=None,
        ignore_result=False,
    )


def overwrite_result(db_url: str, task_id: str, payload: bytes) -> None:
    """Put raw bytes in a task's ``result`` column behind the backend's back."""
    eng = raw_engine(db_url)
    with eng.begin() as conn:
        conn.execute(
            sa.text("UPDATE celery_taskmeta SET result = :r WHERE task_id = :t"),
            {"r": payload, "t": task_id},
        )
    eng.dispose()


def table_names(db_url: str, schema: str | None = None) -> set[str]:
    eng = raw_engine(db_url)
    try:
        with eng.connect() as conn:
            return set(sa.inspect(conn).get_table_names(schema=schema))
    finally:
        eng.dispose()


# ---- waiting ---------------------------------------------------------------------
def store_later(
    app: Celery, task_id: str, value: object, delay: float = 0.3, request: object = None
) -> threading.Thread:
    """Store ``value`` as the SUCCESS of ``task_id`` from another thread, after ``delay``."""

    def run() -> None:
        time.sleep(delay)
        app.backend.store_result(task_id, value, "SUCCESS", request=request)

    t = threading.Thread(target=run)
    t.start()
    return t


def task_reads(app: Celery) -> list[str]:
    """Every statement reading the task table from now on (listeners force the normal path)."""
    reads: list[str] = []

    def seen(conn: object, cursor: object, statement: str, *_: object) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "celery_taskmeta" in statement:
            reads.append(statement)

    sa.event.listen(app.backend.store.engine, "before_cursor_execute", seen)
    return reads


def listening(app: Celery) -> Any:
    """The app's PostgreSQL listener, started and listening."""
    listener = app.backend._waiter
    listener._start()
    assert listener._listening.wait(30)
    return listener


# ---- many processes at once ----------------------------------------------------
_RACER = textwrap.dedent(
    """
    import sys, time
    from celery import Celery
    url, start, n = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    app = Celery("racer", backend="sql+" + url, set_as_current=False)
    while time.time() < start:
        time.sleep(0.001)
    backend = app.backend
    backend.store_result(f"task-{n}", int(n), "SUCCESS")
    assert backend.get_task_meta(f"task-{n}")["result"] == int(n)
    for kept in sys.argv[4:]:
        assert backend.get_task_meta(kept)["result"] == "kept", kept
    print("ok", n)
    """
)


def start_together(db_url: str, tmp_path: Path, n: int, *kept: str) -> None:
    """``n`` processes build the backend at the same instant, each storing and reading a result.

    Fails if any process fails or its stderr shows a schema race ("already
    exists", duplicate key, deadlock). ``kept`` names rows that must still read
    ``"kept"`` afterwards.
    """
    script = tmp_path / "racer.py"
    script.write_text(_RACER)
    start = time.time() + 3  # every process imports first, then all go together
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), db_url, str(start), str(i), *kept],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},  # this tree's package, as the workers
            text=True,
        )
        for i in range(n)
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "ok" in out
        for bad in ("already exists", "Duplicate", "duplicate key", "eadlock", "Traceback"):
            assert bad not in err


# ---- a real worker ----------------------------------------------------------
class Worker:
    """A ``celery worker`` subprocess on ``tests/worker_app.py``."""

    def __init__(
        self,
        backend_url: str,
        tmp_path: Path,
        concurrency: int = 2,
        queue: str | None = None,
        **env: str,
    ):
        self.name = uuid.uuid4().hex[:8]
        self.log = tmp_path / f"worker-{self.name}.log"
        self.queue = queue or f"q-{self.name}"
        self.env = {
            **os.environ,
            "SQLRESULTS_TEST_BACKEND": backend_url,
            "SQLRESULTS_TEST_BROKER": REDIS_URL,
            "SQLRESULTS_TEST_QUEUE": self.queue,
            "PYTHONPATH": str(ROOT),
            **env,
        }
        self.concurrency = concurrency
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Worker:
        self._log = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tests.worker_app",
                "worker",
                "--pool=prefork",
                f"--concurrency={self.concurrency}",
                "-Q",
                self.queue,
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-n",
                f"{self.queue}@%h",
            ],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.output()}")
            if " ready." in self.output():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()


def _redis_ok() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:
        _unavailable("Redis (the test broker)", exc)


@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    _redis_ok()
    started: list[Worker] = []

    def start(backend_url: str, **kwargs: Any) -> Worker:
        w = Worker(backend_url, tmp_path, **kwargs)
        started.append(w)
        return w.start()

    yield start
    for w in started:
        w.stop()


def client_app(backend_url: str, queue: str, **conf: Any) -> Celery:
    """The client side of ``tests/worker_app.py``: same tasks, same broker, same backend."""
    from tests import worker_app

    app = worker_app.make_app(backend_url, REDIS_URL, queue)
    app.conf.update(conf)
    return app


# ---- PostgreSQL beyond one server (tests/clusters.py) ---------------------------
@pytest.fixture(scope="session")
def pg_formation() -> Iterator[Any]:
    """A pg_auto_failover formation (monitor, primary, synchronous standby) for the session."""
    from tests import clusters

    formation = clusters.Formation()
    try:
        formation.start()
    except clusters.ClusterUnavailable as exc:
        formation.close()
        _unavailable("A pg_auto_failover formation", exc)
    yield formation
    formation.close()


@pytest.fixture
def formation_url(pg_formation: Any) -> str:
    """The formation's multi-host URL, its database emptied on the current primary."""
    url = pg_formation.node_url(pg_formation.primary_port())
    with _admin(url).connect() as conn:
        conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA public")
    return str(pg_formation.url())


@pytest.fixture(scope="session")
def pg_bouncer() -> Iterator[Any]:
    """PgBouncer in transaction pooling mode in front of the shared server (``PG_ADMIN``)."""
    from tests import clusters

    bouncer = clusters.PgBouncer(make_url(PG_ADMIN).port or 5432)
    try:
        bouncer.start()
    except clusters.ClusterUnavailable as exc:
        bouncer.close()
        _unavailable("PgBouncer", exc)
    yield bouncer
    bouncer.close()


# ---- a fleet of workers through a small pool (tests/fleet.py) ---------------------------
#: The server pool of :func:`fleet_bouncer`: fewer than the fleet's processes.
FLEET_POOL = 4


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def fleet_bouncer() -> Iterator[Any]:
    """A PgBouncer of the test's own (port, directory), server pool :data:`FLEET_POOL`;
    and the broker checked, as the fleet's workers need it."""
    from tests import clusters

    _redis_ok()
    bouncer = clusters.PgBouncer(
        make_url(PG_ADMIN).port or 5432,
        root=clusters.ROOT / f"pgbouncer-{TEST_DB}",
        pool_size=FLEET_POOL,
        port=_free_port(),
    )
    try:
        bouncer.start()
    except clusters.ClusterUnavailable as exc:
        bouncer.close()
        _unavailable("PgBouncer", exc)
    yield bouncer
    bouncer.close()
