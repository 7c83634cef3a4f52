"""Mixture of experts on the packed engine (Qwen3-MoE, Qwen2-MoE) against Hugging Face, PEFT and its own slow twins."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.engine.tiny_models import (
    MOE_FAMILIES,
    assert_mixed_runs_equal_separate,
    hf_logprobs,
    next_token_datum,
    randomise,
    served_logprobs,
    tiny_moe_model,
    train_a_leaving_b,
)
from tinkerd.domain.architectures import EnginePath
from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import ArrayData, Datum, LoraConfig, SamplingParams
from tinkerd.engine.checkpoint import load_checkpoint, save_checkpoint
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.export import export_merged, export_peft
from tinkerd.engine.lora import LoraRouting
from tinkerd.engine.model_paths import path_of
from tinkerd.engine.moe import RouterTrace, router_metrics
from tinkerd.engine.sample_job import SampleJob
from tinkerd.engine.served_model import ForwardJob, ServedModel
from tinkerd.engine.transformer import Transformer
from tinkerd.worker.hosts import ModelHost

pytestmark = pytest.mark.heavy  # seconds of CPU per test: not in `make test-fast`

FP32 = EngineConfig(train_dtype="float32", sample_dtype="float32")
SEQS = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19]]
LORA = LoraConfig(rank=4, alpha=8.0, seed=1)


datum = next_token_datum
logprobs = served_logprobs


@functools.cache
def routed_experts(family: str) -> int:
    """How many distinct (layer, expert) pairs the test sequences reach in the Hugging Face model (not vacuous)."""
    hf: Any = tiny_moe_model(family)
    with torch.no_grad():
        out = hf(torch.tensor([SEQS[0]]), output_router_logits=True)
    k = hf.config.num_experts_per_tok
    return sum(len(set(logits.topk(k, dim=-1).indices.flatten().tolist())) for logits in out.router_logits)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_layouts_take_the_packed_path_and_match_hugging_face(family: str) -> None:
    hf = tiny_moe_model(family)
    assert path_of(hf) is EnginePath.PACKED
    assert routed_experts(family) >= 8  # tokens spread over many experts of the two sparse layers
    engine = Transformer(tiny_moe_model(family), torch.float32)
    assert sum(engine.sparse) == 2
    with torch.no_grad():
        h = engine.packed_hidden(SEQS, LoraRouting.single(sum(map(len, SEQS)), None))
        logits = engine.logits(h, LoraRouting.single(h.shape[0], None))
    offset = 0
    for seq in SEQS:
        with torch.no_grad():
            expected = hf(torch.tensor([seq])).logits[0]
        torch.testing.assert_close(logits[offset : offset + len(seq)], expected, atol=2e-5, rtol=1e-4)
        offset += len(seq)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_adapters_export_and_load_back(tmp_path: Path, family: str) -> None:
    """Qwen3-MoE: a PEFT adapter (one module per expert) that PEFT loads onto the fused experts, and a merged model.
    Qwen2-MoE: a merged model; PEFT would drop its shared expert's adapters, so the PEFT export refuses."""
    model = ServedModel("m", tiny_moe_model(family), FP32)
    model.create_adapter("a", LORA)
    weights = model.adapter("a").weights
    experts = [n for n in weights.a if ".experts." in n]
    assert len(experts) == 3 * 2  # gate, up and down of both sparse layers
    randomise(model, "a", seed=3)
    save_checkpoint(tmp_path / "c", weights.snapshot(), LORA, "tiny", None, {})
    keys = set(load_file(tmp_path / "c" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.experts.7.up_proj.lora_B.weight" in keys  # per expert

    ours = logprobs(model, "a", SEQS)
    base = hf_logprobs(tiny_moe_model(family), SEQS)
    assert max((o - b).abs().max().item() for o, b in zip(ours, base, strict=True)) > 1e-2  # the adapter matters
    # without the expert adapters the outputs differ too: they are applied, not only stored
    model.install_adapter("no-experts", LORA, _without(weights, experts), None)
    no_experts = logprobs(model, "no-experts", SEQS)
    assert max((o - n).abs().max().item() for o, n in zip(ours, no_experts, strict=True)) > 1e-3

    base_model: Any = tiny_moe_model(family)
    base_model.save_pretrained(tmp_path / "base")
    export_merged(tmp_path / "c", tmp_path / "base", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    for got, want in zip(ours, hf_logprobs(merged, SEQS), strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)

    loaded = load_checkpoint(tmp_path / "c", "cpu", model=model.train.hf)  # and back into tinkerd
    model.install_adapter("b", loaded.lora, loaded.weights, None)
    for got, want in zip(logprobs(model, "b", SEQS), ours, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)

    if family == "qwen2_moe":
        with pytest.raises(InvalidRequestError, match="shared expert"):
            export_peft(tmp_path / "c", tmp_path / "peft")
        return
    export_peft(tmp_path / "c", tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(tiny_moe_model(family), str(tmp_path / "peft")).eval()
    for got, want in zip(ours, hf_logprobs(peft_model, SEQS), strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def _without(weights: Any, names: list[str]) -> Any:
    from tinkerd.engine.lora import LoraWeights

    keep = [n for n in weights.a if n not in names]
    return LoraWeights(weights.rank, weights.alpha, {n: weights.a[n] for n in keep}, {n: weights.b[n] for n in keep})


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_mixed_runs_in_bf16_are_bit_identical_to_separate_ones_and_training_moves_only_its_run(family: str) -> None:
    model = ServedModel("m", tiny_moe_model(family), EngineConfig())  # the default: bf16 base matmuls
    assert_mixed_runs_equal_separate(model, LORA, SEQS)
    experts_before = {n: a.detach().clone() for n, a in model.adapter("a").weights.a.items() if ".experts." in n}
    for result in train_a_leaving_b(model, SEQS):
        assert 0 < result.metrics["router_aux_loss:mean"] <= 8  # at most E
        assert 1 <= result.metrics["router_load_max_over_mean:mean"] <= result.metrics["router_load_max_over_mean:max"]
    after = model.adapter("a").weights.a
    assert len(experts_before) == 6 and all(not torch.equal(after[n], a) for n, a in experts_before.items())


def test_router_metrics_are_transformers_load_balancing_loss() -> None:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    hf: Any = tiny_moe_model("qwen3_moe")
    engine = Transformer(tiny_moe_model("qwen3_moe"), torch.float32)
    seq = SEQS[0] + SEQS[2]
    with torch.no_grad(), engine.tracing_router() as trace:
        engine.packed_hidden([seq], LoraRouting.single(len(seq), None))
        out = hf(torch.tensor([seq]), output_router_logits=True)
    assert isinstance(trace, RouterTrace) and len(trace.probs) == 2
    metrics = router_metrics(trace, torch.arange(len(seq)))
    want = load_balancing_loss_func(out.router_logits, hf.config.num_experts, hf.config.num_experts_per_tok)
    assert metrics["router_aux_loss:mean"] == pytest.approx(float(want), rel=1e-5)
    counts = [torch.bincount(logits.topk(2).indices.flatten(), minlength=8).double() for logits in out.router_logits]
    ratios = [float(c.max() / c.mean()) for c in counts]
    assert metrics["router_load_max_over_mean:max"] == pytest.approx(max(ratios))
    assert max(ratios) > 1.0  # a skewed load: the statistic is not its balanced value by construction


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_kv_cache_sampling_equals_recompute_and_reports_the_trainers_logprobs(family: str) -> None:
    host = ModelHost.from_model("m", tiny_moe_model(family), EngineConfig())  # bf16 trainer, fp32 decode layout
    host.served.create_adapter("a", LORA)
    randomise(host.served, "a", seed=6)
    weights = host.served.snapshot("a")
    prompt = SEQS[0]
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    base, adapted, sampled = host.sampler.run(
        [
            SampleJob(prompt, greedy, 1, None),
            SampleJob(prompt, greedy, 1, weights),
            SampleJob(SEQS[1], SamplingParams(max_tokens=6, temperature=1.0, seed=7), 3, weights),
        ]
    )
    sample_engine = host.sample_transformer
    assert isinstance(sample_engine, Transformer)
    for result, w in ((base, None), (adapted, weights)):  # the cached decode equals greedy by full recompute
        seq = list(prompt)
        for _ in range(8):
            with torch.no_grad():
                routing = LoraRouting.single(len(seq), w)
                logits = sample_engine.logits(sample_engine.packed_hidden([seq], routing), routing)
            seq.append(int(logits[-1].argmax()))
        assert result.sequences[0].tokens == seq[len(prompt) :]
    assert base.sequences[0].tokens != adapted.sequences[0].tokens  # the adapter changes what is sampled
    # every sample reports exactly what forward() computes for its tokens
    for p, result in ((prompt, adapted), (SEQS[1], sampled)):
        for s in result.sequences:
            full = p + s.tokens
            ones = ArrayData.of_floats([1.0] * (len(full) - 1))
            scored = Datum(full[:-1], {"target_tokens": ArrayData.of_ints(full[1:]), "weights": ones})
            (out,) = host.served.forward([ForwardJob("a", [scored], "cross_entropy")])[0].loss_fn_outputs
            want = torch.tensor(out["logprobs"].values)[len(p) - 1 :]
            torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=0, rtol=0)
    assert len({tuple(s.tokens) for s in sampled.sequences}) > 1
