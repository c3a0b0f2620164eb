"""Native chords: an atomic counter per chord in the database, no ``celery.chord_unlock``.

``apply_chord`` stores the header group and a counter row; each finished
header task adds itself to the counter once (``Store.chord_part_done``), and
the one worker whose count completes the chord joins the header with one
batch read and sends the body.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import states
from celery.backends.base import BaseBackend
from celery.canvas import maybe_signature
from celery.exceptions import ChordError
from celery.result import GroupResult, allow_join_result
from kombu.utils.encoding import bytes_to_str

from .schema import utc_now
from .store import Store

__all__ = ["ChordMixin"]

logger = logging.getLogger("celery_sqlresults")


class ChordMixin(BaseBackend):
    """The chord side of Celery's backend protocol, on a backend with a store."""

    store: Store

    def apply_chord(self, header_result_args: Any, body: Any, **kwargs: Any) -> None:
        """Record the header group and a counter row; no ``celery.chord_unlock`` is ever sent."""
        self.ensure_chords_allowed()
        header = self.app.GroupResult(*header_result_args)
        self.save_group(header.id, header)
        self._ensure_retryable(self.store.chord_start, header.id, utc_now())

    def set_chord_size(self, group_id: str, chord_size: int) -> None:
        self._ensure_retryable(self.store.chord_set_size, group_id, chord_size)

    def on_chord_part_return(self, request: Any, state: str, result: Any, **kwargs: Any) -> None:
        """Count this header task; the worker whose count completes the chord calls the body."""
        gid = getattr(request, "group", None)
        if not gid or not getattr(request, "chord", None):
            return
        task_id = bytes_to_str(request.id)
        counted = self._ensure_retryable(self.store.chord_part_done, gid, task_id, utc_now())
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
        if size is not None and done < size:
            return
        deps = GroupResult.restore(gid, backend=self)
        if size is None and deps is not None and done < len(deps):
            return
        if size is not None and done > size:
            logger.warning("celery-sqlresults: chord %s counted %d of %d parts", gid, done, size)
            return
        self._run_chord_body(gid, request, deps)

    def _run_chord_body(self, gid: str, request: Any, deps: GroupResult | None) -> None:
        app = self.app
        callback = maybe_signature(request.chord, app=app)
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
