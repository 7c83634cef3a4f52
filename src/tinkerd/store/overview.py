"""Read-only summaries for people watching a server (the web console): work queued per run, which runs' sessions
are still open. Counts only; the rows themselves are the other repositories' business."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, func, select

from tinkerd.domain.records import FutureState
from tinkerd.store.db import Database
from tinkerd.store.tables import futures, sessions, training_runs


@dataclass(frozen=True)
class QueueDepth:
    model_id: str  # a training run's id, or a sampler's / base model's for sampling work
    pending: int
    running: int


class Overview:
    def __init__(self, db: Database) -> None:
        self._db = db

    def queue_depths(self, owner: str) -> list[QueueDepth]:
        """The owner's unfinished requests per model id, busiest first."""
        unfinished = (FutureState.PENDING.value, FutureState.RUNNING.value)
        query = (
            select(futures.c.model_id, futures.c.state, func.count())
            .where(futures.c.owner == owner, futures.c.state.in_(unfinished))
            .group_by(futures.c.model_id, futures.c.state)
        )

        def txn(conn: Connection) -> list[QueueDepth]:
            counts: dict[str, dict[str, int]] = {}
            for model_id, state, count in conn.execute(query).all():
                counts.setdefault(model_id, {})[state] = int(count)
            depths = [
                QueueDepth(m, c.get(FutureState.PENDING.value, 0), c.get(FutureState.RUNNING.value, 0))
                for m, c in counts.items()
            ]
            return sorted(depths, key=lambda d: (-(d.pending + d.running), d.model_id))

        return self._db.read(txn)

    def queue_totals(self) -> QueueDepth:
        """Every user's unfinished requests together (counts only: whose, and for what, stays private)."""
        unfinished = (FutureState.PENDING.value, FutureState.RUNNING.value)
        query = select(futures.c.state, func.count()).where(futures.c.state.in_(unfinished)).group_by(futures.c.state)
        counts = {state: int(n) for state, n in self._db.read(lambda conn: conn.execute(query).all())}
        return QueueDepth("all", counts.get(FutureState.PENDING.value, 0), counts.get(FutureState.RUNNING.value, 0))

    def session_status_of_runs(self, run_ids: list[str], owner: str) -> dict[str, str]:
        """Run id -> its session's status ('active', 'finished', 'timed_out', ...)."""
        if not run_ids:
            return {}
        query = (
            select(training_runs.c.id, sessions.c.status)
            .join(sessions, sessions.c.id == training_runs.c.session_id)
            .where(training_runs.c.owner == owner, training_runs.c.id.in_(run_ids))
        )
        return self._db.read(lambda conn: {str(i): str(s) for i, s in conn.execute(query).all()})
