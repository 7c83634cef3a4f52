"""How a request the api records reaches a worker, and how its result gets back to the long-poll: one interface,
two implementations.

- ``InProcess`` (``tinkerd serve``): the worker runs in this process. A new request is handed to it with its
  decoded body (``accept``), an ordered request that may run at once is recorded as already claimed by it
  (``claim_for``), and the worker hands its result back through the notifier before it writes the ledger, so a
  long-poll answers from memory (see api/notify.py).
- ``ThroughLedger`` (the split deployment's ``tinkerd api``): workers are other processes, sharing only the ledger
  on PostgreSQL. The ledger itself announces new requests to them (store/events.py); a listener thread here turns
  the ledger's "finished" events into notifier wake-ups, and the long-poll reads the result from the ledger.

Routes and the long-poll use only this interface; neither knows which implementation runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from tinkerd.api.notify import FutureNotifier
from tinkerd.domain.records import FutureRecord
from tinkerd.domain.requests import Finished, Request
from tinkerd.store import Store
from tinkerd.store.events import Callbacks, LedgerListener
from tinkerd.store.workers import WorkerRegistry

log = logging.getLogger(__name__)

Accept = Callable[[FutureRecord, Request], None]


class Dispatch(Protocol):
    @property
    def notifier(self) -> FutureNotifier:
        """Where long-polls wait for results (and find a result handed over in memory)."""
        ...

    @property
    def claim_for(self) -> str | None:
        """The worker a new request that may run at once is recorded as claimed by (None: record it pending)."""
        ...

    def submitted(self, record: FutureRecord, request: Request) -> None:
        """`record` (with its decoded `request`) was just created in the ledger. Called once, never for a repeat."""
        ...

    def place(self, run_id: str, base_model: str) -> None:
        """A new training run's row was created: give it to a trainer (split deployment). Raises CapacityError
        when no trainer can take it."""
        ...

    def start(self) -> None:
        """Begin delivering (the app's startup, after the notifier is bound to its event loop)."""
        ...

    def close(self) -> None: ...


class InProcess:
    """A worker in this process: hand-over at submit, results handed back in memory."""

    def __init__(self, notifier: FutureNotifier, accept: Accept | None = None, claim_for: str | None = None) -> None:
        if claim_for is not None and accept is None:
            raise ValueError("claim_for needs accept: a claimed request must be handed to its worker")
        self._notifier = notifier
        self._accept = accept
        self._claim_for = claim_for

    @property
    def notifier(self) -> FutureNotifier:
        return self._notifier

    @property
    def claim_for(self) -> str | None:
        return self._claim_for

    def submitted(self, record: FutureRecord, request: Request) -> None:
        if self._accept is None:
            return
        # Handed over now rather than after the response is sent: the worker starts sooner, and the SDK sends its
        # next request (often the optim_step behind a forward_backward) without waiting for this one's result.
        self._notifier.expect(record.request_id)  # before the hand-over, so that its notification comes after
        self._accept(record, request)

    def place(self, run_id: str, base_model: str) -> None:
        pass  # the one worker runs every run

    def start(self) -> None:
        pass

    def close(self) -> None:
        self._notifier.close()


class ThroughLedger:
    """Workers in other processes: the ledger announces requests to them, and their results to us (LISTEN)."""

    def __init__(self, store: Store, notifier: FutureNotifier | None = None) -> None:
        self._notifier = notifier or FutureNotifier()
        self._workers = WorkerRegistry(store.db)
        self._listener = LedgerListener(
            store.db.url,
            Callbacks(on_finished=self._finished, on_reconnect=self._notifier.wake_all),
            name="tinkerd-api-listen",
        )

    @property
    def notifier(self) -> FutureNotifier:
        return self._notifier

    def _finished(self, request_id: str, record: FutureRecord | None) -> None:
        # With the record, a poll answers from it (decoding its stored result) instead of reading the ledger.
        self._notifier.notify(request_id, Finished(record) if record is not None else None)

    @property
    def claim_for(self) -> str | None:
        return None

    def submitted(self, record: FutureRecord, request: Request) -> None:
        # The ledger's submit transaction announced it (store.events.SUBMITTED); its FINISHED event will come to our
        # listener, so a poll for it need not read the ledger before its first wait.
        self._notifier.expect(record.request_id)

    def place(self, run_id: str, base_model: str) -> None:
        trainer = self._workers.place(run_id, base_model)
        log.info("training run %s (%s) placed on trainer %s", run_id, base_model, trainer)

    def start(self) -> None:
        self._listener.start()

    def close(self) -> None:
        self._notifier.close()
        self._listener.close()
