"""The timed operations, shared by the client process and the ``bench.measure`` task."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery, chord, group, states
from celery.app.task import Context
from celery.result import AsyncResult, ResultSet
from celery.utils import uuid

#: Generous bounds for every wait on a worker: a stuck run fails instead of hanging.
GET_TIMEOUT = 60.0
BULK_TIMEOUT = 600.0


def fake_request(task_id: str) -> Context:
    """A request like a worker's, so ``result_extended`` columns are written too."""
    return Context(
        id=task_id,
        task="bench.add",
        args=(1, 1),
        kwargs={},
        hostname="bench@localhost",
        retries=0,
        delivery_info={"routing_key": "bench"},
    )


def store(backend: Any, task_id: str, value: Any = 2) -> None:
    backend.store_result(task_id, value, states.SUCCESS, request=fake_request(task_id))


@dataclass(frozen=True)
class Rates:
    """Calls per second of ``store_result`` and ``get_task_meta``, and the ids used."""

    store: float
    get: float
    ids: list[str]


def store_get_rates(backend: Any, n: int, warmup: int = 10) -> Rates:
    """Time ``n`` stores of fresh SUCCESS results, then ``n`` uncached reads of them."""
    for task_id in (uuid() for _ in range(warmup)):
        store(backend, task_id)
        backend.get_task_meta(task_id, cache=False)
    ids = [uuid() for _ in range(n)]
    start = time.perf_counter()
    for task_id in ids:
        store(backend, task_id)
    stored = time.perf_counter()
    metas = [backend.get_task_meta(task_id, cache=False) for task_id in ids]
    done = time.perf_counter()
    wrong = [m["status"] for m in metas if m["status"] != states.SUCCESS]
    if wrong:
        raise RuntimeError(f"get_task_meta read {len(wrong)} non-SUCCESS results: {wrong[:3]}")
    return Rates(n / (stored - start), n / (done - stored), ids)


def read_seconds(app: Celery, ids: list[str]) -> float:
    """Seconds to read already-stored results through a ResultSet, as a client would."""
    rs = ResultSet([AsyncResult(task_id, app=app) for task_id in ids], app=app)
    start = time.perf_counter()
    if app.backend.supports_native_join:
        values = rs.join_native(timeout=BULK_TIMEOUT)
    else:
        values = rs.join(timeout=BULK_TIMEOUT)
    elapsed = time.perf_counter() - start
    if len(values) != len(ids):
        raise RuntimeError(f"read {len(values)} results, expected {len(ids)}")
    return elapsed


def roundtrips_ms(add: Any, n: int, warmup: int = 10) -> list[float]:
    """Milliseconds of ``add.delay(1, 1).get()``, ``n`` samples after ``warmup`` calls."""
    for _ in range(warmup):
        add.delay(1, 1).get(timeout=GET_TIMEOUT)
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        value = add.delay(1, 1).get(timeout=GET_TIMEOUT)
        samples.append((time.perf_counter() - start) * 1000)
        if value != 2:
            raise RuntimeError(f"add(1, 1) returned {value!r}")
    return samples


def percentile(samples: list[float], p: int) -> float:
    """The ``p``-th percentile (inclusive method; 50 is the median)."""
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[p - 1]


def group_seconds(add: Any, n: int) -> float:
    """Wall time to send a group of ``n`` adds and join its results."""
    start = time.perf_counter()
    values = group(add.s(i, i) for i in range(n)).apply_async().get(timeout=BULK_TIMEOUT)
    elapsed = time.perf_counter() - start
    if values != [2 * i for i in range(n)]:
        raise RuntimeError("group returned wrong results")
    return elapsed


def chord_seconds(add: Any, tsum: Any, n: int) -> float:
    """Wall time from calling a chord of ``n`` adds to the body's result."""
    start = time.perf_counter()
    value = chord(add.s(i, i) for i in range(n))(tsum.s()).get(timeout=BULK_TIMEOUT)
    elapsed = time.perf_counter() - start
    if value != n * (n - 1):
        raise RuntimeError(f"chord returned {value!r}, expected {n * (n - 1)}")
    return elapsed


def publish_rate(add: Any, n: int, warmup: int = 10) -> float:
    """``add.apply_async()`` calls per second to a queue no worker consumes.

    Measures what publishing costs the caller, including the result backend's
    ``on_task_call`` (record on publish, Redis' result subscription). The queue
    is purged and deleted afterwards; every message must be found there.
    """
    app = add.app
    queue = f"bench-publish-{uuid()[:8]}"
    try:
        for _ in range(warmup):
            add.apply_async((1, 1), queue=queue)
        start = time.perf_counter()
        for _ in range(n):
            add.apply_async((1, 1), queue=queue)
        elapsed = time.perf_counter() - start
    finally:
        with app.connection_for_write() as conn:
            purged = conn.default_channel.queue_purge(queue)
            conn.default_channel.queue_delete(queue)
    if purged != n + warmup:
        raise RuntimeError(f"purged {purged} messages from {queue}, published {n + warmup}")
    return n / elapsed


def driver_rates(backend: Any, n: int, warmup: int = 10) -> Rates:
    """The ceiling of figure 2: sql+'s own upsert and read, on the bare driver.

    The statements ``store_result``/``get_task_meta`` run (SQLAlchemy-compiled,
    with the NOTIFY on PostgreSQL), executed in a loop on one raw DBAPI
    connection with prebuilt parameters (the notification's payload too): no
    Celery, no SQLAlchemy, no pool. On psycopg prepared, as the backend runs
    them, and sent with libpq's blocking ``exec_prepared`` (the backend waits
    through psycopg, a few µs more), the parameters converted before the clock
    starts. What is left is the database and its driver; a backend can
    approach this rate, not pass it.
    """
    from datetime import datetime, timezone

    from celery_sqlresults import fastpath

    store_ = backend.store
    store(backend, uuid())  # the tables and the layout exist
    statements = store_.statements()
    assert statements is not None
    layout = statements.layout
    now = datetime.now(timezone.utc).replace(tzinfo=None)

    notify = backend._waiter.notifies
    carry = notify and store_.notices.rows_travel()

    def row(task_id: str) -> dict[str, Any]:
        values = {
            "task_id": task_id, "status": states.SUCCESS, "result": b"2", "traceback": None,
            "date_done": now, "children": None, "date_created": now, "name": "bench.add",
            "args": b"[1, 1]", "kwargs": b"{}", "worker": "bench@localhost", "retries": 0,
            "queue": "bench", "stamps": None,
        }  # fmt: skip
        kept = {k: v for k, v in values.items() if k in layout.task_columns}
        return {**kept, "notice": store_.notices.payload(kept, carry)} if notify else kept

    engine = store_.engine
    columns = tuple(k for k in row("x") if k != "notice")
    dialect = store_.dialect
    write = fastpath.compile_statement(engine, dialect, statements.task_upsert(columns, notify))
    read = fastpath.compile_statement(
        engine, dialect, statements.task_read(backend.extended_result)
    )

    ids = [uuid() for _ in range(n + warmup)]
    writes = [write.args(row(task_id)) for task_id in ids]
    reads = [read.args({"task_id": task_id}) for task_id in ids]
    pooled = engine.raw_connection()
    try:
        if write.libpq is not None and read.libpq is not None:
            run = _libpq_loops(pooled.dbapi_connection, write.libpq, read.libpq)
        else:
            run = _cursor_loops(pooled.dbapi_connection, write, read)
        start, stored, begun, done, rows = run(writes, reads, warmup)
    finally:
        pooled.close()
    if rows != n:
        raise RuntimeError(f"the bare driver read {rows} rows of {n} it wrote")
    return Rates(n / (stored - start), n / (done - begun), ids[warmup:])


#: ``(writes, reads, warmup)`` -> times (start, stored, begun, done) and the rows read.
_Loops = Any


def _cursor_loops(conn: Any, write: Any, read: Any) -> _Loops:
    """The statements on the driver's cursor (PyMySQL, mysqlclient, sqlite3)."""
    extra = {"prepare": True} if write.prepare else {}

    def run(writes: list[Any], reads: list[Any], warmup: int) -> tuple[float, ...]:
        cursor = conn.cursor()
        for values in writes[:warmup]:
            cursor.execute(write.sql, values, **extra)
        start = time.perf_counter()
        for values in writes[warmup:]:
            cursor.execute(write.sql, values, **extra)
        stored = time.perf_counter()
        for values in reads[:warmup]:
            cursor.execute(read.sql, values, **extra)
            cursor.fetchall()
        begun = time.perf_counter()
        rows = 0
        for values in reads[warmup:]:
            cursor.execute(read.sql, values, **extra)
            rows += len(cursor.fetchall())
        done = time.perf_counter()
        cursor.close()
        return start, stored, begun, done, rows

    return run


def _libpq_loops(
    conn: Any, write: tuple[bytes, tuple[str, ...]], read: tuple[bytes, tuple[str, ...]]
) -> _Loops:
    """psycopg: libpq's blocking ``exec_prepared`` with every parameter converted beforehand
    (the backend's own statements, less the conversion of parameters and psycopg's wait);
    rows are converted."""
    from psycopg.adapt import PyFormat, Transformer
    from psycopg.pq import ExecStatus

    tx = Transformer.from_context(conn)
    pg = conn.pgconn

    def dumped(statement: tuple[bytes, tuple[str, ...]], values: Any) -> tuple[Any, ...]:
        names = statement[1]
        params = tx.dump_sequence([values[k] for k in names], [PyFormat.AUTO] * len(names))
        return params, tx.types, tx.formats

    def prepared(name: bytes, statement: tuple[bytes, tuple[str, ...]], types: Any) -> bytes:
        if pg.prepare(name, statement[0], types).status != ExecStatus.COMMAND_OK:
            raise RuntimeError(f"could not prepare {statement[0]!r}")
        return name

    def run(writes: list[Any], reads: list[Any], warmup: int) -> tuple[float, ...]:
        w = [dumped(write, v) for v in writes]
        r = [dumped(read, v) for v in reads]
        wname = prepared(b"bench_write", write, w[0][1])
        rname = prepared(b"bench_read", read, r[0][1])
        if any(x[1] != w[0][1] for x in w) or any(x[1] != r[0][1] for x in r):
            raise RuntimeError("the parameters' types differ between rows")
        ok = (ExecStatus.COMMAND_OK, ExecStatus.TUPLES_OK)
        for params, _, formats in w[:warmup]:
            pg.exec_prepared(wname, params, formats)
        start = time.perf_counter()
        for params, _, formats in w[warmup:]:
            if pg.exec_prepared(wname, params, formats).status not in ok:
                raise RuntimeError("a bare write failed")
        stored = time.perf_counter()
        for params, _, formats in r[:warmup]:
            pg.exec_prepared(rname, params, formats)
        begun = time.perf_counter()
        rows = 0
        for params, _, formats in r[warmup:]:
            result = pg.exec_prepared(rname, params, formats)
            tx.set_pgresult(result)
            rows += len(tx.load_rows(0, result.ntuples, tuple))
        done = time.perf_counter()
        tx.set_pgresult(None)
        pg.exec_(b"DEALLOCATE bench_write")
        pg.exec_(b"DEALLOCATE bench_read")
        return start, stored, begun, done, rows

    return run
