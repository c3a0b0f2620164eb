"""The Celery result-backend protocol, mapped onto :mod:`celery_sqlresults.store`.

Thin by design: this module turns Celery's calls into rows and rows back
into Celery's meta dicts; the SQL lives in ``store.py``, waiting in
``wait.py``, schema creation in ``startup.py``, the worker and beat hooks
in ``hooks.py``.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from celery import states
from celery.backends.base import BaseBackend
from celery.result import GroupResult, result_from_tuple
from celery.utils.time import maybe_timedelta
from kombu import serialization
from kombu.utils import json as kombu_json
from kombu.utils.encoding import bytes_to_str, ensure_bytes

from .chords import ChordMixin
from .exceptions import ResultTooLarge
from .publish import expect_publish
from .retries import RetryMixin
from .schema import utc_now
from .settings import Settings
from .startup import create_schema, try_schema
from .store import Store
from .wait import Notified, time_left, waiter_for

__all__ = ["SQLResultsBackend"]

logger = logging.getLogger("celery_sqlresults")

_PICKLE = "application/x-python-serialize"
#: First bytes that need Celery's full decode(): empty, compressed (Celery >= 5.7).
_SLOW_PREFIXES = (b"", b"\x00")
#: kombu's decoders by content type (what kombu.serialization.loads calls).
_DECODERS: Mapping[str, Any] = getattr(serialization.registry, "_decoders", {})
#: kombu's JSON decoding with one kept decoder (its loads() builds a JSONDecoder per call,
#: most of a column's cost); the same object hook, so kombu's registered types decode.
_KOMBU_JSON_DECODE = json.JSONDecoder(object_hook=kombu_json.object_hook).decode
#: kombu's codecs by serializer name: (content type, encoding, encoder), what dumps() calls.
_ENCODERS: Mapping[str, Any] = getattr(serialization.registry, "_encoders", {})
#: Characters of a traceback kept when it is too large for its column (MySQL TEXT: 64 KB).
_TRACEBACK_KEPT = 8000


class SQLResultsBackend(ChordMixin, RetryMixin, BaseBackend):
    """Celery result backend storing results in SQL tables Celery's ``db+`` also reads.

    Select it with ``result_backend = "sql+<SQLAlchemy URL>"``.
    """

    supports_native_join = True
    #: ``result_compression`` (Celery >= 5.7): the columns are binary, and reading
    #: goes by the payload's own marker, so compressed and plain rows mix freely.
    supports_result_compression = True
    #: ``result_failure_expires`` (Celery >= 5.7): cleanup() expires failures by their own age.
    supports_failure_expires = True
    #: ``ResultSet.iterate`` sleeps this long between ids; our joins batch instead.
    subpolling_interval = 0.005

    def __init__(
        self,
        app: Any = None,
        url: str | None = None,
        dburi: str | None = None,
        engine_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, expires_type=maybe_timedelta, url=url, **kwargs)
        conf = self.app.conf
        self.settings = Settings.from_app(self.app, url or dburi, engine_options)
        # Keep the URL Celery shows (as_uri masks the password).
        self.url = self.settings.url.render_as_string(hide_password=False)
        # Like Celery's db+: retry transient database errors unless told otherwise;
        # bounded by sqlresults_retry_timeout, and by a count only if one is set.
        if not conf.value_set_for("result_backend_always_retry"):
            self.always_retry = True
        if not conf.value_set_for("result_backend_max_retries"):
            self.max_retries = float("inf") if self.settings.retry_timeout else 10
        self._extended = bool(conf.find_value_for_key("extended", "result"))
        self._pickle_free = _PICKLE not in (self.accept or ())
        create_on_startup = self.settings.create_tables_on_startup
        self.store = Store(
            self.settings,
            create_schema=create_schema,
            on_new_database=try_schema if create_on_startup else None,
        )
        self._waiter = waiter_for(self.store)
        if create_on_startup:
            try_schema(self.store)

    @property
    def extended_result(self) -> bool:
        return self._extended

    # ---- tasks --------------------------------------------------------
    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        # The row is built here rather than from Celery's _get_result_meta(): that
        # dict is made for backends storing one serialized blob, and building it
        # (the app's clock in its timezone, a settings lookup, the args encoded
        # once more) is a large share of a store's CPU. tests/test_backend.py
        # checks the columns against Celery's meta for the same request.
        now = utc_now()
        children = self.current_task_children(request)
        row: dict[str, Any] = {
            "task_id": bytes_to_str(task_id),
            "status": state,
            "result": self.encode_value(result),
            "traceback": traceback,
            "date_done": now if state in self.READY_STATES else None,
            "children": self.encode_value(children) if children else None,
            "date_created": now,  # only if this insert creates the row
        }
        if state == states.STARTED:
            row["date_started"] = now
        if self.extended_result and request is not None:
            row.update(self._request_columns(request))
        # Ready states wake waiters; custom states (update_state's PROGRESS…) wake the
        # monitoring view's event streams. Celery's other states do not notify.
        notify = self._waiter.notifies and (
            state in self.READY_STATES or state not in states.ALL_STATES
        )
        try:
            self.store.store_task(row, notify=notify)
        except ResultTooLarge as exc:
            if "result" in exc.columns and state not in states.EXCEPTION_STATES:
                raise  # an EncodeError: the worker records a FAILURE saying why
            # Keep the state and what fits: only the columns at fault give way. A
            # failure whose own exception is too big is stored as this error instead.
            logger.error("celery-sqlresults: %s", exc)
            for column in exc.columns:
                row[column] = None
            if "result" in exc.columns:
                row["result"] = self.encode_value(self.prepare_exception(exc))
            if "traceback" in exc.columns and traceback:
                half = _TRACEBACK_KEPT // 2  # the frames, and the end of the error line
                row["traceback"] = f"{traceback[:half]}\n… (cut to fit) …\n{traceback[-half:]}"
            self.store.store_task(row, notify=notify)
        return result

    def _request_columns(self, request: Any) -> dict[str, Any]:
        """The ``result_extended`` columns for ``request``, as Celery's meta names them."""
        delivery_info = getattr(request, "delivery_info", None)
        stamps: Mapping[str, Any] = getattr(request, "stamps", None) or {}
        stamped = list(getattr(request, "stamped_headers", None) or ()) if stamps else []
        kept = {k: stamps[k] for k in stamped if k in stamps}
        return {
            "name": getattr(request, "task", None),
            "args": self.encode_value(getattr(request, "args", None)),
            "kwargs": self.encode_value(getattr(request, "kwargs", None)),
            "worker": getattr(request, "hostname", None),
            "retries": getattr(request, "retries", None),
            "queue": delivery_info.get("routing_key") if delivery_info else None,
            "stamps": (
                self.encode_value({"stamped_headers": stamped, "stamps": kept}) if stamped else None
            ),
        }

    def _get_task_meta_for(self, task_id: str) -> dict[str, Any]:
        row = self.store.get_task(bytes_to_str(task_id), self.extended_result)
        if row is None:
            return {
                "task_id": bytes_to_str(task_id),
                "status": states.PENDING,
                "result": None,
                "traceback": None,
                "date_done": None,
                "children": None,
            }
        return self._meta_from_row(row)

    def task_result_exists(self, task_id: str) -> bool:
        return bool(self._ensure_retryable(self.store.task_exists, bytes_to_str(task_id)))

    def _forget(self, task_id: str) -> None:
        self.store.forget(bytes_to_str(task_id))

    def cleanup(self) -> None:
        """Delete results older than ``result_expires`` (beat's ``celery.backend_cleanup``).

        With ``result_failure_expires`` (Celery >= 5.7), FAILURE results go by
        that age instead (0: never), even when ``result_expires`` is off.
        """
        now = utc_now()
        cutoff = None if not self.expires else now - _as_timedelta(self.expires)
        failures: datetime | Literal["same", "keep"] = "same"
        keep_failed = self.settings.failure_expires
        if keep_failed is not None:
            failures = now - keep_failed if keep_failed else "keep"
        if cutoff is None and not isinstance(failures, datetime):
            return
        deleted = self._ensure_retryable(self.store.cleanup, cutoff, failures=failures)
        logger.info("celery-sqlresults: cleanup removed expired rows %s", deleted)

    # ---- groups -------------------------------------------------------
    def _save_group(self, group_id: str, result: GroupResult) -> GroupResult:
        payload = self.encode_value(self.prepare_value(result))
        self.store.save_group(bytes_to_str(group_id), payload, utc_now())
        return result

    def _restore_group(self, group_id: str) -> dict[str, Any] | None:
        row = self.store.get_group(bytes_to_str(group_id))
        if row is None:
            return None
        value = self.decode_value(row["result"])
        return {
            "taskset_id": row["taskset_id"],
            "result": None if value is None else result_from_tuple(value, self.app),
            "date_done": _aware(row["date_done"]),
        }

    def _delete_group(self, group_id: str) -> None:
        self.store.delete_group(bytes_to_str(group_id))

    # ---- waiting ------------------------------------------------------
    def wait_for(
        self,
        task_id: str,
        timeout: float | None = None,
        interval: float = 0.5,
        no_ack: bool = True,
        on_interval: Any = None,
    ) -> dict[str, Any]:
        """Wait for one task: wake on NOTIFY (PostgreSQL) or poll, from a millisecond upwards."""
        self._ensure_not_eager()
        deadline = None if timeout is None else time.monotonic() + timeout
        task_id = bytes_to_str(task_id)
        with self._waiter.watch([task_id], interval) as wait:
            carried = None
            waited = False
            while True:
                if carried is not None:  # the notification brought the row: no read
                    meta = self._meta_from_row(carried)
                    if meta["status"] == states.SUCCESS:
                        self._cache[task_id] = meta  # as get_task_meta() would
                else:
                    wait.forget()  # this read sees anything notified so far
                    meta = self.get_task_meta(task_id)
                ready = meta["status"] in states.READY_STATES
                # After every wait, the one that brought the result too, as Celery's
                # Redis backend does: AsyncResult.get() checks the parents there, so a
                # failed chord header raises its own error, not the body's ChordError.
                if on_interval and (waited or not ready):
                    on_interval()
                if ready:
                    return meta
                carried = self._carried(task_id, wait(time_left(deadline)))
                waited = True

    def get_many(
        self,
        task_ids: Iterable[str],
        timeout: float | None = None,
        interval: float = 0.5,
        no_ack: bool = True,
        on_message: Any = None,
        on_interval: Any = None,
        max_iterations: int | None = None,
        READY_STATES: frozenset[str] = states.READY_STATES,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield ``(task_id, meta)`` as tasks become ready; one query per batch of ids."""
        interval = 0.5 if interval is None else interval
        pending = {bytes_to_str(t) for t in task_ids}
        for task_id in list(pending):
            cached = self._cache.get(task_id)
            if cached is not None and cached["status"] in READY_STATES:
                pending.discard(task_id)
                yield task_id, cached
        deadline = None if timeout is None else time.monotonic() + timeout
        if pending and self._waiter.idle:
            # One read before subscribing: a join of results that are all ready (what a
            # short-lived process mostly does) then never starts the listener, whose
            # connection and thread would cost more than the read. Ids still pending
            # are read again once subscribed, so nothing stored in between is missed.
            rows = self._ensure_retryable(self.store.get_ready, list(pending), self.extended_result)
            yield from self._take(rows, pending, on_message, READY_STATES)
        iterations = 0
        notified: Notified | None = None  # None: check every pending id
        with self._waiter.watch(pending, interval) as wait:
            while pending:
                rows = []
                ids = pending if notified is None else pending & notified.keys()
                if notified is not None:  # read only the rows no notification brought
                    rows = [r for t in ids if (r := self._carried(t, notified)) is not None]
                    ids = ids - {r["task_id"] for r in rows}
                if ids:
                    wait.forget(ids)  # this read sees anything notified so far about them
                    rows += self._ensure_retryable(
                        self.store.get_ready, list(ids), self.extended_result
                    )
                yield from self._take(rows, pending, on_message, READY_STATES)
                if not pending:
                    break
                if on_interval:
                    on_interval()
                iterations += 1
                if max_iterations and iterations >= max_iterations:
                    break
                notified = wait(time_left(deadline))

    def ready_metas(self, task_ids: Iterable[str]) -> list[dict[str, Any]]:
        """The meta of those of ``task_ids`` that are ready, in one query (retried).

        For waiters that do their own waiting, such as :mod:`celery_sqlresults.aio`.
        """
        rows = self._ensure_retryable(self.store.get_ready, list(task_ids), self.extended_result)
        metas = [self._meta_from_row(row) for row in rows]
        for meta in metas:
            if meta["status"] == states.SUCCESS:
                self._cache[meta["task_id"]] = meta
        return metas

    def carried_meta(self, task_id: str, notified: Notified | None) -> dict[str, Any] | None:
        """The meta a notification about ``task_id`` brought along, if it may be believed."""
        row = self._carried(task_id, notified)
        return None if row is None else self._meta_from_row(row)

    def _take(
        self,
        rows: Iterable[Mapping[str, Any]],
        pending: set[str],
        on_message: Any,
        ready_states: frozenset[str],
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """The ready ones of ``rows`` still ``pending``: taken off it, cached and yielded."""
        for row in rows:
            meta = self._meta_from_row(row)
            task_id = meta["task_id"]
            if task_id not in pending or meta["status"] not in ready_states:
                continue
            pending.discard(task_id)
            self._cache[task_id] = meta
            if on_message is not None:
                on_message(meta)
            yield task_id, meta

    def _carried(self, task_id: str, notified: Notified | None) -> Mapping[str, Any] | None:
        """The ready row a notification about ``task_id`` brought along, if it is taken."""
        body = notified.get(task_id) if notified else None
        return self.store.notices.ready_row(
            task_id, body, self.extended_result, accepts_pickle=not self._pickle_free
        )

    # ---- rows <-> meta ------------------------------------------------
    def _meta_from_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        decode = self.decode_value
        meta: dict[str, Any] = {
            "task_id": row["task_id"],
            "status": row["status"],
            "result": decode(row["result"]),
            "traceback": row["traceback"],
            "date_done": _aware(row["date_done"]),
            "children": decode(row.get("children")),
        }
        for key in ("name", "worker", "retries", "queue"):  # read only with result_extended
            if key in row:
                meta[key] = row[key]
        for key in ("args", "kwargs"):
            if key in row:
                meta[key] = decode(row[key])
        stamps = row.get("stamps")
        if stamps is not None:
            stamps = decode(stamps, quiet=True)
            if isinstance(stamps, dict):
                if "stamped_headers" in stamps:
                    meta["stamped_headers"] = stamps["stamped_headers"]
                if isinstance(stamps.get("stamps"), dict):
                    meta.update(stamps["stamps"])
        return self.meta_from_decoded(meta)

    def encode_value(self, data: Any) -> bytes:
        """``encode(data)`` as bytes, for a column.

        Celery's encode() goes through kombu's dumps(): a registry lookup and a
        context manager around the serializer's encoder, for each of the three
        or four encodes a store makes. Without compression, straight to that
        encoder; any error takes the full path, which raises kombu's own.
        """
        codec = None if getattr(self, "compression", None) else _ENCODERS.get(self.serializer)
        if codec is not None:
            try:
                payload = codec[2](data)
            except Exception:  # the full path below raises the proper EncodeError
                pass
            else:
                return payload if type(payload) is bytes else ensure_bytes(payload)
        return ensure_bytes(self.encode(data))

    def decode_value(self, payload: Any, quiet: bool = False) -> Any:
        """Decode a stored value with the result serializer.

        Rows written by very old Celery versions hold a raw pickle whatever the
        serializer; those are unpickled only if the app accepts pickle.
        """
        if payload is None:
            return None
        if type(payload) is not bytes:
            payload = ensure_bytes(payload)
        # Celery's decode() checks the payload for a compression marker and the
        # content type against accept_content on every call; most payloads need
        # neither: straight to the serializer's decoder.
        if payload[:1] not in _SLOW_PREFIXES and self.content_type in (self.accept or ()):
            fast = _DECODERS.get(self.content_type)
            if fast is not None:
                try:
                    if fast is kombu_json.loads:
                        return _KOMBU_JSON_DECODE(payload.decode("utf-8"))
                    return fast(payload)
                except Exception:  # the full path below raises the proper error
                    pass
        try:
            return self.decode(payload)
        except Exception:
            if payload[:1] == b"\x80" and _PICKLE in self.accept:
                return pickle.loads(payload)
            if quiet:
                return None
            raise

    def __reduce__(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = dict(kwargs or {})
        kwargs.update({"url": self.url, "expires": self.expires})
        return super().__reduce__(args, kwargs)

    # ---- record on publish (optional) ---------------------------------------
    def on_task_call(self, producer: Any, task_id: str) -> dict[str, Any]:
        """Celery calls this just before publishing a task whose result is kept.

        With ``sqlresults_record_on_publish`` the task is then stored as
        PENDING (see :mod:`celery_sqlresults.publish`); otherwise nothing happens.
        """
        if self.app.conf.get("sqlresults_record_on_publish"):
            expect_publish(self, task_id)
        return {}


def _as_timedelta(value: timedelta | float) -> timedelta:
    return value if isinstance(value, timedelta) else timedelta(seconds=float(value))


def _aware(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)
