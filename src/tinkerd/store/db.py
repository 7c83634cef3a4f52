"""Engine creation, schema creation and transactions with retry on a busy database.

Every repository runs its work as a function of one Connection inside `Database.read` or `Database.write`, so a
transaction that hits a locked SQLite file (or a PostgreSQL serialization failure) can be rolled back and run
again whole. SQL stays portable; SQLite-only behaviour is confined to the pragmas and BEGIN handling below.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.pool import StaticPool

from tinkerd.domain.errors import CapacityError
from tinkerd.store.schema import ensure_schema

log = logging.getLogger(__name__)

T = TypeVar("T")

# Set on a Connection by `Database.write` so the begin hook can take SQLite's write lock up front.
_WRITE_OPTION = "tinkerd_write"
_POSTGRES_RETRYABLE = {"40001", "40P01"}  # serialization_failure, deadlock_detected
# The server went away or is not taking connections yet (a restart): admin_shutdown, crash_shutdown,
# cannot_connect_now; class 08 is connection_exception.
_POSTGRES_RESTARTING = {"57P01", "57P02", "57P03"}


class DatabaseBusyError(CapacityError):
    """The database stayed locked past the retry deadline; the client should retry later (429)."""


class RetryableConflict(Exception):
    """Raised inside a transaction when a concurrent writer changed rows we read; the transaction is re-run."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded by a total deadline rather than an attempt count."""

    first_delay_s: float = 0.005
    max_delay_s: float = 0.25
    deadline_s: float = 30.0


def default_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'tinkerd.db'}"


def with_driver(url: URL) -> URL:
    """`postgresql://` means psycopg 3 here (SQLAlchemy alone would pick psycopg2, which tinkerd does not ship)."""
    if url.drivername in ("postgresql", "postgres"):
        return url.set(drivername="postgresql+psycopg")
    return url


def is_retryable(exc: BaseException) -> bool:
    """Whether an error means "someone else holds the lock or won a race; try the whole transaction again"."""
    if isinstance(exc, RetryableConflict):
        return True
    # Errors raised by our connect hook reach us unwrapped; statement errors come wrapped in DBAPIError.
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    if isinstance(orig, sqlite3.OperationalError):
        code = getattr(orig, "sqlite_errorcode", None)
        if code is not None:
            # Extended codes (e.g. SQLITE_BUSY_SNAPSHOT) keep the primary code in the low byte.
            return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
        message = str(orig).lower()
        return "locked" in message or "busy" in message
    if not isinstance(exc, DBAPIError):
        return False
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code in _POSTGRES_RETRYABLE or is_disconnect(exc)


def is_disconnect(exc: BaseException) -> bool:
    """Whether a database server error means "the connection is gone or cannot be made now" (PostgreSQL restarting,
    a network blip): the transaction did not happen, or is to be found again by running it again (every
    transaction here is safe to run twice: see ``Database.write``)."""
    if not isinstance(exc, OperationalError | InterfaceError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    if isinstance(orig, sqlite3.Error):
        return False
    code = getattr(orig, "sqlstate", None)
    # No SQLSTATE: the client library failed to connect or lost the socket (psycopg's own OperationalError).
    return code is None or code.startswith("08") or code in _POSTGRES_RESTARTING


class Database:
    """An engine plus the transaction discipline every repository uses."""

    def __init__(
        self,
        url: str,
        *,
        busy_timeout_ms: int = 5000,
        retry: RetryPolicy | None = None,
        echo: bool = False,
    ) -> None:
        self.url = with_driver(make_url(url))
        self.retry = retry or RetryPolicy()
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self._retries = 0
        self._retries_lock = threading.Lock()
        self._disconnect_logged_at = 0.0
        self.engine = self._create_engine(busy_timeout_ms, echo)

    @property
    def retries(self) -> int:
        """How many times a transaction has been re-run because the database was busy (for metrics and tests)."""
        return self._retries

    def _create_engine(self, busy_timeout_ms: int, echo: bool) -> Engine:
        if not self.is_sqlite:
            # REPEATABLE READ: a read sees one snapshot (as on SQLite); a write that lost a race fails with a
            # serialization error, which `_run` retries whole. No pre-ping (a round trip before every transaction,
            # 8 of 49 statements per forward in the split deployment): a pooled connection that died with its
            # server fails its first statement as a disconnect, SQLAlchemy then discards every connection of the
            # pool made before it, and `_run` runs the transaction again on a new one.
            return create_engine(self.url, echo=echo, isolation_level="REPEATABLE READ", pool_size=10)
        database = self.url.database or ""
        in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
        if not in_memory:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {}
        if in_memory:
            # One shared connection, or every checkout would see its own empty database. Single-threaded use only.
            kwargs["poolclass"] = StaticPool
        engine = create_engine(
            self.url,
            echo=echo,
            # Pooled connections move between threads; sqlite3 itself is compiled thread-safe.
            connect_args={"check_same_thread": False, "timeout": busy_timeout_ms / 1000},
            **kwargs,
        )
        _install_sqlite_hooks(engine, busy_timeout_ms, in_memory)
        return engine

    def create_schema(self) -> None:
        """Create the schema in an empty database, or migrate an older one (store.schema).

        Raises SchemaVersionError for a database written by a newer tinkerd."""
        url_text = self.url.render_as_string(hide_password=True)
        self.write(lambda conn: ensure_schema(conn, url_text))

    def read(self, work: Callable[[Connection], T]) -> T:
        """Run `work` in a read transaction (one consistent snapshot), retrying while the database is busy."""
        return self._run(work, write=False)

    def write(self, work: Callable[[Connection], T]) -> T:
        """Run `work` in a write transaction, committed when it returns, re-run whole while the database is busy.

        `work` must have no effects outside the database: it may run more than once (also after a lost
        connection, when the first run may have committed; every transaction here finds its own earlier effect).
        """
        return self._run(work, write=True)

    def write_inserting(self, work: Callable[[Connection], T], attempts: int = 3) -> T:
        """`write` for a transaction that inserts a row unless it finds it: on PostgreSQL two of them can both miss
        the row and race to insert; the loser's unique violation means the row now exists, so it runs again and
        finds it. (SQLite serialises writers: no race.)"""
        for _ in range(attempts - 1):
            try:
                return self.write(work)
            except IntegrityError:
                continue
        return self.write(work)

    def _run(self, work: Callable[[Connection], T], *, write: bool) -> T:
        deadline = time.monotonic() + self.retry.deadline_s
        delay = self.retry.first_delay_s
        while True:
            try:
                with self.engine.connect() as conn:
                    if write:
                        conn = conn.execution_options(**{_WRITE_OPTION: True})
                    with conn.begin():
                        return work(conn)
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                now = time.monotonic()
                if now >= deadline:
                    what = "unreachable" if is_disconnect(exc) else "busy"
                    raise DatabaseBusyError(
                        f"the database stayed {what} for {self.retry.deadline_s:.1f}s; try again later"
                    ) from exc
                with self._retries_lock:
                    self._retries += 1
                if is_disconnect(exc):
                    # Worth an operator's eye (a restart of PostgreSQL), unlike a lock: once per second at most.
                    self._note_disconnect(exc)
                log.debug("database busy (%s); retrying in %.3fs", exc, delay)
                time.sleep(min(delay * (0.5 + random.random()), deadline - now))
                delay = min(delay * 2, self.retry.max_delay_s)

    def _note_disconnect(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._disconnect_logged_at >= 1.0:
            self._disconnect_logged_at = now
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0] if str(exc) else type(exc).__name__
            log.warning("lost the database connection (%s); reconnecting", reason)

    def dispose(self) -> None:
        self.engine.dispose()


def _install_sqlite_hooks(engine: Engine, busy_timeout_ms: int, in_memory: bool) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin (the module's legacy mode skips
        # BEGIN before SELECT, which breaks read snapshots).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cursor.execute("PRAGMA foreign_keys = ON")
            if not in_memory:
                # WAL: readers (long-polls) never block the writer, nor it them. Changing the mode needs a moment of
                # exclusive access, so only ask when it is not set yet (it persists in the file).
                mode = cursor.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() != "wal":
                    cursor.execute("PRAGMA journal_mode = WAL")
                # NORMAL is durable across process crashes in WAL mode; only an OS crash can lose the last commits.
                cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn: Connection) -> None:
        # A write transaction takes the write lock at BEGIN. A deferred one that reads and then writes cannot be
        # upgraded once another writer committed (SQLITE_BUSY_SNAPSHOT, which busy_timeout does not wait out).
        write = bool(conn.get_execution_options().get(_WRITE_OPTION))
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
