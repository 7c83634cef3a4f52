"""The logprob surface through the official SDK against `tinkerd serve`: which distribution sampled tokens' logprobs
are under (chosen per client with the X-Tinkerd-Sample-Logprobs header), topk_sample_logprobs, prompt_logprobs_last_n
(sample and compute_logprobs), target_prompt_logprobs (dense and sparse), prompt_alt_tokens_k, and the sampler/trainer
drift metrics of forward_backward. References are computed naively in the test from the same tiny model's weights."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tinker
import torch
from tinker import types

from tests.e2e.conftest import API_KEY, Server
from tests.engine.test_logprob_surface import naive_distribution
from tinkerd.domain.ops import LogprobDistribution

PROMPT = [1, 17, 300, 4000, 42, 7, 99, 5]
HEADER = "X-Tinkerd-Sample-Logprobs"
TOL = 1e-3  # the server decodes in fp32; this test's reference is a plain fp32 transformers forward
# A sampled token's own logprob is the training forward's (engine/rescoring.py: bf16 base matmuls in the default
# configuration), so it sits within bf16 rounding of the fp32 reference; its equality with forward() is exact and is
# tested in test_sdk_numerics.py. The top-k lists come from the fp32 decoder and keep TOL.
CHOSEN_TOL = 2e-2


@functools.cache
def hf_logprobs(model_dir: Path, tokens: tuple[int, ...]) -> torch.Tensor:
    """Untempered logprobs [T, V] at every position of ``tokens``, from transformers itself."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([list(tokens)])).logits[0]
    return torch.log_softmax(logits.double(), -1)


def client(server: Server, mode: str | None) -> tinker.ServiceClient:
    headers = {HEADER: mode} if mode else None
    return tinker.ServiceClient(base_url=server.url, api_key=API_KEY, default_headers_overrides=headers)


@pytest.fixture
def clients(server: Server) -> Iterator[dict[str | None, tinker.ServiceClient]]:
    made: dict[str | None, tinker.ServiceClient] = {
        mode: client(server, mode) for mode in (None, "tempered", "sampled", "model")
    }
    yield made
    for c in made.values():
        c.close("success").result()


def test_sampled_logprobs_are_under_the_distribution_each_client_asks_for(
    server: Server, tiny_model_dir: Path, clients: dict[str | None, tinker.ServiceClient]
) -> None:
    temperature, top_k, top_p, k = 0.7, 6, 0.9, 4
    params = types.SamplingParams(max_tokens=5, temperature=temperature, top_k=top_k, top_p=top_p, seed=7, stop=[])
    responses = {
        mode: c.create_sampling_client(base_model=server.model)
        .result()
        .sample(types.ModelInput.from_ints(PROMPT), num_samples=2, sampling_params=params, topk_sample_logprobs=k)
        .result()
        for mode, c in clients.items()
    }
    tokens = {mode: [s.tokens for s in r.sequences] for mode, r in responses.items()}
    assert all(t == tokens[None] for t in tokens.values())  # the reported distribution never changes the draw
    modes: list[LogprobDistribution] = ["tempered", "sampled", "model"]
    for mode in modes:
        for seq in responses[mode].sequences:
            every = hf_logprobs(tiny_model_dir, tuple(PROMPT + seq.tokens))[len(PROMPT) - 1 : -1]
            assert seq.logprobs is not None and seq.topk_logprobs is not None
            assert len(seq.topk_logprobs) == len(seq.tokens)
            for pos, token in enumerate(seq.tokens):
                naive = naive_distribution(every[pos], temperature, top_k, top_p, mode)
                assert seq.logprobs[pos] == pytest.approx(float(naive[token]), abs=CHOSEN_TOL), (mode, pos)
                row = seq.topk_logprobs[pos]
                assert row is not None
                want = [i for i in torch.argsort(naive, descending=True)[:k].tolist() if naive[i] > -np.inf]
                assert [i for i, _ in row] == want
                assert [lp for _, lp in row] == pytest.approx([float(naive[i]) for i in want], abs=TOL)
            if mode == "sampled":  # the kept tokens' probabilities sum to 1: it is the distribution drawn from
                assert all(sum(np.exp(lp) for _, lp in r or []) <= 1 + 1e-4 for r in seq.topk_logprobs)
    default = [s.logprobs for s in responses[None].sequences]
    assert default == [s.logprobs for s in responses["tempered"].sequences]  # no header: the server's setting

    # "model": exactly what the same sampler's compute_logprobs scores for the sampled sequence
    sampler = clients["model"].create_sampling_client(base_model=server.model).result()
    seq = responses["model"].sequences[0]
    scored = sampler.compute_logprobs(types.ModelInput.from_ints(PROMPT + seq.tokens)).result()
    assert seq.logprobs == pytest.approx(scored[len(PROMPT) :], abs=1e-4)


def test_a_bad_header_is_a_400_naming_it(server: Server) -> None:
    c = client(server, "raw")
    sampler = c.create_sampling_client(base_model=server.model).result()
    with pytest.raises(tinker.BadRequestError, match=HEADER):
        sampler.sample(types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=1)).result()
    c.close("success").result()


def test_prompt_side_fields_through_the_sdk(
    server: Server, tiny_model_dir: Path, clients: dict[str | None, tinker.ServiceClient]
) -> None:
    sampler = clients[None].create_sampling_client(base_model=server.model).result()
    prompt = types.ModelInput.from_ints(PROMPT)
    every = hf_logprobs(tiny_model_dir, tuple(PROMPT))
    model_lp = [None] + [float(every[i, PROMPT[i + 1]]) for i in range(len(PROMPT) - 1)]

    # prompt_logprobs_last_n, by compute_logprobs and by sample (which applies it to topk_prompt_logprobs too)
    last3 = sampler.compute_logprobs(prompt, prompt_logprobs_last_n=3).result()
    assert last3[:-3] == [None] * (len(PROMPT) - 3)
    assert last3[-3:] == pytest.approx(model_lp[-3:], abs=TOL)
    response = sampler.sample(
        prompt, 1, types.SamplingParams(max_tokens=1), include_prompt_logprobs=True, topk_prompt_logprobs=2,
        prompt_logprobs_last_n=2,
    ).result()  # fmt: skip
    assert response.prompt_logprobs is not None and response.topk_prompt_logprobs is not None
    assert response.prompt_logprobs[:-2] == [None] * (len(PROMPT) - 2)
    assert response.topk_prompt_logprobs[:-2] == [None] * (len(PROMPT) - 2)
    for pos in (-2, -1):
        row = response.topk_prompt_logprobs[pos]
        assert row is not None and [i for i, _ in row] == torch.argsort(every[pos - 1], descending=True)[:2].tolist()

    # target_prompt_logprobs, dense and sparse: row i names ids to score at prompt position i + 1
    ids = torch.full((len(PROMPT) - 1, 3), -1, dtype=torch.int64)
    ids[0, 0], ids[3, 1], ids[3, 2], ids[-1, 0] = 5, 300, 49151, PROMPT[-1]
    for target in (types.TensorData.from_torch(ids), types.TensorData.from_torch_sparse(ids, pad_value=-1)):
        response = sampler.sample(
            prompt, 1, types.SamplingParams(max_tokens=1), include_prompt_logprobs=True, target_prompt_logprobs=target
        ).result()
        got = response.target_prompt_logprobs
        assert got is not None and got.shape == [len(PROMPT) - 1, 3]
        assert (got.sparse_crow_indices is not None) == (target.sparse_crow_indices is not None)  # same layout
        dense = got.to_torch()
        expected = torch.zeros(ids.shape, dtype=torch.float64)
        for r, c in (ids != -1).nonzero().tolist():
            expected[r, c] = every[r, ids[r, c]]
        torch.testing.assert_close(dense.double(), expected, atol=TOL, rtol=0)
        assert float(dense[-1, 0]) == pytest.approx(model_lp[-1], abs=TOL)

    # prompt_alt_tokens_k: k draws per position after the first, with their logprobs (temperature 1: the model's)
    response = sampler.sample(
        prompt, 1, types.SamplingParams(max_tokens=1, temperature=1.0, seed=2), prompt_alt_tokens_k=5
    ).result()
    alt = response.prompt_alt_tokens
    assert alt is not None
    alt_tokens, alt_logprobs = alt.tokens.to_torch(), alt.logprobs.to_torch()
    assert alt_tokens.shape == alt_logprobs.shape == (len(PROMPT) - 1, 5)
    torch.testing.assert_close(alt_logprobs.double(), every[:-1].gather(1, alt_tokens), atol=TOL, rtol=0)


def test_forward_backward_reports_sampler_trainer_drift(
    server: Server, clients: dict[str | None, tinker.ServiceClient]
) -> None:
    service = clients["model"]
    training = service.create_lora_training_client(base_model=server.model, rank=4).result()
    sampler = training.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=4, stop=[])
    sampled = sampler.sample(types.ModelInput.from_ints(PROMPT), 3, params).result()
    data: list[types.Datum] = []
    sampler_lps: list[list[float]] = []
    advantages: list[list[float]] = []
    for n, seq in enumerate(sampled.sequences):
        assert seq.logprobs is not None
        tokens = PROMPT + seq.tokens
        q = [0.0] * (len(PROMPT) - 1) + list(seq.logprobs)
        adv = [0.0] * (len(PROMPT) - 1) + [float(n) - 1.0] * len(seq.tokens)  # the middle one weighs nothing
        sampler_lps.append(q)
        advantages.append(adv)
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": types.TensorData.from_numpy(np.asarray(tokens[1:], dtype=np.int64)),
                    "logprobs": types.TensorData.from_numpy(np.asarray(q, dtype=np.float32)),
                    "advantages": types.TensorData.from_numpy(np.asarray(adv, dtype=np.float32)),
                },
            )
        )
    result = training.forward_backward(data, "importance_sampling").result()
    diffs = []
    for out, q, adv in zip(result.loss_fn_outputs, sampler_lps, advantages, strict=True):
        p = out["logprobs"].to_numpy().astype(np.float64)
        weighted = np.asarray(adv) != 0
        diffs.append(p[weighted] - np.asarray(q)[weighted])
    r = np.concatenate(diffs)
    m = result.metrics
    assert m["sampler_drift_tokens:sum"] == len(r) == 2 * 6
    assert m["sampler_logprob_abs_diff:mean"] == pytest.approx(np.abs(r).mean(), abs=1e-6)
    assert m["sampler_logprob_abs_diff:max"] == pytest.approx(np.abs(r).max(), abs=1e-6)
    assert m["sampler_kl_k1:mean"] == pytest.approx((-r).mean(), abs=1e-6)
    assert m["sampler_kl_k3:mean"] == pytest.approx((np.exp(r) - 1 - r).mean(), abs=1e-6)
    # the sampler and the trainer score these tokens with one model, so the drift is small (numerics only)
    assert m["sampler_logprob_abs_diff:max"] < 0.5 and m["sampler_kl_k3:mean"] >= 0
    plain = types.Datum(
        model_input=types.ModelInput.from_ints(PROMPT[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.asarray(PROMPT[1:], dtype=np.int64)),
            "weights": types.TensorData.from_numpy(np.ones(len(PROMPT) - 1, dtype=np.float32)),
        },
    )
    cross = training.forward([plain], "cross_entropy").result().metrics
    assert not [name for name in cross if name.startswith("sampler_")]  # no sampler logprobs, no drift metrics
