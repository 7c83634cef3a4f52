"""Noting delivered results in the ledger, in batches.

The ledger counts deliveries so housekeeping can purge a result some time after its client got it. One write
transaction per delivered result would compete with submits and the worker for SQLite's write lock on every
request; instead the notes are gathered on the event loop and written in one transaction at most every
``FLUSH_INTERVAL_S``, off the loop. A note lost in a crash only means that result is kept until the purge of
never-fetched results.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from tinkerd.domain.errors import TinkerdError
from tinkerd.store import Store

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.5


class DeliveryLog:
    """Use on the event loop that serves requests."""

    def __init__(self, store: Store, interval_s: float = FLUSH_INTERVAL_S) -> None:
        self._store = store
        self._interval_s = interval_s
        self._pending: list[str] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def note(self, request_id: str) -> None:
        """`request_id`'s result was sent to its owner (who was checked when it was read)."""
        self._pending.append(request_id)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(self._interval_s, self._start_flush)

    def _start_flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._flush(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self, batch: list[str]) -> None:
        try:
            await asyncio.to_thread(self._store.futures.mark_delivered_many, batch)
        except TinkerdError as exc:  # the database stayed busy: the results are merely kept longer
            log.warning("could not note %d deliveries: %s", len(batch), exc)

    async def drain(self) -> None:
        """Write what is pending now (shutting down)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        batch, self._pending = self._pending, []
        if batch:
            with contextlib.suppress(TinkerdError):
                await asyncio.to_thread(self._store.futures.mark_delivered_many, batch)
