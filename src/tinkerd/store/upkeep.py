"""Upkeep of the futures ledger: failing requests a dead worker left running, purging delivered results, and
giving up on seq_ids that never arrive. Functions of an open Connection; `FuturesLedger` runs each in a write
transaction.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Connection, and_, func, or_, select, update

from tinkerd.domain.records import FutureState, RequestKind
from tinkerd.store import events
from tinkerd.store.codec import future_to_row
from tinkerd.store.future_rows import INSERT, chunks, failed_placeholder, find
from tinkerd.store.sequencing import FINISHED_STATES, advance_cursor, cursor_of
from tinkerd.store.tables import futures, model_cursors


def fail_in_flight(
    conn: Connection, now: datetime, message: str, worker_id: str | None, ordered_message: str | None
) -> int:
    """Fail the requests left running (by `worker_id`, or by anyone); see ``FuturesLedger.fail_in_flight``."""
    query = select(futures.c.request_id, futures.c.model_id, futures.c.ordered).where(
        futures.c.state == FutureState.RUNNING.value
    )
    if worker_id is not None:
        query = query.where(futures.c.claimed_by == worker_id)
    rows = conn.execute(query).all()
    for ordered in (False, True):
        text = ordered_message if ordered and ordered_message is not None else message
        ids = [row.request_id for row in rows if bool(row.ordered) is ordered]
        for chunk in chunks(ids):
            conn.execute(
                update(futures)
                .where(futures.c.request_id.in_(chunk))
                .values(
                    state=FutureState.FAILED.value,
                    finished_at=now,
                    payload=None,
                    error_message=text,
                    error_category="server",
                )
            )
    for model_id in {row.model_id for row in rows if row.ordered}:
        advance_cursor(conn, model_id)
        events.send_work(conn, model_id)
    for row in rows:
        events.send(conn, events.FINISHED, row.request_id)
    return len(rows)


def purgeable(now: datetime, delivered_for: timedelta, undelivered_for: timedelta | None) -> ColumnElement[bool]:
    """Which finished rows ``FuturesLedger.purge`` deletes."""
    finished = futures.c.state.in_(FINISHED_STATES)
    condition = and_(futures.c.delivered_count > 0, futures.c.delivered_at < now - delivered_for)
    if undelivered_for is not None:
        abandoned = and_(futures.c.delivered_count == 0, futures.c.finished_at < now - undelivered_for)
        condition = or_(condition, abandoned)
    return and_(finished, condition)


def fill_stale_gaps(conn: Connection, now: datetime, waited_for: timedelta) -> dict[str, list[int]]:
    """Fill seq_ids waited on for longer than `waited_for`; see ``FuturesLedger.fill_stale_gaps``."""
    waiting = conn.execute(
        select(futures.c.model_id, func.min(futures.c.seq_id), func.min(futures.c.created_at))
        .join(model_cursors, model_cursors.c.model_id == futures.c.model_id)
        .where(
            futures.c.state == FutureState.PENDING.value,
            futures.c.ordered.is_(True),
            futures.c.seq_id > model_cursors.c.next_seq,
        )
        .group_by(futures.c.model_id)
    ).all()
    filled: dict[str, list[int]] = {}
    for model_id, first_waiting, oldest in waiting:
        if oldest > now - waited_for:
            continue
        cursor = cursor_of(conn, model_id)
        if cursor is None or find(conn, model_id, cursor) is not None:
            continue  # the next seq_id is there (pending or running): no gap
        present = set(
            conn.execute(
                select(futures.c.seq_id).where(
                    futures.c.model_id == model_id,
                    futures.c.seq_id >= cursor,
                    futures.c.seq_id < first_waiting,
                )
            ).scalars()
        )
        missing = [seq for seq in range(cursor, first_waiting) if seq not in present]
        message = (
            f"seq_id {{seq}} of model {model_id!r} never arrived within {waited_for.total_seconds():.0f} s; "
            "the model's later requests went ahead without it"
        )
        owner = conn.execute(
            select(futures.c.owner).where(futures.c.model_id == model_id, futures.c.seq_id == first_waiting)
        ).scalar_one()
        for seq in missing:
            placeholder = failed_placeholder(
                owner=owner,
                model_id=model_id,
                seq_id=seq,
                kind=RequestKind.MISSING,
                message=message.format(seq=seq),
                now=now,
            )
            conn.execute(INSERT, future_to_row(placeholder))
        advance_cursor(conn, model_id)
        events.send_work(conn, model_id)
        filled[model_id] = missing
    return filled
