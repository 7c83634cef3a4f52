"""Teach a vision-language model to caption pictures through the Tinker SDK: image chunks in forward_backward and
sample.

A toy captioning set of tinted pictures (reddish, greenish, bluish noise), each tint with its own caption, is trained
with cross-entropy on the caption tokens (LoRA on the language model; the vision tower stays frozen); then new
pictures of each tint, never trained on, are captioned greedily. The captions are token ids, so any Qwen-VL model
works, including a tiny random one this script can build for a CPU and no network:

    python examples/image_captions.py --make-tiny-model /tmp/tiny-vl     # a random Qwen2.5-VL + its image processor
    tinkerd serve --model /tmp/tiny-vl &
    export TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-local
    python examples/image_captions.py --model /tmp/tiny-vl

``expected_tokens`` comes from the model's own image processor, as the cookbook's renderers compute it.
"""

from __future__ import annotations

import argparse
import io
import random
import time
from pathlib import Path
from typing import Any

import tinker
from PIL import Image
from tinker import types

TINTS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 60, 230)}
CAPTION_START = 10  # "caption:" in the token ids of this toy set
EOS = 2


def picture(rgb: tuple[int, int, int], seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    """A PNG of noise around a tint: every seed is a different picture of the same colour."""
    rng = random.Random(seed)
    image = Image.new("RGB", size)
    image.putdata([tuple(max(0, min(255, c + rng.randint(-30, 30))) for c in rgb) for _ in range(size[0] * size[1])])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Layout:
    """The model's vision tokens and its image processor's token count (as a Qwen-VL renderer needs them)."""

    def __init__(self, model_dir: str) -> None:
        import json

        from transformers import AutoImageProcessor

        config = json.loads((Path(model_dir) / "config.json").read_text())
        self.start, self.end = int(config["vision_start_token_id"]), int(config["vision_end_token_id"])
        self.processor: Any = AutoImageProcessor.from_pretrained(model_dir, backend="pil")

    def tokens_of(self, png: bytes) -> int:
        width, height = Image.open(io.BytesIO(png)).size
        patches = self.processor.get_number_of_image_patches(height, width, images_kwargs={})
        return int(patches // self.processor.merge_size**2)

    def prompt(self, png: bytes, then: list[int]) -> list[types.ModelInputChunk]:
        """<bos> <vision_start> [image] <vision_end> caption: ..."""
        image = types.ImageChunk(data=png, format="png", expected_tokens=self.tokens_of(png))
        return [types.EncodedTextChunk(tokens=[1, self.start]), image, types.EncodedTextChunk(tokens=[self.end, *then])]


def caption_of(index: int) -> list[int]:
    return [40 + 10 * index, 41 + 10 * index, EOS]


def datum(layout: Layout, png: bytes, caption: list[int]) -> types.Datum:
    n = layout.tokens_of(png)
    full = [1, layout.start, *[0] * n, layout.end, CAPTION_START, *caption]  # image positions are never targets
    targets = full[1:]
    weights = [0.0] * (len(targets) - len(caption)) + [1.0] * len(caption)
    return types.Datum(
        model_input=types.ModelInput(chunks=layout.prompt(png, [CAPTION_START, *caption[:-1]])),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=targets, dtype="int64", shape=[len(targets)]),
            "weights": types.TensorData(data=weights, dtype="float32", shape=[len(weights)]),
        },
    )


def make_tiny_model(out: Path) -> None:
    """A tiny random Qwen2.5-VL (128 token ids) with a real image processor, written as a served model directory."""
    import torch
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    text: dict[str, Any] = {
        "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "eos_token_id": EOS,
        "bos_token_id": 1,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
    }  # fmt: skip
    vision: dict[str, Any] = {
        "depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "out_hidden_size": 64,
        "window_size": 56, "fullatt_block_indexes": [1],
    }  # fmt: skip
    ids: dict[str, Any] = {
        "image_token_id": 122,
        "video_token_id": 123,
        "vision_start_token_id": 120,
        "vision_end_token_id": 121,
    }
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    model: Any = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    size = {"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * 16}  # 1 to 16 image tokens
    Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2, size=size).save_pretrained(out)
    print(f"wrote a tiny random Qwen2.5-VL to {out}; serve it with: tinkerd serve --model {out}")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description="Caption tinted pictures: image chunks through the Tinker SDK.")
    parser.add_argument("--model", help="the served Qwen-VL model (its name, here its local directory)")
    parser.add_argument("--make-tiny-model", type=Path, help="write a tiny random Qwen2.5-VL here and exit")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    if args.make_tiny_model is not None:
        make_tiny_model(args.make_tiny_model)
        return {}
    if not args.model:
        parser.error("--model is required")
    layout = Layout(args.model)
    service = tinker.ServiceClient()
    training = service.create_lora_training_client(base_model=args.model, rank=args.rank, seed=0).result()
    data = [datum(layout, picture(rgb, seed=0), caption_of(i)) for i, rgb in enumerate(TINTS.values())]
    print(f"{len(data)} pictures, {sum(layout.tokens_of(picture(rgb, 0)) for rgb in TINTS.values())} image tokens")
    first = last = 0.0
    for step in range(1, args.steps + 1):
        began = time.monotonic()
        result = training.forward_backward(data, "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=args.lr)).result()
        last = result.metrics["loss:sum"] / (3 * len(data))
        first = first or last
        if step <= 3 or step % 10 == 0:
            print(f"step {step:3d}/{args.steps}  loss per caption token {last:.3f}  ({time.monotonic() - began:.1f} s)")
    sampler = training.save_weights_and_get_sampling_client("captions").result()
    greedy = types.SamplingParams(max_tokens=3, temperature=0.0)
    right = 0
    print("new pictures (never trained on):")
    for i, (name, rgb) in enumerate(TINTS.items()):
        prompt = types.ModelInput(chunks=layout.prompt(picture(rgb, seed=100 + i), [CAPTION_START]))
        tokens = sampler.sample(prompt, num_samples=1, sampling_params=greedy).result().sequences[0].tokens
        right += tokens == caption_of(i)
        print(f"  a {name:5s} picture -> {tokens}  (its caption: {caption_of(i)})")
    print(f"{right} of {len(TINTS)} captioned right")
    return {"first_loss": first, "last_loss": last, "right": float(right)}


if __name__ == "__main__":
    main()
