"""The worker hands each finished request to the api before its ledger write: the same record, and the result object."""

from __future__ import annotations

from pathlib import Path

from tests.worker.harness import Api, FakeClock, datums, drain
from tinkerd.domain import codec
from tinkerd.domain.records import FutureState, RequestKind
from tinkerd.domain.requests import Finished, ForwardBackward
from tinkerd.store import Store
from tinkerd.worker.hosts import ModelHost
from tinkerd.worker.loop import Worker, WorkerConfig


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
