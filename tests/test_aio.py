"""Awaiting results from asyncio (celery_sqlresults.aio), on all three databases."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from celery import Celery, group, states
from celery.exceptions import TimeoutError as CeleryTimeoutError

from celery_sqlresults import aget, as_completed
from celery_sqlresults.aiowait import AsyncListener, AsyncPoller, async_waiter_for, listeners_of

from .conftest import Worker, client_app, kill_session, raw_engine, store_later, task_reads


async def _subscribed_soon(app: Celery, task_id: str) -> None:
    """Until the loop's listener has ``task_id`` subscribed (PostgreSQL)."""
    waiter = async_waiter_for(app.backend.store)
    assert isinstance(waiter, AsyncListener)
    for _ in range(3000):
        if task_id in waiter.subscribed():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{task_id} never subscribed")


def test_waiter_kind(make_app: Callable[..., Celery], db_kind: str) -> None:
    async def kinds() -> tuple[object, object]:
        return (
            async_waiter_for(make_app().backend.store),
            async_waiter_for(make_app(sqlresults_notify=False).backend.store),
        )

    listens, disabled = asyncio.run(kinds())
    assert isinstance(listens, AsyncListener if db_kind == "postgresql" else AsyncPoller)
    assert isinstance(disabled, AsyncPoller)


@pytest.mark.worker
def test_await_success_and_failure(
    db_url: str, worker_factory: Callable[..., Worker], db_kind: str
) -> None:
    worker = worker_factory(db_url)
    app = client_app(db_url, worker.queue)

    async def run() -> None:
        assert await aget(app.send_task("t.add", (2, 3)), timeout=60) == 5
        failed = app.send_task("t.fail", ("boom",))
        with pytest.raises(ValueError, match="boom"):
            await aget(failed, timeout=60)
        assert failed.state == states.FAILURE  # cached on the AsyncResult, as .get() does
        value = await aget(app.AsyncResult(failed.id), timeout=60, propagate=False)
        assert isinstance(value, ValueError) and str(value) == "boom"
        if db_kind == "postgresql":  # nobody waits now
            waiter = async_waiter_for(app.backend.store)
            assert isinstance(waiter, AsyncListener) and waiter.subscribed() == frozenset()

    asyncio.run(run())


def test_timeout_raises_and_unsubscribes(make_app: Callable[..., Celery], db_kind: str) -> None:
    app = make_app()
    task_id = f"never-{uuid.uuid4().hex[:6]}"

    async def run() -> None:
        waiting = asyncio.ensure_future(aget(app.AsyncResult(task_id), timeout=1.5))
        if db_kind == "postgresql":
            await _subscribed_soon(app, task_id)
        with pytest.raises(CeleryTimeoutError):
            await waiting
        waiter = async_waiter_for(app.backend.store)
        if isinstance(waiter, AsyncListener):
            assert waiter.subscribed() == frozenset()

    asyncio.run(run())


def test_cancellation_unsubscribes(make_app: Callable[..., Celery], db_kind: str) -> None:
    """A cancelled await leaves nothing subscribed, and the result is still awaited later."""
    app = make_app()
    ids = [f"c{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]

    async def run() -> None:
        waiting = [asyncio.ensure_future(aget(app.AsyncResult(t), interval=60)) for t in ids]
        other = asyncio.ensure_future(aget(app.AsyncResult(ids[0]), timeout=60))
        if db_kind == "postgresql":
            for t in ids:
                await _subscribed_soon(app, t)
        else:
            await asyncio.sleep(0.2)
        for w in waiting:
            w.cancel()
        for w in waiting:
            with pytest.raises(asyncio.CancelledError):
                await w
        waiter = async_waiter_for(app.backend.store)
        if isinstance(waiter, AsyncListener):
            assert waiter.subscribed() == {ids[0]}  # only `other` still waits
        app.backend.store_result(ids[0], "late", states.SUCCESS)
        assert await other == "late"
        if isinstance(waiter, AsyncListener):
            assert waiter.subscribed() == frozenset()

    asyncio.run(run())


@pytest.mark.worker
def test_group_as_completed(db_url: str, worker_factory: Callable[..., Worker]) -> None:
    worker = worker_factory(db_url)
    app = client_app(db_url, worker.queue)
    add = app.signature("t.add")
    fail = app.signature("t.fail")

    async def run() -> None:
        result = group(add.clone((i, i)) for i in range(8)).apply_async()
        seen = {r.id: value async for r, value in as_completed(result, timeout=60)}
        assert seen == {r.id: 2 * i for i, r in enumerate(result.results)}
        assert await aget(result, timeout=60) == [2 * i for i in range(8)]  # as .get()

        mixed = group([add.clone((1, 1)), fail.clone(("bad",))]).apply_async()
        with pytest.raises(ValueError, match="bad"):
            async for _ in as_completed(mixed, timeout=60):
                pass
        pairs = [(r.state, v) async for r, v in as_completed(mixed, 60, propagate=False)]
        assert sorted(s for s, _ in pairs) == [states.FAILURE, states.SUCCESS]
        assert any(isinstance(v, ValueError) for _, v in pairs)

    asyncio.run(run())


def test_as_completed_yields_in_completion_order(make_app: Callable[..., Celery]) -> None:
    """Each member the moment it finishes: the next is stored only once the last is seen."""
    app = make_app()
    ids = [f"o{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    order = list(reversed(ids))

    def store(task_id: str) -> None:
        app.backend.store_result(task_id, task_id, states.SUCCESS)

    async def run() -> list[str]:
        got = []
        await asyncio.to_thread(store, order[0])
        members = [app.AsyncResult(t) for t in ids]
        async for _, value in as_completed(members, timeout=30, interval=0.1):
            got.append(value)
            if len(got) < len(order):
                await asyncio.to_thread(store, order[len(got)])
        return got

    assert asyncio.run(run()) == order


def test_as_completed_timeout(make_app: Callable[..., Celery], db_kind: str) -> None:
    app = make_app()
    done, never = f"d-{uuid.uuid4().hex[:6]}", f"n-{uuid.uuid4().hex[:6]}"
    app.backend.store_result(done, 1, states.SUCCESS)

    async def run() -> None:
        got = []
        with pytest.raises(CeleryTimeoutError):
            async for _, value in as_completed([app.AsyncResult(t) for t in (done, never)], 1):
                got.append(value)
        assert got == [1]
        waiter = async_waiter_for(app.backend.store)
        if isinstance(waiter, AsyncListener):
            assert waiter.subscribed() == frozenset()

    asyncio.run(run())


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_one_listening_connection_per_loop(make_app: Callable[..., Celery], db_url: str) -> None:
    """Many awaits in one loop share one LISTEN session; another loop has its own."""
    app = make_app()
    ids = [f"p{i}-{uuid.uuid4().hex[:6]}" for i in range(40)]
    admin = raw_engine(db_url)

    def listening_sessions() -> set[int]:
        with admin.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND query LIKE 'LISTEN %'"
                )
            )
            return {row[0] for row in rows}

    async def run() -> int:
        waiting = [asyncio.ensure_future(aget(app.AsyncResult(t), timeout=60)) for t in ids]
        for t in ids:
            await _subscribed_soon(app, t)
        (listener,) = listeners_of(asyncio.get_running_loop())
        while not listener.listening:
            await asyncio.sleep(0.01)
        sessions = await asyncio.to_thread(listening_sessions)
        assert sessions == {listener.backend_pid}
        for i, t in enumerate(ids):
            app.backend.store_result(t, i, states.SUCCESS)
        assert await asyncio.gather(*waiting) == list(range(len(ids)))
        assert listener.backend_pid is not None
        return listener.backend_pid

    pids: list[int] = []
    threads = [threading.Thread(target=lambda: pids.append(asyncio.run(run()))) for _ in "ab"]
    threads[0].start()
    threads[0].join(90)
    ids[:] = [f"q{i}-{uuid.uuid4().hex[:6]}" for i in range(40)]
    threads[1].start()
    threads[1].join(90)
    assert len(pids) == 2 and pids[0] != pids[1]


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_a_carried_row_is_not_read_again(make_app: Callable[..., Celery]) -> None:
    """With rows in the notifications, an await reads the table once (before the store)."""
    app = make_app(sqlresults_notify_rows=True)
    task_id = f"r-{uuid.uuid4().hex[:6]}"
    reads = task_reads(app)

    async def run() -> object:
        waiting = asyncio.ensure_future(aget(app.AsyncResult(task_id), timeout=30, interval=60))
        await _subscribed_soon(app, task_id)
        (listener,) = listeners_of(asyncio.get_running_loop())
        while not listener.listening:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the wake-up at LISTEN re-reads: let it pass
        before = len(reads)
        await asyncio.to_thread(app.backend.store_result, task_id, {"v": 1}, states.SUCCESS)
        value = await waiting
        assert len(reads) == before, reads
        return value

    assert asyncio.run(run()) == {"v": 1}


def test_other_backends_are_refused() -> None:
    app = Celery("plain", backend="cache+memory://", set_as_current=False)
    with pytest.raises(TypeError, match="sql\\+"):
        asyncio.run(aget(app.AsyncResult("x"), timeout=1))


@pytest.mark.worker
def test_fastapi_example(db_url: str, worker_factory: Callable[..., Worker]) -> None:
    """The example app's routes, through FastAPI's test client, with a real worker."""
    from fastapi.testclient import TestClient

    from examples.fastapi_app import create_api

    worker = worker_factory(db_url)
    app = client_app(db_url, worker.queue)
    with TestClient(create_api(app, add_task="t.add")) as client:
        answer = client.get("/add", params={"x": 20, "y": 22, "timeout": 60})
        assert answer.status_code == 200, answer.text
        assert answer.json()["result"] == 42
        assert app.AsyncResult(answer.json()["task_id"]).get(timeout=10) == 42

        with client.stream("GET", "/doubles", params={"n": 6, "timeout": 60}) as streamed:
            assert streamed.headers["content-type"].startswith("application/x-ndjson")
            lines = [json.loads(line) for line in streamed.iter_lines() if line]
        assert sorted(line["result"] for line in lines) == [0, 2, 4, 6, 8, 10]
        assert {line["state"] for line in lines} == {states.SUCCESS}

        worker.stop()  # nothing runs the next task: its timeout must answer 504
        late = client.get("/add", params={"x": 1, "y": 1, "timeout": 0.5})
        assert late.status_code == 504 and "not done" in late.json()["detail"]


def test_awaits_of_a_loop_share_their_reads(make_app: Callable[..., Celery]) -> None:
    """Fifty awaits waiting together share each read: fewer queries than awaits, where a
    read each would make fifty at their first check alone (polling: every round)."""
    app = make_app()
    ids = [f"s{i}-{uuid.uuid4().hex[:6]}" for i in range(50)]
    reads = task_reads(app)

    async def run() -> list[object]:
        waiting = [asyncio.ensure_future(aget(app.AsyncResult(t), 60, interval=60)) for t in ids]
        while not reads:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        assert len(reads) < len(ids), len(reads)
        for i, t in enumerate(ids):
            await asyncio.to_thread(app.backend.store_result, t, i, states.SUCCESS)
        return await asyncio.gather(*waiting)

    assert asyncio.run(run()) == list(range(50))


def test_as_completed_flattens_nested_groups(make_app: Callable[..., Celery]) -> None:
    from celery.result import GroupResult

    app = make_app()
    ids = [f"f{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    for i, task_id in enumerate(ids):
        app.backend.store_result(task_id, i, states.SUCCESS)
    inner = GroupResult("inner", [app.AsyncResult(ids[1]), app.AsyncResult(ids[2])], app=app)
    outer = GroupResult("outer", [app.AsyncResult(ids[0]), inner], app=app)

    async def run() -> tuple[list[object], object]:
        return [v async for _, v in as_completed(outer, timeout=10)], await aget(outer, 10)

    flat, joined = asyncio.run(run())
    assert sorted(flat) == [0, 1, 2]
    assert joined == outer.join(timeout=10) == [0, [1, 2]]  # aget(group) gives what join() does


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_a_lost_listening_connection_is_replaced(
    make_app: Callable[..., Celery], db_url: str, db_kind: str
) -> None:
    """The loop's listener reconnects when its session is killed; a waiter that would not
    re-check for a minute is still woken by the next store."""
    app = make_app()
    task_id = f"k-{uuid.uuid4().hex[:6]}"

    async def until(condition: Callable[[], bool]) -> None:
        for _ in range(3000):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("never happened")

    async def run() -> object:
        waiting = asyncio.ensure_future(aget(app.AsyncResult(task_id), timeout=60, interval=60))
        await _subscribed_soon(app, task_id)
        (listener,) = listeners_of(asyncio.get_running_loop())
        await until(lambda: listener.listening)
        killed = listener.backend_pid
        assert killed is not None
        await asyncio.to_thread(kill_session, db_url, db_kind, killed)
        await until(lambda: listener.reconnects == 1)
        await until(lambda: listener.listening and listener.backend_pid != killed)
        await asyncio.to_thread(app.backend.store_result, task_id, "after", states.SUCCESS)
        return await waiting

    assert asyncio.run(run()) == "after"


def test_a_finished_loop_is_not_kept(make_app: Callable[..., Celery]) -> None:
    """What a loop's awaits set up (listener, reader) goes with the loop: code that runs a
    new loop per call (asyncio.run in a sync view) must not pile them up."""
    import gc
    import weakref

    app = make_app()
    task_id = f"g-{uuid.uuid4().hex[:6]}"
    store_later(app, task_id, "x", delay=0.3)
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def run() -> object:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        return await aget(app.AsyncResult(task_id), timeout=30)

    assert asyncio.run(run()) == "x"
    gc.collect()
    assert loops[0]() is None
