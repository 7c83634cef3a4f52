"""Tiny randomly initialised Qwen-VL models (Qwen2.5-VL and Qwen3-VL layouts) built from configs, with a real image
processor (transformers' PIL-based Qwen2-VL one) constructed locally: no download.

The special tokens sit at the top of the vocabulary: ``VISION_START`` / ``VISION_END`` frame an image in the text,
``IMAGE`` is its placeholder (as many copies as the processor makes tokens of it).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import torch
from PIL import Image

VL_FAMILIES = ("qwen2_5_vl", "qwen3_vl")
VOCAB = 128
VISION_START, VISION_END, IMAGE, VIDEO = 120, 121, 122, 123
# Images become 1 to 16 tokens: areas from one merged patch (factor^2 pixels) to 16 of them.
MIN_MERGED, MAX_MERGED = 1, 16


def patch_size(family: str) -> int:
    return 14 if family == "qwen2_5_vl" else 16


def tiny_vl_config(family: str, vocab_size: int = VOCAB, *, image_token: int = IMAGE) -> Any:
    ids: dict[str, Any] = {
        "image_token_id": image_token,
        "video_token_id": image_token + 1,
        "vision_start_token_id": image_token - 2,
        "vision_end_token_id": image_token - 1,
    }
    text: dict[str, Any] = {
        "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "eos_token_id": 2,
        "bos_token_id": 1,
    }  # fmt: skip
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
        vision: dict[str, Any] = {
            "depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "out_hidden_size": 32,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
            "fullatt_block_indexes": [1],
        }  # fmt: skip
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    from transformers import Qwen3VLConfig

    text["head_dim"] = 8
    text["rope_parameters"] = {
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True,
    }  # fmt: skip
    vision: dict[str, Any] = {
        "depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "out_hidden_size": 32,
        "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0],
    }  # fmt: skip
    return Qwen3VLConfig(text_config=text, vision_config=vision, **ids)


def tiny_vl_model(family: str, seed: int = 0, vocab_size: int = VOCAB, **kwargs: Any) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model: Any = AutoModelForImageTextToText.from_config(
        tiny_vl_config(family, vocab_size, **kwargs), dtype=torch.float32
    )
    return model.eval()


def tiny_image_processor(family: str) -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    factor = patch_size(family) * 2
    size = {"shortest_edge": factor * factor * MIN_MERGED, "longest_edge": factor * factor * MAX_MERGED}
    return Qwen2VLImageProcessorPil(patch_size=patch_size(family), merge_size=2, temporal_patch_size=2, size=size)


def save_tiny_vl(out: Path, family: str, vocab_size: int = VOCAB, seed: int = 0, **kwargs: Any) -> Path:
    """A served model directory: weights, config and the image processor's preprocessor_config.json."""
    model: Any = tiny_vl_model(family, seed, vocab_size, **kwargs)
    model.save_pretrained(out)
    tiny_image_processor(family).save_pretrained(out)
    return out


def image_bytes(width: int, height: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A deterministic noisy picture (so different seeds are different images)."""
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format=fmt)
    return buffer.getvalue()


def processor_tokens(family: str, data: bytes) -> int:
    """How many tokens the real image processor makes of an image file."""
    with Image.open(io.BytesIO(data)) as opened:
        features = tiny_image_processor(family)(images=[opened.convert("RGB")], return_tensors="pt")
    return int(features["image_grid_thw"][0].prod()) // 4


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims a size (no pixel data): what an attacker sends to make a server allocate."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
