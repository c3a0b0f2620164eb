"""Versioned schema upgrades: revisions, adoption of db+ tables, start-up upgrades, CLI."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from click.testing import CliRunner, Result

from celery_sqlresults import dialects, migrate, startup
from celery_sqlresults import store as store_module
from celery_sqlresults.cli import results
from celery_sqlresults.dialects.postgresql import AUTOVACUUM
from celery_sqlresults.exceptions import ResultTooLarge
from celery_sqlresults.query import ResultQuery
from celery_sqlresults.schema import build_tables

from .conftest import OTHER_SCHEMA, raw_engine, start_together, table_names
from .conftest import task_request as request
from .test_compat import db_plus_app

HEAD = "0008"
TABLES = {
    "celery_taskmeta",
    "celery_tasksetmeta",
    "celery_sqlresults_chord",
    "celery_sqlresults_chord_part",
}
PATTERN_INDEX = "ix_celery_taskmeta_name_pattern"
SEQUENCES = ["task_id_sequence", "taskset_id_sequence"]  # MariaDB's are objects to grant on


def run(*args: str) -> Result:
    app = Celery("migrations-test", set_as_current=False)
    return CliRunner().invoke(results, list(args), obj=SimpleNamespace(app=app))


def version(db_url: str, schema: str | None = None) -> list[str]:
    prefix = f"{schema}." if schema else ""
    eng = raw_engine(db_url)
    try:
        with eng.connect() as conn:
            return list(
                conn.exec_driver_sql(
                    f"SELECT version_num FROM {prefix}celery_sqlresults_version"
                ).scalars()
            )
    finally:
        eng.dispose()


def inspected(db_url: str, read: Callable[[sa.Inspector], Any]) -> Any:
    """``read`` applied to an inspector on a fresh connection (nothing cached)."""
    eng = raw_engine(db_url)
    try:
        with eng.connect() as conn:
            return read(sa.inspect(conn))
    finally:
        eng.dispose()


def indexed(db_url: str, table: str = "celery_taskmeta", schema: str | None = None) -> set[str]:
    """First columns of the table's indexes."""
    found = inspected(db_url, lambda insp: insp.get_indexes(table, schema=schema))
    return {ix["column_names"][0] for ix in found if ix["column_names"]}


def index_names(db_url: str, table: str = "celery_taskmeta") -> set[str]:
    return {str(ix["name"]) for ix in inspected(db_url, lambda insp: insp.get_indexes(table))}


def columns(db_url: str, table: str = "celery_taskmeta") -> set[str]:
    return {c["name"] for c in inspected(db_url, lambda insp: insp.get_columns(table))}


def column_type(db_url: str, column: str, table: str = "celery_taskmeta") -> str:
    """The column's type as MySQL's catalog names it (``blob``, ``longblob``)."""
    eng = raw_engine(db_url)
    try:
        with eng.connect() as conn:
            return str(
                conn.exec_driver_sql(
                    "SELECT data_type FROM information_schema.columns WHERE table_schema = "
                    "DATABASE() AND table_name = %s AND column_name = %s",
                    (table, column),
                ).scalar()
            ).lower()
    finally:
        eng.dispose()


def count(db_url: str, table: str = "celery_taskmeta") -> int:
    eng = raw_engine(db_url)
    try:
        with eng.connect() as conn:
            return int(conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar() or 0)
    finally:
        eng.dispose()


# ---- empty database ---------------------------------------------------------
def test_empty_database_is_brought_to_head(
    make_app: Callable[..., Celery], db_url: str, db_kind: str
) -> None:
    make_app().backend  # noqa: B018
    assert TABLES <= table_names(db_url)
    assert version(db_url) == [HEAD]
    assert {"status", "name", "date_done"} <= indexed(db_url)
    assert "alembic_version" not in table_names(db_url)
    assert (PATTERN_INDEX in index_names(db_url)) == (db_kind == "postgresql")


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_name_pattern_index_serves_globs(make_app: Callable[..., Celery], db_url: str) -> None:
    assert run("upgrade", "0005", "--url", db_url).exit_code == 0
    assert PATTERN_INDEX not in index_names(db_url)
    assert run("upgrade", "--url", db_url).exit_code == 0
    assert PATTERN_INDEX in index_names(db_url)
    eng = raw_engine(db_url)
    with eng.connect() as conn:
        conn.exec_driver_sql("SET enable_seqscan = off")  # a tiny table: ask what could serve it
        plan = conn.exec_driver_sql(
            "EXPLAIN SELECT * FROM celery_taskmeta WHERE name LIKE 'proj.%%'"
        ).scalars()
        assert PATTERN_INDEX in "\n".join(plan)
    eng.dispose()
    assert run("downgrade", "0005", "--url", db_url).exit_code == 0
    assert PATTERN_INDEX not in index_names(db_url)


# ---- autovacuum on PostgreSQL (0008) ------------------------------------------------
GROWING = ("celery_taskmeta", "celery_tasksetmeta")


def reloptions(db_url: str, table: str = "celery_taskmeta") -> dict[str, str]:
    """PostgreSQL's storage settings of ``table`` (``pg_class.reloptions``)."""
    eng = raw_engine(db_url)
    try:
        with eng.connect() as conn:
            options = conn.exec_driver_sql(
                "SELECT reloptions FROM pg_class WHERE oid = to_regclass(%s)", (table,)
            ).scalar()
    finally:
        eng.dispose()
    return dict(str(o).partition("=")[::2] for o in options or ())


def definition(db_url: str, db_kind: str, table: str) -> str:
    """What the database says ``table`` is, storage settings and options included."""
    eng = raw_engine(db_url)
    try:
        with eng.connect() as conn:
            if db_kind == "sqlite":
                sql = "SELECT sql FROM sqlite_master WHERE name = ?"
                return str(conn.exec_driver_sql(sql, (table,)).scalar())
            if db_kind == "mysql":
                return str(conn.exec_driver_sql(f"SHOW CREATE TABLE {table}").all()[0][1])
            sql = "SELECT reloptions FROM pg_class WHERE oid = to_regclass(%s)"
            return str(conn.exec_driver_sql(sql, (table,)).scalar())
    finally:
        eng.dispose()


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_start_up_sets_autovacuum_on_the_growing_tables(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    """An empty database, and tables dropped behind our back and made again, get them."""
    backend = make_app().backend
    for table in GROWING:
        assert reloptions(db_url, table) == AUTOVACUUM, table
    assert reloptions(db_url, "celery_sqlresults_chord") == {}  # emptied whole: defaults do
    eng = raw_engine(db_url)
    with eng.begin() as conn:
        conn.exec_driver_sql("DROP TABLE celery_taskmeta")
    eng.dispose()
    backend.store_result("t", 1, "SUCCESS")  # puts the table back
    assert reloptions(db_url) == AUTOVACUUM
    assert backend.get_task_meta("t", cache=False)["result"] == 1


def test_upgrade_from_0007_sets_autovacuum_on_postgresql_only(
    make_app: Callable[..., Celery], db_url: str, db_kind: str
) -> None:
    assert run("upgrade", "0007", "--url", db_url).exit_code == 0
    before = {t: definition(db_url, db_kind, t) for t in TABLES}
    make_app().backend.store_result("t", 1, "SUCCESS")  # start-up upgrades
    assert version(db_url) == [HEAD]
    after = {t: definition(db_url, db_kind, t) for t in TABLES}
    if db_kind != "postgresql":
        assert after == before
        return
    assert before["celery_taskmeta"] == "None"
    for table in TABLES:
        assert reloptions(db_url, table) == (AUTOVACUUM if table in GROWING else {}), table
    assert run("downgrade", "0007", "--url", db_url).exit_code == 0
    assert {t: definition(db_url, db_kind, t) for t in TABLES} == before


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_autovacuum_settings_of_the_owner_are_kept(db_url: str) -> None:
    assert run("upgrade", "0007", "--url", db_url).exit_code == 0
    eng = raw_engine(db_url)
    with eng.begin() as conn:
        conn.exec_driver_sql(
            "ALTER TABLE celery_taskmeta"
            " SET (autovacuum_vacuum_scale_factor = 0.1, fillfactor = 90)"
        )
    eng.dispose()
    owner = {"autovacuum_vacuum_scale_factor": "0.1", "fillfactor": "90"}
    assert run("upgrade", "--url", db_url).exit_code == 0
    assert reloptions(db_url) == {**AUTOVACUUM, **owner}
    assert reloptions(db_url, "celery_tasksetmeta") == AUTOVACUUM
    assert run("downgrade", "0007", "--url", db_url).exit_code == 0
    assert reloptions(db_url) == owner
    assert reloptions(db_url, "celery_tasksetmeta") == {}


def test_head_layout_is_what_schema_py_describes(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    """The revisions and ``build_tables`` (used to repair dropped tables) must agree."""
    make_app().backend  # noqa: B018
    eng = raw_engine(db_url)
    with eng.connect() as conn:
        insp = sa.inspect(conn)
        for table in build_tables().all:
            columns = {c["name"] for c in insp.get_columns(table.name)}
            assert columns == set(table.c.keys()), table.name
            wanted = {tuple(c.name for c in ix.columns) for ix in table.indexes}
            got = {tuple(ix["column_names"]) for ix in insp.get_indexes(table.name)}
            assert wanted <= got, table.name
    eng.dispose()


def test_ready_schema_costs_one_query(make_app: Callable[..., Celery], db_url: str) -> None:
    make_app().backend  # noqa: B018
    startup._ready.clear()
    app = make_app()
    seen: list[str] = []
    app.conf.database_engine_callback = lambda engine: sa.event.listen(
        engine, "before_cursor_execute", lambda c, cur, stmt, *a: seen.append(stmt)
    )
    app.backend  # noqa: B018
    schema_work = [s for s in seen if "celery_sqlresults_version" in s or "CREATE" in s.upper()]
    assert len(schema_work) == 1 and schema_work[0].lstrip().upper().startswith("SELECT")
    catalog = ("information_schema", "pg_catalog", "sqlite_master", "PRAGMA", "SHOW ")
    assert not [s for s in seen if any(word in s for word in catalog)]


# ---- adopting Celery's db+ tables ------------------------------------------------
@pytest.mark.parametrize("extended", [True, False], ids=["extended", "plain"])
def test_adopts_tables_written_by_db_plus(
    make_app: Callable[..., Celery], db_url: str, db_kind: str, extended: bool
) -> None:
    old = db_plus_app(db_url, result_extended=extended)
    ob = old.backend
    ob.store_result("ok", {"answer": 42}, "SUCCESS", request=request())
    ob.store_result("bad", ValueError("boom"), "FAILURE", traceback="tb", request=request())
    ob.store_result("run", None, "STARTED", request=request())
    assert "celery_sqlresults_version" not in table_names(db_url)
    rows = count(db_url)

    # readable by us before adoption (lazy mode: no DDL) ...
    lazy = make_app(result_extended=extended, database_create_tables_on_startup=False).backend
    assert lazy.get_task_meta("ok")["result"] == {"answer": 42}
    assert "celery_sqlresults_version" not in table_names(db_url)

    # ... adopted in place at start-up ...
    new = make_app(result_extended=extended)
    nb = new.backend
    # MySQL: 0004 (BLOB -> LONGBLOB copies the table) waits for `celery results upgrade`.
    assert version(db_url) == ["0003" if db_kind == "mysql" else HEAD]
    assert count(db_url) == rows
    assert {"status", "name", "date_done"} <= indexed(db_url)
    # ... and after
    ok = nb.get_task_meta("ok")
    assert (ok["status"], ok["result"]) == ("SUCCESS", {"answer": 42})
    if extended:
        assert ok["name"] == "proj.add" and ok["args"] == [1, 2]
    bad = nb.get_task_meta("bad")
    assert isinstance(bad["result"], ValueError) and bad["traceback"] == "tb"
    nb.store_result("run", 7, "SUCCESS", request=request())
    nb.store_result("ours", 8, "SUCCESS", request=request())
    # db+ still reads (and writes) the adopted tables
    assert ob.get_task_meta("run", cache=False)["result"] == 7
    assert ob.get_task_meta("ours", cache=False)["result"] == 8
    assert ob.get_task_meta("ok", cache=False)["result"] == {"answer": 42}
    ob.store_result("later", 9, "SUCCESS")
    assert nb.get_task_meta("later")["result"] == 9


def test_custom_names_and_schemas_keep_the_version_beside_the_tables(
    make_app: Callable[..., Celery], db_url: str, db_kind: str
) -> None:
    schema = None
    if db_kind != "sqlite":
        schema = OTHER_SCHEMA
        eng = raw_engine(db_url)
        with eng.connect() as conn:
            word = "SCHEMA" if db_kind == "postgresql" else "DATABASE"
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
                f"CREATE {word} {schema}"
            )
        eng.dispose()
    names = {"task": "my_results", "group": "my_groups", "chord": "my_chords"}
    app = make_app(
        database_table_names=names, database_table_schemas={"task": schema, "group": schema}
    )
    app.backend  # noqa: B018
    assert {"my_results", "my_groups", "my_chords", "celery_sqlresults_version"} <= table_names(
        db_url, schema
    )
    assert version(db_url, schema) == [HEAD]
    assert {"status", "name", "date_done"} <= indexed(db_url, "my_results", schema)


# ---- upgrading ---------------------------------------------------------------------
def test_upgrade_from_0001_to_head(make_app: Callable[..., Celery], db_url: str) -> None:
    assert run("upgrade", "0001", "--url", db_url).exit_code == 0
    assert version(db_url) == ["0001"]
    assert "status" not in indexed(db_url)
    backend = make_app(database_create_tables_on_startup=False).backend
    backend.store_result("t1", 1, "SUCCESS")
    assert run("check", "--url", db_url).exit_code == 1  # behind head

    make_app().backend  # noqa: B018 - start-up upgrades
    assert version(db_url) == [HEAD]
    assert {"status", "name"} <= indexed(db_url)
    assert backend.get_task_meta("t1", cache=False)["result"] == 1

    down = run("downgrade", "0001", "--url", db_url)
    assert down.exit_code == 0, down.output
    assert f"from {HEAD} to 0001" in down.stdout
    assert "status" not in indexed(db_url)
    up = run("upgrade", "--url", db_url)
    assert up.exit_code == 0 and f"to {HEAD} (head)" in up.stdout
    assert run("upgrade", "--url", db_url).stdout.endswith(f"already at {HEAD} (head)\n")
    assert backend.get_task_meta("t1", cache=False)["result"] == 1


def test_processes_starting_together_upgrade_once(
    make_app: Callable[..., Celery], db_url: str, tmp_path: Path
) -> None:
    assert run("upgrade", "0001", "--url", db_url).exit_code == 0
    make_app(database_create_tables_on_startup=False).backend.store_result("old", "kept", "SUCCESS")
    start_together(db_url, tmp_path, 6, "old")
    assert version(db_url) == [HEAD]
    assert count(db_url) == 7
    assert {"status", "name"} <= indexed(db_url)


# ---- 0003: when a task was created and started ------------------------------------
def test_date_created_is_kept_and_date_started_follows_started(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    app = make_app(result_extended=True)
    backend = app.backend
    backend.store_result("t", None, "STARTED", request=request())
    started = ResultQuery(app).get("t")
    assert started is not None and started.date_done is None
    assert started.date_created is not None and started.date_started is not None
    assert abs(started.date_started - datetime.now(timezone.utc)) < timedelta(minutes=1)

    backend.store_result("t", None, "RETRY", request=request())
    backend.store_result("t", 3, "SUCCESS", request=request())
    done = ResultQuery(app).get("t")
    assert done is not None and done.status == "SUCCESS" and done.date_done is not None
    assert (done.date_created, done.date_started) == (started.date_created, started.date_started)
    assert backend.get_task_meta("t")["result"] == 3
    assert "date_created" not in backend.get_task_meta("t")  # not part of Celery's meta

    backend.store_result("never-started", 1, "SUCCESS", request=request())
    plain = ResultQuery(app).get("never-started")
    assert plain is not None and plain.date_created is not None and plain.date_started is None


def test_tables_before_0003_still_work(make_app: Callable[..., Celery], db_url: str) -> None:
    assert run("upgrade", "0002", "--url", db_url).exit_code == 0
    app = make_app(database_create_tables_on_startup=False, result_extended=True)
    app.backend.store_result("t", None, "STARTED", request=request())
    app.backend.store_result("t", 4, "SUCCESS", request=request())
    old = ResultQuery(app).get("t")
    assert old is not None and old.result == 4 and old.date_created is None

    make_app().backend  # noqa: B018 - start-up adds the columns
    assert version(db_url) == [HEAD]
    assert {"date_created", "date_started"} <= columns(db_url)
    fresh = make_app(result_extended=True)
    fresh.backend.store_result("u", 5, "SUCCESS", request=request())
    new = ResultQuery(fresh).get("u")
    assert new is not None and new.date_created is not None


# ---- 0004: LONGBLOB for tables adopted from db+ on MySQL ---------------------------
@pytest.mark.parametrize("db_kind", ["mysql"])
@pytest.mark.parametrize("scheme", ["mysql", "mariadb"])  # SQLAlchemy's two dialect names
def test_adopted_mysql_blobs_wait_for_the_upgrade_command(
    make_app: Callable[..., Celery],
    db_url: str,
    scheme: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = db_url.replace("mysql+", f"{scheme}+", 1)
    db_plus_app(url).backend.store_result("old", "kept", "SUCCESS")
    assert column_type(db_url, "result") == "blob"
    with caplog.at_level(logging.WARNING, logger="celery_sqlresults"):
        backend = make_app(url).backend
    assert version(db_url) == ["0003"]  # 0004 is refused, so 0005 waits behind it
    assert "revision 0004" in caplog.text and "results upgrade" in caplog.text
    big = "x" * 100_000  # over BLOB's 64 KB
    with pytest.raises(ResultTooLarge, match=r"results upgrade"):
        backend.store_result("big", big, "SUCCESS")
    check = run("check", "--url", url)
    assert check.exit_code == 1 and "run `celery results upgrade`" in check.stdout

    up = run("upgrade", "--url", url)
    assert up.exit_code == 0, up.output
    assert version(db_url) == [HEAD]
    # A running process re-reads the columns _RECHECK_AFTER seconds after it last did.
    monkeypatch.setattr(store_module, "_RECHECK_AFTER", 0.0)
    assert column_type(db_url, "result") == "longblob"
    assert column_type(db_url, "kwargs") == "longblob"
    assert column_type(db_url, "result", "celery_tasksetmeta") == "longblob"
    backend.store_result("big", big, "SUCCESS")
    assert backend.get_task_meta("big", cache=False)["result"] == big
    assert backend.get_task_meta("old", cache=False)["result"] == "kept"
    assert run("check", "--url", url).exit_code == 0


# ---- the command line ------------------------------------------------------------
def test_check_and_current(db_url: str, db_kind: str) -> None:
    empty = run("check", "--url", db_url)
    assert empty.exit_code == 1 and "missing at" in empty.stdout
    assert "run `celery results init`" in empty.stdout
    assert run("current", "--url", db_url).stdout == f"not versioned (head is {HEAD})\n"

    assert run("upgrade", "0001", "--url", db_url).exit_code == 0
    behind = run("check", "--url", db_url)
    assert behind.exit_code == 1 and f"0001 (behind head {HEAD})" in behind.stdout
    assert run("current", "--url", db_url).stdout == f"0001 (behind head {HEAD})\n"

    init = run("init", "--url", db_url)
    assert init.exit_code == 0 and f"schema revision {HEAD} (head)" in init.stdout
    ok = run("check", "--url", db_url)
    assert ok.exit_code == 0 and ok.stdout.startswith("result schema complete at ")
    assert run("current", "--url", db_url).stdout == f"{HEAD} (head)\n"

    eng = raw_engine(db_url)
    with eng.begin() as conn:
        conn.exec_driver_sql("DROP TABLE celery_sqlresults_chord")
    eng.dispose()
    gone = run("check", "--url", db_url)
    assert gone.exit_code == 1 and "missing at" in gone.stdout and "chord" in gone.stdout
    assert run("init", "--url", db_url).exit_code == 0  # repaired
    assert run("check", "--url", db_url).exit_code == 0


def test_errors_are_one_masked_line(db_url: str) -> None:
    down = "postgresql+psycopg://u:secret@127.0.0.1:9/x"
    for args in (["init"], ["check"], ["current"], ["upgrade"], ["downgrade", "base"]):
        result = run(*args, "--url", down)
        assert result.exit_code == 1, (args, result.output)
        assert result.stdout == "" and len(result.stderr.splitlines()) == 1
        assert "secret" not in result.output and "u:***@" in result.stderr
    bad = run("upgrade", "0042", "--url", db_url)
    assert bad.exit_code == 1 and len(bad.stderr.splitlines()) == 1 and "0042" in bad.stderr


def _apply(db_url: str, sql: str) -> None:
    """Feed printed SQL to the database statement by statement, as psql/mysql would."""
    lines = [line for line in sql.splitlines() if not line.startswith("--")]
    statements = [s.strip() for s in "\n".join(lines).split(";\n") if s.strip()]
    eng = raw_engine(db_url)
    with eng.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        for stmt in statements:
            conn.exec_driver_sql(stmt.rstrip(";"))
    eng.dispose()


def test_printed_sql_applies_cleanly(
    make_app: Callable[..., Celery], db_url: str, db_kind: str
) -> None:
    printed = run("init", "--sql", "--url", db_url)
    assert printed.exit_code == 0, printed.output
    sql = printed.stdout
    assert "celery_sqlresults_version" in sql and "alembic_version" not in sql
    if db_kind == "postgresql":
        assert "CREATE INDEX CONCURRENTLY" in sql
    assert not table_names(db_url), "--sql must not touch the database"
    _apply(db_url, sql)
    check = run("check", "--url", db_url)
    assert check.exit_code == 0, check.output
    if db_kind == "postgresql":
        assert reloptions(db_url) == AUTOVACUUM
    backend = make_app().backend
    backend.store_result("t", 5, "SUCCESS")
    assert backend.get_task_meta("t")["result"] == 5


def test_upgrade_and_downgrade_print_sql_from_the_current_revision(db_url: str) -> None:
    assert run("upgrade", "0001", "--url", db_url).exit_code == 0
    up = run("upgrade", "--sql", "--url", db_url)
    assert up.exit_code == 0, up.output
    assert "CREATE TABLE CELERY_TASKMETA" not in up.stdout.upper()  # only what follows 0001
    assert "CREATE TABLE CELERY_SQLRESULTS_CHORD_PART" in up.stdout.upper()
    assert version(db_url) == ["0001"], "--sql must not touch the database"
    _apply(db_url, up.stdout)
    assert version(db_url) == [HEAD]
    assert {"status", "name"} <= indexed(db_url)
    assert {"date_created", "date_started"} <= columns(db_url)
    assert run("check", "--url", db_url).exit_code == 0

    down = run("downgrade", "--sql", "0001", "--url", db_url)
    assert down.exit_code == 0, down.output
    assert version(db_url) == [HEAD]
    _apply(db_url, down.stdout)
    assert version(db_url) == ["0001"]
    assert "status" not in indexed(db_url) and "date_created" not in columns(db_url)
    assert "celery_sqlresults_chord_part" not in table_names(db_url)


def test_printed_upgrade_sql_refuses_db_plus_tables(db_url: str) -> None:
    db_plus_app(db_url).backend.store_result("old", 1, "SUCCESS")
    refused = run("upgrade", "--sql", "--url", db_url)
    assert refused.exit_code == 1 and "cannot adopt" in refused.stderr
    assert "results init" in refused.stderr and "celery_sqlresults_version" not in table_names(
        db_url
    )


def test_applications_alembic_version_is_untouched(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    eng = raw_engine(db_url)
    with eng.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        conn.exec_driver_sql("INSERT INTO alembic_version VALUES ('app_rev_42')")
    make_app().backend  # noqa: B018
    assert run("downgrade", "0001", "--url", db_url).exit_code == 0
    assert run("upgrade", "--url", db_url).exit_code == 0
    with eng.connect() as conn:
        rows = conn.exec_driver_sql("SELECT version_num FROM alembic_version").all()
    eng.dispose()
    assert [tuple(r) for r in rows] == [("app_rev_42",)]
    assert version(db_url) == [HEAD]


# ---- versions this package does not know -------------------------------------------
def test_database_newer_than_the_package(
    make_app: Callable[..., Celery], db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    make_app().backend.store_result("t", 1, "SUCCESS")
    eng = raw_engine(db_url)
    with eng.begin() as conn:
        conn.exec_driver_sql("UPDATE celery_sqlresults_version SET version_num = '0099'")
    eng.dispose()
    startup._ready.clear()
    with caplog.at_level(logging.WARNING, logger="celery_sqlresults"):
        backend = make_app().backend
    assert "revision 0099, newer than this celery-sqlresults knows" in caplog.text
    assert backend.get_task_meta("t")["result"] == 1  # reads keep working
    backend.store_result("u", 2, "SUCCESS")
    assert version(db_url) == ["0099"]
    check = run("check", "--url", db_url)
    assert check.exit_code == 0 and "newer than this celery-sqlresults" in check.stdout
    assert "0099 (newer" in run("current", "--url", db_url).stdout
    for args in (["upgrade"], ["downgrade", "0001"]):
        refused = run(*args, "--url", db_url)
        assert refused.exit_code == 1 and "0099" in refused.stderr
    assert version(db_url) == ["0099"]


_NOT_ADDITIVE = '''
"""A destructive step, for the test.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None
additive = False


def upgrade() -> None:
    op.create_table("destructive_marker", sa.Column("x", sa.Integer))


def downgrade() -> None:
    op.drop_table("destructive_marker")
'''


@pytest.mark.parametrize("db_kind", ["sqlite", "postgresql"])
def test_start_up_refuses_a_revision_that_is_not_additive(
    make_app: Callable[..., Celery],
    db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    scripts = tmp_path / "migrations"
    shutil.copytree(Path(migrate.__file__).parent / "migrations", scripts)
    (scripts / "versions" / "0009_destructive.py").write_text(_NOT_ADDITIVE)
    monkeypatch.setattr(migrate, "SCRIPT_LOCATION", str(scripts))
    with caplog.at_level(logging.WARNING, logger="celery_sqlresults"):
        backend = make_app().backend
    assert version(db_url) == [HEAD]
    assert "revision 0009" in caplog.text and "results upgrade" in caplog.text
    assert "destructive_marker" not in table_names(db_url)
    backend.store_result("t", 1, "SUCCESS")  # the tables work at the revision before
    assert run("check", "--url", db_url).exit_code == 1
    assert run("upgrade", "--url", db_url).exit_code == 0
    assert version(db_url) == ["0009"] and "destructive_marker" in table_names(db_url)


@pytest.mark.parametrize("db_kind", ["postgresql", "mysql"])
@pytest.mark.usefixtures("drop_limited_role")
def test_runtime_user_who_may_not_read_the_version_table(
    make_app: Callable[..., Celery], db_url: str, db_kind: str
) -> None:
    from .conftest import LIMITED
    from .test_startup import _limited_url

    limited = _limited_url(db_url, db_kind)
    make_app().backend  # noqa: B018 - a privileged deploy step
    eng = raw_engine(db_url)
    with eng.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        objects = sorted(TABLES) + ([] if db_kind == "postgresql" else SEQUENCES)
        for table in objects:
            rights = "SELECT, INSERT, UPDATE, DELETE"
            if db_kind == "postgresql":
                conn.exec_driver_sql(f"GRANT {rights} ON {table} TO {LIMITED}")
            else:
                db = sa.engine.make_url(db_url).database
                for host in ("localhost", "127.0.0.1"):
                    conn.exec_driver_sql(f"GRANT {rights} ON {db}.{table} TO '{LIMITED}'@'{host}'")
        if db_kind == "postgresql":
            conn.exec_driver_sql(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {LIMITED}")
    eng.dispose()
    startup._ready.clear()
    backend = make_app(limited).backend
    startup.ensure_schema(backend.store, wait=0)  # what a starting worker runs: no error
    backend.store_result("t", 1, "SUCCESS")
    assert backend.get_task_meta("t")["result"] == 1


@pytest.mark.parametrize("db_kind", ["postgresql", "mysql"])
def test_start_up_waits_for_a_long_upgrade_then_uses_the_tables(
    make_app: Callable[..., Celery],
    db_url: str,
    db_kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another process holds the schema lock (say, building an index on a big table)."""
    assert run("upgrade", "0001", "--url", db_url).exit_code == 0
    eng = raw_engine(db_url)
    with eng.connect() as holder:
        holder = holder.execution_options(isolation_level="AUTOCOMMIT")
        if db_kind == "postgresql":
            key = dialects.postgresql.SCHEMA_LOCK_KEY
            holder.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        else:
            name = dialects.mysql.SCHEMA_LOCK_NAME
            holder.execute(sa.text("SELECT GET_LOCK(:n, 1)"), {"n": name})
        startup._ready.clear()
        with caplog.at_level(logging.WARNING, logger="celery_sqlresults"):
            backend = make_app(sqlresults_schema_lock_timeout=1).backend
        assert "another process is changing the result schema" in caplog.text
        backend.store_result("t", 1, "SUCCESS")  # the tables at 0001 serve meanwhile
        assert backend.get_task_meta("t")["result"] == 1
        assert version(db_url) == ["0001"]
    eng.dispose()
    startup._ready.clear()
    make_app().backend  # noqa: B018 - the lock is free: the next start upgrades
    assert version(db_url) == [HEAD]
