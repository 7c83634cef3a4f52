"""What may enter the futures ledger: per-user caps on queued work and open runs, and refused requests' seq_ids.

Kept apart from the ledger itself (store.futures), which knows nothing of users' limits.

Queue cap. A user's pending and running requests are counted before a new one is accepted; past the cap the api
answers 429 and the SDK retries the same seq_id later. Two kinds of request always pass, or the cap could stall a
user for good: a repeat of a request already in the ledger (the SDK's retry), and an ordered request that fills a
gap before one of its run's queued requests (those cannot run until it does; the SDK sends a call's chunks in
parallel, so a later chunk can be queued before an earlier one).

Refusals. The SDK numbers a training request before sending it, and the ledger runs a run's requests strictly in
seq_id order, so a refused request's seq_id must still be filled or the run would wait forever. It is filled with
a row that is failed from the start, in one transaction, so no worker ever sees it pending.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection, and_, bindparam, func, insert, select

from tinkerd.domain.records import FIRST_SEQ_ID, Clock, FutureState, RequestKind, is_ordered, utc_now
from tinkerd.store import events
from tinkerd.store.codec import future_to_row
from tinkerd.store.db import Database
from tinkerd.store.futures import failed_placeholder
from tinkerd.store.sequencing import advance_cursor, ensure_cursor
from tinkerd.store.tables import futures, sessions, training_runs

_QUEUED = (FutureState.PENDING.value, FutureState.RUNNING.value)

# Run for every submit: built once (building a statement costs more than SQLite takes to run it).
_QUEUED_COUNT = (
    select(func.count()).select_from(futures).where(futures.c.state.in_(_QUEUED), futures.c.owner == bindparam("owner"))
)
_AT_SEQ = select(futures.c.request_id).where(
    futures.c.model_id == bindparam("model_id"), futures.c.seq_id == bindparam("seq_id")
)
_WAITING_BEHIND = (
    select(futures.c.request_id)
    .where(
        futures.c.model_id == bindparam("model_id"),
        futures.c.state == FutureState.PENDING.value,
        futures.c.ordered.is_(True),
        futures.c.seq_id > bindparam("seq_id"),
    )
    .limit(1)
)


def _admits_new(
    conn: Connection, owner: str, model_id: str, seq_id: int | None, kind: RequestKind, max_queued: int
) -> bool:
    """Whether a request that is not a repeat fits under the owner's cap."""
    if conn.execute(_QUEUED_COUNT, {"owner": owner}).scalar_one() < max_queued:
        return True
    if not is_ordered(kind, seq_id):
        return False
    return conn.execute(_WAITING_BEHIND, {"model_id": model_id, "seq_id": seq_id}).first() is not None


class Admission:
    def __init__(self, db: Database, clock: Clock = utc_now) -> None:
        self._db = db
        self._clock = clock

    def queued(self, owner: str) -> int:
        """The owner's requests not finished yet (pending or running)."""
        return int(self._db.read(lambda conn: conn.execute(_QUEUED_COUNT, {"owner": owner}).scalar_one()))

    def admits(self, owner: str, model_id: str, seq_id: int | None, kind: RequestKind, max_queued: int) -> bool:
        """Whether a new request fits under the owner's cap of ``max_queued`` unfinished requests (0: no cap)."""
        if max_queued <= 0:
            return True

        def txn(conn: Connection) -> bool:
            if seq_id is not None and conn.execute(_AT_SEQ, {"model_id": model_id, "seq_id": seq_id}).first():
                return True  # a repeat
            return _admits_new(conn, owner, model_id, seq_id, kind, max_queued)

        return self._db.read(txn)

    def queue_check(
        self,
        owner: str,
        model_id: str,
        seq_id: int | None,
        kind: RequestKind,
        max_queued: int,
        refusal: Callable[[], Exception],
    ) -> Callable[[Connection], None] | None:
        """``admits`` as a check the ledger runs inside its submit transaction for a new request (a repeat is known
        there already): it raises ``refusal()`` when the request does not fit. None when there is no cap."""
        if max_queued <= 0:
            return None

        def check(conn: Connection) -> None:
            if not _admits_new(conn, owner, model_id, seq_id, kind, max_queued):
                raise refusal()

        return check

    def open_runs(self, owner: str) -> int:
        """The owner's training runs whose session is still open (closed and timed-out sessions free theirs)."""
        query = (
            select(func.count())
            .select_from(training_runs.join(sessions, training_runs.c.session_id == sessions.c.id))
            .where(and_(training_runs.c.owner == owner, sessions.c.status == "active"))
        )
        return int(self._db.read(lambda conn: conn.execute(query).scalar_one()))

    def record_refused(self, *, owner: str, model_id: str, seq_id: int, kind: RequestKind, message: str) -> bool:
        """Fill a refused ordered request's seq_id with an already failed row. False if there was nothing to fill
        (the seq_id is taken, or already behind the run's cursor)."""

        def txn(conn: Connection) -> bool:
            if conn.execute(_AT_SEQ, {"model_id": model_id, "seq_id": seq_id}).first() is not None:
                return False
            if seq_id < ensure_cursor(conn, model_id, FIRST_SEQ_ID):
                return False
            record = failed_placeholder(
                owner=owner, model_id=model_id, seq_id=seq_id, kind=kind, message=message, now=self._clock()
            )
            conn.execute(insert(futures).values(future_to_row(record)))
            advance_cursor(conn, model_id)
            events.send_work(conn, model_id, kind)
            return True

        if not is_ordered(kind, seq_id):
            return False
        return self._db.write_inserting(txn)  # the cursor, or the seq_id's row, may be inserted concurrently
