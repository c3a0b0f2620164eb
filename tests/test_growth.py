"""Costs that must not grow with the table: a join reads its ids, not the whole table.

docs/growth.md has the figures; these tests hold the plans, not the times.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from celery import Celery

from .conftest import raw_engine

_EXPLAIN = {"sqlite": "EXPLAIN QUERY PLAN ", "postgresql": "EXPLAIN ", "mysql": "EXPLAIN "}


def test_a_join_reads_by_id_not_by_state(
    make_app: Callable[..., Celery], db_url: str, db_kind: str
) -> None:
    """The ready-rows read of ``get_many`` goes by the ``task_id`` index on every database,
    as the driver receives it; SQLite's and MariaDB's planners took the ``status`` index
    (every finished row) before."""
    backend = make_app().backend
    for n in range(1000):  # a join of many ids: SQLite then preferred the state index
        backend.store_result(f"t{n}", n, "SUCCESS")
    seen: list[tuple[str, Any]] = []

    def capture(conn: object, cursor: object, statement: str, params: Any, *_: object) -> None:
        if "celery_taskmeta" in statement and statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, params))

    engine = backend.store.engine
    sa.event.listen(engine, "before_cursor_execute", capture)  # the normal path, seen
    ids = {f"t{n}" for n in range(1000)}
    try:
        got = dict(backend.get_many(set(ids), timeout=5))
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
    assert set(got) == ids
    statement, params = seen[0]
    eng = raw_engine(db_url)
    try:
        with eng.connect() as conn:
            if db_kind == "postgresql":
                conn.exec_driver_sql("ANALYZE celery_taskmeta")
            rows = conn.exec_driver_sql(_EXPLAIN[db_kind] + statement, params).all()
    finally:
        eng.dispose()
    plan = " ".join(" ".join(str(v) for v in row) for row in rows)
    assert "ix_celery_taskmeta_status" not in plan, plan
    assert "task_id" in plan or "autoindex_celery_taskmeta" in plan, plan


def test_a_join_on_postgresql_is_one_statement_for_any_number_of_ids(
    make_app: Callable[..., Celery], db_kind: str
) -> None:
    """The ids go as one array (``= ANY``): the server parses and plans one parameter, and
    joins of different sizes share one statement (and its preparation)."""
    backend = make_app().backend
    for n in range(700):
        backend.store_result(f"t{n}", n, "SUCCESS")
    seen: list[str] = []

    def capture(conn: object, cursor: object, statement: str, *_: object) -> None:
        if "celery_taskmeta" in statement and statement.lstrip().upper().startswith("SELECT"):
            seen.append(statement)

    engine = backend.store.engine
    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        small = dict(backend.get_many({f"t{n}" for n in range(3)}, timeout=5))
        large = dict(backend.get_many({f"t{n}" for n in range(700)}, timeout=5))
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
    assert (len(small), len(large)) == (3, 700)
    assert large["t699"]["result"] == 699
    if db_kind == "postgresql":
        assert len(set(seen)) == 1, seen
        assert "ANY" in seen[0]
    else:  # an IN list, rendered for its length
        assert len(set(seen)) == 2
