"""Notifications of stored results: the payload a write sends, and what a waiter takes from it.

On PostgreSQL each ready-state write notifies its task table's channel in
the same statement (``PostgreSQL.notifying``). The payload is
``<length of task_id>:<task_id>``, then, where rows may travel
(``sqlresults_notify_rows``), the written columns as a JSON object (binary
values in base64, dates as ISO text), so a waiter need not read the row.
Everything about that payload is here: :meth:`Notices.payload` writes it,
:func:`split` parses it (every listening process parses every notification,
so cheaply), :meth:`Notices.row` decodes it and :meth:`Notices.ready_row`
decides whether a waiter may believe it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Literal

import sqlalchemy as sa
from celery import states
from sqlalchemy.exc import DBAPIError

from .fastpath import weight
from .schema import DATE_COLUMNS, EXTENDED_COLUMNS

__all__ = ["LIMIT", "ROLES_CHECKED_FOR", "Notices", "channel_for", "split"]

#: PostgreSQL refuses a notification payload of this many bytes or more.
LIMIT = 8000
#: Seconds ``sqlresults_notify_rows = "auto"`` trusts its look at the roles and grants.
ROLES_CHECKED_FOR = 60.0
#: Columns a notification's row must have to stand for a read (Celery's own meta).
_NEEDS = frozenset({"status", "result", "traceback", "date_done"})
#: Columns of a write that are not part of Celery's meta, so no notification carries them.
_NOT_CARRIED = frozenset({"id", "task_id", *DATE_COLUMNS})
#: json.dumps() with non-default arguments builds an encoder per call: one, kept.
_compact_json = json.JSONEncoder(separators=(",", ":")).encode


def channel_for(table: sa.Table) -> str:
    """The notification channel of a task table: stable, short, one per table."""
    digest = hashlib.sha1(table.fullname.encode()).hexdigest()[:12]
    return f"sqlresults_{digest}"


def split(payload: str) -> tuple[str, str | None]:
    """``<n>:<task_id><row>`` into the id and the row's JSON (``None`` if not carried).

    Only a waiter's own rows are ever decoded, by the waiter, from the JSON.
    """
    length, sep, rest = payload.partition(":")
    if not (sep and length.isascii() and length.isdigit()) or int(length) > len(rest):
        return payload, None  # not ours: a bare id, as NOTIFY sent by hand would be
    n = int(length)
    return rest[:n], rest[n:] or None


class Notices:
    """The notifications of one task table.

    ``mode`` is ``sqlresults_notify_rows``; ``ask`` answers whether every role
    that may connect may also read and write the table (asked of the database
    for ``"auto"``); ``columns`` gives the task columns the table has, if known.
    """

    def __init__(
        self,
        table: sa.Table,
        mode: bool | Literal["auto"],
        ask: Callable[[], bool],
        columns: Callable[[], frozenset[str] | None],
    ) -> None:
        self.table = table
        self.channel = channel_for(table)
        self._mode = mode
        self._ask = ask
        self._columns = columns
        self._binary = frozenset(c.name for c in table.c if isinstance(c.type, sa.LargeBinary))
        self._looked: tuple[float, bool] | None = None  # (when the roles were looked at, answer)

    # ---- writing --------------------------------------------------------
    def payload(self, row: Mapping[str, Any], carry: bool | None = None) -> str:
        """The payload for a written ``row``; ``carry`` (default: :meth:`rows_travel`)
        sends the row along.

        Only what this write stores travels (a column it leaves alone may hold
        an older value), which :meth:`row` checks against what its reader
        needs. The values are taken as stored: true of the columns Celery and
        we create (a ``timestamptz`` or a rounding ``timestamp(p)`` column
        made by hand would not be). A row too large for a notification sends
        the id alone, and its waiter reads the table.
        """
        task_id = row["task_id"]
        head = f"{len(task_id)}:{task_id}"
        if carry is None:
            carry = self.rows_travel()
        if not carry or weight(row) >= LIMIT:  # cannot fit: skip the encoding
            return head
        fields: dict[str, Any] = {}
        for name, value in row.items():
            if name in _NOT_CARRIED:
                continue
            if name in self._binary and value is not None:
                if type(value) is not bytes:  # what the reader could not decode as sent
                    return head
                value = base64.b64encode(value).decode("ascii")
            elif isinstance(value, datetime):
                if value.tzinfo is not None:  # our writers store naive UTC; anything else is read
                    return head
                value = value.isoformat(timespec="microseconds")  # what Python 3.10 parses
            fields[name] = value
        try:
            notice = head + _compact_json(fields)
        except (TypeError, ValueError):  # a value JSON cannot hold: the waiter reads the row
            return head
        return notice if len(notice.encode()) < LIMIT else head

    # ---- reading --------------------------------------------------------
    def row(self, task_id: str, body: str, extended: bool = True) -> dict[str, Any] | None:
        """The row a read would return, from a notification's JSON ``body``.

        ``None`` if the body is not one (a writer of another version), or lacks
        columns this reader reads (a writer without ``result_extended``): read
        the table.
        """
        needs = _NEEDS
        if extended:
            present = self._columns()
            needs = needs.union(c for c in EXTENDED_COLUMNS if present is None or c in present)
        try:
            fields = json.loads(body)
            if not isinstance(fields, dict) or not needs <= fields.keys():
                return None
            if not isinstance(fields["status"], str):
                return None
            row: dict[str, Any] = {"task_id": task_id}
            for column in self.table.c:
                name = column.name
                if name not in fields or (not extended and name in EXTENDED_COLUMNS):
                    continue
                value = fields[name]
                if value is not None and isinstance(column.type, sa.LargeBinary):
                    value = base64.b64decode(value)
                elif value is not None and isinstance(column.type, sa.DateTime):
                    value = datetime.fromisoformat(value)
                row[name] = value
        except (ValueError, TypeError):  # not what our writers send: read the table instead
            return None
        return row

    def ready_row(
        self, task_id: str, body: str | None, extended: bool, accepts_pickle: bool
    ) -> dict[str, Any] | None:
        """The ready row a notification brought along, if a waiter may take it.

        Only where rows may travel for this process too (:meth:`rows_travel`),
        and never for an app that accepts pickle: a notification is not a
        table, and any session of the database can send one.
        """
        if not body or accepts_pickle or not self.rows_travel():
            return None
        row = self.row(task_id, body, extended)
        return row if row is not None and row["status"] in states.READY_STATES else None

    # ---- trust ----------------------------------------------------------
    def rows_travel(self) -> bool:
        """Whether notifications carry rows, and rows they carry are believed.

        ``True``/``False`` as set; ``"auto"`` asks the database whether every
        role that may connect may also read and write the task table, and asks
        again after :data:`ROLES_CHECKED_FOR` seconds, so a role created since
        is noticed. Catalogs that cannot be read keep rows out.
        """
        if self._mode != "auto":
            return bool(self._mode)
        known = self._looked
        now = time.monotonic()
        if known is not None and now - known[0] < ROLES_CHECKED_FOR:
            return known[1]
        try:
            answer = bool(self._ask())
        except DBAPIError:
            answer = False
        self._looked = (now, answer)
        return answer
