"""Addresses, sizes and names shared by the harness, the bench app and its workers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
#: MariaDB through mysqlclient, SQLAlchemy's default MySQL driver (C); both SQL backends use
#: it. ``BENCH_MYSQL_URL=mysql+pymysql://root@127.0.0.1:3306/test`` measures PyMySQL instead.
MYSQL_ADMIN = os.environ.get("BENCH_MYSQL_URL", "mysql+mysqldb://root@127.0.0.1:3306/test")
_DRIVER_NAMES = {"mysqldb": "mysqlclient", "pymysql": "PyMySQL"}
_MYSQL_DRIVER = make_url(MYSQL_ADMIN).get_driver_name()
#: ``BENCH_REDIS_RESULTS`` and ``BENCH_BROKER_URL`` move a run off databases others use.
REDIS_RESULTS = os.environ.get("BENCH_REDIS_RESULTS", "redis://127.0.0.1:6379/14")
BROKER = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/13")

#: Databases created (dropped first) on each server: one per SQL backend. Runs sharing a
#: server with others set ``BENCH_DB_PREFIX`` to keep to databases of their own.
_PREFIX = os.environ.get("BENCH_DB_PREFIX", "bench")
DB_SQL = f"{_PREFIX}_sql"
DB_DBPLUS = f"{_PREFIX}_db"

DATABASES = ("postgresql", "mysql", "sqlite")
BACKENDS = ("sql", "db", "redis")
LABELS = {"sql": "sql+", "db": "db+", "redis": "Redis"}
SERVER_TITLES = {"postgresql": "PostgreSQL", "mysql": "MariaDB", "sqlite": "SQLite"}
DB_TITLES = {
    "postgresql": "PostgreSQL",
    "mysql": f"MariaDB ({_DRIVER_NAMES.get(_MYSQL_DRIVER, _MYSQL_DRIVER)})",
    "sqlite": "SQLite",
}

#: Environment variables the bench app (and its workers) read.
ENV_BACKEND = "BENCH_BACKEND"
ENV_BROKER = "BENCH_BROKER"
ENV_QUEUE = "BENCH_QUEUE"
ENV_RELAXED = "BENCH_RELAXED_COMMIT"  # "1": the worker runs with sqlresults_durable_commit off
ENV_NOTIFY_ROWS = "BENCH_NOTIFY_ROWS"  # "1"/"0": the worker's sqlresults_notify_rows (else auto)


@dataclass(frozen=True)
class Sizes:
    """How many operations each figure uses."""

    ops: int  # store/get calls per rate measurement
    dbplus_client_ops: int  # cap for db+ in a client process (NullPool: ~100 calls/s)
    read: int  # ids in the ResultSet read
    roundtrips: int  # add.delay().get() samples
    dbplus_roundtrips: int  # cap for db+ (.get() polls every 0.5 s)
    group: int  # tasks in the group
    chord: int  # header tasks in the chord
    big_chord: int  # header tasks in the big chord (one round)
    startup_repeats: int  # startup measurements per state (median reported)
    rounds: int  # repeats of figures 1-3, 5, 6, 8 (median reported); db+ in a client: 1
    publish: int  # apply_async calls per publish-rate measurement (figure 8)
    warmup: int = 10

    @classmethod
    def full(cls) -> Sizes:
        return cls(
            ops=1000,
            dbplus_client_ops=300,
            read=1000,
            roundtrips=200,
            dbplus_roundtrips=50,
            group=1000,
            chord=200,
            big_chord=2000,
            startup_repeats=5,
            rounds=3,
            publish=2000,
        )

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            ops=200,
            dbplus_client_ops=100,
            read=200,
            roundtrips=50,
            dbplus_roundtrips=20,
            group=200,
            chord=50,
            big_chord=200,
            startup_repeats=2,
            rounds=1,
            publish=300,
        )
