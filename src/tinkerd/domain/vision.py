"""Vision-language models as facts the API needs: which token stands for an image, and how many of them an image is.

A Qwen-VL model (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``) reads an image as a grid of ``patch_size`` pixel patches,
merged ``merge_size`` x ``merge_size`` into one language-model token each, after resizing the image so that both sides
are multiples of ``patch_size * merge_size`` and its area lies in ``[min_pixels, max_pixels]`` (the image processor's
``size.shortest_edge`` / ``size.longest_edge``). ``image_token_count`` computes that count from the image's size alone,
so the API can check a chunk's ``expected_tokens`` without torch; the engine's image processor makes the patches and
the engine checks that they are as many.

In a token sequence an image is ``count`` copies of ``image_token_id`` (``<|image_pad|>``); the text around it carries
``<|vision_start|>`` / ``<|vision_end|>`` as the client's renderer wrote them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from tinkerd.domain.errors import InvalidRequestError

# Hugging Face model types whose image processor and forward tinkerd drives (all run on the generic engine path).
VISION_MODEL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl"})

MAX_ASPECT_RATIO = 200  # the Qwen-VL resize refuses longer sides over 200 times the shorter


@dataclass(frozen=True)
class VisionSpec:
    """How a served vision-language model turns an image into tokens."""

    image_token_id: int
    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    video_token_id: int | None = None  # never sent by a client: a text chunk holding it is refused

    @property
    def placeholders(self) -> frozenset[int]:
        """Token ids only an image (or a video) may put in a sequence."""
        return frozenset(t for t in (self.image_token_id, self.video_token_id) if t is not None)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def resized_size(width: int, height: int, spec: VisionSpec) -> tuple[int, int]:
    """(width, height) the image processor resizes to: multiples of ``factor``, area within [min, max] pixels."""
    if min(width, height) < 1:
        raise InvalidRequestError(f"image is {width}x{height} pixels; both sides must be at least 1")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise InvalidRequestError(
            f"image is {width}x{height} pixels: its aspect ratio must be at most {MAX_ASPECT_RATIO}"
        )
    f = spec.factor
    h = round(height / f) * f
    w = round(width / f) * f
    if h * w > spec.max_pixels:
        beta = math.sqrt(height * width / spec.max_pixels)
        h = max(f, math.floor(height / beta / f) * f)
        w = max(f, math.floor(width / beta / f) * f)
    elif h * w < spec.min_pixels:
        beta = math.sqrt(spec.min_pixels / (height * width))
        h = math.ceil(height * beta / f) * f
        w = math.ceil(width * beta / f) * f
    return w, h


def image_token_count(width: int, height: int, spec: VisionSpec) -> int:
    """Tokens an image of this size becomes in the language model."""
    w, h = resized_size(width, height, spec)
    return (w // spec.patch_size) * (h // spec.patch_size) // (spec.merge_size**2)


def vision_spec_of(config: Mapping[str, object], preprocessor: Mapping[str, object]) -> VisionSpec | None:
    """The spec of a model directory's ``config.json`` and ``preprocessor_config.json``; None for text-only models
    and for a vision-language model without an image processor config (its images cannot be processed)."""
    if config.get("model_type") not in VISION_MODEL_TYPES or not preprocessor:
        return None
    vision = config.get("vision_config")
    vision = vision if isinstance(vision, Mapping) else {}
    size = preprocessor.get("size")
    size = size if isinstance(size, Mapping) else {}

    def number(*values: object, default: int) -> int:
        for value in values:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return default

    image_token = config.get("image_token_id")
    if not isinstance(image_token, int):
        return None
    video_token = config.get("video_token_id")
    return VisionSpec(
        image_token_id=image_token,
        patch_size=number(preprocessor.get("patch_size"), vision.get("patch_size"), default=14),
        merge_size=number(preprocessor.get("merge_size"), vision.get("spatial_merge_size"), default=2),
        # top-level min/max_pixels override size, as in the processor's constructor
        min_pixels=number(preprocessor.get("min_pixels"), size.get("shortest_edge"), default=56 * 56),
        max_pixels=number(preprocessor.get("max_pixels"), size.get("longest_edge"), default=28 * 28 * 1280),
        video_token_id=video_token if isinstance(video_token, int) else None,
    )
