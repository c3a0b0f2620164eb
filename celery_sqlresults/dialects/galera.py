"""MariaDB Galera Cluster: the MySQL dialect, with what a multi-primary cluster changes.

Every node takes writes and replication is synchronous, but three things
our MySQL path relies on do not hold there. ``GET_LOCK`` locks one node
only, so schema changes are serialised by a lease row that replicates (a
second node's INSERT of it fails certification or finds it). Galera refuses
``CREATE SEQUENCE … CACHE``, so ids come from AUTO_INCREMENT. And a read on
one node may not yet show a commit made on another, so every session waits
for its node to catch up before it reads (``wsrep_sync_wait``). A write
that loses a certification conflict fails with 1213 and is retried whole,
like any deadlock.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from .base import Dialect, error_number
from .mysql import MySQL

__all__ = ["LOCK_TABLE", "Galera", "is_galera"]

#: The table holding the schema lease (one row while a process changes the schema).
LOCK_TABLE = "celery_sqlresults_lock"
_LEASE = "schema"
#: Seconds a lease lasts without renewal: a holder that died frees it after this.
LEASE_SECONDS = 30
#: Seconds between renewals by the holder (well inside :data:`LEASE_SECONDS`).
RENEW_SECONDS = 5.0
#: ``wsrep_sync_wait`` bit 1: reads (SELECT, SHOW, BEGIN) wait for the node to catch up.
_SYNC_READS = "SET SESSION wsrep_sync_wait = 1"
_DEADLOCK = 1213
_DUPLICATE = 1062
_UNKNOWN_VARIABLE = 1193  # MySQL has no wsrep_on
#: Errors a DDL statement meets while the cluster orders another node's DDL: try again.
_DDL_RACE = {_DEADLOCK, 1684, 1205, 1047}

#: Engines already set up for Galera (one connect listener each).
_prepared: weakref.WeakSet[Engine] = weakref.WeakSet()
_prepared_lock = threading.Lock()


def is_galera(engine: Engine) -> bool:
    """Whether ``engine``'s server replicates with Galera (``wsrep_on``; absent on MySQL).

    Asked on the driver's own cursor, as SQLAlchemy asks for the server's
    version: part of setting the engine up, not a statement of ours. Read as
    ``@@wsrep_on``, not with ``SHOW VARIABLES``, which scans every variable:
    part of a new process's first call.
    """
    dbapi_error = engine.dialect.loaded_dbapi.Error
    with engine.connect() as conn:  # connection errors come wrapped, as from any statement
        cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cur.execute("SELECT @@wsrep_on")
            row = cur.fetchone()
        except dbapi_error as exc:
            if error_number(exc) == _UNKNOWN_VARIABLE:
                return False
            conn.invalidate(exc)
            raise DBAPIError.instance(None, None, exc, dbapi_error) from exc
        finally:
            cur.close()
    return row is not None and str(row[0]).upper() in ("1", "ON")


class Galera(MySQL):
    """A node of a MariaDB Galera Cluster (``wsrep_on``, or ``sqlresults_galera = True``)."""

    def galera(self) -> Dialect:
        return self

    def resolve(self, engine: Engine, detect: bool) -> Dialect:
        """Set the engine up once: no sequences in its DDL, reads wait for the cluster."""
        with _prepared_lock:
            if engine in _prepared:
                return self
            _prepared.add(engine)
        # Galera refuses CREATE SEQUENCE … CACHE: tables get AUTO_INCREMENT instead,
        # with the gaps wsrep_auto_increment_control leaves (nothing orders by id).
        # SQLAlchemy sets the flag from the server version at the first connection,
        # before this listener runs; the listener also makes each session's reads wait.
        sa.event.listen(engine, "connect", functools.partial(_set_up, engine.dialect))
        engine.dialect.supports_sequences = False
        # A connection pooled already (the one that detected Galera) is set up here.
        with (
            contextlib.suppress(DBAPIError, engine.dialect.loaded_dbapi.Error),
            engine.connect() as conn,
        ):
            _set_up(engine.dialect, conn.connection.dbapi_connection, None)
        return self

    # ---- schema -------------------------------------------------------
    @contextlib.contextmanager
    def schema_lock(self, conn: Connection, timeout: float) -> Iterator[None]:
        """A lease row in :data:`LOCK_TABLE`, which every node sees.

        Taking it is an INSERT of one primary key: two nodes inserting it at
        once certify one, the other fails (1213) or finds it (1062) and waits.
        The holder renews it from a thread of its own while the block runs; a
        lease not renewed for :data:`LEASE_SECONDS` (its holder died) is taken over.
        """
        conn.execution_options(isolation_level="READ COMMITTED")
        holder = uuid.uuid4().hex
        deadline = time.monotonic() + timeout
        _create_lock_table(conn, deadline)
        pause = 0.05
        while not _take(conn, holder):
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"waited {timeout:.0f}s for the Galera schema lease in {LOCK_TABLE!r}"
                )
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
        stop = threading.Event()
        renewer = threading.Thread(
            target=_renew, args=(conn.engine, holder, stop), name="sqlresults-lease", daemon=True
        )
        renewer.start()
        try:
            yield
            conn.commit()
        finally:
            stop.set()
            renewer.join()
            with contextlib.suppress(DBAPIError):
                conn.rollback()
            _give_back(conn, holder)


def _set_up(dialect: Any, dbapi_conn: Any, _record: Any) -> None:
    """Each new connection: DDL without sequences, reads that see the cluster's commits."""
    dialect.supports_sequences = False
    cur = dbapi_conn.cursor()
    try:
        cur.execute(_SYNC_READS)
    finally:
        cur.close()


def _create_lock_table(conn: Connection, deadline: float) -> None:
    """``CREATE TABLE IF NOT EXISTS``, retried while another node's DDL is being ordered."""
    ddl = (
        f"CREATE TABLE IF NOT EXISTS {LOCK_TABLE} (name VARCHAR(64) NOT NULL PRIMARY KEY, "
        "holder VARCHAR(64) NOT NULL, expires DATETIME(6) NOT NULL) ENGINE=InnoDB"
    )
    while True:
        try:
            conn.exec_driver_sql(ddl)
            conn.commit()
            return
        except DBAPIError as exc:
            with contextlib.suppress(DBAPIError):
                conn.rollback()
            if error_number(exc) not in _DDL_RACE or time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def _take(conn: Connection, holder: str) -> bool:
    """One try at the lease: clear an expired one, insert ours. True when ours committed."""
    try:
        conn.execute(
            sa.text(f"DELETE FROM {LOCK_TABLE} WHERE name = :n AND expires < UTC_TIMESTAMP(6)"),
            {"n": _LEASE},
        )
        conn.commit()
        conn.execute(
            sa.text(
                f"INSERT INTO {LOCK_TABLE} (name, holder, expires) VALUES "
                f"(:n, :h, UTC_TIMESTAMP(6) + INTERVAL {LEASE_SECONDS} SECOND)"
            ),
            {"n": _LEASE, "h": holder},
        )
        conn.commit()
        return True
    except DBAPIError as exc:
        with contextlib.suppress(DBAPIError):
            conn.rollback()
        if error_number(exc) in (_DUPLICATE, _DEADLOCK):
            return False
        raise


def _renew(engine: Engine, holder: str, stop: threading.Event) -> None:
    """Push the lease's expiry forward until ``stop`` (on its own connection)."""
    while not stop.wait(RENEW_SECONDS):
        with contextlib.suppress(DBAPIError), engine.connect() as conn:
            conn.execute(
                sa.text(
                    f"UPDATE {LOCK_TABLE} SET expires = UTC_TIMESTAMP(6) + INTERVAL "
                    f"{LEASE_SECONDS} SECOND WHERE name = :n AND holder = :h"
                ),
                {"n": _LEASE, "h": holder},
            )
            conn.commit()


def _give_back(conn: Connection, holder: str) -> None:
    """Delete our lease row (retried over a certification conflict with a renewal)."""
    for _ in range(20):
        try:
            conn.execute(
                sa.text(f"DELETE FROM {LOCK_TABLE} WHERE name = :n AND holder = :h"),
                {"n": _LEASE, "h": holder},
            )
            conn.commit()
            return
        except DBAPIError as exc:
            with contextlib.suppress(DBAPIError):
                conn.rollback()
            if error_number(exc) != _DEADLOCK:
                raise
            time.sleep(0.05)
