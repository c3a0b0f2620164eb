"""The hottest statements, run on the driver's cursor: a task's read and write, a chord's count.

SQLAlchemy builds and compiles every statement (once per statement object);
what this module skips is its per-call execution machinery, which on
PostgreSQL costs about as much as the round trip itself (psycopg 3, a
primary-key read: 0.13 ms through ``Connection.execute`` against 0.07 ms on
the cursor, prepared). The connection still comes from SQLAlchemy's pool,
and its cursor is kept with it for the next call. Errors go through
SQLAlchemy's own handler (wrapped as ``DBAPIError`` subclasses,
``handle_error`` listeners run, a disconnect invalidates the connection and
the pool), so retries and the missing-table handling work unchanged.

On psycopg the statement goes one level lower still: it is sent with libpq's
own calls (``Connection.pgconn``), psycopg's ``Transformer`` converts the
values both ways and psycopg's ``Connection.wait`` waits for the reply, as
its cursor does (so gevent's waiting, and Ctrl-C or Celery's soft time limit
cancelling the statement on the server, behave the same). What is skipped is
the cursor's own bookkeeping, its prepared-statement cache included: 15-20 µs
per call, a fifth of a read. Each connection prepares each statement once per
combination of parameter types, as psycopg does; a connection made with
``prepare_threshold=None`` (PgBouncer in transaction mode) prepares nothing.

SQLAlchemy's bind and result processors still convert values (SQLite keeps
dates as text). Used only where it is exactly equivalent: psycopg 3, PyMySQL,
mysqlclient or the standard ``sqlite3``; no statement logging (``echo``), no
``schema_translate_map`` and no execution or connection listeners on the
engine (instrumentation such as tracing sees every statement through the
normal path). Everything else runs through ``Connection.execute``. Our
engines run in autocommit; should a pool listener turn it off, each call
commits (or rolls back) what the driver began.

Between calls, one thread per engine keeps its pooled connection (a
:class:`_Lease`) instead of checking it in and out of the pool each time:
see there for when it goes back.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

try:  # the libpq path's parts; without them (no psycopg, or one changed) it is not taken
    import psycopg
    from psycopg import generators
    from psycopg.adapt import PyFormat, Transformer
    from psycopg.pq import ConnStatus, DiagnosticField, ExecStatus, TransactionStatus

    _LIBPQ_PARTS = callable(getattr(generators, "execute", None)) and callable(
        getattr(psycopg.Connection, "wait", None)
    )
except ImportError:  # pragma: no cover - psycopg is an extra
    _LIBPQ_PARTS = False

__all__ = ["end_leases", "execute", "fetch_one", "release", "weight"]

logger = logging.getLogger("celery_sqlresults")


#: Drivers the fast path knows, and how to tell that a raw connection is in autocommit.
_AUTOCOMMIT: dict[str, Callable[[Any], bool]] = {
    "psycopg": lambda c: bool(c.autocommit),
    "pymysql": lambda c: bool(c.get_autocommit()),
    "mysqldb": lambda c: bool(c.get_autocommit()),  # mysqlclient
    "pysqlite": lambda c: c.isolation_level is None,
}
#: Engine events that must see every statement or connection: their presence means execute().
_WATCHED = (
    "before_execute",
    "after_execute",
    "before_cursor_execute",
    "after_cursor_execute",
    "engine_connect",
)
#: SQLAlchemy's error handlers, which the cursor path hands every error to.
_HANDLERS = hasattr(Connection, "_handle_dbapi_exception") and hasattr(
    Connection, "_handle_dbapi_exception_noconnection"
)
#: Key of the kept cursor in the pooled connection's ``info``: a new psycopg
#: cursor costs about 10 µs, a tenth of a read.
_CURSOR = "celery_sqlresults.cursor"
#: Bytes of values above which a call's cursor is closed, not kept (and its values with it).
_KEEP_BYTES = 64 * 1024
#: Seconds without a call after which a lease goes back to the pool (at the next call).
_LEASE_IDLE = 1.0
#: Seconds after which a lease goes back through the pool even when busy (pool_recycle).
_LEASE_RENEW = 30.0
#: Seconds :func:`end_leases` waits for a call in progress on a lease.
_END_WAIT = 10.0
#: Key of the libpq path's prepared statements in the pooled connection's ``info``:
#: ``(connection, {(sql, parameter types): name})``.
_LIBPQ = "celery_sqlresults.libpq"
#: Statements one connection prepares at most (a layout has a handful, times parameter types).
_PREPARED_MAX = 64
#: psycopg's ``%(name)s`` placeholders (and ``%%``), rewritten as libpq's ``$n``.
_PLACEHOLDER = re.compile(r"%\(([^)]+)\)s|%%")


@dataclass(frozen=True)
class _Compiled:
    statement: sa.Executable  # kept alive, so its id() is not reused
    sql: str
    defaults: dict[str, Any]  # values of the statement's own bound literals
    positions: tuple[str, ...] | None  # parameter order for positional paramstyles
    binds: dict[str, Callable[[Any], Any]]  # SQLAlchemy's bind processors (SQLite dates)
    names: tuple[str, ...]  # result columns, in order
    results: tuple[tuple[int, Callable[[Any], Any]], ...]  # (position, result processor)
    prepare: bool  # psycopg: server-side prepared statement
    libpq: tuple[bytes, tuple[str, ...]] | None  # psycopg: the SQL with $n, and n's names

    def args(self, params: Mapping[str, Any]) -> Any:
        """The driver's parameters for ``params``: literals added, bind processors run."""
        values = {**self.defaults, **params}
        for name, proc in self.binds.items():
            if values.get(name) is not None:
                values[name] = proc(values[name])
        return values if self.positions is None else [values[n] for n in self.positions]


class _Lease:
    """A pooled connection that one thread keeps checked out between hot-path calls.

    A checkout and check-in through SQLAlchemy's pool costs about 15 µs in a
    worker, a sixth of a read. The lease skips it while its thread is busy,
    and gives the connection back whenever the pool's own checks matter: after
    ``_LEASE_IDLE`` seconds without a call (so the next checkout applies the
    pool's recycling and invalidation), every ``_LEASE_RENEW`` seconds anyway and
    when the connection reaches ``pool_recycle``, when the pool has invalidated
    its connections (another thread saw a disconnect) or was replaced
    (``dispose()``), on any error (after SQLAlchemy's handler has invalidated it
    if need be), and before its thread takes a second connection
    (:func:`release`), so a thread never holds two. All of these are checked
    at the next hot-path call: an idle lease stays checked out until then.

    Only where the pool can spare a connection: a ``QueuePool`` of at least two
    with no ``pool_pre_ping`` and no checkout, check-in or reset listeners (they
    expect to run on every use). One lease per engine: other threads check out
    as usual and end a lease left idle.
    """

    __slots__ = ("invalidated", "lock", "owner", "pool", "pooled", "until", "used")

    def __init__(self, pooled: Any, pool: Any) -> None:
        self.lock = threading.Lock()  # held while a call uses the connection
        self.lock.acquire()
        self.pooled = pooled
        self.pool = pool
        self.invalidated = getattr(pool, "_invalidate_time", 0)
        self.owner = threading.get_ident()
        self.used = now = time.monotonic()
        keep = _LEASE_RENEW
        recycle = getattr(pool, "_recycle", -1)
        record = getattr(pooled, "_connection_record", None)
        if recycle > 0 and record is not None:
            keep = min(keep, recycle - (time.time() - record.starttime))
        self.until = now + keep


_leases: weakref.WeakKeyDictionary[Engine, _Lease] = weakref.WeakKeyDictionary()
_leases_lock = threading.Lock()
#: A forked child's copies of its parent's leases: never used, never collected (collecting
#: a connection could close the socket the parent still uses).
_inherited: list[_Lease] = []

_compiled: dict[int, _Compiled] = {}
#: Numbers of prepared statements' names: unique in the process, so a name never clashes
#: with one prepared earlier on the same session (a state lost, a statement re-prepared).
_names = itertools.count()
_KEEP = 256  # compiled statements remembered (a layout has a handful)
_compiled_lock = threading.Lock()


def fetch_one(engine: Engine, stmt: sa.Executable, params: Mapping[str, Any]) -> Any:
    """The first row of ``stmt`` as a dict (``None`` if none)."""
    if not _usable(engine):
        release(engine)  # a listener was added since: the lease goes, as on any other path
        with engine.connect() as conn:
            first = conn.execute(stmt, params).first()
        return None if first is None else dict(first._mapping)
    compiled = _compile(engine, stmt)
    rows = _run(engine, compiled, params, fetch=True)
    if not rows:
        return None
    row = rows[0]
    if compiled.results:
        row = list(row)
        for i, proc in compiled.results:
            if row[i] is not None:
                row[i] = proc(row[i])
    return dict(zip(compiled.names, row, strict=True))


def execute(engine: Engine, stmt: sa.Executable, params: Mapping[str, Any]) -> None:
    """Run ``stmt`` (a write) and discard any rows it returns."""
    if not _usable(engine):
        release(engine)
        with engine.connect() as conn:
            conn.execute(stmt, params)
        return
    _run(engine, _compile(engine, stmt), params, fetch=False)


def _usable(engine: Engine) -> bool:
    """Whether the engine is plain enough for the cursor path (checked each call: cheap)."""
    if not _HANDLERS or engine.dialect.driver not in _AUTOCOMMIT or engine.echo:
        return False
    if engine._execution_options.get("schema_translate_map"):
        return False
    if not engine._has_events:  # no connection event listener at all
        return True
    dispatch = engine.dispatch
    return not any(getattr(dispatch, name) for name in _WATCHED)


def _compile(engine: Engine, stmt: sa.Executable) -> _Compiled:
    found = _compiled.get(id(stmt))
    if found is not None and found.statement is stmt:
        return found
    assert isinstance(stmt, sa.ClauseElement)
    dialect = engine.dialect
    compiled: Any = stmt.compile(dialect=dialect)  # an SQLCompiler
    sql = str(compiled)
    selected = list(getattr(stmt, "exported_columns", None) or ())
    processors = (c.type._cached_result_processor(dialect, None) for c in selected)
    made = _Compiled(
        statement=stmt,
        sql=sql,
        defaults=dict(compiled.params),
        positions=tuple(compiled.positiontup or ()) if compiled.positional else None,
        binds=dict(compiled._bind_processors),
        names=tuple(c.key for c in selected),
        results=tuple((i, p) for i, p in enumerate(processors) if p is not None),
        prepare=dialect.driver == "psycopg",
        # Bytes in any client encoding alike: the settings admit ASCII identifiers only.
        libpq=_numbered(sql) if dialect.driver == "psycopg" and _LIBPQ_PARTS else None,
    )
    with _compiled_lock:
        if len(_compiled) >= _KEEP:  # statements of forgotten layouts: start afresh
            _compiled.clear()
        _compiled[id(stmt)] = made
    return made


def _run(engine: Engine, compiled: _Compiled, params: Mapping[str, Any], fetch: bool) -> Any:
    """Execute on a pooled connection's cursor; errors go through SQLAlchemy's own handler.

    ``Connection._handle_dbapi_exception`` is what ``execute()`` calls: it
    wraps the error, runs ``handle_error`` listeners, invalidates the
    connection (and the pool's older ones) on a disconnect, and on an exit
    exception (``KeyboardInterrupt``…) too. A read fetches every row (one, by
    primary key), so no driver keeps a statement open between calls.
    """
    args = compiled.args(params)
    pooled: Any = None
    lease: _Lease | None = None
    cursor: Any = None
    done = False
    try:
        pooled, lease = _take(engine)
        dbapi_conn = pooled.dbapi_connection
        if compiled.libpq is not None and dbapi_conn.autocommit:
            rows = _libpq_run(pooled, dbapi_conn, compiled.libpq, args, fetch)
            done = True
            return rows
        kept = pooled.info.get(_CURSOR)
        if kept is not None and kept[0] is dbapi_conn:
            cursor = kept[1]
        else:
            cursor = dbapi_conn.cursor()
            pooled.info[_CURSOR] = (dbapi_conn, cursor)
        if compiled.prepare and dbapi_conn.prepare_threshold is not None:
            cursor.execute(compiled.sql, args, prepare=True)
        else:
            cursor.execute(compiled.sql, args)
        rows = cursor.fetchall() if fetch else None
        if not _AUTOCOMMIT[engine.dialect.driver](dbapi_conn):
            dbapi_conn.commit()  # a listener turned autocommit off: end what the driver began
        # A read's parameters are a task id; a write returns no rows: weigh the side that counts.
        held = (rows[0] if rows else ()) if fetch else params
        if weight(held) > _KEEP_BYTES:
            # The driver's cursor holds on to its last parameters and rows.
            pooled.info.pop(_CURSOR, None)
            cursor.close()
        done = True
        return rows
    except BaseException as exc:
        if pooled is None:  # no connection: _checkout() raised SQLAlchemy's error already
            raise
        pooled.info.pop(_CURSOR, None)
        with contextlib.suppress(Exception):  # a transaction a listener began must not linger
            if not _AUTOCOMMIT[engine.dialect.driver](pooled.dbapi_connection):
                pooled.dbapi_connection.rollback()
        Connection(engine, connection=pooled)._handle_dbapi_exception(
            exc, compiled.sql, args, cursor, None
        )
        raise  # not reached: the handler raises
    finally:
        if lease is None:
            if pooled is not None:
                pooled.close()
        else:
            if done:
                lease.used = time.monotonic()
            else:  # the handler has invalidated it if it is broken: back to the pool
                _end(engine, lease)
            lease.lock.release()


def _numbered(sql: str) -> tuple[bytes, tuple[str, ...]]:
    """psycopg's SQL for libpq: ``%(name)s`` as ``$n`` (a name used twice keeps its n)."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "%"
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _PLACEHOLDER.sub(number, sql).encode(), tuple(names)


def _libpq_run(
    pooled: Any, conn: Any, statement: tuple[bytes, tuple[str, ...]], args: Any, fetch: bool
) -> Any:
    """Run a statement through libpq on psycopg connection ``conn`` (in autocommit).

    Values are converted by a psycopg ``Transformer`` (a new one per call, as
    its cursor makes), and psycopg's own ``Connection.wait`` waits for the
    server: so gevent's patched waiting, Ctrl-C and Celery's soft time limit
    (the server cancels the statement) behave as on the cursor. Errors are
    psycopg's own classes, so SQLAlchemy's handler sees what it would see from
    ``cursor.execute()``.
    """
    sql, names = statement
    tx = Transformer.from_context(conn)
    params = tx.dump_sequence([args[n] for n in names], [PyFormat.AUTO] * len(names))
    pg = conn.pgconn
    result = None
    if conn.prepare_threshold is not None:
        kept = pooled.info.get(_LIBPQ)
        if kept is None or kept[0] is not conn:
            kept = pooled.info[_LIBPQ] = (conn, {})
        prepared: dict[tuple[bytes, tuple[int, ...]], bytes] = kept[1]
        key = (sql, tx.types or ())
        for _ in range(2):
            name = prepared.get(key)
            if name is None and len(prepared) < _PREPARED_MAX:
                name = b"_sqlresults_%d" % next(_names)
                pg.send_prepare(name, sql, tx.types)
                _check(conn, _wait(conn))
                prepared[key] = name
            if name is None:
                break
            pg.send_query_prepared(name, params, tx.formats)
            result = _wait(conn)
            if _gone(result):  # DEALLOCATE/DISCARD ALL ran on this session: prepare again
                prepared.clear()
                result = None
                continue
            break
    if result is None:
        pg.send_query_params(sql, params, tx.types, tx.formats)
        result = _wait(conn)
    _check(conn, result)
    if not fetch:
        return None
    tx.set_pgresult(result)
    return tx.load_rows(0, result.ntuples, tuple)


def _wait(conn: Any) -> Any:
    """The one result of what was just sent, waited for as psycopg's cursor waits.

    An exception raised meanwhile by a signal handler (Celery's soft time limit,
    say) cancels the statement on the server, as psycopg does for Ctrl-C only:
    a write the caller saw fail must not land later, when a lock it waits on goes.
    """
    gen = generators.execute(conn.pgconn)
    try:
        results = conn.wait(gen)
    except BaseException:
        if conn.pgconn.transaction_status == TransactionStatus.ACTIVE:
            try:
                conn.cancel_safe(timeout=5.0)
                conn.wait(gen, timeout=5.0)  # its reply: "canceling statement"
            except Exception as exc:  # the pool's reset gives the connection up
                logger.warning("celery-sqlresults: cancelling a statement failed: %s", exc)
        raise
    if len(results) != 1:
        raise psycopg.InternalError(f"expected one result from libpq, got {len(results)}")
    return results[0]


def _gone(result: Any) -> bool:
    """Whether ``result`` says the prepared statement no longer exists (SQLSTATE 26000)."""
    return (
        result.status == ExecStatus.FATAL_ERROR
        and result.error_field(DiagnosticField.SQLSTATE) == b"26000"
    )


def _check(conn: Any, result: Any) -> None:
    """Raise what psycopg's cursor would for a failed ``result``."""
    status = result.status
    if status in (ExecStatus.COMMAND_OK, ExecStatus.TUPLES_OK):
        return
    encoding = conn.info.encoding
    failed = status == ExecStatus.FATAL_ERROR
    if failed and result.error_field(DiagnosticField.SQLSTATE):  # the server's (AdminShutdown…)
        raise psycopg.errors.error_from_result(result, encoding=encoding)
    if conn.pgconn.status == ConnStatus.BAD:  # libpq's own: the connection went
        message = (conn.pgconn.error_message or result.error_message).decode(encoding, "replace")
        raise psycopg.OperationalError(f"the connection was lost: {message}")
    if failed:
        raise psycopg.errors.error_from_result(result, encoding=encoding)
    raise psycopg.InternalError(f"unexpected result status from libpq: {status!r}")


def _take(engine: Engine) -> tuple[Any, _Lease | None]:
    """A connection for one call: this thread's lease, a new lease, or a plain checkout."""
    lease = _leases.get(engine)
    if lease is not None and lease.lock.acquire(blocking=False):
        now = time.monotonic()
        mine = lease.owner == threading.get_ident()
        fresh = (
            lease.pooled is not None  # not ended by another thread meanwhile
            and now - lease.used < _LEASE_IDLE
            and now < lease.until
            and lease.pool is engine.pool
            and getattr(lease.pool, "_invalidate_time", 0) == lease.invalidated
        )
        if mine and fresh:
            return lease.pooled, lease  # the lock stays held until the call ends
        if mine or not fresh:
            _end(engine, lease)
        lease.lock.release()  # ended, or another thread's in use lately (left alone)
    pooled = _checkout(engine)
    if _can_lease(engine.pool):
        with _leases_lock:
            if engine not in _leases:  # none, or just ended above
                new = _leases[engine] = _Lease(pooled, engine.pool)
                return pooled, new
    return pooled, None


def _after_fork_in_child() -> None:
    """A lock held by another thread of the parent at the fork would never be released here."""
    global _leases_lock, _compiled_lock
    _leases_lock, _compiled_lock = threading.Lock(), threading.Lock()
    _inherited.extend(_leases.values())
    _leases.clear()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _can_lease(pool: Any) -> bool:
    """Whether ``pool`` can spare one connection for a lease, and has no per-use checks."""
    if not isinstance(pool, sa.pool.QueuePool) or getattr(pool, "_pre_ping", True):
        return False
    if pool.dispatch.checkout or pool.dispatch.checkin or pool.dispatch.reset:
        return False
    overflow = getattr(pool, "_max_overflow", 0)
    return overflow < 0 or pool.size() + overflow >= 2


def _end(engine: Engine, lease: _Lease) -> None:
    """Give a lease's connection back to its pool (the caller holds ``lease.lock``)."""
    with _leases_lock:
        if _leases.get(engine) is lease:
            del _leases[engine]
    if lease.pooled is not None:
        pooled, lease.pooled = lease.pooled, None
        pooled.close()


def release(engine: Engine) -> None:
    """End the calling thread's lease on ``engine``, before it checks out another connection."""
    lease = _leases.get(engine)
    if (
        lease is not None
        and lease.owner == threading.get_ident()
        and lease.lock.acquire(blocking=False)
    ):
        _end(engine, lease)
        lease.lock.release()


def end_leases(engine: Engine | None = None) -> None:
    """End the leases on ``engine`` (or on every engine), waiting for calls in progress.

    A call still running after ``_END_WAIT`` seconds keeps its lease; it ends at
    that call's end only if it fails, else at a later call (the pool is gone).
    """
    with _leases_lock:
        found = [(e, lease) for e, lease in _leases.items() if engine is None or e is engine]
    for leased, lease in found:
        if lease.lock.acquire(timeout=_END_WAIT):
            try:
                _end(leased, lease)
            finally:
                lease.lock.release()


def weight(values: Mapping[str, Any] | Sequence[Any]) -> int:
    """Bytes of the text and binary values of a row or of parameters."""
    total = 0  # a plain loop: twice as fast as sum() over a generator (two calls per store)
    for value in values.values() if isinstance(values, Mapping) else values:
        if isinstance(value, (bytes, str)):
            total += len(value)
    return total


def _checkout(engine: Engine) -> Any:
    """A connection from the engine's pool, connection errors wrapped as ``connect()`` would."""
    try:
        return engine.raw_connection()
    except engine.dialect.loaded_dbapi.Error as exc:
        Connection._handle_dbapi_exception_noconnection(exc, engine.dialect, engine)
        raise
