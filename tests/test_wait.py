"""Waiting for results: NOTIFY on PostgreSQL, adaptive polling elsewhere."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery, states
from celery.result import ResultSet

from celery_sqlresults.wait import Listener, Poller, _Watch

from .conftest import (
    fork_with_lock_held,
    kill_session,
    listening,
    raw_engine,
    store_later,
)


def test_waiter_kind(make_app: Callable[..., Celery], db_kind: str) -> None:
    waiter = make_app().backend._waiter
    assert isinstance(waiter, Listener if db_kind == "postgresql" else Poller)
    assert isinstance(make_app(sqlresults_notify=False).backend._waiter, Poller)


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_notify_wakes_a_waiter_that_would_not_poll_in_time(make_app: Callable[..., Celery]) -> None:
    """interval=60 means no re-check for a minute: only the notification can finish this get()."""
    app = make_app()
    store_later(app, "n1", "woken")
    assert app.AsyncResult("n1").get(timeout=15, interval=60) == "woken"
    ids = [f"g{i}" for i in range(5)]
    for i, task_id in enumerate(ids):
        store_later(app, task_id, i, delay=0.1 * (i + 1))
    assert ResultSet([app.AsyncResult(t) for t in ids]).join_native(
        timeout=15, interval=60
    ) == list(range(5))


@pytest.mark.parametrize("db_kind", ["postgresql"])
@pytest.mark.parametrize("rows", [False, True])
def test_join_rereads_only_the_notified_ids(make_app: Callable[..., Celery], rows: bool) -> None:
    """A join woken by NOTIFY reads the ids that were stored, not every id still pending;
    with ``sqlresults_notify_rows`` it reads none: the notifications carry the rows."""
    app = make_app(sqlresults_notify_rows=rows)
    backend = app.backend
    ids = [f"j{i}" for i in range(30)]
    queried: list[int] = []

    def count(conn: object, cursor: object, statement: str, params: Any, *_: object) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "celery_taskmeta" in statement:
            # ids_1, ids_2, … for an IN list; one "ids" array on PostgreSQL
            queried.append(
                sum(
                    len(v) if isinstance(v, (list, tuple)) else 1
                    for k, v in dict(params or {}).items()
                    if str(k).startswith("ids")
                )
            )

    sa.event.listen(backend.store.engine, "before_cursor_execute", count)
    # This process's listener lost its connection when the test database was recreated;
    # measure once it listens again (until then waits poll, and re-read every id by design).
    listener = backend._waiter
    listener._start()
    for _ in range(2):
        assert listener._listening.wait(30)
        time.sleep(0.3)  # a reconnect in flight shows up as not listening

    def store_all() -> None:
        time.sleep(0.2)
        for i, task_id in enumerate(ids):
            backend.store_result(task_id, i, states.SUCCESS)
            time.sleep(0.01)

    threading.Thread(target=store_all).start()
    results = ResultSet([app.AsyncResult(t) for t in ids]).join_native(timeout=30, interval=60)
    assert results == list(range(30))
    assert queried[0] == 30  # the first check reads every pending id
    # Re-checking all pending ids on every wake-up would read ~30 + 29 + … + 1 = 465;
    # re-reading just the notified ids, 30 more; with the rows carried, none.
    assert sum(queried[1:]) <= (3 if rows else 40), queried


class _Recorder:
    """A waiter that logs what the backend does with it; each wait runs the next step."""

    def __init__(self, log: list[str], steps: list[Callable[[], dict[str, str | None]]]) -> None:
        self.log, self.steps = log, steps

    def __call__(self, remaining: float | None) -> dict[str, str | None] | None:
        self.log.append("wait")
        return self.steps.pop(0)() or None

    def forget(self, task_ids: Iterable[str] | None = None) -> None:
        self.log.append(f"forget {sorted(task_ids) if task_ids is not None else 'all'}")


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_reads_forget_what_they_cover(make_app: Callable[..., Celery]) -> None:
    """Before each read the waiter is told to drop what was notified about the ids read: a
    row carried by an earlier notification could be older than what the read returns."""
    app = make_app(sqlresults_notify_rows=True)
    backend = app.backend
    backend.store_result("done", 1, states.SUCCESS)
    backend.store_result("other", None, states.STARTED)
    carried = {"status": "SUCCESS", "result": "Mg==", "traceback": None, "date_done": None}
    late = {"late": json.dumps(carried)}  # stored only in the notification: no read finds it
    log: list[str] = []

    def other_done() -> dict[str, str | None]:
        backend.store_result("other", 3, states.SUCCESS)
        return {"other": None}  # notified without its row: read

    steps = [lambda: late, other_done, lambda: late]

    class Waiter:
        notifies = True
        idle = False  # as a listener already running: no read before the watch

        @contextlib.contextmanager
        def watch(self, task_ids: object, interval: float) -> Iterator[_Recorder]:
            yield _Recorder(log, steps)

    backend._waiter = Waiter()
    backend._trust_notified_rows = True  # rows are taken (the poller here never carries any)
    assert backend.wait_for("late", timeout=5)["result"] == 2  # from the notification
    assert log == ["forget all", "wait"]
    log.clear()
    backend._cache.clear()  # wait_for kept the SUCCESS, as get_task_meta() does
    got = dict(backend.get_many(["done", "late", "other"], timeout=5))
    assert {k: m["result"] for k, m in got.items()} == {"done": 1, "late": 2, "other": 3}
    assert log == ["forget ['done', 'late', 'other']", "wait", "forget ['other']", "wait"]


def test_forget_drops_what_a_read_will_see() -> None:
    """A row notified before a read may be older than what the read sees: forgotten."""
    watch = _Watch()
    watch.notify("a", "{row a}")
    watch.notify("b", "{row b}")
    watch.forget(["a"])
    assert watch.event.is_set() and watch.take() == {"b": "{row b}"}
    watch.notify("a", "{row a}")
    watch.forget(None)
    assert not watch.event.is_set() and watch.take() is None


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_listener_death_falls_back_to_polling_and_reconnects(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    app = make_app()
    listener = app.backend._waiter
    assert isinstance(listener, Listener)
    assert _get_while_listening(app, "warm", 1)
    assert listener.backend_pid
    before = listener.reconnects
    admin = raw_engine(db_url)
    with admin.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": listener.backend_pid})
    admin.dispose()
    # a waiter still finishes (by polling at its interval, or the re-listen wake-up)
    store_later(app, "during", 2, delay=0.2)
    assert app.AsyncResult("during").get(timeout=15, interval=0.2) == 2
    deadline = time.monotonic() + 15
    while listener.reconnects <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert listener.reconnects > before
    assert _get_while_listening(app, "after", 3)  # listening again, on a new connection


def test_poller_starts_fast_and_backs_off_to_interval() -> None:
    slept: list[float] = []
    poller = Poller()
    import celery_sqlresults.wait as wait_mod

    real_sleep = wait_mod.time.sleep
    wait_mod.time.sleep = slept.append  # type: ignore[assignment]
    try:
        with poller.watch(["x"], interval=0.5) as wait:
            for _ in range(30):
                wait(None)
            wait(0.0001)
    finally:
        wait_mod.time.sleep = real_sleep  # type: ignore[assignment]
    assert slept[0] == pytest.approx(0.001)
    assert slept[1] > slept[0]
    assert max(slept) == pytest.approx(0.5)
    assert slept[-1] == pytest.approx(0.0001)  # never sleeps past the caller's deadline


def _get_while_listening(app: Celery, task_id: str, value: object) -> bool:
    """``.get()`` a result stored 1 s later (interval=60: no re-check in time); true if
    the listener listened while it waited (polling alone would find the row too) and
    the get returned the value."""
    got: list[object] = []
    storing = store_later(app, task_id, value, delay=1.0)
    waiting = threading.Thread(
        target=lambda: got.append(app.AsyncResult(task_id).get(timeout=15, interval=60))
    )
    waiting.start()
    listened = app.backend._waiter._listening.wait(5)
    waiting.join(15)
    storing.join()
    return listened and got == [value]


def _last_query(db_url: str, pid: int) -> str:
    admin = raw_engine(db_url)
    with admin.connect() as conn:
        query = conn.execute(
            sa.text("SELECT query FROM pg_stat_activity WHERE pid = :p"), {"p": pid}
        ).scalar()
    admin.dispose()
    return str(query)


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_listener_listens_only_while_someone_waits(
    make_app: Callable[..., Celery], db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every NOTIFY wakes every listening session: a process nobody waits in stops
    listening (keeping its connection) and listens again for its next waiter."""
    import celery_sqlresults.wait as wait_mod

    monkeypatch.setattr(wait_mod, "_LISTEN_IDLE", 0.2)
    monkeypatch.setattr(wait_mod, "_LOOK_EVERY", 0.05)
    app = make_app()
    listener = app.backend._waiter
    assert isinstance(listener, Listener)
    store_later(app, "before", 1, delay=0.1)
    assert app.AsyncResult("before").get(timeout=15, interval=60) == 1
    pid, reconnects = listener.backend_pid, listener.reconnects
    assert pid is not None
    deadline = time.monotonic() + 15
    while not _last_query(db_url, pid).startswith("UNLISTEN") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _last_query(db_url, pid).startswith("UNLISTEN")  # stopped, on its connection
    assert not listener.listening
    assert _get_while_listening(app, "after", 2)  # the next waiter has it listen again
    assert (listener.backend_pid, listener.reconnects) == (pid, reconnects)
    # Stopped on a connection that then died: the LISTEN asked for fails, and the
    # listener reconnects and listens, not parks again (it was asked for just now).
    while listener.listening and time.monotonic() < deadline + 15:
        time.sleep(0.02)
    kill_session(db_url, "postgresql", pid)
    listener._start()
    assert listener._listening.wait(15)
    assert listener.reconnects > reconnects


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_a_waiter_arriving_as_the_listener_stops_gets_it_listening(
    make_app: Callable[..., Celery], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener stops as soon as it sees no waiter; waiters come and go meanwhile.
    Each must find it listening again, never parked for good."""
    import celery_sqlresults.wait as wait_mod

    monkeypatch.setattr(wait_mod, "_LISTEN_IDLE", 0.0)
    monkeypatch.setattr(wait_mod, "_LOOK_EVERY", 0.001)
    listener = listening(make_app())
    parked = 0
    for i in range(200):
        was = listener.listening
        with listener.watch([f"race{i}"], interval=60):
            assert listener._listening.wait(10), f"waiter {i} never saw the listener listen"
        parked += not was
        time.sleep(0.001 * (i % 5))
    assert parked > 0  # the race was run: some waiters came to a stopped listener
    # Subscribing alone restarts a stopped listener (not only the thread's start-up call).
    deadline = time.monotonic() + 10
    while listener.listening and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not listener.listening
    monkeypatch.setattr(listener, "_start", lambda: None)
    with listener.watch(["last"], interval=60):
        assert listener._listening.wait(10)


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_a_forked_child_listens_on_its_own_connection(make_app: Callable[..., Celery]) -> None:
    """A child waits through a listener of its own, even when a parent thread held the
    listener's lock at the fork; the parent's keeps working."""
    app = make_app()
    listener = listening(app)
    store_later(app, "parent", 1, delay=0.1)
    assert app.AsyncResult("parent").get(timeout=15, interval=60) == 1
    parent_pid = listener.backend_pid

    def in_child() -> bool:
        store_later(app, "child", 2, delay=0.3)
        got = app.AsyncResult("child").get(timeout=15, interval=60)
        return got == 2 and listener.backend_pid not in (None, parent_pid)

    assert fork_with_lock_held(listener._lock, in_child) == 0
    store_later(app, "parent-again", 3, delay=0.3)
    assert app.AsyncResult("parent-again").get(timeout=15, interval=60) == 3
    assert listener.backend_pid == parent_pid
