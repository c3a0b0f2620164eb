"""Server-Sent Events: a task's or a group's state, sent again each time it changes.

A stream sends the current state at once, then each change, until a ready
state ends it (``event: end``) or it has been open ``seconds``
(``event: timeout``; an ``EventSource`` reconnects by itself and gets the
current state first). On PostgreSQL it waits on the process's notification
listener (:mod:`celery_sqlresults.wait`): ready states and custom states
(``update_state(state="PROGRESS")``) notify, so those changes are sent at
once; anything else (``STARTED``, which does not notify) is seen by a read
every :data:`RECHECK` seconds. Elsewhere it polls, from :data:`FIRST_POLL`
growing to :data:`RECHECK`, quick again after each change.

Its reads, and on PostgreSQL its waits on the listener (at most
:data:`RECHECK` seconds each), run on a thread pool of the streams' own
(:data:`MAX_STREAMS` threads), so streams never take the threads the other
routes need; a polling stream sleeps without a thread. More than
:data:`MAX_STREAMS` open streams are refused (503).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import anyio
import anyio.to_thread
import sqlalchemy as sa

from ..exceptions import one_line
from ..wait import Listener, Poller

__all__ = [
    "FIRST_POLL",
    "KEEPALIVE",
    "MAX_STREAMS",
    "RECHECK",
    "STREAM_SECONDS",
    "EventStreams",
    "Read",
]

#: Streams open at once per app; one more is answered 503.
MAX_STREAMS = 100
#: Seconds between reads while nothing is notified (and the longest a poll sleeps).
RECHECK = 2.0
#: Seconds of the first poll's sleep where the database does not notify.
FIRST_POLL = 0.05
#: Seconds without a change after which a comment line keeps proxies from closing the stream.
KEEPALIVE = 15.0
#: Seconds a stream stays open at most (the client reconnects).
STREAM_SECONDS = 900.0
_GROWTH = 1.5
_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

#: What a stream reads each time: ``(event data, whether it is final)``.
Read = Callable[[], "tuple[dict[str, Any], bool]"]


logger = logging.getLogger("celery_sqlresults.web")


class EventStreams:
    """The open streams of one app, and how they wait (``waiter``: notified or polling)."""

    def __init__(self, waiter: Listener | Poller, seconds: float = STREAM_SECONDS) -> None:
        self.waiter = waiter
        self.seconds = seconds
        self.open = 0
        self._limiter = anyio.CapacityLimiter(MAX_STREAMS)

    @property
    def full(self) -> bool:
        """Whether :data:`MAX_STREAMS` streams are open (a new one is refused)."""
        return self.open >= MAX_STREAMS

    async def follow(self, ids: Iterable[str], read: Read, event: str) -> AsyncIterator[str]:
        """The stream's text: ``event`` with ``read()``'s data at each change."""
        self.open += 1
        try:
            async for chunk in self._follow(list(ids), read, event):
                yield chunk
        finally:
            self.open -= 1

    async def _follow(self, ids: list[str], read: Read, event: str) -> AsyncIterator[str]:
        yield f"retry: {int(RECHECK * 1000)}\n\n"
        end = time.monotonic() + self.seconds
        quiet_since = time.monotonic()
        last: str | None = None
        delay = FIRST_POLL
        with contextlib.ExitStack() as stack:
            wait = None
            if self.waiter.notifies:  # subscribed before the first read: nothing slips by
                wait = stack.enter_context(self.waiter.watch(ids, RECHECK))
            while True:
                try:
                    data, final = await anyio.to_thread.run_sync(read, limiter=self._limiter)
                except sa.exc.SQLAlchemyError as exc:  # the headers are out: say so, try again
                    logger.warning("event stream: result database: %s", one_line(exc))
                    yield 'event: error\ndata: {"error":"result database unavailable"}\n\n'
                    await anyio.sleep(RECHECK)
                    if time.monotonic() < end:
                        continue
                    yield "event: timeout\ndata: {}\n\n"
                    return
                text = _compact(data)
                now = time.monotonic()
                if text != last:
                    yield f"event: {event}\ndata: {text}\n\n"
                    last, quiet_since, delay = text, now, FIRST_POLL
                elif now - quiet_since >= KEEPALIVE:
                    yield ": keepalive\n\n"
                    quiet_since = now
                if final:
                    yield "event: end\ndata: {}\n\n"
                    return
                left = end - now
                if left <= 0:
                    yield "event: timeout\ndata: {}\n\n"
                    return
                if wait is not None:
                    limit = min(RECHECK, left)
                    await anyio.to_thread.run_sync(wait, limit, limiter=self._limiter)
                else:
                    await anyio.sleep(min(delay, left))
                    delay = min(delay * _GROWTH, RECHECK)
