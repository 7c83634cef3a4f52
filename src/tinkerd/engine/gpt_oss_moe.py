"""GPT-OSS's mixture-of-experts block in the packed forward, with LoRA on each expert's projections.

The layout (transformers' ``gpt_oss``): a router ``router.weight`` [E, hidden] with a bias ``router.bias`` [E]; the
top ``k`` experts of the router's logits are chosen first and a softmax over those ``k`` logits weighs them (Qwen's
routers softmax all ``E`` first). The experts are stored transposed and fused, with biases:
``experts.gate_up_proj`` [E, hidden, 2 * I] whose columns interleave gate and up (gate ``0::2``, up ``1::2``),
``experts.gate_up_proj_bias`` [E, 2 * I], ``experts.down_proj`` [E, I, hidden] and ``experts.down_proj_bias``
[E, hidden]. The activation is a clamped SwiGLU: gate clamped above at ``limit``, up clamped to [-limit, limit], and
``(up + 1) * gate * sigmoid(alpha * gate)``.

LoRA on experts is the Qwen3-MoE scheme of ``moe.py``: every expert has its own rank-``r`` adapter on its gate, up and
down projections as if they were ``nn.Linear`` layers (gate and up [I, hidden], down [hidden, I]), stacked per
projection under ``<block>.experts.gate_proj`` (A [E, r, in], B [E, out, r]); the gate and up deltas are added to the
de-interleaved gate and up columns before the clamp. The router is never adapted.

Precision and batch invariance follow ``moe.py``: router in fp32, frozen expert matmuls in the compute dtype (biases,
activations, the weighted sum and LoRA deltas in fp32), every product padded to ``MIN_INVARIANT_ROWS`` rows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinkerd.engine.lora import LoraRouting, pad_rows, rows_mm
from tinkerd.engine.lora_targets import EXPERT_PROJECTIONS
from tinkerd.engine.moe import RouterTrace, _expert_lora, _plus_lora


def is_gpt_oss_block(mlp: object) -> bool:
    """Whether ``mlp`` is a GPT-OSS sparse block of the layout this module runs."""
    router: Any = getattr(mlp, "router", None)
    experts: Any = getattr(mlp, "experts", None)
    names = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    tensors = [getattr(experts, n, None) for n in names]
    weight, bias = getattr(router, "weight", None), getattr(router, "bias", None)
    if not all(isinstance(t, torch.Tensor) for t in (*tensors, weight, bias)):
        return False
    assert isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)
    gate_up, gate_up_bias, down, down_bias = (t for t in tensors if isinstance(t, torch.Tensor))
    if not (getattr(experts, "is_transposed", False) and getattr(experts, "is_concatenated", True) is False):
        return False
    if not all(isinstance(getattr(experts, n, None), float | int) for n in ("alpha", "limit")):
        return False
    if not isinstance(getattr(router, "top_k", None), int) or weight.dim() != 2 or gate_up.dim() != 3:
        return False
    e, hidden = weight.shape
    inter = down.shape[1] if down.dim() == 3 else -1
    return (
        tuple(bias.shape) == (e,)
        and tuple(gate_up.shape) == (e, hidden, 2 * inter)
        and tuple(gate_up_bias.shape) == (e, 2 * inter)
        and tuple(down.shape) == (e, inter, hidden)
        and tuple(down_bias.shape) == (e, hidden)
    )


def gpt_oss_expert_targets(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """LoRA target name -> (experts, in_features, out_features) of every expert projection of GPT-OSS blocks."""
    out: dict[str, tuple[int, int, int]] = {}
    for name, module in model.named_modules():
        if name.endswith(".mlp") and is_gpt_oss_block(module):
            experts: Any = module.experts
            e, inter, hidden = (int(n) for n in experts.down_proj.shape)
            shapes = {"gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
            for projection in EXPERT_PROJECTIONS:
                out[f"{name}.experts.{projection}"] = (e, *shapes[projection])
    return out


def freeze_experts(block: Any, compute_dtype: torch.dtype) -> None:
    """The expert matrices take the compute dtype (frozen base matmuls); their biases and the router stay fp32."""
    experts = block.experts
    for name in ("gate_up_proj", "down_proj"):
        weight = getattr(experts, name)
        setattr(experts, name, nn.Parameter(weight.detach().to(compute_dtype), requires_grad=False))


def _base(x_n_in: torch.Tensor, w_in_out: torch.Tensor, bias_out: torch.Tensor) -> torch.Tensor:
    """fp32 ``x @ W + b`` of a frozen, transposed expert weight, multiplied in the weight's dtype."""
    return rows_mm(x_n_in.to(w_in_out.dtype), w_in_out).to(x_n_in.dtype) + bias_out


def gpt_oss_block(
    block: Any, prefix: str, x_N_d: torch.Tensor, routing: LoraRouting, trace: RouterTrace | None
) -> torch.Tensor:
    """The GPT-OSS sparse block ``block`` (named ``prefix``, e.g. ``model.layers.3.mlp``) on fp32 packed tokens."""
    router, experts = block.router, block.experts
    num_experts, k = int(router.weight.shape[0]), int(router.top_k)
    n = x_N_d.shape[0]
    logits_N_E = F.linear(pad_rows(x_N_d), router.weight.to(x_N_d.dtype), router.bias.to(x_N_d.dtype))[:n]
    top_logits_N_K, top_e_N_K = torch.topk(logits_N_E, k, dim=-1)
    top_w_N_K = torch.softmax(top_logits_N_K, dim=-1, dtype=torch.float32)
    if trace is not None:  # the statistics of moe.router_metrics read the softmax over every expert
        trace.probs.append(torch.softmax(logits_N_E.detach(), dim=-1, dtype=torch.float32))
        trace.chosen.append(top_e_N_K.detach())

    limit, alpha = float(experts.limit), float(experts.alpha)
    order = torch.argsort(top_e_N_K.reshape(-1), stable=True)
    token_M, slot_M = order // k, order % k
    counts = torch.bincount(top_e_N_K.reshape(-1), minlength=num_experts).tolist()
    seg_starts = torch.tensor([s.start for s in routing.segments] + [n], device=x_N_d.device)
    lora_gate, lora_up, lora_down = (_expert_lora(routing, f"{prefix}.experts.{p}") for p in EXPERT_PROJECTIONS)
    out_N_d = torch.zeros_like(x_N_d)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        tokens = token_M[start : start + count]
        slots = slot_M[start : start + count]
        start += count
        bounds = torch.searchsorted(tokens, seg_starts).tolist()
        x_n_d = x_N_d[tokens]
        gate_up = _base(x_n_d, experts.gate_up_proj[e], experts.gate_up_proj_bias[e].to(x_N_d.dtype))
        g = _plus_lora(gate_up[:, 0::2], x_n_d, e, bounds, lora_gate).clamp(max=limit)
        u = _plus_lora(gate_up[:, 1::2], x_n_d, e, bounds, lora_up).clamp(min=-limit, max=limit)
        mid_n_i = (u + 1) * (g * torch.sigmoid(g * alpha))
        y_n_d = _base(mid_n_i, experts.down_proj[e], experts.down_proj_bias[e].to(x_N_d.dtype))
        y_n_d = _plus_lora(y_n_d, mid_n_i, e, bounds, lora_down)
        out_N_d.index_add_(0, tokens, y_n_d * top_w_N_K[tokens, slots, None])
    return out_N_d
