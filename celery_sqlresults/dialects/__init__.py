"""Everything that differs between PostgreSQL, MySQL/MariaDB and SQLite: one class each.

The rest of the package asks :func:`dialect_for` for a :class:`Dialect` and
never looks at a database or driver name itself. What MySQL does is in
``mysql.py``, what PostgreSQL does in ``postgresql.py``, what a MariaDB
Galera Cluster changes in ``galera.py``; ``base.py`` holds what they share.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.engine.interfaces import Dialect as SQLAlchemyDialect

from .base import Dialect, Expiry
from .galera import Galera
from .mysql import MySQL
from .postgresql import PostgreSQL, TransactionPooled
from .sqlite import SQLite

__all__ = [
    "SUPPORTED",
    "Dialect",
    "Expiry",
    "Galera",
    "MySQL",
    "PostgreSQL",
    "SQLite",
    "TransactionPooled",
    "dialect_for",
]

#: One instance each: dialects hold no state.
_BY_NAME: dict[str, Dialect] = {
    name: dialect for dialect in (PostgreSQL(), MySQL(), SQLite()) for name in dialect.names
}

#: Names a user may put in front of ``+driver`` in the URL.
SUPPORTED = tuple(_BY_NAME)


def dialect_for(target: URL | Connection | Engine | SQLAlchemyDialect | str) -> Dialect:
    """The :class:`Dialect` for a URL, a connection, an engine or an SQLAlchemy dialect.

    Raises :class:`LookupError` for a database this package does not support.
    """
    name: Any
    if isinstance(target, str):
        name = target
    elif isinstance(target, URL):
        name = target.get_backend_name()
    elif isinstance(target, (Connection, Engine)):
        name = target.dialect.name
    else:
        name = target.name
    dialect = _BY_NAME.get(name)
    if dialect is None:
        raise LookupError(name)
    return dialect
