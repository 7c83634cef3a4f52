"""GPT-OSS on the packed engine (attention sinks, alternating sliding windows, biased experts with a clamped SwiGLU)
against Hugging Face, PEFT and its own slow twins."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.engine.tiny_models import (
    assert_mixed_runs_equal_separate,
    hf_logprobs,
    next_token_datum,
    randomise,
    served_logprobs,
    tiny_generic_config,
    train_a_leaving_b,
)
from tinkerd.domain.architectures import EnginePath
from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import ArrayData, Datum, LoraConfig, SamplingParams
from tinkerd.engine.checkpoint import load_checkpoint, save_checkpoint
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.export import export_merged, export_peft
from tinkerd.engine.gpt_oss import GptOssTransformer
from tinkerd.engine.lora import LoraRouting, LoraWeights
from tinkerd.engine.model_paths import path_of
from tinkerd.engine.moe import router_metrics
from tinkerd.engine.sample_job import SampleJob
from tinkerd.engine.served_model import ForwardJob, ServedModel
from tinkerd.worker.hosts import ModelHost

pytestmark = pytest.mark.heavy  # seconds of CPU per test: not in `make test-fast`

FP32 = EngineConfig(train_dtype="float32", sample_dtype="float32")
# longer than the sliding window (4) of layers 0 and 2; the second is shorter than it
SEQS = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19]]
LORA = LoraConfig(rank=4, alpha=8.0, seed=1)
datum = next_token_datum
logprobs = served_logprobs


def tiny_gpt_oss(seed: int = 0, vocab_size: int = 96, sinks: float = 1.0) -> Any:
    """The generic-path tests' tiny GPT-OSS (4 layers alternating a window of 4 with full attention, 4 experts, 2 per
    token), with routers scaled up from their 0.02 init so that routing is decisive (no near-ties whose order float
    rounding could flip) and sinks drawn at ``sinks`` times a unit normal so that they weigh in the softmax."""
    torch.manual_seed(seed)
    model: Any = AutoModelForCausalLM.from_config(tiny_generic_config("gpt_oss", vocab_size), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp.router." in name:
                p.mul_(50.0)
            elif name.endswith("self_attn.sinks"):
                p.copy_(torch.randn(p.shape) * sinks)
    return model.eval()


def engine_logits(engine: GptOssTransformer, seqs: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        h = engine.packed_hidden(seqs, LoraRouting.single(sum(map(len, seqs)), None))
        logits = engine.logits(h, LoraRouting.single(h.shape[0], None))
    return list(logits.split([len(s) for s in seqs]))


def test_gpt_oss_takes_the_packed_path_and_matches_hugging_face() -> None:
    hf = tiny_gpt_oss()
    assert path_of(hf) is EnginePath.PACKED
    engine = GptOssTransformer(tiny_gpt_oss(), torch.float32)
    assert engine.layer_windows == [4, None, 4, None] and all(engine.sparse)
    with torch.no_grad():
        out = hf(torch.tensor([SEQS[0]]), output_router_logits=True)
    assert sum(len(set(r.topk(2, dim=-1).indices.flatten().tolist())) for r in out.router_logits) >= 12  # of 16
    for got, seq in zip(engine_logits(engine, SEQS), SEQS, strict=True):
        with torch.no_grad():
            want = hf(torch.tensor([seq])).logits[0]
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # the sinks and the windows are the model's, not ignored: without them the logits differ
    no_sinks = GptOssTransformer(tiny_gpt_oss(), torch.float32)
    no_sinks.attention_sinks = [torch.full_like(s, -1e4) for s in no_sinks.attention_sinks or []]  # exp(-1e4) = 0
    assert (engine_logits(no_sinks, SEQS[:1])[0] - engine_logits(engine, SEQS[:1])[0]).abs().max() > 1e-2
    no_windows = GptOssTransformer(tiny_gpt_oss(), torch.float32)
    no_windows.layer_windows = [None] * 4
    assert (engine_logits(no_windows, SEQS[:1])[0] - engine_logits(engine, SEQS[:1])[0]).abs().max() > 1e-2


def test_router_metrics_are_transformers_load_balancing_loss() -> None:
    from transformers.models.gpt_oss.modeling_gpt_oss import load_balancing_loss_func

    hf = tiny_gpt_oss()
    engine = GptOssTransformer(tiny_gpt_oss(), torch.float32)
    seq = SEQS[0] + SEQS[2]
    with torch.no_grad(), engine.tracing_router() as trace:
        engine.packed_hidden([seq], LoraRouting.single(len(seq), None))
        out = hf(torch.tensor([seq]), output_router_logits=True)
    assert len(trace.probs) == 4
    metrics = router_metrics(trace, torch.arange(len(seq)))
    want = load_balancing_loss_func(out.router_logits, 4, 2)
    assert metrics["router_aux_loss:mean"] == pytest.approx(float(want), rel=1e-5)
    counts = [torch.bincount(r.topk(2).indices.flatten(), minlength=4).double() for r in out.router_logits]
    assert metrics["router_load_max_over_mean:max"] == pytest.approx(max(float(c.max() / c.mean()) for c in counts))


def _without(weights: LoraWeights, names: list[str]) -> LoraWeights:
    keep = [n for n in weights.a if n not in names]
    return LoraWeights(weights.rank, weights.alpha, {n: weights.a[n] for n in keep}, {n: weights.b[n] for n in keep})


def test_expert_adapters_export_to_peft_and_merged_and_load_back(tmp_path: Path) -> None:
    """Checkpoints hold one module per expert and load back; the PEFT export rewrites them onto PEFT's LoRA of the
    fused expert parameters, and PEFT's outputs equal ours; so do a merged model's."""
    model = ServedModel("m", tiny_gpt_oss(), FP32)
    model.create_adapter("a", LORA)
    weights = model.adapter("a").weights
    experts = [n for n in weights.a if ".experts." in n]
    assert len(experts) == 3 * 4  # gate, up and down of the four sparse layers
    assert tuple(weights.a["model.layers.0.mlp.experts.gate_proj"].shape) == (4, 4, 64)  # [E, r, hidden]
    assert tuple(weights.b["model.layers.0.mlp.experts.down_proj"].shape) == (4, 64, 4)  # [E, hidden, r]
    randomise(model, "a", seed=3)
    save_checkpoint(tmp_path / "c", weights.snapshot(), LORA, "tiny", None, {})
    assert "base_model.model.model.layers.3.mlp.experts.3.up_proj.lora_B.weight" in load_file(
        tmp_path / "c" / "adapter_model.safetensors"
    )

    ours = logprobs(model, "a", SEQS)
    base = hf_logprobs(tiny_gpt_oss(), SEQS)
    assert max((o - b).abs().max().item() for o, b in zip(ours, base, strict=True)) > 1e-2  # the adapter matters
    model.install_adapter("no-experts", LORA, _without(weights, experts), None)
    no_experts = logprobs(model, "no-experts", SEQS)
    assert max((o - n).abs().max().item() for o, n in zip(ours, no_experts, strict=True)) > 1e-3  # applied

    tiny_gpt_oss().save_pretrained(tmp_path / "base")
    export_merged(tmp_path / "c", tmp_path / "base", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    for got, want in zip(
        ours, hf_logprobs(merged, SEQS), strict=True
    ):  # rtol: fp32 sums in another order (e.g. with one torch thread)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)

    loaded = load_checkpoint(tmp_path / "c", "cpu", model=model.train.hf)  # and back into tinkerd
    model.install_adapter("b", loaded.lora, loaded.weights, None)
    for got, want in zip(logprobs(model, "b", SEQS), ours, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)

    # PEFT: LoRA on the fused expert parameters (target_parameters), gate and up as one rank-2r adapter
    export_peft(tmp_path / "c", tmp_path / "peft", base_model_type="gpt_oss")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert "gate_proj" not in config["target_modules"] and "q_proj" in config["target_modules"]
    peft_model = PeftModel.from_pretrained(tiny_gpt_oss(), str(tmp_path / "peft")).eval()
    for got, want in zip(ours, hf_logprobs(peft_model, SEQS), strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    with pytest.raises(InvalidRequestError, match="target_parameters"):  # that form is not read back: a clear 400
        load_checkpoint(tmp_path / "peft", "cpu", model=model.train.hf)


def test_the_cli_export_learns_the_model_type_from_the_base_models_config(tmp_path: Path) -> None:
    from tinkerd.cli_runs import _model_type

    tiny_generic_config("gpt_oss").save_pretrained(tmp_path / "base")
    assert _model_type(str(tmp_path / "base"), tmp_path / "cache") == "gpt_oss"
    assert _model_type(str(tmp_path / "gone"), tmp_path / "cache") is None  # not here: the per-expert form


def test_mixed_runs_in_bf16_are_bit_identical_to_separate_ones_and_training_moves_only_its_run() -> None:
    model = ServedModel("m", tiny_gpt_oss(), EngineConfig())  # the default: bf16 base matmuls
    assert_mixed_runs_equal_separate(model, LORA, SEQS)
    experts_before = {n: a.detach().clone() for n, a in model.adapter("a").weights.a.items() if ".experts." in n}
    for result in train_a_leaving_b(model, SEQS):
        assert 0 < result.metrics["router_aux_loss:mean"] <= 4  # at most E
        assert 1 <= result.metrics["router_load_max_over_mean:mean"] <= result.metrics["router_load_max_over_mean:max"]
    after = model.adapter("a").weights.a
    assert len(experts_before) == 12 and all(not torch.equal(after[n], a) for n, a in experts_before.items())


def test_kv_cache_sampling_equals_recompute_and_reports_the_trainers_logprobs() -> None:
    """Decoding runs past the window of 4 on the sliding layers, with requests at different positions in one batch."""
    host = ModelHost.from_model("m", tiny_gpt_oss(), EngineConfig())  # bf16 trainer, fp32 decode layout
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
    assert isinstance(sample_engine, GptOssTransformer)
    for result, w in ((base, None), (adapted, weights)):  # the cached decode equals greedy by full recompute
        seq = list(prompt)
        for _ in range(8):
            with torch.no_grad():
                routing = LoraRouting.single(len(seq), w)
                logits = sample_engine.logits(sample_engine.packed_hidden([seq], routing), routing)
            seq.append(int(logits[-1].argmax()))
        assert result.sequences[0].tokens == seq[len(prompt) :]
    assert base.sequences[0].tokens != adapted.sequences[0].tokens  # the adapter changes what is sampled
    for p, result in ((prompt, adapted), (SEQS[1], sampled)):  # every sample reports what forward() computes
        for s in result.sequences:
            want = trainer_logprobs(host.served, p, s.tokens)
            torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=0, rtol=0)
    assert len({tuple(s.tokens) for s in sampled.sequences}) > 1


def trainer_logprobs(model: ServedModel, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """forward()'s logprobs of a sample's tokens after its prompt, through adapter "a"."""
    full = prompt + tokens
    ones = ArrayData.of_floats([1.0] * (len(full) - 1))
    scored = Datum(full[:-1], {"target_tokens": ArrayData.of_ints(full[1:]), "weights": ones})
    (out,) = model.forward([ForwardJob("a", [scored], "cross_entropy")])[0].loss_fn_outputs
    return torch.tensor(out["logprobs"].values)[len(prompt) - 1 :]


def test_the_sampler_without_rescoring_decodes_what_the_trainer_scores() -> None:
    """The cached decode's own logprobs (no rescoring by the trainer) against the fp32 trainer's, past the window."""
    config = EngineConfig(train_dtype="float32", sample_dtype="float32", rescore_samples=False)
    host = ModelHost.from_model("m", tiny_gpt_oss(), config)
    host.served.create_adapter("a", LORA)
    randomise(host.served, "a", seed=8)
    weights = host.served.snapshot("a")
    jobs = [
        SampleJob(SEQS[0], SamplingParams(max_tokens=7, temperature=1.0, seed=1), 2, weights),
        SampleJob(SEQS[1], SamplingParams(max_tokens=9, temperature=1.0, seed=2), 2, weights),
    ]
    for job, result in zip(jobs, host.sampler.run(jobs), strict=True):
        for s in result.sequences:
            want = trainer_logprobs(host.served, job.prompt, s.tokens)
            torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=1e-4, rtol=0)
