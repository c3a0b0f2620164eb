"""schemathesis against the OpenAPI document the monitoring app serves, on real databases.

The app runs in-process (ASGI) over a database holding a success, a failure
with its traceback, an unfinished task and a group. Every generated request
(valid and invalid values, other methods) must get no server error, a status
code the document lists, the documented content type and a body matching the
documented schema; a 400 must name the parameter at fault.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from celery import Celery

pytest.importorskip("starlette")
pytest.importorskip("schemathesis")
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case, CheckContext, Response
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.applications import Starlette

with warnings.catch_warnings():  # Starlette >= 1 prefers httpx2; httpx still works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from celery_sqlresults.query import encode_cursor
from celery_sqlresults.web import create_app
from celery_sqlresults.web.openapi import openapi_document
from tests.test_web import put

#: Generated cases per operation, per database (``SQLRESULTS_SCHEMA_EXAMPLES`` for a longer hunt).
EXAMPLES = int(os.environ.get("SQLRESULTS_SCHEMA_EXAMPLES", "30"))

schema = schemathesis.openapi.from_dict(openapi_document())


def clear_bad_request(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """A 400 says which parameter is wrong: ``{"error": "<name>: …"}``."""
    if response.status_code != 400:
        return None
    message = json.loads(response.text)["error"]
    names = {p.name for p in (*case.operation.query, *case.operation.path_parameters)}
    if message.split(":", 1)[0] not in names:
        raise AssertionError(f"400 without the parameter's name: {message!r}")
    return True


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
    clear_bad_request,
]


@pytest.fixture
def web_app(make_app: Callable[..., Celery]) -> Starlette:
    app = make_app(result_extended=True)
    put(app, "ok", "SUCCESS", {"n": [1, 2.5, None]}, name="proj.add", worker="w1@h", args=[1])
    app.backend.store_result("bad", ValueError("boom"), "FAILURE", traceback="Traceback…\nboom")
    put(app, "running", "STARTED", date=None, name="proj.slow", worker="w2@h")
    members = [app.AsyncResult(i) for i in ("ok", "bad", "running", "never")]
    app.GroupResult("grp", members).save(backend=app.backend)
    # Streams of unfinished tasks end after stream_seconds: short, so each case ends.
    return create_app(app, allowed_hosts=["testserver"], stream_seconds=0.2)  # schemathesis' Host


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_conform(case: Case, web_app: Starlette) -> None:
    case.call_and_validate(app=web_app, checks=CHECKS)


@pytest.mark.parametrize(
    ("path", "values"),
    [
        ("/api/tasks/{task_id}", {"task_id": "ok"}),
        ("/api/tasks/{task_id}", {"task_id": "bad"}),
        ("/api/tasks/{task_id}", {"task_id": "running"}),
        ("/api/groups/{group_id}", {"group_id": "grp"}),
        ("/api/tasks/{task_id}/events", {"task_id": "running"}),
        ("/api/groups/{group_id}/events", {"group_id": "grp"}),
        ("/api/raw/{field}/{task_id}", {"field": "result", "task_id": "ok"}),
        ("/api/raw/{field}/{task_id}", {"field": "traceback", "task_id": "bad"}),
    ],
)
def test_stored_rows_conform(web_app: Starlette, path: str, values: dict[str, Any]) -> None:
    """Generated ids are never stored: the stored rows' documents are checked here."""
    case = schema[path]["GET"].Case(path_parameters=values)
    response = case.call_and_validate(app=web_app, checks=CHECKS)
    assert response.status_code == 200


def test_listing_pages_conform(web_app: Starlette) -> None:
    """Every page of the listing, and the stats, match the document."""
    client = TestClient(web_app)
    cursor: str | None = None
    seen: list[str] = []
    while True:
        params = {"limit": "1", **({"cursor": cursor} if cursor else {})}
        case = schema["/api/tasks"]["GET"].Case(query=params)
        body = case.call_and_validate(app=web_app, checks=CHECKS).json()
        seen += [t["task_id"] for t in body["tasks"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == ["bad", "ok", "running"]
    stats = schema["/api/stats"]["GET"].Case(query={"since": "3650d"})
    assert stats.call_and_validate(app=web_app, checks=CHECKS).json()["total"] == 2
    assert client.get("/openapi.json").json() == openapi_document()


@pytest.mark.parametrize(
    ("path", "params", "status", "word"),
    [
        # PostgreSQL text cannot hold NUL: was a 503 ("database unavailable").
        ("/api/tasks", {"name": "a\x00b"}, 400, "name"),
        ("/api/stats", {"worker": "\x00"}, 400, "worker"),
        ("/api/tasks/a%00b", {}, 400, "task_id"),
        ("/api/groups/a%00b", {}, 400, "group_id"),
        # A cursor naming an id beyond 64 bits: was a 500 on SQLite, a 503 on PostgreSQL.
        ("/api/tasks", {"cursor": encode_cursor(datetime(2030, 1, 1), 2**70)}, 400, "cursor"),
        ("/api/tasks", {"cursor": encode_cursor(datetime(2030, 1, 1), 2**40)}, 200, None),
        ("/api/tasks", {"cursor": encode_cursor(datetime(1, 1, 1), 0)}, 200, None),
        ("/api/tasks", {"cursor": "W" * 201}, 400, "cursor"),
        # What the document calls an integer, and nothing else (was: "" meant the default).
        ("/api/tasks", {"limit": ""}, 400, "limit"),
        ("/api/tasks", {"limit": "5_0"}, 400, "limit"),
        ("/api/tasks", {"limit": "9" * 5000}, 400, "limit"),
        ("/api/tasks", {"state": "SUCCESS, FAILURE"}, 400, "state"),
        ("/api/tasks", {"state": "success,FAILURE"}, 200, None),
    ],
)
def test_hostile_values(
    web_app: Starlette, path: str, params: dict[str, str], status: int, word: str | None
) -> None:
    response = TestClient(web_app, raise_server_exceptions=False).get(path, params=params)
    assert response.status_code == status, response.text
    if word is not None:
        assert response.json()["error"].startswith(word + ":")
