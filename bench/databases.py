"""The benchmark's databases: created empty at start, one per SQL backend."""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from . import config


@dataclass(frozen=True)
class Target:
    """The two databases of one server: ``sql`` for our backend, ``db`` for Celery's."""

    kind: str
    sql_url: str  # SQLAlchemy URL, no backend prefix
    db_url: str

    def backend_url(self, backend: str) -> str:
        if backend == "sql":
            return "sql+" + self.sql_url
        if backend == "db":
            return "db+" + self.db_url
        return config.REDIS_RESULTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--databases`` and ``--out``, as every benchmark command takes them."""
    parser.add_argument(
        "--databases",
        default=",".join(config.DATABASES),
        help="comma-separated subset of: " + ",".join(config.DATABASES),
    )
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown report here")


def chosen(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The databases ``--databases`` names, in order; a usage error for unknown ones."""
    kinds = [k.strip() for k in args.databases.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(config.DATABASES))
    if unknown or not kinds:
        parser.error(f"--databases: unknown {unknown}; choose from {config.DATABASES}")
    if "mysql" in kinds:
        try:
            make_url(config.MYSQL_ADMIN).get_dialect().import_dbapi()
        except ImportError as exc:
            parser.error(
                f"MariaDB is measured through {config.MYSQL_ADMIN.split(':')[0]}, which is not "
                f"installed ({exc}): run `bash scripts/test.sh` once, or pip install -e "
                "'.[dev,mysqlclient]' (needs libmariadb-dev), or set "
                "BENCH_MYSQL_URL=mysql+pymysql://root@127.0.0.1:3306/test"
            )
    return kinds


def admin_engine(url: str) -> sa.Engine:
    """An engine outside any backend's pool, in autocommit, that keeps no connection."""
    return sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


def prepare(kind: str, tmp: Path) -> Target:
    """Drop and recreate ``bench_sql`` and ``bench_db`` on the server of ``kind``."""
    if kind == "sqlite":
        paths = [tmp / f"{name}.sqlite" for name in (config.DB_SQL, config.DB_DBPLUS)]
        for path in paths:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        return Target(kind, f"sqlite:///{paths[0]}", f"sqlite:///{paths[1]}")
    admin_url = config.PG_ADMIN if kind == "postgresql" else config.MYSQL_ADMIN
    engine = admin_engine(admin_url)
    try:
        with engine.connect() as conn:
            for name in (config.DB_SQL, config.DB_DBPLUS):
                force = " WITH (FORCE)" if kind == "postgresql" else ""
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}{force}")
                conn.exec_driver_sql(f"CREATE DATABASE {name}")
    finally:
        engine.dispose()
    base = make_url(admin_url)
    urls = [
        base.set(database=name).render_as_string(hide_password=False)
        for name in (config.DB_SQL, config.DB_DBPLUS)
    ]
    return Target(kind, urls[0], urls[1])


def empty_database(url: str) -> None:
    """Drop every table (and, on PostgreSQL, every sequence) of a benchmark database."""
    engine = admin_engine(url)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql("DROP SCHEMA public CASCADE")
                conn.exec_driver_sql("CREATE SCHEMA public")
                return
            metadata = sa.MetaData()
            metadata.reflect(conn)
            metadata.drop_all(conn)
    finally:
        engine.dispose()


def flush_redis() -> None:
    """Empty the result database and the broker database of the benchmark."""
    for url in (config.REDIS_RESULTS, config.BROKER):
        client = redis.Redis.from_url(url, socket_connect_timeout=5)
        try:
            client.flushdb()
        finally:
            client.close()


def server_versions(kinds: list[str]) -> dict[str, str]:
    """Version strings of the database servers in use and of Redis."""
    out: dict[str, str] = {}
    queries = {
        "postgresql": (config.PG_ADMIN, "SHOW server_version"),
        "mysql": (config.MYSQL_ADMIN, "SELECT VERSION()"),
    }
    #: The settings that decide whether a commit waits for the disk, and how much of a
    #: big table's pages stay in memory.
    flushing = {
        "postgresql": {
            "fsync": "SHOW fsync",
            "synchronous_commit": "SHOW synchronous_commit",
            "shared_buffers": "SHOW shared_buffers",
        },
        "mysql": {
            "innodb_flush_log_at_trx_commit": "SELECT @@innodb_flush_log_at_trx_commit",
            "innodb_buffer_pool_size": (
                "SELECT CONCAT(ROUND(@@innodb_buffer_pool_size / 1048576), 'MB')"
            ),
        },
    }
    for kind in kinds:
        if kind == "sqlite":
            out["SQLite"] = sqlite3.sqlite_version
            continue
        url, query = queries[kind]
        engine = admin_engine(url)
        try:
            with engine.connect() as conn:
                version = str(conn.exec_driver_sql(query).scalar())
                settings = ", ".join(
                    f"{name} {conn.exec_driver_sql(q).scalar()}"
                    for name, q in flushing[kind].items()
                )
        finally:
            engine.dispose()
        out[config.SERVER_TITLES[kind]] = f"{version} ({settings})"
    client = redis.Redis.from_url(config.REDIS_RESULTS, socket_connect_timeout=5)
    try:
        out["Redis"] = str(client.info("server")["redis_version"]) + _redis_persistence(client)
    finally:
        client.close()
    return out


def _redis_persistence(client: redis.Redis) -> str:
    """How Redis keeps what it is sent (a store is durable only with ``appendfsync always``)."""
    try:
        conf = _redis_config(client, "appendonly", "appendfsync", "save")
    except redis.RedisError:  # CONFIG may be renamed or disabled
        return ""
    if conf.get("appendonly") == "yes":
        how = f"append-only file, fsync {conf.get('appendfsync')}"
    else:
        how = "no append-only file"
    saves = conf.get("save") or ""
    how += f", snapshots {'every ' + saves if saves else 'off'}"
    return f" ({how})"


@contextlib.contextmanager
def redis_fsync_always() -> Iterator[bool]:
    """Redis made durable for a while: an append-only file flushed at every write.

    Yields whether Redis took the settings (``CONFIG`` may be disabled); the
    previous ones are put back afterwards. Turning the file on makes Redis
    write one (in its ``dir``) and it stays there, unused once turned off.
    """
    client = redis.Redis.from_url(config.REDIS_RESULTS, socket_connect_timeout=5)
    try:
        try:
            before = _redis_config(client, "appendonly", "appendfsync")
        except redis.RedisError:
            yield False
            return
        try:
            try:
                client.config_set("appendfsync", "always")
                client.config_set("appendonly", "yes")
                took = _aof_ready(client)
            except redis.RedisError:
                took = False
            yield took
        finally:
            client.config_set("appendonly", before["appendonly"])
            client.config_set("appendfsync", before["appendfsync"])
    finally:
        client.close()


def _redis_config(client: redis.Redis, *names: str) -> dict[str, str]:
    """The values of Redis settings ``names`` (``CONFIG GET``; raises if it is refused)."""
    conf: dict[str, str] = {}
    for name in names:
        conf.update(client.config_get(name))  # type: ignore[arg-type]
    return conf


def _aof_ready(client: redis.Redis, timeout: float = 60.0) -> bool:
    """Wait for the rewrite that turning the append-only file on starts; whether it worked."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = client.info("persistence")
        if not (info["aof_rewrite_in_progress"] or info["aof_rewrite_scheduled"]):
            return bool(info["aof_enabled"]) and info["aof_last_bgrewrite_status"] == "ok"
        time.sleep(0.05)
    return False
