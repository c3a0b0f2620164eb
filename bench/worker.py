"""A real ``celery worker`` subprocess on :mod:`bench.app`, always terminated on exit."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from celery.utils import uuid

from . import config

READY_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0


@contextlib.contextmanager
def running_worker(
    backend_url: str,
    concurrency: int,
    log_dir: Path,
    queue: str | None = None,
    broker: str = config.BROKER,
    procs: list[subprocess.Popen[bytes]] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Start a prefork worker for ``backend_url``; yield its queue; stop it afterwards.

    Several workers may share one ``queue``; ``procs`` collects their processes.
    """
    queue = queue or f"bench-{uuid()[:8]}"
    name = f"{queue}-{uuid()[:4]}"
    log_path = log_dir / f"{name}.log"
    env = {
        **os.environ,
        config.ENV_BACKEND: backend_url,
        config.ENV_BROKER: broker,
        config.ENV_QUEUE: queue,
        "PYTHONPATH": str(config.ROOT),
        **(env or {}),
    }
    cmd = [
        sys.executable, "-m", "celery", "-A", "bench.app", "worker",
        "--pool=prefork", f"--concurrency={concurrency}", "-Q", queue,
        "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-n", f"{name}@%h",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=config.ROOT,
            start_new_session=True,  # its own process group: children are ours to stop
        )
        if procs is not None:
            procs.append(proc)
        try:
            _wait_ready(proc, log_path)
            yield queue
        finally:
            _stop(proc)


def _wait_ready(proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited early (code {proc.returncode}):\n{text}")
        if " ready." in text:
            return
        time.sleep(0.1)
    raise RuntimeError(f"worker not ready after {READY_TIMEOUT:.0f}s:\n{_tail(log_path)}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Warm shutdown (SIGTERM); if it hangs, kill the worker's own process group."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
            return
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group we created: the worker and its children
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
