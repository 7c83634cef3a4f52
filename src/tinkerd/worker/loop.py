"""The worker loop: claim ready futures, plan, execute on the engine, record each result (``outcomes``), repeat.

Threading: every engine call happens on the thread that runs ``run_forever`` (torch state and our adapters are not
thread-safe). Other threads may only call ``wake``; ``notify`` is called on the worker's thread.

Interleaving: training jobs run one at a time; after each one the samplers get as much wall time as the job took
(at least one decode step), so under mixed load each side gets about half of the machine and neither starves.
New requests are claimed before every job: sampling requests join the running decode batch at its next step,
training requests join the planner's next round.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tinkerd.domain import codec
from tinkerd.domain.records import Clock, FutureRecord, FutureState, utc_now
from tinkerd.domain.requests import CreateModel, Finished, ForwardBackward, LoadWeights, Request, Sample
from tinkerd.store.files import CheckpointFiles
from tinkerd.store.sequencing import ClaimScope
from tinkerd.store.store import Store
from tinkerd.worker.forward_batch import ForwardItem, run_forward_batch
from tinkerd.worker.handlers import Handlers
from tinkerd.worker.hosts import ModelHost
from tinkerd.worker.housekeeping import Housekeeper, HousekeepingConfig
from tinkerd.worker.outcomes import Outcome, OutcomeRecorder
from tinkerd.worker.planner import Job, JobKind, ModelCursorState, PendingWork, PlanLimits, plan
from tinkerd.worker.runtime import Runtime
from tinkerd.worker.sampling import OnProgress, SamplingService, Watching

log = logging.getLogger(__name__)

RESTART_MESSAGE = "the server restarted while this request was running; please retry"
RESTART_TRAINING_MESSAGE = (
    "the server restarted while this request was running, and the training run's in-memory state (LoRA weights and "
    "optimizer) went with it; resume from the run's last save_state with "
    "create_training_client_from_state_with_optimizer"
)
_HANDED_LIMIT = 4096


@dataclass(frozen=True)
class WorkerConfig:
    # Names this worker's claims in the ledger. Keep it stable across restarts: at start the worker fails the
    # requests its previous incarnation left running, found by this id.
    worker_id: str = "local"
    # Idle wait between claims: the latency of a request when nobody calls ``wake`` (api and worker in two processes).
    poll_interval_s: float = 0.1
    sample_slice_s: float = 0.02  # decode time between claims when only sampling is busy
    # With nothing else to do, how long the worker waits, after notifying a result a poll is waiting for, for that
    # answer to go out before it writes the ledger (see FutureNotifier.await_answer).
    answer_wait_s: float = 0.002
    housekeeping_interval_s: float = 30.0
    per_model_limit: int = 64  # a run's requests claimed at once
    max_samples_in_flight: int = 256  # sampling requests queued or decoding; more wait in the ledger
    weights_cache_size: int = 8  # sampler checkpoints kept in memory
    plan_limits: PlanLimits = field(default_factory=PlanLimits)
    # Split deployment: which requests this worker claims (a trainer's runs, a sampler's base models; None: all),
    # and whether snapshots for samplers go to storage too (samplers are other processes).
    scope: ClaimScope | None = None
    share_snapshots: bool = False
    housekeeping: HousekeepingConfig = field(default_factory=HousekeepingConfig)


@dataclass(frozen=True)
class _Claimed:
    future: FutureRecord
    request: Request


class Worker:
    def __init__(
        self,
        store: Store,
        hosts: Mapping[str, ModelHost],
        data_dir: Path,
        notify: Callable[[str, Finished], None] | None = None,
        *,
        config: WorkerConfig | None = None,
        clock: Clock = utc_now,
        await_answer: Callable[[str, float], object] | None = None,
        watching: Watching | None = None,
        on_progress: OnProgress | None = None,
    ) -> None:
        self.store = store
        self.config = config or WorkerConfig()
        self.runtime = Runtime(hosts, self.config.weights_cache_size)
        self.files = CheckpointFiles(data_dir)
        self.handlers = Handlers(store, self.runtime, self.files, clock, share_snapshots=self.config.share_snapshots)
        # Streaming clients in this process see tokens as they come (``watching``/``on_progress``, the notifier's).
        self.sampling = SamplingService(store, self.runtime, self.files, watching=watching, on_progress=on_progress)
        self.housekeeper = Housekeeper(store, self.runtime, self.files, self.config.housekeeping)
        self.outcomes = OutcomeRecorder(store, clock, notify, await_answer, self.config.answer_wait_s, self._idle)
        self._pool: dict[str, _Claimed] = {}  # claimed training requests not yet run, by request id
        self._round: deque[Job] = deque()  # the planner's current round, run one job per iteration
        self._wakeup = threading.Event()
        # Requests the api of this process handed over at submit, by request id: claimed without decoding the stored
        # payload. Written by api threads, read here; single dict operations are atomic under the GIL.
        self._handed: dict[str, Request] = {}
        # Requests the api recorded as already claimed by this worker (they may run at once), in arrival order.
        self._preclaimed: deque[_Claimed] = deque()
        self._submitted = False  # something was handed over since the last claim: claim without looking first
        self._started = False
        self._next_housekeeping = 0.0
        # Set when a request claimed at submit is taken: the ledger read after its job is skipped (see _claim).
        self._skip_look = False

    # -- driving -------------------------------------------------------------------------------------------------

    def wake(self) -> None:
        """Cut an idle wait short (e.g. the api just submitted a request). Safe from any thread."""
        self._wakeup.set()

    def accept(self, future: FutureRecord, request: Request) -> None:
        """The api recorded `future` in the ledger: keep its request at hand, and wake. Safe from any thread.

        Only an optimisation for a pending request: the ledger is what the worker runs, and a request not found
        here is decoded from it. A request recorded as running under this worker's name
        (``FuturesLedger.submit_or_find`` with ``claim_for``) is the exception: it reaches this worker only this way."""
        if future.state is FutureState.RUNNING and future.claimed_by == self.config.worker_id:
            self._preclaimed.append(_Claimed(future, request))
            self._wakeup.set()
            return
        if future.state is FutureState.PENDING:
            if len(self._handed) >= _HANDED_LIMIT:  # requests claimed by no one (e.g. refused later): start over
                self._handed.clear()
            self._handed[future.request_id] = request
        self._submitted = True
        self._wakeup.set()

    def run_forever(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set (set it, then call ``wake``), then put back what was claimed but not run."""
        try:
            while not stop.is_set():
                try:
                    did_work = self.run_once()
                except Exception:
                    # The store is down or locked for long: keep the process alive and try again shortly.
                    log.exception("worker iteration failed; retrying")
                    did_work = False
                    stop.wait(1.0)
                if not did_work:
                    self._wakeup.wait(self.config.poll_interval_s)
                    self._wakeup.clear()
        finally:
            self.release_claimed()

    def run_once(self) -> bool:
        """One iteration: housekeeping if due, claim, then one training job or a slice of sampling. True if busy."""
        self.start()
        did_work = False
        if time.monotonic() >= self._next_housekeeping:
            self._next_housekeeping = time.monotonic() + self.config.housekeeping_interval_s
            self.housekeeper.run()
        did_work |= self._claim()
        if not self._round and self._pool:
            self._round = deque(self._plan_round())
        if self._round:
            job = self._round.popleft()
            items = [self._pool.pop(item.request_id) for item in job.items]
            started = time.perf_counter()
            self._execute(job, items)
            self._sample_for(time.perf_counter() - started)
            return True
        if self.sampling.has_work():
            self._sample_for(self.config.sample_slice_s)
            return True
        return did_work

    def start(self) -> None:
        """Fail what an earlier incarnation of this worker left running (no client may wait forever). Idempotent."""
        if self._started:
            return
        failed = self.store.futures.fail_in_flight(
            RESTART_MESSAGE, worker_id=self.config.worker_id, ordered_message=RESTART_TRAINING_MESSAGE
        )
        if failed:
            log.warning("failed %d requests left running by a previous run of worker %s", failed, self.config.worker_id)
        self._started = True

    def release_claimed(self) -> int:
        """Put every claimed but unfinished request back to pending (shutting down); returns how many."""
        self._take_preclaimed()
        ids = list(self._pool) + [future.request_id for future in self.sampling.abandon_all()]
        self._pool.clear()
        self._round.clear()
        return self.store.futures.release(ids) if ids else 0

    # -- claiming and planning -----------------------------------------------------------------------------------

    def _take_preclaimed(self) -> bool:
        """Move the requests the api claimed for this worker into the pool; True if there were any."""
        took = False
        while self._preclaimed:
            claimed = self._preclaimed.popleft()
            self._pool[claimed.future.request_id] = claimed
            took = True
        return took

    def _claim(self) -> bool:
        """Take what the api claimed for this worker, then claim what the ledger has ready.

        After the job of a request claimed at submit, the ledger is not read unless something was handed over
        since (or still waits there): the read would compete with the job's answer going out, and anything that
        reached the ledger another way is found at the next idle poll, as when idle."""
        took = self._take_preclaimed()
        if took:
            self._skip_look = True
            if not self._submitted:
                return True  # the api's claim is this iteration's: run it now
        elif self._skip_look:
            self._skip_look = False
            if not (self._submitted or self._handed):
                return False
        room = max(0, self.config.max_samples_in_flight - self.sampling.in_flight_count())
        look_first, self._submitted = not self._submitted, False
        claim = self.store.futures.claim_ready(
            worker_id=self.config.worker_id,
            per_model_limit=self.config.per_model_limit,
            unordered_limit=room,
            look_first=look_first,
            scope=self.config.scope,
        )
        if not claim.futures:
            return took
        for future in claim.futures:
            request = self._handed.pop(future.request_id, None)
            try:
                request = request if request is not None else codec.decode(future.payload or b"")
            except Exception as exc:
                self.outcomes.finish(future, RuntimeError(f"could not decode the stored request: {exc!r}"))
                continue
            if isinstance(request, Sample):
                try:
                    self.sampling.submit(future, request)
                except Exception as exc:
                    self.outcomes.finish(future, exc)
            else:
                self._pool[future.request_id] = _Claimed(future, request)
        return True

    def _plan_round(self) -> list[Job]:
        """The first round of a plan of everything claimed: one job's worth per run (the planner's fairness).

        Planning again only once a round is done lets newly claimed runs join the next round without letting
        a run with a long queue claimed earlier go first every time.
        """
        next_seq: dict[str, int] = {}
        for c in self._pool.values():
            if c.future.ordered and c.future.seq_id is not None:
                # A run's claimed requests are a gap-free chain whose earlier part has run: it resumes at its lowest.
                next_seq[c.future.model_id] = min(next_seq.get(c.future.model_id, c.future.seq_id), c.future.seq_id)
        pending = [self._pending(c) for c in self._pool.values()]
        jobs = plan(pending, ModelCursorState(next_seq=next_seq), self.config.plan_limits)
        planned = {item.request_id for job in jobs for item in job.items}
        unplanned = [rid for rid in self._pool if rid not in planned]
        if unplanned:  # the ledger and the planner disagree on what may run: let a later claim retry them
            log.error("the planner left %d claimed requests out; releasing them", len(unplanned))
            for rid in unplanned:
                del self._pool[rid]
            self.store.futures.release(unplanned)
        return [job for job in jobs if job.round == jobs[0].round] if jobs else []

    def _pending(self, claimed: _Claimed) -> PendingWork:
        future = claimed.future
        return PendingWork(
            request_id=future.request_id,
            kind=future.kind,
            model_id=future.model_id,
            base_model=self._base_model_of(claimed.request),
            seq_id=future.seq_id,
            token_count=future.token_count,
            arrival=future.created_at.timestamp(),
        )

    def _base_model_of(self, request: Request) -> str:
        """For batching only: "" when unknown (the request then fails when it runs, with a proper message)."""
        if isinstance(request, CreateModel):
            return request.base_model
        run = self.runtime.runs.get(getattr(request, "run_id", ""))
        if run is not None:
            return run.base_model
        if isinstance(request, LoadWeights) and request.create_base_model:
            return request.create_base_model
        return ""

    # -- executing -----------------------------------------------------------------------------------------------

    def _execute(self, job: Job, items: list[_Claimed]) -> None:
        if job.kind is JobKind.FORWARD_BATCH:
            forward = [ForwardItem(c.future, c.request) for c in items if isinstance(c.request, ForwardBackward)]
            for c in items:
                if not isinstance(c.request, ForwardBackward):
                    planned_wrong = RuntimeError(f"{type(c.request).__name__} planned as a forward pass")
                    self.outcomes.finish(c.future, planned_wrong)
            results = run_forward_batch(self.runtime, forward)
            for i, (item, outcome) in enumerate(results):
                self.outcomes.finish(item.future, outcome, last=i == len(results) - 1, request=item.request)
            return
        for i, c in enumerate(items):  # SINGLE jobs hold one request; anything else would run in order too
            try:
                outcome: Outcome = self.handlers.execute(c.future, c.request)
            except Exception as exc:
                outcome = exc
            self.outcomes.finish(c.future, outcome, last=i == len(items) - 1, request=c.request)

    def _sample_for(self, budget_s: float) -> None:
        """Decode steps until ``budget_s`` of wall time is used or nothing is left (at least one step)."""
        deadline = time.perf_counter() + budget_s
        self.sampling.drop_cancelled()
        while self.sampling.has_work():
            for future, outcome in self.sampling.step():
                self.outcomes.finish(future, outcome)
            # a sampler that decodes in another process (vLLM) only hands over results: no use waiting out the budget
            if time.perf_counter() >= deadline or self.sampling.decodes_elsewhere():
                break

    def _idle(self) -> bool:
        """Whether no other claimed, handed-over or sampling work waits for this thread."""
        return not (self._pool or self._round or self._preclaimed or self._submitted or self.sampling.has_work())
