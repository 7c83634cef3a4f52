"""Sampling through the worker: pinned snapshots, checkpoint paths, the base model, and interleaving with training."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.worker.harness import Api, FakeClock, RequestFailed, datums, drain, make_host, make_worker
from tinkerd.domain.ops import SampleResult
from tinkerd.domain.requests import PathResult, SamplerResult
from tinkerd.store import Store
from tinkerd.worker.loop import Worker

pytestmark = pytest.mark.integration

PROMPT = [1, 5, 9, 33, 4]


def train(api: Api, run: str, seeds: range, lr: float = 0.2) -> None:
    for seed in seeds:
        api.forward_backward(run, datums(seed))
        api.optim_step(run, lr=lr)


def sample_now(api: Api, worker: Worker, sampler: str, **kwargs: object) -> SampleResult:
    request = api.sample(sampler, PROMPT, **kwargs)  # type: ignore[arg-type]
    drain(worker)
    return api.sampled(request)


def logprobs(result: SampleResult) -> list[list[float]]:
    return [s.logprobs for s in result.sequences]


def test_a_snapshot_sampler_keeps_its_version_while_the_run_trains_on(api: Api, worker: Worker) -> None:
    run = api.create_model()
    train(api, run, range(2))
    snap, sampler = api.snapshot(run, 0)
    drain(worker)
    result = api.result(snap)
    assert result == SamplerResult(sampling_session_id=sampler)
    record = api.store.samplers.get(sampler, api.owner)
    assert record.run_id == run and record.base_model == "tiny-llama"

    before = sample_now(api, worker, sampler, num_samples=3)
    assert len(before.sequences) == 3
    train(api, run, range(2, 5))
    _, newer = api.snapshot(run, 1)
    drain(worker)
    after = sample_now(api, worker, sampler, num_samples=3)
    assert after == before  # same version, same seed: the same samples, token for token
    moved = sample_now(api, worker, newer, num_samples=3)
    assert logprobs(moved) != logprobs(before)


def test_sampling_a_saved_sampler_path_equals_the_snapshot_of_the_same_weights(api: Api, worker: Worker) -> None:
    run = api.create_model()
    train(api, run, range(3))
    save = api.save(run, "sw", kind="sampler_weights")
    _, snapshot_sampler = api.snapshot(run, 0)
    drain(worker)
    saved = api.result(save)
    assert isinstance(saved, PathResult)
    path_sampler = api.sampler_for_path(1, saved.path)
    from_path = sample_now(api, worker, path_sampler, num_samples=2)
    from_snapshot = sample_now(api, worker, snapshot_sampler, num_samples=2)
    assert from_path == from_snapshot
    assert [len(s.tokens) for s in from_path.sequences] == [6, 6]


def test_base_model_sampling_and_bad_sampling_requests(api: Api, worker: Worker) -> None:
    base = api.sampler_for_path(0, None)
    good = api.sample(base, PROMPT, num_samples=1, temperature=0.0)
    bad_token = api.sample(base, [1, 500], num_samples=1)
    unknown = api.sample("sess:sample:99", PROMPT)
    drain(worker)
    assert len(api.sampled(good).sequences) == 1
    for request, words in ((bad_token, "500"), (unknown, "sess:sample:99")):
        with pytest.raises(RequestFailed) as error:
            api.result(request)
        assert error.value.category == "user" and words in error.value.message


def test_a_snapshot_is_gone_after_a_restart_with_a_helpful_message(api: Api, worker: Worker, store: Store) -> None:
    run = api.create_model()
    _, sampler = api.snapshot(run, 0)
    drain(worker)
    restarted = make_worker(store, make_host(), worker.files.root.parent, FakeClock())
    request = api.sample(sampler, PROMPT)
    drain(restarted)
    with pytest.raises(RequestFailed) as error:
        api.result(request)
    assert error.value.category == "user" and "save_weights_for_sampler" in error.value.message


def test_sampling_and_training_interleave(api: Api, worker: Worker) -> None:
    """Long generations and training submitted together all finish, and sampling steps run between training jobs."""
    run = api.create_model()
    drain(worker)
    base = api.sampler_for_path(0, None)
    samples = [api.sample(base, PROMPT, num_samples=2, max_tokens=40, seed=i) for i in range(3)]
    train(api, run, range(4))
    steps = []
    real_step = worker.sampling.step

    def counting_step() -> list:  # type: ignore[type-arg]
        steps.append(len(worker._pool))  # training requests still waiting when this decode step ran
        return real_step()

    worker.sampling.step = counting_step  # type: ignore[method-assign]
    drain(worker)
    for request in samples:
        assert len(api.sampled(request).sequences) == 2
    assert any(queued > 0 for queued in steps)  # decoding made progress while training work was waiting


def test_stop_strings_use_the_hosts_text_decoder(api: Api, store: Store, tmp_path: Path, clock: FakeClock) -> None:
    def letters(tokens: list[int]) -> str:
        return "".join(chr(97 + t % 26) for t in tokens)

    worker = make_worker(store, make_host(decode_text=letters), tmp_path / "data", clock)
    base = api.sampler_for_path(0, None)
    free = sample_now(api, worker, base, num_samples=1, temperature=0.0, max_tokens=12)
    (sequence,) = free.sequences
    stop = letters(sequence.tokens[3:4])
    cut = letters(sequence.tokens).index(stop) + 1  # the first token whose text holds the stop string
    stopped = sample_now(api, worker, base, num_samples=1, temperature=0.0, max_tokens=12, stop_strings=(stop,))
    assert stopped.sequences[0].tokens == sequence.tokens[:cut]
    assert stopped.sequences[0].stop_reason == "stop"
