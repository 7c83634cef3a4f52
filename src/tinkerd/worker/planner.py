"""Scheduling as a pure function: ready futures in, an ordered list of jobs out. No database, no torch.

Rules, per training run (model): requests run strictly in seq_id order from the run's next seq_id, stopping at
the first gap. State-changing requests (optim_step, save/load weights, create_model, ...) are barriers: a job of
their own. Between barriers, a run's consecutive forward/forward_backward requests may share one job (gradients
accumulate in order, and neither changes the weights), and they are batched with other runs' forward passes on the
same base model, up to a token budget. Sampling is batched separately, per base model.

Fairness: jobs come in rounds. In each round every run with ready work gets exactly one job's worth (its next
barrier, or a slice of its next forward segment), so no run waits for another run's whole queue; within a round
the jobs holding the longest-waiting work go first. Because a run appears in at most one job per round, running
the jobs in list order always respects each run's seq_id order.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from tinkerd.domain.records import FIRST_SEQ_ID, RequestKind, is_ordered

# Forward passes that leave the weights alone and so may share a batch; every other sequenced kind is a barrier.
BATCHABLE = frozenset({RequestKind.FORWARD, RequestKind.FORWARD_BACKWARD})


@dataclass(frozen=True)
class PendingWork:
    """One ready future as the planner sees it."""

    request_id: str
    kind: RequestKind
    model_id: str  # the training run (or sampler, for sampling) the request addresses
    base_model: str
    seq_id: int | None
    token_count: int  # cost estimate: tokens in the batch (training) or prompt + max new tokens (sampling)
    arrival: float = 0.0  # when it was submitted (any monotone clock); older work is served first

    @property
    def ordered(self) -> bool:
        return is_ordered(self.kind, self.seq_id)


@dataclass(frozen=True)
class ModelCursorState:
    """What the planner needs to know beyond the pending work itself."""

    # The seq_id each run executes next; a run missing here starts at FIRST_SEQ_ID, like a new ledger cursor.
    next_seq: Mapping[str, int] = field(default_factory=dict)
    # Runs with a job still executing: nothing more of theirs may start until it finishes.
    busy: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PlanLimits:
    train_token_budget: int = 16384  # tokens per batched forward/forward_backward job
    sample_token_budget: int = 16384  # prompt + new tokens per sampling job
    max_sample_requests: int = 64  # sampling requests per job


class JobKind(StrEnum):
    FORWARD_BATCH = "forward_batch"  # forward/forward_backward requests of one or more runs, one base model
    SINGLE = "single"  # one request on its own: a barrier, or unordered non-sampling work
    SAMPLE_BATCH = "sample_batch"  # sampling requests on one base model


@dataclass(frozen=True)
class Job:
    kind: JobKind
    base_model: str
    items: tuple[PendingWork, ...]  # each run's items in seq_id order
    round: int  # jobs of a lower round run first

    @property
    def token_count(self) -> int:
        return sum(item.token_count for item in self.items)

    @property
    def model_ids(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(item.model_id for item in self.items))

    @property
    def oldest_arrival(self) -> float:
        return min(item.arrival for item in self.items)


def plan(pending: Sequence[PendingWork], state: ModelCursorState, limits: PlanLimits | None = None) -> list[Job]:
    """Everything in `pending` that may run now, as jobs in the order to run them.

    Work that may not run yet (after a gap in its run's seq_ids, below the cursor, or of a busy run) is left out;
    plan again when more work arrives or jobs finish.
    """
    limits = limits or PlanLimits()
    _check_unique(pending)
    queues = _ready_queues([p for p in pending if p.ordered], state)
    jobs: list[Job] = []
    round_index = 0
    while queues:
        jobs.extend(_plan_round(queues, limits, round_index))
        queues = {run: queue for run, queue in queues.items() if queue}
        round_index += 1
    unordered = [p for p in pending if not p.ordered]
    jobs.extend(_sample_jobs([p for p in unordered if p.kind is RequestKind.SAMPLE], limits))
    jobs.extend(Job(JobKind.SINGLE, p.base_model, (p,), 0) for p in unordered if p.kind is not RequestKind.SAMPLE)
    # Rounds in order; within a round, the longest-waiting work first (request id only makes ties deterministic).
    return sorted(jobs, key=lambda job: (job.round, job.oldest_arrival, job.items[0].request_id))


def _check_unique(pending: Sequence[PendingWork]) -> None:
    request_ids: set[str] = set()
    keys: set[tuple[str, int]] = set()
    for item in pending:
        if item.request_id in request_ids:
            raise ValueError(f"request {item.request_id!r} is pending twice")
        request_ids.add(item.request_id)
        if item.ordered:
            assert item.seq_id is not None
            key = (item.model_id, item.seq_id)
            if key in keys:
                raise ValueError(f"seq_id {item.seq_id} of model {item.model_id!r} is pending twice")
            keys.add(key)


def _ready_queues(ordered: Iterable[PendingWork], state: ModelCursorState) -> dict[str, deque[PendingWork]]:
    """Per run, the gap-free chain of pending work starting at the run's next seq_id."""
    by_run: dict[str, dict[int, PendingWork]] = defaultdict(dict)
    for item in ordered:
        assert item.seq_id is not None
        by_run[item.model_id][item.seq_id] = item
    queues: dict[str, deque[PendingWork]] = {}
    for run, by_seq in by_run.items():
        if run in state.busy:
            continue
        seq = state.next_seq.get(run, FIRST_SEQ_ID)
        chain: deque[PendingWork] = deque()
        while seq in by_seq:
            chain.append(by_seq[seq])
            seq += 1
        if chain:
            queues[run] = chain
    return queues


def _plan_round(queues: dict[str, deque[PendingWork]], limits: PlanLimits, round_index: int) -> list[Job]:
    """Give every run with work one job's worth, popping it from the run's queue."""
    jobs: list[Job] = []
    forward_runs: dict[str, list[str]] = defaultdict(list)  # base model -> runs whose head is a forward pass
    for run, queue in queues.items():
        head = queue[0]
        if head.kind in BATCHABLE:
            forward_runs[head.base_model].append(run)
        else:
            jobs.append(Job(JobKind.SINGLE, head.base_model, (queue.popleft(),), round_index))
    for base_model, runs in forward_runs.items():
        # The run that has waited longest claims budget first.
        runs.sort(key=lambda run: (min(item.arrival for item in queues[run]), run))
        for batch in _pack_forward(base_model, runs, queues, limits.train_token_budget):
            jobs.append(Job(JobKind.FORWARD_BATCH, base_model, tuple(batch), round_index))
    return jobs


def _pack_forward(
    base_model: str, runs: list[str], queues: dict[str, deque[PendingWork]], budget: int
) -> list[list[PendingWork]]:
    """Fill batches with each run's leading forward passes. A run that does not fit whole keeps the rest of its
    segment for the next round (never a later batch of this round: jobs within a round may run in any order)."""
    batches: list[list[PendingWork]] = []
    batch: list[PendingWork] = []
    used = 0
    for run in runs:
        queue = queues[run]
        if batch and used + queue[0].token_count > budget:
            batches.append(batch)
            batch, used = [], 0
        # The first item always goes in, even over budget: an oversized request must still run, alone.
        while queue and queue[0].kind in BATCHABLE and queue[0].base_model == base_model:
            if batch and used + queue[0].token_count > budget:
                break
            item = queue.popleft()
            batch.append(item)
            used += item.token_count
    if batch:
        batches.append(batch)
    return batches


def _sample_jobs(samples: Sequence[PendingWork], limits: PlanLimits) -> list[Job]:
    by_base: dict[str, list[PendingWork]] = defaultdict(list)
    for item in sorted(samples, key=lambda item: (item.arrival, item.request_id)):
        by_base[item.base_model].append(item)
    jobs: list[Job] = []
    for base_model, items in by_base.items():
        batch: list[PendingWork] = []
        used = 0
        for item in items:
            full = len(batch) >= limits.max_sample_requests or used + item.token_count > limits.sample_token_budget
            if batch and full:
                jobs.append(Job(JobKind.SAMPLE_BATCH, base_model, tuple(batch), 0))
                batch, used = [], 0
            batch.append(item)
            used += item.token_count
        if batch:
            jobs.append(Job(JobKind.SAMPLE_BATCH, base_model, tuple(batch), 0))
    return jobs
