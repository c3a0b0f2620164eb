"""The task read and write on psycopg's cursor: same results, same errors, listeners respected."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sqlalchemy as sa
from celery import Celery, states

from celery_sqlresults import fastpath

from .conftest import raw_engine

pytestmark = pytest.mark.parametrize("db_kind", ["postgresql"])


def test_hot_path_runs_on_the_cursor(make_app: Callable[..., Celery], db_url: str) -> None:
    backend = make_app(result_extended=True).backend
    fastpath._compiled.clear()
    backend.store_result("t", {"x": [1, "é"]}, states.SUCCESS)
    meta = backend.get_task_meta("t", cache=False)
    assert (meta["status"], meta["result"]) == (states.SUCCESS, {"x": [1, "é"]})
    assert meta["date_done"] is not None
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
