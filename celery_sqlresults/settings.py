"""Every setting the backend reads, validated once, with its default.

Celery's own ``database_*`` settings keep their meaning; ours are prefixed
``sqlresults_`` except ``database_create_tables_on_startup``, the switch the
design note asked for.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Literal

from celery import Celery
from celery.exceptions import ImproperlyConfigured
from celery.utils.imports import symbol_by_name
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from .dialects import SUPPORTED, Dialect, dialect_for

__all__ = ["DEFAULTS", "Settings", "database_url", "mask_url"]

#: Our settings and their defaults (Celery's ``database_*`` ones are documented by Celery).
DEFAULTS: dict[str, Any] = {
    "database_create_tables_on_startup": True,
    "sqlresults_startup_timeout": 60.0,
    "sqlresults_schema_lock_timeout": 60.0,
    "sqlresults_lock_timeout": 30.0,
    "sqlresults_retry_timeout": 60.0,
    "sqlresults_notify": True,
    "sqlresults_notify_rows": "auto",
    "sqlresults_durable_commit": True,
    "sqlresults_metrics_window": 600.0,
    "sqlresults_pooler": None,
    "sqlresults_listen_url": None,
    "sqlresults_read_url": None,
    "sqlresults_galera": "auto",
}

#: ``sqlresults_pooler`` values: what stands between the backend and the database.
POOLERS = (None, "transaction")

#: Engine options used when the user has not set ``database_engine_options``.
#: Celery's default turns on ``pool_pre_ping``, a second round trip on every
#: call; we rely on retrying disconnect errors instead.
ENGINE_DEFAULTS: dict[str, Any] = {"pool_recycle": 3600}

_MAX_SECONDS = 7 * 24 * 3600.0
_MAX_EXPIRES = 100 * 365 * 86400.0
#: Matched with ``fullmatch``: ``match`` and ``$`` would also take a trailing newline.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_TABLE_KEYS = ("task", "group", "chord", "chord_part", "version")


def mask_url(url: str | URL) -> str:
    """The URL with its password replaced by ``***``: safe for logs and errors."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


def database_url(app: Celery, url: str | None = None) -> str | None:
    """``url``, else the app's ``result_backend`` (or ``database_url``), as a SQLAlchemy URL.

    The ``sql+``/``db+`` prefix of the ``result_backend`` form is accepted and
    taken off, so commands and helpers take either form.
    """
    if not url:
        backend = app.conf.result_backend
        url = backend if isinstance(backend, str) and "://" in backend else None
        url = url or app.conf.get("database_url")
    if url and "://" in url:
        scheme = url.split("://", 1)[0]
        if "+" in scheme and scheme.split("+", 1)[0] in ("sql", "db", "database"):
            return url.split("+", 1)[1]
    return url


@dataclass(frozen=True)
class Settings:
    """The validated configuration of one backend instance."""

    url: URL
    #: What differs on this URL's database (:mod:`celery_sqlresults.dialects`).
    dialect: Dialect
    engine_options: dict[str, Any] = field(default_factory=dict)
    engine_callback: Callable[[Any], None] | None = None
    table_names: dict[str, str] = field(default_factory=dict)
    table_schemas: dict[str, str | None] = field(default_factory=dict)
    create_tables_on_startup: bool = True
    startup_timeout: float = 60.0
    schema_lock_timeout: float = 60.0
    #: Seconds a statement waits for a lock another session holds (0: the server's default).
    lock_timeout: float = 30.0
    #: Seconds transient errors of one operation are retried for (0: no time bound).
    retry_timeout: float = 60.0
    notify: bool = True
    #: PostgreSQL notifications carry the written row (else the task id alone);
    #: "auto": when every role that may connect may also read and write the results.
    notify_rows: bool | Literal["auto"] = "auto"
    durable_commit: bool = True
    #: MariaDB Galera Cluster: ``"auto"`` asks the server (``wsrep_on``) at the first
    #: connection; ``True`` forces the Galera variant (``settings.dialect`` is it), ``False``
    #: never uses it.
    galera: bool | Literal["auto"] = "auto"
    #: Celery's ``result_failure_expires``: how long FAILURE results are kept, if set
    #: (``timedelta(0)``: for ever, as Celery's Redis backend reads 0).
    failure_expires: timedelta | None = None
    #: Seconds back from now whose finished tasks the ``/metrics`` histograms describe.
    metrics_window: float = 600.0
    #: ``sqlresults_pooler``: ``"transaction"`` behind PgBouncer's transaction mode, else None.
    pooler: str | None = None
    #: Where ``LISTEN`` connects: ``sqlresults_listen_url``, else ``url`` where a connection
    #: keeps its session (``None`` behind a transaction pooler: waiters poll).
    listen_url: URL | None = None
    #: ``sqlresults_read_url``: where listings, counts and the monitoring view read (a
    #: streaming replica); ``None``: ``url``. Stores and waiting never use it.
    read_url: URL | None = None

    @property
    def masked_url(self) -> str:
        return mask_url(self.url)

    @classmethod
    def from_app(
        cls,
        app: Celery,
        url: str | None = None,
        engine_options: Mapping[str, Any] | None = None,
    ) -> Settings:
        conf = app.conf
        parsed, dialect = _parse_url(url or conf.get("database_url"))
        galera = _galera(conf, dialect)
        if galera is True:
            dialect = dialect.galera() or dialect
        pooler = _pooler(conf)
        if pooler is not None:
            dialect = _pooled(dialect, pooler, parsed)
        return cls(
            url=parsed,
            dialect=dialect,
            engine_options=_engine_options(conf, engine_options),
            engine_callback=_engine_callback(conf.get("database_engine_callback")),
            table_names=_identifiers(conf.get("database_table_names"), "database_table_names"),
            table_schemas=_identifiers(
                conf.get("database_table_schemas"), "database_table_schemas"
            ),
            create_tables_on_startup=_create_switch(conf),
            startup_timeout=_seconds(conf, "sqlresults_startup_timeout"),
            schema_lock_timeout=_seconds(conf, "sqlresults_schema_lock_timeout"),
            lock_timeout=_seconds(conf, "sqlresults_lock_timeout"),
            retry_timeout=_seconds(conf, "sqlresults_retry_timeout"),
            notify=bool(_get(conf, "sqlresults_notify")),
            notify_rows=_notify_rows(conf),
            durable_commit=_durable_commit(conf, dialect),
            galera=galera,
            failure_expires=_failure_expires(conf.get("result_failure_expires")),
            metrics_window=_window(conf, "sqlresults_metrics_window"),
            pooler=pooler,
            listen_url=_listen_url(conf, parsed, dialect),
            read_url=_same_database(conf, "sqlresults_read_url", parsed, "a streaming replica"),
        )

    def for_reading(self) -> Settings:
        """These settings on :attr:`read_url` (themselves when there is none); the same
        dialect, so a replica behind the same kind of pooler is read the same way."""
        if self.read_url is None:
            return self
        return replace(self, url=self.read_url, read_url=None)


def _flag(conf: Any, key: str) -> bool:
    value = _get(conf, key)
    if not isinstance(value, bool):
        raise ImproperlyConfigured(f"{key} must be True or False, got {value!r}.")
    return value


def _true_false_auto(conf: Any, key: str) -> bool | Literal["auto"]:
    value = _get(conf, key)
    if isinstance(value, str) and value.lower() == "auto":
        return "auto"
    if not isinstance(value, bool):
        raise ImproperlyConfigured(f"{key} must be True, False or 'auto', got {value!r}.")
    return value


def _notify_rows(conf: Any) -> bool | Literal["auto"]:
    return _true_false_auto(conf, "sqlresults_notify_rows")


def _galera(conf: Any, dialect: Dialect) -> bool | Literal["auto"]:
    value = _true_false_auto(conf, "sqlresults_galera")
    if value is True and dialect.galera() is None:
        raise ImproperlyConfigured(
            "sqlresults_galera = True needs a MariaDB URL (mysql+pymysql:// or "
            "mysql+mysqldb://): Galera Cluster is MariaDB's. Remove the setting or fix "
            "result_backend."
        )
    return value


def _durable_commit(conf: Any, dialect: Dialect) -> bool:
    durable = _flag(conf, "sqlresults_durable_commit")
    refusal = None if durable else dialect.relaxed_commit_refusal()
    if refusal is not None:
        raise ImproperlyConfigured(refusal)
    return durable


def _pooler(conf: Any) -> str | None:
    value = _get(conf, "sqlresults_pooler")
    if isinstance(value, str) and value.lower() in ("none", "session", ""):
        return None  # a session pooler keeps sessions: nothing changes
    if value not in POOLERS:
        raise ImproperlyConfigured(
            f"sqlresults_pooler must be None or 'transaction' (PgBouncer's pool_mode = "
            f"transaction in front of the database), got {value!r}."
        )
    return str(value) if value is not None else None


def _pooled(dialect: Dialect, pooler: str, url: URL) -> Dialect:
    pooled = dialect.behind_pooler()
    if pooled is None:
        raise ImproperlyConfigured(
            f"sqlresults_pooler = {pooler!r} is for PostgreSQL behind PgBouncer; "
            f"{mask_url(url)!r} is not PostgreSQL: remove sqlresults_pooler."
        )
    return pooled


def _listen_url(conf: Any, url: URL, dialect: Dialect) -> URL | None:
    if _get(conf, "sqlresults_listen_url") is None:
        return url if dialect.keeps_sessions else None
    return _same_database(conf, "sqlresults_listen_url", url, "the server directly")


def _same_database(conf: Any, key: str, url: URL, what: str) -> URL | None:
    """Setting ``key``: another URL of ``url``'s database (``sql+`` taken off), or ``None``."""
    raw = _get(conf, key)
    if raw is None:
        return None
    try:
        listen = make_url(raw)
    except ArgumentError:
        listen = None
    if listen is not None and "+" in listen.drivername:
        scheme, rest = listen.drivername.split("+", 1)
        if scheme in ("sql", "db", "database"):
            listen = listen.set(drivername=rest)
    if listen is None or listen.get_backend_name() != url.get_backend_name():
        raise ImproperlyConfigured(
            f"{key} must be a URL of the same database that reaches {what} (e.g. "
            f"'postgresql+psycopg://user@db-host:5432/db'), got {mask_url(str(raw))!r}."
        )
    return listen


def _get(conf: Any, key: str) -> Any:
    value = conf.get(key)
    return DEFAULTS[key] if value is None else value


def _parse_url(raw: str | None) -> tuple[URL, Dialect]:
    if not raw:
        raise ImproperlyConfigured(
            "No database URL for the SQL result backend: set result_backend to "
            "'sql+<SQLAlchemy URL>' (e.g. 'sql+postgresql+psycopg://user@host/db' or "
            "'sql+sqlite:///results.db'), or set database_url."
        )
    try:
        url = make_url(raw)
    except ArgumentError as exc:
        raise ImproperlyConfigured(
            f"result_backend/database_url is not a valid SQLAlchemy URL: {mask_url(raw)!r} "
            f"({exc}). Expected e.g. 'sql+postgresql+psycopg://user@host/db'."
        ) from None
    try:
        dialect = dialect_for(url)
    except LookupError as exc:
        raise ImproperlyConfigured(
            f"Unknown database dialect {exc.args[0]!r} in result backend URL {mask_url(url)!r}: "
            f"celery-sqlresults supports {', '.join(SUPPORTED)}. "
            "Fix the scheme, e.g. 'sql+postgresql+psycopg://…'."
        ) from None
    try:
        url.get_dialect().import_dbapi()
    except NoSuchModuleError:
        raise ImproperlyConfigured(
            f"Unknown database driver {url.drivername!r} in result backend URL "
            f"{mask_url(url)!r}. Use e.g. postgresql+psycopg, mysql+pymysql or sqlite."
        ) from None
    except ImportError as exc:
        hint = dialect.install_hint(url.get_dialect().driver)
        raise ImproperlyConfigured(
            f"The database driver for {url.drivername!r} is not installed ({exc}): {hint}"
        ) from None
    return url, dialect


def _engine_options(conf: Any, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    user_set = (
        conf.value_set_for("database_engine_options") if hasattr(conf, "value_set_for") else False
    )
    base = dict(conf.get("database_engine_options") or {}) if user_set else dict(ENGINE_DEFAULTS)
    base.update(overrides or {})
    if not isinstance(base, dict):
        raise ImproperlyConfigured(
            "database_engine_options must be a dict of create_engine() options."
        )
    level = base.get("isolation_level", "AUTOCOMMIT")
    if str(level).upper() != "AUTOCOMMIT":
        raise ImproperlyConfigured(
            f"database_engine_options isolation_level={level!r} is not supported: every "
            "write of celery-sqlresults is one statement that must commit on its own, so "
            "its connections run in autocommit (schema changes open their own "
            "transactions). Remove isolation_level from database_engine_options."
        )
    return base


def _engine_callback(value: Any) -> Callable[[Any], None] | None:
    if isinstance(value, str):
        value = symbol_by_name(value)
    if value is not None and not callable(value):
        raise ImproperlyConfigured(
            f"database_engine_callback must be callable (or a dotted path to one), got {value!r}."
        )
    return value


def _identifiers(value: Any, setting: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ImproperlyConfigured(
            f"{setting} must be a dict like {{'task': 'my_taskmeta', 'group': 'my_groupmeta'}}, "
            f"got {value!r}."
        )
    out: dict[str, Any] = {}
    for key, name in value.items():
        if key not in _TABLE_KEYS:
            raise ImproperlyConfigured(
                f"{setting} has an unknown key {key!r}: use {' or '.join(map(repr, _TABLE_KEYS))}."
            )
        if name is None and setting == "database_table_schemas":
            out[key] = None
            continue
        if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
            raise ImproperlyConfigured(
                f"{setting}[{key!r}] = {name!r} is not a valid SQL identifier: use letters, "
                "digits and underscores, starting with a letter or underscore, at most 63 long."
            )
        out[key] = name
    return out


def _create_switch(conf: Any) -> bool:
    ours_set = conf.get("database_create_tables_on_startup") is not None
    celerys_set = hasattr(conf, "value_set_for") and conf.value_set_for(
        "database_create_tables_at_setup"
    )
    ours = bool(_get(conf, "database_create_tables_on_startup"))
    if not celerys_set:
        return ours
    celerys = bool(conf.get("database_create_tables_at_setup"))
    if ours_set and ours != celerys:
        raise ImproperlyConfigured(
            f"database_create_tables_on_startup={ours} and "
            f"database_create_tables_at_setup={celerys} disagree: they are the same switch "
            "for this backend, so set only one of them (or set both to the same value)."
        )
    return celerys


def _failure_expires(value: Any) -> timedelta | None:
    """Celery's ``result_failure_expires``: ``None`` = like other results, 0 = never (as Redis)."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        seconds = math.nan
    if not 0 <= seconds <= _MAX_EXPIRES:
        raise ImproperlyConfigured(
            "result_failure_expires must be a number of seconds or a timedelta, from 0 (failures "
            f"never expire, as in Celery) to {_MAX_EXPIRES / 86400 / 365:.0f} years, "
            f"got {value!r}."
        )
    return timedelta(seconds=seconds)


def _window(conf: Any, key: str) -> float:
    """A window of time: a positive number of seconds (or a timedelta) up to a week."""
    value = _get(conf, key)
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        seconds = math.nan
    if not 0 < seconds <= _MAX_SECONDS:
        raise ImproperlyConfigured(
            f"{key} must be a number of seconds (or a timedelta) above 0 and at most "
            f"{_MAX_SECONDS:.0f} (a week), e.g. 600 for the last 10 minutes, got {value!r}."
        )
    return seconds


def _seconds(conf: Any, key: str) -> float:
    value = _get(conf, key)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    # A finite bound the databases accept (PostgreSQL's timeouts are int32 milliseconds).
    if not 0 <= seconds <= _MAX_SECONDS:
        raise ImproperlyConfigured(
            f"{key} must be a number of seconds from 0 to {_MAX_SECONDS:.0f} (a week), "
            f"got {value!r}."
        )
    return seconds
