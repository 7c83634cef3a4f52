"""Which engine path serves a model architecture: facts read from a model's ``config.json``, no torch.

Two paths run a causal LM. The **packed** path is our own forward (``engine/transformer.py``, mixture-of-experts blocks
in ``engine/moe.py``): tokens of many sequences packed with no padding, many LoRA adapters in one pass, a KV cache for
decoding; it knows the layouts listed in ``PACKED_MODEL_TYPES``. The **generic** path (``engine/generic_model.py``) runs
the Hugging Face model's own forward with LoRA on its linear layers: slower (padded batches, one pass per adapter,
sampling by recomputation) but correct for any causal LM transformers can load. The engine confirms the packed choice
against the loaded modules and falls back to the generic path when a layout differs from what its model type promises.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from tinkerd.domain.errors import TinkerdError


class EnginePath(StrEnum):
    PACKED = "packed"
    GENERIC = "generic"


# Hugging Face model_type -> the decoder layouts the packed forward implements (dense, and mixture of experts with
# transformers 5's fused expert weights; GPT-OSS with attention sinks, see engine/gpt_oss.py; Qwen3.5's gated
# delta-net layers beside full attention, see engine/qwen3_5.py).
PACKED_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "gpt_oss", "qwen3_5_text", "qwen3_5_moe_text"}
)


class UnsupportedModelError(TinkerdError, ValueError):
    """A model neither engine path can serve (refused when the server starts, naming the architecture)."""


def architecture_of(config: Mapping[str, object]) -> str:
    """A readable name for a config's architecture: its first ``architectures`` entry, else its model_type."""
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    return str(config.get("model_type") or "unknown")


def preferred_path(config: Mapping[str, object]) -> EnginePath:
    """The path a config asks for: packed for the layouts it implements, else generic (the engine confirms)."""
    return EnginePath.PACKED if config.get("model_type") in PACKED_MODEL_TYPES else EnginePath.GENERIC
