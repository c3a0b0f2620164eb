"""The hottest statements, run on the driver's own connection: a task's read and write.

SQLAlchemy builds and compiles every statement (once per statement object);
what this module skips is its per-call execution machinery, which costs
about as much as the round trip itself (docs/benchmarks.md, figure 2). The
connection still comes from SQLAlchemy's pool (kept between calls by
:mod:`celery_sqlresults.lease`), SQLAlchemy's bind and result processors
still convert values, and errors go through SQLAlchemy's own handler, so
retries, disconnects and the missing-table handling work unchanged.

A statement runs one of two ways: through libpq itself on psycopg
(:mod:`celery_sqlresults.libpq`), else on the driver's cursor, kept with the
connection for the next call. Used only where that is exactly equivalent: a
driver the dialect lists in ``fast_drivers``, no statement logging
(``echo``), no ``schema_translate_map`` and no execution or connection
listeners on the engine (instrumentation such as tracing sees every
statement through the normal path). Everything else runs through
``Connection.execute``. Our engines run in autocommit; should a pool
listener turn it off, each call commits (or rolls back) what the driver began.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from . import lease, libpq
from .dialects import Dialect

__all__ = ["Compiled", "compile_statement", "execute", "fetch_one", "weight"]

#: Engine events that must see every statement or connection: their presence means execute().
_WATCHED = (
    "before_execute",
    "after_execute",
    "before_cursor_execute",
    "after_cursor_execute",
    "engine_connect",
)
#: SQLAlchemy's error handlers, which the fast path hands every error to.
_HANDLERS = hasattr(Connection, "_handle_dbapi_exception") and hasattr(
    Connection, "_handle_dbapi_exception_noconnection"
)
#: Key of the kept cursor in the pool record's ``info``: a new cursor per call costs
#: a noticeable share of a read.
_CURSOR = "celery_sqlresults.cursor"
#: Bytes of values above which a call's cursor is closed, not kept (and its values with it).
_KEEP_BYTES = 64 * 1024
_KEEP = 256  # compiled statements remembered (a layout has a handful)


@dataclass(frozen=True)
class Compiled:
    """A statement as the driver takes it, with what converts its values both ways."""

    statement: sa.Executable  # kept alive, so its id() is not reused
    sql: str
    defaults: dict[str, Any]  # values of the statement's own bound literals
    positions: tuple[str, ...] | None  # parameter order for positional paramstyles
    binds: dict[str, Callable[[Any], Any]]  # SQLAlchemy's bind processors (SQLite dates)
    names: tuple[str, ...]  # result columns, in order
    results: tuple[tuple[int, Callable[[Any], Any]], ...]  # (position, result processor)
    prepare: bool  # on the cursor: as a server-side prepared statement (psycopg)
    libpq: libpq.Statement | None  # the statement for libpq, where that path is taken

    def args(self, params: Mapping[str, Any]) -> Any:
        """The driver's parameters for ``params``: literals added, bind processors run."""
        values = {**self.defaults, **params}
        for name, proc in self.binds.items():
            if values.get(name) is not None:
                values[name] = proc(values[name])
        return values if self.positions is None else [values[n] for n in self.positions]

    def row(self, raw: Sequence[Any]) -> dict[str, Any]:
        """A fetched row as a dict, through SQLAlchemy's result processors."""
        if not self.results:
            return dict(zip(self.names, raw, strict=True))
        values = list(raw)
        for i, proc in self.results:
            if values[i] is not None:
                values[i] = proc(values[i])
        return dict(zip(self.names, values, strict=True))


_compiled: dict[int, Compiled] = {}
_compiled_lock = threading.Lock()


def fetch_one(
    engine: Engine, dialect: Dialect, stmt: sa.Executable, params: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The first row of ``stmt`` as a dict (``None`` if none)."""
    if not _usable(engine, dialect):
        lease.release(engine)  # a listener was added since: the lease goes, as on any path
        with engine.connect() as conn:
            first = conn.execute(stmt, params).first()
        return None if first is None else dict(first._mapping)
    compiled = compile_statement(engine, dialect, stmt)
    rows = _run(engine, dialect, compiled, params, fetch=True)
    return compiled.row(rows[0]) if rows else None


def execute(
    engine: Engine, dialect: Dialect, stmt: sa.Executable, params: Mapping[str, Any]
) -> None:
    """Run ``stmt`` (a write) and discard any rows it returns."""
    if not _usable(engine, dialect):
        lease.release(engine)
        with engine.connect() as conn:
            conn.execute(stmt, params)
        return
    _run(engine, dialect, compile_statement(engine, dialect, stmt), params, fetch=False)


def weight(values: Mapping[str, Any] | Sequence[Any]) -> int:
    """Bytes of the text and binary values of a row or of parameters."""
    total = 0  # a plain loop: cheaper than sum() over a generator, and called per store
    for value in values.values() if isinstance(values, Mapping) else values:
        if isinstance(value, (bytes, str)):
            total += len(value)
    return total


def _usable(engine: Engine, dialect: Dialect) -> bool:
    """Whether the engine is plain enough for the fast path (checked each call: cheap)."""
    if not _HANDLERS or engine.dialect.driver not in dialect.fast_drivers or engine.echo:
        return False
    if engine._execution_options.get("schema_translate_map"):
        return False
    if not engine._has_events:  # no connection event listener at all
        return True
    dispatch = engine.dispatch
    return not any(getattr(dispatch, name) for name in _WATCHED)


def compile_statement(engine: Engine, dialect: Dialect, stmt: sa.Executable) -> Compiled:
    """``stmt`` as the fast path sends it (compiled once; the benchmark's bare ceiling too)."""
    found = _compiled.get(id(stmt))
    if found is not None and found.statement is stmt:
        return found
    assert isinstance(stmt, sa.ClauseElement)
    sa_dialect = engine.dialect
    compiled: Any = stmt.compile(dialect=sa_dialect)  # an SQLCompiler
    sql = str(compiled)
    selected = list(getattr(stmt, "exported_columns", None) or ())
    processors = (c.type._cached_result_processor(sa_dialect, None) for c in selected)
    through_libpq = dialect.uses_libpq(sa_dialect.driver)
    made = Compiled(
        statement=stmt,
        sql=sql,
        defaults=dict(compiled.params),
        positions=tuple(compiled.positiontup or ()) if compiled.positional else None,
        binds=dict(compiled._bind_processors),
        names=tuple(c.key for c in selected),
        results=tuple((i, p) for i, p in enumerate(processors) if p is not None),
        prepare=through_libpq,
        libpq=libpq.numbered(sql) if through_libpq and libpq.AVAILABLE else None,
    )
    with _compiled_lock:
        if len(_compiled) >= _KEEP:  # statements of forgotten layouts: start afresh
            _compiled.clear()
        _compiled[id(stmt)] = made
    return made


def _run(
    engine: Engine,
    dialect: Dialect,
    compiled: Compiled,
    params: Mapping[str, Any],
    fetch: bool,
) -> Any:
    """Run on a pooled connection, through libpq or on the cursor; errors to SQLAlchemy.

    A read fetches every row (one, by primary key), so no driver keeps a
    statement open between calls.
    """
    args = compiled.args(params)
    pooled, kept = lease.take(engine)
    ok = False
    try:
        conn = pooled.dbapi_connection
        if compiled.libpq is not None and conn.autocommit:
            rows = libpq.run(pooled.info, conn, compiled.libpq, args, fetch)
        else:
            rows = _on_cursor(dialect, pooled, compiled, args, params, fetch)
        ok = True
        return rows
    except BaseException as exc:
        _failed(engine, dialect, pooled, compiled, args, exc)
        raise  # not reached: the handler raises
    finally:
        lease.give_back(engine, pooled, kept, ok)


def _on_cursor(
    dialect: Dialect,
    pooled: Any,
    compiled: Compiled,
    args: Any,
    params: Mapping[str, Any],
    fetch: bool,
) -> Any:
    """Run on the connection's kept cursor (a new one the first time)."""
    conn = pooled.dbapi_connection
    kept = pooled.info.get(_CURSOR)
    if kept is not None and kept[0] is conn:
        cursor = kept[1]
    else:
        cursor = conn.cursor()
        pooled.info[_CURSOR] = (conn, cursor)
    if compiled.prepare and conn.prepare_threshold is not None:
        cursor.execute(compiled.sql, args, prepare=True)
    else:
        cursor.execute(compiled.sql, args)
    rows = cursor.fetchall() if fetch else None
    if not dialect.in_autocommit(conn):
        conn.commit()  # a listener turned autocommit off: end what the driver began
    # A read's parameters are a task id; a write returns no rows: weigh the side that counts.
    held = (rows[0] if rows else ()) if fetch else params
    if weight(held) > _KEEP_BYTES:
        # The driver's cursor holds on to its last parameters and rows.
        pooled.info.pop(_CURSOR, None)
        cursor.close()
    return rows


def _failed(
    engine: Engine,
    dialect: Dialect,
    pooled: Any,
    compiled: Compiled,
    args: Any,
    exc: BaseException,
) -> None:
    """Hand ``exc`` to SQLAlchemy's handler, as ``Connection.execute()`` would; it raises.

    ``Connection._handle_dbapi_exception`` wraps the error, runs
    ``handle_error`` listeners and invalidates the connection (and the pool's
    older ones) on a disconnect, and on an exit exception (``KeyboardInterrupt``…) too.
    """
    kept = pooled.info.pop(_CURSOR, None)
    cursor = kept[1] if kept is not None and kept[0] is pooled.dbapi_connection else None
    with contextlib.suppress(Exception):  # a transaction a listener began must not linger
        if not dialect.in_autocommit(pooled.dbapi_connection):
            pooled.dbapi_connection.rollback()
    Connection(engine, connection=pooled)._handle_dbapi_exception(
        exc, compiled.sql, args, cursor, None
    )


def _after_fork_in_child() -> None:
    """A lock held by another thread of the parent at the fork would never be released here."""
    global _compiled_lock
    _compiled_lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)
