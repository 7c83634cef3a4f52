"""GPT-OSS expert adapters as a PEFT adapter: LoRA on the fused expert parameters (PEFT's ``target_parameters``).

tinkerd's checkpoints store an adapter of GPT-OSS's experts one module per expert (``<block>.experts.<e>.gate_proj``,
see ``expert_lora.py``), which PEFT cannot load onto GPT-OSS: its experts were fused in transformers 4 already, so
PEFT has no per-expert modules to convert them onto (it does for Qwen2-MoE and Qwen3-MoE). PEFT adapts a fused 3-D
parameter [E, in, out] instead (``ParamWrapper``): ``lora_A`` [r * E, in] is A [E, r, in] flattened, ``lora_B``
[out, r * E] is B [out, r, E] flattened, and expert e's delta is ``scale * A[e].T @ B[:, :, e].T`` [in, out].

This module writes our adapters in that form. GPT-OSS's ``gate_up_proj`` [E, hidden, 2 * I] interleaves gate and up
columns, so an expert's gate adapter (A_g [r, hidden], B_g [I, r]) and up adapter (A_u, B_u) become one rank-2r
adapter of the fused parameter: A = [A_g; A_u] and B with gate rows (``0::2``) [B_g, 0] and up rows (``1::2``)
[0, B_u], which computes the same delta. Its rank and alpha go in ``rank_pattern`` / ``alpha_pattern`` (2r and
2 * alpha, so the scale alpha / r is unchanged); ``down_proj`` [E, I, hidden] keeps rank r. PEFT nests one wrapper
per targeted parameter of a module, in the order of ``target_parameters``: ``gate_up_proj``'s factors sit under
``<block>.experts.base_layer``, ``down_proj``'s under ``<block>.experts``.
"""

from __future__ import annotations

import torch

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.engine.lora import LoraWeights
from tinkerd.engine.lora_targets import EXPERT_PROJECTIONS, is_expert_param

PEFT_PREFIX = "base_model.model."
TARGET_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]  # this order: gate_up_proj is inner


def peft_adapter(weights: LoraWeights, config: dict[str, object]) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """(adapter_model.safetensors tensors, adapter_config.json) of a GPT-OSS adapter with expert LoRA, from our
    weights and the checkpoint's own adapter_config.json."""
    tensors: dict[str, torch.Tensor] = {}
    for name in weights.a:
        if not is_expert_param(name):
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = weights.a[name].detach().float().contiguous()
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = weights.b[name].detach().float().contiguous()
    blocks = sorted({name.rsplit(".", 1)[0] for name in weights.a if is_expert_param(name)})
    r = weights.rank
    for block in blocks:
        missing = [p for p in EXPERT_PROJECTIONS if f"{block}.{p}" not in weights.a]
        if missing:
            raise InvalidRequestError(
                f"the adapter of {block!r} lacks {missing}: PEFT adapts gate, up and down together"
            )
        a_g, a_u, a_d = (weights.a[f"{block}.{p}"].detach().float() for p in EXPERT_PROJECTIONS)
        b_g, b_u, b_d = (weights.b[f"{block}.{p}"].detach().float() for p in EXPERT_PROJECTIONS)
        experts, _, hidden = a_g.shape
        inter = b_g.shape[1]
        a_E_2r_H = torch.cat([a_g, a_u], dim=1)
        b_E_2I_2r = a_g.new_zeros(experts, 2 * inter, 2 * r)
        b_E_2I_2r[:, 0::2, :r] = b_g
        b_E_2I_2r[:, 1::2, r:] = b_u
        tensors[f"{PEFT_PREFIX}{block}.base_layer.lora_A.weight"] = a_E_2r_H.reshape(experts * 2 * r, hidden)
        tensors[f"{PEFT_PREFIX}{block}.base_layer.lora_B.weight"] = _flat_b(b_E_2I_2r)
        tensors[f"{PEFT_PREFIX}{block}.lora_A.weight"] = a_d.reshape(experts * r, inter).contiguous()
        tensors[f"{PEFT_PREFIX}{block}.lora_B.weight"] = _flat_b(b_d)
    alpha = weights.alpha * 2
    out = dict(config)
    out["target_modules"] = sorted({name.rsplit(".", 1)[-1] for name in weights.a if not is_expert_param(name)})
    out["target_parameters"] = list(TARGET_PARAMETERS)
    out["rank_pattern"] = {"gate_up_proj": 2 * r}
    out["alpha_pattern"] = {"gate_up_proj": int(alpha) if float(alpha).is_integer() else alpha}
    return tensors, out


def _flat_b(b_E_out_r: torch.Tensor) -> torch.Tensor:
    """PEFT's ``lora_B`` [out, r * E] (rank-major columns: column j * E + e) of stacked B [E, out, r]."""
    experts, out_features, rank = b_E_out_r.shape
    return b_E_out_r.permute(1, 2, 0).reshape(out_features, rank * experts).contiguous()
