"""Waiting for results inside an event loop: the asyncio twin of :mod:`celery_sqlresults.wait`.

* On PostgreSQL (psycopg 3) one :class:`AsyncListener` per event loop and
  task table: a psycopg ``AsyncConnection`` that ``LISTEN``\\ s on the channel
  the sync waiters use, driven by a task of that loop, so a thousand awaits
  cost one connection and no thread. It parses payloads with
  :func:`~celery_sqlresults.notices.split` and hands each waiter the row its
  notification carried, exactly as :class:`~celery_sqlresults.wait.Listener`
  does; it listens only while someone waits, and on a lost connection wakes
  every waiter (they re-check) and reconnects with backoff.
* Elsewhere :class:`AsyncPoller`: ``asyncio.sleep`` from a millisecond,
  growing by half each round up to the caller's interval, as the sync poller.

Waiters subscribe in a plain ``with`` before their first read, so a
notification cannot slip between "check" and "listen", and leave on any exit
(a result, a timeout, ``asyncio.CancelledError``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Protocol

from .exceptions import one_line
from .notices import split
from .store import Store
from .wait import Notified

__all__ = ["AsyncListener", "AsyncPoller", "AsyncWait", "async_waiter_for", "listeners_of"]

logger = logging.getLogger("celery_sqlresults")

_FIRST_POLL = 0.001
_GROWTH = 1.5
#: Seconds without a waiter after which a listener stops listening (until the next one).
_LISTEN_IDLE = 2.0
#: Seconds between the listener's looks at whether anyone still waits.
_LOOK_EVERY = 1.0
#: Seconds between liveness checks of the listening connection.
_CHECK_EVERY = 5.0


class AsyncWait(Protocol):
    """What ``watch()`` yields to an async waiter."""

    async def __call__(self, remaining: float | None) -> Notified | None:
        """Wait until notified or the interval passes (``None``: re-check everything)."""

    def forget(self, task_ids: Iterable[str] | None = None) -> None:
        """Drop what was notified about ``task_ids`` (all if ``None``): a read follows."""


class AsyncPoller:
    """Adaptive polling in the loop, for databases without notifications."""

    notifies = False

    @contextlib.contextmanager
    def watch(self, task_ids: Iterable[str], interval: float) -> Iterator[AsyncWait]:
        yield _Polling(max(interval, _FIRST_POLL))


class _Polling:
    def __init__(self, cap: float) -> None:
        self._delay = _FIRST_POLL
        self._cap = cap

    async def __call__(self, remaining: float | None) -> Notified | None:
        await asyncio.sleep(self._delay if remaining is None else min(self._delay, remaining))
        self._delay = min(self._delay * _GROWTH, self._cap)
        return None

    def forget(self, task_ids: Iterable[str] | None = None) -> None:
        pass


class _Watch:
    """One waiter's subscription: the ids notified since it last looked, and a future to
    wake it by (cheaper than an ``asyncio.Event`` under ``wait_for``: no task per wait).

    Everything runs on the loop's thread, so no lock.
    """

    def __init__(self) -> None:
        self._waiter: asyncio.Future[bool] | None = None
        self._ids: Notified = {}
        self._everything = False

    def notify(self, task_id: str | None, row: str | None = None) -> None:
        if task_id is None:
            self._everything = True
        else:
            self._ids[task_id] = row
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def forget(self, task_ids: Iterable[str] | None) -> None:
        if task_ids is None:
            self._ids.clear()
        else:
            for task_id in task_ids:
                self._ids.pop(task_id, None)

    async def wait(self, seconds: float) -> bool:
        """Whether a notification came (or had come) within ``seconds``."""
        if self._ids or self._everything:
            return True
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = loop.call_later(seconds, _expire, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def take(self) -> Notified | None:
        ids, everything = self._ids, self._everything
        self._ids, self._everything = {}, False
        return None if everything or not ids else ids


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class AsyncListener:
    """One ``LISTEN`` connection per event loop, shared by every waiter of that loop."""

    notifies = True

    def __init__(self, connect: Callable[[], Awaitable[Any]], channel: str) -> None:
        self._connect = connect
        self._channel = channel
        self._watchers: dict[str, set[_Watch]] = {}
        self._listening = asyncio.Event()
        self._wanted = asyncio.Event()
        self._left = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self.reconnects = 0
        #: Server pid of the listening connection, for diagnostics and tests.
        self.backend_pid: int | None = None

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    def subscribed(self) -> frozenset[str]:
        """The task ids someone in this loop waits for now (empty when nobody does)."""
        return frozenset(self._watchers)

    @contextlib.contextmanager
    def watch(self, task_ids: Iterable[str], interval: float) -> Iterator[AsyncWait]:
        """Subscribe before the caller's first read; unsubscribe on any exit."""
        watch = _Watch()
        ids = list(task_ids)
        if not ids:
            yield _Listening(self, watch, interval)
            return
        self._start()
        for task_id in ids:
            self._watchers.setdefault(task_id, set()).add(watch)
        try:
            yield _Listening(self, watch, interval)
        finally:
            for task_id in ids:
                waiters = self._watchers.get(task_id)
                if waiters is not None:
                    waiters.discard(watch)
                    if not waiters:
                        del self._watchers[task_id]
            self._left = time.monotonic()

    def _start(self) -> None:
        self._left = time.monotonic()
        self._wanted.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="celery-sqlresults-async-listener"
            )
            self._task.add_done_callback(_ended)

    def _unwanted(self) -> bool:
        return not self._watchers and time.monotonic() - self._left >= _LISTEN_IDLE

    def _wake_all(self) -> None:
        for watch in {w for waiters in self._watchers.values() for w in waiters}:
            watch.notify(None)

    async def _run(self) -> None:
        delay = 0.1
        while True:
            conn = None
            try:
                conn = await self._connect()
                self.backend_pid = conn.info.backend_pid
                while True:
                    while not await _within(self._wanted.wait(), _CHECK_EVERY):
                        await conn.execute("SELECT 1")  # parked: a dead connection shows now
                    await conn.execute(f'LISTEN "{self._channel}"')
                    async for _ in conn.notifies(timeout=0):  # held from before: re-checked
                        pass
                    self._listening.set()
                    delay = 0.1
                    self._wake_all()  # anything stored while we were not listening
                    await self._serve(conn)
                    await conn.execute(f'UNLISTEN "{self._channel}"')
            except Exception as exc:
                self._listening.clear()
                self._wake_all()
                if self._unwanted():
                    self._wanted.clear()
                self.reconnects += 1
                logger.warning(
                    "celery-sqlresults: async notification listener lost (%s); "
                    "reconnecting in %.1fs",
                    one_line(exc),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                self._listening.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()

    async def _serve(self, conn: Any) -> None:
        """Hand notifications to their waiters; return once none has waited for a while."""
        checked = time.monotonic()
        while True:
            async for note in conn.notifies(timeout=_LOOK_EVERY):
                task_id, row = split(note.payload)
                for watch in list(self._watchers.get(task_id, ())):
                    watch.notify(task_id, row)
            if self._unwanted():
                self._listening.clear()
                self._wanted.clear()
                return
            if time.monotonic() - checked >= _CHECK_EVERY:
                await conn.execute("SELECT 1")
                checked = time.monotonic()


class _Listening:
    """A waiter's view of the listener: woken by notifications, else at the interval."""

    def __init__(self, listener: AsyncListener, watch: _Watch, interval: float) -> None:
        self._listener = listener
        self._watch = watch
        self._interval = interval
        self._delay = _FIRST_POLL

    async def __call__(self, remaining: float | None) -> Notified | None:
        limit = self._interval if remaining is None else min(self._interval, remaining)
        listening = self._listener._listening
        if listening.is_set():
            woken = await self._watch.wait(limit)
            notified = self._watch.take()
            return notified if woken else None
        # Not listening (yet, or again): poll, but return the moment LISTEN is up.
        await _within(listening.wait(), min(self._delay, limit))
        self._delay = min(self._delay * _GROWTH, max(self._interval, _FIRST_POLL))
        return None

    def forget(self, task_ids: Iterable[str] | None = None) -> None:
        self._watch.forget(task_ids)


async def _within(waiting: Awaitable[Any], seconds: float) -> bool:
    """Whether ``waiting`` finished within ``seconds`` (it is cancelled otherwise)."""
    try:
        await asyncio.wait_for(waiting, seconds)
    except asyncio.TimeoutError:
        return False
    return True


#: Per event loop, its listeners by (URL, channel); gone with the loop.
_listeners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], Any]] = (
    weakref.WeakKeyDictionary()
)


def _ended(task: asyncio.Task[None]) -> None:
    """A listener's task is over (its loop is closing): forget the listener, which refers
    to the loop, so that the loop can go."""
    loop = task.get_loop()
    mine = _listeners.get(loop, {})
    for key, listener in list(mine.items()):
        if listener._task is task:
            del mine[key]
    if not mine:
        _listeners.pop(loop, None)


def async_waiter_for(store: Store) -> AsyncListener | AsyncPoller:
    """The running loop's :class:`AsyncListener` where the database notifies, else a poller."""
    settings = store.settings
    url = settings.listen_url  # None behind a transaction pooler: LISTEN would hear nothing
    if url is None or not settings.notify:
        return AsyncPoller()
    connect = store.dialect.async_listener_connect(url)
    if connect is None:
        return AsyncPoller()
    loop = asyncio.get_running_loop()
    mine = _listeners.setdefault(loop, {})
    key = (url.render_as_string(hide_password=False), store.channel)
    listener = mine.get(key)
    if listener is None:
        listener = mine[key] = AsyncListener(connect, store.channel)
    return listener


def listeners_of(loop: asyncio.AbstractEventLoop) -> list[AsyncListener]:
    """The listeners an event loop has started (one per database and task table)."""
    return list(_listeners.get(loop, {}).values())
