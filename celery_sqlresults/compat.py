"""The design note's workaround, kept working with our import path.

People paste::

    session = SessionManager()
    engine = session.get_engine(app.backend.url)
    session.prepare_models(engine)

With celery-sqlresults that is no longer needed (tables exist at start-up),
but the snippet, with ``from celery_sqlresults import SessionManager``, still
does what it says; :func:`create_tables` is the one-line version.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from .settings import Settings, database_url
from .startup import create_schema
from .store import Store

__all__ = ["SessionManager", "create_tables"]


def create_tables(app: Celery | None = None, url: str | None = None) -> list[str]:
    """Create (or complete) the result tables now, whatever the start-up setting says.

    Use it from a deploy step run by a user with CREATE rights. ``url`` is a
    SQLAlchemy URL (``sql+`` prefix optional); by default the app's backend
    configuration is used. Returns the names of the tables it created.
    """
    if app is None:
        from celery import current_app

        app = current_app
    return create_schema(Store(Settings.from_app(app, database_url(app, url))))


class SessionManager:
    """Look-alike of ``celery.backends.database.session.SessionManager``."""

    def __init__(self, app: Celery | None = None) -> None:
        self._app = app

    def _settings(self, url: Any, **options: Any) -> Settings:
        from celery import current_app

        app = self._app or current_app
        return Settings.from_app(app, database_url(app, str(_render(url))), options or None)

    def get_engine(self, dburi: Any, **kwargs: Any) -> Engine:
        """The pooled engine this process uses for ``dburi``."""
        return Store(self._settings(dburi, **kwargs)).engine

    def prepare_models(self, engine: Engine) -> list[str]:
        """Create the result tables in ``engine``'s database (no-op if they exist)."""
        return create_schema(Store(self._settings(engine.url)))

    def session_factory(self, dburi: Any, **kwargs: Any) -> Session:
        """An ORM ``Session`` on ``dburi`` after making sure the tables exist."""
        engine = self.get_engine(dburi, **kwargs)
        self.prepare_models(engine)
        return Session(engine)


def _render(url: Any) -> Any:
    render = getattr(url, "render_as_string", None)
    return render(hide_password=False) if render else url
