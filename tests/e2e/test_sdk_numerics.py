"""Through the official SDK, in the default configuration: a sample reports forward()'s logprobs of its tokens, and
the first optimizer steps move the model as far as a `--dtype float32` server does."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import tinker
import torch
from tinker import types
from transformers import AutoModelForCausalLM

from tests.e2e.conftest import API_KEY, TOKENIZER_FILES, Server, start_server, stop_server
from tests.e2e.test_sdk_training import datum

PROMPT = [1, 17, 300, 4000, 42, 7, 99, 512, 77]


@pytest.fixture
def service(server: Server) -> Iterator[tinker.ServiceClient]:
    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    yield client
    client.close("success").result()


def test_sampled_logprobs_equal_forward_logprobs_of_the_same_tokens(server: Server) -> None:
    service = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    training = service.create_lora_training_client(base_model=server.model, rank=4, seed=1).result()
    training.forward_backward([datum()], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    sampler = training.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=5, stop=[])
    response = sampler.sample(types.ModelInput.from_ints(PROMPT), num_samples=2, sampling_params=params).result()
    # the cookbook's RL datum: prompt + completion, shifted by one
    datums = [datum(PROMPT + list(s.tokens)) for s in response.sequences]
    outputs = training.forward(datums, "cross_entropy").result().loss_fn_outputs
    for seq, out in zip(response.sequences, outputs, strict=True):
        assert seq.logprobs == out["logprobs"].tolist()[len(PROMPT) - 1 :]  # bit for bit
    # prompt logprobs (compute_logprobs) are scored by the same forward, over a sequence one token longer
    prompt_lps = sampler.compute_logprobs(types.ModelInput.from_ints(PROMPT)).result()
    forward = training.forward([datum(PROMPT)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    assert prompt_lps[0] is None
    assert prompt_lps[1:] == pytest.approx(forward, abs=1e-5)
    service.close("success").result()


def moved_by_steps(url: str, model: str, steps: int) -> list[float]:
    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    training = service.create_lora_training_client(base_model=model, rank=8, seed=0).result()
    tokens = [(i * 7919) % 4000 + 3 for i in range(65)]
    data = [datum(tokens[j : j + 33]) for j in range(0, 32, 8)]

    def mean_logprob() -> float:
        out = training.forward(data, "cross_entropy").result().loss_fn_outputs
        values = [v for o in out for v in o["logprobs"].tolist()]
        return sum(values) / len(values)

    start = mean_logprob()
    moved = []
    for _ in range(steps):
        training.forward_backward(data, "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=1e-4)).result()
        moved.append(mean_logprob() - start)
    service.close("success").result()
    return moved


@pytest.mark.slow
def test_the_default_configuration_learns_as_far_per_step_as_fp32(tiny_model_dir: Path, tmp_path: Path) -> None:
    # the tiny model with a real model's magnitudes (see tests/engine/test_numerics.py), where bf16 rounding bites
    model_dir = tmp_path / "tiny-scaled"
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    hf.save_pretrained(model_dir)
    for name in TOKENIZER_FILES:
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, model_dir / name)
    moved: dict[str, list[float]] = {}
    for label, args in (("fp32", ["--dtype", "float32"]), ("default", [])):
        (tmp_path / label).mkdir()
        running = start_server(tmp_path / label, model_dir, args=args)
        try:
            moved[label] = moved_by_steps(running.url, running.model, 2)
        finally:
            stop_server(running.process)
    ref, got = moved["fp32"], moved["default"]
    assert all(r > 0 for r in ref), ref
    for step, (g, r) in enumerate(zip(got, ref, strict=True), start=1):
        assert abs(g - r) <= 0.1 * r, f"step {step}: default moved {g:.3e}, --dtype float32 {r:.3e}"
