"""The training runs requests are submitted to, kept in memory so that a submit costs no run lookup in the store.

A run's id, owner, base model and LoRA config never change and a run is never deleted, so a run found once stays
right for what a submit needs. Its mutable fields (``corrupted``, ``last_request_at``) are not to be read from
here: the REST views read the store. When ``last_request_at`` is next due to be written is kept here instead.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timedelta

from tinkerd.domain.records import TrainingRun

# Runs remembered (the least recently used are forgotten past this).
RUN_CACHE_LIMIT = 4096


class RunCache:
    """Thread-safe: routes run in worker threads."""

    def __init__(self, limit: int = RUN_CACHE_LIMIT) -> None:
        self._limit = limit
        self._runs: OrderedDict[tuple[str, str], TrainingRun] = OrderedDict()
        self._touched: OrderedDict[str, datetime] = OrderedDict()  # run id -> last_request_at as last written
        self._lock = threading.Lock()

    def get(self, run_id: str, owner: str, load: Callable[[str, str], TrainingRun]) -> TrainingRun:
        """The run `owner` owns, from memory or else from ``load(run_id, owner)`` (whose errors pass through)."""
        key = (run_id, owner)
        with self._lock:
            run = self._runs.get(key)
            if run is not None:
                self._runs.move_to_end(key)
                return run
        run = load(run_id, owner)
        with self._lock:
            self._runs[key] = run
            if len(self._runs) > self._limit:
                self._runs.popitem(last=False)
        return run

    def touch_due(self, run_id: str, stored: datetime, now: datetime, every: timedelta) -> bool:
        """Whether the run's last_request_at (``stored`` when read from the store) is older than ``every``; if so,
        the caller writes ``now`` and this remembers it."""
        with self._lock:
            last = self._touched.get(run_id, stored)
            if now - last < every:
                return False
            self._touched[run_id] = now
            self._touched.move_to_end(run_id)
            if len(self._touched) > self._limit:
                self._touched.popitem(last=False)
            return True
