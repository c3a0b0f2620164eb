"""Schema creation at start-up, lazy mode, concurrency, outages and rights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from celery.result import GroupResult
from sqlalchemy.engine import make_url

from celery_sqlresults import (
    DatabaseMisconfigured,
    DatabaseUnavailable,
    SchemaMissing,
    SessionManager,
    create_tables,
)
from celery_sqlresults.startup import ensure_schema

from .conftest import (
    LIMITED,
    LIMITED_HOSTS,
    drop_limited,
    raw_engine,
    start_together,
    table_names,
)

TABLES = {
    "celery_taskmeta",
    "celery_tasksetmeta",
    "celery_sqlresults_chord",
    "celery_sqlresults_chord_part",
}


def statements_of(app: Celery) -> list[str]:
    """Record every SQL statement the backend's engine runs (via database_engine_callback)."""
    seen: list[str] = []

    def callback(engine: sa.Engine) -> None:
        sa.event.listen(engine, "before_cursor_execute", lambda c, cur, stmt, *a: seen.append(stmt))

    app.conf.database_engine_callback = callback
    return seen


def test_tables_exist_as_soon_as_backend_is_constructed(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    assert not TABLES & table_names(db_url)
    app = make_app()
    app.backend  # noqa: B018
    assert TABLES <= table_names(db_url)


def test_ready_tables_cost_no_ddl(make_app: Callable[..., Celery], db_url: str) -> None:
    make_app().backend  # noqa: B018 - first process creates
    from celery_sqlresults import startup

    startup._ready.clear()
    app = make_app()
    seen = statements_of(app)
    app.backend  # noqa: B018
    assert seen, "the start-up check should have looked at the catalog"
    assert not [s for s in seen if s.lstrip().upper().startswith(("CREATE", "ALTER", "DROP"))]


def test_lazy_mode_runs_no_ddl_and_first_write_creates(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    app = make_app(database_create_tables_on_startup=False)
    seen = statements_of(app)
    backend = app.backend
    assert seen == []
    assert not TABLES & table_names(db_url)
    # reads before any table exists: no error
    assert backend.get_task_meta("nope")["status"] == "PENDING"
    assert app.AsyncResult("nope").state == "PENDING"
    assert backend.restore_group("no-group") is None
    assert GroupResult.restore("no-group", app=app) is None
    assert backend.task_result_exists("nope") is False
    assert list(backend.get_many(["nope"], timeout=None, max_iterations=1)) == []
    backend.forget("nope")
    backend.delete_group("no-group")
    backend.cleanup()
    assert not TABLES & table_names(db_url)
    # the first write creates the schema
    backend.store_result("t1", 41, "SUCCESS")
    assert TABLES <= table_names(db_url)
    assert backend.get_task_meta("t1")["result"] == 41


def test_celery_setting_is_honoured(make_app: Callable[..., Celery], db_url: str) -> None:
    make_app(database_create_tables_at_setup=False).backend  # noqa: B018
    assert not TABLES & table_names(db_url)


def test_reads_survive_tables_dropped_behind_our_back(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    app = make_app()
    backend = app.backend
    backend.store_result("t1", 1, "SUCCESS")
    backend.save_group("g1", GroupResult("g1", [app.AsyncResult("t1")]))
    eng = raw_engine(db_url)
    with eng.begin() as conn:
        conn.exec_driver_sql("DROP TABLE celery_taskmeta")
        conn.exec_driver_sql("DROP TABLE celery_tasksetmeta")
    eng.dispose()
    assert backend.get_task_meta("t1", cache=False)["status"] == "PENDING"
    assert backend.get_group_meta("g1", cache=False) is None
    # and a write puts the schema back
    backend.store_result("t2", 2, "SUCCESS")
    assert backend.get_task_meta("t2")["result"] == 2


def test_eight_processes_start_at_once_on_an_empty_database(db_url: str, tmp_path: Path) -> None:
    start_together(db_url, tmp_path, 8)
    eng = raw_engine(db_url)
    with eng.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM celery_taskmeta").scalar() == 8
    eng.dispose()


def test_unreachable_database_is_retried_then_reported_with_masked_url() -> None:
    app = Celery("down", set_as_current=False)
    app.conf.result_backend = "sql+postgresql+psycopg://user:hunter2@127.0.0.1:9/nowhere"
    backend = app.backend  # a reading process must not crash here
    with pytest.raises(DatabaseUnavailable) as err:
        ensure_schema(backend.store, wait=1.0)
    message = str(err.value)
    assert "hunter2" not in message
    assert "user:***@127.0.0.1:9/nowhere" in message
    assert "sqlresults_startup_timeout" in message
    attempts = int(message.split(" after ")[1].split(" attempt")[0])
    assert attempts > 1, "it should have retried with backoff"
    assert "hunter2" not in backend.as_uri()


def refused_url(db_url: str, db_kind: str, what: str) -> str:
    """A URL to the test's server that the server refuses for good: no such ``what``."""
    url = make_url(db_url)
    if db_kind == "sqlite":
        return f"sqlite:///{Path(url.database or '').parent / 'no-such-dir' / 'results.db'}"
    if what == "database":
        return url.set(database="sqlr_no_such_database").render_as_string(hide_password=False)
    if what == "user":
        return url.set(username="sqlr_no_such_user").render_as_string(hide_password=False)
    return url.set(host="no-such-host.invalid").render_as_string(hide_password=False)


@pytest.mark.parametrize("what", ["database", "user", "host"])
def test_errors_waiting_cannot_fix_are_raised_at_once(
    make_app: Callable[..., Celery], db_url: str, db_kind: str, what: str, caplog: Any
) -> None:
    if db_kind == "sqlite" and what != "database":
        pytest.skip("a SQLite URL names a file only")
    app = make_app(refused_url(db_url, db_kind, what), sqlresults_retry_timeout=30)
    with pytest.raises(DatabaseMisconfigured) as err:
        _ = app.AsyncResult("T-Unknown").state
    message = str(err.value)
    assert message.startswith("Reading the state of task T-Unknown failed")
    assert "Waiting will not fix this" in message and "result_backend" in message
    assert "\n" not in message and err.value.__suppress_context__  # one line, no chain
    assert not [r for r in caplog.records if "retry" in r.getMessage()]
    with pytest.raises(DatabaseMisconfigured):
        app.backend.store_result("t1", 1, "SUCCESS")
    with pytest.raises(DatabaseMisconfigured, match="refused the connection"):
        ensure_schema(app.backend.store, wait=30)  # a worker's start: no retry either
    assert not [r for r in caplog.records if "retry" in r.getMessage()]


def test_create_tables_helper_and_session_manager(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    app = make_app(database_create_tables_on_startup=False)
    assert set(create_tables(app)) == TABLES
    assert TABLES <= table_names(db_url)
    assert create_tables(app) == []  # idempotent

    eng = raw_engine(db_url)
    with eng.begin() as conn:
        conn.exec_driver_sql("DROP TABLE celery_taskmeta")
    eng.dispose()
    # the design note's snippet, with our import path
    session = SessionManager(app)
    engine = session.get_engine(app.backend.url)
    session.prepare_models(engine)
    assert "celery_taskmeta" in table_names(db_url)
    with session.session_factory(app.backend.url) as s:
        assert s.execute(sa.text("SELECT count(*) FROM celery_taskmeta")).scalar() == 0


# ---- least privilege -------------------------------------------------------
# Roles are server-wide: one per test database, so parallel runs don't share it.


def _limited_url(db_url: str, db_kind: str) -> str:
    admin = raw_engine(db_url)
    with admin.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        drop_limited(conn, db_kind)
        if db_kind == "postgresql":
            conn.exec_driver_sql(f"CREATE ROLE {LIMITED} LOGIN PASSWORD 'pw'")
            conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA public TO {LIMITED}")
        else:
            for host in LIMITED_HOSTS:
                conn.exec_driver_sql(f"CREATE USER '{LIMITED}'@'{host}' IDENTIFIED BY 'pw'")
    admin.dispose()
    return (
        make_url(db_url).set(username=LIMITED, password="pw").render_as_string(hide_password=False)
    )


def _grant_runtime_rights(db_url: str, db_kind: str) -> None:
    admin = raw_engine(db_url)
    with admin.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        if db_kind == "postgresql":
            conn.exec_driver_sql(
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {LIMITED}"
            )
            conn.exec_driver_sql(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {LIMITED}")
        else:
            db = make_url(db_url).database
            for host in LIMITED_HOSTS:
                conn.exec_driver_sql(
                    f"GRANT SELECT, INSERT, UPDATE, DELETE ON {db}.* TO '{LIMITED}'@'{host}'"
                )
    admin.dispose()


@pytest.mark.parametrize("db_kind", ["postgresql", "mysql"])
@pytest.mark.usefixtures("drop_limited_role")
def test_user_without_create_rights(
    make_app: Callable[..., Celery], db_url: str, db_kind: str
) -> None:
    limited = _limited_url(db_url, db_kind)
    _grant_runtime_rights(db_url, db_kind)  # on an empty database: nothing to grant on yet
    app = make_app(limited)
    backend = app.backend  # logs a warning, does not crash
    assert backend.get_task_meta("x")["status"] == "PENDING"  # reads still answer
    with pytest.raises(SchemaMissing) as err:
        backend.store_result("x", 1, "SUCCESS")
    message = str(err.value)
    assert "celery_taskmeta" in message and "celery_tasksetmeta" in message
    assert "results init" in message and "create_tables" in message
    assert "pw@" not in message

    # a privileged deploy step creates the schema; the runtime user then works, without DDL
    admin_app = make_app()
    create_tables(admin_app)
    _grant_runtime_rights(db_url, db_kind)
    from celery_sqlresults import startup

    startup._ready.clear()
    app2 = make_app(limited)
    seen = statements_of(app2)
    backend2 = app2.backend
    backend2.store_result("x", 1, "SUCCESS")
    backend2.store_result("x", 2, "STARTED")
    assert backend2.get_task_meta("x")["result"] == 1
    assert not [s for s in seen if s.lstrip().upper().startswith(("CREATE", "ALTER"))]


def test_worker_style_start_waits_for_database(
    monkeypatch: pytest.MonkeyPatch, make_app: Callable[..., Celery], db_url: str
) -> None:
    """ensure_schema retries while the database is unreachable, then succeeds."""
    app = make_app(database_create_tables_on_startup=False)
    backend = app.backend
    from celery_sqlresults import startup

    calls: list[Any] = []
    real = startup.create_schema

    def flaky(store: Any, **kwargs: Any) -> list[str]:
        calls.append(store)
        if len(calls) < 3:
            raise sa.exc.OperationalError("connect", {}, Exception("connection refused"))
        return real(store, **kwargs)

    monkeypatch.setattr(startup, "create_schema", flaky)
    ensure_schema(backend.store, wait=30)
    assert len(calls) == 3
    assert TABLES <= table_names(db_url)
