"""LoRA on the experts of sparse MoE blocks (see ``moe.py``) in checkpoints: per-expert names, checks, merging.

In memory, ``<block>.experts.gate_proj`` holds every expert's factors stacked: A [E, r, in], B [E, out, r]. On disk each
expert is its own module under transformers 4's names, ``<block>.experts.<e>.gate_proj`` with A [r, in] and B [out, r]
(also ``up_proj``, ``down_proj``): the names adapters of these models carried before transformers 5 fused the experts,
and what PEFT (0.21 with transformers 5) converts onto the fused ``gate_up_proj`` / ``down_proj`` parameters when it
loads an adapter of a Qwen2-MoE or Qwen3-MoE model (gate and up become one rank-2r block-diagonal adapter, which
computes the same delta).

Transformers 5 stores an expert's gate and up projections fused as ``gate_up_proj`` [E, 2 * I, hidden] (gate rows
first) and its down projection as ``down_proj`` [E, hidden, I]; GPT-OSS stores both transposed, with gate and up
columns interleaved (see ``_fused``). PEFT has no per-expert modules for GPT-OSS (its experts were fused in
transformers 4 too): the PEFT export rewrites its expert adapters onto PEFT's LoRA of fused parameters
(``gpt_oss_peft.py``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.engine.lora import LoraWeights

_PER_EXPERT = re.compile(r"^(?P<block>.+\.experts)\.(?P<expert>\d+)\.(?P<projection>gate_proj|up_proj|down_proj)$")


def per_expert(
    name: str, a_E_r_in: torch.Tensor, b_E_out_r: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The on-disk modules of a stacked expert target: ``<block>.experts.<e>.<projection>`` -> (A [r, in],
    B [out, r])."""
    block, projection = name.rsplit(".", 1)
    return {f"{block}.{e}.{projection}": (a_E_r_in[e], b_E_out_r[e]) for e in range(a_E_r_in.shape[0])}


def stack_experts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """In place: per-expert modules read from disk become stacked targets (every expert 0..E-1 must be present)."""
    groups: dict[str, dict[int, str]] = {}
    for name in a:
        match = _PER_EXPERT.match(name)
        if match is not None:
            target = f"{match['block']}.{match['projection']}"
            groups.setdefault(target, {})[int(match["expert"])] = name
    for target, by_expert in groups.items():
        if sorted(by_expert) != list(range(len(by_expert))):
            raise InvalidRequestError(f"adapter_model.safetensors: {target!r} lacks experts of 0..{max(by_expert)}")
        names = [by_expert[e] for e in range(len(by_expert))]
        if any(n not in b for n in names):
            raise InvalidRequestError(f"adapter_model.safetensors: {target!r} has unpaired LoRA factors")
        shapes = {(tuple(a[n].shape), tuple(b[n].shape)) for n in names}
        if len(shapes) != 1:
            raise InvalidRequestError(f"adapter_model.safetensors: the experts of {target!r} differ in shape")
        a[target] = torch.stack([a.pop(n) for n in names])
        b[target] = torch.stack([b.pop(n) for n in names])


def _fused(module: nn.Module | None, projection: str) -> torch.Tensor | None:
    """The view [E, out, in] of the fused parameter that holds ``projection`` of every expert (writable in place).

    Qwen's layout stores ``gate_up_proj`` [E, 2 * I, hidden] (gate rows first) and ``down_proj`` [E, hidden, I];
    GPT-OSS's (``is_transposed``, not ``is_concatenated``) stores them transposed, ``gate_up_proj`` [E, hidden, 2 * I]
    with gate and up columns interleaved (gate ``0::2``) and ``down_proj`` [E, I, hidden]."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or gate_up.dim() != 3:
        return None
    if getattr(module, "is_transposed", False):
        if getattr(module, "is_concatenated", True):
            return None  # a transposed layout with gate and up in halves: not one tinkerd runs
        if projection == "down_proj":
            return down.transpose(1, 2)
        columns = slice(0, None, 2) if projection == "gate_proj" else slice(1, None, 2)
        return gate_up[:, :, columns].transpose(1, 2)
    inter = gate_up.shape[1] // 2
    if projection == "down_proj":
        return down
    return gate_up[:, :inter] if projection == "gate_proj" else gate_up[:, inter:]


def check_expert_compatible(name: str, weights: LoraWeights, modules: Mapping[str, nn.Module]) -> None:
    """The model's sparse block has the experts, and the sizes, of the adapter of ``name``."""
    block, projection = name.rsplit(".", 1)
    fused = _fused(modules.get(block), projection)
    if fused is None:
        raise InvalidRequestError(f"adapter targets {name!r}, which the base model has no fused experts for")
    experts, out_features, in_features = fused.shape
    a, b = weights.a[name], weights.b[name]
    if (a.shape[0], a.shape[2], b.shape[1]) != (experts, in_features, out_features):
        raise InvalidRequestError(
            f"adapter for {name!r} is {tuple(a.shape)} x {tuple(b.shape)} but the base model has {experts} experts "
            f"of [{out_features} x {in_features}]: the adapter was trained on a different base model"
        )


def merge_experts(model: nn.Module, weights: LoraWeights, name: str) -> None:
    """Add every expert's ``scale * B @ A`` of ``name`` into the model's fused expert weight (summed in fp32)."""
    block, projection = name.rsplit(".", 1)
    fused = _fused(model.get_submodule(block), projection)
    assert fused is not None, "check_expert_compatible first"
    delta_E_out_in = torch.bmm(weights.b[name].float(), weights.a[name].float()) * weights.scale
    with torch.no_grad():
        fused.copy_((fused.float() + delta_E_out_in.to(fused.device)).to(fused.dtype))  # writes through the view
