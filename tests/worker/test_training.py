"""Training through the ledger: order, batching across runs, and one bad request failing alone."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from tests.worker.harness import Api, FakeClock, RequestFailed, datums, drain, make_host, make_worker
from tinkerd.domain.ops import ArrayData, Datum, ForwardResult
from tinkerd.domain.records import FutureState
from tinkerd.domain.requests import CreateModelResult
from tinkerd.engine.served_model import ForwardJob, ServedModel
from tinkerd.store import Store
from tinkerd.worker.hosts import ModelHost
from tinkerd.worker.loop import Worker

pytestmark = pytest.mark.integration


def spy_forward(monkeypatch: pytest.MonkeyPatch, served: ServedModel) -> list[list[ForwardJob]]:
    calls: list[list[ForwardJob]] = []
    real = served.forward

    def forward(jobs: Sequence[ForwardJob]) -> list[ForwardResult]:
        calls.append(list(jobs))
        return real(jobs)

    monkeypatch.setattr(served, "forward", forward)
    return calls


def test_create_train_and_the_loss_goes_down(api: Api, worker: Worker, notified: list[str]) -> None:
    run = api.create_model()
    data = datums(0)
    losses = []
    for _ in range(4):
        fb = api.forward_backward(run, data)
        step = api.optim_step(run)
        drain(worker)
        losses.append(api.loss(fb))
        api.result(step)
    assert losses[-1] < losses[0] * 0.8
    first = api.store.futures.get(notified[0], api.owner)
    assert isinstance(api.result(first.request_id), CreateModelResult)
    assert len(notified) == 1 + 4 * 2  # every completion is announced


def test_requests_wait_for_a_gap_in_seq_ids(api: Api, worker: Worker) -> None:
    run = api.create_model()
    data = datums(1)
    # seq 2 and 3 arrive before seq 1, as with the SDK's parallel chunk submission
    opt = api.optim_step(run, seq_id=2)
    after = api.forward(run, data, seq_id=3)
    drain(worker)
    assert api.record(opt).state is FutureState.PENDING
    assert api.record(after).state is FutureState.PENDING
    fb = api.forward_backward(run, data, seq_id=1)
    drain(worker)
    # seq 1's gradients were applied by seq 2 before seq 3 ran
    assert api.loss(after) < api.loss(fb)


def test_forward_backwards_of_two_runs_share_one_engine_call_and_match_separate_execution(
    api: Api, worker: Worker, host: ModelHost, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, clock: FakeClock
) -> None:
    calls = spy_forward(monkeypatch, host.served)
    runs = [api.create_model(0, seed=1), api.create_model(1, seed=2)]
    last = {}
    for i, run in enumerate(runs):
        api.forward_backward(run, datums(10 + i))
        api.optim_step(run)
        last[run] = api.forward_backward(run, datums(20 + i, (5, 7)))
    drain(worker)
    assert [len(jobs) for jobs in calls] == [2, 2]  # round 1: both first fbs; round 3: both last fbs
    batched = {run: api.result(last[run]) for run in runs}

    # The same work, one request at a time, in a fresh world.
    other_store = Store.open(f"sqlite:///{tmp_path / 'other.db'}", clock=clock)
    other_host = make_host()
    other_worker = make_worker(other_store, other_host, tmp_path / "other", clock)
    other_api = Api(other_store, clock)
    separate_calls = spy_forward(monkeypatch, other_host.served)
    for i, seed in enumerate((1, 2)):
        run = other_api.create_model(i, seed=seed)
        drain(other_worker)
        other_api.forward_backward(run, datums(10 + i))
        drain(other_worker)
        other_api.optim_step(run)
        drain(other_worker)
        fb = other_api.forward_backward(run, datums(20 + i, (5, 7)))
        drain(other_worker)
        alone = other_api.result(fb)
        assert isinstance(alone, ForwardResult)
        together = batched[runs[i]]
        assert isinstance(together, ForwardResult)
        assert alone.metrics["loss:sum"] == pytest.approx(together.metrics["loss:sum"], rel=1e-5)
        for a, t in zip(alone.loss_fn_outputs, together.loss_fn_outputs, strict=True):
            torch.testing.assert_close(torch.tensor(a["logprobs"].values), torch.tensor(t["logprobs"].values))
    assert all(len(jobs) == 1 for jobs in separate_calls)
    other_store.close()


def test_a_bad_request_fails_alone_and_its_neighbour_succeeds(
    api: Api, worker: Worker, host: ModelHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = [api.create_model(i) for i in range(3)]
    drain(worker)
    calls = spy_forward(monkeypatch, host.served)
    unknown_loss = api.forward_backward(runs[0], datums(0), loss_fn="no_such_loss")
    bad_token = Datum([5, 1000], {"target_tokens": ArrayData.of_ints([6, 7]), "weights": ArrayData.of_floats([1, 1])})
    bad = api.forward_backward(runs[1], [bad_token])
    good = api.forward_backward(runs[2], datums(0))
    drain(worker)
    with pytest.raises(RequestFailed) as loss_error:
        api.result(unknown_loss)
    assert loss_error.value.category == "user" and "no_such_loss" in loss_error.value.message
    with pytest.raises(RequestFailed) as token_error:
        api.result(bad)
    assert token_error.value.category == "user" and "1000" in token_error.value.message
    assert api.loss(good) > 0
    assert [[job.adapter_id for job in jobs] for jobs in calls] == [[runs[2]]]
    # the failed requests did not block their runs: the next seq_id runs
    after = api.forward_backward(runs[1], datums(0))
    drain(worker)
    assert api.loss(after) > 0


@pytest.mark.parametrize("problem", ["loss", "token", "inputs"])
def test_a_bad_request_alone_fails_as_it_would_in_company(
    api: Api, worker: Worker, host: ModelHost, monkeypatch: pytest.MonkeyPatch, problem: str
) -> None:
    """A request alone in its pass is not validated apart first; its error must be the same user error."""
    run = api.create_model()
    drain(worker)
    validated = spy_validate(monkeypatch, host.served)
    if problem == "loss":
        request = api.forward_backward(run, datums(0), loss_fn="no_such_loss")
        expected = "no_such_loss"
    elif problem == "token":
        datum = Datum([5, 1000], {"target_tokens": ArrayData.of_ints([6, 7]), "weights": ArrayData.of_floats([1, 1])})
        request = api.forward_backward(run, [datum])
        expected = "1000"
    else:
        datum = Datum([5, 6], {"weights": ArrayData.of_floats([1, 1])})
        request = api.forward_backward(run, [datum])
        expected = "target_tokens"
    drain(worker)
    with pytest.raises(RequestFailed) as error:
        api.result(request)
    assert error.value.category == "user" and expected in error.value.message
    assert validated == []
    # Nothing was accumulated: the next request and an optim_step work as on a fresh run.
    assert all(p.grad is None for p in host.served.adapter(run).weights.parameters())
    after = api.forward_backward(run, datums(0))
    drain(worker)
    assert api.loss(after) > 0


def spy_validate(monkeypatch: pytest.MonkeyPatch, served: ServedModel) -> list[ForwardJob]:
    calls: list[ForwardJob] = []
    real = served.validate

    def validate(job: ForwardJob) -> None:
        calls.append(job)
        real(job)

    monkeypatch.setattr(served, "validate", validate)
    return calls


def test_a_restarted_server_asks_to_reload_runs_from_a_checkpoint(api: Api, worker: Worker, store: Store) -> None:
    run = api.create_model()
    drain(worker)
    # a second worker on the same database: a restarted server, whose memory holds no adapters
    restarted = make_worker(store, make_host(), worker.files.root.parent, FakeClock())
    fb = api.forward_backward(run, datums(0))
    drain(restarted)
    with pytest.raises(RequestFailed) as error:
        api.result(fb)
    assert error.value.category == "user"
    assert "create_training_client_from_state" in error.value.message


def test_non_finite_results_fail_with_a_clear_message_and_drop_the_gradients(
    api: Api, worker: Worker, host: ModelHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = api.create_model()
    drain(worker)
    real = host.served.forward

    def diverged(jobs: Sequence[ForwardJob]) -> list[ForwardResult]:
        return [ForwardResult(r.loss_fn_outputs, {**r.metrics, "loss:sum": float("nan")}) for r in real(jobs)]

    monkeypatch.setattr(host.served, "forward", diverged)
    fb = api.forward_backward(run, datums(0))
    drain(worker)
    with pytest.raises(RequestFailed) as error:
        api.result(fb)
    assert error.value.category == "user" and "non-finite" in error.value.message
    assert all(p.grad is None for p in host.served.adapter(run).weights.parameters())


def test_a_run_claimed_later_is_not_stuck_behind_a_long_queue(api: Api, worker: Worker) -> None:
    busy, late = api.create_model(0), api.create_model(1)
    drain(worker)
    queue = [
        request for seed in range(3) for request in (api.forward_backward(busy, datums(seed)), api.optim_step(busy))
    ]
    assert worker.run_once()  # claims the whole queue, runs its first job
    late_fb = api.forward_backward(late, datums(9))
    worker.run_once()
    worker.run_once()
    assert api.record(late_fb).state is FutureState.COMPLETED
    assert api.record(queue[-1]).state is FutureState.RUNNING  # claimed, still waiting its turn
    drain(worker)
    assert all(api.record(request).state is FutureState.COMPLETED for request in queue)
