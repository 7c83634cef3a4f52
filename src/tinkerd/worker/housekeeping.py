"""Periodic chores, run on the worker's thread between jobs (so they never race an engine call).

- purge finished futures once delivered (and, much later, ones never fetched), so the ledger stays small;
- time out sessions whose client stopped sending heartbeats, and free the memory of every closed session's runs
  and samplers (saved checkpoints stay on disk);
- delete checkpoints whose TTL has passed: files first, then the row, so a crash in between leaves a row that the
  next round deletes again rather than files that nothing lists.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

from tinkerd.domain.errors import NotFoundError
from tinkerd.store.storage import CheckpointStorage
from tinkerd.store.store import Store
from tinkerd.worker.runtime import Runtime

log = logging.getLogger(__name__)
T = TypeVar("T")

_BATCH = 100  # rows per store query; a round handles at most a few batches so one chore cannot hog the worker
_MAX_BATCHES = 10


@dataclass(frozen=True)
class HousekeepingConfig:
    result_retention: timedelta = timedelta(minutes=15)  # a delivered result stays for retries this long
    undelivered_retention: timedelta = timedelta(days=1)  # a result nobody fetched is dropped after this
    # The SDK heartbeats every 10 s. Timing out frees the session's runs, and with them any training not yet saved,
    # while a LoRA adapter and its optimizer state cost only megabytes: err long (a laptop may sleep a while).
    session_timeout: timedelta = timedelta(minutes=30)
    # A run's requests wait this long for a seq_id that never arrives before they go ahead without it. The SDK sends
    # a request right after numbering it and retries a failed send for up to 5 minutes.
    sequence_gap_timeout: timedelta = timedelta(minutes=10)


@dataclass(frozen=True)
class Report:
    purged: int = 0
    timed_out: tuple[str, ...] = ()
    freed_runs: tuple[str, ...] = ()
    freed_samplers: tuple[str, ...] = ()
    expired: tuple[str, ...] = ()
    gaps_filled: dict[str, list[int]] = field(default_factory=dict)


class Housekeeper:
    def __init__(self, store: Store, runtime: Runtime, files: CheckpointStorage, config: HousekeepingConfig) -> None:
        self.store = store
        self.runtime = runtime
        self.files = files
        self.config = config

    def run(self) -> Report:
        """One round of every chore; a failing chore is logged and the others still run."""
        purged = self._guard("purging results", self._purge, 0)
        timed_out = self._guard("timing out sessions", self._time_out_sessions, [])
        runs, samplers = self._guard("freeing closed sessions", self._free_closed_sessions, ([], []))
        expired = self._guard("deleting expired checkpoints", self._delete_expired, [])
        gaps = self._guard("filling stale sequence gaps", self._fill_stale_gaps, {})
        return Report(purged, tuple(timed_out), tuple(runs), tuple(samplers), tuple(expired), gaps)

    @staticmethod
    def _guard(what: str, chore: Callable[[], T], default: T) -> T:
        try:
            return chore()
        except Exception:
            log.exception("housekeeping: %s failed", what)
            return default

    def _purge(self) -> int:
        return self.store.futures.purge(
            delivered_for=self.config.result_retention, undelivered_for=self.config.undelivered_retention
        )

    def _fill_stale_gaps(self) -> dict[str, list[int]]:
        filled = self.store.futures.fill_stale_gaps(self.config.sequence_gap_timeout)
        for model_id, seq_ids in filled.items():
            log.warning("model %s waited too long for seq_ids %s; its later requests go ahead", model_id, seq_ids)
        return filled

    def _time_out_sessions(self) -> list[str]:
        timed_out: list[str] = []
        seconds = int(self.config.session_timeout.total_seconds())
        for _ in range(_MAX_BATCHES):
            silent = self.store.sessions.find_silent(self.config.session_timeout, limit=_BATCH)
            for session in silent:
                self.store.sessions.time_out(session.id, session.owner, f"no heartbeat for {seconds} s")
                timed_out.append(session.id)
            if len(silent) < _BATCH:
                break
        if timed_out:
            log.info("timed out %d silent sessions", len(timed_out))
        return timed_out

    def _free_closed_sessions(self) -> tuple[list[str], list[str]]:
        runs: list[str] = []
        samplers: list[str] = []
        for session_id, owner in list(self.runtime.sessions_in_memory()):
            try:
                closed = self.store.sessions.get(session_id, owner).closed
            except NotFoundError:
                closed = True  # deleted: nothing can use its runs any more
            if closed:
                freed_runs, freed_samplers = self.runtime.free_session(session_id)
                runs += freed_runs
                samplers += freed_samplers
        if runs or samplers:
            log.info("freed %d runs and %d samplers of closed sessions", len(runs), len(samplers))
        return runs, samplers

    def _delete_expired(self) -> list[str]:
        deleted: list[str] = []
        for _ in range(_MAX_BATCHES):
            expired = self.store.checkpoints.list_expired(limit=_BATCH)
            for checkpoint in expired:
                self.files.delete(checkpoint.path)
                self.runtime.weights_cache.evict(checkpoint.path)
                with contextlib.suppress(NotFoundError):  # deleted by its owner meanwhile
                    self.store.checkpoints.delete(checkpoint.path, checkpoint.owner)
                deleted.append(checkpoint.tinker_path)
            if len(expired) < _BATCH:
                break
        if deleted:
            log.info("deleted %d expired checkpoints", len(deleted))
        return deleted
