"""Images into a Qwen-VL forward on the generic path: the model's own image processor makes the patches, the frozen
vision tower encodes them, and the model's forward puts the embeddings at the image's placeholder tokens.

The API has already decoded and measured each image and laid ``ImageInput.tokens`` placeholder tokens where its chunk
was. Here each image is processed and encoded once and kept (keyed by its bytes) in a cache bounded by size: the
tower is frozen and never adapted, so an image's embeddings are the same in every pass, and a sampler that recomputes
each sequence's prefix at every step, or a run that trains on the same images for many steps, encodes each once.

The forward then gets, besides the tokens: ``mm_encoder_outputs`` (the cached embeddings of the pass's images, in
sequence order), ``image_grid_thw`` (each image's patch grid, for the multimodal rotary positions) and
``mm_token_type_ids`` (1 where an image's tokens are), as the Hugging Face processor would have given it.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import ImageInput

CACHE_BYTES = 512 * 1024 * 1024  # embeddings of recently seen images


@dataclass(frozen=True)
class _Encoded:
    grid_thw: torch.Tensor  # [3] int64: the image's patch grid (temporal, height, width)
    output: Any  # what the model's get_image_features returned for this one image
    nbytes: int


class ImageEncoder:
    """The vision half of one served vision-language model. Not thread-safe: the worker's thread drives it."""

    def __init__(self, hf_model: nn.Module, image_processor: Any, cache_bytes: int = CACHE_BYTES) -> None:
        self.hf: Any = hf_model
        self.processor = image_processor
        config: Any = hf_model.config
        self.image_token_id = int(config.image_token_id)
        video = getattr(config, "video_token_id", None)
        self.placeholders = {self.image_token_id} | ({int(video)} if video is not None else set())
        self.merge_size = int(image_processor.merge_size)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, _Encoded] = OrderedDict()
        self._held = 0

    # -- checks ---------------------------------------------------------------------------------------------------

    def check(self, tokens: Sequence[int], images: Sequence[ImageInput], where: str) -> None:
        """The images tile runs of placeholder tokens, and no other token is a placeholder."""
        expected = [False] * len(tokens)
        end = 0
        for i, image in enumerate(images):
            if image.offset < end or image.tokens < 1 or image.offset + image.tokens > len(tokens):
                raise InvalidRequestError(
                    f"{where}: image {i} (tokens [{image.offset}, {image.offset + image.tokens})) overlaps another "
                    f"or lies outside the {len(tokens)} tokens"
                )
            end = image.offset + image.tokens
            expected[image.offset : end] = [True] * image.tokens
        for position, (token, is_image) in enumerate(zip(tokens, expected, strict=True)):
            if is_image != (token == self.image_token_id) or (not is_image and token in self.placeholders):
                raise InvalidRequestError(
                    f"{where}: token {token} at position {position} does not match the images' placeholders"
                )

    # -- encoding -------------------------------------------------------------------------------------------------

    def encode(self, image: ImageInput, where: str = "image") -> _Encoded:
        """The image's embeddings (from the cache, or processed and encoded now and cached)."""
        key = hashlib.sha256(image.data.encode("ascii")).hexdigest()
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            self._check_count(hit, image, where)
            return hit
        try:
            with Image.open(io.BytesIO(base64.b64decode(image.data))) as opened:
                rgb = opened.convert("RGB")
        except Exception as exc:
            raise InvalidRequestError(f"{where}: the image cannot be decoded ({exc})") from None
        features = self.processor(images=[rgb], return_tensors="pt")
        grid_1_3 = torch.as_tensor(features["image_grid_thw"], dtype=torch.long)
        pixels = torch.as_tensor(features["pixel_values"]).to(self.hf.device)
        with torch.no_grad():
            output = self.hf.get_image_features(pixels, grid_1_3.to(self.hf.device), return_dict=True)
        output.last_hidden_state = None  # the tower's unmerged states: the forward reads only what follows
        nbytes = sum(t.numel() * t.element_size() for t in _tensors(output))
        encoded = _Encoded(grid_thw=grid_1_3[0], output=output, nbytes=nbytes)
        self._check_count(encoded, image, where)
        self._cache[key] = encoded
        self._held += nbytes
        while self._held > self.cache_bytes and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._held -= dropped.nbytes
        return encoded

    def _check_count(self, encoded: _Encoded, image: ImageInput, where: str) -> None:
        count = int(encoded.grid_thw.prod()) // self.merge_size**2
        if count != image.tokens:
            raise InvalidRequestError(
                f"{where}: the image processor makes {count} tokens of this {image.width}x{image.height} image, but "
                f"the request holds {image.tokens}"
            )

    def forward_inputs(
        self, tokens_B_T: torch.Tensor, images_B: Sequence[Sequence[ImageInput]]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The token ids and keyword arguments for the model's forward over right-padded rows with these images.

        The model finds an image's positions by its placeholder id. A sampler may draw that id as an ordinary token
        after the prompt; such a stray placeholder keeps its embedding (passed as ``inputs_embeds``, which LoRA
        never changes) but its id is hidden from the model's image placement."""
        types_B_T = torch.zeros_like(tokens_B_T)
        encoded: list[_Encoded] = []
        for b, images in enumerate(images_B):
            for image in images:
                encoded.append(self.encode(image))
                types_B_T[b, image.offset : image.offset + image.tokens] = 1
        extra: dict[str, Any] = {
            "mm_encoder_outputs": {"image": _joined([e.output for e in encoded])},
            "image_grid_thw": torch.stack([e.grid_thw for e in encoded]).to(tokens_B_T.device),
            "mm_token_type_ids": types_B_T,
        }
        stray_B_T = (tokens_B_T == self.image_token_id) & (types_B_T == 0)
        if bool(stray_B_T.any()):
            extra["inputs_embeds"] = self.hf.get_input_embeddings()(tokens_B_T)
            tokens_B_T = tokens_B_T.masked_fill(stray_B_T, 0)
        return tokens_B_T, extra


def _tensors(output: Any) -> list[torch.Tensor]:
    found = list(output.pooler_output)
    for layer in getattr(output, "deepstack_features", None) or ():
        found.extend(layer)
    return found


def _joined(outputs: list[Any]) -> Any:
    """One get_image_features output for several images, each encoded alone: per-image pieces side by side."""
    joined = copy.copy(outputs[0])
    joined.pooler_output = tuple(piece for out in outputs for piece in out.pooler_output)
    deepstack = getattr(outputs[0], "deepstack_features", None)
    if deepstack is not None:  # Qwen3-VL: per layer, one piece per image
        layers = range(len(deepstack))
        joined.deepstack_features = [tuple(p for out in outputs for p in out.deepstack_features[n]) for n in layers]
    return joined
