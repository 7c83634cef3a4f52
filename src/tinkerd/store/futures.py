"""The futures ledger: every request that does work is a row, pending -> running -> completed | failed.

Ordering. A request with a seq_id of a sequenced kind (every training-client operation) is *ordered*: its model
executes seq_ids one after another, starting at FIRST_SEQ_ID (create_model's implicit seq 0). A cursor per model
(`store.sequencing`) holds its next seq_id; a pending request runs only once every earlier seq_id has finished,
and a model with a request running yields nothing more until it finishes, so one model never has two executors.
Requests without a seq_id, and sampling requests, are unordered.

Idempotency. (model_id, seq_id) is unique: the SDK retries a submit with the same pair, and the retry gets the
request that already exists, never a second one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, delete, func, select, update

from tinkerd.domain.errors import ConflictError, InvalidRequestError, NotFoundError
from tinkerd.domain.ids import new_request_id, validate_owner
from tinkerd.domain.records import (
    FIRST_SEQ_ID,
    Clock,
    ErrorCategory,
    FutureRecord,
    FutureState,
    RequestKind,
    StepMetrics,
    is_ordered,
    utc_now,
)
from tinkerd.store import events, upkeep
from tinkerd.store.codec import future_from_row, future_to_row
from tinkerd.store.db import Database, RetryableConflict
from tinkerd.store.finished_events import finished_payload
from tinkerd.store.future_rows import (
    BY_ID,
    BY_ID_AND_OWNER,
    CLAIM,
    FINISH,
    FULL_BY_ID_AND_OWNER,
    INSERT,
    chunks,
    failed_placeholder,
    find,
    full_rows,
    load,
)
from tinkerd.store.metrics import record as record_metrics
from tinkerd.store.sequencing import (
    FINISHED_STATES,
    ClaimScope,
    advance_cursor,
    cursor_of,
    ensure_cursor,
    ready_chains,
    ready_unordered,
)
from tinkerd.store.tables import futures

__all__ = ["Claim", "FuturesLedger", "failed_placeholder"]


@dataclass(frozen=True)
class Claim:
    """What a worker may run now, already marked running under its name."""

    futures: tuple[FutureRecord, ...]  # ordered chains (each in seq_id order), then unordered work oldest first
    next_seq: Mapping[str, int]  # for each ordered model in the claim, the seq_id its chain starts at


class FuturesLedger:
    def __init__(self, db: Database, clock: Clock = utc_now) -> None:
        self._db = db
        self._clock = clock

    # -- the api's side ------------------------------------------------------------------------------------------

    def submit(
        self,
        *,
        owner: str,
        model_id: str,
        seq_id: int | None,
        kind: RequestKind,
        payload: bytes,
        token_count: int = 0,
    ) -> FutureRecord:
        """Record a request (see ``submit_or_find``), or return the existing one for a repeated (model_id, seq_id)."""
        record, _created = self.submit_or_find(
            owner=owner, model_id=model_id, seq_id=seq_id, kind=kind, payload=payload, token_count=token_count
        )
        return record

    def submit_or_find(
        self,
        *,
        owner: str,
        model_id: str,
        seq_id: int | None,
        kind: RequestKind,
        payload: bytes,
        token_count: int = 0,
        admit: Callable[[Connection], None] | None = None,
        claim_for: str | None = None,
    ) -> tuple[FutureRecord, bool]:
        """Record a request, and say whether it is new. With a seq_id, a repeat of the same (model_id, seq_id)
        returns the request that exists (and False).

        Raises InvalidRequestError for a seq_id its model has already executed past (a retry of a request whose
        row was purged, or a client bug): accepting it would leave it waiting forever.

        ``admit`` runs inside the same transaction for a new request (not for a repeat), and raises to refuse it.
        With ``claim_for`` (a worker id), an ordered request that may run at once (its seq_id is its model's next,
        so nothing of the model runs) is recorded already running under that worker: a worker in this process,
        handed the request, then needs no claim of its own. Anything else is recorded pending.
        """
        validate_owner(owner)
        if seq_id is not None and seq_id < 0:
            raise InvalidRequestError(f"seq_id must be >= 0, got {seq_id}")
        if token_count < 0:
            raise InvalidRequestError(f"token_count must be >= 0, got {token_count}")
        ordered = is_ordered(kind, seq_id)

        def txn(conn: Connection) -> tuple[FutureRecord, bool]:
            if seq_id is not None:
                existing = find(conn, model_id, seq_id)
                if existing is not None:
                    return self._check_repeat(existing, owner, kind), False
            if admit is not None:
                admit(conn)
            runnable = False
            if ordered:
                assert seq_id is not None
                next_seq = ensure_cursor(conn, model_id, FIRST_SEQ_ID)
                if seq_id < next_seq:
                    raise InvalidRequestError(
                        f"seq_id {seq_id} of model {model_id!r} was already executed; the next one is {next_seq}"
                    )
                runnable = seq_id == next_seq
            now = self._clock()
            claimed = runnable and claim_for is not None
            record = FutureRecord(
                request_id=new_request_id(),
                owner=owner,
                model_id=model_id,
                seq_id=seq_id,
                kind=kind,
                ordered=ordered,
                state=FutureState.RUNNING if claimed else FutureState.PENDING,
                payload=payload,
                result=None,
                error_message=None,
                error_category=None,
                token_count=token_count,
                created_at=now,
                started_at=now if claimed else None,
                claimed_by=claim_for if claimed else None,
            )
            conn.execute(INSERT, future_to_row(record))
            events.send_work(conn, model_id, kind)  # wakes trainers or samplers in other processes
            return record, True

        # Two concurrent submits of one (model_id, seq_id), or of a new model's first request, race to insert.
        return self._db.write_inserting(txn)

    def get(self, request_id: str, owner: str, *, with_payload: bool = False) -> FutureRecord:
        """The request as its owner sees it. Results stay readable after delivery, until purged."""
        query = FULL_BY_ID_AND_OWNER if with_payload else BY_ID_AND_OWNER
        params = {"request_id": request_id, "owner": owner}
        row = self._db.read(lambda conn: conn.execute(query, params).mappings().first())
        if row is None:
            raise NotFoundError(f"unknown request {request_id!r}")
        return future_from_row(row)

    def mark_delivered(self, request_id: str, owner: str) -> FutureRecord:
        """Note that a finished result was sent to the client. The row is kept: a retry may ask again."""

        def txn(conn: Connection) -> FutureRecord:
            row = load(conn, request_id, owner)
            if not FutureState(row["state"]).finished:
                raise ConflictError(f"request {request_id!r} has not finished; nothing was delivered")
            now = self._clock()
            conn.execute(
                update(futures)
                .where(futures.c.request_id == request_id)
                .values(
                    delivered_count=futures.c.delivered_count + 1,
                    delivered_at=row["delivered_at"] or now,
                )
            )
            return future_from_row(load(conn, request_id, owner))

        return self._db.write(txn)

    def mark_delivered_many(self, request_ids: Iterable[str]) -> int:
        """``mark_delivered`` for many deliveries in one transaction (the api batches its notes): an id given n times
        counts n deliveries. Unknown or unfinished requests are skipped. Returns how many requests were marked."""
        by_times: dict[int, list[str]] = {}
        for request_id, times in Counter(request_ids).items():
            by_times.setdefault(times, []).append(request_id)
        if not by_times:
            return 0

        def txn(conn: Connection) -> int:
            now = self._clock()
            count = 0
            for times, ids in by_times.items():
                for chunk in chunks(ids):
                    count += conn.execute(
                        update(futures)
                        .where(futures.c.request_id.in_(chunk), futures.c.state.in_(FINISHED_STATES))
                        .values(
                            delivered_count=futures.c.delivered_count + times,
                            delivered_at=func.coalesce(futures.c.delivered_at, now),
                        )
                    ).rowcount
            return count

        return self._db.write(txn)

    # -- the worker's side ---------------------------------------------------------------------------------------

    def claim_ready(
        self,
        *,
        worker_id: str = "local",
        per_model_limit: int = 64,
        unordered_limit: int = 64,
        look_first: bool = True,
        scope: ClaimScope | None = None,
    ) -> Claim:
        """Mark running, and return, everything that may run now.

        For each ordered model with nothing running: its pending requests from the model's next seq_id on, up to
        the first gap (a missing seq_id means wait) or `per_model_limit`. Plus up to `unordered_limit` unordered
        requests, oldest first. `look_first` checks for work without the write lock first (for idle polling);
        pass False when work is known to be waiting. `scope` limits the claim to one role's requests (split
        deployment).
        """

        def txn(conn: Connection) -> Claim:
            ordered_ids, next_seq = ready_chains(conn, per_model_limit, scope)
            unordered_ids = ready_unordered(conn, unordered_limit, scope)
            ids = ordered_ids + unordered_ids
            now = self._clock()
            for chunk in chunks(ids):
                claimed = conn.execute(CLAIM, {"ids": chunk, "now": now, "worker_id": worker_id}).rowcount
                if claimed != len(chunk):
                    # Another worker claimed some of these between our read and our write (PostgreSQL only;
                    # SQLite's write lock is taken at BEGIN). Start over from a fresh snapshot.
                    raise RetryableConflict(f"{len(chunk) - claimed} futures were claimed concurrently")
            rows = {row["request_id"]: row for row in full_rows(conn, ids)}
            return Claim(futures=tuple(future_from_row(rows[rid]) for rid in ids), next_seq=next_seq)

        def anything_ready(conn: Connection) -> bool:
            return bool(ready_chains(conn, 1, scope)[0] or ready_unordered(conn, min(unordered_limit, 1), scope))

        # The worker polls this; on SQLite, look first without the write lock, so an idle poll never blocks a
        # submit. PostgreSQL takes no lock to read, and the claim's own reads are the look: one transaction, not two.
        if look_first and self._db.is_sqlite and not self._db.read(anything_ready):
            return Claim(futures=(), next_seq={})
        return self._db.write(txn)

    def finished_among(self, request_ids: Iterable[str]) -> set[str]:
        """Which of these requests the ledger holds as finished (or no longer holds): e.g. running requests a
        client cancelled, which the worker should stop working on."""
        ids = list(dict.fromkeys(request_ids))

        def read(conn: Connection) -> set[str]:
            unfinished: set[str] = set()
            for chunk in chunks(ids):
                query = select(futures.c.request_id, futures.c.state).where(futures.c.request_id.in_(chunk))
                for request_id, state in conn.execute(query):
                    if not FutureState(state).finished:
                        unfinished.add(request_id)
            return set(ids) - unfinished

        return self._db.read(read) if ids else set()

    def complete(self, request_id: str, result: bytes, *, metrics: StepMetrics | None = None) -> FutureRecord:
        """Record a result; ``metrics`` (a training step's) are written in the same transaction (store.metrics)."""
        return self._finish(request_id, FutureState.COMPLETED, {"result": result}, metrics)

    def fail(self, request_id: str, message: str, category: ErrorCategory) -> FutureRecord:
        """Fail one request; its model goes on with the next seq_id (a failing request fails only itself)."""
        if category not in ("user", "server"):
            raise ValueError(f"error category must be 'user' or 'server', got {category!r}")
        return self._finish(
            request_id, FutureState.FAILED, {"error_message": message or "request failed", "error_category": category}
        )

    def release(self, request_ids: Iterable[str]) -> int:
        """Put claimed requests back to pending (a worker shutting down before running them). Returns how many."""
        ids = list(request_ids)

        def txn(conn: Connection) -> int:
            count = 0
            for chunk in chunks(ids):
                count += conn.execute(
                    update(futures)
                    .where(futures.c.request_id.in_(chunk), futures.c.state == FutureState.RUNNING.value)
                    .values(state=FutureState.PENDING.value, started_at=None, claimed_by=None)
                ).rowcount
            if count:
                events.send(conn, events.SUBMITTED, "")
            return count

        return self._db.write(txn)

    def fail_in_flight(self, message: str, *, worker_id: str | None = None, ordered_message: str | None = None) -> int:
        """At startup: fail every request left running by a worker that died, so no client waits forever.

        With `worker_id`, only that worker's requests (other workers sharing the database are alive). Ordered
        (training) requests get `ordered_message` when given: their run's in-memory state died with the worker, so
        the advice differs. Returns how many were failed.
        """
        return self._db.write(
            lambda conn: upkeep.fail_in_flight(conn, self._clock(), message, worker_id, ordered_message)
        )

    def purge(self, *, delivered_for: timedelta, undelivered_for: timedelta | None = None) -> int:
        """Delete finished requests delivered more than `delivered_for` ago, and (optionally) finished ones never
        fetched for `undelivered_for`. Pending and running requests are never purged. Returns how many."""
        condition = upkeep.purgeable(self._clock(), delivered_for, undelivered_for)
        return self._db.write(lambda conn: conn.execute(delete(futures).where(condition)).rowcount)

    def fill_stale_gaps(self, waited_for: timedelta) -> dict[str, list[int]]:
        """Record, as failed, every seq_id a model has waited on for longer than `waited_for`.

        A model runs its requests strictly in seq_id order, so a seq_id that never arrives (a client that numbered
        a request and died, or gave up, before sending it) would hold every later request back forever. When the
        oldest of the requests waiting behind such a gap has waited `waited_for`, the missing seq_ids become failed
        placeholders of kind MISSING and the rest run. A late arrival of a filled seq_id is refused with a message
        saying why. Returns the filled seq_ids by model.
        """

        # Every worker of a split deployment runs this: two may fill the same gap at once.
        return self._db.write_inserting(lambda conn: upkeep.fill_stale_gaps(conn, self._clock(), waited_for))

    # -- sequences -----------------------------------------------------------------------------------------------

    def next_seq(self, model_id: str) -> int | None:
        """The seq_id the model will execute next, or None for a model with no ordered request yet."""
        return self._db.read(lambda conn: cursor_of(conn, model_id))

    def start_sequence(self, model_id: str, next_seq: int) -> None:
        """Declare where a model's sequence starts, for a model created without a seq-0 future. No-op if known."""
        self._db.write_inserting(lambda conn: ensure_cursor(conn, model_id, next_seq))

    # -- helpers -------------------------------------------------------------------------------------------------

    def _finish(
        self, request_id: str, state: FutureState, values: dict[str, Any], metrics: StepMetrics | None = None
    ) -> FutureRecord:
        def txn(conn: Connection) -> FutureRecord:
            row = conn.execute(BY_ID, {"request_id": request_id}).mappings().first()
            if row is None:
                raise NotFoundError(f"unknown request {request_id!r}")
            if FutureState(row["state"]).finished:
                raise ConflictError(f"request {request_id!r} has already {row['state']}")
            now = self._clock()
            finished = {"result": None, "error_message": None, "error_category": None, **values}
            params = {f"b_{name}": value for name, value in finished.items()}
            conn.execute(FINISH, {**params, "b_request_id": request_id, "b_state": state.value, "b_finished_at": now})
            if row["ordered"]:
                # The run's next request may run now. No event: only the worker finishing this one runs the run's
                # requests, and it claims again right after each job (worker/loop.py, run_once).
                advance_cursor(conn, row["model_id"])
            if metrics is not None:
                record_metrics(conn, metrics)
            record = future_from_row({**row, **finished, "state": state.value, "finished_at": now})
            # wakes long-polls in other processes, which answer from the record when it rides along
            events.send(conn, events.FINISHED, finished_payload(record))
            return record

        return self._db.write(txn)

    @staticmethod
    def _check_repeat(existing: FutureRecord, owner: str, kind: RequestKind) -> FutureRecord:
        if existing.owner != owner:
            # Do not reveal another owner's request; the seq_id is simply taken.
            raise ConflictError(f"seq_id {existing.seq_id} of model {existing.model_id!r} is already in use")
        if existing.kind is RequestKind.MISSING:  # a 400: the SDK would retry a 409 for minutes
            raise InvalidRequestError(existing.error_message or f"seq_id {existing.seq_id} was given up on")
        if existing.kind != kind:
            raise ConflictError(
                f"seq_id {existing.seq_id} of model {existing.model_id!r} was already used for {existing.kind.value}, "
                f"not {kind.value}"
            )
        return existing
