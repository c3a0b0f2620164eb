"""Optional "record on publish": a sent task is stored as PENDING right away.

Celery's backends store nothing until a worker picks a task up, so a task
waiting in the queue is indistinguishable from an unknown id. With
``sqlresults_record_on_publish = True`` the publishing process stores a
PENDING row with the task's name, args, kwargs (encoded like
``result_extended`` encodes them), queue and the time it was sent
(``date_created``, which later writes keep):

1. Celery calls :meth:`SQLResultsBackend.on_task_call` just before it
   publishes a task whose result is kept (never for ``ignore_result``); with
   the setting on, that calls :func:`expect_publish`, which remembers the
   backend and task id for this thread and connects the signal handler
   (once per process). With the setting off nothing is connected at all.
2. Celery's ``before_task_publish`` signal, sent next in the same thread
   with the message, runs :func:`_record`, which inserts the row *only if
   none exists*, so a later state (a fast worker's STARTED/SUCCESS) is never
   overwritten. Recording before publishing means the row is there before
   any worker can write.

A later state written by the worker updates its own columns only: without
``result_extended`` it does not write name/args/kwargs/queue, so the
recorded ones stay. A failure to record is logged and never stops the
publish. A publish that then fails leaves its PENDING row behind.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from celery import states
from celery.signals import before_task_publish
from kombu.utils.encoding import ensure_bytes

from .exceptions import one_line
from .schema import utc_now
from .settings import Settings
from .store import Store

__all__ = ["expect_publish"]

logger = logging.getLogger("celery_sqlresults")


class Recorder(Protocol):
    """What recording needs of the backend: its store, settings and serializer."""

    store: Store
    settings: Settings

    def encode(self, data: Any) -> Any: ...


_local = threading.local()
_connect_lock = threading.Lock()
_connected = False


def expect_publish(backend: Recorder, task_id: str) -> None:
    """Record ``task_id`` through ``backend`` when this thread publishes it next."""
    global _connected
    if not _connected:
        with _connect_lock:
            if not _connected:
                before_task_publish.connect(_record, weak=False, dispatch_uid=__name__)
                _connected = True
    _local.pending = (backend, task_id)


def _record(
    sender: str | None = None,
    body: Any = None,
    headers: dict[str, Any] | None = None,
    routing_key: str | None = None,
    **_: Any,
) -> None:
    """``before_task_publish`` handler: store the expected task as PENDING if it has no row."""
    pending = getattr(_local, "pending", None)
    if pending is None:
        return
    _local.pending = None
    backend, task_id = pending
    headers = headers or {}
    if isinstance(body, (tuple, list)) and len(body) >= 2:  # message protocol 2
        message_id, name, args, kwargs = headers.get("id"), headers.get("task"), body[0], body[1]
    elif isinstance(body, dict):  # protocol 1
        message_id, name, args, kwargs = (body.get(k) for k in ("id", "task", "args", "kwargs"))
    else:
        return
    if message_id != task_id:
        return
    now = utc_now()
    row = {
        "task_id": task_id,
        "status": states.PENDING,
        "date_created": now,
        "date_done": now,  # what cleanup() expires a never-run task by
        "name": name or sender,
        "args": ensure_bytes(backend.encode(args)),
        "kwargs": ensure_bytes(backend.encode(kwargs)),
        "queue": routing_key,
    }
    try:
        backend.store.insert_task_if_absent(row)
    except Exception as exc:
        logger.warning(
            "celery-sqlresults: could not record task %s as PENDING at %s: %s",
            task_id,
            backend.settings.masked_url,
            one_line(exc, backend.settings.url),
        )
