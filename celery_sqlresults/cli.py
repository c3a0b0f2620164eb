"""``celery results …``: schema commands, registered as a Celery CLI plugin.

``celery -A proj results init`` uses the app's configuration; ``--url``
works without an app. Importing this module (Celery does, through the
``celery.commands`` entry point, whenever its CLI starts) also connects the
worker/beat start-up hooks in :mod:`celery_sqlresults.startup`.
"""

from __future__ import annotations

import sys
from typing import Any

import click
import sqlalchemy as sa
from celery.exceptions import ImproperlyConfigured

from . import startup
from .compat import _app_url, _strip_prefix
from .exceptions import SQLResultsError
from .settings import Settings
from .store import Store

__all__ = ["results"]


def _store(ctx: click.Context, url: str | None) -> Store:
    from celery import current_app

    obj = ctx.find_root().obj
    app = getattr(obj, "app", None) or current_app
    raw = _strip_prefix(url or _app_url(app))
    try:
        return Store(Settings.from_app(app, raw))
    except ImproperlyConfigured as exc:
        raise click.ClickException(str(exc)) from None


_url_option = click.option(
    "--url", help="SQLAlchemy URL of the result database (default: the app's result_backend)."
)


@click.group(name="results")
def results() -> None:
    """Manage the celery-sqlresults result tables."""


@results.command()
@_url_option
@click.option("--sql", "print_sql", is_flag=True, help="Print the DDL instead of running it.")
@click.pass_context
def init(ctx: click.Context, url: str | None, print_sql: bool) -> None:
    """Create the result tables (and any missing columns) now."""
    store = _store(ctx, url)
    if print_sql:

        def emit(sql: Any, *_: Any, **__: Any) -> None:
            click.echo(f"{str(sql.compile(dialect=mock.dialect)).strip()};")

        mock = sa.create_mock_engine(store.settings.url, emit)
        store.tables.metadata.create_all(mock, checkfirst=False)
        return
    try:
        created = startup.create_schema(store)
    except (SQLResultsError, sa.exc.DBAPIError) as exc:
        raise click.ClickException(_one_line(exc)) from None
    names = ", ".join(created) if created else "nothing to create"
    click.echo(f"result tables ready at {store.settings.masked_url} ({names})")


@results.command()
@_url_option
@click.pass_context
def check(ctx: click.Context, url: str | None) -> None:
    """Exit 1 if result tables or columns are missing (for deploy pipelines)."""
    store = _store(ctx, url)
    try:
        with store.engine.connect() as conn:
            missing = [t.fullname for t in store.missing_tables(conn)]
            layout = None if missing else store.layout(conn)
    except sa.exc.DBAPIError as exc:
        raise click.ClickException(_one_line(exc)) from None
    if layout is not None:
        missing += [f"{t.fullname}.{c.name}" for t, c in store.missing_columns(layout)]
    if missing:
        click.echo(f"missing at {store.settings.masked_url}: {', '.join(missing)}")
        sys.exit(1)
    click.echo(f"result schema complete at {store.settings.masked_url}")


def _one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return " ".join(str(orig).split())
