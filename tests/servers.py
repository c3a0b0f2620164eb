"""Private, throwaway PostgreSQL and MariaDB servers for outage tests.

Restarting or stopping the shared test servers would break everyone else's
tests, so the tests that take a database down start one of these on a free
port in a temporary directory, and stop, start or restart *that* one.
Also usable from ``bench/`` scripts. Runs the server as the ``postgres``
(PostgreSQL) user when started as root, as PostgreSQL refuses root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

PG_BIN = Path(os.environ.get("SQLRESULTS_PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until(check: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not come up in {timeout}s")


def _answers(url: str) -> bool:
    eng = sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": 2})
    try:
        with eng.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return True
    finally:
        eng.dispose()


class PrivatePostgres:
    """``initdb`` + ``pg_ctl`` on a free port; trust authentication on 127.0.0.1."""

    def __init__(self, root: Path | None = None, fsync: bool = False) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="sqlr-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\nfsync = {'on' if fsync else 'off'}\n"
                "max_connections = 200\n"
            )

    def _run(self, *cmd: str) -> None:
        if self._as_postgres:
            cmd = ("runuser", "-u", "postgres", "--", *cmd)
        subprocess.run(cmd, check=True, capture_output=True, cwd=self.root)

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        auth = "postgres" + (f":{password}" if password else "")
        return f"postgresql+psycopg://{auth}@127.0.0.1:{self.port}/{database}"

    def _ctl(self, *args: str) -> None:
        log = str(self.root / "server.log")
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", log, "-w", *args)

    def start(self) -> PrivatePostgres:
        self._ctl("start")
        _wait_until(lambda: _answers(self.url()), "private PostgreSQL")
        return self

    def stop(self) -> None:
        self._ctl("stop", "-m", "fast")

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every connection is terminated, then the server is back."""
        self._ctl("restart", "-m", "fast")
        _wait_until(lambda: _answers(self.url()), "private PostgreSQL")

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # not running
            self._ctl("stop", "-m", "immediate")
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateMariaDB:
    """``mariadb-install-db`` + ``mariadbd`` on a free port, without grant checks."""

    def __init__(self, root: Path | None = None, *options: str) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="sqlr-maria-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.options = options
        self.proc: subprocess.Popen[bytes] | None = None
        subprocess.run(
            [
                "mariadb-install-db",
                "--no-defaults",
                f"--datadir={self.data}",
                "--user=root" if os.geteuid() == 0 else f"--user={os.getlogin()}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            check=True,
            capture_output=True,
        )

    def url(self, database: str = "test", password: str | None = None) -> str:
        auth = "root" + (f":{password}" if password else "")
        return f"mysql+pymysql://{auth}@127.0.0.1:{self.port}/{database}"

    def start(self) -> PrivateMariaDB:
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - the server's stdout
        self.proc = subprocess.Popen(
            [
                "mariadbd",
                "--no-defaults",
                f"--datadir={self.data}",
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                f"--socket={self.root / 'mysqld.sock'}",
                f"--pid-file={self.root / 'mysqld.pid'}",
                "--skip-grant-tables",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=64M",
                "--innodb-flush-log-at-trx-commit=0",
                "--max-connections=300",
                *(["--user=root"] if os.geteuid() == 0 else []),
                *self.options,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        _wait_until(lambda: _answers(self.url("mysql")), "private MariaDB")
        with sa.create_engine(self.url("mysql"), poolclass=sa.pool.NullPool).connect() as conn:
            conn.exec_driver_sql("CREATE DATABASE IF NOT EXISTS test")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # a clean shutdown: connections are cut
            self.proc.wait(60)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        shutil.rmtree(self.root, ignore_errors=True)
