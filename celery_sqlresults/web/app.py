"""The Starlette application: JSON API, health check, OpenAPI document and the page.

Read-only by design: every route is a GET over :class:`~celery_sqlresults.query.ResultQuery`.
Routes (all but ``/healthz`` behind the optional token / basic auth):

- ``GET /api/tasks?state=&name=&worker=&since=&until=&limit=&cursor=``: newest first,
  keyset-paginated (``next_cursor``);
- ``GET /api/tasks/{id}`` (404 if nothing is stored), ``GET /api/groups/{id}``,
  and their Server-Sent Events streams ``GET /api/tasks/{id}/events`` and
  ``GET /api/groups/{id}/events`` (:mod:`.events`);
  ``GET /api/stats?since=&until=&name=&worker=``;
- ``GET /api/raw/{field}/{id}``: one stored value whole, streamed (lists and the
  task route give large values as a bounded preview and their size);
- ``GET /metrics``: Prometheus' text format (:mod:`.metrics`);
- ``GET /healthz``: 200 ``{"ok": true}`` when the database answers, else 503;
- ``GET /openapi.json``, ``GET /`` (the page), ``GET /static/app.js``.

Bad query values answer 400 ``{"error": "…"}``; a database error answers 503
without details (they are logged, password masked).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import hmac
import ipaddress
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import sqlalchemy as sa
from celery import Celery, states
from celery.result import ResultSet
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..backend import SQLResultsBackend
from ..exceptions import one_line
from ..query import ResultQuery, TaskRecord, Truncated, Undecodable, parse_when
from ..settings import mask_url
from ..wait import waiter_for
from .events import MAX_STREAMS, STREAM_SECONDS, EventStreams, Read
from .metrics import exposition, registry_for
from .openapi import (
    DETAIL_VALUE_BYTES,
    LIST_VALUE_BYTES,
    MAX_CURSOR,
    MAX_TEXT,
    NO_NUL,
    STATES,
    VALUE_FIELDS,
    openapi_document,
)

__all__ = ["LOOPBACK_HOSTS", "create_app", "mask_token", "serve_hosts"]

logger = logging.getLogger("celery_sqlresults.web")

STATIC = Path(__file__).with_name("static")
#: Rows per page of ``/api/tasks``: default and maximum.
DEFAULT_LIMIT, MAX_LIMIT = 50, 500
#: Seconds a ``/api/stats`` answer is reused for the same query. Counting a whole
#: table is the one request that reads every row (docs/monitoring-benchmarks.md);
#: every open page asks every 2 s, so all of them together cost one count per
#: this many seconds.
STATS_TTL = 2.0
_STATS_KEEP = 64  # distinct stats queries remembered
#: Bytes (characters for a traceback) of a stored value read per statement by the raw route:
#: what one download holds at a time.
RAW_CHUNK = 512 * 1024
# The document's patterns, matched whole (``$`` would also allow a trailing newline).
_STATES = re.compile(STATES.strip("^$"))
_NO_NUL = re.compile(NO_NUL.strip("^$"))
_INTEGER = re.compile(r"[+-]?[0-9]+")
_MAX_DEPTH = 20


#: The ``Host`` names of this machine's loopback interface, the default ``allowed_hosts``.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
_HOST_NAME = re.compile(r"(\*\.)?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")


def serve_hosts(bind: str) -> list[str]:
    """The ``Host`` names a server listening on address ``bind`` is asked to serve.

    That address itself, and the loopback names too when it is a loopback
    address; listening on every address (``0.0.0.0``, ``::``) gives only the
    loopback names, since the names clients use cannot be known here: they go
    in ``sqlresults_web_allowed_hosts``.
    """
    try:
        ip = ipaddress.ip_address(bind.strip("[]"))
    except ValueError:
        return list(dict.fromkeys([bind.lower(), *(LOOPBACK_HOSTS if bind == "localhost" else ())]))
    if ip.is_unspecified:
        return list(LOOPBACK_HOSTS)
    named = f"[{ip}]" if ip.version == 6 else str(ip)
    return list(dict.fromkeys([named, *(LOOPBACK_HOSTS if ip.is_loopback else ())]))


def _hosts(value: str | Iterable[str], setting: str) -> list[str]:
    """Host names as the ``Host`` header carries them (IPv6 in brackets, no port), checked."""
    names = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for raw in names:
        name = raw.strip().lower() if isinstance(raw, str) else raw
        if not isinstance(name, str) or not name:
            raise ValueError(f"{setting}: {raw!r} is not a host name")
        try:
            ip = ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            if name != "*" and not _HOST_NAME.fullmatch(name):
                raise ValueError(
                    f"{setting}: {name!r} is not a host name, an IP address or a "
                    "'*.example.com' pattern: give the name alone, without scheme, port or path"
                ) from None
        else:
            name = f"[{ip}]" if ip.version == 6 else str(ip)
        out.append(name)
    return out


def mask_token(target: str) -> str:
    """``target`` (a path and query, as access logs show it) with every ``token`` value as ``***``.

    Names are compared decoded, as the app reads them, so ``?tok%65n=…`` is masked too.
    """
    path, sep, query = target.partition("?")
    if not sep:
        return target
    parts = query.split("&")
    for i, part in enumerate(parts):
        name = part.partition("=")[0]
        if unquote_plus(name) == "token":
            parts[i] = f"{name}=***"
    return f"{path}?{'&'.join(parts)}"


class BadRequest(ValueError):
    """A query value the API cannot use; answered with 400 and this message."""


def create_app(
    source: Celery | SQLResultsBackend | ResultQuery,
    *,
    token: str | None = None,
    basic_auth: str | None = None,
    allowed_hosts: Iterable[str] | None = None,
    stream_seconds: float = STREAM_SECONDS,
) -> Starlette:
    """The monitoring application over the results ``source`` stores.

    ``source`` is an app (its ``app.backend`` is used), a backend or a
    :class:`ResultQuery`. ``token`` (a Bearer token, or ``?token=``) and
    ``basic_auth`` (``"user:password"``) default to the app's
    ``sqlresults_web_token`` and ``sqlresults_web_basic_auth`` settings;
    when either is set, every route but ``/healthz`` requires one of them.

    Requests naming another ``Host`` than ``allowed_hosts`` (default:
    :data:`LOOPBACK_HOSTS`) or the app's ``sqlresults_web_allowed_hosts``
    are refused with 400, so a page on some other site cannot reach the view
    through a DNS name that points at it (DNS rebinding). Names may be
    ``*.example.com`` patterns; ``"*"`` accepts any host.

    An event stream closes after ``stream_seconds`` (its client reconnects).
    """
    query = source if isinstance(source, ResultQuery) else ResultQuery(source)
    conf = query.backend.app.conf
    token = token or conf.get("sqlresults_web_token") or None
    basic_auth = basic_auth or conf.get("sqlresults_web_basic_auth") or None
    if basic_auth is not None and ":" not in basic_auth:
        raise ValueError("sqlresults_web_basic_auth must be 'user:password'")
    hosts = [
        *_hosts(LOOPBACK_HOSTS if allowed_hosts is None else allowed_hosts, "allowed_hosts"),
        *_hosts(conf.get("sqlresults_web_allowed_hosts") or (), "sqlresults_web_allowed_hosts"),
    ]
    if not 0 < stream_seconds <= 86400:
        raise ValueError(
            f"stream_seconds must be above 0 and at most 86400, got {stream_seconds!r}"
        )
    api = _Api(query, EventStreams(waiter_for(query.store), stream_seconds))
    routes = [
        Route("/", api.page),
        Route("/static/app.js", api.script),
        Route("/openapi.json", api.openapi),
        Route("/healthz", api.healthz),
        Route("/metrics", api.metrics),
        Route("/api/tasks", api.tasks),
        # Before the {task_id:path} route, which would take ".../events" as part of an id.
        Route("/api/tasks/{task_id:path}/events", api.task_events),
        Route("/api/groups/{group_id:path}/events", api.group_events),
        Route("/api/tasks/{task_id:path}", api.task),
        Route("/api/stats", api.stats),
        Route("/api/groups/{group_id:path}", api.group),
        Route("/api/raw/{field}/{task_id:path}", api.raw),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            BadRequest: _bad_request,
            sa.exc.SQLAlchemyError: api.database_error,
            HTTPException: _http_error,
            Exception: _server_error,
        },
    )
    if token or basic_auth:
        app.add_middleware(_Auth, token=token, basic_auth=basic_auth)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts, www_redirect=False)
    app.add_middleware(_SafetyHeaders)  # added last: the outermost
    app.state.query = query
    app.state.allowed_hosts = hosts
    return app


class _Api:
    """The route handlers, bound to one query (and so one backend and engine)."""

    def __init__(self, query: ResultQuery, streams: EventStreams) -> None:
        self.query = query
        self.streams = streams
        self.registry = registry_for(query, query.backend.settings.metrics_window)
        self._stats: OrderedDict[tuple[Any, ...], tuple[float, dict[str, Any]]] = OrderedDict()
        self._stats_lock = threading.Lock()
        self.js = (STATIC / "app.js").read_text(encoding="utf-8")
        html = (STATIC / "index.html").read_text(encoding="utf-8")
        # The script is inlined so the page needs no second authenticated request;
        # the CSP allows exactly that script (by hash) and nothing else.
        self.html = html.replace("/*APP_JS*/", self.js)
        digest = base64.b64encode(hashlib.sha256(self.js.encode()).digest()).decode()
        self.csp = (
            f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'"
        )

    # ---- page ------------------------------------------------------------
    def page(self, request: Request) -> Response:
        return HTMLResponse(self.html, headers={"Content-Security-Policy": self.csp})

    def script(self, request: Request) -> Response:
        return Response(self.js, media_type="text/javascript")

    def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())

    # ---- API -------------------------------------------------------------
    def healthz(self, request: Request) -> Response:
        try:
            with self.query.reader.connect() as conn:  # what the view reads
                conn.execute(sa.text("SELECT 1"))
        except Exception as exc:
            self._log_error("health check", exc)
            return JSONResponse({"ok": False, "error": "result database unreachable"}, 503)
        return JSONResponse({"ok": True})

    def metrics(self, request: Request) -> Response:
        body, content_type = exposition(self.registry, request.headers.get("accept", ""))
        return Response(body, headers={"Content-Type": content_type})

    def tasks(self, request: Request) -> Response:
        params = request.query_params
        query = _filtered(self.query, params, state=True)
        limit = _int(params.get("limit"), "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        cursor = params.get("cursor") or None
        if cursor is not None and len(cursor) > MAX_CURSOR:
            raise BadRequest(
                f"cursor: at most {MAX_CURSOR} characters; use the next_cursor of a page"
            )
        try:
            query = query.after(cursor)
        except ValueError as exc:
            raise BadRequest(f"cursor: {exc}") from None
        records, cursor = query.page(limit, values_up_to=LIST_VALUE_BYTES)
        return JSONResponse({"tasks": [_task(r) for r in records], "next_cursor": cursor})

    def task(self, request: Request) -> Response:
        task_id = _text(request.path_params["task_id"], "task_id")
        record = self.query.get(task_id, values_up_to=DETAIL_VALUE_BYTES)
        if record is None:
            return JSONResponse({"error": f"no result stored for task {_shown(task_id)}"}, 404)
        return JSONResponse(_task(record))

    def raw(self, request: Request) -> Response:
        """One stored value whole, streamed: read :data:`RAW_CHUNK` at a time, never held whole."""
        field = request.path_params["field"]
        if field not in VALUE_FIELDS:
            raise BadRequest(
                f"field: must be one of {', '.join(VALUE_FIELDS)}, got {_shown(field)}"
            )
        task_id = _text(request.path_params["task_id"], "task_id")
        first = self.query.read_value(task_id, field, 0, RAW_CHUNK)
        if first is None:
            return JSONResponse({"error": f"no {field} stored for task {_shown(task_id)}"}, 404)
        head, total = first
        query = self.query

        def pieces() -> Iterator[bytes]:
            piece, sent = head, 0
            while True:
                yield piece.encode() if isinstance(piece, str) else piece
                sent += len(piece)
                if sent >= total:
                    return
                more = query.read_value(task_id, field, sent, RAW_CHUNK)
                if more is None or more[1] != total or not more[0]:
                    # Headers are out: all that is left is to cut the answer short.
                    raise RuntimeError(
                        f"the {field} of task {_shown(task_id)} changed while it was sent"
                    )
                piece = more[0]

        text = field == "traceback"
        headers = {
            "Content-Disposition": f'attachment; filename="{field}.{"txt" if text else "bin"}"'
        }
        if not text:  # a traceback's size is in characters, not bytes
            headers["Content-Length"] = str(total)
        media = "text/plain" if text else "application/octet-stream"
        return StreamingResponse(pieces(), media_type=media, headers=headers)

    def stats(self, request: Request) -> Response:
        params = request.query_params
        query = _filtered(self.query, params, state=False)
        # Keyed on what is counted, so parameters the route ignores (?x=…) or another
        # spelling of the same time (1h, 60m) cannot make every request a full count.
        key = (
            params.get("name") or None,
            params.get("worker") or None,
            *(_time_key(params.get(k) or None) for k in ("since", "until")),
        )
        now = time.monotonic()
        with self._stats_lock:
            cached = self._stats.get(key)
        if cached is not None and now - cached[0] < STATS_TTL:
            return JSONResponse(cached[1])
        body = self._count(query)
        with self._stats_lock:
            self._stats[key] = (now, body)
            self._stats.move_to_end(key)
            while len(self._stats) > _STATS_KEEP:  # the least recently counted go first
                self._stats.popitem(last=False)
        return JSONResponse(body)

    def _count(self, query: ResultQuery) -> dict[str, Any]:
        by_name = query.stats(by_name=True)
        per_state: dict[str, int] = {}
        names = []
        for name, counts in by_name.items():
            for state, n in counts.items():
                per_state[state] = per_state.get(state, 0) + n
            names.append({"name": name, "states": counts, "total": sum(counts.values())})
        return {"states": per_state, "total": sum(per_state.values()), "names": names}

    def group(self, request: Request) -> Response:
        group_id = _text(request.path_params["group_id"], "group_id")
        found = self._stored_group(group_id)
        if isinstance(found, Response):
            return found
        return JSONResponse(self._group(group_id, found))

    # ---- event streams ---------------------------------------------------
    def task_events(self, request: Request) -> Response:
        task_id = _text(request.path_params["task_id"], "task_id")
        query = self.query

        def read() -> tuple[dict[str, Any], bool]:
            record = query.get(task_id, values_up_to=LIST_VALUE_BYTES)
            if record is None:  # not stored yet (or forgotten): as Celery reads it
                return _unstored(task_id), False
            return _task(record), record.status in states.READY_STATES

        return self._stream([task_id], read, "task")

    def group_events(self, request: Request) -> Response:
        group_id = _text(request.path_params["group_id"], "group_id")
        found = self._stored_group(group_id)
        if isinstance(found, Response):
            return found
        ids = found

        def read() -> tuple[dict[str, Any], bool]:
            body = self._group(group_id, ids)
            return body, body["progress"]["done"] == body["progress"]["total"]

        return self._stream(ids, read, "group")

    def _stream(self, ids: list[str], read: Read, event: str) -> Response:
        if self.streams.full:
            message = f"{MAX_STREAMS} event streams are open: close one, or poll the JSON routes"
            return JSONResponse({"error": message}, 503)
        return StreamingResponse(
            self.streams.follow(ids, read, event),
            media_type="text/event-stream",
            headers={"X-Accel-Buffering": "no"},  # nginx: pass each event on at once
        )

    def _stored_group(self, group_id: str) -> list[str] | Response:
        """The member ids of a stored group, or the answer saying why there are none."""
        group = self.query.group(group_id)  # not backend.restore_group: that one retries
        if group is None:
            return JSONResponse({"error": f"no group stored with id {_shown(group_id)}"}, 404)
        if isinstance(group, Undecodable):
            reason = f"cannot be decoded by this app: {group.reason}"
            return JSONResponse({"error": f"group {_shown(group_id)} {reason}"}, 422)
        return _leaves(group)

    def _group(self, group_id: str, ids: list[str]) -> dict[str, Any]:
        records = self.query.get_many(ids, values_up_to=0)  # states and names: no values
        members: list[dict[str, Any]] = []
        counts: dict[str, int] = {}
        for task_id in ids:
            record = records.get(task_id)
            state = record.status if record else states.PENDING
            counts[state] = counts.get(state, 0) + 1
            members.append(
                {
                    "task_id": task_id,
                    "state": state,
                    "name": record.name if record else None,
                    "date_done": _jsonable(record.date_done) if record else None,
                }
            )
        done = sum(n for st, n in counts.items() if st in states.READY_STATES)
        return {
            "group_id": group_id,
            "members": members,
            "states": counts,
            "progress": {"done": done, "total": len(members)},
        }

    # ---- errors ----------------------------------------------------------
    async def database_error(self, request: Request, exc: Exception) -> Response:
        self._log_error(request.url.path, exc)
        return JSONResponse({"error": "result database unavailable"}, 503)

    def _log_error(self, what: str, exc: BaseException) -> None:
        url = self.query.backend.settings.url
        logger.warning("%s: result database %s: %s", what, mask_url(url), one_line(exc, url))


# ---- request parsing -----------------------------------------------------------
def _filtered(query: ResultQuery, params: Mapping[str, str], state: bool) -> ResultQuery:
    """``query`` with the filters named in the query string (400 on a bad value)."""
    wanted: list[str] | None = None
    if state and params.get("state"):
        if not _STATES.fullmatch(params["state"]):
            raise BadRequest(
                f"state: {_shown(params['state'])} is not a task state like SUCCESS or FAILURE "
                "(several: comma-separated, no spaces)"
            )
        # As given (a custom state may be lower case) and upper case (failure: FAILURE).
        given = params["state"].split(",")
        wanted = list(dict.fromkeys([*given, *(v.upper() for v in given)]))
    name, worker = (params.get(key) or None for key in ("name", "worker"))
    for key, value in (("name", name), ("worker", worker)):
        if value is not None and len(value) > MAX_TEXT:
            raise BadRequest(f"{key}: at most {MAX_TEXT} characters")
        if value is not None:
            _text(value, key)
    since, until = (_time(params, key) for key in ("since", "until"))
    return query.filter(state=wanted or None, name=name, worker=worker, since=since, until=until)


def _time(params: Mapping[str, str], key: str) -> datetime | None:
    value = params.get(key) or None
    try:
        return None if value is None else parse_when(value)
    except ValueError:  # parse_when's message repeats the whole value
        raise BadRequest(
            f"{key}: invalid time {_shown(value or '')}: use a relative time like 30m, 1h, 7d "
            "or 2w, or an ISO-8601 time like 2024-05-01T12:00:00Z"
        ) from None


_ANCHOR = datetime(2000, 1, 1, tzinfo=timezone.utc)


def _time_key(value: str | None) -> tuple[str, Any] | None:
    """What a (valid) time filter means, however it is written: an age or a moment.

    Read at two different "now"s: a moment stays put, an age moves with them.
    """
    if value is None:
        return None
    at = parse_when(value, now=_ANCHOR)
    if at == parse_when(value, now=_ANCHOR + timedelta(days=1)):
        return ("at", at)
    return ("ago", _ANCHOR - at)


def _text(value: str, name: str) -> str:
    """``value`` unless it holds a NUL character (PostgreSQL text cannot; no id or name has one)."""
    if not _NO_NUL.fullmatch(value):
        raise BadRequest(f"{name}: must not contain NUL characters")
    return value


def _int(value: str | None, name: str, default: int, low: int, high: int) -> int:
    """An integer in ASCII digits: ``int()`` would also take `` 5``, ``5_0`` or Arabic digits."""
    if value is None:
        return default
    if not _INTEGER.fullmatch(value):
        raise BadRequest(f"{name}: {_shown(value)} is not a whole number")
    n = int(value) if len(value) <= 20 else None  # int() refuses over 4300 digits
    if n is None or not low <= n <= high:
        raise BadRequest(f"{name}: must be between {low} and {high}, got {_shown(value)}")
    return n


def _shown(value: str, limit: int = 60) -> str:
    """``value`` for an error message: its repr, cut short (a message must not echo megabytes)."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


# ---- responses -----------------------------------------------------------------
#: Headers on every answer, errors included: no sniffing, no caching of task data, no
#: ``Referer`` carrying the page's ``?token=`` anywhere, no framing; a page sets its own CSP.
SAFETY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
}


class _SafetyHeaders:
    """Add :data:`SAFETY_HEADERS` to every answer that does not set them itself.

    Outermost of the app's middleware, so refusals (host, auth) and error answers get
    them too; a handler's own value (the page's CSP) wins.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SAFETY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _task(record: TaskRecord) -> dict[str, Any]:
    """A task as JSON: values decoded, anything JSON cannot hold (exceptions…) as its repr.

    A value read only in part (:class:`Truncated`) is ``null``, and its size and
    first part go under ``truncated``.
    """
    body: dict[str, Any] = {
        "task_id": record.task_id,
        "state": record.status,
        "name": record.name,
        "worker": record.worker,
        "queue": record.queue,
        "retries": record.retries,
        "date_created": _jsonable(record.date_created),
        "date_started": _jsonable(record.date_started),
        "date_done": _jsonable(record.date_done),
    }
    truncated: dict[str, dict[str, Any]] = {}
    for field in VALUE_FIELDS:
        value = getattr(record, field)
        if isinstance(value, Truncated):
            truncated[field] = {"size": value.size, "preview": _preview(value.head)}
            value = None
        body[field] = value if field == "traceback" else _jsonable(value)
    body["truncated"] = truncated
    return body


def _unstored(task_id: str) -> dict[str, Any]:
    """A task with nothing stored, as :func:`_task` gives one: ``PENDING``, as Celery says."""
    body: dict[str, Any] = {"task_id": task_id, "state": states.PENDING}
    for key in ("name", "worker", "queue", "retries", "date_created", "date_started"):
        body[key] = None
    body.update({"date_done": None, **dict.fromkeys(VALUE_FIELDS), "truncated": {}})
    return body


def _preview(head: bytes | str) -> str | None:
    """The first part of a stored value as text; ``None`` if it is no UTF-8 (pickle…)."""
    if isinstance(head, str):
        return head
    try:  # not final: the cut may have split the last character
        return codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return None


def _jsonable(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if depth < _MAX_DEPTH and isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value]
    if depth < _MAX_DEPTH and isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    return repr(value)


def _leaves(group: ResultSet) -> list[str]:
    """Task ids of a group in order, nested groups flattened."""
    out: list[str] = []
    results: Iterable[Any] = group.results or ()
    for r in results:
        if isinstance(r, ResultSet):
            out.extend(_leaves(r))
        else:
            out.append(r.id)
    return out


async def _bad_request(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": str(exc)}, 400)


async def _server_error(request: Request, exc: Exception) -> Response:
    """A bug's answer; it bypasses the middleware, so it carries the safety headers itself."""
    return JSONResponse({"error": "internal server error"}, 500, headers=SAFETY_HEADERS)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)


# ---- authentication ----------------------------------------------------------------
class _Auth:
    """Require the token or the basic-auth credentials on every route but ``/healthz``."""

    def __init__(self, app: ASGIApp, token: str | None, basic_auth: str | None) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.basic = basic_auth.encode() if basic_auth else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz" or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        challenge = 'Basic realm="celery-sqlresults"' if self.basic else "Bearer"
        response = JSONResponse(
            {"error": "authentication required"}, 401, headers={"WWW-Authenticate": challenge}
        )
        await response(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        request = Request(scope)
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        scheme = scheme.lower()
        if self.token is not None:
            given = credentials if scheme == "bearer" else request.query_params.get("token", "")
            if given and hmac.compare_digest(given.strip().encode(), self.token):
                return True
        if self.basic is not None and scheme == "basic":
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True)
            except (binascii.Error, ValueError):
                return False
            return hmac.compare_digest(decoded, self.basic)
        return False
