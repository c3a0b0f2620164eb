"""The task read and write on the driver's cursor: same values, same errors, listeners respected."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from celery import Celery, states

from celery_sqlresults import fastpath
from celery_sqlresults.query import ResultQuery

from .conftest import raw_engine, task_request


def test_hot_path_runs_on_the_cursor(make_app: Callable[..., Celery], db_url: str) -> None:
    app = make_app(result_extended=True)
    backend = app.backend
    fastpath._compiled.clear()
    backend.store_result("t", {"x": [1, "é"]}, states.SUCCESS, request=task_request())
    meta = backend.get_task_meta("t", cache=False)
    assert (meta["status"], meta["result"]) == (states.SUCCESS, {"x": [1, "é"]})
    assert (meta["name"], meta["args"], meta["kwargs"]) == ("proj.add", [1, 2], {"k": "v"})
    assert isinstance(meta["date_done"], datetime)  # SQLite's text converted as SQLAlchemy would
    assert abs(meta["date_done"] - datetime.now(timezone.utc)) < timedelta(minutes=1)
    record = ResultQuery(app).get("t")  # the date columns, read the ordinary way
    assert record is not None and record.date_created is not None
    sql = [c.sql for c in fastpath._compiled.values()]
    assert any(s.lstrip().startswith(("INSERT", "WITH")) for s in sql)  # the upsert
    assert any(s.lstrip().startswith("SELECT") for s in sql)  # the read


def test_listeners_see_every_statement(make_app: Callable[..., Celery], db_url: str) -> None:
    """Instrumentation (tracing, statement counters) makes the hot path use execute()."""
    backend = make_app().backend
    backend.store_result("warm", 0, states.SUCCESS)  # reflection and the listener's set-up
    backend.get_task_meta("warm", cache=False)
    seen: list[str] = []
    sa.event.listen(
        backend.store.engine, "before_cursor_execute", lambda c, cur, s, *a: seen.append(s)
    )
    backend.store_result("t", 1, states.SUCCESS)
    assert backend.get_task_meta("t", cache=False)["result"] == 1
    assert [s.lstrip().split()[0].upper() for s in seen] in (
        ["INSERT", "SELECT"],
        ["WITH", "SELECT"],
    )


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_errors_are_sqlalchemys(make_app: Callable[..., Celery], db_url: str) -> None:
    """A dropped table reads as PENDING; a killed connection is invalidated and retried."""
    backend = make_app().backend
    backend.store_result("t", 1, states.SUCCESS)
    pid = backend.store.run(lambda c, _: c.exec_driver_sql("SELECT pg_backend_pid()").scalar(), 0)
    eng = raw_engine(db_url)
    with eng.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    assert backend.get_task_meta("t", cache=False)["result"] == 1  # reconnected
    with eng.begin() as conn:
        conn.exec_driver_sql("DROP TABLE celery_taskmeta")
    eng.dispose()
    assert backend.get_task_meta("t", cache=False)["status"] == states.PENDING
    backend.store_result("u", 2, states.SUCCESS)  # a write recreates the table
    assert backend.get_task_meta("u", cache=False)["result"] == 2
