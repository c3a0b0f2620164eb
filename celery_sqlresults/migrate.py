"""Schema revisions: Alembic, configured in code, on our own version table.

The scripts live in :mod:`celery_sqlresults.migrations` and ship with the
package; nobody needs an ``alembic.ini``. The revision is stored in
``celery_sqlresults_version`` (``database_table_names["version"]``, in the
task table's schema), never in ``alembic_version``, so an application's own
Alembic history is left alone. Table names and schemas come from the
backend's settings and reach the scripts through ``config.attributes``.

Every change runs under the database's schema lock (:func:`locked`), so any
number of processes may upgrade at once: the first does the work, the others
find the database at the revision they wanted.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from .schema import Tables
from .store import Store

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import Script, ScriptDirectory

__all__ = [
    "HEAD",
    "PACKAGED",
    "SCRIPT_LOCATION",
    "Status",
    "head",
    "locked",
    "read_version",
    "status",
]

#: The scripts this package ships (an ``importlib.resources`` location).
PACKAGED = "celery_sqlresults:migrations"
#: Where the revision scripts are read from (the tests point it elsewhere).
SCRIPT_LOCATION = PACKAGED

#: The newest revision in ``migrations/versions/``: start-up compares the database's
#: with it without reading the scripts. Bump it with each new revision (a test checks it).
HEAD = "0008"

# Alembic is imported where it is used, never at import time: a process that
# finds the schema at head (every start but the first) never needs it, and
# importing it and reading the scripts would be a large share of a short-lived
# process's first call (docs/growth-benchmarks.md).


@dataclass(frozen=True)
class Status:
    """Where a database's schema is, relative to what this package ships."""

    current: str | None  # None: no version recorded (empty database, or tables from db+)
    head: str

    @property
    def known(self) -> bool:
        """False when the database is at a revision this package does not ship (newer)."""
        return self.current is None or self.current == self.head or _known(self.current)

    @property
    def at_head(self) -> bool:
        return self.current == self.head

    @property
    def newer(self) -> bool:
        return not self.known

    @property
    def behind(self) -> bool:
        return self.known and not self.at_head

    def describe(self) -> str:
        if self.current is None:
            return f"not versioned (head is {self.head})"
        if self.at_head:
            return f"{self.current} (head)"
        if self.newer:
            return f"{self.current} (newer than this celery-sqlresults: its head is {self.head})"
        return f"{self.current} (behind head {self.head})"


def script() -> ScriptDirectory:
    """The revision scripts (read once per process and location)."""
    return _script(SCRIPT_LOCATION)


@functools.lru_cache(maxsize=4)
def _script(location: str) -> ScriptDirectory:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", location)
    return ScriptDirectory.from_config(cfg)


def head() -> str:
    """The newest revision: for the packaged scripts :data:`HEAD`, known without
    importing Alembic or reading them."""
    if SCRIPT_LOCATION == PACKAGED:
        return HEAD
    rev = script().get_current_head()
    assert rev is not None
    return rev


def _known(rev: str) -> bool:
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

    try:
        return script().get_revision(rev) is not None
    except (RevisionError, CommandError):
        return False


def config(
    store: Store, connection: Connection | None = None, output: TextIO | None = None
) -> Config:
    """An Alembic ``Config`` for ``store``'s tables (no file; the URL never goes into it)."""
    from alembic.config import Config

    cfg = Config(output_buffer=output)
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    cfg.attributes.update(tables=store.tables, url=store.settings.url, connection=connection)
    return cfg


# ---- reading the version ----------------------------------------------------
def read_version(store: Store, conn: Connection) -> str | None:
    """The recorded revision, in one query; ``None`` if the version table is missing or empty.

    The start-up fast path: no reflection, no lock.
    """
    # Rendered by the dialect's quoting rather than compiled from a select(): a new
    # process's first statement pays the compiler's first use, and this one is fixed.
    prep = conn.dialect.identifier_preparer
    name = prep.quote(store.tables.version)
    schema = store.tables.task.schema
    table = name if schema is None else f"{prep.quote_schema(schema)}.{name}"
    try:
        rows = conn.exec_driver_sql(f"SELECT version_num FROM {table}").scalars().all()
    except DBAPIError as exc:
        if not store.dialect.is_missing_table(exc):
            raise
        return None
    return ",".join(sorted(rows)) or None


def status(store: Store, conn: Connection) -> Status:
    return Status(read_version(store, conn), head())


def locked_status(store: Store, conn: Connection) -> Status:
    """The version read under the lock, leaving no transaction open but SQLite's own.

    Alembic's check looks for the table first, so nothing fails (a failed
    statement would abort PostgreSQL's transaction or end SQLite's lock).
    """
    from alembic.migration import MigrationContext

    ctx = MigrationContext.configure(conn, opts=_version_opts(store))
    heads = ctx.get_current_heads()
    store.dialect.end_version_read(conn)
    return Status(",".join(sorted(heads)) or None, head())


def _version_opts(store: Store) -> dict[str, str | None]:
    return {"version_table": store.tables.version, "version_table_schema": store.tables.task.schema}


# ---- planning and running ---------------------------------------------------
def pending(current: str | None, target: str = "heads") -> list[Script]:
    """Revisions an upgrade from ``current`` to ``target`` runs, oldest first."""
    return list(reversed(list(script().iterate_revisions(target, current or "base"))))


def additive_target(
    current: str | None, conn: Connection, tables: Tables
) -> tuple[str | None, Script | None]:
    """How far start-up may go: up to (not into) the first revision that is not additive.

    A revision says so with a module attribute ``additive``: a bool, or a
    function of the connection and tables for a step that is safe only where
    it has nothing heavy to do (0004 converts MySQL columns, elsewhere a no-op).
    Returns that revision and the refused one (``None`` when all are additive).
    """
    target = current
    for rev in pending(current):
        additive = getattr(rev.module, "additive", False)
        if callable(additive):
            additive = additive(conn, tables)
        if not additive:
            return target, rev
        target = rev.revision
    return target, None


def upgrade_locked(
    store: Store, conn: Connection, target: str = "heads", *, only_additive: bool = False
) -> tuple[Status, Script | None]:
    """Upgrade on ``conn``, which holds the schema lock. Returns the status before and any
    revision refused because it is not additive (only with ``only_additive``).

    A database newer than this package is left alone.
    """
    before = locked_status(store, conn)
    refused = None
    if before.newer:
        return before, None
    if only_additive:
        additive, refused = additive_target(before.current, conn, store.tables)
        if additive is None or additive == before.current:
            return before, refused
        target = additive
    if pending(before.current, target):
        from alembic import command

        command.upgrade(config(store, conn), target)
    return before, refused


def downgrade_locked(store: Store, conn: Connection, target: str) -> Status:
    from alembic import command
    from alembic.util import CommandError

    before = locked_status(store, conn)
    if before.newer:
        raise CommandError(
            f"the database is at {before.current}, which this celery-sqlresults does not know: "
            "downgrade with the version that made it"
        )
    command.downgrade(config(store, conn), target)
    return before


def offline_sql(store: Store, out: TextIO, target: str = "heads", start: str | None = None) -> None:
    """Write the SQL of an upgrade from ``start`` (default: an empty database) to ``target``.

    Alembic's offline mode: nothing is run, nothing is inspected, so the SQL
    assumes the database is exactly at ``start``.
    """
    from alembic import command

    span = target if start is None else f"{start}:{target}"
    command.upgrade(config(store, output=out), span, sql=True)


def offline_downgrade_sql(store: Store, out: TextIO, start: str, target: str) -> None:
    """Write the SQL of a downgrade from ``start`` to ``target`` (Alembic offline mode)."""
    from alembic import command

    command.downgrade(config(store, output=out), f"{start}:{target}", sql=True)


# ---- the lock ---------------------------------------------------------------
@contextlib.contextmanager
def locked(store: Store) -> Iterator[Connection]:
    """A connection holding the database's schema lock (see ``Dialect.schema_lock``)."""
    with (
        store.connect() as conn,
        store.dialect.schema_lock(conn, store.settings.schema_lock_timeout),
    ):
        yield conn
