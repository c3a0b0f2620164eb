"""Chords as the Redis backend runs them: generated headers, ``add_to_chord``, errbacks.

Each end-to-end test runs the same canvas on our backend and on Celery's Redis
backend (a second worker, ``redis://`` results) and asserts the same outcome.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from celery import Celery, chain, chord, group
from celery.utils.functional import regen

from .conftest import REDIS_URL, Worker, client_app, raw_engine

pytestmark = pytest.mark.worker

#: Results of the comparison runs on Celery's Redis backend (the broker uses db 15).
REDIS_RESULTS = REDIS_URL.rsplit("/", 1)[0] + "/14"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@pytest.fixture
def r() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


def key() -> str:
    return f"sqlresults-test:{uuid.uuid4().hex}"


def both(db_url: str, worker_factory: Callable[..., Worker], **conf: Any) -> dict[str, Celery]:
    """Client apps of a worker on our backend and of one on Celery's Redis backend."""
    apps = {}
    for name, url in (("sql", db_url), ("redis", REDIS_RESULTS)):
        worker = worker_factory(url, concurrency=2)
        apps[name] = client_app(url, worker.queue, **conf)
    return apps


def t(app: Celery, name: str) -> Any:
    return app.tasks[f"t.{name}"]


def calls(r: redis.Redis, k: str) -> int:
    return int(r.get(k) or 0)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


# ---- add_to_chord and replace ---------------------------------------------------------
def test_add_to_chord_makes_the_body_wait_for_the_added_tasks(
    db_url: str, worker_factory: Callable[..., Worker], r: redis.Redis
) -> None:
    apps = both(db_url, worker_factory)
    got = {}
    for name, app in apps.items():
        k = key()
        header = [t(app, "grow").si(10, 2), t(app, "add").si(1, 1), t(app, "grow").si(20, 1)]
        got[name] = chord(header)(t(app, "collect").s(k)).get(timeout=60)
        assert calls(r, k) == 1, name
    # Redis orders an added task's value next to its adder's (by group index, ties in
    # no set order); ours come after the header's, in the order they were added.
    assert sorted(got["sql"]) == sorted(got["redis"]) == [2, 10, 11, 12, 20, 21]
    assert got["sql"][:3] == [10, 2, 20]
    assert sorted(got["sql"][3:]) == [11, 12, 21]


def test_a_header_task_replaced_by_a_group(
    db_url: str, worker_factory: Callable[..., Worker], r: redis.Redis
) -> None:
    apps = both(db_url, worker_factory)
    got = {}
    for name, app in apps.items():
        k = key()
        header = [t(app, "replace_with_group").si(3), t(app, "add").si(1, 1)]
        got[name] = chord(header)(t(app, "collect").s(k)).get(timeout=60)
        assert calls(r, k) == 1, name
    assert got["sql"] == got["redis"] == [[0, 2, 4], 2]


def test_tasks_added_at_once_from_many_threads_are_all_kept(
    make_app: Callable[..., Celery],
) -> None:
    """The counter's lock makes adding atomic: no lost update of the header group's row."""
    app = make_app()
    backend = app.backend
    header = app.GroupResult("g-add", [app.AsyncResult("h1")])
    backend.apply_chord(("g-add", list(header.results)), None)
    barrier = threading.Barrier(8)

    def add(i: int) -> None:
        barrier.wait()
        backend.add_to_chord("g-add", app.AsyncResult(f"added-{i}"))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(add, range(8)))
    saved = app.GroupResult.restore("g-add", backend=backend)
    assert saved is not None and saved.results[0].id == "h1"
    assert sorted(res.id for res in saved.results[1:]) == sorted(f"added-{i}" for i in range(8))
    backend.set_chord_size("g-add", 1)
    # one header task and eight added: the chord completes with the ninth part only
    store = backend.store
    for i, part in enumerate(["h1", *(f"added-{i}" for i in range(7))], 1):
        assert store.chord_part_done("g-add", part, _now()) == (i - 8, 1)
    assert store.chord_part_done("g-add", "added-7", _now()) == (1, 1)


def test_adding_to_a_chord_without_a_counter_says_why(make_app: Callable[..., Celery]) -> None:
    app = make_app()
    app.backend.store.chord_start("other", _now())  # the tables exist; this chord does not
    with pytest.raises(Exception, match=r"chord gone has no counter row .* task x cannot be added"):
        app.backend.add_to_chord("gone", app.AsyncResult("x"))


# ---- generated headers ----------------------------------------------------------------
def test_a_generated_header_runs_while_it_is_generated(
    db_url: str, worker_factory: Callable[..., Worker], r: redis.Redis
) -> None:
    apps = both(db_url, worker_factory)
    got = {}
    for name, app in apps.items():
        add = t(app, "add")
        seen: list[int] = []

        def header(app: Celery = app, add: Any = add, seen: list[int] = seen) -> Iterator[Any]:
            first = add.si(1, 1).set(task_id=str(uuid.uuid4()))
            yield first
            yield add.si(2, 2)  # Celery looks one task ahead: the first is sent now
            # The first task runs before the rest is generated (a backend that
            # unrolled the header first would wait here for ever: the get() fails).
            seen.append(app.AsyncResult(first.id).get(timeout=30))
            yield from (add.si(i, i) for i in range(3, 8))

        k = key()
        got[name] = chord(header(), t(app, "collect").s(k)).apply_async().get(timeout=60)
        assert seen == [2], name
        assert calls(r, k) == 1, name
    assert got["sql"] == got["redis"] == [2, 4, 6, 8, 10, 12, 14]
    eng = raw_engine(db_url)
    with eng.connect() as conn:  # nothing of the chord is left
        for table in ("celery_sqlresults_chord", "celery_sqlresults_chord_part"):
            assert conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar() == 0
    eng.dispose()


def test_tasks_added_to_a_generated_header(
    db_url: str, worker_factory: Callable[..., Worker], r: redis.Redis
) -> None:
    apps = both(db_url, worker_factory)
    got = {}
    for name, app in apps.items():
        k = key()
        header = (t(app, "grow").si(i * 10, 1) for i in range(1, 4))
        got[name] = chord(header, t(app, "collect").s(k)).apply_async().get(timeout=60)
        assert calls(r, k) == 1, name
    assert sorted(got["sql"]) == sorted(got["redis"]) == [10, 11, 20, 21, 30, 31]
    # ours in header order, an added task's value next to its adder's, as on Redis
    assert [v // 10 for v in got["sql"]] == [1, 1, 2, 2, 3, 3]


def test_a_size_fixed_after_every_part_is_counted_sends_the_body(
    db_url: str, worker_factory: Callable[..., Worker], r: redis.Redis
) -> None:
    """Celery fixes the size before it sends the last header task; should the size come
    last all the same, the size-setter completes the chord, and only it does."""
    worker = worker_factory(db_url)
    app = client_app(db_url, worker.queue)
    backend = app.backend
    k = key()
    body = t(app, "collect").s(k)
    body.freeze()
    gid, ids = str(uuid.uuid4()), [str(uuid.uuid4()) for _ in range(3)]
    backend.apply_chord((gid, regen(app.AsyncResult(i) for i in ids)), body)  # generated
    assert backend.get_group_meta(gid, cache=False) is None  # nothing unrolled, nothing saved
    for index, task_id in enumerate(ids):
        backend.store_result(task_id, index * 100, "SUCCESS")
        request = SimpleNamespace(id=task_id, group=gid, group_index=index, chord=dict(body))
        backend.on_chord_part_return(request, "SUCCESS", index * 100)
    assert app.AsyncResult(body.id).state == "PENDING"  # no size yet: not complete
    backend.set_chord_size(gid, 3)
    assert app.AsyncResult(body.id).get(timeout=60) == [0, 100, 200]
    late = SimpleNamespace(id=ids[0], group=gid, group_index=0, chord=dict(body))
    backend.on_chord_part_return(late, "SUCCESS", 0)  # a redelivered part: ignored
    assert calls(r, k) == 1


@pytest.mark.parametrize("trial", range(3))
def test_the_size_and_the_last_part_racing_complete_the_chord_once(
    make_app: Callable[..., Celery], trial: int
) -> None:
    """Whichever of the size and the last part comes second sees the chord complete:
    exactly one of them, every time."""
    store = make_app().backend.store
    seen: list[str] = []
    for n in range(10):
        gid = f"race-{trial}-{n}"
        store.chord_start(gid, _now())
        store.chord_part_done(gid, "a", _now(), 0)
        barrier = threading.Barrier(2)

        def size(gid: str = gid, barrier: threading.Barrier = barrier) -> str | None:
            barrier.wait()
            done, _ = store.chord_set_size(gid, 2) or (0, None)
            return "size" if done == 2 else None

        def part(gid: str = gid, barrier: threading.Barrier = barrier) -> str | None:
            barrier.wait()
            done, known = store.chord_part_done(gid, "b", _now(), 1) or (0, None)
            return "part" if known is not None and done == known else None

        with ThreadPoolExecutor(2) as pool:
            completed = [c for c in pool.map(lambda f: f(), (size, part)) if c]
        assert len(completed) == 1, (gid, completed)
        seen += completed
        assert store.chord_parts(gid) == ["a", "b"]
        store.chord_delete(gid)


def test_a_schema_without_part_places_unrolls_a_generated_header(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    """Before revision 0007 (no rights to upgrade), a generated header is unrolled
    before it is sent, as before: slower to start, the same result."""
    app = make_app()
    app.backend.store.chord_start("g", _now())  # the tables exist
    eng = raw_engine(db_url)
    with eng.begin() as conn:
        conn.execute(sa.text("ALTER TABLE celery_sqlresults_chord_part DROP COLUMN group_index"))
    eng.dispose()
    app = make_app(sqlresults_create_tables_on_startup=False)
    backend = app.backend
    assert not backend.store.generated_headers()
    backend.apply_chord(("g2", regen(app.AsyncResult(i) for i in ("a", "b"))), None)
    saved = app.GroupResult.restore("g2", backend=backend)
    assert saved is not None and [res.id for res in saved.results] == ["a", "b"]
    assert backend.store.chord_part_done("g2", "a", _now(), 0) == (1, None)
    assert backend.store.chord_parts("g2") is None


# ---- errbacks on a failed header, next to the Redis backend ---------------------------
def _errbacks(app: Celery, sig: Any, k: str, label: str) -> Any:
    """``sig`` with an errback of each kind: new-style, old-style, immutable."""
    sig = sig.on_error(t(app, "on_error_new").s(k, label))
    sig = sig.on_error(t(app, "on_error_old").s(k, label))
    return sig.on_error(t(app, "mark").si(k, f"{label} imm"))


def _shapes(app: Celery, k: Callable[[str], str]) -> dict[str, Any]:
    add, fail, tsum = t(app, "add"), t(app, "fail"), t(app, "tsum")

    def header(shape: str) -> list[Any]:
        broke = _errbacks(app, fail.si(f"{shape} broke"), k(shape), "header task")
        return [add.si(1, 1), broke, add.si(2, 2)]

    def body(shape: str) -> Any:
        return _errbacks(app, tsum.s(), k(shape), "body")

    linked = chord(header("chord.link_error"), tsum.s())
    return {
        "chord": chord(header("chord"), body("chord")),
        "chord.link_error": _errbacks(app, linked, k("chord.link_error"), "chord"),
        "chord in a chain": chain(
            add.si(1, 1), chord(header("chord in a chain"), tsum.s())
        ).on_error(t(app, "on_error_new").s(k("chord in a chain"), "chain")),
        "chain tail": chain(
            chord(header("chain tail"), tsum.s()),
            _errbacks(app, add.s(1), k("chain tail"), "tail"),
        ),
        "chord in a group": group(
            chord(header("chord in a group"), body("chord in a group")), add.si(5, 5)
        ),
    }


def _settled(r: redis.Redis, keys: list[str], quiet: float = 2.0, limit: float = 60) -> None:
    """Wait until no errback has recorded anything for ``quiet`` seconds (they run as
    tasks, or inline in the worker, after ``get()`` has returned)."""
    last, since, deadline = None, time.monotonic(), time.monotonic() + limit
    while time.monotonic() < deadline:
        now = [r.llen(k) for k in keys]
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.2)


def _run_matrix(app: Celery, r: redis.Redis) -> tuple[dict[str, str], dict[str, list[str]]]:
    keys: dict[str, str] = {}

    def k(shape: str) -> str:
        return keys.setdefault(shape, key())

    results = {shape: sig.apply_async() for shape, sig in _shapes(app, k).items()}
    raised = {}
    for shape, res in results.items():
        try:
            res.get(timeout=60)
            raised[shape] = "no error"
        except Exception as exc:
            raised[shape] = _UUID.sub("<id>", f"{type(exc).__name__}: {exc}")
    _settled(r, list(keys.values()))
    recorded = {
        shape: sorted(_UUID.sub("<id>", e.decode()) for e in r.lrange(k, 0, -1))
        for shape, k in keys.items()
    }
    return raised, recorded


@pytest.mark.parametrize("on_header", [True, False], ids=["header-errbacks", "body-errbacks"])
def test_errbacks_of_a_failed_header_run_as_on_redis(
    db_url: str, worker_factory: Callable[..., Worker], r: redis.Redis, on_header: bool
) -> None:
    """``task_allow_error_cb_on_chord_header`` on and off; new-style, old-style and
    immutable errbacks on header tasks, bodies, chords, chains and their tails."""
    apps = both(db_url, worker_factory, task_allow_error_cb_on_chord_header=on_header)
    runs = {name: _run_matrix(app, r) for name, app in apps.items()}
    raised, recorded = runs["sql"]
    assert raised == runs["redis"][0]
    assert recorded == runs["redis"][1]
    # what both did, spelled out: the header's own error from get(); a header task's
    # errbacks get its error, the body's get the ChordError; each kind runs once
    assert raised["chord"] == "ValueError: chord broke"
    for label in ("header task", "body"):
        kinds = sorted(
            e.split(" ")[len(label.split())] for e in recorded["chord"] if e.startswith(label)
        )
        assert kinds == [
            "imm",
            "new(ChordError:" if label == "body" else "new(ValueError:",
            "old(id)",
        ]
    # errbacks linked to the chord itself run for the header task too only when allowed
    runs_of_chord_errbacks = 2 if on_header else 1
    assert recorded["chord.link_error"].count("chord imm") == runs_of_chord_errbacks
    assert recorded["chord.link_error"].count("chord old(id)") == runs_of_chord_errbacks
    chained = [e for e in recorded["chord in a chain"] if e.startswith("chain new")]
    assert len(chained) == runs_of_chord_errbacks
    # a chain's tail after the failed chord is failed without running its errbacks
    assert not [e for e in recorded["chain tail"] if e.startswith("tail")]
