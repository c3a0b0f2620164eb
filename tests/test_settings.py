"""Bad configuration gets a clear error naming the setting and the fix."""

from __future__ import annotations

from datetime import timedelta

import pytest
from celery import Celery
from celery.app.backends import by_url
from celery.exceptions import ImproperlyConfigured

from celery_sqlresults import SQLResultsBackend
from celery_sqlresults.settings import Settings


def app_with(**conf: object) -> Celery:
    app = Celery("s", set_as_current=False)
    app.conf.update(conf)
    return app


def test_entry_point_alias_resolves_to_our_backend() -> None:
    cls, url = by_url("sql+postgresql+psycopg://u@h/db")
    assert cls is SQLResultsBackend
    assert url == "postgresql+psycopg://u@h/db"


def test_class_path_with_database_url(tmp_path: object) -> None:
    app = app_with(
        result_backend="celery_sqlresults.backend:SQLResultsBackend",
        database_url=f"sqlite:///{tmp_path}/r.db",
    )
    assert isinstance(app.backend, SQLResultsBackend)
    assert app.backend.get_task_meta("unknown")["status"] == "PENDING"


def test_missing_url_names_the_settings() -> None:
    app = app_with(result_backend="celery_sqlresults.backend:SQLResultsBackend")
    with pytest.raises(ImproperlyConfigured, match="database_url") as err:
        app.backend  # noqa: B018
    assert "result_backend" in str(err.value)


def test_driver_not_installed_names_the_extra() -> None:
    # pg8000 is not a dependency of ours: the extra and the drivers it brings are named.
    with pytest.raises(ImproperlyConfigured, match=r"celery-sqlresults\[postgresql\]") as err:
        Settings.from_app(app_with(), "postgresql+pg8000://u:secret@h/db")
    assert "secret" not in str(err.value)
    assert "postgresql+psycopg" in str(err.value)


def test_unknown_dialect() -> None:
    with pytest.raises(ImproperlyConfigured, match="Unknown database dialect 'oracle'"):
        Settings.from_app(app_with(), "oracle://u:pw@h/db")
    with pytest.raises(ImproperlyConfigured, match="Unknown database dialect 'nosuchdb'"):
        Settings.from_app(app_with(), "nosuchdb://h/db")


def test_unknown_driver() -> None:
    with pytest.raises(ImproperlyConfigured, match="Unknown database driver"):
        Settings.from_app(app_with(), "postgresql+nosuchdriver://h/db")


def test_unparseable_url() -> None:
    with pytest.raises(ImproperlyConfigured, match="not a valid SQLAlchemy URL"):
        Settings.from_app(app_with(), "not a url at all")


@pytest.mark.parametrize(
    "names",
    [
        {"task": "bad name"},
        {"task": "x; DROP TABLE users"},
        {"group": '"quoted"'},
        {"task": "a" * 64},
        {"task": 42},
        {"task": "celery_taskmeta\n"},  # `$` alone would let a trailing newline through
    ],
)
def test_invalid_table_names(names: dict[str, object]) -> None:
    with pytest.raises(
        ImproperlyConfigured, match=r"database_table_names\[.*not a valid SQL identifier"
    ):
        Settings.from_app(app_with(database_table_names=names), "sqlite://")


def test_unknown_table_key() -> None:
    with pytest.raises(ImproperlyConfigured, match="unknown key 'tasks'"):
        Settings.from_app(app_with(database_table_names={"tasks": "t"}), "sqlite://")


def test_invalid_schema_name() -> None:
    with pytest.raises(ImproperlyConfigured, match="database_table_schemas"):
        Settings.from_app(app_with(database_table_schemas={"task": "a-b"}), "sqlite://")
    with pytest.raises(ImproperlyConfigured, match="database_table_schemas"):
        Settings.from_app(app_with(database_table_schemas={"task": "public\n"}), "sqlite://")


def test_conflicting_create_switches_name_both() -> None:
    app = app_with(database_create_tables_on_startup=True, database_create_tables_at_setup=False)
    with pytest.raises(ImproperlyConfigured) as err:
        Settings.from_app(app, "sqlite://")
    assert "database_create_tables_on_startup" in str(err.value)
    assert "database_create_tables_at_setup" in str(err.value)


@pytest.mark.parametrize(
    ("conf", "expected"),
    [
        ({}, True),
        ({"database_create_tables_on_startup": False}, False),
        ({"database_create_tables_at_setup": False}, False),
        ({"database_create_tables_at_setup": True}, True),
        (
            {"database_create_tables_on_startup": False, "database_create_tables_at_setup": False},
            False,
        ),
    ],
)
def test_create_switch(conf: dict[str, bool], expected: bool) -> None:
    assert Settings.from_app(app_with(**conf), "sqlite://").create_tables_on_startup is expected


@pytest.mark.parametrize("value", ["soon", -1, float("nan"), float("inf"), 10**9])
@pytest.mark.parametrize(
    "key", ["sqlresults_startup_timeout", "sqlresults_lock_timeout", "sqlresults_retry_timeout"]
)
def test_bad_timeout_value(key: str, value: object) -> None:
    """Finite and at most a week: PostgreSQL takes its timeouts as int32 milliseconds."""
    with pytest.raises(ImproperlyConfigured, match=f"{key} must be a number of seconds"):
        Settings.from_app(app_with(**{key: value}), "sqlite://")


@pytest.mark.parametrize("key", ["sqlresults_notify_rows", "sqlresults_durable_commit"])
def test_switches_must_be_booleans(key: str) -> None:
    """ "false" as a string would be truthy: refused, naming the setting."""
    with pytest.raises(
        ImproperlyConfigured, match=f"{key} must be True(,| or) False.*, got 'false'"
    ):
        Settings.from_app(app_with(**{key: "false"}), "sqlite://")
    assert getattr(Settings.from_app(app_with(**{key: False}), "sqlite://"), key[11:]) is False


def test_notify_rows_is_auto_unless_set() -> None:
    assert Settings.from_app(app_with(), "sqlite://").notify_rows == "auto"
    for value in ("auto", "AUTO"):
        settings = Settings.from_app(app_with(sqlresults_notify_rows=value), "sqlite://")
        assert settings.notify_rows == "auto"
    with pytest.raises(ImproperlyConfigured, match="True, False or 'auto', got 1"):
        Settings.from_app(app_with(sqlresults_notify_rows=1), "sqlite://")


@pytest.mark.parametrize(
    "value", ["soon", -1, float("nan"), 1e15, True, timedelta(seconds=-1), timedelta(days=10**6)]
)
def test_bad_failure_expires(value: object) -> None:
    with pytest.raises(ImproperlyConfigured, match="result_failure_expires must be a number of"):
        Settings.from_app(app_with(result_failure_expires=value), "sqlite://")


@pytest.mark.parametrize(
    ("value", "kept"),
    [(None, None), (0, timedelta(0)), (90, timedelta(seconds=90)), (timedelta(days=2),) * 2],
)
def test_failure_expires(value: object, kept: timedelta | None) -> None:
    """None: failures expire like the rest; 0: never (as Celery's Redis backend reads it)."""
    settings = Settings.from_app(app_with(result_failure_expires=value), "sqlite://")
    assert settings.failure_expires == kept


def test_engine_options_default_and_override() -> None:
    default = Settings.from_app(app_with(), "sqlite://").engine_options
    assert "pool_pre_ping" not in default  # Celery's default would add a round trip per call
    user = Settings.from_app(app_with(database_engine_options={"pool_pre_ping": True}), "sqlite://")
    assert user.engine_options == {"pool_pre_ping": True}


@pytest.mark.parametrize("level", ["READ COMMITTED", "SERIALIZABLE"])
def test_engine_options_refuse_transactions(level: str) -> None:
    """Writes are single statements that commit on their own: a transaction would lose them."""
    app = app_with(database_engine_options={"isolation_level": level})
    with pytest.raises(ImproperlyConfigured, match=f"isolation_level='{level}' is not supported"):
        Settings.from_app(app, "sqlite://")
    ok = app_with(database_engine_options={"isolation_level": "AUTOCOMMIT", "pool_size": 3})
    assert Settings.from_app(ok, "sqlite://").engine_options["pool_size"] == 3


def test_masked_url_hides_password() -> None:
    s = Settings.from_app(app_with(), "postgresql+psycopg://user:hunter2@db.example/x")
    assert "hunter2" not in s.masked_url
    assert "user" in s.masked_url


@pytest.mark.parametrize(
    "value", ["10m", 0, -5, float("nan"), float("inf"), 10**9, True, timedelta(0)]
)
def test_bad_metrics_window(value: object) -> None:
    with pytest.raises(
        ImproperlyConfigured, match=r"sqlresults_metrics_window must be a number of seconds.*above"
    ):
        Settings.from_app(app_with(sqlresults_metrics_window=value), "sqlite://")


@pytest.mark.parametrize(
    ("value", "seconds"), [(None, 600.0), (60, 60.0), (timedelta(hours=1), 3600.0), (0.5, 0.5)]
)
def test_metrics_window(value: object, seconds: float) -> None:
    settings = Settings.from_app(app_with(sqlresults_metrics_window=value), "sqlite://")
    assert settings.metrics_window == seconds
