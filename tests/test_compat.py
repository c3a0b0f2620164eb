"""Celery's db+ and our sql+ share tables: each reads what the other wrote."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sqlalchemy as sa
from celery import Celery
from celery.result import GroupResult

from .conftest import OTHER_SCHEMA, old_celery_tables, raw_engine, table_names
from .conftest import task_request as request


def db_plus_app(db_url: str, **conf: object) -> Celery:
    app = Celery("dbplus", set_as_current=False)
    app.conf.result_backend = "db+" + db_url
    app.conf.update(conf)
    return app


def test_sql_reads_what_db_plus_wrote(make_app: Callable[..., Celery], db_url: str) -> None:
    old = db_plus_app(db_url, result_extended=True)
    ob = old.backend
    ob.store_result("ok", {"answer": 42}, "SUCCESS", request=request())
    ob.store_result(
        "bad", ValueError("boom"), "FAILURE", traceback="Traceback: boom", request=request()
    )
    ob.store_result("run", {"pid": 7}, "STARTED", request=request())
    ob.save_group("grp", GroupResult("grp", [old.AsyncResult("ok"), old.AsyncResult("bad")]))

    new = make_app(result_extended=True)
    nb = new.backend
    ok = nb.get_task_meta("ok")
    assert (ok["status"], ok["result"]) == ("SUCCESS", {"answer": 42})
    assert ok["name"] == "proj.add" and ok["args"] == [1, 2] and ok["kwargs"] == {"k": "v"}
    assert ok["worker"] == "w1@host" and ok["retries"] == 2 and ok["queue"] == "q1"
    assert ok["date_done"] is not None
    bad = nb.get_task_meta("bad")
    assert bad["status"] == "FAILURE" and isinstance(bad["result"], ValueError)
    assert str(bad["result"]) == "boom" and bad["traceback"] == "Traceback: boom"
    assert nb.get_task_meta("run")["result"] == {"pid": 7}
    group = nb.restore_group("grp")
    assert [r.id for r in group.results] == ["ok", "bad"]
    # and keeps writing into the same rows
    nb.store_result("run", 99, "SUCCESS")
    assert ob.get_task_meta("run", cache=False)["result"] == 99


def test_db_plus_reads_what_sql_wrote(make_app: Callable[..., Celery], db_url: str) -> None:
    new = make_app(result_extended=True)
    nb = new.backend
    nb.store_result("ok", [1, "two"], "SUCCESS", request=request())
    nb.store_result("bad", KeyError("k"), "FAILURE", traceback="tb", request=request())
    nb.save_group("grp", GroupResult("grp", [new.AsyncResult("ok")]))

    old = db_plus_app(db_url, result_extended=True)
    ob = old.backend
    ok = ob.get_task_meta("ok")
    assert (ok["status"], ok["result"], ok["name"], ok["args"]) == (
        "SUCCESS",
        [1, "two"],
        "proj.add",
        [1, 2],
    )
    assert ok["date_done"] is not None
    bad = ob.get_task_meta("bad")
    assert bad["status"] == "FAILURE" and isinstance(bad["result"], KeyError)
    assert [r.id for r in ob.restore_group("grp").results] == ["ok"]
    # db+ can also insert new rows into tables we created (sequence/autoincrement match)
    ob.store_result("from-db-plus", 5, "SUCCESS")
    assert nb.get_task_meta("from-db-plus")["result"] == 5
    nb.store_result("after", 6, "SUCCESS")
    assert ob.get_task_meta("after")["result"] == 6


def test_adopts_tables_of_an_older_celery_without_new_columns(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    """Tables from Celery 5.4 (no children/stamps columns, no extended columns) keep working."""
    eng = raw_engine(db_url)
    old_celery_tables(eng, "legacy", b'"kept"')
    app = make_app(result_extended=True)
    backend = app.backend
    assert backend.get_task_meta("legacy")["result"] == "kept"
    with eng.connect() as conn:
        cols = {c["name"] for c in sa.inspect(conn).get_columns("celery_taskmeta")}
    assert {"children", "stamps", "name", "args", "kwargs", "worker", "queue"} <= cols
    backend.store_result("new", 1, "SUCCESS", request=request())
    assert backend.get_task_meta("new")["name"] == "proj.add"
    eng.dispose()


def test_custom_table_names_and_schemas(
    make_app: Callable[..., Celery], db_url: str, db_kind: str
) -> None:
    if db_kind == "sqlite":
        schemas = {}
    else:
        eng = raw_engine(db_url)
        with eng.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            word = "SCHEMA" if db_kind == "postgresql" else "DATABASE"
            conn.exec_driver_sql(f"CREATE {word} {OTHER_SCHEMA}")
        eng.dispose()
        schemas = {"task": OTHER_SCHEMA, "group": OTHER_SCHEMA}
    names = {"task": "my_results", "group": "my_groups"}
    app = make_app(database_table_names=names, database_table_schemas=schemas)
    backend = app.backend
    schema = schemas.get("task")
    assert {"my_results", "my_groups"} <= table_names(db_url, schema)
    assert not {"celery_taskmeta"} & table_names(db_url)
    backend.store_result("t", 3, "SUCCESS")
    backend.save_group("g", GroupResult("g", [app.AsyncResult("t")]))
    assert backend.get_task_meta("t")["result"] == 3
    assert backend.restore_group("g").results[0].id == "t"
    # Celery's db+ with the same settings reads it
    old = db_plus_app(db_url, database_table_names=names, database_table_schemas=schemas)
    try:
        assert old.backend.get_task_meta("t")["result"] == 3
    finally:
        # db+ configures its ORM classes globally: put them back for other tests
        from celery.backends.database.models import Task, TaskSet

        Task.configure()
        TaskSet.configure()


@pytest.mark.parametrize("db_kind", ["mysql"])
def test_results_over_64kb_fit_in_tables_we_create_on_mysql(
    make_app: Callable[..., Celery],
) -> None:
    backend = make_app().backend
    big = "x" * 200_000
    backend.store_result("big", big, "SUCCESS")
    assert backend.get_task_meta("big")["result"] == big


@pytest.mark.parametrize("db_kind", ["postgresql", "mysql", "sqlite"])
def test_tables_whose_id_auto_increments_are_written_correctly(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    """Tables from other tools or SQLAlchemy versions: SERIAL / AUTO_INCREMENT ids, no sequence."""
    eng = raw_engine(db_url)
    md = sa.MetaData()
    sa.Table(
        "celery_taskmeta",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("task_id", sa.String(155), unique=True),
        sa.Column("status", sa.String(50)),
        sa.Column("result", sa.LargeBinary),
        sa.Column("date_done", sa.DateTime),
        sa.Column("traceback", sa.Text),
    )
    sa.Table(
        "celery_tasksetmeta",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("taskset_id", sa.String(155), unique=True),
        sa.Column("result", sa.LargeBinary),
        sa.Column("date_done", sa.DateTime),
    )
    md.create_all(eng)
    with eng.connect() as conn:
        seqs = sa.inspect(conn).get_sequence_names() if eng.dialect.supports_sequences else []
    assert "task_id_sequence" not in seqs
    eng.dispose()
    app = make_app()
    backend = app.backend
    backend.store_result("a", 1, "SUCCESS")
    backend.store_result("b", 2, "SUCCESS")
    backend.save_group("g", GroupResult("g", [app.AsyncResult("a")]))
    assert backend.get_task_meta("b")["result"] == 2
    assert backend.restore_group("g").results[0].id == "a"
