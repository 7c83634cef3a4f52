"""Tiny randomly initialised causal LMs of each supported family: no download, milliseconds per forward."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.models.llama import LlamaConfig
from transformers.models.mistral import MistralConfig
from transformers.models.qwen2 import Qwen2Config
from transformers.models.qwen3 import Qwen3Config

from tinkerd.domain.ops import AdamParams, ArrayData, Datum, ForwardResult, LoraConfig
from tinkerd.engine.served_model import ForwardJob, ServedModel

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def tiny_config(family: str = "llama", vocab_size: int = 96, tie: bool = True) -> PretrainedConfig:
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(head_dim=16, **common)
    if family == "mistral":
        return MistralConfig(sliding_window=8, **common)
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0, vocab_size: int = 96, tie: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size, tie), dtype=torch.float32)
    model.eval()
    return model


# Mixture-of-experts layouts the packed forward runs (transformers 5's fused expert weights).
MOE_FAMILIES = ("qwen3_moe", "qwen2_moe")


def tiny_moe_config(family: str = "qwen3_moe", vocab_size: int = 96) -> PretrainedConfig:
    """8 experts, 2 per token, every layer sparse (as in Qwen3-30B-A3B); Qwen3-MoE renormalises the top-2 weights,
    Qwen2-MoE keeps the raw softmax weights and adds a sigmoid-gated shared expert."""
    from transformers import Qwen2MoeConfig, Qwen3MoeConfig

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "qwen3_moe":
        common.update(head_dim=16, norm_topk_prob=True)
        return Qwen3MoeConfig(**common)
    if family == "qwen2_moe":
        common.update(shared_expert_intermediate_size=48, norm_topk_prob=False)
        return Qwen2MoeConfig(**common)
    raise ValueError(family)


def tiny_moe_model(family: str = "qwen3_moe", seed: int = 0, vocab_size: int = 96) -> torch.nn.Module:
    return _with_decisive_routing(tiny_moe_config(family, vocab_size), seed)


def _with_decisive_routing(config: PretrainedConfig, seed: int) -> torch.nn.Module:
    """A random fp32 model whose router weights are scaled up from their 0.02 init so that routing is decisive (no
    near-ties whose order float rounding could flip) and tokens really spread over different experts."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(50.0)
    model.eval()
    return model


# Architectures the packed forward does not implement: they run on the generic path (the model's own forward).
# (``tiny_generic_config`` also builds a GPT-OSS and ``tiny_hybrid_config`` a Qwen3.5; both run on the packed path:
# tests/engine/test_gpt_oss.py, tests/engine/test_qwen3_5.py.)
GENERIC_FAMILIES = ("phi", "olmo")


def tiny_generic_config(family: str, vocab_size: int = 96) -> PretrainedConfig:
    from transformers import AutoConfig, OlmoConfig, PhiConfig

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "phi":  # a biased lm_head, partial rotary, fc1/fc2 MLP, "dense" attention output
        return PhiConfig(**common)
    if family == "olmo":  # non-parametric layer norm
        return OlmoConfig(**common)
    if family == "gpt_oss":  # attention sinks, alternating sliding-window layers, fused experts with a router
        common.update(num_hidden_layers=4, num_key_value_heads=1, head_dim=32, intermediate_size=32, sliding_window=4)
        common.update(layer_types=["sliding_attention", "full_attention"] * 2)
        return AutoConfig.for_model("gpt_oss", num_local_experts=4, num_experts_per_tok=2, **common)
    raise ValueError(family)


def tiny_generic_model(family: str, seed: int = 0, vocab_size: int = 96) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_generic_config(family, vocab_size), dtype=torch.float32)
    model.eval()
    return model


# Qwen3.5: gated delta-net (linear attention) layers beside full attention, on the packed path (engine/qwen3_5.py).
HYBRID_FAMILIES = ("qwen3_5", "qwen3_5_moe")


def tiny_hybrid_config(family: str = "qwen3_5", vocab_size: int = 96) -> PretrainedConfig:
    """Two delta-net and two full-attention layers; each of the 2 key heads of a delta-net layer serves 2 value heads
    (as in the real models, which have twice as many value heads); the MoE adds a shared expert to 4 experts."""
    from transformers import AutoConfig

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        layer_types=["linear_attention", "full_attention"] * 2,
    )
    if family == "qwen3_5":
        return AutoConfig.for_model("qwen3_5_text", **common)
    if family == "qwen3_5_moe":
        moe = dict(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
        return AutoConfig.for_model("qwen3_5_moe_text", **common, **moe)
    raise ValueError(family)


def tiny_hybrid_model(family: str = "qwen3_5", seed: int = 0, vocab_size: int = 96) -> torch.nn.Module:
    return _with_decisive_routing(tiny_hybrid_config(family, vocab_size), seed)


def hf_logprobs(hf: Any, seqs: list[list[int]]) -> list[torch.Tensor]:
    """The Hugging Face model's own logprob of each next token (the last position scores token 2), one sequence at a
    time: the reference the engine's forward is compared with."""
    out = []
    with torch.no_grad():
        for s in seqs:
            logp = torch.log_softmax(hf(torch.tensor([s])).logits[0].float(), dim=-1)
            out.append(logp.gather(1, torch.tensor([*s[1:], 2])[:, None])[:, 0])
    return out


def next_token_datum(tokens: list[int]) -> Datum:
    """cross_entropy on every next token (the last position scores token 2), weight 1 each."""
    targets = [*tokens[1:], 2]
    return Datum(
        tokens, {"target_tokens": ArrayData.of_ints(targets), "weights": ArrayData.of_floats([1.0] * len(tokens))}
    )


def served_logprobs(model: ServedModel, adapter: str | None, seqs: list[list[int]]) -> list[torch.Tensor]:
    """The engine's forward logprobs of each sequence's next tokens, through ``adapter`` (None: the base model)."""
    (result,) = model.forward([ForwardJob(adapter, [next_token_datum(s) for s in seqs], "cross_entropy")])
    return [torch.tensor(out["logprobs"].values) for out in result.loss_fn_outputs]


def randomise(model: ServedModel, adapter: str, seed: int, scale: float = 0.3) -> None:
    """Give an adapter non-zero B so that every adapted weight (each expert's included) matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in model.adapter(adapter).weights.b.values():
            b.copy_(torch.randn(b.shape, generator=g) * scale)


def assert_mixed_runs_equal_separate(model: ServedModel, lora: LoraConfig, seqs: list[list[int]]) -> None:
    """Creates adapters "a" (``lora``) and "b" (rank 2, no unembedding), both randomised, and checks that two runs
    packed in one forward give bit for bit what each gives alone, and that a sequence's logprobs do not depend on
    the sequences packed beside it."""
    model.create_adapter("a", lora)
    model.create_adapter("b", LoraConfig(rank=2, alpha=4.0, seed=2, train_unembed=False))
    randomise(model, "a", seed=4)
    randomise(model, "b", seed=5)
    a, b = seqs[:2], seqs[1:]
    alone = [served_logprobs(model, "a", a), served_logprobs(model, "b", b), served_logprobs(model, "a", [seqs[1]])]
    assert (alone[0][1] - alone[1][0]).abs().max() > 1e-3  # the two runs differ on the same sequence
    mixed = model.forward(
        [
            ForwardJob("a", [next_token_datum(s) for s in a], "cross_entropy"),
            ForwardJob("b", [next_token_datum(s) for s in b], "cross_entropy"),
        ]
    )
    for want, result in zip(alone[:2], mixed, strict=True):
        for w, out in zip(want, result.loss_fn_outputs, strict=True):
            torch.testing.assert_close(torch.tensor(out["logprobs"].values), w, atol=0, rtol=0)
    torch.testing.assert_close(alone[2][0], alone[0][1], atol=0, rtol=0)  # alone or with another sequence


def train_a_leaving_b(model: ServedModel, seqs: list[list[int]], steps: int = 4) -> list[ForwardResult]:
    """Trains adapter "a" on ``seqs`` (Adam, lr 1e-2) and checks that its loss fell by more than 1 nat and that
    adapter "b" gives the very same logprobs as before; returns each step's forward_backward result."""

    def loss() -> float:
        return -sum(float(t.sum()) for t in served_logprobs(model, "a", seqs))

    before, b_before = loss(), served_logprobs(model, "b", seqs)
    results = []
    for _ in range(steps):
        (result,) = model.forward(
            [ForwardJob("a", [next_token_datum(s) for s in seqs], "cross_entropy", backward=True)]
        )
        model.optim_step("a", AdamParams(learning_rate=1e-2))
        results.append(result)
    assert loss() < before - 1.0
    for got, want in zip(served_logprobs(model, "b", seqs), b_before, strict=True):  # training a never moves b
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    return results
