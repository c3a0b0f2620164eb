"""Waiting for results: PostgreSQL ``LISTEN/NOTIFY``, else adaptive polling.

``AsyncResult.get()`` and joins call ``wait(remaining)`` between checks. It
returns the ids notified meanwhile, each with the row its notification
carried (JSON text, or ``None``: read it), so a join reads at most those;
or ``None``: re-check everything (polling, a timeout, a listener reconnect).

* Polling starts at 1 ms and grows by half each round up to the caller's
  ``interval`` (Celery's 0.5 s default), so a fast task is seen within a few
  milliseconds and a slow one costs a query per ``interval``.
* On PostgreSQL (psycopg 3) each ready-state write notifies the table's
  channel with the task id (and, where ``sqlresults_notify_rows`` lets rows
  travel, the row as written, when it fits), in the same statement (see
  :mod:`celery_sqlresults.notices`).
  One listening connection per process, on a daemon thread, wakes exactly
  the waiters of that id. It listens only while someone waits: every
  notification wakes every listening session of the database (and its
  process), so after ``_LISTEN_IDLE`` seconds without a waiter it stops
  (``UNLISTEN``, keeping its connection) and listens again, one round trip,
  for the next waiter.
  Waiters subscribe *before* they check the table, so a notification cannot
  slip between "check" and "listen". If the listener's connection drops, it
  wakes every waiter (they re-check) and reconnects with backoff; meanwhile
  waiters still re-check at least every ``interval``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from celery.exceptions import TimeoutError as CeleryTimeoutError

from .exceptions import one_line
from .notices import split
from .store import Store

__all__ = ["Listener", "Notified", "Poller", "Wait", "time_left", "waiter_for"]

logger = logging.getLogger("celery_sqlresults")

#: Task ids notified, each with the row its notification carried (JSON) or ``None``.
Notified = dict[str, "str | None"]


class Wait(Protocol):
    """What ``watch()`` yields to a waiter."""

    def __call__(self, remaining: float | None) -> Notified | None:
        """Block until notified or the interval passes (``None``: re-check everything)."""

    def forget(self, task_ids: Iterable[str] | None = None) -> None:
        """Drop what was notified about ``task_ids`` (all if ``None``): a read is about
        to look at them, and a row carried earlier could be older than what it sees."""


_FIRST_POLL = 0.001
_GROWTH = 1.5
#: Seconds without a waiter after which a listener stops listening (until the next one).
_LISTEN_IDLE = 2.0
#: Seconds between the listener's looks at whether anyone still waits.
_LOOK_EVERY = 1.0
#: Seconds between liveness checks of the listening connection.
_CHECK_EVERY = 5.0


class Poller:
    """Adaptive polling, for databases without notifications (or without a way to hear them).

    ``notifies``: writes still notify, for processes that can listen (behind a
    transaction pooler, those given ``sqlresults_listen_url``). ``deaf``: the
    masked URL whose ``LISTEN`` would hear nothing, warned about at the first
    wait (a worker's parent, which never waits, stays quiet).
    """

    def __init__(self, notifies: bool = False, deaf: str | None = None) -> None:
        self.notifies = notifies
        self._deaf = deaf

    #: Whether a watch would first start something (nothing to start here).
    idle = False

    @contextlib.contextmanager
    def watch(self, task_ids: Iterable[str], interval: float) -> Iterator[Wait]:
        deaf, self._deaf = self._deaf, None
        if deaf is not None:
            _warn_deaf(deaf)
        yield _Polling(max(interval, _FIRST_POLL))


class _Polling:
    """Sleeps from a millisecond, growing by half each time up to the interval."""

    def __init__(self, cap: float) -> None:
        self._delay = _FIRST_POLL
        self._cap = cap

    def __call__(self, remaining: float | None) -> Notified | None:
        time.sleep(self._delay if remaining is None else min(self._delay, remaining))
        self._delay = min(self._delay * _GROWTH, self._cap)
        return None

    def forget(self, task_ids: Iterable[str] | None = None) -> None:
        pass


class _Watch:
    """One waiter's subscription: an event, and the ids notified since it last looked."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._lock = threading.Lock()
        self._ids: Notified = {}
        self._everything = False

    def notify(self, task_id: str | None, row: str | None = None) -> None:
        """``task_id`` was stored (``row``: as carried); ``None``: anything may have been."""
        with self._lock:
            if task_id is None:
                self._everything = True
            else:
                self._ids[task_id] = row
        self.event.set()

    def forget(self, task_ids: Iterable[str] | None) -> None:
        with self._lock:
            if task_ids is None:
                self._ids.clear()
            else:
                for task_id in task_ids:
                    self._ids.pop(task_id, None)
            if not self._ids and not self._everything:
                self.event.clear()

    def take(self) -> Notified | None:
        """The ids notified so far (then forgotten), or ``None`` to re-check everything."""
        with self._lock:
            self.event.clear()
            ids, everything = self._ids, self._everything
            self._ids, self._everything = {}, False
        return None if everything or not ids else ids


class Listener:
    """One ``LISTEN`` connection per process, shared by every waiter in it."""

    notifies = True

    def __init__(self, connect: Callable[[], Any], channel: str) -> None:
        self._connect = connect
        self._channel = channel
        self.reconnects = 0
        self._fresh()

    def _fresh(self) -> None:
        """This process's state, new: at construction and in a forked child, where the
        parent's thread, connection and waiters are not ours and a parent thread may
        have held the lock at the fork."""
        self._lock = threading.Lock()
        self._watchers: dict[str, set[_Watch]] = {}
        self._listening = threading.Event()
        self._wanted = threading.Event()  # someone waits, or will: listen
        self._left = 0.0  # monotonic time of the last waiter's leaving (or of a start)
        self._thread: threading.Thread | None = None
        #: Server pid of the listening connection (PostgreSQL), for diagnostics.
        self.backend_pid: int | None = None

    @property
    def idle(self) -> bool:
        """Whether a watch would first start this process's thread and its connection."""
        thread = self._thread
        return thread is None or not thread.is_alive()

    @contextlib.contextmanager
    def watch(self, task_ids: Iterable[str], interval: float) -> Iterator[Wait]:
        """Subscribe before the caller's first check; never delay a result that is ready."""
        watch = _Watch()
        ids = list(task_ids)
        if not ids:  # nothing to wait for (a read found everything): no reason to listen
            yield _Listening(self, watch, interval)
            return
        self._start()
        with self._lock:
            for task_id in ids:
                self._watchers.setdefault(task_id, set()).add(watch)
            self._wanted.set()  # under the lock: the thread parks only when it sees no watcher
        try:
            yield _Listening(self, watch, interval)
        finally:
            with self._lock:
                for task_id in ids:
                    waiters = self._watchers.get(task_id)
                    if waiters is not None:
                        waiters.discard(watch)
                        if not waiters:
                            del self._watchers[task_id]
                self._left = time.monotonic()

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    def _start(self) -> None:
        """Have this process's listening thread run and listen (again) now."""
        self._left = time.monotonic()
        self._wanted.set()
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(
                target=self._run, name="celery-sqlresults-listener", daemon=True
            )
            self._thread.start()

    def _unwanted(self) -> bool:
        """Nobody waits, nor has for ``_LISTEN_IDLE`` seconds (call under the lock)."""
        return not self._watchers and time.monotonic() - self._left >= _LISTEN_IDLE

    def _wake_all(self) -> None:
        with self._lock:
            watches = {w for waiters in self._watchers.values() for w in waiters}
        for watch in watches:
            watch.notify(None)

    def _run(self) -> None:
        delay = 0.1
        while True:
            conn = None
            try:
                conn = self._connect()
                conn.autocommit = True
                self.backend_pid = conn.info.backend_pid
                while True:
                    while not self._wanted.wait(_CHECK_EVERY):  # parked: nobody waits
                        conn.execute("SELECT 1")  # a dead connection shows now, not at LISTEN
                    conn.execute(f'LISTEN "{self._channel}"')
                    for _ in conn.notifies(timeout=0):  # held from before: waiters re-check
                        pass
                    self._listening.set()
                    delay = 0.1
                    self._wake_all()  # anything stored while we were not listening
                    self._serve(conn)
                    conn.execute(f'UNLISTEN "{self._channel}"')
            except Exception as exc:
                self._listening.clear()
                self._wake_all()
                with self._lock:  # nobody to listen for, as when parking: reconnect, then park
                    if self._unwanted():
                        self._wanted.clear()
                self.reconnects += 1
                logger.warning(
                    "celery-sqlresults: notification listener lost (%s); reconnecting in %.1fs",
                    one_line(exc),
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()

    def _serve(self, conn: Any) -> None:
        """Hand notifications to their waiters; return once none has waited for a while."""
        checked = time.monotonic()
        while True:
            for note in conn.notifies(timeout=_LOOK_EVERY):
                task_id, row = split(note.payload)
                with self._lock:
                    watches = list(self._watchers.get(task_id, ()))
                for watch in watches:
                    watch.notify(task_id, row)
            with self._lock:
                if self._unwanted():
                    # Under the lock: a waiter subscribing from now on sets _wanted
                    # again and, seeing no listening, polls until we listen again.
                    self._listening.clear()
                    self._wanted.clear()
                    return
            if time.monotonic() - checked >= _CHECK_EVERY:
                conn.execute("SELECT 1")  # notice a dead connection while idle
                checked = time.monotonic()


class _Listening:
    """A waiter's view of the listener: woken by notifications, else at the interval."""

    def __init__(self, listener: Listener, watch: _Watch, interval: float) -> None:
        self._listener = listener
        self._watch = watch
        self._interval = interval
        self._delay = _FIRST_POLL  # while the listener is not (yet) listening

    def __call__(self, remaining: float | None) -> Notified | None:
        limit = self._interval if remaining is None else min(self._interval, remaining)
        listening = self._listener._listening
        if listening.is_set():
            woken = self._watch.event.wait(limit)
            notified = self._watch.take()
            return notified if woken else None  # a timeout re-checks everything
        # Not listening (yet, or again): poll, but return the moment LISTEN
        # is up, so the caller's next check covers anything sent before it.
        listening.wait(min(self._delay, limit))
        self._delay = min(self._delay * _GROWTH, max(self._interval, _FIRST_POLL))
        return None

    def forget(self, task_ids: Iterable[str] | None = None) -> None:
        self._watch.forget(task_ids)


def waiter_for(store: Store) -> Poller | Listener:
    """A :class:`Listener` where the database notifies (unless disabled), else a poller."""
    settings = store.settings
    url = settings.listen_url
    if url is None:
        if settings.notify and store.dialect.notifies:
            return Poller(notifies=True, deaf=settings.masked_url)
        return Poller()
    connect = store.dialect.listener_connect(url) if settings.notify else None
    if connect is None:
        return Poller()
    key = (url.render_as_string(hide_password=False), store.channel)
    with _listeners_lock:
        listener = _listeners.get(key)
        if listener is None:
            listener = _listeners[key] = Listener(connect, store.channel)
    return listener


_listeners: dict[tuple[str, str], Listener] = {}
_listeners_lock = threading.Lock()


def _warn_deaf(masked_url: str) -> None:
    """Behind a transaction pooler LISTEN hears nothing: say so, and what to set."""
    logger.warning(
        "celery-sqlresults: %s is behind a transaction pooler (sqlresults_pooler), where "
        "LISTEN hears nothing: waiting polls (up to the interval, 0.5 s by default). Set "
        "sqlresults_listen_url to a URL reaching the server directly to wake at once.",
        masked_url,
    )


def _after_fork_in_child() -> None:
    """The child's listeners start afresh: their own thread and connection when it waits."""
    global _listeners_lock
    _listeners_lock = threading.Lock()
    for listener in list(_listeners.values()):
        listener._fresh()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def time_left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (a ``time.monotonic()`` value; None: no limit).

    Raises Celery's ``TimeoutError`` once it has passed, as ``.get()`` does, for the sync and
    the asyncio waits alike.
    """
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise CeleryTimeoutError("The operation timed out.")
    return left
