"""Which SUBMITTED events wake a trainer of a split deployment.

Every trainer LISTENs to every SUBMITTED event, and an event that wakes a trainer costs it a claim transaction. A
run's work only ever goes to the trainer it was placed on (placement is committed before the run's first request,
and a run never moves to another live trainer: it is lost with its trainer), so a trainer looks up the holder of a
run it has not seen yet once, and from then on skips the events of runs that are another trainer's. An event it
cannot place (no run named, a run not placed yet, the ledger unreachable) wakes it, as before: a needless claim is
cheap, a missed one stalls a run until the safety poll.
"""

from __future__ import annotations

import logging

from tinkerd.store import events
from tinkerd.store.workers import WorkerRegistry

log = logging.getLogger(__name__)

# Runs remembered per kind; past this the memory starts over (and holders are looked up again).
_REMEMBERED = 65536


class TrainerEvents:
    """Decides, on the listener's thread, whether a SUBMITTED event may concern this trainer."""

    def __init__(self, registry: WorkerRegistry, worker_id: str) -> None:
        self._registry = registry
        self._worker_id = worker_id
        self._mine: set[str] = set()
        self._others: set[str] = set()

    def concerns(self, payload: str) -> bool:
        if not events.concerns(payload, events.TRAIN):
            return False  # sampling work
        work, _, run_id = payload.partition(":")
        if work != events.TRAIN or not run_id:
            return True
        if run_id in self._mine:
            return True
        if run_id in self._others:
            return False
        try:
            holder = self._registry.trainer_of(run_id)
        except Exception as exc:  # the ledger is unreachable for a moment: wake, the claim will tell
            log.debug("could not look up the trainer of %s: %s", run_id, exc)
            return True
        if holder is None:
            return True
        known = self._mine if holder == self._worker_id else self._others
        if len(known) >= _REMEMBERED:
            known.clear()
        known.add(run_id)
        return holder == self._worker_id
