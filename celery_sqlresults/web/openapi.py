"""The OpenAPI 3.1 document of the JSON API, written by hand (small and stable)."""

from __future__ import annotations

from typing import Any

__all__ = [
    "DETAIL_VALUE_BYTES",
    "LIST_VALUE_BYTES",
    "MAX_CURSOR",
    "MAX_TEXT",
    "NO_NUL",
    "STATES",
    "VALUE_FIELDS",
    "openapi_document",
]

# The request grammar, shared with the app so the document and the checks agree.
#: ``state``: task states, comma-separated, no spaces (or empty: any state). Custom states
#: (``update_state(state="PROGRESS")``) too: letters, digits, ``_``, ``.``, ``:``, ``-``.
STATES = r"^([A-Za-z0-9_.:-]{1,50}(,[A-Za-z0-9_.:-]{1,50})*)?$"
#: Text values (name, worker, ids): no NUL character, which PostgreSQL text cannot hold.
NO_NUL = r"^[^\x00]*$"
#: Longest ``name``/``worker`` pattern, and longest cursor, accepted.
MAX_TEXT, MAX_CURSOR = 255, 200
#: The values an answer bounds, and the route streaming any of them whole.
VALUE_FIELDS = ("args", "kwargs", "result", "traceback")
#: Largest value (stored bytes; characters for a traceback) given whole in a listing and in
#: one task's answer; a larger one is given as a preview of that many, with its size.
LIST_VALUE_BYTES, DETAIL_VALUE_BYTES = 1024, 256 * 1024


def _param(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _path_param(name: str) -> dict[str, Any]:
    schema = {"type": "string", "pattern": NO_NUL}
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _json(ref: str, description: str) -> dict[str, Any]:
    schema = {"$ref": f"#/components/schemas/{ref}"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_TIME = "Relative (90s, 30m, 1h, 7d, 2w: that long ago) or ISO-8601 (UTC if no offset)."
_TEXT = {"type": "string", "maxLength": MAX_TEXT, "pattern": NO_NUL}
_FILTERS = [
    _param("name", "Task name; * matches any text.", _TEXT),
    _param("worker", "Worker hostname; * matches any text.", _TEXT),
    _param("since", "Finished at or after this time. " + _TIME),
    _param("until", "Finished before this time. " + _TIME),
]
_ERRORS = {
    "400": _json("Error", "A value is invalid; the message starts with its name."),
    "401": _json("Error", "Authentication is configured and missing or wrong."),
    "503": _json("Error", "The result database is unavailable."),
}
_NULLABLE_STR = {"type": ["string", "null"]}
_EVENTS = (
    "text/event-stream. The first event, at once, and one more each time it changes: "
    "`event: {event}` with `data:` {what}, as JSON. Ends with `event: end` after {final}, or "
    "`event: timeout` after the app's stream_seconds (900 s by default; an EventSource "
    "reconnects and gets the current state first). `event: error` while the database is "
    "unavailable (the stream retries). Comment lines keep an idle stream open. On PostgreSQL "
    "ready and custom states (update_state's PROGRESS) are pushed by notifications, other "
    "changes within 2 s; elsewhere the state is polled, within 2 s."
)


def _stream(event: str) -> dict[str, Any]:
    """A Server-Sent Events answer; the schema is each event's, as OpenAPI 3.1 tools read it."""
    schema = {
        "type": "object",
        "properties": {
            "event": {"enum": [event, "end", "timeout", "error"]},
            "data": {"type": "string", "contentMediaType": "application/json"},
            "retry": {"type": "integer", "minimum": 0},
        },
    }
    return {
        "description": "The event stream.",
        "content": {"text/event-stream": {"schema": schema}},
    }


_BUSY = _json("Error", "Too many event streams are open, or the database is unavailable.")


def openapi_document() -> dict[str, Any]:
    """The document served at ``/openapi.json``."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "celery-sqlresults monitoring API",
            "version": "1",
            "description": "Read-only view of the task results a celery-sqlresults backend "
            "stores. With sqlresults_web_token or sqlresults_web_basic_auth set, every path "
            "but /healthz needs a Bearer token (or ?token=) or HTTP basic credentials.",
        },
        "paths": {
            "/api/tasks": {
                "get": {
                    "summary": "List stored task results, newest first (keyset pagination).",
                    "description": "Each of args, kwargs, result and traceback stored in more "
                    f"than {LIST_VALUE_BYTES} bytes (characters for a traceback) is not read "
                    "whole: the task gives it as null and its first part and size under "
                    "truncated. GET /api/raw/{field}/{task_id} streams it whole.",
                    "parameters": [
                        _param(
                            "state",
                            "Only these states, comma-separated without spaces (e.g. "
                            "FAILURE or SUCCESS,FAILURE; custom ones such as PROGRESS too). "
                            "Each matches as given or in upper case.",
                            {"type": "string", "pattern": STATES},
                        ),
                        *_FILTERS,
                        _param(
                            "limit",
                            "Rows per page (default 50).",
                            {"type": "integer", "minimum": 1, "maximum": 500},
                        ),
                        _param(
                            "cursor",
                            "The next_cursor of the previous page (opaque).",
                            {"type": "string", "maxLength": MAX_CURSOR},
                        ),
                    ],
                    "responses": {"200": _json("TaskPage", "One page of tasks."), **_ERRORS},
                }
            },
            "/api/tasks/{task_id}": {
                "get": {
                    "summary": "One stored task result.",
                    "description": "Values (args, kwargs, result, traceback) are given whole up "
                    f"to {DETAIL_VALUE_BYTES} stored bytes (characters for a traceback); a "
                    "larger one as null, with its first part and size under truncated. GET "
                    "/api/raw/{field}/{task_id} streams it whole.",
                    "parameters": [_path_param("task_id")],
                    "responses": {
                        "200": _json("Task", "The stored task."),
                        "404": _json("Error", "Nothing is stored for this task id."),
                        **_ERRORS,
                    },
                }
            },
            "/api/raw/{field}/{task_id}": {
                "get": {
                    "summary": "One stored value, whole, as it is stored (streamed).",
                    "description": "args, kwargs and result are the bytes the result "
                    "serializer wrote (JSON by default; a marker byte first when compressed), "
                    "traceback is UTF-8 text. Read from the database piece by piece, so a large "
                    "value is never held whole; sent as an attachment.",
                    "parameters": [
                        {
                            "name": "field",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "enum": list(VALUE_FIELDS)},
                        },
                        _path_param("task_id"),
                    ],
                    "responses": {
                        "200": {
                            "description": "The stored value.",
                            "content": {
                                "application/octet-stream": {
                                    "schema": {"type": "string", "format": "binary"}
                                },
                                "text/plain": {"schema": {"type": "string"}},
                            },
                        },
                        "404": _json("Error", "Nothing is stored for this task and field."),
                        **_ERRORS,
                    },
                }
            },
            "/api/stats": {
                "get": {
                    "summary": "Counts of stored results per state and per task name.",
                    "parameters": _FILTERS,
                    "responses": {"200": _json("Stats", "The counts."), **_ERRORS},
                }
            },
            "/api/groups/{group_id}": {
                "get": {
                    "summary": "A stored group: its members, their states and its progress.",
                    "parameters": [_path_param("group_id")],
                    "responses": {
                        "200": _json("Group", "The group."),
                        "404": _json("Error", "No group is stored with this id."),
                        "422": _json(
                            "Error",
                            "The stored group cannot be decoded by this app (a serializer "
                            "outside its accept_content).",
                        ),
                        **_ERRORS,
                    },
                }
            },
            "/api/tasks/{task_id}/events": {
                "get": {
                    "summary": "Server-Sent Events: the task as it changes (live progress).",
                    "description": _EVENTS.format(
                        event="task",
                        what="the task (a Task, values up to 1 KB as in listings; PENDING "
                        "with nulls while nothing is stored)",
                        final="a ready state (SUCCESS, FAILURE, REVOKED)",
                    ),
                    "parameters": [_path_param("task_id")],
                    "responses": {"200": _stream("task"), "401": _ERRORS["401"], "503": _BUSY},
                }
            },
            "/api/groups/{group_id}/events": {
                "get": {
                    "summary": "Server-Sent Events: the group's members as they change.",
                    "description": _EVENTS.format(
                        event="group",
                        what="the group (a Group, as /api/groups/{group_id} answers)",
                        final="every member ready",
                    ),
                    "parameters": [_path_param("group_id")],
                    "responses": {
                        "200": _stream("group"),
                        "404": _json("Error", "No group is stored with this id."),
                        "422": _json("Error", "The stored group cannot be decoded by this app."),
                        "401": _ERRORS["401"],
                        "503": _BUSY,
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics: results per state and task name, and "
                    "histograms of queue wait and run time over sqlresults_metrics_window.",
                    "responses": {
                        "200": {
                            "description": "Prometheus' text exposition format, or "
                            "OpenMetrics when the Accept header asks for it.",
                            "content": {
                                "text/plain": {"schema": {"type": "string"}},
                                "application/openmetrics-text": {"schema": {"type": "string"}},
                            },
                        },
                        "401": _ERRORS["401"],
                        "503": _ERRORS["503"],
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Whether the result database answers (never needs auth).",
                    "responses": {
                        "200": _json("Health", "The database answers."),
                        "503": _json("Health", "The database is unreachable."),
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {"error": {"type": "string"}},
                    "required": ["error"],
                },
                "Health": {
                    "type": "object",
                    "properties": {"ok": {"type": "boolean"}, "error": {"type": "string"}},
                    "required": ["ok"],
                },
                "Task": {
                    "type": "object",
                    "description": "Values are decoded with the app's serializer; what JSON "
                    "cannot hold (an exception, say) is given as its Python repr. name, worker, "
                    "queue, retries, args and kwargs need result_extended (or record on publish).",
                    "properties": {
                        "task_id": {"type": "string"},
                        "state": {"type": "string"},
                        "name": _NULLABLE_STR,
                        "worker": _NULLABLE_STR,
                        "queue": _NULLABLE_STR,
                        "retries": {"type": ["integer", "null"]},
                        "date_created": {
                            "type": ["string", "null"],
                            "format": "date-time",
                            "description": "When the row was first written: publish time with "
                            "record on publish, else the first state a worker stored.",
                        },
                        "date_started": {
                            "type": ["string", "null"],
                            "format": "date-time",
                            "description": "The last STARTED (task_track_started).",
                        },
                        "date_done": {"type": ["string", "null"], "format": "date-time"},
                        "args": {},
                        "kwargs": {},
                        "result": {},
                        "traceback": _NULLABLE_STR,
                        "truncated": {
                            "type": "object",
                            "description": "The values too large to give whole here (null "
                            "above), by field: their stored size (bytes; characters for a "
                            "traceback) and their first part as text (null if it is not UTF-8, "
                            "as pickle is not). Empty when every value is whole.",
                            "propertyNames": {"enum": list(VALUE_FIELDS)},
                            "additionalProperties": {
                                "type": "object",
                                "properties": {
                                    "size": {"type": "integer", "minimum": 0},
                                    "preview": _NULLABLE_STR,
                                },
                                "required": ["size", "preview"],
                            },
                        },
                    },
                    "required": ["task_id", "state", "truncated"],
                },
                "TaskPage": {
                    "type": "object",
                    "properties": {
                        "tasks": {"type": "array", "items": {"$ref": "#/components/schemas/Task"}},
                        "next_cursor": _NULLABLE_STR,
                    },
                    "required": ["tasks", "next_cursor"],
                },
                "Stats": {
                    "type": "object",
                    "properties": {
                        "states": {"type": "object", "additionalProperties": {"type": "integer"}},
                        "total": {"type": "integer"},
                        "names": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "name": _NULLABLE_STR,
                                    "states": {
                                        "type": "object",
                                        "additionalProperties": {"type": "integer"},
                                    },
                                    "total": {"type": "integer"},
                                },
                            },
                        },
                    },
                },
                "Group": {
                    "type": "object",
                    "properties": {
                        "group_id": {"type": "string"},
                        "members": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "task_id": {"type": "string"},
                                    "state": {"type": "string"},
                                    "name": _NULLABLE_STR,
                                    "date_done": {"type": ["string", "null"]},
                                },
                            },
                        },
                        "states": {"type": "object", "additionalProperties": {"type": "integer"}},
                        "progress": {
                            "type": "object",
                            "properties": {
                                "done": {"type": "integer"},
                                "total": {"type": "integer"},
                            },
                        },
                    },
                },
            },
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "basic": {"type": "http", "scheme": "basic"},
            },
        },
    }
