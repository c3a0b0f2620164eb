"""A fresh process's first call: nothing imported, read or started that it does not need.

Short-lived processes (one task per child, CLI calls, serverless handlers) pay
for everything the first call does; docs/growth-benchmarks.md has the figures.
These tests hold the reasons they are low without timing anything.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from celery import Celery

from celery_sqlresults import migrate
from celery_sqlresults.dialects import dialect_for
from celery_sqlresults.dialects.base import Dialect
from celery_sqlresults.schema import build_tables

from .conftest import ROOT, old_celery_tables, raw_engine, store_later
from .test_compat import db_plus_app

_FIRST_CALL = textwrap.dedent(
    """
    import json, sys
    from celery import Celery
    app = Celery("fresh", backend="sql+" + sys.argv[1], set_as_current=False)
    meta = app.backend.get_task_meta("stored")
    joined = dict(app.backend.get_many({"stored", "also"}, timeout=10))
    print(json.dumps({
        "result": meta["result"],
        "joined": sorted(joined),
        "alembic": sorted(m for m in sys.modules if m.split(".")[0] == "alembic"),
        "orm": "sqlalchemy.orm" in sys.modules,
        "listener": getattr(app.backend._waiter, "_thread", None) is not None,
    }))
    """
)


def _run(code: str, *args: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    out: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def test_importing_the_package_imports_neither_alembic_nor_the_orm() -> None:
    """Celery's CLI imports our plugin on every ``celery`` command; a worker imports the
    backend. Alembic and SQLAlchemy's ORM are for migrations and the ``db+`` look-alikes."""
    out = _run(
        "import json, sys, celery_sqlresults, celery_sqlresults.backend, celery_sqlresults.cli;"
        "print(json.dumps({'alembic': [m for m in sys.modules if m.startswith('alembic')],"
        " 'orm': 'sqlalchemy.orm' in sys.modules}))"
    )
    assert out == {"alembic": [], "orm": False}


def test_the_db_plus_look_alikes_still_import_on_first_use() -> None:
    import celery_sqlresults

    assert celery_sqlresults.SessionManager.__module__ == "celery_sqlresults.compat"
    assert celery_sqlresults.ResultQuery.__module__ == "celery_sqlresults.query"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        celery_sqlresults.nothing  # noqa: B018


def test_first_call_on_a_ready_database_needs_no_alembic(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    """A process that finds the schema at head reads the version, not the scripts; a
    join of results that are all ready starts no listener (a thread and a connection)."""
    backend = make_app().backend
    backend.store_result("stored", {"v": 1}, "SUCCESS")
    backend.store_result("also", 2, "SUCCESS")
    out = _run(_FIRST_CALL, db_url)
    assert out == {
        "result": {"v": 1},
        "joined": ["also", "stored"],
        "alembic": [],
        "orm": False,
        "listener": False,
    }


def test_the_packaged_head_is_the_scripts_head() -> None:
    """:data:`migrate.HEAD` must be bumped with each new revision."""
    assert migrate.HEAD == migrate.script().get_current_head()
    assert migrate.head() == migrate.HEAD


_OTHER_TABLES = {
    "postgresql": [
        "CREATE TABLE made_serial (id serial PRIMARY KEY, x text)",
        "CREATE TABLE made_identity (id integer GENERATED ALWAYS AS IDENTITY, y bytea)",
        'CREATE TABLE "Odd name" (id integer, z text)',
        "ALTER TABLE made_serial DROP COLUMN x",
    ],
    "mysql": [
        "CREATE TABLE made_serial (id integer AUTO_INCREMENT PRIMARY KEY, x text)",
        "CREATE TABLE made_identity (id bigint AUTO_INCREMENT PRIMARY KEY, y longblob)",
        "CREATE TABLE `Odd name` (id integer, z mediumtext)",
        "ALTER TABLE made_serial DROP COLUMN x",
    ],
}


@pytest.mark.parametrize("db_kind", ["postgresql", "mysql"])
def test_one_catalog_query_finds_what_the_inspector_finds(db_url: str, db_kind: str) -> None:
    """The dialect's own column query agrees with SQLAlchemy's inspector on the columns,
    on how ``id`` is made (Celery's sequence, ``serial``/identity/auto-increment), on
    what each column holds (MySQL) and on missing tables."""
    db_plus_app(db_url).backend.store_result("t", 1, "SUCCESS")  # Celery's own tables
    eng = raw_engine(db_url)
    with eng.begin() as conn:
        for ddl in _OTHER_TABLES[db_kind]:
            conn.exec_driver_sql(ddl)
    tables = build_tables()
    meta = sa.MetaData()
    ours = [
        tables.task,
        tables.group,
        sa.Table("made_serial", meta),
        sa.Table("made_identity", meta),
        sa.Table("Odd name", meta),
        tables.chord,  # not made by db+
    ]
    dialect = dialect_for(db_kind)
    try:
        with eng.connect() as conn:
            fast = dialect.table_columns(conn, ours)
            slow = Dialect.table_columns(dialect, conn, ours)
    finally:
        eng.dispose()
    assert [None if c is None else sorted(c) for c in fast] == [
        None if c is None else sorted(c) for c in slow
    ]
    assert fast[-1] is None and fast[0] is not None and "task_id" in fast[0]
    assert sorted(fast[2] or {}) == ["id"]  # a dropped column is not one
    seq = [None if c is None else dialect.id_from_sequence(c["id"]) for c in fast[:5]]
    assert seq == [None if c is None else dialect.id_from_sequence(c["id"]) for c in slow[:5]]
    assert seq == [True, True, False, False, True]
    for f, s in zip(fast[:5], slow[:5], strict=True):
        assert f is not None and s is not None
        capacity = {n: dialect.column_capacity(f[n].get("type")) for n in f}
        assert capacity == {n: dialect.column_capacity(s[n]["type"]) for n in s}
    if db_kind == "mysql":  # Celery's BLOB and the others' sizes are seen
        assert (fast[0] or {})["result"]["type"].upper() == "BLOB"
        assert dialect.column_capacity((fast[4] or {})["z"]["type"]) == 16_777_215


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_a_join_read_before_subscribing_still_wakes(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    """With no listener running, a join reads first; ids still pending are watched and
    read again, so a result stored meanwhile wakes it (NOTIFY, not the interval)."""
    # A URL of its own: a listener of its own, not started by an earlier test.
    backend = make_app(f"{db_url}?application_name=sqlr_fresh_{uuid.uuid4().hex[:8]}").backend
    assert backend._waiter._thread is None
    make_app().backend.store_result("r0", 0, "SUCCESS")
    store_later(make_app(), "late", 7, delay=0.3)
    joined = dict(backend.get_many({"r0", "late"}, timeout=15, interval=60))
    assert joined["late"]["result"] == 7 and joined["r0"]["result"] == 0
    assert backend._waiter._thread is not None  # it waited on a notification


#: What reading the tables' layout sends, on each database.
_CATALOG = ("pg_attribute", "information_schema", "pragma", "max_allowed_packet", "pg_class")


def _statements(app: Celery) -> list[str]:
    """Every statement the app's backend sends from now on (listeners force the normal path)."""
    seen: list[str] = []
    sa.event.listen(
        app.backend.store.engine,
        "before_cursor_execute",
        lambda conn, cursor, statement, *_: seen.append(" ".join(statement.split()).lower()),
    )
    return seen


def test_a_first_read_assumes_the_newest_layout(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    """A new process's first read and first join send no catalog query: they assume the
    tables our revisions make, which start-up has just checked."""
    make_app(result_extended=True).backend.store_result("stored", {"v": 1}, "SUCCESS")
    app = make_app(result_extended=True)
    sent = _statements(app)
    assert app.backend.get_task_meta("stored")["result"] == {"v": 1}
    assert app.backend.get_task_meta("absent")["status"] == "PENDING"
    assert dict(app.backend.get_many({"stored"}, timeout=5))["stored"]["result"] == {"v": 1}
    assert len(sent) == 3 and all("celery_taskmeta" in s for s in sent)
    assert not [s for s in sent if any(word in s for word in _CATALOG)]
    app.backend.store_result("later", 2, "SUCCESS")  # a write reflects: it needs the truth
    assert [s for s in sent if any(word in s for word in _CATALOG)]
    assert app.backend.get_task_meta("later")["result"] == 2


def test_a_first_read_of_older_tables_reflects_and_answers(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    """Tables of an older Celery, not upgraded (no start-up creation here), lack columns the
    newest layout has: the first read finds one missing, reflects, and reads what is there."""
    eng = raw_engine(db_url)
    try:
        old_celery_tables(eng, "legacy", b'"kept"')
    finally:
        eng.dispose()
    app = make_app(result_extended=True, database_create_tables_on_startup=False)
    sent = _statements(app)
    meta = app.backend.get_task_meta("legacy")
    assert (meta["status"], meta["result"], meta.get("name")) == ("SUCCESS", "kept", None)
    assert [s for s in sent if any(word in s for word in _CATALOG)]  # it did reflect
    assert dict(app.backend.get_many({"legacy"}, timeout=5))["legacy"]["result"] == "kept"
    assert app.backend.get_task_meta("absent")["status"] == "PENDING"
    fresh = make_app(result_extended=True, database_create_tables_on_startup=False)
    assert dict(fresh.backend.get_many({"legacy"}, timeout=5))["legacy"]["result"] == "kept"
