"""One pooled engine per process and URL, never shared across a fork.

A client process keeps its connections between calls (Celery's ``db+``
opens a new one per call outside workers). A prefork child notices it is
not the process that built the engine and starts its own pool, after telling
the inherited pool to forget its connections without closing them: closing
would send a goodbye on sockets the parent still uses.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from . import fastpath
from .dialects import dialect_for
from .settings import Settings

__all__ = ["dispose_all", "get_engine"]

_lock = threading.Lock()
_engines: dict[str, tuple[int, Engine]] = {}


def _after_fork_in_child() -> None:
    """A lock another thread of the parent held at the fork would never be released here."""
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _key(settings: Settings) -> str:
    options = json.dumps(settings.engine_options, sort_keys=True, default=repr)
    callback = repr(settings.engine_callback)  # a different callback wants its own engine
    # ... and so do different session settings (run on each new connection)
    session = f"{settings.lock_timeout}|{settings.durable_commit}"
    return f"{settings.url.render_as_string(hide_password=False)}|{options}|{callback}|{session}"


def get_engine(settings: Settings) -> Engine:
    """The engine of this process for ``settings`` (created on first use)."""
    key = _key(settings)
    pid = os.getpid()
    found = _engines.get(key)
    if found is not None and found[0] == pid:
        return found[1]
    with _lock:
        found = _engines.get(key)
        if found is not None and found[0] == pid:
            return found[1]
        if found is not None:
            # Inherited from the parent: drop it without touching its sockets.
            found[1].dispose(close=False)
        engine = _create(settings)
        _engines[key] = (pid, engine)
        return engine


def _create(settings: Settings) -> Engine:
    options: dict[str, Any] = dict(settings.engine_options)
    # Every hot-path call is a single statement: autocommit makes it one
    # round trip (no BEGIN before, no ROLLBACK when the connection goes back
    # to the pool). Schema changes open their own transaction.
    options.setdefault("isolation_level", "AUTOCOMMIT")
    if options["isolation_level"] == "AUTOCOMMIT":
        options.setdefault("pool_reset_on_return", None)
    engine = sa.create_engine(settings.url, **options)
    dialect = dialect_for(settings.url.get_backend_name())
    statements = dialect.lock_timeout_statements(settings.lock_timeout) + dialect.commit_statements(
        settings.durable_commit
    )
    if statements:
        sa.event.listen(engine, "connect", functools.partial(_session_setup, statements))
    if settings.url.get_backend_name() == "sqlite" and settings.url.database not in (
        None,
        "",
        ":memory:",
    ):
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    if settings.engine_callback is not None:
        settings.engine_callback(engine)
    return engine


def _session_setup(statements: list[str], dbapi_conn: Any, _record: Any) -> None:
    """Bound lock waits on a new connection (``sqlresults_lock_timeout``)."""
    cur = dbapi_conn.cursor()
    try:
        for statement in statements:
            cur.execute(statement)
    finally:
        cur.close()
    dbapi_conn.commit()  # psycopg opened a transaction for the SET; end it


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """WAL lets readers (a monitoring page, ``.get()``) run while a worker writes."""
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
    finally:
        cur.close()


def dispose_all() -> None:
    """Close every engine this process created (tests, shutdown)."""
    with _lock:
        pid = os.getpid()
        for key, (owner, engine) in list(_engines.items()):
            if owner == pid:
                fastpath.end_leases(engine)
            engine.dispose(close=owner == pid)
            del _engines[key]
