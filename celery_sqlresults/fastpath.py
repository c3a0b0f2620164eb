"""The two hottest statements, run on the driver's cursor: one task read, one task write.

SQLAlchemy builds and compiles every statement (once per statement object);
what this module skips is its per-call execution machinery, which on
PostgreSQL costs more than the round trip itself (measured on psycopg 3: a
primary-key read 0.17 ms through ``Connection.execute`` against 0.07 ms on
the cursor, prepared). The connection still comes from SQLAlchemy's pool,
errors still arrive as SQLAlchemy's ``DBAPIError`` subclasses, and a
disconnect still invalidates the pooled connection, so retries and the
missing-table handling above work unchanged.

Used only where it is exactly equivalent: psycopg 3 in autocommit (our
default), and no ``before/after_cursor_execute`` listeners on the engine
(instrumentation such as tracing sees every statement through the normal
path). Everything else runs through ``Connection.execute``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

__all__ = ["execute", "fetch_one"]


@dataclass(frozen=True)
class _Compiled:
    statement: sa.Executable  # kept alive, so its id() is not reused
    sql: str
    defaults: dict[str, Any]  # values of the statement's own bound literals
    names: tuple[str, ...]  # result columns, in order


_compiled: dict[int, _Compiled] = {}
_compiled_lock = threading.Lock()


def fetch_one(conn: Connection, stmt: sa.Executable, params: Mapping[str, Any]) -> Any:
    """The first row of ``stmt`` as a mapping (``None`` if none)."""
    if not _usable(conn):
        row = conn.execute(stmt, params).first()
        return None if row is None else row._mapping
    compiled = _compile(conn, stmt)
    row = _run(conn, compiled, params, fetch=True)
    return None if row is None else dict(zip(compiled.names, row, strict=True))


def execute(conn: Connection, stmt: sa.Executable, params: Mapping[str, Any]) -> None:
    """Run ``stmt`` (a write) and discard any rows it returns."""
    if not _usable(conn):
        conn.execute(stmt, params)
        return
    _run(conn, _compile(conn, stmt), params, fetch=False)


def _usable(conn: Connection) -> bool:
    engine: Engine = conn.engine
    if engine.dialect.driver != "psycopg":
        return False
    dispatch = engine.dispatch
    if dispatch.before_cursor_execute or dispatch.after_cursor_execute:
        return False
    return bool(getattr(conn.connection.driver_connection, "autocommit", False))


def _compile(conn: Connection, stmt: sa.Executable) -> _Compiled:
    found = _compiled.get(id(stmt))
    if found is not None and found.statement is stmt:
        return found
    assert isinstance(stmt, sa.ClauseElement)
    compiled = stmt.compile(dialect=conn.dialect)
    selected = getattr(stmt, "selected_columns", None)
    names = tuple(c.key for c in selected) if selected is not None else ()
    made = _Compiled(stmt, str(compiled), dict(compiled.params), names)
    with _compiled_lock:
        _compiled[id(stmt)] = made
    return made


def _run(conn: Connection, compiled: _Compiled, params: Mapping[str, Any], fetch: bool) -> Any:
    """Execute on the pooled connection's cursor, translating errors the way SQLAlchemy does."""
    dbapi_conn = conn.connection.dbapi_connection
    assert dbapi_conn is not None
    values = {**compiled.defaults, **params}
    cursor: Any = dbapi_conn.cursor()  # psycopg's: execute() takes prepare=
    try:
        cursor.execute(compiled.sql, values, prepare=True)
        return cursor.fetchone() if fetch else None
    except conn.dialect.loaded_dbapi.Error as exc:
        lost = conn.dialect.is_disconnect(exc, dbapi_conn, cursor)
        if lost:
            conn.invalidate(exc)
        raise sa.exc.DBAPIError.instance(
            compiled.sql,
            None,
            exc,
            conn.dialect.loaded_dbapi.Error,
            hide_parameters=True,
            dialect=conn.dialect,
            connection_invalidated=lost,
        ) from exc
    finally:
        cursor.close()
