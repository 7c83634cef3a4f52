"""Persistence: SQLAlchemy Core over SQLite (default) or PostgreSQL. Never imports torch or the engine."""

from tinkerd.store.db import Database, DatabaseBusyError, RetryPolicy, default_url
from tinkerd.store.futures import Claim, FuturesLedger
from tinkerd.store.schema import SchemaVersionError
from tinkerd.store.store import Store

__all__ = [
    "Claim",
    "Database",
    "DatabaseBusyError",
    "FuturesLedger",
    "RetryPolicy",
    "SchemaVersionError",
    "Store",
    "default_url",
]
