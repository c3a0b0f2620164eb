"""Native chords: an atomic counter in the database, no celery.chord_unlock."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import redis
from celery import Celery, chain, chord, group, signals
from celery.exceptions import ChordError

from celery_sqlresults.dialects import PostgreSQL

from .conftest import REDIS_URL, Worker, client_app, raw_engine

pytestmark = pytest.mark.worker


@pytest.fixture
def published() -> Iterator[list[str]]:
    """Names of the tasks this (client) process publishes."""
    names: list[str] = []

    def record(sender: str | None = None, headers: dict | None = None, **_: object) -> None:
        names.append((headers or {}).get("task") or str(sender))

    signals.before_task_publish.connect(record, weak=False)
    yield names
    signals.before_task_publish.disconnect(record)


@pytest.fixture
def r() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


def key() -> str:
    return f"sqlresults-test:{uuid.uuid4().hex}"


def tasks(app: Celery) -> tuple:
    return tuple(app.tasks[n] for n in ("t.add", "t.fail", "t.tsum", "t.collect", "t.on_error"))


def test_big_chord_calls_body_once_in_order(
    db_url: str, worker_factory: Callable[..., Worker], published: list[str], r: redis.Redis
) -> None:
    worker = worker_factory(db_url, concurrency=4)
    app = client_app(db_url, worker.queue)
    add, _, _, collect, _ = tasks(app)
    calls = key()
    res = chord(add.s(i, 0) for i in range(1000))(collect.s(calls))
    assert res.get(timeout=240) == list(range(1000))
    assert int(r.get(calls)) == 1
    assert "celery.chord_unlock" not in published
    assert "celery.chord_unlock" not in worker.output()
    # the counter row is gone once the chord completed
    eng = raw_engine(db_url)
    with eng.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM celery_sqlresults_chord").scalar() == 0
    eng.dispose()


def test_two_workers_racing_for_the_last_part_run_the_body_once(
    db_url: str, worker_factory: Callable[..., Worker], r: redis.Redis
) -> None:
    first = worker_factory(db_url, concurrency=2)
    worker_factory(db_url, concurrency=2, queue=first.queue)
    app = client_app(db_url, first.queue)
    add, _, _, collect, _ = tasks(app)
    keys = [key() for _ in range(15)]
    results = [chord(add.s(i, j) for i in range(6))(collect.s(k)) for j, k in enumerate(keys)]
    for j, res in enumerate(results):
        assert res.get(timeout=120) == [i + j for i in range(6)]
    assert [int(r.get(k)) for k in keys] == [1] * len(keys)


def test_failing_header_task_fails_the_body_with_chord_error(
    db_url: str, worker_factory: Callable[..., Worker], r: redis.Redis
) -> None:
    worker = worker_factory(db_url)
    app = client_app(db_url, worker.queue)
    add, fail, _, collect, on_error = tasks(app)
    calls, errors = key(), key()
    header = [add.s(1, 1), fail.si("header broke"), add.s(2, 2)]
    res = chord(header)(collect.s(calls).on_error(on_error.s(errors)))
    with pytest.raises(ValueError, match="header broke"):
        res.get(timeout=60)  # the failed parent (the header) is re-raised first, as in Celery
    body = app.AsyncResult(res.id)
    failing_id = res.parent.results[1].id
    with pytest.raises(ChordError, match=f"Dependency {failing_id} raised .*header broke"):
        body.get(timeout=60)
    assert r.get(calls) is None
    logged = [e.decode() for e in r.lrange(errors, 0, -1)]
    assert len(logged) == 1 and logged[0].startswith("ChordError") and "header broke" in logged[0]


def test_a_failed_header_raises_its_own_exception_from_get(
    db_url: str, worker_factory: Callable[..., Worker]
) -> None:
    """As with Celery's db+ and Redis backends: ``.get()`` follows the parents, and the
    header task's own exception wins over the body's ChordError."""
    worker = worker_factory(db_url, concurrency=2)
    app = client_app(db_url, worker.queue)
    add, fail, tsum, _, _ = tasks(app)
    shapes = {
        "chord": chord([add.si(1, 1), fail.si("broke 1")], tsum.s()),
        "one-task header": chord([fail.si("broke 2")], tsum.s()),
        "chain ending in a chord": chain(
            add.si(1, 1), chord([fail.si("broke 3"), add.si(2, 2)], tsum.s())
        ),
        "chain's tail after a chord": chain(
            chord([add.si(1, 1), fail.si("broke 4")], tsum.s()), add.s(100)
        ),
        "chain as the body": chord([fail.si("broke 5")], chain(tsum.s(), add.s(1))),
    }
    raised = {}
    for shape, sig in shapes.items():
        try:
            sig.apply_async().get(timeout=60)
        except Exception as exc:
            raised[shape] = repr(exc)
    assert raised == {shape: f"ValueError('broke {i}')" for i, shape in enumerate(shapes, 1)}


def test_canvas_shapes_from_celery_docs(db_url: str, worker_factory: Callable[..., Worker]) -> None:
    worker = worker_factory(db_url, concurrency=4)
    app = client_app(db_url, worker.queue)
    add, _, tsum, _, _ = tasks(app)
    timeout = 60
    # a chord inside a chain, followed by more work
    c1 = chain(add.s(1, 1), chord([add.s(1), add.s(2)], tsum.s()), add.s(100))
    assert c1.apply_async().get(timeout=timeout) == (3 + 4) + 100
    # chains inside a chord header
    c2 = chord([chain(add.s(1, 1), add.s(1)), chain(add.s(2, 2), add.s(2))], tsum.s())
    assert c2.apply_async().get(timeout=timeout) == 3 + 6
    # a group of chords
    g = group(chord([add.s(i, i), add.s(i, 0)], tsum.s()) for i in range(4))
    assert g.apply_async().get(timeout=timeout) == [3 * i for i in range(4)]
    # a chord whose header is a single task
    assert chord([add.s(5, 5)], tsum.s()).apply_async().get(timeout=timeout) == 10
    # an empty header calls the body with []
    assert chord([], tsum.s()).apply_async().get(timeout=timeout) == 0
    # a chord whose body is a chord
    inner = chord([add.s(10), add.s(20)], tsum.s())
    outer = chain(chord([add.s(1, 1), add.s(2, 2)], tsum.s()), inner)
    assert outer.apply_async().get(timeout=timeout) == (6 + 10) + (6 + 20)


# ---- each header task counts once -----------------------------------------------------
def _parts(db_url: str) -> int:
    eng = raw_engine(db_url)
    with eng.connect() as conn:
        n = conn.exec_driver_sql("SELECT count(*) FROM celery_sqlresults_chord_part").scalar()
    eng.dispose()
    return int(n or 0)


@pytest.fixture(params=["one statement", "transaction"])
def counting(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a part is counted: PostgreSQL's one statement (where the dialect
    has it) and the explicit transaction every database can run."""
    if request.param == "transaction":
        monkeypatch.setattr(PostgreSQL, "part_counter", lambda *_: None)
    return str(request.param)


def test_a_part_reported_twice_counts_once(
    make_app: Callable[..., Celery], db_url: str, counting: str
) -> None:
    """A redelivered header task (acks_late, worker lost after storing) reports its part again."""
    store = make_app().backend.store
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    store.chord_start("g1", now)
    store.chord_set_size("g1", 3)
    assert store.chord_part_done("g1", "a", now) == (1, 3)
    assert store.chord_part_done("g1", "a", now) is None
    assert store.chord_part_done("g1", "b", now) == (2, 3)
    assert store.chord_part_done("g1", "b", now) is None
    assert store.chord_part_done("g1", "c", now) == (3, 3)
    assert store.chord_part_done("other", "a", now) is None  # no counter row
    store.chord_start("g0", now)
    assert store.chord_part_done("g0", "a", now) == (1, None)
    store.chord_start("g0", now)  # re-applied (a frozen chord): the same ids count afresh
    assert store.chord_part_done("g0", "a", now) == (1, None)
    store.chord_delete("g0")
    store.chord_delete("g1")
    assert store.chord_part_done("g1", "c", now) is None  # completed: a late repeat is ignored
    store.cleanup(now + timedelta(seconds=1))  # the repeat's orphan row expires
    assert _parts(db_url) == 0


def test_the_same_part_from_many_threads_counts_once(
    make_app: Callable[..., Celery], db_url: str, counting: str
) -> None:
    store = make_app().backend.store
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    store.chord_start("g2", now)
    barrier = threading.Barrier(8)

    def report(_: int) -> tuple[int, int | None] | None:
        barrier.wait()
        return store.chord_part_done("g2", "same", now)

    with ThreadPoolExecutor(8) as pool:
        counted = [c for c in pool.map(report, range(8)) if c is not None]
    assert counted == [(1, None)]
    assert store.chord_part_done("g2", "next", now) == (2, None)


def test_a_part_is_counted_on_the_hot_path_where_one_statement_does(
    make_app: Callable[..., Celery], db_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL counts in one statement on the kept cursor, like a store, with no
    connection of its own (through SQLAlchemy's execute a count cost three times a
    store); MySQL/MariaDB and SQLite need a transaction, on a connection of its own."""
    store = make_app().backend.store
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    store.chord_start("g3", now)
    store.chord_set_size("g3", 2)
    taken: list[str] = []
    connect = store.connect

    def counted_connect() -> Any:
        taken.append("connection")
        return connect()

    monkeypatch.setattr(store, "connect", counted_connect)
    assert store.chord_part_done("g3", "a", now) == (1, 2)
    assert store.chord_part_done("g3", "a", now) is None
    assert store.chord_part_done("g3", "b", now) == (2, 2)
    assert store.chord_part_done("nothing", "a", now) is None  # no counter row
    assert taken == ([] if db_kind == "postgresql" else ["connection"] * 4)
