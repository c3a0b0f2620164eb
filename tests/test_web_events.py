"""Server-Sent Events of the monitoring view: live progress, over a real server and worker.

The streams are read with httpx over TCP from uvicorn (httpx' in-process ASGI
transport would hold the answer until it ends). The worker's ``t.steps`` task
reports progress only when the test pushes a go-ahead to Redis, so every step
is seen before the next is allowed: the test sets the pace, no sleeps.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest
import redis
import sqlalchemy as sa
from celery import Celery, group, states

from celery_sqlresults.notices import split
from celery_sqlresults.web import create_app
from celery_sqlresults.web import events as web_events
from tests.conftest import REDIS_URL, Worker, client_app, listening

uvicorn = pytest.importorskip("uvicorn")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """Run ``create_app(app, **options)`` with uvicorn in a thread; return its base URL."""
    servers: list[tuple[Any, threading.Thread]] = []

    def start(app: Celery, **options: Any) -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(create_app(app, **options), log_level="warning", lifespan="off")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def sse(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    """``(event, data)`` of each event in a Server-Sent Events stream (comments skipped)."""
    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)


def progress(task: dict[str, Any]) -> tuple[str, Any]:
    """State and meta (STARTED's meta, the worker's pid and name, left out)."""
    return task["state"], None if task["state"] == states.STARTED else task["result"]


@pytest.mark.worker
def test_a_task_stream_shows_each_step(
    db_url: str, worker_factory: Callable[..., Worker], serve: Callable[..., str]
) -> None:
    """STARTED, three PROGRESS updates, then SUCCESS and the end: each seen in turn."""
    worker = worker_factory(db_url)
    app = client_app(db_url, worker.queue)
    key = f"go-{uuid.uuid4().hex}"
    go = redis.Redis.from_url(REDIS_URL)
    result = app.signature("t.steps", (key, 3)).delay()
    base = serve(app)
    seen: list[tuple[str, Any]] = []
    expected = [
        (states.STARTED, None),
        ("PROGRESS", {"current": 1, "total": 3}),
        ("PROGRESS", {"current": 2, "total": 3}),
        ("PROGRESS", {"current": 3, "total": 3}),
        (states.SUCCESS, 3),
    ]
    timeout = httpx.Timeout(5, read=60)
    with httpx.stream("GET", f"{base}/api/tasks/{result.id}/events", timeout=timeout) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        for event, data in sse(answer.iter_lines()):
            if event == "end":
                break
            assert event == "task" and data["task_id"] == result.id
            step = progress(data)
            if step == (states.PENDING, None):  # before the worker took it
                continue
            seen.append(step)
            if step in expected[:-1]:
                go.rpush(key, "go")  # now, and only now, the next step
    assert seen == expected
    assert result.get(timeout=30) == 3


@pytest.mark.worker
def test_a_group_stream_follows_its_members(
    db_url: str, worker_factory: Callable[..., Worker], serve: Callable[..., str]
) -> None:
    worker = worker_factory(db_url, concurrency=2)
    app = client_app(db_url, worker.queue)
    keys = [f"go-{uuid.uuid4().hex}" for _ in range(2)]
    go = redis.Redis.from_url(REDIS_URL)
    result = group(app.signature("t.steps", (k, 1)) for k in keys).apply_async()
    result.save()
    base = serve(app)
    seen: list[tuple[int, tuple[str, ...]]] = []
    with httpx.stream(
        "GET", f"{base}/api/groups/{result.id}/events", timeout=httpx.Timeout(5, read=60)
    ) as answer:
        assert answer.status_code == 200
        for event, data in sse(answer.iter_lines()):
            if event == "end":
                break
            assert event == "group" and data["group_id"] == result.id
            member_states = tuple(m["state"] for m in data["members"])
            seen.append((data["progress"]["done"], member_states))
            # Advance one member at a time, once the stream showed where it stands.
            for k, state in zip(keys, member_states, strict=True):
                if state == states.STARTED or state == "PROGRESS":
                    go.rpush(k, "go")
                    break
    assert seen[-1] == (2, (states.SUCCESS, states.SUCCESS))
    assert any("PROGRESS" in s for _, s in seen)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert result.get(timeout=30) == [1, 1]


@pytest.fixture
def app(make_app: Callable[..., Celery]) -> Celery:
    return make_app(result_extended=True)


def events_of(client: TestClient, path: str) -> list[tuple[str, Any]]:
    answer = client.get(path)
    assert answer.status_code == 200, answer.text
    return list(sse(iter(answer.text.splitlines())))


def test_streams_end_and_refuse(app: Celery, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ready task ends its stream; an unstored one is PENDING until the stream times out."""
    client = TestClient(create_app(app, stream_seconds=0.3), base_url="http://localhost")
    app.backend.store_result("p", {"done": 1, "total": 4}, "PROGRESS")
    app.backend.store_result("p", {"done": 1, "total": 4}, "PROGRESS")
    got = events_of(client, "/api/tasks/p/events")
    assert [e for e, _ in got] == ["task", "timeout"]  # one event: nothing changed
    assert progress(got[0][1]) == ("PROGRESS", {"done": 1, "total": 4})
    app.backend.store_result("p", 4, states.SUCCESS)
    got = events_of(client, "/api/tasks/p/events")
    assert [e for e, _ in got] == ["task", "end"] and progress(got[0][1]) == ("SUCCESS", 4)
    got = events_of(client, "/api/tasks/never/events")
    assert [e for e, _ in got] == ["task", "timeout"] and got[0][1]["state"] == "PENDING"

    assert client.get("/api/groups/nope/events").status_code == 404
    members = [app.AsyncResult(i) for i in ("p", "never")]
    app.GroupResult("g", members).save(backend=app.backend)
    got = events_of(client, "/api/groups/g/events")
    assert got[0][1]["progress"] == {"done": 1, "total": 2} and got[-1][0] == "timeout"
    app.backend.store_result("never", 1, states.SUCCESS)
    assert events_of(client, "/api/groups/g/events")[-1][0] == "end"

    monkeypatch.setattr(web_events, "MAX_STREAMS", 0)
    refused = client.get("/api/tasks/p/events")
    assert refused.status_code == 503 and "event streams are open" in refused.json()["error"]

    with pytest.raises(ValueError, match="stream_seconds"):
        create_app(app, stream_seconds=0)


def test_streams_need_the_same_auth(app: Celery) -> None:
    web = create_app(app, token="s3cret", stream_seconds=0.2)
    client = TestClient(web, base_url="http://localhost")
    assert client.get("/api/tasks/p/events").status_code == 401
    assert client.get("/api/tasks/p/events?token=s3cret").status_code == 200


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_progress_notifies_and_started_does_not(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    """Custom states wake the streams on PostgreSQL; STARTED and PENDING keep their cost."""
    app = make_app(result_extended=True, sqlresults_notify_rows=True)
    backend = app.backend
    listening(app)
    listen = psycopg.connect(
        sa.make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False),
        autocommit=True,
    )
    try:
        listen.execute(f'LISTEN "{backend.store.channel}"')
        backend.store_result("t1", None, states.STARTED)
        backend.store_result("t1", {"current": 1, "total": 2}, "PROGRESS")
        backend.store_result("t2", None, states.PENDING)
        backend.store_result("t1", 2, states.SUCCESS)
        notes = [n.payload for n in listen.notifies(timeout=5, stop_after=2)]
        notes += [n.payload for n in listen.notifies(timeout=0.5)]  # nothing more comes
    finally:
        listen.close()
    carried = [split(p) for p in notes]
    assert [(i, json.loads(row or "{}").get("status")) for i, row in carried] == [
        ("t1", "PROGRESS"),
        ("t1", "SUCCESS"),
    ]
