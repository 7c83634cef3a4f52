"""The time leases are written and judged in: the database server's clock, so that processes on hosts whose clocks
disagree still agree on when a lease runs out.

Each process keeps its own UTC clock corrected by the offset it last measured against PostgreSQL's
``clock_timestamp()`` (half the round trip taken off), measured again every ``RESYNC_S``. A SQLite ledger is a file
on one host, whose processes share one clock: no offset.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta

from sqlalchemy import Connection, func, select

from tinkerd.domain.records import utc_now
from tinkerd.store.db import Database

log = logging.getLogger(__name__)

RESYNC_S = 60.0
# An offset this large is worth a line in the log: a lease is seconds long.
WARN_OFFSET = timedelta(seconds=1)


class LedgerClock:
    """Callable like ``utc_now``; see the module docstring."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._offset = timedelta(0)
        self._synced_at: float | None = None
        self._lock = threading.Lock()

    @property
    def offset(self) -> timedelta:
        """The database clock minus this host's, as last measured."""
        return self._offset

    def __call__(self) -> datetime:
        if not self._db.is_sqlite:
            now = time.monotonic()
            if self._synced_at is None or now - self._synced_at >= RESYNC_S:
                self._sync(now)
        return utc_now() + self._offset

    def _sync(self, monotonic_now: float) -> None:
        with self._lock:
            if self._synced_at is not None and monotonic_now - self._synced_at < RESYNC_S:
                return  # another thread measured meanwhile
            self._synced_at = monotonic_now  # measured or not, not again before RESYNC_S
            try:
                before = utc_now()
                server: datetime = self._db.read(_server_time)
                after = utc_now()
            except Exception as exc:  # the ledger unreachable: keep the last offset; the caller's own write will say
                log.warning("could not read the database clock (%s); keeping the last offset %s", exc, self._offset)
                return
            offset = server - (before + (after - before) / 2)
            if abs(offset) >= WARN_OFFSET and abs(offset - self._offset) >= WARN_OFFSET:
                log.warning("this host's clock is %.3f s behind the database server's; leases use the latter",
                            offset.total_seconds())  # fmt: skip
            self._offset = offset


def _server_time(conn: Connection) -> datetime:
    return conn.execute(select(func.clock_timestamp())).scalar_one()
