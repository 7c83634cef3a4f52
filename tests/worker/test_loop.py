"""The loop's robustness: engine failures, restarts, session timeouts, shutdown, and hosting a model directory."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.engine.tiny_models import tiny_model
from tests.worker.harness import BASE, Api, RequestFailed, datums, drain
from tinkerd.domain.ops import LoraConfig
from tinkerd.domain.records import FutureState, RequestKind
from tinkerd.domain.requests import CreateModel, PathResult
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.transformer import Transformer
from tinkerd.store import Store
from tinkerd.worker.hosts import ModelHost
from tinkerd.worker.loop import RESTART_MESSAGE, RESTART_TRAINING_MESSAGE, Worker

pytestmark = pytest.mark.integration


def test_an_engine_exception_is_a_server_failure_and_the_loop_carries_on(
    api: Api, worker: Worker, host: ModelHost, monkeypatch: pytest.MonkeyPatch, store: Store
) -> None:
    run = api.create_model()
    drain(worker)

    def broken(*_: object) -> None:
        raise RuntimeError("simulated kernel failure")

    with monkeypatch.context() as patch:
        patch.setattr(host.served, "optim_step", broken)
        patch.setattr(host.served, "forward", broken)
        fb = api.forward_backward(run, datums(0))
        step = api.optim_step(run)
        drain(worker)
    for request in (fb, step):
        with pytest.raises(RequestFailed) as error:
            api.result(request)
        assert error.value.category == "server" and "simulated kernel failure" in error.value.message
    assert store.runs.get(run, api.owner).corrupted  # the step may have stopped half way
    after = api.forward_backward(run, datums(0))
    drain(worker)
    assert api.loss(after) > 0


def test_a_failing_sampler_step_fails_its_requests_and_sampling_recovers(
    api: Api, worker: Worker, host: ModelHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = api.sampler_for_path(0, None)
    with monkeypatch.context() as patch:
        patch.setattr(type(host.sampler), "step", lambda self: (_ for _ in ()).throw(RuntimeError("decode broke")))
        lost = api.sample(base, [1, 2, 3])
        drain(worker)
    with pytest.raises(RequestFailed) as error:
        api.result(lost)
    assert error.value.category == "server"
    fine = api.sample(base, [1, 2, 3])
    drain(worker)
    assert len(api.sampled(fine).sequences) == 2


def test_requests_left_running_by_a_dead_worker_fail_at_start(api: Api, worker: Worker, store: Store) -> None:
    run = api.create_model()
    base = api.sampler_for_path(0, None)
    sample = api.sample(base, [1, 2, 3])
    claimed = store.futures.claim_ready(worker_id="local")  # a worker that died right after claiming
    assert {f.model_id for f in claimed.futures} >= {run}
    assert not worker.run_once()
    training = api.record(claimed.futures[0].request_id)
    assert training.state is FutureState.FAILED
    # A training request's run died with the worker: the message says how to resume.
    assert (training.error_message, training.error_category) == (RESTART_TRAINING_MESSAGE, "server")
    assert "create_training_client_from_state_with_optimizer" in RESTART_TRAINING_MESSAGE
    failed_sample = api.record(sample)
    assert (failed_sample.error_message, failed_sample.error_category) == (RESTART_MESSAGE, "server")


def test_a_silent_session_times_out_and_its_memory_is_freed(api: Api, worker: Worker, host: ModelHost) -> None:
    run = api.create_model()
    save = api.save(run, "kept")
    _, sampler = api.snapshot(run, 0)
    drain(worker)
    api.clock.advance(minutes=29)
    assert worker.housekeeper.run().timed_out == ()
    assert run in host.served.adapters
    api.clock.advance(minutes=2)
    report = worker.housekeeper.run()
    assert report.timed_out == (api.session_id,)
    assert report.freed_runs == (run,) and report.freed_samplers == (sampler,)
    assert run not in host.served.adapters and sampler not in worker.runtime.samplers
    assert api.store.sessions.get(api.session_id, api.owner).status == "timed_out"
    saved = api.result(save)
    assert isinstance(saved, PathResult)
    assert worker.files.dir_of(api.store.checkpoints.get(saved.path, api.owner).path).is_dir()  # checkpoints stay
    fb = api.forward_backward(run, datums(0))
    drain(worker)
    with pytest.raises(RequestFailed, match="not loaded"):
        api.result(fb)


def test_a_finished_session_frees_its_runs(api: Api, worker: Worker, host: ModelHost) -> None:
    run = api.create_model()
    drain(worker)
    api.store.sessions.finish(api.session_id, api.owner, "success")
    worker.housekeeper.run()
    assert run not in host.served.adapters


def test_run_forever_serves_until_stopped_and_puts_unstarted_work_back(
    api: Api, worker: Worker, notified: list[str]
) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=worker.run_forever, args=(stop,))
    thread.start()
    try:
        run = api.create_model()
        fb = api.forward_backward(run, datums(0))
        worker.wake()
        deadline = time.monotonic() + 20
        # Notified first, recorded right after (see OutcomeRecorder.finish): wait for both.
        while not (fb in notified and api.record(fb).state.finished) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert api.loss(fb) > 0
    finally:
        stop.set()
        worker.wake()
        thread.join(timeout=20)
    assert not thread.is_alive()
    # shutting down between claim and execution puts requests back to pending
    later = api.forward_backward(run, datums(1))
    worker._claim()
    assert api.record(later).state is FutureState.RUNNING
    assert worker.release_claimed() == 1
    assert api.record(later).state is FutureState.PENDING


def test_an_undecodable_payload_and_an_unknown_base_model_fail_alone(api: Api, worker: Worker, store: Store) -> None:
    garbage = store.futures.submit(
        owner=api.owner, model_id="x:train:0", seq_id=0, kind=RequestKind.CREATE_MODEL, payload=b"not json"
    )
    unknown = api.submit(RequestKind.CREATE_MODEL, "sess:train:5", CreateModel("sess:train:5", "nope", LoraConfig()), 0)
    good = api.create_model()
    drain(worker)
    with pytest.raises(RequestFailed) as decode_error:
        api.result(garbage.request_id)
    assert decode_error.value.category == "server"
    with pytest.raises(RequestFailed) as base_error:
        api.result(unknown)
    assert base_error.value.category == "user" and "nope" in base_error.value.message
    assert good in worker.runtime.runs


def test_a_host_from_a_model_directory_samples_in_its_own_dtype(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    hf: Any = tiny_model("llama")  # Hugging Face modules are typed loosely
    hf.save_pretrained(model_dir)
    config = EngineConfig(train_dtype="bfloat16", sample_dtype="float32", num_threads=1)
    host = ModelHost.from_directory(BASE, model_dir, config)
    assert host.served.train.dtype == torch.bfloat16 and host.sample_transformer.dtype == torch.float32
    assert host.decode_text is None  # no tokenizer saved: stop strings are refused, the rest works
    fp32: Any = tiny_model("llama")
    # the sampler's copy was taken before the cast to bf16: its weights are exactly the saved fp32 ones
    sample = host.sample_transformer
    assert isinstance(sample, Transformer)  # a Llama takes the packed path
    torch.testing.assert_close(sample.embed.weight, fp32.get_input_embeddings().weight, atol=0, rtol=0)


def test_requests_behind_a_seq_id_that_never_arrives_run_after_the_gap_timeout(api: Api, worker: Worker) -> None:
    run = api.create_model()
    drain(worker)
    later = api.forward_backward(run, datums(0), seq_id=2)  # seq_id 1 was numbered by the client but never sent
    drain(worker)
    assert api.record(later).state is FutureState.PENDING
    api.clock.advance(minutes=11)
    assert worker.housekeeper.run().gaps_filled == {run: [1]}
    drain(worker)
    assert api.loss(later) > 0
