"""Creating the schema at start-up: once per process, under the database's lock.

Three entry points:

* :func:`ensure_schema` — what the backend runs when it is constructed and
  what a worker/beat runs while starting (:mod:`celery_sqlresults.hooks`).
  Costs one query (the version table) when the schema is at head.
* :func:`create_schema` — brings the schema to head with the migration
  scripts (additive revisions only), serialised across processes and hosts
  with the database's own lock; also what lazy mode runs on first write.
* :func:`wait_for_database` — bounded retry with backoff while the database
  is unreachable, ending in an error that shows the masked URL.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from . import migrate
from .exceptions import (
    DatabaseMisconfigured,
    DatabaseUnavailable,
    SchemaMissing,
    SQLResultsError,
    one_line,
)
from .store import Store

__all__ = [
    "create_schema",
    "downgrade_schema",
    "ensure_schema",
    "try_schema",
    "upgrade_schema",
    "wait_for_database",
]

logger = logging.getLogger("celery_sqlresults")

#: Table sets known to be ready, per engine: a new engine (another process, a replaced
#: SQLite file) is a database to check again.
_ready: weakref.WeakKeyDictionary[Engine, set[str]] = weakref.WeakKeyDictionary()
_ready_lock = threading.Lock()


def _target(store: Store) -> str:
    return ",".join(store.tables.fullnames)


def create_schema(store: Store, trust_version: bool = False) -> list[str]:
    """Bring the schema to the newest revision; return the names of the tables created.

    ``trust_version`` is start-up's fast path: a version table at head means
    done (one query). Without it the tables themselves are checked too, which
    is what a write that found a table missing needs.

    Checks first without a lock (the common case: nothing to do), then takes
    the database's schema lock and runs the pending revisions (see
    :mod:`celery_sqlresults.migrate`), so any number of processes starting
    together change each object exactly once. Only revisions marked additive
    run here; one that is not is refused with a warning naming the command
    that runs it. Tables missing although the version says head (dropped
    behind our back) are created again.

    Without the rights to change the schema: if the tables exist, a warning
    and the backend carries on with the columns there are; if they do not,
    :class:`SchemaMissing` saying how to create them.
    """
    with store.connect() as conn:
        if _up_to_date(store, conn, trust_version):
            return []
    try:
        with migrate.locked(store) as conn:
            missing = store.missing_tables(conn)
            before, refused = migrate.upgrade_locked(store, conn, only_additive=True)
            store.forget_layout()
            if migrate.locked_status(store, conn).at_head:
                _repair(store, conn)
            created = [t.fullname for t in missing if t not in store.missing_tables(conn)]
    except TimeoutError as exc:
        # Another process holds the lock for longer than we wait: an upgrade in
        # progress (an index built CONCURRENTLY on a big table takes minutes).
        # Celery's tables, if they exist, serve meanwhile (tables of ours that the
        # upgrade has yet to add degrade: chords count without de-duplication).
        store.forget_layout()
        with store.connect() as conn:
            missing = store.missing_tables(conn)
        if store.tables.task in missing or store.tables.group in missing:
            raise
        logger.warning(
            "celery-sqlresults: %s at %s; another process is changing the result schema, "
            "carrying on with the tables as they are",
            exc,
            store.settings.masked_url,
        )
        return []
    except DBAPIError as exc:
        store.forget_layout()
        with store.connect() as conn:
            still = store.missing_tables(conn)
        if still:
            raise SchemaMissing(_no_rights_message(store, still, exc)) from None
        logger.warning(
            "celery-sqlresults: could not upgrade the result schema at %s (%s); continuing "
            "with the existing tables. Run `celery -A proj results upgrade` as a user with "
            "CREATE/ALTER rights.",
            store.settings.masked_url,
            one_line(exc, store.settings.url),
        )
        return []
    finally:
        store.forget_layout()
    _warn_if_newer(store, before)
    if refused is not None:
        logger.warning(
            "celery-sqlresults: schema revision %s (%s) at %s is not additive and is not run "
            "at start-up: run `celery -A proj results upgrade` in a maintenance window.",
            refused.revision,
            refused.doc,
            store.settings.masked_url,
        )
    if created:
        logger.info(
            "celery-sqlresults: created %s at %s", ", ".join(created), store.settings.masked_url
        )
    return created


def upgrade_schema(store: Store, target: str = "heads") -> tuple[migrate.Status, migrate.Status]:
    """``celery results init/upgrade``: every revision up to ``target``, additive or not.

    Errors are raised, not logged. Returns the status before and after.
    """
    with migrate.locked(store) as conn:
        before, _ = migrate.upgrade_locked(store, conn, target)
        if before.newer:
            raise SchemaMissing(
                f"the result schema at {store.settings.masked_url} is at revision "
                f"{before.current}, newer than this celery-sqlresults knows (head "
                f"{before.head}): upgrade celery-sqlresults"
            )
        store.forget_layout()
        after = migrate.locked_status(store, conn)
        if after.at_head:
            _repair(store, conn)
    store.forget_layout()
    return before, after


def downgrade_schema(store: Store, target: str) -> tuple[migrate.Status, migrate.Status]:
    """``celery results downgrade``: undo revisions down to ``target`` (``base``: all)."""
    with migrate.locked(store) as conn:
        before = migrate.downgrade_locked(store, conn, target)
        after = migrate.locked_status(store, conn)
    store.forget_layout()
    return before, after


def _up_to_date(store: Store, conn: sa.Connection, trust_version: bool) -> bool:
    """The check before taking any lock: is there nothing to do?

    Behind head: no. At head (or newer than this package, warned about):
    yes if ``trust_version``, else only if no table or column is missing.
    Version table unreadable (a runtime user without rights on it): the
    tables decide.
    """
    current = _status(store, conn)
    if current is not None and not (current.at_head or current.newer):
        return False
    if not (current is not None and trust_version) and _needs_ddl(store, conn):
        return False
    if current is not None:
        _warn_if_newer(store, current)
    return True


def _status(store: Store, conn: sa.Connection) -> migrate.Status | None:
    """The schema revision, or ``None`` when this user may not read the version table.

    A runtime user granted rights on the result tables only still starts:
    the tables themselves are checked instead. A lost connection is raised.
    """
    try:
        return migrate.status(store, conn)
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise
        logger.debug(
            "celery-sqlresults: version table not readable: %s", one_line(exc, store.settings.url)
        )
        return None


def _warn_if_newer(store: Store, current: migrate.Status) -> None:
    if current.newer:
        logger.warning(
            "celery-sqlresults: the result schema at %s is at revision %s, newer than this "
            "celery-sqlresults knows (head %s); leaving it alone. Upgrade celery-sqlresults.",
            store.settings.masked_url,
            current.current,
            current.head,
        )


def ensure_schema(store: Store, wait: float | None = None) -> None:
    """Make sure the schema exists, once per process and target.

    ``wait`` bounds how long an unreachable database is retried (default:
    ``sqlresults_startup_timeout``).
    """
    key = _target(store)
    engine = store.engine
    if key in _ready.get(engine, ()):
        return
    with _ready_lock:
        if key in _ready.get(engine, ()):
            return
        wait_for_database(store, store.settings.startup_timeout if wait is None else wait)
        _ready.setdefault(store.engine, set()).add(key)


def try_schema(store: Store) -> None:
    """:func:`ensure_schema` without waiting; a failure is logged, not raised.

    What constructing a backend runs, and what a store runs on a database it
    finds replaced: a process that only reads must not die here; workers and
    beat retry (bounded) and fail loudly while starting.
    """
    try:
        ensure_schema(store, wait=0)
    except (SQLResultsError, DBAPIError) as exc:
        logger.warning("celery-sqlresults: schema not checked yet: %s", exc)


def wait_for_database(store: Store, wait: float) -> None:
    """Run :func:`create_schema`, retrying with backoff for up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    delay = 0.1
    attempt = 0
    while True:
        attempt += 1
        try:
            create_schema(store, trust_version=True)
            return
        except (OperationalError, TimeoutError) as exc:
            reason = one_line(exc, store.settings.url)
            fix = store.dialect.permanent_error_fix(exc)
            if fix is not None:
                raise DatabaseMisconfigured(
                    f"the result database {store.settings.masked_url} refused the connection: "
                    f"{reason}. Waiting will not fix this: {fix}."
                ) from None
            left = deadline - time.monotonic()
            if left <= 0:
                raise DatabaseUnavailable(
                    f"result database {store.settings.masked_url} unreachable after "
                    f"{attempt} attempt(s) in {wait:.0f}s: {reason}. Start the database or "
                    "fix result_backend; raise sqlresults_startup_timeout to wait longer."
                ) from None
            logger.warning(
                "celery-sqlresults: result database %s not reachable (%s); retrying in %.1fs",
                store.settings.masked_url,
                reason,
                min(delay, left),
            )
            time.sleep(min(delay, left))
            delay = min(delay * 2, 5.0)


def _needs_ddl(store: Store, conn: sa.Connection) -> bool:
    layout = store.layout(conn)
    return (
        layout is None
        or not (layout.has_chord and layout.has_chord_part and layout.has_part_index)
        or bool(store.missing_columns(layout))
    )


def _repair(store: Store, conn: sa.Connection) -> None:
    """At head, yet tables or columns are missing (dropped behind our back): put them back."""
    missing = store.missing_tables(conn)
    if missing:
        store.tables.metadata.create_all(conn, tables=missing, checkfirst=True)
        for table in store.tables.growing:
            if table in missing:  # as revision 0008 left them
                for statement in store.dialect.storage_statements(conn, table):
                    conn.execute(statement)
    _add_missing_columns(store, conn)


def _add_missing_columns(store: Store, conn: sa.Connection) -> None:
    """Adopt tables from older Celery versions: add the nullable columns they lack.

    Without ALTER rights we log and carry on: the backend then reads and
    writes only the columns that exist.
    """
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    store.forget_layout()
    layout = store.layout(conn)
    if layout is None:
        return
    missing = store.missing_columns(layout)
    if not missing:
        return
    ops = Operations(MigrationContext.configure(conn))
    for table, column in missing:
        try:
            ops.add_column(table.name, column._copy(), schema=table.schema)
        except DBAPIError as exc:
            logger.warning(
                "celery-sqlresults: could not add column %s.%s (%s); continuing without it",
                table.fullname,
                column.name,
                one_line(exc, store.settings.url),
            )
            return
    store.forget_layout()


def _no_rights_message(store: Store, missing: list[sa.Table], exc: DBAPIError) -> str:
    names = ", ".join(t.fullname for t in missing) or "(columns only)"
    return (
        f"result tables {names} are missing at {store.settings.masked_url} and could not be "
        f"created: {one_line(exc, store.settings.url)}. Create them once as a user with "
        "CREATE rights: "
        "`celery -A proj results init` (or `celery_sqlresults.create_tables(app)`), "
        "or grant CREATE to this user."
    )
