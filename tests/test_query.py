"""The query API: filters, order, limits, stats, forget and cleanup on all three databases."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from functools import partial
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from celery import Celery, states
from celery.result import GroupResult

from celery_sqlresults.dialects.base import Dialect
from celery_sqlresults.query import ResultQuery, TaskRecord, Truncated, Undecodable, parse_when

from .conftest import overwrite_result, raw_engine, table_names, task_request

NOW = datetime.now(timezone.utc)


def request(task: str, args: tuple = (), worker: str = "w1@host") -> SimpleNamespace:
    return task_request(task, args, worker, retries=1)


def set_done(db_url: str, **ages: timedelta) -> None:
    """Backdate ``date_done`` of the given task ids (stored as naive UTC, as Celery does)."""
    eng = raw_engine(db_url)
    with eng.begin() as conn:
        for task_id, age in ages.items():
            conn.execute(
                sa.text("UPDATE celery_taskmeta SET date_done = :d WHERE task_id = :t"),
                {"d": (NOW - age).replace(tzinfo=None), "t": task_id},
            )
    eng.dispose()


def seed(app: Celery, db_url: str) -> None:
    """Four results: two proj.add successes, a failure, a running task (no date_done)."""
    backend = app.backend
    backend.store_result("add-new", 3, states.SUCCESS, request=request("proj.add", (1, 2)))
    backend.store_result(
        "fail-mid",
        ValueError("boom"),
        states.FAILURE,
        traceback="Traceback (most recent call last):\nValueError: boom",
        request=request("proj.fail", worker="w2@other"),
    )
    backend.store_result("add-old", 5, states.SUCCESS, request=request("proj.add", (2, 3)))
    backend.store_result("running", None, states.STARTED, request=request("proj.add_slow"))
    set_done(
        db_url,
        **{
            "add-new": timedelta(minutes=10),
            "fail-mid": timedelta(hours=2),
            "add-old": timedelta(days=3),
        },
    )


def ids(records: list[TaskRecord]) -> list[str]:
    return [r.task_id for r in records]


def finished(records: list[TaskRecord]) -> list[str]:
    """Ids in order, without unfinished rows (whose place differs between databases)."""
    return [r.task_id for r in records if r.date_done is not None]


def test_all_decodes_records_newest_first(make_app: Callable[..., Celery], db_url: str) -> None:
    app = make_app(result_extended=True)
    seed(app, db_url)
    records = ResultQuery(app).all()
    assert finished(records) == ["add-new", "fail-mid", "add-old"]
    assert sorted(ids(records)) == ["add-new", "add-old", "fail-mid", "running"]
    new = records[ids(records).index("add-new")]
    assert (new.status, new.result, new.name, new.worker, new.queue, new.retries) == (
        "SUCCESS",
        3,
        "proj.add",
        "w1@host",
        "q1",
        1,
    )
    assert new.args == [1, 2] and new.kwargs == {"k": "v"} and new.traceback is None
    assert new.date_done is not None and new.date_done.tzinfo == timezone.utc
    assert abs(new.date_done - (NOW - timedelta(minutes=10))) < timedelta(seconds=1)
    failed = ResultQuery(app.backend).get("fail-mid")
    assert failed is not None and isinstance(failed.result, ValueError)
    assert str(failed.result) == "boom" and failed.traceback.endswith("ValueError: boom")
    running = ResultQuery(app).get("running")
    assert running is not None and running.date_done is None and running.result is None


def test_same_date_done_orders_by_id_desc(make_app: Callable[..., Celery], db_url: str) -> None:
    backend = make_app().backend
    for task_id in ("first", "second", "third"):
        backend.store_result(task_id, task_id, states.SUCCESS)
    set_done(db_url, first=timedelta(hours=1), second=timedelta(hours=1), third=timedelta(hours=1))
    assert ids(ResultQuery(backend).all()) == ["third", "second", "first"]


def test_filters_combine_and_queries_are_immutable(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    app = make_app(result_extended=True)
    seed(app, db_url)
    q = ResultQuery(app)
    assert ids(q.filter(state="FAILURE").all()) == ["fail-mid"]
    assert ids(q.filter(state=["FAILURE", "STARTED"]).all()) in (
        ["fail-mid", "running"],
        ["running", "fail-mid"],
    )
    assert ids(q.filter(name="proj.add").all()) == ["add-new", "add-old"]
    assert sorted(ids(q.filter(name="proj.add*").all())) == ["add-new", "add-old", "running"]
    assert ids(q.filter(name="proj.add_*").all()) == ["running"]
    assert q.filter(name="proj.a_d*").all() == []  # _ is literal, not LIKE's any-character
    assert q.filter(name="proj.add%").all() == []
    assert ids(q.filter(worker="w2@*").all()) == ["fail-mid"]
    assert ids(q.filter(since="1h").all()) == ["add-new"]
    assert ids(q.filter(since="1d", until="1h").all()) == ["fail-mid"]
    assert ids(q.filter(until=NOW - timedelta(days=1)).all()) == ["add-old"]
    assert ids(q.filter(since=timedelta(days=7)).filter(state="SUCCESS").all()) == [
        "add-new",
        "add-old",
    ]
    iso = (NOW - timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert ids(q.filter(since=iso).all()) == ["add-new", "fail-mid"]
    # filters add up (AND), even on the same key; the original query is unchanged
    narrowed = q.filter(name="proj.add").filter(since="1h")
    assert ids(narrowed.all()) == ["add-new"]
    assert q.count() == 4 and narrowed.count() == 1


def test_limit_and_count(make_app: Callable[..., Celery], db_url: str) -> None:
    app = make_app(result_extended=True)
    seed(app, db_url)
    q = ResultQuery(app).filter(state="SUCCESS")
    assert ids(q.limit(1).all()) == ["add-new"]
    assert q.count() == 2 and q.limit(1).count() == 1 and q.limit(None).count() == 2
    assert q.limit(0).all() == []
    with pytest.raises(ValueError, match="limit"):
        q.limit(-1)


def test_stats(make_app: Callable[..., Celery], db_url: str) -> None:
    app = make_app(result_extended=True)
    seed(app, db_url)
    q = ResultQuery(app)
    assert q.stats() == {"FAILURE": 1, "STARTED": 1, "SUCCESS": 2}
    assert q.stats(by_name=True) == {
        "proj.add": {"SUCCESS": 2},
        "proj.add_slow": {"STARTED": 1},
        "proj.fail": {"FAILURE": 1},
    }
    assert q.filter(since="1d").stats() == {"FAILURE": 1, "SUCCESS": 1}
    assert q.limit(1).stats() == q.stats()  # the limit is for rows, not counts


def test_get_honours_filters(make_app: Callable[..., Celery], db_url: str) -> None:
    app = make_app(result_extended=True)
    seed(app, db_url)
    q = ResultQuery(app)
    assert q.get("nope") is None
    assert q.filter(state="SUCCESS").get("fail-mid") is None
    record = q.filter(state="FAILURE").get("fail-mid")
    assert record is not None and record.name == "proj.fail"


def test_forget(make_app: Callable[..., Celery], db_url: str) -> None:
    app = make_app(result_extended=True)
    seed(app, db_url)
    q = ResultQuery(app)
    assert q.forget(["add-new", "add-old", "add-new", "unknown"]) == 2
    assert q.forget("fail-mid") == 1
    assert q.forget([]) == 0
    assert ids(q.all()) == ["running"]
    assert app.AsyncResult("add-new").state == states.PENDING
    with pytest.raises(ValueError, match="unfiltered"):
        q.filter(state="STARTED").forget(["running"])


def test_cleanup_dry_run_then_real(make_app: Callable[..., Celery], db_url: str) -> None:
    app = make_app(result_extended=True)
    seed(app, db_url)
    backend = app.backend
    backend.save_group("old-group", GroupResult("old-group", []))
    backend.save_group("new-group", GroupResult("new-group", []))
    backend.store.chord_start("old-chord", datetime(2000, 1, 1))
    eng = raw_engine(db_url)
    with eng.begin() as conn:
        conn.execute(
            sa.text("UPDATE celery_tasksetmeta SET date_done = :d WHERE taskset_id = 'old-group'"),
            {"d": datetime(2000, 1, 1)},
        )
    eng.dispose()
    q = ResultQuery(app)
    expected = {"task": 2, "group": 1, "chord": 1}  # fail-mid, add-old; running is kept
    assert q.cleanup(timedelta(hours=1), dry_run=True) == expected
    assert q.count() == 4
    assert q.cleanup("1h") == expected
    assert sorted(ids(q.all())) == ["add-new", "running"]
    assert backend.restore_group("old-group", cache=False) is None
    assert backend.restore_group("new-group", cache=False) is not None
    assert q.cleanup(timedelta(hours=1)) == {"task": 0, "group": 0, "chord": 0}
    with pytest.raises(ValueError, match="unfiltered"):
        q.limit(5).cleanup("1h")


def test_missing_tables_read_as_empty(make_app: Callable[..., Celery], db_url: str) -> None:
    app = make_app(database_create_tables_on_startup=False)
    q = ResultQuery(app).filter(state="SUCCESS", since="1d")
    assert q.all() == [] and q.count() == 0 and q.stats() == {} and q.get("x") is None
    assert ResultQuery(app).stats(by_name=True) == {}
    assert ResultQuery(app).forget(["x"]) == 0
    assert ResultQuery(app).cleanup("1d", dry_run=True) == {"task": 0, "group": 0, "chord": 0}
    assert ResultQuery(app).cleanup("1d") == {"task": 0, "group": 0, "chord": 0}
    assert not table_names(db_url)


def test_tables_of_old_celery_without_extended_columns(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    """Celery 3-era tables (no extended columns): readable, and name filters match nothing."""
    md = sa.MetaData()
    for name, key in (("celery_taskmeta", "task_id"), ("celery_tasksetmeta", "taskset_id")):
        sa.Table(
            name,
            md,
            sa.Column("id", sa.Integer, sa.Sequence(f"{key}_sequence"), primary_key=True),
            sa.Column(key, sa.String(155), unique=True),
            sa.Column("status", sa.String(50)),
            sa.Column("result", sa.LargeBinary),
            sa.Column("date_done", sa.DateTime),
            sa.Column("traceback", sa.Text),
        )
    eng = raw_engine(db_url)
    md.create_all(eng)
    eng.dispose()
    app = make_app(result_extended=True, database_create_tables_on_startup=False)
    app.backend.store_result("t", 1, states.SUCCESS, request=request("proj.add"))
    q = ResultQuery(app)
    [record] = q.all()
    assert (record.task_id, record.result, record.name, record.args) == ("t", 1, None, None)
    assert q.filter(name="proj.add").all() == [] and q.filter(worker="*").count() == 0
    assert q.stats(by_name=True) == {None: {"SUCCESS": 1}}
    assert q.cleanup("0s", dry_run=True) == {"task": 1, "group": 0, "chord": 0}


def test_accept_content_is_honoured(make_app: Callable[..., Celery], db_url: str) -> None:
    make_app().backend.store_result("p", "x", states.SUCCESS)
    overwrite_result(db_url, "p", pickle.dumps({"x": 1}))
    record = ResultQuery(make_app(accept_content=["json"])).get("p")
    assert record is not None and isinstance(record.result, Undecodable)
    assert "<undecodable:" in repr(record.result)
    trusting = make_app(result_accept_content=["json", "pickle"])
    assert ResultQuery(trusting).all()[0].result == {"x": 1}


def test_group_is_read_and_decoded(make_app: Callable[..., Celery], db_url: str) -> None:
    app = make_app()
    members = [app.AsyncResult(i) for i in ("a", "b")]
    inner = app.GroupResult("inner", [app.AsyncResult("c")])
    app.GroupResult("grp", [*members, inner]).save(backend=app.backend)
    group = ResultQuery(app).group("grp")
    assert isinstance(group, GroupResult) and group.id == "grp"
    assert [r.id for r in group.results] == ["a", "b", "inner"]
    assert ResultQuery(app).group("nope") is None
    eng = raw_engine(db_url)
    with eng.begin() as conn:
        conn.execute(sa.text("UPDATE celery_tasksetmeta SET result = :r"), {"r": pickle.dumps("x")})
    eng.dispose()
    undecodable = ResultQuery(make_app(accept_content=["json"])).group("grp")
    assert isinstance(undecodable, Undecodable)


def test_values_up_to_and_read_value(make_app: Callable[..., Celery]) -> None:
    app = make_app(result_extended=True)
    big = "é" * 5000
    app.backend.store_result("big", big, states.SUCCESS, traceback="T" * 3000)
    app.backend.store_result("small", 1, states.SUCCESS)
    stored = app.backend.encode(big).encode()
    query = ResultQuery(app)
    record = query.get("big", values_up_to=1000)
    assert record is not None and isinstance(record.result, Truncated)
    assert record.result.size == len(stored) and record.result.head == stored[:1000]
    assert isinstance(record.traceback, Truncated) and record.traceback.head == "T" * 1000
    assert record.traceback.size == 3000 and "3000" in repr(record.traceback)
    assert query.get("big", values_up_to=len(stored) + 1).result == big  # within: decoded
    [small] = [r for r in query.page(10, values_up_to=0)[0] if r.task_id == "small"]
    assert isinstance(small.result, Truncated) and small.result.head == b""
    assert query.get_many(["small"], values_up_to=10)["small"].result == 1

    pieces, start = [], 0
    while start < len(stored):
        piece, total = query.read_value("big", "result", start, 777) or (b"", 0)
        assert total == len(stored) and piece
        pieces.append(piece)
        start += len(piece)
    assert b"".join(pieces) == stored
    assert query.read_value("big", "traceback", 2990, 100) == ("T" * 10, 3000)
    # SQLite reads parts with its blob API; the generic substr() path reads the same bytes.
    store = app.backend.store
    task = store.tables.task
    with store.connect() as conn:
        row_id = conn.execute(sa.select(task.c.id).where(task.c.task_id == "big")).scalar_one()
        for read_blob in (store.dialect.read_blob, partial(Dialect.read_blob, store.dialect)):
            assert read_blob(conn, task.c.result, row_id, 3, 700) == stored[3:703]
            assert read_blob(conn, task.c.result, row_id, len(stored), 10) == b""
    assert query.read_value("small", "args", 0, 10) is None  # nothing stored there
    assert query.read_value("nope", "result", 0, 10) is None
    with pytest.raises(ValueError, match="column must be one of"):
        query.read_value("big", "children", 0, 10)


def test_needs_our_backend() -> None:
    app = Celery("other", set_as_current=False)
    app.conf.result_backend = "cache+memory://"
    with pytest.raises(TypeError, match="celery-sqlresults backend"):
        ResultQuery(app)


# ---- parse_when (no database) ---------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "age"),
    [
        ("90s", timedelta(seconds=90)),
        ("30m", timedelta(minutes=30)),
        ("1h", timedelta(hours=1)),
        ("1.5h", timedelta(minutes=90)),
        ("7d", timedelta(days=7)),
        (" 2W ", timedelta(weeks=2)),
    ],
)
def test_parse_when_relative(text: str, age: timedelta) -> None:
    assert parse_when(text, now=NOW) == NOW - age


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01", datetime(2024, 5, 1, tzinfo=timezone.utc)),
        ("2024-05-01T12:30:00Z", datetime(2024, 5, 1, 12, 30, tzinfo=timezone.utc)),
        ("2024-05-01 12:30:00", datetime(2024, 5, 1, 12, 30, tzinfo=timezone.utc)),
        ("2024-05-01T14:30:00+02:00", datetime(2024, 5, 1, 12, 30, tzinfo=timezone.utc)),
    ],
)
def test_parse_when_absolute(text: str, expected: datetime) -> None:
    parsed = parse_when(text)
    assert parsed == expected and parsed.tzinfo == timezone.utc


def test_parse_when_objects() -> None:
    assert parse_when(timedelta(hours=2), now=NOW) == NOW - timedelta(hours=2)
    assert parse_when(datetime(2024, 5, 1)) == datetime(2024, 5, 1, tzinfo=timezone.utc)


@pytest.mark.parametrize("bad", ["3x", "", "h", "-1h", "yesterday", "2024-13-01", "1e9w"])
def test_parse_when_names_the_bad_value(bad: str) -> None:
    with pytest.raises(ValueError, match=rf"invalid time {bad!r}: use a relative time"):
        parse_when(bad)
