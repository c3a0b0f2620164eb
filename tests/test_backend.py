"""The result-backend protocol, on all three databases."""

from __future__ import annotations

import pickle
import threading
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from celery import Celery, states
from celery.backends import base as celery_base
from celery.result import AsyncResult, GroupResult, ResultSet

from .conftest import overwrite_result, raw_engine
from .conftest import task_request as request

#: The protocol on MariaDB through mysqlclient (MySQLdb) too: the fast path knows both drivers.
ALSO_ON = ["mysqlclient"]


def test_every_state_round_trips(make_app: Callable[..., Celery]) -> None:
    backend = make_app().backend
    for state in (states.PENDING, states.RECEIVED, states.STARTED):
        backend.store_result("t", {"progress": state}, state)
        meta = backend.get_task_meta("t", cache=False)
        assert (meta["status"], meta["result"]) == (state, {"progress": state})
        assert meta["date_done"] is None
    backend.mark_as_retry("t", KeyError("again"), traceback="retry tb")
    meta = backend.get_task_meta("t", cache=False)
    assert meta["status"] == states.RETRY and isinstance(meta["result"], KeyError)
    backend.mark_as_revoked("rev", reason="user asked")
    assert backend.get_task_meta("rev")["status"] == states.REVOKED
    backend.mark_as_failure("f", RuntimeError("nope"), traceback="TB")
    meta = backend.get_task_meta("f")
    assert meta["status"] == states.FAILURE and meta["traceback"] == "TB"
    assert isinstance(meta["result"], RuntimeError)
    backend.mark_as_done("d", {"a": [1, 2]})
    meta = backend.get_task_meta("d")
    assert meta["result"] == {"a": [1, 2]}
    assert meta["date_done"].tzinfo is not None
    assert abs(meta["date_done"] - datetime.now(timezone.utc)) < timedelta(minutes=1)


def test_children_are_stored(make_app: Callable[..., Celery]) -> None:
    app = make_app()
    child = app.AsyncResult("child-1")
    req = request()
    req.children = [child]
    app.backend.store_result("parent", 1, states.SUCCESS, request=req)
    res = app.AsyncResult("parent")
    assert [c.id for c in res.children] == ["child-1"]


def test_result_extended_fields(make_app: Callable[..., Celery]) -> None:
    app = make_app(result_extended=True)
    app.backend.store_result("t", 3, states.SUCCESS, request=request("proj.mul", (3, 1)))
    res = app.AsyncResult("t")
    assert (res.name, res.args, res.kwargs, res.worker, res.retries, res.queue) == (
        "proj.mul",
        [3, 1],
        {"k": "v"},
        "w1@host",
        2,
        "q1",
    )


@pytest.mark.parametrize("extended", [True, False])
def test_stored_meta_is_celerys_meta(make_app: Callable[..., Celery], extended: bool) -> None:
    """The backend builds its rows itself; what it reads back is what Celery's own meta says."""
    app = make_app(result_extended=extended)
    backend = app.backend
    stamped = request("proj.stamped")
    stamped.stamps = {"on_stamp": ["a", 1], "monitor": "x", "not_listed": 3}
    stamped.stamped_headers = ["on_stamp", "monitor"]
    with_child = request()
    with_child.children = [app.AsyncResult("child-9")]
    no_queue = request()
    no_queue.delivery_info = None
    cases = [
        ("plain", request(), states.SUCCESS, 5, None),
        ("stamped", stamped, states.SUCCESS, [1, "two"], None),
        ("child", with_child, states.SUCCESS, None, None),
        ("no-queue", no_queue, states.STARTED, {"p": 1}, None),
        ("failed", request(), states.FAILURE, backend.prepare_exception(KeyError("k")), "TB"),
        ("no-request", None, states.SUCCESS, 7, None),
    ]
    for task_id, req, state, result, tb in cases:
        backend.store_result(task_id, result, state, traceback=tb, request=req)
        ours = backend.get_task_meta(task_id, cache=False)
        celerys = backend._get_result_meta(result, state, tb, req, format_date=False)
        # Celery's meta as a serializer round trip gives it back (tuples become lists).
        celerys = backend.meta_from_decoded(backend.decode(backend.encode(celerys)))
        for key in ("group_id", "parent_id"):  # Celery's meta only: db+ has no column either
            celerys.pop(key, None)
        celerys["children"] = celerys["children"] or None  # no children: NULL, as in db+
        assert (celerys.pop("date_done") is None) == (ours.pop("date_done") is None), task_id
        if state == states.FAILURE:
            assert type(ours.pop("result")) is type(celerys.pop("result")) is KeyError
        ours.pop("task_id")
        # With no request the extended columns are NULL: read back as None, as db+ does.
        ours = {k: v for k, v in ours.items() if k in celerys or v is not None}
        assert ours == celerys, task_id


def test_success_is_never_overwritten_by_a_late_state(make_app: Callable[..., Celery]) -> None:
    backend = make_app().backend
    backend.store_result("t", "first", states.SUCCESS)
    for state in (states.STARTED, states.RETRY, states.FAILURE, states.PENDING, states.SUCCESS):
        backend.store_result("t", f"late {state}", state)
        meta = backend.get_task_meta("t", cache=False)
        assert (meta["status"], meta["result"]) == (states.SUCCESS, "first")


def test_success_rule_holds_under_concurrent_writers(make_app: Callable[..., Celery]) -> None:
    """Threads race STARTED against SUCCESS on the same ids: every row ends SUCCESS."""
    backend = make_app().backend
    ids = [f"race-{i}" for i in range(40)]
    errors: list[BaseException] = []

    def writer(state: str) -> None:
        try:
            for task_id in ids:
                backend.store_result(task_id, state, state)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=writer, args=(s,))
        for s in ("STARTED", "SUCCESS", "STARTED", "RETRY")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for task_id in ids:
        meta = backend.get_task_meta(task_id, cache=False)
        assert (meta["status"], meta["result"]) == ("SUCCESS", "SUCCESS")


def test_forget(make_app: Callable[..., Celery]) -> None:
    app = make_app()
    app.backend.store_result("t", 1, states.SUCCESS)
    res = app.AsyncResult("t")
    assert res.get(timeout=1) == 1
    res.forget()
    assert app.AsyncResult("t").state == states.PENDING
    assert app.backend.task_result_exists("t") is False


def test_task_result_exists(make_app: Callable[..., Celery]) -> None:
    backend = make_app().backend
    assert backend.task_result_exists("t") is False
    backend.store_result("t", None, states.STARTED)
    assert backend.task_result_exists("t") is True


def test_group_save_restore_delete(make_app: Callable[..., Celery]) -> None:
    app = make_app()
    backend = app.backend
    for i in range(3):
        backend.store_result(f"m{i}", i * 10, states.SUCCESS)
    group = GroupResult("g", [app.AsyncResult(f"m{i}") for i in range(3)])
    group.save()
    restored = GroupResult.restore("g", app=app)
    assert [r.id for r in restored.results] == ["m0", "m1", "m2"]
    assert restored.get(timeout=2) == [0, 10, 20]
    assert restored.join_native(timeout=2) == [0, 10, 20]
    # saving again replaces (no duplicate-key error)
    GroupResult("g", [app.AsyncResult("m0")]).save()
    assert [r.id for r in GroupResult.restore("g", app=app).results] == ["m0"]
    restored.delete()
    assert GroupResult.restore("g", app=app) is None


def test_get_many_returns_exactly_the_ready_results(make_app: Callable[..., Celery]) -> None:
    backend = make_app().backend
    ready = {f"r{i}" for i in range(2500)}  # more than one batch
    for i, task_id in enumerate(sorted(ready)):
        if i % 3:
            backend.store_result(task_id, i, states.SUCCESS)
        else:
            backend.store_result(task_id, ValueError(i), states.FAILURE)
    for i in range(5):
        backend.store_result(f"run{i}", None, states.STARTED)
    asked = ready | {f"run{i}" for i in range(5)} | {"unknown"}
    got = dict(backend.get_many(asked, timeout=None, max_iterations=1))
    assert set(got) == ready
    assert all(m["status"] in states.READY_STATES for m in got.values())


def test_join_native_reads_in_batches(make_app: Callable[..., Celery]) -> None:
    app = make_app()
    backend = app.backend
    for i in range(1200):
        backend.store_result(f"j{i}", i, states.SUCCESS)
    statements: list[str] = []
    sa.event.listen(
        backend.store.engine, "before_cursor_execute", lambda c, cur, s, *a: statements.append(s)
    )
    rs = ResultSet([app.AsyncResult(f"j{i}") for i in range(1200)])
    assert rs.join_native(timeout=5) == list(range(1200))
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 2  # 1200 ids, batches of 1000


def test_get_wakes_on_a_late_result_and_times_out_otherwise(
    make_app: Callable[..., Celery],
) -> None:
    app = make_app()
    backend = app.backend

    def later() -> None:
        time.sleep(0.3)
        backend.store_result("late", "here", states.SUCCESS)

    threading.Thread(target=later).start()
    assert app.AsyncResult("late").get(timeout=10, interval=0.5) == "here"
    from celery.exceptions import TimeoutError as CeleryTimeout

    with pytest.raises(CeleryTimeout):
        app.AsyncResult("never").get(timeout=0.2)
    with pytest.raises(CeleryTimeout):
        ResultSet([app.AsyncResult("never")]).join_native(timeout=0.2)


def test_cleanup_removes_only_expired_rows(make_app: Callable[..., Celery], db_url: str) -> None:
    app = make_app(result_expires=timedelta(hours=1))
    backend = app.backend
    for i in range(30):
        backend.store_result(f"old{i}", i, states.SUCCESS)
    backend.store_result("fresh", 1, states.SUCCESS)
    backend.store_result("running", None, states.STARTED)
    backend.store.chord_start("oldchord", datetime(2000, 1, 1))
    backend.store.chord_start("newchord", datetime.now(timezone.utc).replace(tzinfo=None))
    backend.save_group("oldgroup", GroupResult("oldgroup", []))
    backend.save_group("newgroup", GroupResult("newgroup", []))
    eng = raw_engine(db_url)
    two_hours_ago = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(hours=2)
    with eng.begin() as conn:
        conn.execute(
            sa.text("UPDATE celery_taskmeta SET date_done = :d WHERE task_id LIKE 'old%'"),
            {"d": two_hours_ago},
        )
        conn.execute(
            sa.text("UPDATE celery_tasksetmeta SET date_done = :d WHERE taskset_id = 'oldgroup'"),
            {"d": two_hours_ago},
        )
    eng.dispose()
    assert (
        backend.store.cleanup(
            datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(hours=1), batch=7
        )
        == {"task": 30, "group": 1, "chord": 1}  # chord: a counter that never completed
    )
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    assert backend.store.chord_part_done("oldchord", "p1", now) is None
    assert backend.store.chord_part_done("newchord", "p1", now) == (1, None)
    assert backend.get_task_meta("old3", cache=False)["status"] == states.PENDING
    assert backend.get_task_meta("fresh")["result"] == 1
    assert backend.get_task_meta("running")["status"] == states.STARTED
    assert backend.restore_group("oldgroup", cache=False) is None
    assert backend.restore_group("newgroup", cache=False) is not None
    backend.cleanup()  # the beat task's entry point, with result_expires


def test_result_failure_expires(make_app: Callable[..., Celery], db_url: str) -> None:
    """Celery 5.7's result_failure_expires: failures kept (or dropped) by their own age."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Celery warns when a backend cannot apply it
        app = make_app(result_expires=timedelta(hours=1), result_failure_expires=3 * 86400)
    backend = app.backend
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    ages = {  # task id -> (state, hours ago)
        "ok-old": (states.SUCCESS, 2),
        "ok-older": (states.SUCCESS, 3),
        "ok-oldest": (states.SUCCESS, 5),
        "fail-older": (states.FAILURE, 120),
        "ok-new": (states.SUCCESS, 0),
        "fail-old": (states.FAILURE, 2),
        "fail-ancient": (states.FAILURE, 100),
        "fail-new": (states.FAILURE, 0),
        "retry-old": (states.RETRY, 2),
    }
    for task_id, (state, _) in ages.items():
        value = KeyError(task_id) if state in states.EXCEPTION_STATES else task_id
        backend.store_result(task_id, value, state)
    eng = raw_engine(db_url)
    with eng.begin() as conn:
        for task_id, (_, hours) in ages.items():
            conn.execute(
                sa.text("UPDATE celery_taskmeta SET date_done = :d WHERE task_id = :t"),
                {"d": now - timedelta(hours=hours), "t": task_id},
            )
    eng.dispose()

    def left() -> set[str]:
        return {t for t in ages if backend.get_task_meta(t, cache=False)["status"] != "PENDING"}

    dry = backend.store.cleanup(
        now - timedelta(hours=1), dry_run=True, failures=now - timedelta(days=3)
    )
    assert dry["task"] == 6  # ok-old(er/est), retry-old, fail-ancient, fail-older
    # batches of 2: MySQL's index walk and the others' LIMIT, each pass filtered by state
    backend.store.cleanup(now - timedelta(hours=1), batch=2, failures=now - timedelta(days=3))
    assert left() == {"ok-new", "fail-old", "fail-new"}
    backend.cleanup()  # the beat task's entry point: nothing more to do
    assert left() == {"ok-new", "fail-old", "fail-new"}
    # 0 keeps failures for ever (as Celery's Redis backend reads it): the rest still expires
    backend.store_result("ok-again", 1, states.SUCCESS)
    eng = raw_engine(db_url)
    with eng.begin() as conn:
        conn.execute(
            sa.text("UPDATE celery_taskmeta SET date_done = :d WHERE task_id IN :ids").bindparams(
                sa.bindparam("ids", expanding=True)
            ),
            {"d": now - timedelta(days=400), "ids": ["ok-again", "fail-old"]},
        )
    eng.dispose()
    ages["ok-again"] = (states.SUCCESS, 400 * 24)
    make_app(result_expires=timedelta(hours=1), result_failure_expires=0).backend.cleanup()
    assert left() == {"ok-new", "fail-old", "fail-new"}
    shorter = make_app(result_expires=None, result_failure_expires=timedelta(minutes=30)).backend
    shorter.cleanup()  # only failures expire: result_expires is off
    assert left() == {"ok-new", "fail-new"}


def test_serializer_and_accept_content(make_app: Callable[..., Celery], db_url: str) -> None:
    app = make_app(result_serializer="pickle", result_accept_content=["pickle", "json"])
    app.backend.store_result("p", {1, 2, 3}, states.SUCCESS)  # a set: only pickle can carry it
    assert app.AsyncResult("p").get(timeout=1) == {1, 2, 3}

    # a raw pickle row (as very old Celery wrote) is not unpickled by a json-only app
    overwrite_result(db_url, "p", pickle.dumps({"x": 1}))
    json_app = make_app(result_serializer="json", accept_content=["json"])
    with pytest.raises(Exception):  # noqa: B017 - json refuses the payload; pickle is never tried
        json_app.backend.get_task_meta("p")
    pickle_ok = make_app(result_serializer="json", result_accept_content=["json", "pickle"])
    assert pickle_ok.backend.get_task_meta("p")["result"] == {"x": 1}


@pytest.mark.skipif(not hasattr(celery_base, "COMPRESSED_PAYLOAD_MAGIC"), reason="Celery < 5.7")
def test_result_compression(make_app: Callable[..., Celery], db_url: str) -> None:
    """``result_compression`` shrinks what is stored; plain and compressed rows read alike."""
    big = {"rows": ["the same words again"] * 2000}
    plain = make_app(result_extended=True).backend
    plain.store_result("plain", big, states.SUCCESS, request=request())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Celery warns when a backend cannot compress
        app = make_app(result_compression="zlib", result_extended=True)
        backend = app.backend
    backend.store_result("zipped", big, states.SUCCESS, request=request("proj.big", (big,)))
    backend.mark_as_failure("failed", KeyError("k" * 5000), traceback="TB")
    GroupResult("g", [app.AsyncResult("zipped")], app=app).save(backend)
    eng = raw_engine(db_url)
    with eng.connect() as conn:
        stored = dict(conn.execute(sa.text("SELECT task_id, result FROM celery_taskmeta")).all())
        args = conn.execute(
            sa.text("SELECT args FROM celery_taskmeta WHERE task_id = 'zipped'")
        ).scalar_one()
    eng.dispose()
    magic = celery_base.COMPRESSED_PAYLOAD_MAGIC
    assert bytes(stored["zipped"]).startswith(magic) and bytes(args).startswith(magic)
    assert len(stored["zipped"]) * 20 < len(stored["plain"])
    for task_id in ("plain", "zipped"):  # either way, from the compressing app
        assert backend.get_task_meta(task_id, cache=False)["result"] == big
    assert plain.get_task_meta("zipped", cache=False)["result"] == big  # and from one without
    assert app.AsyncResult("zipped").args == [big]
    assert isinstance(backend.get_task_meta("failed")["result"], KeyError)
    assert [r.id for r in app.GroupResult.restore("g")] == ["zipped"]
    assert dict(backend.get_many(["plain", "zipped"]))["zipped"]["result"] == big


@pytest.mark.parametrize("db_kind", ["mysql"])
def test_cleanup_keeps_a_row_rewritten_mid_batch(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    """MySQL picks a batch, then deletes it: a row re-stored in between is not deleted."""
    backend = make_app().backend
    for i in range(5):
        backend.store_result(f"old{i}", i, states.FAILURE if i == 2 else states.SUCCESS)
    long_ago = datetime(2000, 1, 1)
    eng = raw_engine(db_url)
    with eng.begin() as conn:
        conn.execute(sa.text("UPDATE celery_taskmeta SET date_done = :d"), {"d": long_ago})
    rewritten: list[str] = []

    def after(conn: object, cursor: object, statement: str, *args: object) -> None:
        if statement.lstrip().startswith("SELECT") and "date_done" in statement and not rewritten:
            rewritten.append("old2")  # the task is re-run under its id and succeeds, right now
            other = make_app().backend
            other.store_result("old2", "again", states.SUCCESS)

    sa.event.listen(backend.store.engine, "after_cursor_execute", after)
    try:
        counts = backend.store.cleanup(datetime(2001, 1, 1), batch=10)
    finally:
        sa.event.remove(backend.store.engine, "after_cursor_execute", after)
    assert rewritten and counts["task"] == 4
    assert backend.get_task_meta("old2", cache=False)["result"] == "again"
    assert backend.get_task_meta("old1", cache=False)["status"] == states.PENDING
    eng.dispose()


def test_decoding_keeps_celerys_rules(make_app: Callable[..., Celery], db_url: str) -> None:
    """The direct decoder honours accept_content, and compressed payloads still decode."""
    from celery.backends.base import compress_payload
    from kombu.exceptions import ContentDisallowed

    backend = make_app().backend
    backend.store_result("j", {"v": 1}, states.SUCCESS)
    picky = make_app(result_serializer="json", result_accept_content=["pickle"]).backend
    with pytest.raises(ContentDisallowed):
        picky.get_task_meta("j", cache=False)
    overwrite_result(db_url, "j", compress_payload(b'{"v": 2}', "gzip"))
    assert backend.get_task_meta("j", cache=False)["result"] == {"v": 2}
    overwrite_result(db_url, "j", b"{not json")
    with pytest.raises(Exception, match=r"[Ee]xpecting|[Dd]ecode"):  # the serializer's own error
        backend.get_task_meta("j", cache=False)


def test_backend_pickles_for_prefork(make_app: Callable[..., Celery]) -> None:
    app = make_app()
    backend = app.backend
    clone = pickle.loads(pickle.dumps(backend))
    assert clone.url == backend.url
    backend.store_result("t", 8, states.SUCCESS)
    assert clone.get_task_meta("t")["result"] == 8


def test_async_result_state_right_after_startup(make_app: Callable[..., Celery]) -> None:
    """The design note's case: a monitoring page asks for a state before any task ran."""
    app = make_app()
    assert app.AsyncResult("never-sent").state == states.PENDING
    assert AsyncResult("never-sent", app=app).ready() is False


@pytest.mark.parametrize("db_kind", ["sqlite"])
@pytest.mark.parametrize("serializer", ["json", "pickle", "yaml"])
def test_columns_are_encoded_as_celery_encodes(
    make_app: Callable[..., Celery], serializer: str
) -> None:
    """The shortcut past kombu's dumps() writes Celery's exact bytes, and a value the
    serializer refuses raises kombu's EncodeError, as Celery's encode() would."""
    from kombu.exceptions import EncodeError
    from kombu.utils.encoding import ensure_bytes

    backend = make_app(
        result_serializer=serializer, result_accept_content=[serializer], result_extended=True
    ).backend
    for value in ({"a": [1, 2.5, None, "é"]}, "text", 7, [], None):
        assert backend.encode_value(value) == ensure_bytes(backend.encode(value)), value
    if serializer != "pickle":
        with pytest.raises(EncodeError):
            backend.encode_value(object())
    compressed = make_app(result_compression="zlib").backend
    assert compressed.encode_value({"a": 1}) == ensure_bytes(compressed.encode({"a": 1}))
    assert compressed.encode_value({"a": 1})[:1] == b"\x00"  # compressed: Celery's own path
    backend.store_result("enc", {"v": 1}, states.SUCCESS, request=request("proj.enc"))
    assert backend.get_task_meta("enc", cache=False)["result"] == {"v": 1}


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_json_columns_decode_as_celery_decodes(make_app: Callable[..., Celery]) -> None:
    """The kept JSON decoder reads what kombu's loads() reads: its registered types too
    (datetime, UUID, Decimal), and with a type registered after the backend was built."""
    import decimal
    import uuid as uuid_module

    from kombu.utils import json as kombu_json
    from kombu.utils.json import register_type

    class Point:
        def __init__(self, x: int) -> None:
            self.x = x

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Point) and other.x == self.x

        __hash__ = None  # type: ignore[assignment]

    from celery_sqlresults import backend as backend_module

    backend = make_app(result_extended=True).backend
    assert backend_module._DECODERS["application/json"] is kombu_json.loads  # the shortcut runs
    value = {
        "when": datetime(2026, 11, 26, 9, 30, 1, 250, tzinfo=timezone.utc),
        "id": uuid_module.UUID("12345678-1234-5678-1234-567812345678"),
        "amount": decimal.Decimal("10.05"),
        "nested": [{"é": None}, 2.5, True],
    }
    register_type(Point, "test-point", lambda p: p.x, Point)
    try:
        value["point"] = Point(3)
        backend.store_result("typed", value, states.SUCCESS, request=request("proj.t"))
        meta = backend.get_task_meta("typed", cache=False)
        assert meta["result"] == backend.decode(backend.encode(value)) == value
        assert meta["args"] == [1, 2] and meta["kwargs"] == {"k": "v"}
    finally:
        kombu_json._encoders.pop(Point, None)
        kombu_json._decoders.pop("test-point", None)
