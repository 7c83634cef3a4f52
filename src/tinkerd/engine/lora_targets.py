"""Which linear layers a LoRA config trains, decided from module names alone (as PEFT names them).

A linear layer under an ``attn``/``attention`` module is attention, the top-level output embedding is the
unembedding, and the other linear layers of the numbered decoder blocks are MLP (for the packed layouts: q/k/v/o_proj,
gate/up/down_proj and lm_head). Mixture-of-experts routers are never adapted; neither is anything outside the blocks.
The experts of a sparse MoE block (``<block>.experts.gate_proj`` / ``.up_proj`` / ``.down_proj``, one adapter per
expert stacked in one 3-D tensor, see ``moe.py``) are MLP too.
"""

from __future__ import annotations

from tinkerd.domain.ops import LoraConfig

UNEMBED_LEAVES = frozenset({"lm_head", "embed_out", "output"})
ROUTER_LEAVES = frozenset({"gate", "router", "shared_expert_gate"})  # MoE routing: Tinker trains no LoRA there
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # what each expert of a sparse block computes


def is_expert_param(name: str) -> bool:
    """Whether a LoRA target is one projection of all experts of a sparse block (``model.layers.0.mlp.experts.up_proj``:
    factors stacked over experts, A [E, r, in] and B [E, out, r]), rather than one linear layer."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] == "experts" and parts[-1] in EXPERT_PROJECTIONS


# A vision-language model's image side (its vision tower and projector) stays frozen: LoRA trains the language model.
VISION_PARTS = frozenset({"visual", "vision_tower", "vision_model", "multi_modal_projector"})


def module_role(name: str) -> str | None:
    """'attn', 'mlp' or 'unembed' for a linear layer's dotted name; None for layers LoRA never targets."""
    parts = name.split(".")
    leaf = parts[-1]
    if leaf in UNEMBED_LEAVES and len(parts) == 1:
        return "unembed"
    if leaf in ROUTER_LEAVES or any(p in VISION_PARTS for p in parts):
        return None
    if any("attn" in p or "attention" in p for p in parts[:-1]):
        return "attn"
    if not any(p.isdigit() for p in parts):  # outside the decoder blocks (e.g. a vision tower's projector)
        return None
    return "mlp"


def enabled_roles(config: LoraConfig) -> frozenset[str]:
    roles = {"attn"} if config.train_attn else set()
    roles |= {"mlp"} if config.train_mlp else set()
    roles |= {"unembed"} if config.train_unembed else set()
    return frozenset(roles)
