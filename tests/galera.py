"""A three-node MariaDB Galera Cluster for the ``galera`` tests (and ``bench/galera.py``).

``scripts/galera.sh`` starts it (nodes on 127.0.0.1:33061-33063); the session
fixture :func:`galera` starts it if it is not up and stops it at the end if
it started it. HAProxy (:class:`HAProxy`) puts one address in front of the
three nodes, the way a MySQL driver, which takes one host, survives losing
one. Without the packages (galera-4, mariadb-server, haproxy) the tests skip
locally and fail when ``CI=true``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from .conftest import IN_CI, ROOT, TEST_DB

SCRIPT = ROOT / "scripts" / "galera.sh"
CLUSTER_ROOT = Path(os.environ.get("GALERA_ROOT", "/tmp/sqlr-galera"))
PORTS = (33061, 33062, 33063)
#: HAProxy's port in front of the three nodes. Below Linux's ephemeral range (32768 and
#: up): HAProxy starts late in a run, when a client socket may hold any port in that range.
PROXY_PORT = 23060


def _unavailable(what: str) -> None:
    msg = f"{what} (apt-get install -y galera-4 mariadb-server haproxy rsync)"
    if IN_CI:
        pytest.fail(msg + " (CI=true: the Galera cluster is required)")
    pytest.skip(msg)


def _script(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "GALERA_ROOT": str(CLUSTER_ROOT)},
    )


def admin(port: int) -> sa.Engine:
    return sa.create_engine(
        f"mysql+pymysql://root@127.0.0.1:{port}/mysql",
        isolation_level="AUTOCOMMIT",
        poolclass=sa.pool.NullPool,
        connect_args={"connect_timeout": 3},
    )


def cluster_size(port: int) -> int:
    eng = admin(port)
    try:
        with eng.connect() as conn:
            row = conn.exec_driver_sql("SHOW STATUS LIKE 'wsrep_cluster_size'").first()
            return int(row[1]) if row else 0
    finally:
        eng.dispose()


@dataclass
class Cluster:
    """The running cluster: a URL per node for the test database."""

    database: str = TEST_DB

    def url(self, node: int, port: int | None = None) -> str:
        """Node 0, 1 or 2 (or any port: HAProxy's), on the test database."""
        return f"mysql+pymysql://root@127.0.0.1:{port or PORTS[node]}/{self.database}"

    @property
    def urls(self) -> list[str]:
        return [self.url(i) for i in range(len(PORTS))]

    def reset(self) -> None:
        """An empty test database (DDL replicates: one node is enough)."""
        eng = admin(PORTS[0])
        try:
            with eng.connect() as conn:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {self.database}")
                conn.exec_driver_sql(f"CREATE DATABASE {self.database}")
        finally:
            eng.dispose()
        for port in PORTS:  # the other nodes apply the DDL after node 1 has answered
            eng = admin(port)
            try:
                with eng.connect() as conn:
                    conn.exec_driver_sql("SET SESSION wsrep_sync_wait = 15")
                    conn.exec_driver_sql(f"USE {self.database}")
            finally:
                eng.dispose()

    def kill(self, node: int) -> None:
        """SIGKILL one node (0-2): a crash, every connection cut at once."""
        _script("kill", str(node + 1))

    def restart(self, node: int) -> None:
        """Start a killed node again and wait until it has rejoined (IST/SST)."""
        done = _script("start-node", str(node + 1), timeout=300)
        assert done.returncode == 0, done.stderr

    def sessions(self, node: int) -> int:
        """Client sessions on the test database at one node (other than the asking one)."""
        eng = admin(PORTS[node])
        try:
            with eng.connect() as conn:
                query = (
                    "SELECT count(*) FROM information_schema.processlist "
                    f"WHERE db = '{self.database}' AND id <> CONNECTION_ID()"
                )
                return int(conn.exec_driver_sql(query).scalar_one())
        finally:
            eng.dispose()

    def count(self, node: int, where: str = "1=1", table: str = "celery_taskmeta") -> int:
        eng = sa.create_engine(self.url(node), poolclass=sa.pool.NullPool)
        try:
            with eng.connect() as conn:
                conn.exec_driver_sql("SET SESSION wsrep_sync_wait = 1")
                return int(
                    conn.exec_driver_sql(f"SELECT count(*) FROM {table} WHERE {where}").scalar_one()
                )
        finally:
            eng.dispose()


def _cluster_up() -> bool:
    try:
        return all(cluster_size(p) == len(PORTS) for p in PORTS)
    except sa.exc.OperationalError:
        return False


@pytest.fixture(scope="session")
def galera_cluster() -> Iterator[Cluster]:
    """The three-node cluster, started for the session if it is not up."""
    if not shutil.which("mariadbd"):
        _unavailable("mariadbd is not installed")
    started = False
    if not _cluster_up():
        done = _script("start")
        if done.returncode != 0 or not _cluster_up():
            _unavailable(f"the Galera cluster did not start: {done.stderr[-2000:]}")
        started = True
    yield Cluster()
    if started:
        _script("stop")


@pytest.fixture
def galera(galera_cluster: Cluster) -> Cluster:
    """The cluster with an empty test database, all three nodes up."""
    for node, port in enumerate(PORTS):
        try:
            cluster_size(port)
        except sa.exc.OperationalError:
            galera_cluster.restart(node)  # an earlier test killed it and failed
    galera_cluster.reset()
    return galera_cluster


class HAProxy:
    """``haproxy`` on :data:`PROXY_PORT` in front of the nodes, checking each twice a second.

    ``balance first``: every connection goes to the first node that is up, the others stand
    by — the usual way to put one Galera writer behind a proxy (no certification conflicts
    between clients), and it lets a test know which node the writes are on.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.config = tmp_path / "haproxy.cfg"
        servers = "\n".join(
            f"    server node{i + 1} 127.0.0.1:{p} check inter 500 fall 1 rise 2"
            for i, p in enumerate(PORTS)
        )
        self.config.write_text(
            textwrap.dedent(
                f"""\
                defaults
                    mode tcp
                    timeout connect 2s
                    timeout client 120s
                    timeout server 120s
                    retries 3
                    option redispatch
                listen galera
                    bind 127.0.0.1:{PROXY_PORT}
                    balance first
                """
            )
            + servers
            + "\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> HAProxy:
        binary = shutil.which("haproxy")
        if binary is None:
            _unavailable("haproxy is not installed")
        assert binary is not None
        self.proc = subprocess.Popen([binary, "-db", "-f", str(self.config)])
        # Its health checks must pass before it sends a connection on: after a node's
        # restart in an earlier test that can take longer than a fresh cluster does.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}")
            try:
                cluster_size(PROXY_PORT)
                return self
            except sa.exc.OperationalError:
                time.sleep(0.5)
        raise RuntimeError("haproxy did not come up in 90 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)


@pytest.fixture
def haproxy(galera: Cluster, tmp_path: Path) -> Iterator[HAProxy]:
    proxy = HAProxy(tmp_path).start()
    yield proxy
    proxy.stop()


# ---- many processes at once, spread over the nodes ----------------------------------
_STARTER = textwrap.dedent(
    """
    import sys, time
    from celery import Celery
    url, start, n = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    app = Celery("starter", backend="sql+" + url, set_as_current=False)
    app.conf.sqlresults_startup_timeout = 120
    while time.time() < start:
        time.sleep(0.001)
    from celery_sqlresults import startup
    backend = app.backend
    startup.ensure_schema(backend.store)  # what a starting worker runs: errors raise
    backend.store_result(f"task-{n}", int(n), "SUCCESS")
    assert backend.get_task_meta(f"task-{n}")["result"] == int(n)
    print("ok", n)
    """
)


def start_spread(urls: list[str], tmp_path: Path, n: int) -> list[str]:
    """``n`` processes, round robin over ``urls``, start the backend at one instant.

    Returns each process's stderr; asserts each exited 0 having stored and read its result.
    """
    script = tmp_path / "starter.py"
    script.write_text(_STARTER)
    start = time.time() + 4  # every process imports first, then all go together
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), urls[i % len(urls)], str(start), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for i in range(n)
    ]
    errors = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0 and "ok" in out, err
        errors.append(err)
    return errors
