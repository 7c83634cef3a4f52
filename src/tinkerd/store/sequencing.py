"""Per-model seq_id order for the futures ledger: cursors, and which pending requests may run now.

Functions of an open Connection, so the ledger can combine them in one transaction. The statements are built once:
building a SQLAlchemy statement costs more than SQLite takes to run it, and these run for every request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Connection, Select, bindparam, exists, insert, select, update

from tinkerd.domain.records import FutureState, RequestKind
from tinkerd.store.tables import futures, model_cursors, samplers, training_runs

SelectT = TypeVar("SelectT", bound=Select[Any, Any, Any, Any] | Select[Any])

FINISHED_STATES = (FutureState.COMPLETED.value, FutureState.FAILED.value)


_running = futures.alias("running")
_CURSOR = select(model_cursors.c.next_seq).where(model_cursors.c.model_id == bindparam("model_id"))
_INSERT_CURSOR = insert(model_cursors)
_SET_CURSOR = (
    update(model_cursors).where(model_cursors.c.model_id == bindparam("b_model_id")).values(next_seq=bindparam("next"))
)
_FINISHED_FROM = (
    select(futures.c.seq_id)
    .where(
        futures.c.model_id == bindparam("model_id"),
        futures.c.ordered.is_(True),
        futures.c.state.in_(FINISHED_STATES),
        futures.c.seq_id >= bindparam("cursor"),
    )
    .order_by(futures.c.seq_id)
)
_READY_CHAINS = (
    select(futures.c.request_id, futures.c.model_id, futures.c.seq_id, model_cursors.c.next_seq)
    .join(model_cursors, model_cursors.c.model_id == futures.c.model_id)
    .where(
        futures.c.state == FutureState.PENDING.value,
        futures.c.ordered.is_(True),
        futures.c.seq_id >= model_cursors.c.next_seq,
        ~exists().where(
            _running.c.model_id == futures.c.model_id,
            _running.c.ordered.is_(True),
            _running.c.state == FutureState.RUNNING.value,
        ),
    )
    .order_by(futures.c.model_id, futures.c.seq_id)
)
_READY_UNORDERED = (
    select(futures.c.request_id)
    .where(futures.c.state == FutureState.PENDING.value, futures.c.ordered.is_(False))
    .order_by(futures.c.created_at, futures.c.request_id)
    .limit(bindparam("limit"))
)


@dataclass(frozen=True)
class ClaimScope:
    """Which requests a worker of a split deployment claims (None, in one process: everything)."""

    trainer_id: str | None = None  # a trainer: the requests of the runs it holds
    sample_base_models: tuple[str, ...] | None = None  # a sampler: sampling requests of these base models

    def condition(self) -> ColumnElement[bool]:
        if self.trainer_id is not None:
            held = select(training_runs.c.id).where(training_runs.c.trainer_id == self.trainer_id)
            return futures.c.model_id.in_(held) & (futures.c.kind != RequestKind.SAMPLE.value)
        bases = self.sample_base_models or ()
        served = select(samplers.c.id).where(samplers.c.base_model.in_(bases))
        return futures.c.model_id.in_(served) & (futures.c.kind == RequestKind.SAMPLE.value)


def _scoped(query: SelectT, scope: ClaimScope | None) -> SelectT:
    return query if scope is None else query.where(scope.condition())


def cursor_of(conn: Connection, model_id: str) -> int | None:
    """The seq_id the model executes next, or None for a model with no ordered request yet."""
    return conn.execute(_CURSOR, {"model_id": model_id}).scalar_one_or_none()


def ensure_cursor(conn: Connection, model_id: str, next_seq: int) -> int:
    """The model's cursor, created at `next_seq` if the model has none."""
    found = cursor_of(conn, model_id)
    if found is not None:
        return found
    conn.execute(_INSERT_CURSOR, {"model_id": model_id, "next_seq": next_seq})
    return next_seq


def advance_cursor(conn: Connection, model_id: str) -> None:
    """Move the model's cursor past every finished seq_id that directly follows it.

    Walking the finished rows (rather than setting seq + 1) keeps the cursor right whatever order a worker
    reports results in.
    """
    cursor = cursor_of(conn, model_id)
    if cursor is None:
        return
    new_cursor = cursor
    for seq_id in conn.execute(_FINISHED_FROM, {"model_id": model_id, "cursor": cursor}).scalars():
        if seq_id != new_cursor:
            break
        new_cursor += 1
    if new_cursor != cursor:
        conn.execute(_SET_CURSOR, {"b_model_id": model_id, "next": new_cursor})


def ready_chains(
    conn: Connection, per_model_limit: int, scope: ClaimScope | None = None
) -> tuple[list[str], dict[str, int]]:
    """For each ordered model with nothing running, the request ids of its pending requests from its cursor on, up
    to the first gap or `per_model_limit`; and, per model with a chain, the seq_id the chain starts at."""
    ids: list[str] = []
    starts: dict[str, int] = {}
    expected: dict[str, int] = {}
    taken: dict[str, int] = {}
    for request_id, model_id, seq_id, cursor in conn.execute(_scoped(_READY_CHAINS, scope)).all():
        want = expected.setdefault(model_id, cursor)
        if seq_id == want and taken.get(model_id, 0) < per_model_limit:
            ids.append(request_id)
            expected[model_id] = want + 1
            taken[model_id] = taken.get(model_id, 0) + 1
            starts[model_id] = cursor
        else:
            expected[model_id] = -1  # a gap or the limit: the rest of this model waits (-1 matches no seq_id)
    return ids, starts


def ready_unordered(conn: Connection, limit: int, scope: ClaimScope | None = None) -> list[str]:
    """Up to `limit` pending unordered request ids, oldest first."""
    if limit <= 0:
        return []
    return list(conn.execute(_scoped(_READY_UNORDERED, scope), {"limit": limit}).scalars())
