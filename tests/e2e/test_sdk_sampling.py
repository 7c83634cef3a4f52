"""The official SDK's sampling flow against `tinkerd serve`: sampler checkpoints, in-memory snapshots, several
samples, stop strings and stop token ids, prompt logprobs, async."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import tinker
from tinker import types

from tests.e2e.conftest import API_KEY, SMOLLM2_VOCAB, Server
from tests.e2e.test_sdk_training import PROMPT, datum

pytestmark = pytest.mark.e2e

PROMPT_INPUT = types.ModelInput.from_ints(PROMPT)


@pytest.fixture
def service(server: Server) -> Iterator[tinker.ServiceClient]:
    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    yield client
    client.close("success").result()


@pytest.fixture
def training(server: Server, service: tinker.ServiceClient) -> tinker.TrainingClient:
    client = service.create_lora_training_client(base_model=server.model, rank=4).result()
    client.forward_backward([datum()], "cross_entropy").result()
    client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return client


def test_sampler_checkpoint_and_several_samples(service: tinker.ServiceClient, training: tinker.TrainingClient) -> None:
    saved = training.save_weights_for_sampler("e2e-sampler").result()
    assert saved.path == f"tinker://{training.model_id}/sampler_weights/e2e-sampler"
    sampler = service.create_sampling_client(model_path=saved.path).result()
    params = types.SamplingParams(max_tokens=5, temperature=1.0, seed=3, stop=[])
    response = sampler.sample(PROMPT_INPUT, num_samples=3, sampling_params=params).result()
    assert len(response.sequences) == 3
    assert len({s.sequence_id for s in response.sequences}) == 3
    for sequence in response.sequences:
        assert sequence.stop_reason == "length" and len(sequence.tokens) == 5  # stop=[]: no EOS either
        assert sequence.logprobs is not None and len(sequence.logprobs) == 5
        assert all(0 <= t < SMOLLM2_VOCAB for t in sequence.tokens)


def test_stop_token_ids_and_stop_strings(training: tinker.TrainingClient) -> None:
    sampler = training.save_weights_and_get_sampling_client().result()
    every_token = list(range(SMOLLM2_VOCAB))
    by_id = sampler.sample(
        PROMPT_INPUT, num_samples=2, sampling_params=types.SamplingParams(max_tokens=8, stop=every_token)
    ).result()
    assert [(s.stop_reason, len(s.tokens)) for s in by_id.sequences] == [("stop", 1), ("stop", 1)]

    # Random weights emit near-random tokens; within 40 of them one contains a vowel (odds of none: < 1e-12).
    vowels = ["a", "e", "i", "o", "u"]
    params = types.SamplingParams(max_tokens=40, stop=vowels, seed=0)
    by_text = sampler.sample(PROMPT_INPUT, num_samples=1, sampling_params=params).result().sequences[0]
    assert by_text.stop_reason == "stop"
    text = training.get_tokenizer().decode(by_text.tokens)
    assert any(v in text for v in vowels)


def test_compute_logprobs_of_a_snapshot(training: tinker.TrainingClient) -> None:
    sampler = training.save_weights_and_get_sampling_client().result()
    logprobs = sampler.compute_logprobs(PROMPT_INPUT).result()
    assert len(logprobs) == len(PROMPT) and logprobs[0] is None
    assert all(lp is not None and lp < 0 for lp in logprobs[1:])
    # Same weights, same tokens: the trainer's forward scores them alike, up to bf16 (training) vs fp32 (sampling).
    forward = training.forward([datum()], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    assert logprobs[1:] == pytest.approx(forward.tolist(), abs=0.2)


def test_base_model_sampler_and_async_sampling(server: Server, service: tinker.ServiceClient) -> None:
    async def flow() -> tuple[types.SampleResponse, list[float | None]]:
        sampler = await service.create_sampling_client(base_model=server.model)
        params = types.SamplingParams(max_tokens=3, stop=[])
        sampled, logprobs = await asyncio.gather(
            sampler.sample(PROMPT_INPUT, num_samples=2, sampling_params=params).result_async(),
            sampler.compute_logprobs(PROMPT_INPUT).result_async(),
        )
        return sampled, logprobs

    response, logprobs = asyncio.run(flow())
    assert [len(s.tokens) for s in response.sequences] == [3, 3]
    assert len(logprobs) == len(PROMPT) and logprobs[0] is None
