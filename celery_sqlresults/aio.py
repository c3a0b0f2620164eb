"""Await Celery results from asyncio: :func:`aget` for one, :func:`as_completed` for a group.

Celery has no asyncio API, so a FastAPI or aiohttp handler wanting a result
parks a thread in ``.get()``. These take Celery's own ``AsyncResult`` and
``GroupResult`` (they do not replace them) and wait in the event loop: on
PostgreSQL through one listening connection per loop
(:class:`~celery_sqlresults.aiowait.AsyncListener`), elsewhere by polling
that backs off as the sync waiters do.

Reads run the backend's sync read in a thread (``asyncio.to_thread``) rather
than through an async driver: the :class:`~celery_sqlresults.store.Store`
keeps all SQL and its retries in one place for every database, and on
PostgreSQL a notification usually carries the row, so most wake-ups read
nothing at all. The reads of one loop share one query at a time
(:class:`_Reader`): a thousand awaits re-checking at their interval cost a
query, not a thousand, and one thread and connection, not a pool's worth.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator, Collection, Iterable, Iterator
from typing import Any

from celery import states
from celery.result import AsyncResult, EagerResult, ResultSet

from .aiowait import async_waiter_for
from .backend import SQLResultsBackend
from .wait import time_left

__all__ = ["aget", "as_completed"]


async def aget(
    result: AsyncResult | ResultSet,
    timeout: float | None = None,
    propagate: bool = True,
    interval: float = 0.5,
) -> Any:
    """``await aget(result)``: ``result.get()`` without blocking the event loop.

    :param result: a Celery ``AsyncResult`` of an app whose backend is ``sql+``; a
        ``GroupResult`` (any ``ResultSet``) gives the list of its values, in its order,
        as its ``.get()`` does.
    :param timeout: seconds to wait; then ``celery.exceptions.TimeoutError``.
    :param propagate: re-raise the task's exception if it failed (as ``.get()``).
    :param interval: seconds between re-checks when no notification comes.
    :returns: the task's return value (or its exception, with ``propagate=False``).
    """
    if isinstance(result, ResultSet):
        values = {m.id: v async for m, v in as_completed(result, timeout, propagate, interval)}
        return _arranged(result, values)
    if isinstance(result, EagerResult):
        return result.get(timeout=timeout, propagate=propagate)
    backend = _backend_of(result)
    task_id = result.id
    deadline = None if timeout is None else time.monotonic() + timeout
    with async_waiter_for(backend.store).watch([task_id], interval) as wait:
        wait.forget()  # each read sees anything notified before it
        meta = (await _reader(backend).ready([task_id])).get(task_id)
        while meta is None:
            notified = await wait(time_left(deadline))
            meta = backend.carried_meta(task_id, notified)  # a ready row, or None: read
            if meta is None:
                wait.forget()
                meta = (await _reader(backend).ready([task_id])).get(task_id)
    return _settle(result, meta, propagate)


async def as_completed(
    results: ResultSet | Iterable[AsyncResult],
    timeout: float | None = None,
    propagate: bool = True,
    interval: float = 0.5,
) -> AsyncIterator[tuple[AsyncResult, Any]]:
    """``async for result, value in as_completed(group_result)``: each member as it finishes.

    Yields ``(AsyncResult, value)`` pairs in completion order, like Celery's
    ``collect()``; the ``AsyncResult`` has its state cached. A failed member
    raises its exception when ``propagate`` (as ``join()``), else is yielded
    with the exception as its value. ``timeout`` bounds the whole iteration.
    Leaving the loop early unsubscribes once the generator is closed: wrap it in
    ``contextlib.aclosing()`` to make that immediate.
    """
    members = list(_members(results))
    eager = [r for r in members if isinstance(r, EagerResult)]
    for r in eager:
        yield r, r.get(propagate=propagate)
    by_id = {r.id: r for r in members if not isinstance(r, EagerResult)}
    if not by_id:
        return
    backend = _backend_of(next(iter(by_id.values())))
    pending = set(by_id)
    deadline = None if timeout is None else time.monotonic() + timeout
    with async_waiter_for(backend.store).watch(pending, interval) as wait:
        notified = None  # None: read every pending id
        while pending:
            ids = pending if notified is None else pending & notified.keys()
            metas: list[dict[str, Any]] = []
            if notified is not None:  # read only the rows no notification brought
                metas = [m for t in ids if (m := backend.carried_meta(t, notified)) is not None]
                ids = ids - {m["task_id"] for m in metas}
            if ids:
                wait.forget(ids)
                metas += (await _reader(backend).ready(ids)).values()
            for meta in metas:
                task_id = meta["task_id"]
                if task_id not in pending or meta["status"] not in states.READY_STATES:
                    continue
                pending.discard(task_id)
                member = by_id[task_id]
                yield member, _settle(member, meta, propagate)
            if pending:
                notified = await wait(time_left(deadline))


def _arranged(results: ResultSet, values: dict[str, Any]) -> list[Any]:
    """The values in the group's order, a nested group's as a list, as ``join()`` gives."""
    return [
        _arranged(m, values) if isinstance(m, ResultSet) else values[m.id] for m in results.results
    ]


def _members(results: ResultSet | Iterable[AsyncResult]) -> Iterator[AsyncResult]:
    for member in results.results if isinstance(results, ResultSet) else results:
        if isinstance(member, ResultSet):  # a group in the group: its tasks
            yield from _members(member)
        else:
            yield member


class _Reader:
    """One read in flight per event loop and backend; what is asked meanwhile shares the next.

    Each read is ``ready_metas`` in a thread: one query per batch of ids.
    """

    def __init__(self, backend: SQLResultsBackend) -> None:
        self._backend = backend
        self._asked: list[tuple[Collection[str], asyncio.Future[dict[str, Any]]]] = []
        self._task: asyncio.Task[None] | None = None

    async def ready(self, task_ids: Collection[str]) -> dict[str, dict[str, Any]]:
        """The meta of those of ``task_ids`` that are ready, by id."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._asked.append((task_ids, answer))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._serve())
        return await answer

    async def _serve(self) -> None:
        try:
            await self._answer()
        finally:
            self._task = None  # a task refers to its loop, which this reader must not keep

    async def _answer(self) -> None:
        while self._asked:
            asked, self._asked = self._asked, []
            asked = [(ids, answer) for ids, answer in asked if not answer.done()]  # cancelled
            wanted = {task_id for ids, _ in asked for task_id in ids}
            if not wanted:
                continue
            try:
                metas = await asyncio.to_thread(self._backend.ready_metas, wanted)
            except Exception as exc:
                for _, answer in asked:
                    if not answer.done():
                        answer.set_exception(exc)
                continue
            found = {meta["task_id"]: meta for meta in metas}
            for ids, answer in asked:
                if not answer.done():
                    answer.set_result({t: found[t] for t in ids if t in found})


#: Per event loop, a reader per backend; gone with the loop.
_readers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Any, _Reader]] = (
    weakref.WeakKeyDictionary()
)


def _reader(backend: SQLResultsBackend) -> _Reader:
    mine = _readers.setdefault(asyncio.get_running_loop(), {})
    reader = mine.get(backend)
    if reader is None:
        reader = mine[backend] = _Reader(backend)
    return reader


def _backend_of(result: AsyncResult) -> SQLResultsBackend:
    backend = result.backend
    if not isinstance(backend, SQLResultsBackend):
        raise TypeError(
            "celery_sqlresults.aio waits on the sql+ result backend only; this result's "
            f"backend is {type(backend).__name__}: set result_backend = 'sql+<database URL>'"
        )
    return backend


def _settle(result: AsyncResult, meta: dict[str, Any], propagate: bool) -> Any:
    """Cache ``meta`` on ``result`` and return its value or raise, as ``.get()`` ends."""
    result._maybe_set_cache(meta)  # what Celery's wait_for_pending does with the meta
    return result.maybe_throw(propagate=propagate)
