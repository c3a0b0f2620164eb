"""The monitoring web app (JSON API, page, auth) and record-on-publish, on all three databases."""

from __future__ import annotations

import os
import pickle
import re
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from kombu.utils.encoding import ensure_bytes

from celery_sqlresults import ResultQuery, SQLResultsBackend
from tests.conftest import ROOT, raw_engine
from tests.servers import PrivateMariaDB, PrivatePostgres

pytest.importorskip("starlette")
with warnings.catch_warnings():  # Starlette >= 1 prefers httpx2; httpx still works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from celery_sqlresults.web import LOOPBACK_HOSTS, create_app, mask_token, serve_hosts
from celery_sqlresults.web import app as web_app

HTML = '<b id="pwn">x</b><script>window.pwned = 1</script>'
BASE = datetime(2024, 5, 1, 12, 0, 0)


def put(
    app: Celery,
    task_id: str,
    state: str = "SUCCESS",
    result: Any = None,
    *,
    date: datetime | None = BASE,
    traceback: str | None = None,
    **extended: Any,
) -> None:
    """Store one task row directly (name/worker/args/kwargs as ``result_extended`` would)."""
    backend: SQLResultsBackend = app.backend
    row: dict[str, Any] = {
        "task_id": task_id,
        "status": state,
        "result": ensure_bytes(backend.encode(result)),
        "traceback": traceback,
        "date_done": date,
    }
    for key, value in extended.items():
        row[key] = ensure_bytes(backend.encode(value)) if key in ("args", "kwargs") else value
    backend.store.store_task(row)


@pytest.fixture
def app(make_app: Callable[..., Celery]) -> Celery:
    return make_app(result_extended=True)


def web_client(target: Any, raise_server_exceptions: bool = True, **options: Any) -> TestClient:
    """A client of ``create_app(target, **options)`` sending ``Host: localhost``, one of the
    names the app answers by default (the TestClient's own ``testserver`` is not)."""
    return TestClient(
        create_app(target, **options),
        base_url="http://localhost",
        raise_server_exceptions=raise_server_exceptions,
    )


@pytest.fixture
def client(app: Celery) -> TestClient:
    return web_client(app)


sqlite_only = pytest.mark.parametrize("db_kind", ["sqlite"])


# ---- tasks ---------------------------------------------------------------------
def test_task_detail_and_404(app: Celery, client: TestClient) -> None:
    put(app, "ok", "SUCCESS", {"html": HTML, "n": [1, 2]}, name="proj.add", args=[1, 2])
    app.backend.store_result("bad", ValueError("boom"), "FAILURE", traceback="Traceback…\nboom")

    body = client.get("/api/tasks/ok").json()
    assert body["state"] == "SUCCESS"
    assert body["result"] == {"html": HTML, "n": [1, 2]}  # HTML comes back as data, untouched
    assert body["name"] == "proj.add" and body["args"] == [1, 2]
    assert body["date_done"].startswith("2024-05-01T12:00:00")

    bad = client.get("/api/tasks/bad").json()
    assert bad["state"] == "FAILURE"
    assert bad["result"] == "ValueError('boom')" and "boom" in bad["traceback"]
    assert bad["date_created"] is not None and bad["date_started"] is None  # never STARTED

    missing = client.get("/api/tasks/nope")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/json"
    assert "nope" in missing.json()["error"]


def stored(db_url: str, task_id: str, column: str) -> Any:
    """A column of a task row as the database holds it (bytes; text for the traceback)."""
    eng = raw_engine(db_url)
    with eng.connect() as conn:
        value = conn.execute(
            sa.text(f"SELECT {column} FROM celery_taskmeta WHERE task_id = :t"), {"t": task_id}
        ).scalar_one()
    eng.dispose()
    return bytes(value) if isinstance(value, (bytes, memoryview)) else value


def test_large_values_are_previewed_with_their_size_and_streamed_whole(
    app: Celery, client: TestClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing reads at most LIST_VALUE_BYTES of each value, in SQL; one task's answer at
    most DETAIL_VALUE_BYTES; /api/raw streams the stored value whole, piece by piece."""
    text = "aé€😀" * (web_app.DETAIL_VALUE_BYTES // 4)  # cuts fall inside characters
    # A traceback is TEXT on MySQL (64 KB): over the listing's bound, within the task's.
    tb_text = "Tb " + "é€" * (2 * web_app.LIST_VALUE_BYTES)
    put(app, "big", "FAILURE", text, args=[text], kwargs={"k": "v"}, traceback=tb_text)
    put(app, "small", "SUCCESS", {"n": 1}, args=[1], date=BASE + timedelta(seconds=1))
    result, args = stored(db_url, "big", "result"), stored(db_url, "big", "args")
    traceback = stored(db_url, "big", "traceback")
    assert len(result) > web_app.DETAIL_VALUE_BYTES and traceback == tb_text

    statements: list[str] = []
    sa.event.listen(
        app.backend.store.engine,
        "before_cursor_execute",
        lambda c, cur, sql, *a: statements.append(sql.lower()),
    )
    listing = client.get("/api/tasks")
    assert len(listing.content) < 10 * web_app.LIST_VALUE_BYTES  # not the 2 MB stored
    assert "length(celery_taskmeta.result)" in statements[-1]  # sizes from SQL, values cut
    small, big = listing.json()["tasks"]
    assert (small["result"], small["args"], small["truncated"]) == ({"n": 1}, [1], {})
    assert big["result"] is None and big["args"] is None and big["traceback"] is None
    assert big["kwargs"] == {"k": "v"}  # small enough: whole
    cut = big["truncated"]
    assert set(cut) == {"result", "args", "traceback"}
    assert cut["result"]["size"] == len(result) and cut["args"]["size"] == len(args)
    assert cut["traceback"]["size"] == len(traceback)  # characters
    preview = cut["result"]["preview"]
    assert 0 < len(preview.encode()) <= web_app.LIST_VALUE_BYTES
    assert result.startswith(preview.encode())
    assert traceback.startswith(cut["traceback"]["preview"])
    assert len(cut["traceback"]["preview"]) == web_app.LIST_VALUE_BYTES

    detail = client.get("/api/tasks/big")
    assert len(detail.content) < 4 * 2 * web_app.DETAIL_VALUE_BYTES
    body = detail.json()
    assert body["result"] is None and body["truncated"]["result"]["size"] == len(result)
    assert body["traceback"] == tb_text and set(body["truncated"]) == {"result", "args"}
    assert len(body["truncated"]["result"]["preview"].encode()) > web_app.LIST_VALUE_BYTES
    assert result.startswith(body["truncated"]["result"]["preview"].encode())
    assert client.get("/api/tasks/small").json()["truncated"] == {}

    monkeypatch.setattr(web_app, "RAW_CHUNK", 99_999)  # several pieces, cut anywhere
    statements.clear()
    raw = client.get("/api/raw/result/big")
    assert raw.status_code == 200 and raw.content == result
    assert raw.headers["content-type"] == "application/octet-stream"
    assert raw.headers["content-length"] == str(len(result))
    assert raw.headers["content-disposition"].startswith("attachment")
    assert raw.headers["x-content-type-options"] == "nosniff"
    assert len(statements) == -(-len(result) // 99_999)  # one read per piece
    assert client.get("/api/raw/args/big").content == args
    raw_tb = client.get("/api/raw/traceback/big")
    assert raw_tb.headers["content-type"] == "text/plain; charset=utf-8"
    assert raw_tb.content.decode() == traceback
    assert client.get("/api/raw/args/small").content == stored(db_url, "small", "args")
    assert client.get("/api/raw/kwargs/small").status_code == 404  # none stored
    assert client.get("/api/raw/traceback/small").status_code == 404  # none stored
    assert client.get("/api/raw/result/nope").status_code == 404
    wrong = client.get("/api/raw/children/big")
    assert wrong.status_code == 400 and wrong.json()["error"].startswith("field:")


def test_pagination_is_keyset_without_duplicates_or_gaps(app: Celery, client: TestClient) -> None:
    # Many rows share a date_done (whole seconds, as MySQL's DATETIME stores them): the id
    # breaks ties. One unfinished row (no date_done) sorts where the database puts NULLs.
    ids = []
    for i in range(23):
        task_id = f"t{i:02d}"
        put(app, task_id, date=BASE + timedelta(seconds=i // 4))
        ids.append(task_id)
    put(app, "unfinished", "STARTED", date=None)
    ids.append("unfinished")

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 5, **({"cursor": cursor} if cursor else {})}
        body = client.get("/api/tasks", params=params).json()
        seen += [t["task_id"] for t in body["tasks"]]
        pages += 1
        if pages == 1:  # a row stored meanwhile is newer: it must not shift the next pages
            put(app, "newer", date=BASE + timedelta(days=1))
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert len(body["tasks"]) == 5
    assert pages == 5
    assert len(seen) == len(set(seen)) == len(ids)
    assert set(seen) == set(ids)
    finished = [s for s in seen if s != "unfinished"]
    assert finished == sorted(finished, key=lambda s: (int(s[1:]) // 4, int(s[1:])), reverse=True)

    # The same pages through the Python API.
    query = ResultQuery(app).filter(state="SUCCESS")
    first, cursor = query.page(10)
    second, last = query.after(cursor).page(100)
    assert last is None
    assert [r.task_id for r in first + second] == ["newer", *finished]


def test_filters(app: Celery, client: TestClient) -> None:
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    put(app, "a", "SUCCESS", name="proj.add", worker="w1@host", date=now)
    put(app, "b", "FAILURE", name="proj.mul", worker="w2@host", date=now - timedelta(minutes=5))
    put(app, "c", "SUCCESS", name="other.add", worker="w1@host", date=now - timedelta(days=3))

    def ids(**params: str) -> set[str]:
        response = client.get("/api/tasks", params=params)
        assert response.status_code == 200, response.text
        return {t["task_id"] for t in response.json()["tasks"]}

    assert ids() == {"a", "b", "c"}
    assert ids(state="failure") == {"b"}
    assert ids(state="SUCCESS,FAILURE") == {"a", "b", "c"}
    assert ids(name="proj.*") == {"a", "b"}
    assert ids(worker="w1@host") == {"a", "c"}
    assert ids(since="1h") == {"a", "b"}
    assert ids(since="1h", until="1m") == {"b"}
    assert ids(until=(now - timedelta(days=1)).isoformat() + "Z") == {"c"}

    # Custom states (update_state): as stored, or in upper case.
    put(app, "p", "PROGRESS", {"done": 1}, date=now)
    put(app, "q", "step-2.of:3", date=now)
    put(app, "r", "waiting", date=now)
    assert ids(state="PROGRESS") == ids(state="progress") == {"p"}
    assert ids(state="step-2.of:3,waiting") == {"q", "r"}
    assert ids(state="FAILURE,PROGRESS") == {"b", "p"}


@sqlite_only
@pytest.mark.parametrize(
    ("params", "word"),
    [
        ({"since": "yesterday"}, "since"),
        ({"until": "2024-13-40"}, "until"),
        ({"limit": "many"}, "limit"),
        ({"limit": "0"}, "limit"),
        ({"limit": "100000"}, "limit"),
        ({"state": "<b>"}, "state"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"name": "x" * 300}, "name"),
    ],
)
def test_bad_query_values_are_400(client: TestClient, params: dict[str, str], word: str) -> None:
    response = client.get("/api/tasks", params=params)
    assert response.status_code == 400
    assert response.json()["error"].startswith(word + ":")


def test_stats(app: Celery, client: TestClient) -> None:
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    put(app, "a", "SUCCESS", name="proj.add", date=now)
    put(app, "b", "SUCCESS", name="proj.add", date=now)
    put(app, "c", "FAILURE", name="proj.mul", date=now)
    put(app, "d", "SUCCESS", name="proj.mul", date=now - timedelta(days=2))

    body = client.get("/api/stats").json()
    assert body["states"] == {"SUCCESS": 3, "FAILURE": 1} and body["total"] == 4
    names = {n["name"]: n["states"] for n in body["names"]}
    assert names == {"proj.add": {"SUCCESS": 2}, "proj.mul": {"FAILURE": 1, "SUCCESS": 1}}

    recent = client.get("/api/stats", params={"since": "1d"}).json()
    assert recent["states"] == {"SUCCESS": 2, "FAILURE": 1} and recent["total"] == 3
    assert client.get("/api/stats", params={"since": "soon"}).status_code == 400


def test_stats_are_counted_once_for_every_open_page(
    app: Celery, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counting reads the table: pages polling together share one count per STATS_TTL."""
    put(app, "a", "SUCCESS", name="proj.add", date=datetime.now(timezone.utc).replace(tzinfo=None))
    counts: list[str] = []
    sa.event.listen(
        app.backend.store.engine,
        "before_cursor_execute",
        lambda c, cur, s, *a: counts.append(s) if "count(" in s.lower() else None,
    )
    clock = [1000.0]
    monkeypatch.setattr(web_app.time, "monotonic", lambda: clock[0])
    first = [client.get("/api/stats").json() for _ in range(5)]
    assert len(counts) == 1 and all(b == first[0] for b in first)
    client.get("/api/stats", params={"since": "1d"})  # another query: its own count
    assert len(counts) == 2
    put(app, "b", "FAILURE", name="proj.add", date=datetime.now(timezone.utc).replace(tzinfo=None))
    clock[0] += web_app.STATS_TTL
    assert client.get("/api/stats").json()["states"] == {"SUCCESS": 1, "FAILURE": 1}
    assert len(counts) == 3


@sqlite_only
def test_stats_cache_is_keyed_on_the_filters(
    app: Celery, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parameters the route ignores, or another spelling of a time, are not another count."""
    counts: list[str] = []
    sa.event.listen(
        app.backend.store.engine,
        "before_cursor_execute",
        lambda c, cur, s, *a: counts.append(s) if "count(" in s.lower() else None,
    )
    monkeypatch.setattr(web_app.time, "monotonic", lambda: 1000.0)
    for i in range(5):
        assert client.get("/api/stats", params={"x": f"unique-{i}"}).status_code == 200
    assert len(counts) == 1
    for since in ("1h", "60m", "3600s"):
        client.get("/api/stats", params={"since": since, "token": since})
    assert len(counts) == 2
    for since in ("2024-05-01T00:00:00Z", "2024-05-01T02:00:00+02:00"):
        client.get("/api/stats", params={"since": since})
    assert len(counts) == 3
    client.get("/api/stats", params={"name": "proj.*"})  # another filter: its own count
    assert len(counts) == 4


def test_group(app: Celery, client: TestClient) -> None:
    members = [app.AsyncResult(i) for i in ("g-a", "g-b", "g-c")]
    app.GroupResult("grp", members).save(backend=app.backend)
    put(app, "g-a", "SUCCESS", 1, name="proj.add")
    put(app, "g-b", "FAILURE", "boom", name="proj.add")

    body = client.get("/api/groups/grp").json()
    assert [m["task_id"] for m in body["members"]] == ["g-a", "g-b", "g-c"]
    assert [m["state"] for m in body["members"]] == ["SUCCESS", "FAILURE", "PENDING"]
    assert body["progress"] == {"done": 2, "total": 3}
    assert body["states"] == {"SUCCESS": 1, "FAILURE": 1, "PENDING": 1}
    assert client.get("/api/groups/nope").status_code == 404

    app.backend.store.save_group("pickled", pickle.dumps(("x", [])), BASE)
    undecodable = client.get("/api/groups/pickled")
    assert undecodable.status_code == 422
    assert undecodable.json()["error"].startswith("group 'pickled' cannot be decoded")


# ---- health --------------------------------------------------------------------
UNREACHABLE = {
    "sqlite": "sqlite:////nonexistent-dir-sqlresults/results.db",
    "postgresql": "postgresql+psycopg://postgres@127.0.0.1:1/x",
    "mysql": "mysql+pymysql://root@127.0.0.1:1/x",
}


def test_healthz_up_and_down(
    client: TestClient, make_app: Callable[..., Celery], db_kind: str
) -> None:
    assert client.get("/healthz").json() == {"ok": True}

    down = make_app(url=UNREACHABLE[db_kind], database_create_tables_on_startup=False)
    down_client = web_client(down)
    response = down_client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["ok"] is False
    listing = down_client.get("/api/tasks")
    assert listing.status_code == 503
    assert listing.json() == {"error": "result database unavailable"}


@sqlite_only
def test_every_answer_carries_the_safety_headers_and_echoes_little(
    make_app: Callable[..., Celery], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Errors too: 400, 401, 404, 405, 500, 503 get nosniff, no-store and no-referrer, and
    a huge id or value is not echoed back whole."""

    def bug(*args: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ResultQuery, "stats", bug)
    app = make_app(sqlresults_web_token="tok")
    client = web_client(app, raise_server_exceptions=False)
    down = make_app(url=UNREACHABLE["sqlite"], database_create_tables_on_startup=False)
    down_client = web_client(down, token="tok")
    auth = {"Authorization": "Bearer tok"}
    huge = "x" * 60_000  # httpx refuses longer URLs
    answers = {
        "page": (200, client.get("/?token=tok")),
        "list": (200, client.get("/api/tasks", headers=auth)),
        "health": (200, client.get("/healthz")),
        "bad since": (400, client.get("/api/tasks", params={"since": huge}, headers=auth)),
        "bad until": (400, client.get("/api/stats", params={"until": huge}, headers=auth)),
        "no token": (401, client.get("/api/tasks")),
        "no task": (404, client.get(f"/api/tasks/{huge}", headers=auth)),
        "no group": (404, client.get(f"/api/groups/{huge}", headers=auth)),
        "no route": (404, client.get("/nope", headers=auth)),
        "method": (405, client.post("/api/tasks", headers=auth)),
        "bug": (500, client.get("/api/stats", headers=auth)),
        "down": (503, down_client.get("/api/tasks", headers=auth)),
        "down health": (503, down_client.get("/healthz")),
    }
    for what, (status, response) in answers.items():
        assert response.status_code == status, what
        assert response.headers["x-content-type-options"] == "nosniff", what
        assert response.headers["cache-control"] == "no-store", what
        assert response.headers["referrer-policy"] == "no-referrer", what
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"], what
        if status != 200:
            assert len(response.content) < 1000, what
    assert "script-src 'sha256-" in answers["page"][1].headers["content-security-policy"]
    assert answers["bad since"][1].json()["error"].startswith("since: invalid time 'xxx")


@pytest.fixture(params=["postgresql", "mysql"])
def private(request: pytest.FixtureRequest) -> Iterator[PrivatePostgres | PrivateMariaDB]:
    """A private server of each kind, for tests that take it down (never the shared ones)."""
    server: PrivatePostgres | PrivateMariaDB
    server = PrivatePostgres() if request.param == "postgresql" else PrivateMariaDB()
    try:
        yield server.start()
    finally:
        server.close()


def test_every_route_answers_at_once_when_the_database_is_down(
    private: PrivatePostgres | PrivateMariaDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """503 from every route, the group's too, without entering the backend's retry loop
    (which kept /api/groups waiting for sqlresults_retry_timeout)."""
    app = Celery("down", set_as_current=False)
    app.conf.update(result_backend="sql+" + private.url(), result_extended=True)
    put(app, "t1", "SUCCESS", 1, name="proj.add")
    app.GroupResult("grp", [app.AsyncResult("t1"), app.AsyncResult("t2")]).save(backend=app.backend)
    client = web_client(app)
    routes = ["/healthz", "/api/tasks", "/api/tasks/t1", "/api/stats", "/api/groups/grp"]
    assert [client.get(path).status_code for path in routes] == [200] * len(routes)

    retried: list[str] = []
    retry = app.backend._ensure_retryable

    def spy(func: Any, *args: Any, **kwargs: Any) -> Any:
        retried.append(getattr(func, "__name__", repr(func)))
        return retry(func, *args, **kwargs)

    monkeypatch.setattr(app.backend, "_ensure_retryable", spy)
    private.stop()
    for path in [*routes, "/api/stats?name=x"]:  # (the first stats may come from the cache)
        response = client.get(path)
        assert response.status_code in ((200, 503) if path == "/api/stats" else (503,)), path
    assert retried == []


# ---- hosts ---------------------------------------------------------------------
@sqlite_only
def test_only_the_hosts_served_are_answered(make_app: Callable[..., Celery]) -> None:
    """Another Host (a DNS name rebound to 127.0.0.1, say) gets 400, before auth or data."""
    app = make_app()

    def status(host: str, **options: Any) -> int:
        client = TestClient(create_app(app, **options), base_url=f"http://{host}")
        response = client.get("/api/tasks")
        assert response.headers["x-content-type-options"] == "nosniff"
        return response.status_code

    for host in ("localhost", "LOCALHOST:5566", "127.0.0.1", "127.0.0.1:80", "[::1]:5566"):
        assert status(host) == 200, host
    for host in ("evil.example", "testserver", "127.0.0.1.evil.example", "localhost.evil"):
        assert status(host) == 400, host
    assert status("evil.example", token="t") == 400  # refused before auth is asked for

    named = {"allowed_hosts": ["Results.example.com", "*.internal"]}
    assert status("results.example.com", **named) == 200
    assert status("a.b.internal:8443", **named) == 200
    assert status("localhost", **named) == 400  # the list given replaces the default
    assert status("anything.example", allowed_hosts=["*"]) == 200

    proxied = make_app(sqlresults_web_allowed_hosts="monitor.example.com, [2001:db8::1]")
    for host in ("monitor.example.com", "[2001:db8::1]:443", "localhost"):
        client = TestClient(create_app(proxied), base_url=f"http://{host}")
        assert client.get("/").status_code == 200, host
    for bad in ("https://monitor.example.com", "monitor.example.com:443", "*monitor", ""):
        with pytest.raises(ValueError, match=r"sqlresults_web_allowed_hosts: .*not a host"):
            create_app(make_app(sqlresults_web_allowed_hosts=[bad]))
    with pytest.raises(ValueError, match=r"^allowed_hosts: 'a/b'"):
        create_app(app, allowed_hosts=["a/b"])


def test_serve_hosts_follow_the_address_listened_on() -> None:
    assert serve_hosts("127.0.0.1") == ["127.0.0.1", "localhost", "[::1]"]
    assert serve_hosts("::1") == ["[::1]", "localhost", "127.0.0.1"]
    assert serve_hosts("0.0.0.0") == serve_hosts("::") == list(LOOPBACK_HOSTS)
    assert serve_hosts("192.0.2.7") == ["192.0.2.7"]
    assert serve_hosts("results.example.com") == ["results.example.com"]


# ---- auth ----------------------------------------------------------------------
@sqlite_only
def test_no_auth_by_default(client: TestClient) -> None:
    assert client.get("/api/tasks").status_code == 200
    assert client.get("/").status_code == 200


@sqlite_only
def test_token_auth(make_app: Callable[..., Celery]) -> None:
    app = make_app(sqlresults_web_token="s3cret-token")
    client = web_client(app)
    for path in (
        "/",
        "/api/tasks",
        "/api/stats",
        "/api/tasks/x",
        "/openapi.json",
        "/static/app.js",
    ):
        response = client.get(path)
        assert response.status_code == 401, path
        assert "s3cret" not in response.text
    assert client.get("/healthz").status_code == 200
    bearer = {"Authorization": "Bearer s3cret-token"}
    assert client.get("/api/tasks", headers=bearer).status_code == 200
    assert client.get("/api/tasks?token=s3cret-token").status_code == 200
    assert client.get("/?token=s3cret-token").status_code == 200
    assert client.get("/api/tasks", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/api/tasks?token=s3cret-tokenX").status_code == 401


@sqlite_only
def test_basic_auth(make_app: Callable[..., Celery]) -> None:
    app = make_app(sqlresults_web_basic_auth="admin:pa55word")
    client = web_client(app)
    denied = client.get("/api/tasks")
    assert denied.status_code == 401
    assert denied.headers["www-authenticate"].startswith("Basic")
    assert "pa55word" not in denied.text
    assert client.get("/api/tasks", auth=("admin", "pa55word")).status_code == 200
    assert client.get("/api/tasks", auth=("admin", "wrong")).status_code == 401
    garbage = {"Authorization": "Basic %%%"}
    assert client.get("/api/tasks", headers=garbage).status_code == 401
    assert client.get("/healthz").status_code == 200
    assert "pa55word" not in client.get("/", auth=("admin", "pa55word")).text

    with pytest.raises(ValueError, match="user:password") as info:
        create_app(make_app(sqlresults_web_basic_auth="no-colon-secret"))
    assert "no-colon-secret" not in str(info.value)


# ---- page and documents ------------------------------------------------------------
@sqlite_only
def test_page_renders_data_as_text_only(client: TestClient) -> None:
    script = client.get("/static/app.js")
    assert script.status_code == 200
    js = script.text
    assert "textContent" in js
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js, sink

    page = client.get("/")
    assert page.headers["content-type"].startswith("text/html")
    assert js in page.text  # inlined, and allowed by the CSP by its hash only
    csp = page.headers["content-security-policy"]
    assert "script-src 'sha256-" in csp and "unsafe-inline" not in csp.split("style-src")[0]
    assert page.headers["x-content-type-options"] == "nosniff"
    for element in ('id="counts"', 'id="f-state"', 'id="tasks"', 'id="d-traceback"', 'id="group"'):
        assert element in page.text


@sqlite_only
def test_openapi_lists_the_paths(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {
        "/api/tasks",
        "/api/tasks/{task_id}",
        "/api/stats",
        "/api/groups/{group_id}",
        "/api/raw/{field}/{task_id}",
        "/api/tasks/{task_id}/events",
        "/api/groups/{group_id}/events",
        "/metrics",
        "/healthz",
    }
    params = {p["name"] for p in doc["paths"]["/api/tasks"]["get"]["parameters"]}
    assert params == {"state", "name", "worker", "since", "until", "limit", "cursor"}


# ---- record on publish -------------------------------------------------------------
def _publisher(make_app: Callable[..., Celery], **conf: Any) -> Celery:
    app = make_app(broker_url="memory://", task_store_eager_result=True, **conf)

    @app.task(name="proj.add", shared=False)
    def add(x: int, y: int, z: str = "") -> int:
        return x + y

    @app.task(name="proj.quiet", shared=False, ignore_result=True)
    def quiet() -> None:
        return None

    return app


def test_record_on_publish(make_app: Callable[..., Celery]) -> None:
    app = _publisher(make_app, sqlresults_record_on_publish=True)
    add = app.tasks["proj.add"]
    sent = add.apply_async((2, 3), {"z": "<i>"}, queue="q1")

    record = ResultQuery(app).get(sent.id)
    assert record is not None
    assert record.status == "PENDING"
    assert (record.name, record.args, record.kwargs, record.queue) == (
        "proj.add",
        [2, 3],
        {"z": "<i>"},
        "q1",
    )
    assert record.date_done is not None and record.date_created is not None
    assert abs(record.date_created - datetime.now(timezone.utc)) < timedelta(minutes=1)
    assert record.date_started is None
    assert sent.state == "PENDING"

    # The worker's later write (result_extended off: core columns only) keeps what we recorded.
    add.apply((2, 3), {"z": "<i>"}, task_id=sent.id)
    done = ResultQuery(app).get(sent.id)
    assert done is not None
    assert (done.status, done.result) == ("SUCCESS", 5)
    assert done.date_created == record.date_created  # publish time, not the worker's
    assert (done.name, done.args, done.kwargs, done.queue) == (
        "proj.add",
        [2, 3],
        {"z": "<i>"},
        "q1",
    )

    # A row that exists already (a later state) is never overwritten by a publish.
    again = add.apply_async((7, 7), task_id=sent.id)
    kept = ResultQuery(app).get(again.id)
    assert kept is not None and (kept.status, kept.args) == ("SUCCESS", [2, 3])

    # Tasks whose result is ignored get no row.
    quiet = app.tasks["proj.quiet"].apply_async()
    assert ResultQuery(app).get(quiet.id) is None


def test_record_on_publish_off_does_nothing(
    make_app: Callable[..., Celery], monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery_sqlresults import publish

    def fail(*args: Any) -> None:
        raise AssertionError("record on publish ran while off")

    monkeypatch.setattr(publish, "expect_publish", fail)
    app = _publisher(make_app)
    sent = app.tasks["proj.add"].apply_async((1, 1))
    assert ResultQuery(app).get(sent.id) is None


@sqlite_only
def test_record_on_publish_survives_database_errors(
    make_app: Callable[..., Celery], caplog: pytest.LogCaptureFixture
) -> None:
    app = _publisher(
        make_app,
        url="sqlite:////nonexistent-dir-sqlresults/results.db",
        sqlresults_record_on_publish=True,
        database_create_tables_on_startup=False,
    )
    sent = app.tasks["proj.add"].apply_async((1, 1))  # published, despite the database
    assert re.fullmatch(r"[0-9a-f-]{36}", sent.id)
    assert "could not record task" in caplog.text


def test_mask_token_compares_names_decoded() -> None:
    assert mask_token("/api/tasks?tok%65n=S&x=1") == "/api/tasks?tok%65n=***&x=1"
    assert mask_token("/?a=1&token=S&token=T") == "/?a=1&token=***&token=***"
    assert mask_token("/?x=token=S&tokens=1") == "/?x=token=S&tokens=1"  # not the parameter
    assert mask_token("/api/tasks") == "/api/tasks"


def test_cli_serve_is_registered() -> None:
    from click.testing import CliRunner

    from celery_sqlresults.cli import results

    out = CliRunner().invoke(results, ["serve", "--help"])
    assert out.exit_code == 0
    assert "--host" in out.output and "127.0.0.1" in out.output
    assert "5566" in out.output  # not Flower's 5555


@sqlite_only
def test_cli_serve_runs(db_url: str, tmp_path: Path) -> None:
    """``celery -A proj results serve`` listens on 127.0.0.1 and keeps ?token= out of its log."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / "webproj.py").write_text(
        "from celery import Celery\n"
        "app = Celery('webproj')\n"
        f"app.conf.result_backend = {'sql+' + db_url!r}\n"
        "app.conf.sqlresults_web_token = 'tok-123'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "celery", "-A", "webproj", "results", "serve"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                assert httpx.get(f"{base}/healthz").json() == {"ok": True}
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        assert httpx.get(f"{base}/api/tasks").status_code == 401
        assert httpx.get(f"{base}/api/tasks?token=tok-123").json()["tasks"] == []
        # The app decodes parameter names: so must the log's mask.
        for query in ("tok%65n=tok-123", "%74oken=tok-123&x=1", "token=no&token=tok-123"):
            assert httpx.get(f"{base}/api/tasks?{query}").status_code == 200, query
        rebound = httpx.get(f"{base}/api/tasks?token=tok-123", headers={"Host": "evil.example"})
        assert rebound.status_code == 400
        named = httpx.get(f"http://localhost:{port}/healthz")
        assert named.status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)
    text = log.read_text()
    assert f"http://127.0.0.1:{port}/" in text and "auth required" in text
    assert "hosts 127.0.0.1, localhost, [::1], more with sqlresults_web_allowed_hosts" in text
    assert "token=***" in text and "tok%65n=***" in text and "tok-123" not in text
