"""The two hottest statements, run on the driver's cursor: one task read, one task write.

SQLAlchemy builds and compiles every statement (once per statement object);
what this module skips is its per-call execution machinery, which on
PostgreSQL costs more than the round trip itself (measured on psycopg 3: a
primary-key read 0.17 ms through ``Connection.execute`` against 0.07 ms on
the cursor, prepared) and is most of the cost of a SQLite read. The
connection still comes from SQLAlchemy's pool, and errors go through
SQLAlchemy's own handler (wrapped as ``DBAPIError`` subclasses, ``handle_error``
listeners run, a disconnect invalidates the connection and the pool), so
retries and the missing-table handling work unchanged.

SQLAlchemy's bind and result processors still convert values (SQLite keeps
dates as text). Used only where it is exactly equivalent: psycopg 3, PyMySQL
or the standard ``sqlite3`` in autocommit (our default), and no
``before/after_cursor_execute`` listeners on the engine (instrumentation
such as tracing sees every statement through the normal path). Everything
else runs through ``Connection.execute``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

__all__ = ["execute", "fetch_one"]


#: Drivers the fast path knows, and how to tell that a raw connection is in autocommit.
_AUTOCOMMIT: dict[str, Callable[[Any], bool]] = {
    "psycopg": lambda c: bool(c.autocommit),
    "pymysql": lambda c: bool(c.get_autocommit()),
    "pysqlite": lambda c: c.isolation_level is None,
}


@dataclass(frozen=True)
class _Compiled:
    statement: sa.Executable  # kept alive, so its id() is not reused
    sql: str
    defaults: dict[str, Any]  # values of the statement's own bound literals
    positions: tuple[str, ...] | None  # parameter order for positional paramstyles
    binds: dict[str, Callable[[Any], Any]]  # SQLAlchemy's bind processors (SQLite dates)
    names: tuple[str, ...]  # result columns, in order
    results: tuple[Callable[[Any], Any] | None, ...]  # and their result processors
    prepare: bool  # psycopg: server-side prepared statement


_compiled: dict[int, _Compiled] = {}
_KEEP = 256  # compiled statements remembered (a layout has a handful)
_compiled_lock = threading.Lock()


def fetch_one(conn: Connection, stmt: sa.Executable, params: Mapping[str, Any]) -> Any:
    """The first row of ``stmt`` as a mapping (``None`` if none)."""
    if not _usable(conn):
        row = conn.execute(stmt, params).first()
        return None if row is None else row._mapping
    compiled = _compile(conn, stmt)
    row = _run(conn, compiled, params, fetch=True)
    if row is None:
        return None
    return {
        name: value if proc is None or value is None else proc(value)
        for name, proc, value in zip(compiled.names, compiled.results, row, strict=True)
    }


def execute(conn: Connection, stmt: sa.Executable, params: Mapping[str, Any]) -> None:
    """Run ``stmt`` (a write) and discard any rows it returns."""
    if not _usable(conn):
        conn.execute(stmt, params)
        return
    _run(conn, _compile(conn, stmt), params, fetch=False)


def _usable(conn: Connection) -> bool:
    engine: Engine = conn.engine
    autocommit = _AUTOCOMMIT.get(engine.dialect.driver)
    if autocommit is None or not hasattr(conn, "_handle_dbapi_exception"):
        return False
    if conn.get_execution_options().get("schema_translate_map"):
        return False
    dispatch = engine.dispatch
    if dispatch.before_cursor_execute or dispatch.after_cursor_execute:
        return False
    return autocommit(conn.connection.driver_connection)


def _compile(conn: Connection, stmt: sa.Executable) -> _Compiled:
    found = _compiled.get(id(stmt))
    if found is not None and found.statement is stmt:
        return found
    assert isinstance(stmt, sa.ClauseElement)
    dialect = conn.dialect
    compiled: Any = stmt.compile(dialect=dialect)  # an SQLCompiler
    selected = list(getattr(stmt, "selected_columns", None) or ())
    made = _Compiled(
        statement=stmt,
        sql=str(compiled),
        defaults=dict(compiled.params),
        positions=tuple(compiled.positiontup or ()) if compiled.positional else None,
        binds=dict(compiled._bind_processors),
        names=tuple(c.key for c in selected),
        results=tuple(c.type._cached_result_processor(dialect, None) for c in selected),
        prepare=dialect.driver == "psycopg",
    )
    with _compiled_lock:
        if len(_compiled) >= _KEEP:  # statements of forgotten layouts: start afresh
            _compiled.clear()
        _compiled[id(stmt)] = made
    return made


def _run(conn: Connection, compiled: _Compiled, params: Mapping[str, Any], fetch: bool) -> Any:
    """Execute on the pooled connection's cursor; errors go through SQLAlchemy's own handler.

    ``Connection._handle_dbapi_exception`` is what ``execute()`` calls: it
    wraps the error, runs ``handle_error`` listeners, invalidates the
    connection (and the pool's older ones) on a disconnect, and on an exit
    exception (``KeyboardInterrupt``…) too.
    """
    values = {**compiled.defaults, **params}
    for name, proc in compiled.binds.items():
        if values.get(name) is not None:
            values[name] = proc(values[name])
    args: Any = values if compiled.positions is None else [values[n] for n in compiled.positions]
    cursor: Any = None
    try:
        dbapi_conn = conn.connection.dbapi_connection
        assert dbapi_conn is not None
        cursor = dbapi_conn.cursor()  # psycopg's execute() takes prepare=
        if compiled.prepare:
            cursor.execute(compiled.sql, args, prepare=True)
        else:
            cursor.execute(compiled.sql, args)
        return cursor.fetchone() if fetch else None
    except BaseException as exc:
        conn._handle_dbapi_exception(exc, compiled.sql, args, cursor, None)
    finally:
        if cursor is not None:
            with contextlib.suppress(Exception):
                cursor.close()
