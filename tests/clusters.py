"""PostgreSQL beyond one server, for the ``pgcluster`` tests: a pg_auto_failover formation
(monitor, primary, synchronous standby) and a PgBouncer in transaction pooling mode.

Both come from Debian's packages, installed here when missing (idempotent; root
only). PostgreSQL refuses to run as root, so every server runs as the
``postgres`` user, on fixed ports, under ``/tmp/sqlr-pgcluster``, each in a
process group of its own that :meth:`Formation.close` ends by its id. Also
usable from ``bench/`` scripts and by hand::

    python -m tests.clusters   # start a formation and a PgBouncer, print the URLs, wait
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

PG_BIN = Path(os.environ.get("SQLRESULTS_PG_BIN", "/usr/lib/postgresql/15/bin"))
#: Debian's packages: pg_auto_failover's extension and command, and PgBouncer.
PACKAGES = ("postgresql-15-auto-failover", "pg-auto-failover-cli", "pgbouncer")
ROOT = Path(os.environ.get("SQLRESULTS_CLUSTER_DIR", "/tmp/sqlr-pgcluster"))
MONITOR_PORT = 55431
NODE_PORTS = (55432, 55433)
BOUNCER_PORT = 56432
DATABASE = "test"


class ClusterUnavailable(RuntimeError):
    """The packages are missing and cannot be installed, or a server would not start."""


def _tools_present() -> bool:
    return (
        shutil.which("pg_autoctl") is not None
        and shutil.which("pgbouncer", path=f"{os.environ.get('PATH', '')}:/usr/sbin") is not None
        and (PG_BIN / "pg_ctl").exists()
    )


def ensure_installed() -> None:
    """Install :data:`PACKAGES` with apt-get if they are missing (nothing to do otherwise)."""
    if _tools_present():
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"missing {', '.join(PACKAGES)} and not root to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    if not _tools_present():
        raise ClusterUnavailable(f"installed {', '.join(PACKAGES)}, yet pg_autoctl is missing")


def _wait_until(
    check: object, what: str, timeout: float = 90, log: Callable[[], str] = str
) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception as exc:
            last = exc
        time.sleep(0.2)
    raise ClusterUnavailable(f"{what} not reached in {timeout:.0f}s (last error: {last})\n{log()}")


def _scalar(url: str, sql: str) -> object:
    eng = sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": 2})
    try:
        with eng.connect() as conn:
            return conn.exec_driver_sql(sql).scalar()
    finally:
        eng.dispose()


class _Service:
    """A long-running command as the ``postgres`` user, in a process group of its own."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def env(self) -> dict[str, str]:
        # pg_autoctl keeps its state under XDG directories: ours, not postgres's home.
        return {
            **os.environ,
            "PATH": f"{PG_BIN}:/usr/sbin:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "PG_CONFIG": str(PG_BIN / "pg_config"),
            "XDG_CONFIG_HOME": str(self.root / "xdg" / "config"),
            "XDG_DATA_HOME": str(self.root / "xdg" / "data"),
            "XDG_RUNTIME_DIR": str(self.root / "xdg" / "run"),
            "PGHOST": "127.0.0.1",
        }

    def command(self, *cmd: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else list(cmd)

    def run(self, *cmd: str, timeout: float = 120) -> str:
        done = subprocess.run(
            self.command(*cmd),
            env=self.env(),
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def spawn(self, name: str, *cmd: str) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - the service's output
        proc = subprocess.Popen(
            self.command(*cmd),
            env=self.env(),
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs[name] = proc
        (self.root / f"{name}.pgid").write_text(str(proc.pid))
        return proc

    def end(self, name: str, sig: int = signal.SIGTERM, wait: float = 30) -> None:
        """Signal ``name``'s process group (its id is the leader's pid) and wait for it."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def _clean(root: Path) -> None:
    """Remove what an earlier run left: its process groups (by the ids it wrote), its files."""
    for pgid_file in root.glob("*.pgid") if root.exists() else ():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.killpg(int(pgid_file.read_text()), signal.SIGKILL)
    for pidfile in root.glob("*/postmaster.pid") if root.exists() else ():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError, IndexError):
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)


class Formation:
    """pg_auto_failover: a monitor, a primary and a synchronous standby on 127.0.0.1."""

    def __init__(self, root: Path = ROOT / "formation", async_standby: bool = False) -> None:
        self.root = root
        self.async_standby = async_standby
        self.service = _Service(root)
        self.monitor_uri = f"postgres://autoctl_node@127.0.0.1:{MONITOR_PORT}/pg_auto_failover"

    # ---- URLs -----------------------------------------------------------
    def url(self, database: str = DATABASE) -> str:
        """The app's SQLAlchemy URL: both nodes, libpq picks the one that takes writes."""
        hosts = "&".join(f"host=127.0.0.1:{port}" for port in NODE_PORTS)
        return f"postgresql+psycopg://postgres@/{database}?{hosts}&target_session_attrs=read-write"

    def node_url(self, port: int, database: str = DATABASE) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{port}/{database}"

    def _monitor_url(self) -> str:
        return f"postgresql+psycopg://autoctl_node@127.0.0.1:{MONITOR_PORT}/pg_auto_failover"

    # ---- life -----------------------------------------------------------
    def start(self) -> Formation:
        ensure_installed()
        _clean(self.root)
        for sub in ("xdg/config", "xdg/data", "xdg/run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "postgres:postgres", str(self.root)], check=True)
            os.chmod(self.root.parent, 0o755)
        common = ("--hostname", "127.0.0.1", "--auth", "trust", "--no-ssl", "--run")
        self.service.spawn(
            "monitor",
            "pg_autoctl",
            "create",
            "monitor",
            "--pgdata",
            str(self.root / "monitor"),
            "--pgport",
            str(MONITOR_PORT),
            *common,
        )
        _wait_until(
            lambda: _scalar(self._monitor_url(), "SELECT 1") == 1,
            "the pg_auto_failover monitor",
            log=lambda: self.service.log("monitor"),
        )
        for i, port in enumerate(NODE_PORTS):
            quorum = "false" if self.async_standby and i > 0 else "true"
            self.service.spawn(
                f"node{i + 1}",
                "pg_autoctl",
                "create",
                "postgres",
                "--pgdata",
                str(self.root / f"node{i + 1}"),
                "--pgport",
                str(port),
                "--dbname",
                DATABASE,
                "--name",
                f"node{i + 1}",
                "--monitor",
                self.monitor_uri,
                "--replication-quorum",
                quorum,
                *common,
            )
            want = {"single"} if i == 0 else {"primary", "secondary"}
            _wait_until(
                lambda want=want: self._joined(want),
                f"node{i + 1} joining the formation",
                timeout=120,
                log=lambda i=i: self.service.log(f"node{i + 1}"),
            )
        return self

    def _joined(self, want: set[str]) -> bool:
        """Whether the nodes report ``want``; meanwhile hurry the base backup of a joining
        standby along, which otherwise waits for a spread checkpoint (a minute or more)."""
        states = self.states()
        if set(states.values()) == want:
            return True
        if "catchingup" in states.values() or "wait_standby" in states.values():
            for port, state in states.items():
                if state in ("primary", "wait_primary", "single"):
                    with contextlib.suppress(Exception):
                        _scalar(self.node_url(port), "CHECKPOINT")
        return False

    def close(self) -> None:
        for name in list(self.service.procs)[::-1]:
            self.service.end(name)
        _clean(self.root)

    # ---- state ----------------------------------------------------------
    def states(self) -> dict[int, str]:
        """Each node's port and the state the monitor last heard it report."""
        eng = sa.create_engine(self._monitor_url(), poolclass=sa.pool.NullPool)
        try:
            with eng.connect() as conn:
                rows = conn.exec_driver_sql(
                    "SELECT nodeport, reportedstate FROM pgautofailover.node"
                ).all()
        finally:
            eng.dispose()
        return {int(port): str(state) for port, state in rows}

    def primary_port(self) -> int:
        ports = [port for port, state in self.states().items() if state == "primary"]
        if len(ports) != 1:
            raise ClusterUnavailable(f"no single primary: {self.states()}")
        return ports[0]

    def settled(self) -> bool:
        return sorted(self.states().values()) == ["primary", "secondary"]

    def sync_standby_names(self) -> str:
        return str(_scalar(self.node_url(self.primary_port()), "SHOW synchronous_standby_names"))

    def failover(self, timeout: float = 120) -> None:
        """``pg_autoctl perform failover``: the standby is promoted, the primary demoted;
        returns once both report their new roles."""
        before = self.primary_port()
        self.service.run(
            "pg_autoctl",
            "perform",
            "failover",
            "--monitor",
            self.monitor_uri,
            "--wait",
            str(int(timeout)),
            timeout=timeout + 30,
        )
        _wait_until(
            lambda: self.settled() and self.primary_port() != before, "the failover", timeout
        )

    def quick_monitor(self) -> None:
        """Have the monitor declare a silent node dead within seconds (defaults: 20 s and more)."""
        eng = sa.create_engine(
            f"postgresql+psycopg://postgres@127.0.0.1:{MONITOR_PORT}/pg_auto_failover",
            isolation_level="AUTOCOMMIT",
            poolclass=sa.pool.NullPool,
        )
        with eng.connect() as conn:
            for name, value in (
                ("health_check_period", 1000),
                ("health_check_timeout", 1000),
                ("health_check_max_retries", 1),
                ("health_check_retry_delay", 500),
                ("node_considered_unhealthy_timeout", 2000),
            ):
                conn.exec_driver_sql(f"ALTER SYSTEM SET pgautofailover.{name} = {value}")
            conn.exec_driver_sql("SELECT pg_reload_conf()")
        eng.dispose()

    def crash_primary(self, timeout: float = 120) -> int:
        """SIGKILL the primary's keeper and PostgreSQL (one process group); return the new
        primary's port once the standby has been promoted and takes writes (the dead node
        is still listed as the primary it last said it was)."""
        before = self.primary_port()
        self.service.end(f"node{NODE_PORTS.index(before) + 1}", signal.SIGKILL)
        survivor = next(port for port in NODE_PORTS if port != before)
        _wait_until(
            lambda: (
                self.states()[survivor] in ("wait_primary", "primary")
                and _scalar(self.node_url(survivor), "SELECT NOT pg_is_in_recovery()") is True
            ),
            "the standby's promotion after a crash",
            timeout,
        )
        return survivor

    def restart_node(self, port: int, timeout: float = 180) -> None:
        """Run a stopped node's keeper again; it rejoins as the standby."""
        i = NODE_PORTS.index(port) + 1
        self.service.spawn(f"node{i}", "pg_autoctl", "run", "--pgdata", str(self.root / f"node{i}"))
        _wait_until(
            lambda: self._joined({"primary", "secondary"}),
            f"node{i} rejoining",
            timeout,
            log=lambda: self.service.log(f"node{i}"),
        )


class PgBouncer:
    """PgBouncer in front of ``port``, transaction pooling, trust authentication."""

    def __init__(
        self,
        target_port: int,
        root: Path = ROOT / "pgbouncer",
        pool_size: int = 20,
        port: int = BOUNCER_PORT,
    ) -> None:
        self.root = root
        self.target_port = target_port
        self.pool_size = pool_size
        self.port = port
        self.service = _Service(root)

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> PgBouncer:
        ensure_installed()
        _clean(self.root)
        self.root.mkdir(parents=True)
        (self.root / "userlist.txt").write_text('"postgres" ""\n')
        (self.root / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={self.target_port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\n"
            f"unix_socket_dir = {self.root}\n"
            "auth_type = trust\n"
            f"auth_file = {self.root / 'userlist.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\nmax_client_conn = 1000\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            "admin_users = postgres\n"
        )
        if os.geteuid() == 0:
            os.chmod(self.root.parent, 0o755)
            subprocess.run(["chown", "-R", "postgres:postgres", str(self.root)], check=True)
        self.service.spawn("pgbouncer", "pgbouncer", str(self.root / "pgbouncer.ini"))
        _wait_until(
            lambda: _scalar(self.url("postgres"), "SELECT 1") == 1,
            "PgBouncer",
            log=lambda: self.service.log("pgbouncer"),
        )
        return self

    def close(self) -> None:
        self.service.end("pgbouncer")
        _clean(self.root)


if __name__ == "__main__":  # pragma: no cover - by hand
    formation = Formation().start()
    bouncer = PgBouncer(5432).start()
    print("formation:", formation.url(), formation.states())
    print("pgbouncer (in front of 127.0.0.1:5432):", bouncer.url())
    try:
        signal.pause()
    finally:
        bouncer.close()
        formation.close()
