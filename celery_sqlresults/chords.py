"""Native chords: an atomic counter per chord in the database, no ``celery.chord_unlock``.

``apply_chord`` stores the header group and a counter row; each finished
header task adds itself to the counter once (``Store.chord_part_done``), and
the one worker whose count completes the chord joins the header with one
batch read and sends the body. The chord is complete when its size is known
and the count reaches it: a size fixed late (a generated header) or a task
added to the header (``add_to_chord``) changes the same row under its lock,
so exactly one of the part counts and the size-setter sees it complete.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from celery import states
from celery.backends.base import BaseBackend
from celery.canvas import maybe_signature
from celery.exceptions import ChordError
from celery.result import GroupResult, allow_join_result, result_from_tuple
from kombu.utils.encoding import bytes_to_str

from .schema import utc_now
from .store import Store

__all__ = ["ChordMixin"]

logger = logging.getLogger("celery_sqlresults")


class ChordMixin(BaseBackend):
    """The chord side of Celery's backend protocol, on a backend with a store."""

    store: Store
    #: The body of each chord applied in this process whose size is not fixed yet:
    #: the size-setter calls it if every part was counted before the size came.
    _unsized: dict[str, Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unsized = {}

    def apply_chord(self, header_result_args: Any, body: Any, **kwargs: Any) -> None:
        """Record the header group and a counter row; no ``celery.chord_unlock`` is ever sent.

        A header given as a generator is not unrolled: Celery sends its tasks
        as they come and fixes the size once it is exhausted
        (:meth:`set_chord_size`); the body's values are then read from the
        counted parts in header order, as the Redis backend does (where the
        schema records their places; else the header is unrolled first, as before).
        """
        self.ensure_chords_allowed()
        group_id, results = header_result_args[0], header_result_args[1]
        self._ensure_retryable(self.store.chord_start, group_id, utc_now())
        generated = type(results) is not list  # Celery's lazy list (``regen``) is a list too
        if not generated or not self.store.generated_headers():
            self.save_group(group_id, self.app.GroupResult(*header_result_args))
        self._unsized[group_id] = body

    def set_chord_size(self, group_id: str, chord_size: int) -> None:
        """Fix the size (Celery calls it before sending the last header task); if every
        part was counted already, the chord is complete now and this call sends the body."""
        body = self._unsized.pop(group_id, None)
        counted = self._ensure_retryable(self.store.chord_set_size, group_id, chord_size)
        if counted is not None and body is not None and counted[0] == chord_size:
            self._run_chord_body(group_id, maybe_signature(body, app=self.app))

    def add_to_chord(self, chord_id: str, result: Any) -> None:
        """Make the chord wait for ``result`` too, its value passed to the body after the
        header's (``Task.add_to_chord``); atomic on the counter row."""
        grow = functools.partial(self._grown, chord_id, result)
        counted = self._ensure_retryable(self.store.chord_add, chord_id, utc_now(), grow)
        if counted is None:
            raise ChordError(
                f"chord {chord_id} has no counter row (it completed or expired): "
                f"task {result.id} cannot be added to it"
            )

    def _grown(self, group_id: str, added: Any, stored: bytes | None) -> bytes | None:
        """The saved header group's payload with ``added`` at its end; ``None`` (no change)
        without a saved group: a generated header, whose counted parts are read instead."""
        value = None if stored is None else self.decode_value(stored)
        if value is None:
            return None
        results = [*result_from_tuple(value, self.app).results, added]
        return self.encode_value(self.prepare_value(self.app.GroupResult(group_id, results)))

    def on_chord_part_return(self, request: Any, state: str, result: Any, **kwargs: Any) -> None:
        """Count this header task; the worker whose count completes the chord calls the body."""
        gid = getattr(request, "group", None)
        if not gid or not getattr(request, "chord", None):
            return
        task_id = bytes_to_str(request.id)
        index = getattr(request, "group_index", None)
        counted = self._ensure_retryable(self.store.chord_part_done, gid, task_id, utc_now(), index)
        if counted is None:
            # Counted before (a redelivered task), or the chord completed or expired:
            # a repeat must not fire the body again.
            logger.warning(
                "celery-sqlresults: chord %s: part %s already counted or no counter row; ignored",
                gid,
                task_id,
            )
            return
        done, size = counted
        if size is None:
            size = request.chord.get("chord_size")
        if size is None or done < size:
            return  # not complete, or the size is still to come: its setter sees the count
        if done > size:
            logger.warning("celery-sqlresults: chord %s counted %d of %d parts", gid, done, size)
            return
        self._run_chord_body(gid, maybe_signature(request.chord, app=self.app))

    def _run_chord_body(self, gid: str, callback: Any) -> None:
        app = self.app
        deps = GroupResult.restore(gid, backend=self)
        if deps is None:  # a generated header: its parts as counted, in header order
            ids = self._ensure_retryable(self.store.chord_parts, gid)
            if ids:
                deps = self.app.GroupResult(gid, [self.app.AsyncResult(i) for i in ids])
        try:
            if deps is None:
                raise ChordError(f"GroupResult {gid} no longer exists")
            try:
                with allow_join_result():
                    values = deps.join_native(
                        timeout=app.conf.result_chord_join_timeout, propagate=True
                    )
            except Exception as exc:
                culprit = self._chord_culprit(deps)
                reason = f"Dependency {culprit} raised {exc!r}" if culprit else repr(exc)
                raise ChordError(reason) from exc
            try:
                app.amqp._retry_publish(callback.delay, values)
            except Exception as exc:
                raise ChordError(f"Callback error: {exc!r}") from exc
        except ChordError as exc:
            logger.error("celery-sqlresults: chord %s failed: %s", gid, exc)
            self.chord_error_from_stack(callback, exc)
        finally:
            if deps is not None:
                deps.delete(backend=self)
            self._ensure_retryable(self.store.chord_delete, gid)

    def _chord_culprit(self, deps: GroupResult) -> str | None:
        """Id of the first header task (in header order) that failed: one batch read."""
        ids = [r.id for r in deps.results if not isinstance(r, GroupResult)]
        failed = {
            task_id
            for task_id, meta in self.get_many(ids, max_iterations=1)
            if meta["status"] in states.PROPAGATE_STATES
        }
        return next((task_id for task_id in ids if task_id in failed), None)
