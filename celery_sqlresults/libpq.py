"""Running one statement through libpq itself, on a psycopg 3 connection in autocommit.

What psycopg's cursor adds per call (its bookkeeping, its prepared-statement
cache) is skipped; what matters is kept: psycopg's ``Transformer`` converts
the values both ways, and psycopg's ``Connection.wait`` waits for the reply,
as its cursor does, so gevent's waiting and Ctrl-C behave the same. Each
connection prepares each statement once per combination of parameter types,
as psycopg does; a connection made with ``prepare_threshold=None`` (PgBouncer
in transaction mode) prepares nothing. Errors are psycopg's own classes.
"""

from __future__ import annotations

import itertools
import logging
import re
from typing import Any

try:  # without these parts (no psycopg, or one changed) the path is not taken
    import psycopg
    from psycopg import generators
    from psycopg.adapt import PyFormat, Transformer
    from psycopg.pq import ConnStatus, DiagnosticField, ExecStatus, TransactionStatus

    AVAILABLE = callable(getattr(generators, "execute", None)) and callable(
        getattr(psycopg.Connection, "wait", None)
    )
except ImportError:  # pragma: no cover - psycopg is an extra
    AVAILABLE = False

__all__ = ["AVAILABLE", "PREPARED", "Statement", "numbered", "run"]

logger = logging.getLogger("celery_sqlresults")

#: A statement for libpq: its SQL with ``$n`` placeholders, and the parameter names in order.
Statement = tuple[bytes, tuple[str, ...]]
#: Key of a connection's prepared statements in its pool record's ``info``:
#: ``(connection, {(sql, parameter types): name})``.
PREPARED = "celery_sqlresults.libpq"
#: Statements one connection prepares at most (a layout has a handful, times parameter types).
_PREPARED_MAX = 64
#: psycopg's ``%(name)s`` placeholders (and ``%%``), rewritten as libpq's ``$n``.
_PLACEHOLDER = re.compile(r"%\(([^)]+)\)s|%%")
#: SQLSTATE of a prepared statement that no longer exists (``DEALLOCATE``/``DISCARD ALL``).
_GONE = b"26000"
#: Numbers of prepared statements' names: unique in the process, so a name never clashes
#: with one prepared earlier on the same session (a state lost, a statement re-prepared).
_names = itertools.count()


def numbered(sql: str) -> Statement:
    """psycopg's SQL for libpq: ``%(name)s`` as ``$n`` (a name used twice keeps its n).

    Bytes alike in every client encoding: the settings admit ASCII identifiers only.
    """
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "%"
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _PLACEHOLDER.sub(number, sql).encode(), tuple(names)


def run(info: dict[str, Any], conn: Any, statement: Statement, args: Any, fetch: bool) -> Any:
    """Run ``statement`` on psycopg connection ``conn``; its rows if ``fetch``.

    ``info`` is the pool record's, where the connection's prepared statements
    are kept. A statement the session no longer holds is prepared again once.
    """
    sql, names = statement
    tx = Transformer.from_context(conn)  # a new one per call, as psycopg's cursor makes
    params = tx.dump_sequence([args[n] for n in names], [PyFormat.AUTO] * len(names))
    result = _prepared(info, conn, sql, tx, params) if conn.prepare_threshold is not None else None
    if result is None:
        conn.pgconn.send_query_params(sql, params, tx.types, tx.formats)
        result = _wait(conn)
    _check(conn, result)
    if not fetch:
        return None
    tx.set_pgresult(result)
    return tx.load_rows(0, result.ntuples, tuple)


def _prepared(info: dict[str, Any], conn: Any, sql: bytes, tx: Any, params: Any) -> Any:
    """The result of running ``sql`` prepared, or ``None`` when it is not to be prepared."""
    kept = info.get(PREPARED)
    if kept is None or kept[0] is not conn:
        kept = info[PREPARED] = (conn, {})
    prepared: dict[tuple[bytes, tuple[int, ...]], bytes] = kept[1]
    key = (sql, tx.types or ())
    for _ in range(2):
        name = prepared.get(key)
        if name is None:
            if len(prepared) >= _PREPARED_MAX:
                return None
            name = b"_sqlresults_%d" % next(_names)
            conn.pgconn.send_prepare(name, sql, tx.types)
            _check(conn, _wait(conn))
            prepared[key] = name
        conn.pgconn.send_query_prepared(name, params, tx.formats)
        result = _wait(conn)
        if not _gone(result):
            return result
        prepared.clear()  # DEALLOCATE/DISCARD ALL ran on this session: prepare again
    return None


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
    """Whether ``result`` says the prepared statement no longer exists."""
    return (
        result.status == ExecStatus.FATAL_ERROR
        and result.error_field(DiagnosticField.SQLSTATE) == _GONE
    )


def _check(conn: Any, result: Any) -> None:
    """Raise what psycopg's cursor would for a failed ``result``: the server's error, a
    lost connection, or any other failure, in that order."""
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
