"""``celery results …``: schema and result commands, registered as a Celery CLI plugin.

``celery -A proj results init`` uses the app's configuration; ``--url``
works without an app. ``show``, ``list``, ``stats``, ``cleanup`` and
``forget`` are thin wrappers around :class:`celery_sqlresults.query.ResultQuery`.
Importing this module (Celery does, through the ``celery.commands`` entry
point, whenever its CLI starts) also connects the worker/beat start-up hooks
in :mod:`celery_sqlresults.startup`.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

import click
import sqlalchemy as sa
from celery import Celery
from celery.exceptions import ImproperlyConfigured

from . import migrate, startup
from .backend import SQLResultsBackend
from .exceptions import SQLResultsError, one_line
from .query import ResultQuery, TaskRecord, parse_when
from .settings import Settings, database_url, mask_url
from .store import Store

__all__ = ["results"]


def _app(ctx: click.Context) -> Celery:
    from celery import current_app

    return getattr(ctx.find_root().obj, "app", None) or current_app


def _store(ctx: click.Context, url: str | None) -> Store:
    app = _app(ctx)
    raw = database_url(app, url)
    try:
        return Store(Settings.from_app(app, raw))
    except ImproperlyConfigured as exc:
        raise click.ClickException(str(exc)) from None


def _query(ctx: click.Context, url: str | None) -> ResultQuery:
    """A query with the app's serializer and table settings, on ``--url`` if given.

    The backend creates the tables when constructed; these commands must not
    (reading is no deploy step, that is ``init``), and a database that is down
    must give one error line, not a start-up warning first.
    """
    app = _app(ctx)
    raw = database_url(app, url)
    app.conf.update(database_create_tables_on_startup=False, database_create_tables_at_setup=False)
    try:
        return ResultQuery(SQLResultsBackend(app=app, url=raw))
    except ImproperlyConfigured as exc:
        raise click.ClickException(str(exc)) from None


@contextlib.contextmanager
def _database_errors(query: ResultQuery) -> Iterator[None]:
    """Database failures as one line naming the masked URL: no traceback, no password."""
    try:
        yield
    except sa.exc.SQLAlchemyError as exc:
        url = query.backend.settings.url
        raise click.ClickException(
            f"result database {mask_url(url)}: {_printable(one_line(exc, url))}"
        ) from None


def _when(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """Parse a time option, failing with one line (click's usage error would print three)."""
    if value is None:
        return None
    try:
        return parse_when(value)
    except ValueError as exc:
        raise click.ClickException(f"{param.opts[0]}: {exc}") from None


_url_option = click.option(
    "--url", help="SQLAlchemy URL of the result database (default: the app's result_backend)."
)


@click.group(name="results")
def results() -> None:
    """Manage the celery-sqlresults tables and the results stored in them."""


@results.command()
@_url_option
@click.option("--sql", "print_sql", is_flag=True, help="Print the DDL instead of running it.")
@click.pass_context
def init(ctx: click.Context, url: str | None, print_sql: bool) -> None:
    """Create the result tables, or upgrade them to the newest schema revision.

    Tables made by Celery's db+ backend are adopted in place. With --sql, print
    the SQL that creates everything on an empty database (for a DBA) instead.
    """
    store = _store(ctx, url)
    with _schema_errors(store):
        if print_sql:
            _echo_sql(lambda out: migrate.offline_sql(store, out))
            return
        with store.connect() as conn:
            missing = store.missing_tables(conn)
        _, after = startup.upgrade_schema(store)
        with store.connect() as conn:
            created = [t.fullname for t in missing if t not in store.missing_tables(conn)]
    names = ", ".join(created) if created else "nothing to create"
    click.echo(
        f"result tables ready at {store.settings.masked_url} ({names}); "
        f"schema revision {after.describe()}"
    )


_SQL_OPTION = click.option(
    "--sql",
    "print_sql",
    is_flag=True,
    help="Print the SQL from the database's current revision instead of running it.",
)


@results.command()
@_url_option
@_SQL_OPTION
@click.argument("revision", default="heads")
@click.pass_context
def upgrade(ctx: click.Context, url: str | None, revision: str, print_sql: bool) -> None:
    """Upgrade the result schema to REVISION (default: the newest), non-additive steps too."""
    store = _store(ctx, url)
    with _schema_errors(store):
        if print_sql:
            start = _current_for_sql(store)
            _echo_sql(lambda out: migrate.offline_sql(store, out, revision, start))
            return
        before, after = startup.upgrade_schema(store, revision)
    _report_move(store, "upgraded", before, after)


@results.command()
@_url_option
@_SQL_OPTION
@click.argument("revision")
@click.pass_context
def downgrade(ctx: click.Context, url: str | None, revision: str, print_sql: bool) -> None:
    """Downgrade the result schema to REVISION (e.g. 0001; base: drops our chord table only)."""
    store = _store(ctx, url)
    with _schema_errors(store):
        if print_sql:
            start = _current_for_sql(store)
            if start is None:
                raise click.ClickException(
                    f"the result schema at {store.settings.masked_url} is not versioned: "
                    "nothing to downgrade"
                )
            _echo_sql(lambda out: migrate.offline_downgrade_sql(store, out, start, revision))
            return
        before, after = startup.downgrade_schema(store, revision)
    _report_move(store, "downgraded", before, after)


def _current_for_sql(store: Store) -> str | None:
    """The revision offline SQL starts from: the database's (read, not changed).

    Offline SQL cannot inspect, so it cannot adopt ``db+`` tables: those need
    the online ``init``/``upgrade``.
    """
    with store.connect() as conn:
        status = migrate.status(store, conn)
        present = status.current is None and len(store.missing_tables(conn)) < len(store.tables.all)
    if status.newer:
        raise click.ClickException(
            f"the result schema at {store.settings.masked_url} is at {status.current}, newer "
            "than this celery-sqlresults knows"
        )
    if present:
        raise click.ClickException(
            f"unversioned result tables (Celery's db+) at {store.settings.masked_url}: --sql "
            "cannot adopt them; run `celery results init` without --sql"
        )
    return status.current


def _echo_sql(write: Callable[[io.StringIO], None]) -> None:
    sql = io.StringIO()
    write(sql)
    click.echo(sql.getvalue(), nl=False)


@results.command()
@_url_option
@click.pass_context
def current(ctx: click.Context, url: str | None) -> None:
    """Print the schema revision of the result tables."""
    store = _store(ctx, url)
    with _schema_errors(store), store.connect() as conn:
        status = migrate.status(store, conn)
    click.echo(status.describe())


@results.command()
@_url_option
@click.pass_context
def check(ctx: click.Context, url: str | None) -> None:
    """Exit 1 if tables or columns are missing or the schema is behind (for deploy pipelines)."""
    store = _store(ctx, url)
    with _schema_errors(store), store.connect() as conn:
        missing = [t.fullname for t in store.missing_tables(conn)]
        layout = None if missing else store.layout(conn)
        status = migrate.status(store, conn)
    where = store.settings.masked_url
    if layout is not None:
        missing += [f"{t.fullname}.{c.name}" for t, c in store.missing_columns(layout)]
    if missing:
        click.echo(f"missing at {where}: {', '.join(missing)}")
    if status.behind:
        fix = "upgrade" if status.current else "init"
        click.echo(f"schema revision at {where}: {status.describe()}: run `celery results {fix}`")
    if missing or status.behind:
        sys.exit(1)
    if status.newer:
        click.echo(f"schema revision at {where}: {status.describe()}")
    click.echo(f"result schema complete at {where} (revision {status.current})")


def _report_move(store: Store, verb: str, before: migrate.Status, after: migrate.Status) -> None:
    where = store.settings.masked_url
    if before.current == after.current:
        click.echo(f"result schema at {where} already at {after.describe()}")
    else:
        click.echo(f"{verb} result schema at {where} from {before.current} to {after.describe()}")


def _schema_error_types() -> tuple[type[BaseException], ...]:
    """What a schema command reports in one line. Alembic's errors are imported only
    here: every ``celery`` command imports this module, few of them run a migration."""
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

    return (sa.exc.SQLAlchemyError, SQLResultsError, CommandError, RevisionError, TimeoutError)


@contextlib.contextmanager
def _schema_errors(store: Store) -> Iterator[None]:
    """Schema command failures as one line: no traceback, no password."""
    try:
        yield
    except Exception as exc:
        if not isinstance(exc, _schema_error_types()):
            raise
        reason = _printable(one_line(exc, store.settings.url))  # it may quote a value
        raise click.ClickException(
            f"result database {store.settings.masked_url}: {reason}"
        ) from None


@results.command()
@_url_option
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def show(ctx: click.Context, url: str | None, task_id: str, as_json: bool) -> None:
    """Show the stored result of TASK_ID (exit 1 if none is stored)."""
    query = _query(ctx, url)
    with _database_errors(query):
        record = query.get(task_id)
    if record is None:
        raise click.ClickException(f"no result stored for task {_printable(task_id)}")
    if as_json:
        click.echo(_json(_as_dict(record)))
        return
    for key, value in _as_dict(record).items():
        if key != "traceback":
            label = "state" if key == "status" else key
            utc = " UTC" if isinstance(value, datetime) else ""
            click.echo(f"{label + ':':<14}{_text(value, key)}{utc}")
    if record.traceback:
        click.echo("traceback:")
        click.echo(_printable(record.traceback.rstrip(), keep_newlines=True))


@results.command(name="list")
@_url_option
@click.option("--state", multiple=True, help="Only these states, e.g. FAILURE (repeat or a,b).")
@click.option("--name", help="Only this task name; * matches any text.")
@click.option("--worker", help="Only this worker (hostname); * matches any text.")
@click.option("--since", callback=_when, help="Finished at or after: 1h, 30m, 7d, 2w or ISO-8601.")
@click.option("--until", callback=_when, help="Finished before: 1h, 30m, 7d, 2w or ISO-8601.")
@click.option("--limit", type=click.IntRange(min=0), default=50, show_default=True, help="0: all.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@click.pass_context
def list_(
    ctx: click.Context,
    url: str | None,
    state: tuple[str, ...],
    name: str | None,
    worker: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    as_json: bool,
) -> None:
    """List stored results, newest first."""
    wanted = [s.strip().upper() for value in state for s in value.split(",") if s.strip()]
    query = _query(ctx, url).filter(
        state=wanted or None, name=name, worker=worker, since=since, until=until
    )
    with _database_errors(query):
        # The table shows no values: do not read them (a result may be megabytes).
        records = query.limit(limit or None).all(values_up_to=None if as_json else 0)
    if as_json:
        click.echo(_json([_as_dict(r) for r in records]))
    elif records:
        _table(
            ("TASK ID", "STATE", "NAME", "WORKER", "DONE (UTC)"),
            [
                (r.task_id, r.status, _text(r.name), _text(r.worker), _text(r.date_done))
                for r in records
            ],
        )
    else:
        click.echo("no stored results match")


@results.command()
@_url_option
@click.option("--since", callback=_when, help="Only finished at or after: 1h, 7d or ISO-8601.")
@click.option("--by-name", is_flag=True, help="Count per task name and state.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def stats(
    ctx: click.Context, url: str | None, since: datetime | None, by_name: bool, as_json: bool
) -> None:
    """Count stored results per state (and per task name)."""
    query = _query(ctx, url).filter(since=since)
    counts: dict[str | None, dict[str, int]]
    with _database_errors(query):
        counts = query.stats(by_name=True) if by_name else {None: query.stats()}
    if as_json:
        click.echo(_json(counts if by_name else counts[None]))
        return
    rows = [(name, st, n) for name, per in counts.items() for st, n in per.items()]
    if by_name:
        _table(("NAME", "STATE", "COUNT"), [(_text(nm), st, str(n)) for nm, st, n in rows])
    else:
        _table(("STATE", "COUNT"), [(st, str(n)) for _, st, n in rows])
    click.echo(f"total: {sum(n for _, _, n in rows)}")


@results.command()
@_url_option
@click.option(
    "--older-than",
    default="7d",
    show_default=True,
    callback=_when,
    help="Age (30m, 1h, 7d, 2w) or ISO-8601 time; what finished before it goes.",
)
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@click.pass_context
def cleanup(ctx: click.Context, url: str | None, older_than: datetime, dry_run: bool) -> None:
    """Delete results, groups and chord counters older than --older-than."""
    query = _query(ctx, url)
    with _database_errors(query):
        counts = query.cleanup(older_than, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    click.echo(
        f"{verb} {counts['task']} task result(s), {counts['group']} group result(s) and "
        f"{counts['chord']} chord counter(s) from before {_text(older_than)} UTC"
    )


@results.command()
@_url_option
@click.argument("task_ids", nargs=-1, required=True)
@click.pass_context
def forget(ctx: click.Context, url: str | None, task_ids: tuple[str, ...]) -> None:
    """Delete the stored results of the given task ids."""
    query = _query(ctx, url)
    with _database_errors(query):
        n = query.forget(task_ids)
    click.echo(f"forgot {n} of {len(set(task_ids))} task result(s)")


# ---- output -----------------------------------------------------------------
#: Decoded values shown as Python literals, so ``"3"`` and ``3`` look different.
_REPR = ("args", "kwargs", "result")


def _as_dict(record: TaskRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in TaskRecord.__dataclass_fields__}


#: What a terminal may act on or reorder: C0 and C1 controls (ESC, CSI, OSC's BEL…), DEL,
#: and the bidirectional marks and overrides.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _printable(text: str, keep_newlines: bool = False) -> str:
    """``text`` from the database with its control characters written as escapes (``\\x1b``).

    A stored id, name or traceback holding ``ESC [2J`` or an OSC sequence must not
    clear the screen or retitle the terminal of whoever lists it.
    """

    def escape(match: re.Match[str]) -> str:
        char = match.group()
        if keep_newlines and char == "\n":
            return char
        return char.encode("unicode_escape").decode("ascii")

    return _CONTROL.sub(escape, text)


def _text(value: Any, key: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return _printable(repr(value) if key in _REPR else str(value))


def _json(value: Any) -> str:
    """JSON that always encodes: dates as ISO-8601, anything else (exceptions…) as repr."""

    def default(o: Any) -> Any:
        return o.isoformat() if isinstance(o, datetime) else repr(o)

    return json.dumps(value, default=default, indent=2)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    rows = [[_printable(cell) for cell in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    for line in (headers, *rows):
        click.echo("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


# ---- serve: the monitoring view (needs the "web" extra) -------------------------
@results.command()
@_url_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=5566,  # not Flower's 5555: both often run side by side
    show_default=True,
    help="TCP port.",
)
@click.pass_context
def serve(ctx: click.Context, url: str | None, host: str, port: int) -> None:
    """Serve the read-only monitoring page and JSON API over the stored results.

    Auth comes from the app's sqlresults_web_token / sqlresults_web_basic_auth.
    Only requests for --host (and the loopback names when it is a loopback
    address) are answered; sqlresults_web_allowed_hosts adds names, such as a
    proxy's.
    """
    import logging

    try:
        import uvicorn

        from .web import create_app, mask_token, serve_hosts
    except ImportError as exc:
        raise click.ClickException(
            f"'results serve' needs the web extra ({exc}): pip install 'celery-sqlresults[web]'"
        ) from None
    query = _query(ctx, url)
    try:
        web = create_app(query, allowed_hosts=serve_hosts(host))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None

    def mask_tokens(record: logging.LogRecord) -> bool:
        """Access-log lines must not show a ?token= value, however its name is encoded."""
        if isinstance(record.args, tuple):
            record.args = tuple(mask_token(a) if isinstance(a, str) else a for a in record.args)
        return True

    logging.getLogger("uvicorn.access").addFilter(mask_tokens)
    conf = query.backend.app.conf
    guarded = bool(conf.get("sqlresults_web_token") or conf.get("sqlresults_web_basic_auth"))
    click.echo(
        f"celery-sqlresults: results of {query.backend.settings.masked_url} at "
        f"http://{host}:{port}/ ({'auth required' if guarded else 'no auth'}; "
        f"hosts {', '.join(web.state.allowed_hosts)}, more with sqlresults_web_allowed_hosts)"
    )
    uvicorn.run(web, host=host, port=port, log_level="info")
