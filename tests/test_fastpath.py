"""The task read and write on the driver's cursor: same values, same errors, listeners respected."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from celery import Celery, states

from celery_sqlresults import fastpath
from celery_sqlresults.query import ResultQuery

from .conftest import (
    ONE_CONNECTION,
    kill_session,
    leased,
    pool_info,
    raw_engine,
    session_id,
    task_request,
)

#: The protocol on MariaDB through mysqlclient (MySQLdb) too: the fast path knows both drivers.
ALSO_ON = ["mysqlclient"]


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


def test_hot_statements_bind_only_the_row(make_app: Callable[..., Celery], db_url: str) -> None:
    """Constants (the SUCCESS guard, the notification's channel) are in the SQL text.

    Each bound constant is converted and sent on every execution.
    """
    backend = make_app(result_extended=True).backend
    fastpath._compiled.clear()
    backend.store_result("t", 1, states.SUCCESS, request=task_request())
    backend.store_result("t", 2, states.STARTED)  # refused by the guard, in the statement
    assert backend.get_task_meta("t", cache=False)["result"] == 1
    compiled = list(fastpath._compiled.values())
    assert len(compiled) >= 3  # two upserts (different columns) and the read
    for c in compiled:
        assert [name for name, value in c.defaults.items() if value is not None] == [], c.sql
    assert any("'SUCCESS'" in c.sql for c in compiled)


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
    assert leased(backend) is None  # the normal path: the kept connection went back
    assert [s.lstrip().split()[0].upper() for s in seen] in (
        ["INSERT", "SELECT"],
        ["WITH", "SELECT"],
    )


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_errors_are_sqlalchemys(make_app: Callable[..., Celery], db_url: str) -> None:
    """A dropped table reads as PENDING; a killed connection is invalidated and retried."""
    backend = make_app().backend
    backend.store_result("t", 1, states.SUCCESS)
    pid = backend.store.run(lambda c, _: session_id(c, "postgresql"), 0)
    kill_session(db_url, "postgresql", pid)
    eng = raw_engine(db_url)
    assert backend.get_task_meta("t", cache=False)["result"] == 1  # reconnected
    with eng.begin() as conn:
        conn.exec_driver_sql("DROP TABLE celery_taskmeta")
    eng.dispose()
    assert backend.get_task_meta("t", cache=False)["status"] == states.PENDING
    backend.store_result("u", 2, states.SUCCESS)  # a write recreates the table
    assert backend.get_task_meta("u", cache=False)["result"] == 2


def _kept_cursor(engine: sa.Engine) -> object:
    """The cursor the fast path keeps with the pool's (only) connection, if any."""
    kept = pool_info(engine)[1].get(fastpath._CURSOR)
    return None if kept is None else kept[1]


@pytest.mark.parametrize("db_kind", ["mysql", "mysqlclient", "sqlite"])  # PostgreSQL: libpq
def test_cursor_kept_unless_values_are_large(make_app: Callable[..., Celery], db_url: str) -> None:
    """One cursor per pooled connection is reused; a call with large values closes its own."""
    app = make_app(database_engine_options=ONE_CONNECTION)
    backend = app.backend
    backend.store_result("small", 1, states.SUCCESS)
    engine = backend.store.engine
    first = _kept_cursor(engine)
    assert first is not None
    assert backend.get_task_meta("small", cache=False)["result"] == 1
    assert _kept_cursor(engine) is first  # the same cursor served the read
    big = "x" * (fastpath._KEEP_BYTES + 1)
    backend.store_result("big", big, states.SUCCESS)
    assert _kept_cursor(engine) is None  # it held the 64 KB parameters: closed
    assert backend.get_task_meta("small", cache=False)["result"] == 1
    assert _kept_cursor(engine) is not None
    assert backend.get_task_meta("big", cache=False)["result"] == big
    assert _kept_cursor(engine) is None  # and the 64 KB row


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_autocommit_turned_off_still_commits(make_app: Callable[..., Celery], db_url: str) -> None:
    """A listener that leaves connections in a transaction gets SQLAlchemy's path, committed."""

    def transactional(engine: sa.Engine) -> None:
        def checkout(dbapi_conn: object, record: object, proxy: object) -> None:
            dbapi_conn.autocommit = False  # type: ignore[attr-defined]

        sa.event.listen(engine, "checkout", checkout)

    backend = make_app(database_engine_callback=transactional).backend
    backend.store_result("t", {"v": 1}, states.SUCCESS)
    assert backend.get_task_meta("t", cache=False)["result"] == {"v": 1}
    with raw_engine(db_url).connect() as conn:  # another session sees it: committed
        status = conn.execute(sa.text("SELECT status FROM celery_taskmeta WHERE task_id = 't'"))
        assert status.scalar() == states.SUCCESS
    pooled = backend.store.engine.raw_connection()
    try:  # and no transaction is left open on the pooled connection
        assert pooled.dbapi_connection.info.transaction_status.name == "IDLE"
    finally:
        pooled.close()


def test_a_column_dropped_behind_our_back_is_met_once(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    """A write or read whose kept layout names a column dropped since runs again on the
    tables as they are: nothing fails, and nothing waits out the retry timeout."""
    app = make_app(result_extended=True, sqlresults_retry_timeout=1)
    backend = app.backend
    backend.store_result("before", 1, states.SUCCESS, request=task_request())
    assert backend.get_task_meta("before", cache=False)["worker"] == "w1@host"  # layout kept
    eng = raw_engine(db_url)
    with eng.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE celery_taskmeta DROP COLUMN worker")
    eng.dispose()
    backend.store_result("after", 2, states.SUCCESS, request=task_request())
    meta = backend.get_task_meta("after", cache=False)
    assert (meta["result"], meta["name"], meta.get("worker")) == (2, "proj.add", None)
    assert backend.get_task_meta("before", cache=False)["result"] == 1
