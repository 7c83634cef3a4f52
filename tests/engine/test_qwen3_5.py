"""Qwen3.5 on the packed engine (gated delta-net layers beside full attention, and its MoE) against Hugging Face, PEFT
and its own slow twins: the token-by-token recurrence, recomputing every prefix, separate runs."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.engine.tiny_models import (
    HYBRID_FAMILIES,
    assert_mixed_runs_equal_separate,
    hf_logprobs,
    next_token_datum,
    randomise,
    served_logprobs,
    tiny_hybrid_model,
    train_a_leaving_b,
)
from tinkerd.domain.architectures import EnginePath, preferred_path
from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import ArrayData, Datum, LoraConfig, SamplingParams
from tinkerd.engine.checkpoint import load_checkpoint, save_checkpoint
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.delta_net import ChunkLayout, chunked_delta_rule, normalised_qk, recurrent_step
from tinkerd.engine.export import export_merged, export_peft
from tinkerd.engine.hybrid_sampler import HybridSampler
from tinkerd.engine.lora import LoraRouting, LoraWeights
from tinkerd.engine.model_paths import path_of
from tinkerd.engine.qwen3_5 import HybridTransformer
from tinkerd.engine.sample_job import SampleJob
from tinkerd.engine.served_model import ForwardJob, ServedModel
from tinkerd.worker.hosts import ModelHost

pytestmark = pytest.mark.heavy  # seconds of CPU per test: not in `make test-fast`

FP32 = EngineConfig(train_dtype="float32", sample_dtype="float32")
LONG = [3 + (i * 7) % 90 for i in range(150)]  # three chunks of the delta rule (64 positions each)
SEQS = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], LONG, [10, 11, 12], [13, 14, 15, 16, 17, 18, 19]]
LORA = LoraConfig(rank=4, alpha=8.0, seed=1)

datum = next_token_datum
logprobs = served_logprobs


def test_the_chunked_delta_rule_over_a_pack_equals_the_token_by_token_recurrence() -> None:
    g = torch.Generator().manual_seed(0)
    lens = [70, 1, 64, 130, 5]
    n, heads = sum(lens), 4
    q, k = normalised_qk(torch.randn(n, 2, 16, generator=g), torch.randn(n, 2, 16, generator=g), heads)
    v = torch.randn(n, heads, 8, generator=g)
    decay = -torch.rand(n, heads, generator=g) * 0.5
    beta = torch.rand(n, heads, generator=g)
    got, finals = chunked_delta_rule(q, k, v, decay, beta, ChunkLayout(lens, q.device), len(lens))
    offset = 0
    for b, length in enumerate(lens):
        state = torch.zeros(1, heads, 16, 8)
        for t in range(offset, offset + length):
            o, state = recurrent_step(
                state, q[t : t + 1], k[t : t + 1], v[t : t + 1], decay[t : t + 1], beta[t : t + 1]
            )
            torch.testing.assert_close(got[t], o[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(finals[b], state[0], atol=1e-5, rtol=1e-5)
        offset += length
    assert got.abs().max() > 0.1  # not trivially zero


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_hybrid_layouts_take_the_packed_path_and_match_hugging_face(family: str) -> None:
    hf: Any = tiny_hybrid_model(family)
    assert preferred_path(hf.config.to_dict()) is EnginePath.PACKED and path_of(hf) is EnginePath.PACKED
    engine = HybridTransformer(tiny_hybrid_model(family), torch.float32)
    assert engine.kv_shape.num_layers == 2 and engine.delta_shape.num_layers == 2
    with torch.no_grad():
        h = engine.packed_hidden(SEQS, LoraRouting.single(sum(map(len, SEQS)), None))
        logits = engine.logits(h, LoraRouting.single(h.shape[0], None))
    offset = 0
    for seq in SEQS:  # each sequence of the pack equals the model run on it alone
        with torch.no_grad():
            expected = hf(torch.tensor([seq])).logits[0]
        torch.testing.assert_close(logits[offset : offset + len(seq)], expected, atol=2e-5, rtol=1e-4)
        offset += len(seq)


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_mixed_runs_in_bf16_are_bit_identical_to_separate_ones_and_training_moves_only_its_run(family: str) -> None:
    model = ServedModel("m", tiny_hybrid_model(family), EngineConfig())  # the default: bf16 base matmuls
    assert_mixed_runs_equal_separate(model, LORA, SEQS)
    names = set(model.adapter("a").weights.a)
    assert "model.layers.0.linear_attn.in_proj_qkv" in names and "model.layers.2.linear_attn.out_proj" in names
    assert "model.layers.1.self_attn.q_proj" in names
    delta_net_before = model.adapter("a").weights.a["model.layers.0.linear_attn.in_proj_a"].detach().clone()
    train_a_leaving_b(model, SEQS)
    assert not torch.equal(model.adapter("a").weights.a["model.layers.0.linear_attn.in_proj_a"], delta_net_before)


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_adapters_export_and_load_back(tmp_path: Path, family: str) -> None:
    """Qwen3.5: a PEFT adapter PEFT loads with our logits, and a merged model. Qwen3.5-MoE: a merged model; PEFT would
    drop its shared expert's adapters, so the PEFT export refuses (as for Qwen2-MoE)."""
    model = ServedModel("m", tiny_hybrid_model(family), FP32)
    model.create_adapter("a", LORA)
    weights = model.adapter("a").weights
    randomise(model, "a", seed=3)
    save_checkpoint(tmp_path / "c", weights.snapshot(), LORA, "tiny", None, {})
    ours = logprobs(model, "a", SEQS)
    base = hf_logprobs(tiny_hybrid_model(family), SEQS)
    assert max((o - b).abs().max().item() for o, b in zip(ours, base, strict=True)) > 1e-2  # the adapter matters

    base_model: Any = tiny_hybrid_model(family)
    base_model.save_pretrained(tmp_path / "base")
    export_merged(tmp_path / "c", tmp_path / "base", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    for got, want in zip(ours, hf_logprobs(merged, SEQS), strict=True):  # the forward parity test's tolerance
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)

    loaded = load_checkpoint(tmp_path / "c", "cpu", model=model.train.hf)  # and back into tinkerd
    model.install_adapter("b", loaded.lora, loaded.weights, None)
    for got, want in zip(logprobs(model, "b", SEQS), ours, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)

    if family == "qwen3_5_moe":
        assert any(".experts." in n for n in weights.a)
        with pytest.raises(InvalidRequestError, match="shared expert"):
            export_peft(tmp_path / "c", tmp_path / "peft")
        return
    export_peft(tmp_path / "c", tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(tiny_hybrid_model(family), str(tmp_path / "peft")).eval()
    for got, want in zip(ours, hf_logprobs(peft_model, SEQS), strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@functools.cache
def fp32_engine(family: str) -> tuple[HybridTransformer, LoraWeights]:
    """An fp32 engine and a trained-looking adapter of it."""
    model = ServedModel("m", tiny_hybrid_model(family), FP32)
    model.create_adapter("a", LORA)
    randomise(model, "a", seed=6)
    assert isinstance(model.train, HybridTransformer)
    return model.train, model.snapshot("a")


def recompute(t: HybridTransformer, prompt: list[int], tokens: list[int], w: LoraWeights | None) -> torch.Tensor:
    """log_softmax at every position of prompt + tokens from one packed forward."""
    seq = prompt + tokens
    with torch.no_grad():
        routing = LoraRouting.single(len(seq), w)
        return torch.log_softmax(t.logits(t.packed_hidden([seq], routing), routing), dim=-1)


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
@pytest.mark.parametrize("max_batch", [64, 2])  # 2: samples wait for slots and are stamped from the prompt later
def test_cached_decode_equals_recomputing_every_prefix(family: str, max_batch: int) -> None:
    t, weights = fp32_engine(family)
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=7)
    prompts = [SEQS[0], LONG, SEQS[2]]  # the long prompt fills three chunks before its first decode step
    jobs = [
        SampleJob(prompts[0], greedy, 1, None),
        SampleJob(prompts[1], greedy, 1, weights),
        SampleJob(prompts[2], seeded, 3, weights),
    ]
    results = HybridSampler(t, max_batch=max_batch).run(jobs)
    for job, result in zip(jobs, results, strict=True):
        for s in result.sequences:
            every = recompute(t, list(job.prompt), s.tokens, job.weights)
            p = len(job.prompt)
            want = every[p - 1 : -1].gather(1, torch.tensor(s.tokens)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=2e-5, rtol=1e-5)
            if job.params.temperature == 0.0:  # greedy: each token is the recomputed argmax
                assert s.tokens == every[p - 1 : -1].argmax(-1).tolist()
    assert len({tuple(s.tokens) for s in results[2].sequences}) > 1  # seeded samples differ from one another
    wide = HybridSampler(t, max_batch=64).run(jobs)
    assert [[s.tokens for s in r.sequences] for r in results] == [[s.tokens for s in r.sequences] for r in wide]


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_the_default_host_samples_from_its_cache_and_reports_the_trainers_logprobs(family: str) -> None:
    host = ModelHost.from_model("m", tiny_hybrid_model(family), EngineConfig())  # bf16 trainer, fp32 decode layout
    assert isinstance(host.sampler, HybridSampler) and host.engine_path is EnginePath.PACKED
    host.served.create_adapter("a", LORA)
    randomise(host.served, "a", seed=6)
    weights = host.served.snapshot("a")
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    base, adapted, sampled = host.sampler.run(
        [
            SampleJob(SEQS[0], greedy, 1, None),
            SampleJob(SEQS[0], greedy, 1, weights),
            SampleJob(SEQS[2], SamplingParams(max_tokens=6, temperature=1.0, seed=7), 3, weights),
        ]
    )
    sample_engine = host.sample_transformer
    assert isinstance(sample_engine, HybridTransformer)
    for result, w in ((base, None), (adapted, weights)):  # the cached decode equals greedy by full recompute
        seq = list(SEQS[0])
        for _ in range(8):
            seq.append(int(recompute(sample_engine, seq, [], w)[-1].argmax()))
        assert result.sequences[0].tokens == seq[len(SEQS[0]) :]
    assert base.sequences[0].tokens != adapted.sequences[0].tokens  # the adapter changes what is sampled
    for p, result in ((SEQS[0], adapted), (SEQS[2], sampled)):  # every sample reports what forward() computes
        for s in result.sequences:
            full = p + s.tokens
            ones = ArrayData.of_floats([1.0] * (len(full) - 1))
            scored = Datum(full[:-1], {"target_tokens": ArrayData.of_ints(full[1:]), "weights": ones})
            (out,) = host.served.forward([ForwardJob("a", [scored], "cross_entropy")])[0].loss_fn_outputs
            want = torch.tensor(out["logprobs"].values)[len(p) - 1 :]
            torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=0, rtol=0)
    assert len({tuple(s.tokens) for s in sampled.sequences}) > 1
