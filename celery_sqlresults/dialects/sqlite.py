"""SQLite: one file, one write lock for the whole database, errors known by their text."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import URL, Connection

from .base import Expiry, OnConflict, error_text

__all__ = ["SQLite"]

_MISSING_TABLE = re.compile(r"no such table|doesn't exist|does not exist|undefined_?table", re.I)
_MISSING_COLUMN = re.compile(r"no such column|has no column named", re.I)
_BUSY = re.compile(r"database is locked|database table is locked", re.I)
_UNOPENABLE = re.compile(r"unable to open database file", re.I)
_FIX_PATH = (
    "fix the path in result_backend: its directory must exist and this user must be "
    "able to write there"
)


class SQLite(OnConflict):
    names = ("sqlite",)
    fast_drivers = frozenset({"pysqlite"})
    begin_write = "BEGIN IMMEDIATE"
    writes_id = False  # INTEGER PRIMARY KEY: the rowid
    cuts_blobs_in_sql = False  # substr() loads the whole value into this process

    # ---- writes -------------------------------------------------------
    def insert(self, table: sa.Table) -> Any:
        return sqlite.insert(table)

    # ---- reading ------------------------------------------------------------
    def read_blob(
        self, conn: Connection, column: sa.Column[Any], row_id: int, start: int, size: int
    ) -> bytes:
        """SQLite's incremental blob I/O (``blobopen``): only the part is read.

        Python 3.10's sqlite3 has no ``blobopen``: there ``substr`` does it, loading the
        whole value for the moment.
        """
        blobopen = getattr(conn.connection.driver_connection, "blobopen", None)
        table = column.table
        if blobopen is None or not isinstance(table, sa.Table):
            return super().read_blob(conn, column, row_id, start, size)
        with blobopen(
            table.name, column.name, row_id, readonly=True, name=table.schema or "main"
        ) as blob:
            blob.seek(min(start, len(blob)))
            return bytes(blob.read(size))

    # ---- reading the layout -----------------------------------------------
    def id_from_sequence(self, id_column: Mapping[str, Any]) -> bool:
        return False

    # ---- expiry -----------------------------------------------------------
    def expiry(
        self,
        table: sa.Table,
        timestamp: sa.Column[Any],
        old: sa.ColumnElement[bool],
        limit: int,
        filtered: bool = False,
    ) -> Expiry:
        """Batches with a pause between them as long as the batch took.

        SQLite has one write lock for the whole database, and a writer waiting
        for it sleeps between tries: without a pause the next batch would take
        the lock again before that writer wakes.
        """
        step = super().expiry(table, timestamp, old, limit, filtered)

        def paced(conn: Connection) -> tuple[int, bool]:
            started = time.monotonic()
            n, last = step(conn)
            if not last:
                time.sleep(time.monotonic() - started)
            return n, last

        return paced

    # ---- schema -------------------------------------------------------
    @contextlib.contextmanager
    def schema_lock(self, conn: Connection, timeout: float) -> Iterator[None]:
        """``BEGIN IMMEDIATE``, the database's write lock, with everything in that transaction.

        The pysqlite driver opens transactions lazily and never for DDL: take
        manual control so the DDL runs inside the lock.
        """
        conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.exec_driver_sql("ROLLBACK")
            raise
        conn.exec_driver_sql("COMMIT")

    def end_version_read(self, conn: Connection) -> None:
        """Nothing to end: the read runs inside the write lock's own transaction."""

    # ---- connections --------------------------------------------------
    def lock_timeout_statements(self, seconds: float) -> list[str]:
        return [] if seconds <= 0 else [f"PRAGMA busy_timeout = {max(1, round(seconds * 1000))}"]

    def commit_statements(self, durable: bool) -> list[str]:
        """``synchronous = NORMAL``: in WAL mode, syncs at checkpoints only (a power
        loss may lose the last commits)."""
        return [] if durable else ["PRAGMA synchronous = NORMAL"]

    def session_statements(self, url: URL, lock_timeout: float, durable: bool) -> list[str]:
        """Also WAL on a file, so readers (a monitoring page, ``.get()``) run while a
        worker writes."""
        wal = ["PRAGMA journal_mode=WAL"] if self.database_file(url) else []
        return super().session_statements(url, lock_timeout, durable) + wal

    def database_file(self, url: URL) -> str | None:
        database = url.database
        if not database or database == ":memory:" or database.startswith("file:"):
            return None
        return str(database)

    def in_autocommit(self, dbapi_conn: Any) -> bool:
        return dbapi_conn.isolation_level is None

    # ---- errors -------------------------------------------------------
    def seconds_between(
        self, start: sa.ColumnElement[Any], end: sa.ColumnElement[Any]
    ) -> sa.ColumnElement[float]:
        # julianday() of the stored ISO text: fractional days, good to the millisecond, so
        # rounded there (unrounded, a whole second can come out a hair over one).
        days = sa.func.julianday(end) - sa.func.julianday(start)
        return sa.type_coerce(sa.func.round(days * 86400.0, 3), sa.Float)

    def is_lock_timeout(self, exc: BaseException) -> bool:
        return _driver_says(exc, _BUSY)

    def is_missing_table(self, exc: BaseException) -> bool:
        return _driver_says(exc, _MISSING_TABLE)

    def is_missing_column(self, exc: BaseException) -> bool:
        return _driver_says(exc, _MISSING_COLUMN)

    def permanent_error_fix(self, exc: BaseException) -> str | None:
        return _FIX_PATH if _UNOPENABLE.search(error_text(exc)) else None


def _driver_says(exc: BaseException, pattern: re.Pattern[str]) -> bool:
    orig = getattr(exc, "orig", None)
    return orig is not None and bool(pattern.search(str(orig)))
