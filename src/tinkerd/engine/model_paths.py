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
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText

from tinkerd.domain.architectures import PACKED_MODEL_TYPES, EnginePath, UnsupportedModelError, architecture_of
from tinkerd.domain.vision import VISION_MODEL_TYPES
from tinkerd.engine import gpt_oss
from tinkerd.engine.generic_model import GenericTransformer
from tinkerd.engine.moe import is_sparse_block
from tinkerd.engine.qwen3_5 import HybridTransformer, hybrid_layout_ok, is_hybrid
from tinkerd.engine.transformer import Transformer
from tinkerd.engine.vision import ImageEncoder

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
    if is_hybrid(hf_model):  # Qwen3.5: delta-net layers beside full attention
        return EnginePath.PACKED if hybrid_layout_ok(hf_model) else EnginePath.GENERIC
    for layer in body.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if m.config.model_type == gpt_oss.MODEL_TYPE:
            dense_or_sparse = gpt_oss.is_gpt_oss_layer(layer)
        else:
            dense_or_sparse = all(_is_linear(mlp, n) for n in _MLP) or is_sparse_block(mlp)
        if not (all(_is_linear(attn, n) for n in _ATTN) and dense_or_sparse):
            return EnginePath.GENERIC
    return EnginePath.PACKED


def packed_forward(hf_model: nn.Module, compute_dtype: torch.dtype) -> Transformer:
    """The packed forward of a model ``path_of`` says is PACKED (GPT-OSS's and a hybrid model's have their own
    bodies, see ``gpt_oss.py`` and ``qwen3_5.py``)."""
    if getattr(hf_model.config, "model_type", None) == gpt_oss.MODEL_TYPE:
        return gpt_oss.GptOssTransformer(hf_model, compute_dtype)
    if is_hybrid(hf_model):
        return HybridTransformer(hf_model, compute_dtype)
    return Transformer(hf_model, compute_dtype)


def build_forward(hf_model: nn.Module, compute_dtype: torch.dtype, image_processor: Any = None) -> Forward:
    """The packed forward in ``compute_dtype``, or the generic one, which always computes in fp32.

    A Hugging Face model cast to bf16 also keeps its residual stream and norms in bf16, and its rounding then depends
    on batch shape (padding), so the sampler and the trainer would disagree by ~1e-2 in logprobs; fp32 keeps the
    generic path exact, at its cost in speed (the packed path is the fast one)."""
    if path_of(hf_model) is EnginePath.PACKED:
        return packed_forward(hf_model, compute_dtype)
    images = ImageEncoder(hf_model, image_processor) if image_processor is not None and is_vision(hf_model) else None
    return GenericTransformer(hf_model, torch.float32, images)


def is_vision(hf_model: nn.Module) -> bool:
    """A vision-language model whose images tinkerd can feed (see ``domain.vision``)."""
    return getattr(hf_model.config, "model_type", None) in VISION_MODEL_TYPES


def load_image_processor(path: Path) -> Any:
    """A vision-language model directory's image processor (the PIL one: no torchvision); None for text models or a
    directory without ``preprocessor_config.json`` (its images are then refused, here and at the API)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("model_type") not in VISION_MODEL_TYPES:
        return None
    if not (path / "preprocessor_config.json").is_file():
        return None
    return AutoImageProcessor.from_pretrained(str(path), backend="pil", local_files_only=True)


def load_hf_model(path: Path, device: torch.device) -> nn.Module:
    """Load a model directory in fp32; UnsupportedModelError (naming the architecture) if it is no causal LM we run."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    arch = architecture_of(config if isinstance(config, dict) else {})
    vision = isinstance(config, dict) and config.get("model_type") in VISION_MODEL_TYPES
    auto: Any = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    try:
        model: Any = auto.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    except (ValueError, KeyError, ImportError) as exc:
        raise UnsupportedModelError(
            f"model {path.name!r}: architecture {arch} cannot be served: transformers cannot load it as a causal LM "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if model.get_output_embeddings() is None:
        raise UnsupportedModelError(f"model {path.name!r}: architecture {arch} has no output embedding to score with")
    model.to(device)
    return model
