"""The dispatch point between the engine's two forwards: the packed ``Transformer`` or the ``GenericTransformer``.

``domain.architectures`` names the packed model types from a config; here the loaded modules confirm it (a model
type whose layers are not the dense layout the packed forward reads, e.g. a checkpoint with extra modules, takes the
generic path instead). A directory transformers cannot load as a causal LM is refused with its architecture named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from tinkerd.domain.architectures import PACKED_MODEL_TYPES, EnginePath, UnsupportedModelError, architecture_of
from tinkerd.engine.generic_model import GenericTransformer
from tinkerd.engine.moe import is_sparse_block
from tinkerd.engine.transformer import Transformer

Forward = Transformer | GenericTransformer

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _is_linear(module: object, name: str) -> bool:
    return isinstance(getattr(module, name, None), nn.Linear)


def path_of(hf_model: nn.Module) -> EnginePath:
    """PACKED when the model type and the loaded modules are a layout the packed forward implements."""
    m: Any = hf_model
    if getattr(m.config, "model_type", None) not in PACKED_MODEL_TYPES:
        return EnginePath.GENERIC
    body: Any = getattr(m, "model", None)
    if not all(hasattr(body, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return EnginePath.GENERIC
    if not isinstance(getattr(m, "lm_head", None), nn.Linear):
        return EnginePath.GENERIC
    for layer in body.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        dense_or_sparse = all(_is_linear(mlp, n) for n in _MLP) or is_sparse_block(mlp)
        if not (all(_is_linear(attn, n) for n in _ATTN) and dense_or_sparse):
            return EnginePath.GENERIC
    return EnginePath.PACKED


def build_forward(hf_model: nn.Module, compute_dtype: torch.dtype) -> Forward:
    """The packed forward in ``compute_dtype``, or the generic one, which always computes in fp32.

    A Hugging Face model cast to bf16 also keeps its residual stream and norms in bf16, and its rounding then depends
    on batch shape (padding), so the sampler and the trainer would disagree by ~1e-2 in logprobs; fp32 keeps the
    generic path exact, at its cost in speed (the packed path is the fast one)."""
    if path_of(hf_model) is EnginePath.PACKED:
        return Transformer(hf_model, compute_dtype)
    return GenericTransformer(hf_model, torch.float32)


def load_hf_model(path: Path, device: torch.device) -> nn.Module:
    """Load a model directory in fp32; UnsupportedModelError (naming the architecture) if it is no causal LM we run."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    arch = architecture_of(config if isinstance(config, dict) else {})
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    except (ValueError, KeyError, ImportError) as exc:
        raise UnsupportedModelError(
            f"model {path.name!r}: architecture {arch} cannot be served: transformers cannot load it as a causal LM "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if model.get_output_embeddings() is None:
        raise UnsupportedModelError(f"model {path.name!r}: architecture {arch} has no output embedding to score with")
    model.to(device)
    return model
