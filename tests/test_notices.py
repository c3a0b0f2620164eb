"""Notifications: the payload a write sends, what a waiter takes from it, when it is believed."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

import psycopg
import pytest
import sqlalchemy as sa
from celery import Celery, states
from kombu.utils.encoding import ensure_bytes

from celery_sqlresults import notices
from celery_sqlresults.notices import split

from .conftest import drop_role, listening, raw_engine, store_later, task_reads, task_request


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_notification_brings_the_row(make_app: Callable[..., Celery], db_url: str) -> None:
    """A get() woken by NOTIFY reads the table once (its first check), and the row the
    notification carried gives the same meta as reading it."""
    app = make_app(result_extended=True, sqlresults_notify_rows=True)
    backend = app.backend
    listening(app)
    reads = task_reads(app)
    store_later(app, "carried", {"v": [1, 2]}, delay=0.3, request=task_request())
    assert app.AsyncResult("carried").get(timeout=15, interval=60) == {"v": [1, 2]}
    assert len(reads) == 1  # the first check, before the result existed
    # What a notification carries, decoded, is what a read returns, for every kind of row.
    req = task_request("proj.stamped")
    req.stamps, req.stamped_headers = {"s": [1, "x"]}, ["s"]
    req.children = [app.AsyncResult("kid")]
    listen = psycopg.connect(
        sa.make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False),
        autocommit=True,
    )
    try:
        listen.execute(f'LISTEN "{backend.store.channel}"')
        backend.store_result("s1", {"k": "v"}, states.SUCCESS, request=req)
        backend.store_result("f1", KeyError("gone"), states.FAILURE, traceback="TB", request=req)
        backend.store_result("plain", 5, states.SUCCESS)  # no request: no extended columns
        payloads = [n.payload for n in listen.notifies(timeout=5, stop_after=3)]
    finally:
        listen.close()
    assert len(payloads) == 3
    plain = split(payloads.pop())
    assert plain[0] == "plain" and plain[1] is not None
    # Only what a write stores travels; a reader that needs more reads the table.
    assert backend.store.notices.row(*plain, extended=True) is None
    assert backend.store.notices.row(*plain, extended=False) is not None
    # Dates go as six-digit fractions, which Python 3.10's fromisoformat also parses.
    assert all(re.search(r'"date_done": ?"[0-9-]{10}T[0-9:]{8}\.[0-9]{6}"', p) for p in payloads)
    for extended in (True, False):
        reader = make_app(result_extended=extended).backend
        for payload in payloads:
            task_id, body = split(payload)
            assert body is not None
            row = reader.store.notices.row(task_id, body, extended)
            assert row is not None
            carried = reader._meta_from_row(row)
            read = reader.get_task_meta(task_id, cache=False)
            if read["status"] == states.FAILURE:
                assert repr(carried.pop("result")) == repr(read.pop("result"))
            assert carried == read
            assert ("name" in carried) is extended


@pytest.mark.parametrize("db_kind", ["postgresql"])
@pytest.mark.parametrize("rows", [True, False])
def test_a_row_too_large_to_carry_is_read(make_app: Callable[..., Celery], rows: bool) -> None:
    """PostgreSQL refuses notifications over 8000 bytes: a big row sends its id alone
    (as every row does with ``sqlresults_notify_rows = False``), and the waiter reads it."""
    app = make_app(sqlresults_notify_rows=rows)
    listening(app)
    reads = task_reads(app)
    value = "x" * 6_000 if rows else "small"  # over 8000 bytes in base64
    store_later(app, "big", value, delay=0.3)
    assert app.AsyncResult("big").get(timeout=15, interval=60) == value
    assert len(reads) == 2  # the first check, and the read after the notification
    assert split("3:big") == ("big", None)
    assert split("not ours") == ("not ours", None)
    assert split("²:x") == ("²:x", None)  # a digit to isdigit(), not to int()


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_a_row_that_escapes_past_the_limit_is_read(make_app: Callable[..., Celery]) -> None:
    """4000 bytes of control characters become 24000 in JSON: sent as the id alone (PostgreSQL
    would refuse the notification, and the write with it), and the waiter reads the row."""
    app = make_app(sqlresults_notify_rows=True)
    listening(app)
    reads = task_reads(app)
    tb = "\x01" * 4000

    def fail_later() -> None:
        time.sleep(0.3)
        app.backend.store_result("esc", KeyError("k"), states.FAILURE, traceback=tb)

    threading.Thread(target=fail_later).start()
    assert isinstance(
        app.AsyncResult("esc").get(timeout=15, interval=60, propagate=False), KeyError
    )
    assert len(reads) == 2  # the first check, and the read after the notification
    assert app.AsyncResult("esc").traceback == tb


@contextlib.contextmanager
def _connect_granted_only(db_url: str) -> Iterator[None]:
    """``REVOKE CONNECT … FROM PUBLIC`` for a while (docs/reliability.md §11): then only
    superusers and roles granted CONNECT can connect, whatever other roles the server has."""
    database = sa.make_url(db_url).database
    admin = raw_engine(db_url)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"REVOKE CONNECT ON DATABASE {database} FROM PUBLIC")
        conn.commit()
    try:
        yield
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"GRANT CONNECT ON DATABASE {database} TO PUBLIC")
            conn.commit()
        admin.dispose()


@contextlib.contextmanager
def _outsider(db_url: str) -> Iterator[str]:
    """A login role that may connect to the database but has no grants on its tables."""
    name = "sqlresults_outsider"
    database = sa.make_url(db_url).database
    admin = raw_engine(db_url)
    with admin.connect() as conn:
        drop_role(conn, name)
        conn.exec_driver_sql(f"CREATE ROLE {name} LOGIN")
        conn.exec_driver_sql(f"GRANT CONNECT ON DATABASE {database} TO {name}")
        conn.commit()
    try:
        yield name
    finally:
        with admin.connect() as conn:
            drop_role(conn, name)
            conn.commit()
        admin.dispose()


@pytest.mark.parametrize("db_kind", ["postgresql"])
@pytest.mark.parametrize(
    ("rows", "serializer", "outsider", "taken"),
    [
        (False, "json", False, False),  # rows off: a notification is a wake-up, never a row
        (True, "pickle", False, False),  # an app that accepts pickle never takes one
        ("auto", "json", True, False),  # a role that may not write the results can connect
        ("auto", "json", False, True),  # every role that can connect may write them anyway
        (True, "json", True, True),  # the user vouches for every role that can connect
    ],
)
def test_forged_notifications(
    make_app: Callable[..., Celery],
    db_url: str,
    rows: bool | str,
    serializer: str,
    outsider: bool,
    taken: bool,
) -> None:
    """Any session of the database may NOTIFY: a notification's row is taken only where
    ``sqlresults_notify_rows`` allows it (``auto``: no role but those that may write the
    results can connect), else the waiter reads the table."""
    conf = {"result_serializer": serializer, "result_accept_content": [serializer]}
    app = make_app(sqlresults_notify_rows=rows, **conf)
    forged = ensure_bytes(app.backend.encode("forged"))
    fake = {"status": states.SUCCESS, "result": base64.b64encode(forged).decode()}
    body = json.dumps({**fake, "traceback": None, "date_done": "2026-01-01T00:00:00.000000"})
    task_id = f"forged-{rows}-{serializer}-{outsider}"
    admin = raw_engine(db_url)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_connect_granted_only(db_url))
        if outsider:
            stack.enter_context(_outsider(db_url))
        listening(app)
        storing = store_later(app, task_id, "real", delay=1.0)

        def forge(channel: str = app.backend.store.channel) -> None:
            time.sleep(0.3)
            with admin.connect() as conn:
                conn.execute(
                    sa.text("SELECT pg_notify(:c, :p)"),
                    {"c": channel, "p": f"{len(task_id)}:{task_id}{body}"},
                )
                conn.commit()

        threading.Thread(target=forge).start()
        got = app.AsyncResult(task_id).get(timeout=15, interval=60)
        storing.join()
    admin.dispose()
    assert got == ("forged" if taken else "real")


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_auto_rows_follow_the_roles_that_can_connect(
    make_app: Callable[..., Celery], db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``auto`` sends rows only while every role that may connect may read and write the
    task table, looks again after ROLES_CHECKED_FOR seconds, and a grant makes a role
    one of those."""

    store = make_app().backend.store
    assert store.settings.notify_rows == "auto"
    listen = psycopg.connect(
        sa.make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False),
        autocommit=True,
    )
    listen.execute(f'LISTEN "{store.channel}"')

    def sent(task_id: str) -> str | None:
        make_app().backend.store_result(task_id, 1, states.SUCCESS)  # a fresh process's view
        (note,) = list(listen.notifies(timeout=5, stop_after=1))
        found, row = split(note.payload)
        assert found == task_id
        return row

    try:
        with _connect_granted_only(db_url):
            assert store.notices.rows_travel() and sent("before") is not None
            with _outsider(db_url) as name:
                assert store.notices.rows_travel(), "looked at the roles less than a minute ago"
                monkeypatch.setattr(notices, "ROLES_CHECKED_FOR", 0.0)
                assert not store.notices.rows_travel()
                assert sent("outsider") is None
                table = store.tables.task.name
                with raw_engine(db_url).begin() as conn:
                    conn.exec_driver_sql(f"GRANT SELECT, INSERT ON {table} TO {name}")
                assert not store.notices.rows_travel(), "a role that may not UPDATE could forge"
                with raw_engine(db_url).begin() as conn:
                    conn.exec_driver_sql(f"GRANT UPDATE ON {table} TO {name}")
                assert store.notices.rows_travel() and sent("granted") is not None
            assert store.notices.rows_travel()
        # With PUBLIC's CONNECT back, a role with no grants can connect: rows stop.
        with _outsider(db_url):
            assert not store.notices.rows_travel()
    finally:
        listen.close()


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_a_row_that_is_not_ours_is_read_instead(make_app: Callable[..., Celery]) -> None:
    """Notifications whose row is partial or malformed are not taken (no error either)."""
    store = make_app().backend.store
    good = {"status": "SUCCESS", "result": "Mg==", "traceback": None, "date_done": None}
    read = store.notices.row  # a reader without result_extended
    assert read("t", json.dumps(good), False) == {"task_id": "t", **good, "result": b"2"}
    assert read("t", json.dumps(good), True) is None  # an extended reader needs name, args…
    for bad in (
        {"status": "SUCCESS"},  # a read returns more than this
        {**good, "status": ["SUCCESS"]},
        {**good, "result": "not base64!"},
        {**good, "date_done": "yesterday"},
        {**good, "date_done": 5},
        ["SUCCESS"],
    ):
        assert read("t", json.dumps(bad), False) is None, bad
    assert read("t", "{not json", False) is None


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_notices_carry_only_what_a_reader_can_take_as_sent(
    make_app: Callable[..., Celery],
) -> None:
    """The writer's payload: the id alone when a value would not read back as sent or the
    payload would reach PostgreSQL's 8000 bytes (counted in bytes, not characters)."""
    store = make_app().backend.store
    now = datetime(2026, 1, 2, 3, 4, 5, 6)
    row = {"task_id": "t", "status": "SUCCESS", "result": b"2", "traceback": None}
    row.update(date_done=now, date_created=now)
    task_id, body = split(store.notices.payload(row, carry=True))
    assert task_id == "t" and body is not None
    assert json.loads(body) == {
        "status": "SUCCESS", "result": "Mg==", "traceback": None, "date_done": now.isoformat()
    }  # fmt: skip
    assert store.notices.row("t", body, extended=False) == {
        "task_id": "t", "status": "SUCCESS", "result": b"2", "traceback": None, "date_done": now
    }  # fmt: skip
    assert store.notices.payload(row, carry=False) == "1:t"
    for odd in (
        {"date_done": now.replace(tzinfo=timezone.utc)},  # a zone: stored as the session sees it
        {"result": memoryview(b"2")},  # not bytes in a binary column
        {"result": "2"},
        {"traceback": object()},  # nothing JSON can hold
    ):
        assert store.notices.payload({**row, **odd}, carry=True) == "1:t", odd
    # Largest ASCII payload under the limit; the same with a two-byte-per-character id is over.
    carried = {n: store.notices.payload(_big(row, "a", n), True) for n in range(5000, 6000)}
    size = max(n for n, notice in carried.items() if split(notice)[1] is not None)
    assert len(carried[size].encode()) in range(7900, 8000)
    assert store.notices.payload(_big(row, "é", size), True) == f"100:{'é' * 100}"
    assert store.notices.payload(_big(row, "a", 10_000), True) == f"100:{'a' * 100}"


def _big(row: dict[str, object], char: str, size: int) -> dict[str, object]:
    return {**row, "task_id": char * 100, "result": b"x" * size}


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_a_refused_write_notifies_nothing(make_app: Callable[..., Celery], db_url: str) -> None:
    """A stored SUCCESS refuses a later state, and the notification with it: a waiter must
    never take a value the table does not hold."""
    backend = make_app(result_extended=True, sqlresults_notify_rows=True).backend
    listen = psycopg.connect(
        sa.make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False),
        autocommit=True,
    )
    try:
        listen.execute(f'LISTEN "{backend.store.channel}"')
        backend.store_result("once", 1, states.SUCCESS, request=task_request())
        backend.store_result("once", KeyError("late"), states.FAILURE, request=task_request())
        payloads = [n.payload for n in listen.notifies(timeout=2, stop_after=2)]
    finally:
        listen.close()
    assert len(payloads) == 1
    task_id, body = split(payloads[0])
    assert task_id == "once" and body is not None and json.loads(body)["status"] == states.SUCCESS
    assert backend.get_task_meta("once", cache=False)["result"] == 1
