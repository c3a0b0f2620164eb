"""The kept connection: one thread per engine keeps its pooled connection between calls.

A checkout and check-in through SQLAlchemy's pool cost a noticeable share of
a read in a worker (docs/benchmarks.md, figure 2). A :class:`Lease` skips
them while its thread is busy, and gives the connection back whenever the
pool's own checks matter: after ``IDLE`` seconds without a call (so the next
checkout applies the pool's recycling and invalidation), every ``RENEW``
seconds anyway and when the connection reaches ``pool_recycle``, when the
pool has invalidated its connections (another thread saw a disconnect) or was
replaced (``dispose()``), on any error (after SQLAlchemy's handler has
invalidated it if need be), and before its thread takes a second connection
(:func:`release`), so a thread never holds two. All of these are checked at
the next call: an idle lease stays checked out until then.

Only where the pool can spare a connection: a ``QueuePool`` of at least two
with no ``pool_pre_ping`` and no checkout, check-in or reset listeners (they
expect to run on every use). One lease per engine: other threads check out
as usual and end a lease left idle.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

__all__ = ["Lease", "end_leases", "give_back", "release", "take"]

#: Seconds without a call after which a lease goes back to the pool (at the next call).
IDLE = 1.0
#: Seconds after which a lease goes back through the pool even when busy (pool_recycle).
RENEW = 30.0
#: Seconds :func:`end_leases` waits for a call in progress on a lease.
END_WAIT = 10.0


class Lease:
    """A pooled connection one thread keeps checked out between calls."""

    __slots__ = ("invalidated", "lock", "owner", "pool", "pooled", "until", "used")

    def __init__(self, pooled: Any, pool: Any) -> None:
        self.lock = threading.Lock()  # held while a call uses the connection
        self.lock.acquire()
        self.pooled = pooled
        self.pool = pool
        self.invalidated = getattr(pool, "_invalidate_time", 0)
        self.owner = threading.get_ident()
        self.used = now = time.monotonic()
        keep = RENEW
        recycle = getattr(pool, "_recycle", -1)
        record = getattr(pooled, "_connection_record", None)
        if recycle > 0 and record is not None:
            keep = min(keep, recycle - (time.time() - record.starttime))
        self.until = now + keep

    def fresh(self, engine: Engine, now: float) -> bool:
        """Whether the pool's own checks would pass this connection as it is."""
        return (
            self.pooled is not None  # not ended by another thread meanwhile
            and now - self.used < IDLE
            and now < self.until
            and self.pool is engine.pool
            and getattr(self.pool, "_invalidate_time", 0) == self.invalidated
        )


_leases: weakref.WeakKeyDictionary[Engine, Lease] = weakref.WeakKeyDictionary()
_leases_lock = threading.Lock()
#: A forked child's copies of its parent's leases: never used, never collected (collecting
#: a connection could close the socket the parent still uses).
_inherited: list[Lease] = []


def take(engine: Engine) -> tuple[Any, Lease | None]:
    """A pooled connection for one call: this thread's lease, a new lease, or a plain checkout.

    Connection errors are raised as SQLAlchemy's own, as ``engine.connect()``
    would raise them.
    """
    lease = _leases.get(engine)
    if lease is not None and lease.lock.acquire(blocking=False):
        mine = lease.owner == threading.get_ident()
        fresh = lease.fresh(engine, time.monotonic())
        if mine and fresh:
            return lease.pooled, lease  # the lock stays held until give_back()
        if mine or not fresh:
            _end(engine, lease)
        lease.lock.release()  # ended, or another thread's in use lately (left alone)
    pooled = _checkout(engine)
    if _can_lease(engine.pool):
        with _leases_lock:
            if engine not in _leases:  # none, or just ended above
                new = _leases[engine] = Lease(pooled, engine.pool)
                return pooled, new
    return pooled, None


def give_back(engine: Engine, pooled: Any, lease: Lease | None, ok: bool) -> None:
    """End a call: a lease is kept after success, a plain checkout goes back to the pool.

    After a failure the lease's connection goes back too (SQLAlchemy's handler
    has invalidated it if it is broken).
    """
    if lease is None:
        pooled.close()
        return
    if ok:
        lease.used = time.monotonic()
    else:
        _end(engine, lease)
    lease.lock.release()


def release(engine: Engine) -> None:
    """End the calling thread's lease on ``engine``, before it checks out another connection."""
    lease = _leases.get(engine)
    if (
        lease is not None
        and lease.owner == threading.get_ident()
        and lease.lock.acquire(blocking=False)
    ):
        _end(engine, lease)
        lease.lock.release()


def end_leases(engine: Engine | None = None) -> None:
    """End the leases on ``engine`` (or on every engine), waiting for calls in progress.

    A call still running after ``END_WAIT`` seconds keeps its lease; it ends at
    that call's end only if it fails, else at a later call (the pool is gone).
    """
    with _leases_lock:
        found = [(e, lease) for e, lease in _leases.items() if engine is None or e is engine]
    for leased, lease in found:
        if lease.lock.acquire(timeout=END_WAIT):
            try:
                _end(leased, lease)
            finally:
                lease.lock.release()


def leased(engine: Engine) -> Lease | None:
    """The lease on ``engine``, if any (for diagnostics and tests)."""
    return _leases.get(engine)


def _end(engine: Engine, lease: Lease) -> None:
    """Give a lease's connection back to its pool (the caller holds ``lease.lock``)."""
    with _leases_lock:
        if _leases.get(engine) is lease:
            del _leases[engine]
    if lease.pooled is not None:
        pooled, lease.pooled = lease.pooled, None
        pooled.close()


def _can_lease(pool: Any) -> bool:
    """Whether ``pool`` can spare one connection for a lease, and has no per-use checks."""
    if not isinstance(pool, sa.pool.QueuePool) or getattr(pool, "_pre_ping", True):
        return False
    if pool.dispatch.checkout or pool.dispatch.checkin or pool.dispatch.reset:
        return False
    overflow = getattr(pool, "_max_overflow", 0)
    return overflow < 0 or pool.size() + overflow >= 2


def _checkout(engine: Engine) -> Any:
    """A connection from the engine's pool, connection errors wrapped as ``connect()`` would."""
    try:
        return engine.raw_connection()
    except engine.dialect.loaded_dbapi.Error as exc:
        Connection._handle_dbapi_exception_noconnection(exc, engine.dialect, engine)
        raise


def _after_fork_in_child() -> None:
    """A lock held by another thread of the parent at the fork would never be released here."""
    global _leases_lock
    _leases_lock = threading.Lock()
    _inherited.extend(_leases.values())
    _leases.clear()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)
