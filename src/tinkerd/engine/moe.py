"""Mixture-of-experts MLP blocks in the packed forward (the Qwen3-MoE and Qwen2-MoE layouts of transformers 5).

A sparse block has a router (``gate.weight`` [E, hidden]) and ``E`` experts whose weights transformers 5 stores fused
as 3-D parameters: ``experts.gate_up_proj`` [E, 2 * I, hidden] (gate rows first, then up) and ``experts.down_proj``
[E, hidden, I]. Qwen2-MoE adds a shared expert (a dense MLP of ``nn.Linear`` layers) scaled by
``sigmoid(shared_expert_gate(x))``. Routing is the Hugging Face model's: softmax of the router logits in fp32, the
top ``k`` experts, renormalised over those ``k`` when ``norm_topk_prob``; an expert's output is scaled by its weight
and the ``k`` outputs are summed in ascending expert order (as ``index_add_`` over the experts does in transformers).

LoRA on experts (the letter ``E`` counts experts, ``I`` is an expert's intermediate size): every expert gets its own
rank-``r`` adapter on each of its three projections, as if it were the ``nn.Linear`` MLP of transformers 4
(``gate_proj`` and ``up_proj`` [I, hidden], ``down_proj`` [hidden, I]). The target ``<block>.experts.gate_proj`` holds
all experts' factors stacked, A [E, r, in] and B [E, out, r]; checkpoints write one module per expert under transformers
4's names (``<block>.experts.<e>.gate_proj``), which PEFT converts onto transformers 5's fused weights (see
``expert_lora.py``). An expert's adapter applies to exactly the tokens routed to that expert.

Precision and batch invariance follow the dense layers: the router runs in fp32 (a bf16 router would route some
tokens differently from the model it serves), the frozen expert matmuls in the compute dtype, activations, the
weighted sum and every LoRA delta in fp32; every product pads to ``MIN_INVARIANT_ROWS`` rows, so a token's result
never depends on how many other tokens chose the same expert.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tinkerd.engine.lora import LoraRouting, apply_linear, rows_mm
from tinkerd.engine.lora_targets import EXPERT_PROJECTIONS


def is_sparse_block(mlp: object) -> bool:
    """Whether ``mlp`` is a sparse MoE block of the fused layout this module runs."""
    gate: Any = getattr(mlp, "gate", None)
    experts: Any = getattr(mlp, "experts", None)
    router = getattr(gate, "weight", None)
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not all(isinstance(t, torch.Tensor) for t in (router, gate_up, down)):
        return False
    assert isinstance(router, torch.Tensor) and isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
    if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False) or router.dim() != 2:
        return False
    e, hidden = router.shape
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != e or down.shape[0] != e:
        return False
    inter = down.shape[2]
    if tuple(gate_up.shape[1:]) != (2 * inter, hidden) or down.shape[1] != hidden:
        return False
    if not isinstance(getattr(gate, "top_k", None), int):
        return False
    shared = getattr(mlp, "shared_expert", None)
    if shared is None:
        return True
    return isinstance(getattr(mlp, "shared_expert_gate", None), nn.Linear) and all(
        isinstance(getattr(shared, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")
    )


def expert_targets(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """LoRA target name -> (experts, in_features, out_features) of every expert projection of sparse blocks."""
    out: dict[str, tuple[int, int, int]] = {}
    for name, module in model.named_modules():
        if name.endswith(".mlp") and is_sparse_block(module):
            experts: Any = module.experts
            e, hidden, inter = (int(n) for n in experts.down_proj.shape)
            shapes = {"gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
            for projection in EXPERT_PROJECTIONS:
                out[f"{name}.experts.{projection}"] = (e, *shapes[projection])
    return out


@dataclass
class RouterTrace:
    """What the routers chose in one forward, per sparse layer: fp32 probabilities [N, E] and top-k experts [N, k]."""

    probs: list[torch.Tensor] = field(default_factory=list)
    chosen: list[torch.Tensor] = field(default_factory=list)


def router_metrics(trace: RouterTrace, rows: torch.Tensor) -> dict[str, float]:
    """Load-balancing statistics of the tokens at the indices ``rows`` over every sparse layer of a traced forward.

    ``router_aux_loss`` is transformers' ``load_balancing_loss_func`` on these tokens (the Switch Transformer loss:
    E * sum_e of (top-k slots given to e per token) * (mean router probability of e), pooled over layers: k when
    perfectly balanced, up to E); it is reported, never added to the loss. ``router_load_max_over_mean`` is, per
    layer, the most loaded expert's top-k slot count over the mean count (1 when balanced, E / k at worst), and its
    mean and max over layers.
    """
    if not trace.probs:
        return {}
    e = trace.probs[0].shape[1]
    slots = torch.zeros(e, dtype=torch.float64)
    prob_sum = torch.zeros(e, dtype=torch.float64)
    ratios: list[float] = []
    n = 0
    for probs_N_E, chosen_N_K in zip(trace.probs, trace.chosen, strict=True):
        p, c = probs_N_E[rows].double(), chosen_N_K[rows]
        counts = torch.bincount(c.reshape(-1), minlength=e).double()
        slots += counts
        prob_sum += p.sum(dim=0)
        n += p.shape[0]
        ratios.append(float(counts.max() / counts.mean()) if counts.sum() > 0 else 0.0)
    if n == 0:
        return {}
    aux = float(e * ((slots / n) * (prob_sum / n)).sum())
    return {
        "router_aux_loss:mean": aux,
        "router_load_max_over_mean:mean": sum(ratios) / len(ratios),
        "router_load_max_over_mean:max": max(ratios),
    }


ExpertLora = list[tuple[torch.Tensor, torch.Tensor] | None]  # per segment: (A [E, r, in], scale * B.T [E, r, out])


def _expert_lora(routing: LoraRouting, name: str) -> ExpertLora:
    return [seg.weights.expert_factors(name) if seg.weights is not None else None for seg in routing.segments]


def _plus_lora(
    out_n_out: torch.Tensor, x_n_in: torch.Tensor, e: int, bounds: list[int], lora: ExpertLora
) -> torch.Tensor:
    """``out`` plus, on each segment's rows ``bounds[s]:bounds[s + 1]``, its expert-``e`` LoRA delta of ``x`` (fp32)."""
    if all(piece is None for piece in lora):
        return out_n_out
    pieces: list[torch.Tensor] = []
    for s, piece in enumerate(lora):
        lo, hi = bounds[s], bounds[s + 1]
        if lo == hi:
            continue
        if piece is None:
            pieces.append(out_n_out[lo:hi])
            continue
        a_E_r_in, b_E_r_out = piece
        pieces.append(out_n_out[lo:hi] + rows_mm(rows_mm(x_n_in[lo:hi], a_E_r_in[e].t()), b_E_r_out[e]))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


def _base(x_n_in: torch.Tensor, w_out_in: torch.Tensor) -> torch.Tensor:
    """fp32 ``x @ W.T`` of a frozen expert weight, multiplied in the weight's dtype."""
    return rows_mm(x_n_in.to(w_out_in.dtype), w_out_in.t()).to(x_n_in.dtype)


def _shared_gate(linear: nn.Linear, x_N_d: torch.Tensor) -> torch.Tensor:
    """``sigmoid(linear(x))`` [N, 1], batch-invariant: a one-column matmul takes MKL's matrix-vector path, whose
    summation order depends on the row count, so each row's dot product is its own; and the sigmoid runs in fp64 (in
    fp32 its vectorised and scalar paths differ in the last bit, by where a row falls). A sampler's copy stored for
    decoding (``decode_layout``) keeps no plain weight and needs no invariance: it uses the layer."""
    w = linear.weight
    if w.is_meta:
        logit_N_1 = linear(x_N_d.to(w.dtype)).to(x_N_d.dtype)
    else:
        logit_N_1 = (x_N_d * w.to(x_N_d.dtype)).sum(-1, keepdim=True)
        logit_N_1 = logit_N_1 if linear.bias is None else logit_N_1 + linear.bias.to(x_N_d.dtype)
    return torch.sigmoid(logit_N_1.double()).to(x_N_d.dtype)


def sparse_block(
    block: Any, prefix: str, x_N_d: torch.Tensor, routing: LoraRouting, trace: RouterTrace | None
) -> torch.Tensor:
    """The sparse MLP block ``block`` (named ``prefix``, e.g. ``model.layers.3.mlp``) on fp32 packed tokens."""
    router, experts = block.gate, block.experts
    num_experts, k = int(router.weight.shape[0]), int(router.top_k)
    logits_N_E = rows_mm(x_N_d, router.weight.t().to(x_N_d.dtype))
    probs_N_E = torch.softmax(logits_N_E, dim=-1, dtype=torch.float32)
    top_w_N_K, top_e_N_K = torch.topk(probs_N_E, k, dim=-1)
    if getattr(router, "norm_topk_prob", True):  # Qwen3.5-MoE's router has no flag: it always renormalises
        top_w_N_K = top_w_N_K / top_w_N_K.sum(dim=-1, keepdim=True)
    if trace is not None:
        trace.probs.append(probs_N_E.detach())
        trace.chosen.append(top_e_N_K.detach())

    # the (token, slot) pairs grouped by expert; within an expert, tokens stay in ascending order, so each LoRA
    # segment's tokens are one contiguous run of the expert's rows
    order = torch.argsort(top_e_N_K.reshape(-1), stable=True)
    token_M, slot_M = order // k, order % k
    counts = torch.bincount(top_e_N_K.reshape(-1), minlength=num_experts).tolist()
    seg_starts = torch.tensor([s.start for s in routing.segments] + [x_N_d.shape[0]], device=x_N_d.device)
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
        g, u = _base(x_n_d, experts.gate_up_proj[e]).chunk(2, dim=-1)
        g, u = _plus_lora(g, x_n_d, e, bounds, lora_gate), _plus_lora(u, x_n_d, e, bounds, lora_up)
        mid_n_i = experts.act_fn(g) * u
        y_n_d = _plus_lora(_base(mid_n_i, experts.down_proj[e]), mid_n_i, e, bounds, lora_down)
        out_N_d.index_add_(0, tokens, y_n_d * top_w_N_K[tokens, slots, None])

    shared = getattr(block, "shared_expert", None)
    if shared is not None:
        gate = apply_linear(shared.gate_proj, f"{prefix}.shared_expert.gate_proj", x_N_d, routing)
        up = apply_linear(shared.up_proj, f"{prefix}.shared_expert.up_proj", x_N_d, routing)
        y = apply_linear(shared.down_proj, f"{prefix}.shared_expert.down_proj", shared.act_fn(gate) * up, routing)
        out_N_d = out_N_d + _shared_gate(block.shared_expert_gate, x_N_d) * y
    return out_N_d
