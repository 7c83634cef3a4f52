"""The processes of a split deployment in the ledger: registration, heartbeats and leases, placement of training
runs, and what happens to the runs of a trainer whose lease ran out.

A worker (trainer or sampler; the api registers too, for `tinkerd status`) holds a lease that each heartbeat pushes
`lease_s` into the future. A trainer's runs are its own while its lease lasts: `training_runs.trainer_id` names
it, and only it claims their requests. When a trainer's lease expires (the process died or hung), any live worker's
heartbeat reaps it (store.reaping): every queued or running request of its runs fails with advice to resume from
the last save, and the runs are marked lost (`trainer_id` = "lost:<trainer>"), so requests sent to them later fail
the same way instead of waiting forever. A resumed run is a new run, placed on a live trainer. A sampler's requests
go to another sampler, or fail when none is left.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from tinkerd.domain.errors import CapacityError
from tinkerd.domain.records import Clock
from tinkerd.store.db import Database
from tinkerd.store.ledger_clock import LedgerClock
from tinkerd.store.reaping import (
    LOST_PREFIX,
    LOST_RUN_MESSAGE,
    Reaped,
    lose_runs_of,
    reap_samplers,
    reap_trainers,
)
from tinkerd.store.tables import training_runs, workers

__all__ = ["LOST_PREFIX", "LOST_RUN_MESSAGE", "ROLES", "Reaped", "WorkerInfo", "WorkerRegistry", "sorted_base_models"]

ROLES = ("api", "trainer", "sampler")


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    role: str  # api | trainer | sampler
    host: str
    pid: int
    base_models: Mapping[str, Mapping[str, Any]]  # served base model -> facts the api needs (ServedModelInfo)
    capacity: int  # trainers: most runs held at once
    health_url: str | None
    started_at: datetime
    heartbeat_at: datetime
    lease_expires_at: datetime
    stopped_at: datetime | None = None
    runs: int = 0  # runs held (trainers)


def _info(row: Any, runs: int = 0) -> WorkerInfo:
    return WorkerInfo(
        id=row.id,
        role=row.role,
        host=row.host,
        pid=row.pid,
        base_models=dict(row.base_models or {}),
        capacity=row.capacity,
        health_url=row.health_url,
        started_at=row.started_at,
        heartbeat_at=row.heartbeat_at,
        lease_expires_at=row.lease_expires_at,
        stopped_at=row.stopped_at,
        runs=runs,
    )


_RUN_COUNTS = (
    select(training_runs.c.trainer_id, func.count().label("n"))
    .where(training_runs.c.trainer_id.is_not(None))
    .group_by(training_runs.c.trainer_id)
)


class WorkerRegistry:
    def __init__(self, db: Database, clock: Clock | None = None) -> None:
        """``clock`` defaults to the database server's (``LedgerClock``): leases mean the same on every host."""
        self._db = db
        self._clock = clock if clock is not None else LedgerClock(db)

    def register(
        self,
        *,
        worker_id: str,
        role: str,
        host: str,
        pid: int,
        base_models: Mapping[str, Mapping[str, Any]],
        lease_s: float,
        capacity: int = 0,
        health_url: str | None = None,
    ) -> None:
        """Add (or restart) a worker with a fresh lease."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        now = self._clock()
        row = {
            "role": role,
            "host": host,
            "pid": pid,
            "base_models": {name: dict(facts) for name, facts in base_models.items()},
            "capacity": capacity,
            "health_url": health_url,
            "started_at": now,
            "heartbeat_at": now,
            "lease_expires_at": now + timedelta(seconds=lease_s),
            "stopped_at": None,
        }

        def txn(conn: Connection) -> None:
            if conn.execute(select(workers.c.id).where(workers.c.id == worker_id)).first() is None:
                conn.execute(insert(workers).values(id=worker_id, **row))
            else:
                conn.execute(update(workers).where(workers.c.id == worker_id).values(**row))
                if role == "trainer":  # a restarted trainer: the runs its previous process held died with it
                    lose_runs_of(conn, worker_id)

        self._db.write(txn)

    def heartbeat(self, worker_id: str, lease_s: float) -> bool:
        """Extend the lease. False when the worker is unknown or was reaped (its lease had run out): it must stop."""
        now = self._clock()

        def txn(conn: Connection) -> bool:
            return bool(
                conn.execute(
                    update(workers)
                    .where(workers.c.id == worker_id, workers.c.stopped_at.is_(None))
                    .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_s))
                ).rowcount
            )

        return self._db.write(txn)

    def stop(self, worker_id: str) -> None:
        """A clean shutdown: the lease ends now (a trainer's runs are reaped at the next heartbeat of anyone)."""
        now = self._clock()
        self._db.write(
            lambda conn: conn.execute(
                update(workers).where(workers.c.id == worker_id).values(lease_expires_at=now, heartbeat_at=now)
            )
        )

    def live(self, role: str | None = None) -> list[WorkerInfo]:
        """Workers whose lease has not expired, with how many runs each trainer holds."""
        now = self._clock()

        def txn(conn: Connection) -> list[WorkerInfo]:
            query = select(workers).where(workers.c.lease_expires_at > now, workers.c.stopped_at.is_(None))
            if role is not None:
                query = query.where(workers.c.role == role)
            counts = {tid: n for tid, n in conn.execute(_RUN_COUNTS).all()}
            return [_info(row, counts.get(row.id, 0)) for row in conn.execute(query.order_by(workers.c.id)).all()]

        return self._db.read(txn)

    def all(self) -> list[WorkerInfo]:
        def txn(conn: Connection) -> list[WorkerInfo]:
            counts = {tid: n for tid, n in conn.execute(_RUN_COUNTS).all()}
            rows = conn.execute(select(workers).order_by(workers.c.role, workers.c.id)).all()
            return [_info(row, counts.get(row.id, 0)) for row in rows]

        return self._db.read(txn)

    def trainer_of(self, run_id: str) -> str | None:
        """The trainer a run is placed on ("lost:<trainer>" once that trainer is gone), or None if not placed."""
        query = select(training_runs.c.trainer_id).where(training_runs.c.id == run_id)
        return self._db.read(lambda conn: conn.execute(query).scalar())

    def runs_of(self, trainer_id: str) -> list[str]:
        query = select(training_runs.c.id).where(training_runs.c.trainer_id == trainer_id).order_by(training_runs.c.id)
        return list(self._db.read(lambda conn: conn.execute(query).scalars().all()))

    def place(self, run_id: str, base_model: str) -> str:
        """Give a run to the least-loaded live trainer that serves `base_model` and has room; returns its id.
        A run already placed keeps its trainer (a retried create_model).

        Raises CapacityError when no live trainer serves the base model or all are full (the client retries)."""
        now = self._clock()

        def txn(conn: Connection) -> str:
            held = conn.execute(select(training_runs.c.trainer_id).where(training_runs.c.id == run_id)).scalar()
            if held is not None:
                return str(held)
            counts = {tid: n for tid, n in conn.execute(_RUN_COUNTS).all()}
            candidates = [
                row
                for row in conn.execute(
                    select(workers).where(
                        workers.c.role == "trainer",
                        workers.c.lease_expires_at > now,
                        workers.c.stopped_at.is_(None),
                    )
                ).all()
                if base_model in (row.base_models or {}) and (row.capacity <= 0 or counts.get(row.id, 0) < row.capacity)
            ]
            if not candidates:
                raise CapacityError(
                    f"no live trainer with room serves base model {base_model!r}; start one "
                    f"(tinkerd trainer --model {base_model}) or retry later"
                )
            chosen = min(candidates, key=lambda row: (counts.get(row.id, 0), row.id))
            conn.execute(update(training_runs).where(training_runs.c.id == run_id).values(trainer_id=chosen.id))
            return str(chosen.id)

        return self._db.write(txn)

    def reap(self, sample_grace_s: float = 30.0) -> Reaped:
        """Reap workers whose lease ran out (store.reaping): a trainer's runs are lost and their requests fail with
        advice to resume; a sampler's requests go to another sampler or fail. Sampling requests that waited
        `sample_grace_s` for a base model no live sampler serves fail too."""
        now = self._clock()

        def txn(conn: Connection) -> Reaped:
            lost = reap_trainers(conn, now)
            requeued, failed = reap_samplers(conn, now, timedelta(seconds=sample_grace_s))
            return Reaped(lost, requeued, failed)

        return self._db.write(txn)


def sorted_base_models(infos: Sequence[WorkerInfo]) -> dict[str, Mapping[str, Any]]:
    """Every base model some live worker serves, with its facts (the first worker's)."""
    models: dict[str, Mapping[str, Any]] = {}
    for info in infos:
        for name, facts in info.base_models.items():
            models.setdefault(name, facts)
    return dict(sorted(models.items()))
