"""The planner: per-run seq order, barriers alone, cross-run batching within budgets, fairness, nothing lost."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinkerd.domain.records import RequestKind
from tinkerd.worker.planner import (
    BATCHABLE,
    Job,
    JobKind,
    ModelCursorState,
    PendingWork,
    PlanLimits,
    plan,
)

FWD, FB, OPT = RequestKind.FORWARD, RequestKind.FORWARD_BACKWARD, RequestKind.OPTIM_STEP
SAVE, LOAD, SAMPLE = RequestKind.SAVE_WEIGHTS, RequestKind.LOAD_WEIGHTS, RequestKind.SAMPLE


def work(
    run: str, seq: int | None, kind: RequestKind = FB, tokens: int = 10, base: str = "m", arrival: float = 0.0
) -> PendingWork:
    return PendingWork(f"{run}#{seq}#{kind}#{arrival}", kind, run, base, seq, tokens, arrival)


def shape(jobs: list[Job]) -> list[tuple[str, list[tuple[str, int | None]]]]:
    return [(job.kind.value, [(item.model_id, item.seq_id) for item in job.items]) for job in jobs]


def test_barriers_split_runs_and_forward_passes_batch_across_runs() -> None:
    pending = [
        work("a", 1, FB, arrival=1),
        work("a", 2, FB, arrival=2),
        work("a", 3, OPT, arrival=3),
        work("a", 4, FWD, arrival=4),
        work("b", 1, FB, arrival=5),
        work("b", 2, OPT, arrival=6),
    ]
    jobs = plan(pending, ModelCursorState(next_seq={"a": 1, "b": 1}))
    assert shape(jobs) == [
        ("forward_batch", [("a", 1), ("a", 2), ("b", 1)]),
        ("single", [("a", 3)]),
        ("single", [("b", 2)]),
        ("forward_batch", [("a", 4)]),
    ]
    assert [job.round for job in jobs] == [0, 1, 1, 2]


def test_a_gap_stops_a_run_and_busy_runs_wait() -> None:
    pending = [work("a", 1), work("a", 3), work("b", 1), work("c", 0, RequestKind.CREATE_MODEL)]
    jobs = plan(pending, ModelCursorState(next_seq={"a": 1, "b": 1}, busy=frozenset({"b"})))
    # c has no cursor entry: like a fresh ledger cursor it starts at seq 0.
    assert sorted(shape(jobs)) == [("forward_batch", [("a", 1)]), ("single", [("c", 0)])]


def test_different_base_models_are_never_batched_together() -> None:
    jobs = plan([work("a", 1, base="m1"), work("b", 1, base="m2")], ModelCursorState({"a": 1, "b": 1}))
    assert sorted((job.base_model, job.model_ids) for job in jobs) == [("m1", ("a",)), ("m2", ("b",))]


def test_token_budget_splits_batches_and_an_oversized_request_runs_alone() -> None:
    pending = [work("a", s, tokens=100, arrival=0) for s in range(1, 6)] + [work("b", 1, tokens=900, arrival=1)]
    jobs = plan(pending, ModelCursorState({"a": 1, "b": 1}), PlanLimits(train_token_budget=250))
    assert shape(jobs) == [
        ("forward_batch", [("a", 1), ("a", 2)]),
        ("forward_batch", [("b", 1)]),  # over budget on its own, still runs; a's rest waits a round, not b
        ("forward_batch", [("a", 3), ("a", 4)]),
        ("forward_batch", [("a", 5)]),
    ]


def test_sampling_is_batched_per_base_model_within_limits() -> None:
    samples = [work(f"s{i}", i, SAMPLE, tokens=10, base="m1" if i % 3 else "m2", arrival=i) for i in range(9)]
    jobs = plan(samples, ModelCursorState(), PlanLimits(max_sample_requests=4))
    assert all(job.kind is JobKind.SAMPLE_BATCH for job in jobs)
    assert sorted((job.base_model, len(job.items)) for job in jobs) == [("m1", 2), ("m1", 4), ("m2", 3)]


def test_the_longest_waiting_run_goes_first() -> None:
    jobs = plan(
        [work("new", 1, OPT, arrival=9), work("old", 1, SAVE, arrival=1)], ModelCursorState({"new": 1, "old": 1})
    )
    assert [job.model_ids for job in jobs] == [("old",), ("new",)]


def test_duplicate_work_is_refused() -> None:
    with pytest.raises(ValueError, match="pending twice"):
        plan([work("a", 1), work("a", 1)], ModelCursorState({"a": 1}))
    with pytest.raises(ValueError, match="seq_id 1"):
        plan([work("a", 1, FB), work("a", 1, FWD)], ModelCursorState({"a": 1}))


def test_the_planner_imports_neither_the_store_nor_torch() -> None:
    code = (
        "import sys, tinkerd.worker.planner; "
        "bad = [m for m in sys.modules "
        "if m.split('.')[0] in ('torch', 'sqlalchemy') or m.startswith(('tinkerd.store', 'tinkerd.engine'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- properties ----------------------------------------------------------------------------------------------------

KINDS = [FWD, FB, FB, FB, OPT, SAVE, LOAD, RequestKind.SAVE_WEIGHTS_FOR_SAMPLER]


@dataclass(frozen=True)
class Scenario:
    pending: list[PendingWork]
    state: ModelCursorState
    limits: PlanLimits
    ready: set[str]  # request ids that may run now


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    pending: list[PendingWork] = []
    ready: set[str] = set()
    next_seq: dict[str, int] = {}
    busy: set[str] = set()
    for r in range(draw(st.integers(0, 5))):
        run, base, start = f"run{r}", draw(st.sampled_from(["m1", "m2"])), draw(st.integers(0, 3))
        next_seq[run] = start
        is_busy = draw(st.booleans()) and draw(st.booleans())
        if is_busy:
            busy.add(run)
        length = draw(st.integers(0, 10))
        gap = draw(st.one_of(st.none(), st.integers(start, start + length)))
        for seq in range(start, start + length):
            if seq == gap:
                continue
            item = PendingWork(
                f"{run}/{seq}",
                draw(st.sampled_from(KINDS)),
                run,
                base,
                seq,
                draw(st.integers(1, 400)),
                draw(st.floats(0, 100)),
            )
            pending.append(item)
            if not is_busy and (gap is None or seq < gap):
                ready.add(item.request_id)
    for i in range(draw(st.integers(0, 6))):
        item = PendingWork(
            f"sample/{i}",
            SAMPLE,
            f"sampler{i % 2}",
            draw(st.sampled_from(["m1", "m2"])),
            draw(st.one_of(st.none(), st.integers(0, 3))),
            draw(st.integers(1, 400)),
            draw(st.floats(0, 100)),
        )
        pending.append(item)
        ready.add(item.request_id)
    limits = PlanLimits(
        train_token_budget=draw(st.integers(1, 1000)),
        sample_token_budget=draw(st.integers(1, 1000)),
        max_sample_requests=draw(st.integers(1, 4)),
    )
    order = draw(st.permutations(pending))  # the planner must not depend on input order
    return Scenario(list(order), ModelCursorState(next_seq, frozenset(busy)), limits, ready)


@pytest.mark.heavy
@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_plan_properties(scenario: Scenario) -> None:
    jobs = plan(scenario.pending, scenario.state, scenario.limits)
    planned = [item for job in jobs for item in job.items]

    # Nothing lost, nothing duplicated, nothing that must wait.
    assert Counter(item.request_id for item in planned) == Counter(scenario.ready)

    # Each run's requests come out in seq_id order, gap-free from its cursor.
    seqs: dict[str, list[int]] = defaultdict(list)
    for item in planned:
        if item.ordered:
            assert item.seq_id is not None
            seqs[item.model_id].append(item.seq_id)
    for run, got in seqs.items():
        start = scenario.state.next_seq[run]
        assert got == list(range(start, start + len(got)))

    rounds_seen: dict[int, set[str]] = defaultdict(set)
    for job in jobs:
        assert {item.base_model for item in job.items} == {job.base_model}
        if any(item.ordered and item.kind not in BATCHABLE for item in job.items):
            assert len(job.items) == 1, "a barrier shares its job with nothing"
        if job.kind is JobKind.FORWARD_BATCH:
            assert all(item.kind in BATCHABLE and item.ordered for item in job.items)
            assert len(job.items) == 1 or job.token_count <= scenario.limits.train_token_budget
        if job.kind is JobKind.SAMPLE_BATCH:
            assert all(item.kind is SAMPLE for item in job.items)
            assert len(job.items) <= scenario.limits.max_sample_requests
            assert len(job.items) == 1 or job.token_count <= scenario.limits.sample_token_budget
        # A run appears in at most one job per round, so any order within a round is safe.
        runs = {item.model_id for item in job.items if item.ordered}
        assert not runs & rounds_seen[job.round]
        rounds_seen[job.round] |= runs

    assert [job.round for job in jobs] == sorted(job.round for job in jobs)
    # Fairness: every run with ready work gets something in the first round.
    assert {item.model_id for item in planned if item.ordered} == rounds_seen.get(0, set())
