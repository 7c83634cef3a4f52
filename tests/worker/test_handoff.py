"""The worker hands each finished request to the api before its ledger write: the same record, and the result object."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.worker.harness import Api, FakeClock, datums, drain
from tinkerd.domain import codec
from tinkerd.domain.ops import AdamParams
from tinkerd.domain.records import FutureRecord, FutureState, RequestKind
from tinkerd.domain.requests import Finished, ForwardBackward, OptimStep
from tinkerd.store import Store
from tinkerd.worker.hosts import ModelHost
from tinkerd.worker.loop import Worker, WorkerConfig

pytestmark = pytest.mark.integration


def test_handed_over_records_match_the_ledger(
    api: Api, store: Store, host: ModelHost, tmp_path: Path, clock: FakeClock
) -> None:
    handed: dict[str, Finished] = {}
    worker = Worker(store, {host.name: host}, tmp_path / "data", lambda rid, f: handed.__setitem__(rid, f), clock=clock)
    run = api.create_model()
    good = api.forward_backward(run, datums(0))
    bad = api.forward_backward(run, datums(0), loss_fn="no_such_loss")
    drain(worker)
    assert set(handed) >= {good, bad}
    for request_id, finished in handed.items():
        stored = store.futures.get(request_id, api.owner)
        mine = finished.record
        assert (mine.state, mine.result, mine.error_message, mine.error_category) == (
            stored.state,
            stored.result,
            stored.error_message,
            stored.error_category,
        )
        assert mine.owner == stored.owner and mine.payload is None
        if mine.state is FutureState.COMPLETED:
            assert finished.value == codec.decode(stored.result or b"")
        else:
            assert finished.value is None
    assert handed[good].record.state is FutureState.COMPLETED
    assert handed[bad].record.state is FutureState.FAILED and "no_such_loss" in (handed[bad].record.error_message or "")


def test_a_request_handed_over_at_submit_runs_without_its_stored_payload(
    api: Api, store: Store, host: ModelHost, tmp_path: Path, clock: FakeClock
) -> None:
    worker = Worker(store, {host.name: host}, tmp_path / "data", config=WorkerConfig(), clock=clock)
    run = api.create_model()
    drain(worker)
    request = ForwardBackward(run, datums(0), "cross_entropy")
    record = store.futures.submit(
        owner=api.owner, model_id=run, seq_id=1, kind=RequestKind.FORWARD_BACKWARD, payload=b"not a request"
    )
    worker.accept(record, request)  # what the api in the same process does after recording it
    drain(worker)
    assert store.futures.get(record.request_id, api.owner).state is FutureState.COMPLETED
    # Without the hand-over the stored payload is what runs (and here it cannot be decoded).
    broken = store.futures.submit(
        owner=api.owner, model_id=run, seq_id=2, kind=RequestKind.FORWARD_BACKWARD, payload=b"not a request"
    )
    drain(worker)
    failed = store.futures.get(broken.request_id, api.owner)
    assert failed.state is FutureState.FAILED and "could not decode" in (failed.error_message or "")


@pytest.fixture
def run(api: Api, worker: Worker) -> str:
    """A created training run, its create_model already run by `worker`."""
    run_id = api.create_model()
    drain(worker)
    return run_id


def _submit_claimed(store: Store, owner: str, run: str, seq_id: int, request: ForwardBackward) -> FutureRecord:
    record, created = store.futures.submit_or_find(
        owner=owner,
        model_id=run,
        seq_id=seq_id,
        kind=RequestKind.FORWARD_BACKWARD,
        payload=codec.encode(request),
        claim_for="local",
    )
    assert created and record.state is FutureState.RUNNING
    return record


def test_a_request_claimed_at_submit_runs_from_the_hand_over_without_a_claim(
    api: Api, store: Store, worker: Worker, run: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = _submit_claimed(store, api.owner, run, 1, ForwardBackward(run, datums(0), "cross_entropy"))

    def no_claims(**_kwargs: object) -> None:
        raise AssertionError("the ledger was asked for work although the request was handed over claimed")

    monkeypatch.setattr(store.futures, "claim_ready", no_claims)
    worker.accept(record, ForwardBackward(run, datums(0), "cross_entropy"))
    assert worker.run_once()
    monkeypatch.undo()
    done = store.futures.get(record.request_id, api.owner)
    assert done.state is FutureState.COMPLETED
    assert store.futures.next_seq(run) == 2
    assert drain(worker) == 0  # nothing else was left to run


def test_the_order_of_a_run_holds_across_claimed_and_pending_requests(
    api: Api, store: Store, host: ModelHost, tmp_path: Path, clock: FakeClock
) -> None:
    """seq 1 is claimed at submit; seq 2 arrives while it waits and is recorded pending; both run, in order."""
    order: list[int | None] = []
    worker = Worker(store, {host.name: host}, tmp_path / "data", lambda _rid, f: order.append(f.record.seq_id))
    run = api.create_model()
    drain(worker)
    order.clear()
    request = ForwardBackward(run, datums(0), "cross_entropy")
    first = _submit_claimed(store, api.owner, run, 1, request)
    second, _ = store.futures.submit_or_find(
        owner=api.owner,
        model_id=run,
        seq_id=2,
        kind=RequestKind.OPTIM_STEP,
        payload=codec.encode(OptimStep(run, AdamParams(learning_rate=0.01))),
        claim_for="local",
    )
    assert second.state is FutureState.PENDING
    worker.accept(second, OptimStep(run, AdamParams(learning_rate=0.01)))
    worker.accept(first, request)
    drain(worker)
    assert order == [1, 2]
    assert store.futures.get(second.request_id, api.owner).state is FutureState.COMPLETED


def test_claimed_requests_not_yet_taken_are_released_at_shutdown(
    api: Api, store: Store, worker: Worker, run: str
) -> None:
    record = _submit_claimed(store, api.owner, run, 1, ForwardBackward(run, datums(0), "cross_entropy"))
    worker.accept(record, ForwardBackward(run, datums(0), "cross_entropy"))
    assert worker.release_claimed() == 1
    assert store.futures.get(record.request_id, api.owner).state is FutureState.PENDING
    drain(worker)  # a later claim runs it from the ledger
    assert store.futures.get(record.request_id, api.owner).state is FutureState.COMPLETED


def test_after_a_job_claimed_at_submit_work_from_the_ledger_and_pending_hand_overs_still_run(
    api: Api, store: Store, worker: Worker, run: str
) -> None:
    # How often the worker reads the ledger is a latency mechanism, measured by bench/bench_api_overhead.py; what a
    # user notices is that every request runs, whichever way it reached the worker.
    request = ForwardBackward(run, datums(0), "cross_entropy")
    first = _submit_claimed(store, api.owner, run, 1, request)
    worker.accept(first, request)
    drain(worker)
    assert store.futures.get(first.request_id, api.owner).state is FutureState.COMPLETED
    # A request that reached the ledger without a hand-over (another process, say) is found and run.
    other = api.forward_backward(run, datums(1), seq_id=2)
    drain(worker)
    assert store.futures.get(other, api.owner).state is FutureState.COMPLETED
    # A request handed over pending (it arrived while its predecessor was claimed) runs after it.
    request = ForwardBackward(run, datums(2), "cross_entropy")
    claimed = _submit_claimed(store, api.owner, run, 3, request)
    worker.accept(claimed, request)
    follower, _ = store.futures.submit_or_find(
        owner=api.owner,
        model_id=run,
        seq_id=4,
        kind=RequestKind.FORWARD_BACKWARD,
        payload=codec.encode(request),
        claim_for="local",
    )
    assert follower.state is FutureState.PENDING
    worker.accept(follower, request)
    drain(worker)
    for record in (claimed, follower):
        assert store.futures.get(record.request_id, api.owner).state is FutureState.COMPLETED
