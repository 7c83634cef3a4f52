"""Recording the outcome of a request the worker ran: hand it to the api first (which may answer its client at once),
then write it to the ledger, retrying while the database is busy.

A result the ledger cannot hold (NaN or infinity) fails its request as a server fault; an exception becomes a failed
record whose message and category say whether it was the user's mistake (a ``TinkerdError``) or the server's.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from tinkerd.domain import codec
from tinkerd.domain.errors import TinkerdError
from tinkerd.domain.records import Clock, ErrorCategory, FutureRecord, FutureState
from tinkerd.domain.requests import Finished, Request, Result
from tinkerd.store.db import DatabaseBusyError
from tinkerd.store.store import Store
from tinkerd.worker.step_metrics import step_metrics_of

log = logging.getLogger(__name__)

Outcome = Result | Exception


class OutcomeRecorder:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        notify: Callable[[str, Finished], None] | None,
        await_answer: Callable[[str, float], object] | None,
        answer_wait_s: float,
        idle: Callable[[], bool],
    ) -> None:
        """``idle``: whether nothing else waits for the worker's thread (asked only after a job's last request)."""
        self.store = store
        self.notify = notify
        self.await_answer = await_answer
        self.answer_wait_s = answer_wait_s
        self._clock = clock
        self._idle = idle

    def finish(
        self, future: FutureRecord, outcome: Outcome, *, last: bool = False, request: Request | None = None
    ) -> None:
        """Hand the outcome to the api (which may answer its client at once), then record it in the ledger.

        The ledger write follows the hand-off, on this thread and before anything else runs, so the next request
        of the same run is claimed only once this one is recorded (seq order holds). Should the process die in
        between, the client may have its answer while the ledger fails the request as left running: never a lost
        result, at worst an error for an answer already given.

        ``last``: the job's last request. If nothing else waits for this thread then, it lets a waiting poll send
        the answer before it writes the ledger (``answer_wait_s``). ``request``: the request that ran,
        when known; a training step's metrics are recorded with its result (``step_metrics_of``).
        """
        finished, value = self._finished_record(future, outcome)
        if self.notify is not None:
            try:
                self.notify(future.request_id, Finished(finished, value))
                if last and self.await_answer is not None and self._idle():
                    # Nothing else waits for this thread: let the answer out first (the write competes for the GIL).
                    self.await_answer(future.request_id, self.answer_wait_s)
            except Exception:
                log.exception("notify(%s) failed", future.request_id)
        while True:
            try:
                if finished.state is FutureState.COMPLETED:
                    metrics = step_metrics_of(future, request, value, finished.finished_at or self._clock())
                    self.store.futures.complete(future.request_id, finished.result or b"", metrics=metrics)
                else:
                    self.store.futures.fail(
                        future.request_id,
                        finished.error_message or "request failed",
                        finished.error_category or "server",
                    )
                return
            except DatabaseBusyError as exc:  # unreachable past the store's retries: keep the result until it is back
                log.warning("could not record the outcome of %s yet (%s); retrying", future.request_id, exc)
                time.sleep(1.0)
            except TinkerdError as exc:  # already finished elsewhere (failed as in flight, purged): nothing to record
                log.warning("could not record the outcome of %s: %s", future.request_id, exc)
                return

    def _finished_record(self, future: FutureRecord, outcome: Outcome) -> tuple[FutureRecord, Result | None]:
        """The record as the ledger will hold it once finished, and the result object if it completed."""
        done = dataclasses.replace(future, payload=None, finished_at=self._clock())
        if not isinstance(outcome, Exception):
            try:
                data = codec.encode(outcome)
            except ValueError as exc:  # NaN or infinity: JSON cannot carry it
                log.error("result of %s cannot be stored: %s", future.request_id, exc)
                outcome = _Unstorable("the result holds NaN or infinite values")
            else:
                return dataclasses.replace(done, state=FutureState.COMPLETED, result=data), outcome
        message, category = _describe(future, outcome)
        return dataclasses.replace(done, state=FutureState.FAILED, error_message=message, error_category=category), None


class _Unstorable(Exception):
    """A result the ledger cannot hold (a server-side fault, not the user's)."""


def _describe(future: FutureRecord, exc: Exception) -> tuple[str, ErrorCategory]:
    if isinstance(exc, TinkerdError):
        return str(exc) or type(exc).__name__, "user"
    if isinstance(exc, _Unstorable):
        return str(exc), "server"
    log.error("%s %s failed", future.kind.value, future.request_id, exc_info=exc)
    detail = str(exc)
    detail = detail if len(detail) <= 200 else detail[:200] + "..."
    return f"internal error while running {future.kind.value}: {type(exc).__name__}: {detail}", "server"
