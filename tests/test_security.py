"""Hostile values and credentials: values round-trip byte for byte; passwords never leak."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from types import SimpleNamespace

import pytest
from celery import Celery, states
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import make_url

from celery_sqlresults import DatabaseUnavailable, ResultQuery
from celery_sqlresults.cli import results
from celery_sqlresults.startup import ensure_schema

from .conftest import task_request as request

# Text a task id or name may hold: anything but NUL (PostgreSQL text refuses NUL),
# within Celery's 155-character columns.
ids = st.text(st.characters(blacklist_characters="\x00", codec="utf-8"), min_size=1, max_size=60)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=200),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=20), inner, max_size=5)
    ),
    max_leaves=20,
)
hostile = st.sampled_from(
    ["'; DROP TABLE celery_taskmeta; --", '" OR 1=1 --', "\\", "%s %(x)s ?", "ñ€😀", "\u202e"]
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    task_id=ids | hostile,
    name=ids | hostile,
    value=json_values,
    args=st.lists(json_values, max_size=3),
)
def test_values_round_trip_exactly(
    make_app: Callable[..., Celery],
    db_url: str,
    task_id: str,
    name: str,
    value: object,
    args: list[object],
) -> None:
    """Store, read, batch read, list, and ``celery results show``: byte for byte."""
    app = make_app(result_extended=True)
    backend = app.backend
    backend.forget(task_id)  # examples share the database; SUCCESS would (rightly) stay
    backend.store_result(task_id, value, states.SUCCESS, request=request(name, tuple(args)))
    meta = backend.get_task_meta(task_id, cache=False)
    assert meta["task_id"] == task_id
    assert meta["result"] == value
    assert meta["name"] == name
    assert meta["args"] == args
    got = dict(backend.get_many([task_id], max_iterations=1))
    assert list(got) == [task_id]
    # listed by its exact name (a name with * is a glob there; %, _ and ! stay literal)
    query = ResultQuery(app)
    record = query.get(task_id)
    assert record is not None and (record.name, record.result) == (name, value)
    if "*" not in name:
        listed = query.filter(name=name).limit(None).all()  # earlier examples share the table
        assert task_id in [r.task_id for r in listed]
        assert {r.name for r in listed} == {name}
    # and through the command line, as JSON
    cli = CliRunner().invoke(
        results,
        ["show", "--url", db_url, "--json", "--", task_id],  # "--": ids may start with -,
        obj=SimpleNamespace(app=app),
    )
    assert cli.exit_code == 0, cli.output
    shown = json.loads(cli.stdout)
    assert (shown["task_id"], shown["name"], shown["result"]) == (task_id, name, value)
    # nothing else in the table changed: only rows the test wrote exist
    assert backend.get_task_meta("not-written", cache=False)["status"] == states.PENDING


@pytest.mark.parametrize("db_kind", ["postgresql", "mysql"])
def test_password_never_in_logs_errors_or_repr(
    make_app: Callable[..., Celery], db_url: str, db_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cr3t-pw"
    # PostgreSQL here trusts local connections, MariaDB's root has no password:
    # the password in the URL is carried everywhere but checked nowhere, which is
    # exactly what this test needs. (MariaDB: only the unreachable case.)
    url = make_url(db_url).set(password=secret).render_as_string(hide_password=False)
    caplog.set_level(logging.DEBUG)
    if db_kind == "postgresql":
        app = make_app(url)
        backend = app.backend
        backend.store_result("t", 1, states.SUCCESS)
        assert backend.get_task_meta("t")["result"] == 1
        for text in (
            repr(backend),
            backend.as_uri(),
            repr(backend.settings),
            str(backend.settings.url),
        ):
            assert secret not in text
    down = make_url(url).set(host="127.0.0.1", port=9).render_as_string(hide_password=False)
    app = make_app(down)
    backend = app.backend
    with pytest.raises(DatabaseUnavailable) as err:
        ensure_schema(backend.store, wait=0.3)
    assert secret not in str(err.value)
    assert secret not in caplog.text
    assert "***" in caplog.text


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_password_never_in_the_web_view_or_the_cli(
    make_app: Callable[..., Celery], db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Pages, API answers, health checks and CLI errors, up and down: no password."""
    from starlette.testclient import TestClient

    from celery_sqlresults.web import create_app

    secret = "s3cr3t-pw"
    caplog.set_level(logging.DEBUG)
    url = make_url(db_url).set(password=secret).render_as_string(hide_password=False)
    down = make_url(url).set(host="127.0.0.1", port=9).render_as_string(hide_password=False)
    app = make_app(url, result_extended=True)
    app.backend.store_result("t", {"v": 1}, states.FAILURE, traceback="Traceback: boom")
    seen: list[str] = []
    for target in (app, make_app(down)):
        with TestClient(create_app(target), base_url="http://localhost") as client:
            for path in ("/", "/api/tasks", "/api/tasks/t", "/api/stats", "/healthz",
                         "/api/groups/g", "/openapi.json"):  # fmt: skip
                response = client.get(path)
                seen.append(f"{path} {response.status_code} {response.text}")
    for command in (["list"], ["show", "t"], ["stats"], ["current"], ["check"]):
        for target_url in (url, down):
            cli = CliRunner().invoke(
                results, [*command, "--url", target_url], obj=SimpleNamespace(app=app)
            )
            seen.append(f"{command} {cli.exit_code} {cli.output}")
    text = "\n".join(seen)
    assert " 503 " in text and " 200 " in text  # both the up and the down cases were seen
    assert "***" in caplog.text  # the down database was logged, masked
    assert secret not in text
    assert secret not in caplog.text
