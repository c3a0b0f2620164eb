"""One pooled engine per process and URL, never shared across a fork.

A client process keeps its connections between calls (Celery's ``db+``
opens a new one per call outside workers). A prefork child notices it is
not the process that built the engine and starts its own pool, after telling
the inherited pool to forget its connections without closing them: closing
would send a goodbye on sockets the parent still uses.

A SQLite database is a file that test suites and operators delete and
recreate under the same path. Pooled connections would go on writing into
the deleted file, so an engine on a file remembers which file its first
connection opened, and :func:`is_current` tells when the path now names
another file (or none): the engine is then dropped and the next one opens
what is there now.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from . import lease
from .dialects import Dialect
from .settings import Settings

__all__ = ["dispose_all", "get_engine", "is_current"]

_lock = threading.Lock()
_engines: dict[str, tuple[int, Engine]] = {}


@dataclass
class _File:
    """The database file an engine's connections opened: its path, and which file that was."""

    path: str
    #: ``(st_dev, st_ino)`` seen by the first connection; ``None`` until one connects.
    identity: tuple[int, int] | None = None


_files: weakref.WeakKeyDictionary[Engine, _File] = weakref.WeakKeyDictionary()


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
    dialect = type(settings.dialect).__name__  # behind a pooler or not
    url = settings.url.render_as_string(hide_password=False)
    return f"{url}|{options}|{callback}|{session}|{dialect}"


def get_engine(settings: Settings) -> Engine:
    """The engine of this process for ``settings`` (created on first use)."""
    key = _key(settings)
    pid = os.getpid()
    found = _engines.get(key)
    if found is not None and found[0] == pid and is_current(found[1]):
        return found[1]
    with _lock:
        found = _engines.get(key)
        if found is not None and found[0] == pid and is_current(found[1]):
            return found[1]
        if found is not None and found[0] == pid:
            # Its database file was replaced: these connections hold the old one.
            lease.end_leases(found[1])
            found[1].dispose()
        elif found is not None:
            # Inherited from the parent: drop it without touching its sockets.
            found[1].dispose(close=False)
        engine = _create(settings)
        _engines[key] = (pid, engine)
        return engine


def is_current(engine: Engine) -> bool:
    """False when ``engine``'s SQLite file was deleted or replaced since it first connected.

    One ``stat()`` for an engine on a file; nothing for any other engine.
    """
    watched = _files.get(engine)
    if watched is None or watched.identity is None:
        return True
    return _identity(watched.path) == watched.identity


def _identity(path: str) -> tuple[int, int] | None:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return (found.st_dev, found.st_ino)


def _create(settings: Settings) -> Engine:
    options: dict[str, Any] = dict(settings.engine_options)
    for name, value in settings.dialect.engine_defaults.items():
        options.setdefault(name, value)
    # Every hot-path call is a single statement: autocommit makes it one
    # round trip (no BEGIN before, no ROLLBACK when the connection goes back
    # to the pool). Schema changes open their own transaction.
    options.setdefault("isolation_level", "AUTOCOMMIT")
    if options["isolation_level"] == "AUTOCOMMIT":
        options.setdefault("pool_reset_on_return", None)
    dialect = settings.dialect
    wanted = dialect.connect_args()
    if wanted:  # the user's own connect_args win
        options["connect_args"] = {**wanted, **options.get("connect_args", {})}
    engine = sa.create_engine(settings.url, **options)
    statements = dialect.session_statements(
        settings.url, settings.lock_timeout, settings.durable_commit
    )
    if statements:
        set_up = functools.partial(_session_setup, dialect, statements)
        sa.event.listen(engine, "connect", set_up)
    path = dialect.database_file(settings.url)
    if path is not None:
        watched = _files[engine] = _File(os.path.abspath(path))
        sa.event.listen(engine, "connect", functools.partial(_remember_file, watched))
    if settings.engine_callback is not None:
        settings.engine_callback(engine)
    return engine


def _session_setup(dialect: Dialect, statements: list[str], dbapi_conn: Any, _record: Any) -> None:
    """Each new connection's session settings (lock bound, commit durability, WAL)."""
    dialect.set_up_session(dbapi_conn, statements)


def _remember_file(watched: _File, _dbapi_conn: Any, _record: Any) -> None:
    """The first connection's file is the one this engine serves (its set-up created it)."""
    if watched.identity is None:
        watched.identity = _identity(watched.path)


def dispose_all() -> None:
    """Close every engine this process created (tests, shutdown)."""
    with _lock:
        pid = os.getpid()
        for key, (owner, engine) in list(_engines.items()):
            if owner == pid:
                lease.end_leases(engine)
            engine.dispose(close=owner == pid)
            del _engines[key]
