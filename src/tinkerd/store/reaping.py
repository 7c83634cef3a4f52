"""What happens to the work of a split deployment's worker whose lease ran out (it died, hung, or lost the network).

Functions of an open Connection, run by `WorkerRegistry.reap` in one write transaction from any live process's
heartbeat.

- A trainer's runs lived in its memory: they are marked lost (`trainer_id` = "lost:<trainer>"), and every queued
  or running request of a lost run fails with advice to resume from the last save (also requests sent later). A
  trainer that registers again under the same id (restarted before anyone reaped it) loses its runs the same way:
  the new process holds none of them (`lose_runs_of`).
- A sampler's work is stateless: each sampling request it was running goes back to the queue for another sampler of
  the same base model, once. A request whose second sampler dies too fails instead (it may be what kills them), and
  so does a request no live sampler can take: sampling requests never wait for a sampler that is not there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Connection, select, update

from tinkerd.domain.records import FutureState, RequestKind
from tinkerd.store import events
from tinkerd.store.sequencing import advance_cursor
from tinkerd.store.tables import futures, samplers, training_runs, workers

LOST_PREFIX = "lost:"
LOST_RUN_MESSAGE = (
    "the trainer running training run {run} ({trainer}) stopped answering or restarted, and its lease expired; the "
    "run's in-memory state (LoRA weights and optimizer) is gone. Resume from the run's last save_state with "
    "create_training_client_from_state_with_optimizer"
)
NO_SAMPLER_MESSAGE = (
    "no live sampler serves base model {base_model!r} (the sampler running this request stopped answering and "
    "its lease expired, and no other took it); start one (tinkerd sampler --model {base_model}) and sample again"
)
SAMPLER_LOST_TWICE_MESSAGE = (
    "the samplers running this request stopped answering twice ({samplers}); it is not retried again: sample "
    "again, and check those samplers' logs if it keeps failing"
)


@dataclass(frozen=True)
class Reaped:
    lost_runs: dict[str, list[str]] = field(default_factory=dict)  # by trainer whose lease ran out now
    retried_samples: list[str] = field(default_factory=list)  # request ids put back for another sampler
    failed_samples: list[str] = field(default_factory=list)  # request ids failed: no sampler left, or lost twice


def _expired(conn: Connection, role: str, now: datetime) -> list[str]:
    query = select(workers.c.id).where(
        workers.c.role == role, workers.c.lease_expires_at <= now, workers.c.stopped_at.is_(None)
    )
    return list(conn.execute(query).scalars())


def _fail(conn: Connection, request_id: str, message: str, now: datetime) -> None:
    conn.execute(
        update(futures)
        .where(futures.c.request_id == request_id)
        .values(
            state=FutureState.FAILED.value,
            finished_at=now,
            payload=None,
            error_message=message,
            error_category="server",
        )
    )
    events.send(conn, events.FINISHED, request_id)


def reap_trainers(conn: Connection, now: datetime) -> dict[str, list[str]]:
    """Mark the runs of expired trainers lost and fail their requests (and requests sent to lost runs since)."""
    lost: dict[str, list[str]] = {}
    for trainer_id in _expired(conn, "trainer", now):
        held = training_runs.c.trainer_id == trainer_id
        lost[trainer_id] = list(conn.execute(select(training_runs.c.id).where(held)).scalars())
        lose_runs_of(conn, trainer_id)
        conn.execute(update(workers).where(workers.c.id == trainer_id).values(stopped_at=now))
    rows = conn.execute(
        select(futures.c.request_id, futures.c.model_id, futures.c.ordered, training_runs.c.trainer_id)
        .join(training_runs, training_runs.c.id == futures.c.model_id)
        .where(
            training_runs.c.trainer_id.like(LOST_PREFIX + "%"),
            futures.c.state.in_((FutureState.PENDING.value, FutureState.RUNNING.value)),
        )
    ).all()
    for row in rows:
        trainer = str(row.trainer_id).removeprefix(LOST_PREFIX)
        _fail(conn, row.request_id, LOST_RUN_MESSAGE.format(run=row.model_id, trainer=trainer), now)
    for model_id in {row.model_id for row in rows if row.ordered}:
        advance_cursor(conn, model_id)
    return lost


def lose_runs_of(conn: Connection, trainer_id: str) -> None:
    """Mark the runs `trainer_id` holds lost (their requests fail at the next reap)."""
    held = training_runs.c.trainer_id == trainer_id
    conn.execute(update(training_runs).where(held).values(trainer_id=LOST_PREFIX + trainer_id))


def _live_sampler_models(conn: Connection, now: datetime) -> set[str]:
    query = select(workers.c.base_models).where(
        workers.c.role == "sampler", workers.c.lease_expires_at > now, workers.c.stopped_at.is_(None)
    )
    return {name for models in conn.execute(query).scalars() for name in (models or {})}


def reap_samplers(conn: Connection, now: datetime, waiting_grace: timedelta) -> tuple[list[str], list[str]]:
    """Requeue (once) or fail the sampling requests of expired samplers; fail sampling requests that have waited
    `waiting_grace` for a base model no live sampler serves. Returns (requeued ids, failed ids)."""
    gone = _expired(conn, "sampler", now)
    for sampler_id in gone:
        conn.execute(update(workers).where(workers.c.id == sampler_id).values(stopped_at=now))
    served = _live_sampler_models(conn, now)
    sampling = (
        select(futures.c.request_id, futures.c.claimed_by, futures.c.lost_by, samplers.c.base_model)
        .join(samplers, samplers.c.id == futures.c.model_id)
        .where(futures.c.kind == RequestKind.SAMPLE.value)
    )
    requeued: list[str] = []
    failed: list[str] = []
    held_by_gone = sampling.where(futures.c.state == FutureState.RUNNING.value, futures.c.claimed_by.in_(gone))
    running = conn.execute(held_by_gone).all() if gone else []
    for row in running:
        if row.lost_by:  # lost once already: a second loss fails it rather than retrying it on every sampler in turn
            lost = f"{row.lost_by}, {row.claimed_by}"
            _fail(conn, row.request_id, SAMPLER_LOST_TWICE_MESSAGE.format(samplers=lost), now)
            failed.append(row.request_id)
        elif row.base_model in served:
            requeued.append(row.request_id)
            conn.execute(
                update(futures)
                .where(futures.c.request_id == row.request_id)
                .values(
                    state=FutureState.PENDING.value,
                    started_at=None,
                    claimed_by=None,
                    lost_by=row.claimed_by,
                )
            )
        else:
            _fail(conn, row.request_id, NO_SAMPLER_MESSAGE.format(base_model=row.base_model), now)
            failed.append(row.request_id)
    waiting = conn.execute(
        sampling.where(futures.c.state == FutureState.PENDING.value, futures.c.created_at <= now - waiting_grace)
    ).all()
    for row in waiting:
        if row.base_model not in served:
            _fail(conn, row.request_id, NO_SAMPLER_MESSAGE.format(base_model=row.base_model), now)
            failed.append(row.request_id)
    if requeued:
        events.send(conn, events.SUBMITTED, "")  # wakes the samplers left
    return requeued, failed
