"""The generic engine path (any causal LM, the model's own forward) against Hugging Face, PEFT and itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel

from tests.engine.tiny_models import (
    FAMILIES,
    GENERIC_FAMILIES,
    hf_logprobs,
    next_token_datum,
    served_logprobs,
    tiny_generic_model,
    tiny_model,
)
from tinkerd.domain.architectures import EnginePath, UnsupportedModelError
from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import AdamParams, LoraConfig, SamplingParams
from tinkerd.engine.checkpoint import load_checkpoint, save_checkpoint
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.generic_model import GenericTransformer
from tinkerd.engine.lora import init_lora_weights
from tinkerd.engine.model_paths import load_hf_model, path_of
from tinkerd.engine.sample_job import SampleJob
from tinkerd.engine.served_model import ForwardJob, ServedModel
from tinkerd.worker.hosts import ModelHost

FP32 = EngineConfig(train_dtype="float32", sample_dtype="float32")
SEQS = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [10, 11, 12], [13, 14, 15, 16, 17]]
LORA = LoraConfig(rank=4, alpha=8.0, seed=1)


datum = next_token_datum
logprobs = served_logprobs


def trained(model: ServedModel, adapter: str, seed: int) -> None:
    """Give an adapter non-zero B so that it changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in model.adapter(adapter).weights.b.values():
            b.copy_(torch.randn(b.shape, generator=g) * 0.2)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_layouts_take_the_packed_path(family: str) -> None:
    assert path_of(tiny_model(family)) is EnginePath.PACKED


# Qwen3.5's reference delta-rule kernels take seconds: in the default run, not in test-fast
HEAVY = pytest.mark.heavy


def families(*fast: str) -> list[object]:
    """Every generic family; those not in ``fast`` are heavy (the default run, not test-fast)."""
    return [f if f in fast else pytest.param(f, marks=HEAVY) for f in GENERIC_FAMILIES]


@pytest.mark.parametrize("family", families("phi", "olmo"))
def test_generic_forward_equals_hugging_face(family: str) -> None:
    hf = tiny_generic_model(family)
    assert path_of(hf) is EnginePath.GENERIC
    model = ServedModel("m", tiny_generic_model(family), FP32)
    assert isinstance(model.train, GenericTransformer)
    for got, want in zip(logprobs(model, None, SEQS), hf_logprobs(hf, SEQS), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # padded batch == one sequence at a time


@pytest.mark.parametrize("family", families("phi"))
def test_checkpoint_loads_in_peft_and_agrees(tmp_path: Path, family: str) -> None:
    model = ServedModel("m", tiny_generic_model(family), FP32)
    model.create_adapter("a", LORA)
    trained(model, "a", seed=3)
    weights = model.adapter("a").weights
    save_checkpoint(tmp_path / "c", weights.snapshot(), LORA, "tiny", None, {})
    config = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"]

    peft_model = PeftModel.from_pretrained(tiny_generic_model(family), str(tmp_path / "c")).eval()
    ours = logprobs(model, "a", SEQS)
    base = hf_logprobs(tiny_generic_model(family), SEQS)
    assert max((o - b).abs().max().item() for o, b in zip(ours, base, strict=True)) > 1e-3  # the adapter matters
    for got, want in zip(ours, hf_logprobs(peft_model, SEQS), strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)

    loaded = load_checkpoint(tmp_path / "c", "cpu", model=model.train.hf)  # and back into tinkerd
    model.install_adapter("b", loaded.lora, loaded.weights, None)
    for got, want in zip(logprobs(model, "b", SEQS), ours, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_training_lowers_the_loss_and_mixed_batches_equal_separate_ones() -> None:
    model = ServedModel("m", tiny_generic_model("phi"), FP32)
    model.create_adapter("a", LORA)
    model.create_adapter("b", LoraConfig(rank=2, alpha=4.0, seed=2, train_unembed=False))
    trained(model, "b", seed=4)
    alone = [logprobs(model, "a", SEQS[:2]), logprobs(model, "b", SEQS[1:])]
    mixed = model.forward(
        [
            ForwardJob("a", [datum(s) for s in SEQS[:2]], "cross_entropy"),
            ForwardJob("b", [datum(s) for s in SEQS[1:]], "cross_entropy"),
        ]
    )
    for want, result in zip(alone, mixed, strict=True):
        for w, out in zip(want, result.loss_fn_outputs, strict=True):
            torch.testing.assert_close(torch.tensor(out["logprobs"].values), w, atol=1e-6, rtol=0)

    def loss() -> float:
        return -sum(float(t.sum()) for t in logprobs(model, "a", SEQS))

    before, b_before = loss(), logprobs(model, "b", SEQS)
    for _ in range(5):
        model.forward([ForwardJob("a", [datum(s) for s in SEQS], "cross_entropy", backward=True)])
        model.optim_step("a", AdamParams(learning_rate=1e-2))
    assert loss() < before - 1.0
    for got, want in zip(logprobs(model, "b", SEQS), b_before, strict=True):  # training a never moves b
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_a_config_that_adapts_no_layer_of_the_model_is_refused() -> None:
    # GPT-OSS's MLP is fused experts, no linear layers: the generic path has nothing to adapt with train_mlp alone
    # (the packed path adapts its experts, tests/engine/test_gpt_oss.py)
    hf = tiny_generic_model("gpt_oss")
    with pytest.raises(InvalidRequestError, match="no layer"):
        init_lora_weights(hf, LoraConfig(rank=4, alpha=8.0, train_attn=False, train_unembed=False), torch.device("cpu"))


@pytest.mark.parametrize("family", families("phi"))
def test_sampling_matches_greedy_generate_and_the_trainer(family: str) -> None:
    host = ModelHost.from_model("m", tiny_generic_model(family), FP32)
    host.served.create_adapter("a", LORA)
    trained(host.served, "a", seed=5)
    weights = host.served.snapshot("a")
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    prompt = SEQS[0]
    base, adapted, sampled = host.sampler.run(
        [
            SampleJob(prompt, greedy, 1, None, prompt_logprobs=True),
            SampleJob(prompt, greedy, 1, weights),
            SampleJob(SEQS[1], SamplingParams(max_tokens=5, temperature=1.0, seed=7), 3, weights),
        ]
    )
    hf: Any = tiny_generic_model(family)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert base.sequences[0].tokens == expected[0, len(prompt) :].tolist()
    want_prompt = hf_logprobs(hf, [prompt])[0][:-1].tolist()
    assert base.prompt_logprobs is not None
    torch.testing.assert_close(torch.tensor(base.prompt_logprobs[1:]), torch.tensor(want_prompt), atol=1e-5, rtol=0)
    # the sampler's logprobs are the trainer's for the same tokens (one forward implementation, one copy)
    for result in (adapted, sampled):
        for seq in result.sequences:
            full = (prompt if result is adapted else SEQS[1]) + seq.tokens
            (lp,) = logprobs(host.served, "a", [full[:-1]])
            scored = lp[len(full) - 1 - len(seq.tokens) :]
            n = len(seq.tokens)
            torch.testing.assert_close(torch.tensor(seq.logprobs[: n - 1]), scored[: n - 1], atol=1e-5, rtol=0)
    assert len({tuple(s.tokens) for s in sampled.sequences}) > 1  # three seeded samples, not one repeated


def test_a_directory_transformers_cannot_load_as_a_causal_lm_is_refused(tmp_path: Path) -> None:
    from transformers import CLIPVisionConfig

    CLIPVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37).save_pretrained(
        tmp_path / "clip"
    )
    with pytest.raises(UnsupportedModelError, match="architecture clip_vision_model cannot be served"):
        load_hf_model(tmp_path / "clip", torch.device("cpu"))
