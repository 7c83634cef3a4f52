"""Vision-language models on the generic path, against Hugging Face and PEFT: an image's tokens where its chunk is,
processed by the model's own image processor, encoded by the frozen vision tower; LoRA on the language model only."""

from __future__ import annotations

import base64
import io
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from PIL import Image

from tests.engine.tiny_vlm import (
    IMAGE,
    VISION_END,
    VISION_START,
    VL_FAMILIES,
    image_bytes,
    processor_tokens,
    tiny_image_processor,
    tiny_vl_model,
)
from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import AdamParams, ArrayData, Datum, ImageInput, LoraConfig, SamplingParams
from tinkerd.engine.checkpoint import load_checkpoint, save_checkpoint
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.lora import target_module_names
from tinkerd.engine.sample_job import SampleJob
from tinkerd.engine.served_model import ForwardJob, ServedModel
from tinkerd.worker.hosts import ModelHost

pytestmark = pytest.mark.heavy  # seconds of CPU per test: not in `make test-fast`

FP32 = EngineConfig(train_dtype="float32", sample_dtype="float32")
LORA = LoraConfig(rank=4, alpha=8.0, seed=1)


def image(family: str, offset: int, width: int = 64, height: int = 48, seed: int = 1) -> ImageInput:
    data = image_bytes(width, height, seed)
    return ImageInput(offset, processor_tokens(family, data), "png", base64.b64encode(data).decode(), width, height)


def with_image(family: str, before: list[int], after: list[int], **size: int) -> tuple[list[int], list[ImageInput]]:
    """Text, then an image framed by the vision start/end tokens, then text."""
    pic = image(family, len(before) + 1, **size)
    return [*before, VISION_START, *[IMAGE] * pic.tokens, VISION_END, *after], [pic]


def datum(tokens: list[int], images: list[ImageInput]) -> Datum:
    targets = [*tokens[1:], 2]
    weights = [0.0 if t == IMAGE else 1.0 for t in targets]
    inputs = {"target_tokens": ArrayData.of_ints(targets), "weights": ArrayData.of_floats(weights)}
    return Datum(tokens, inputs, images=images)


def logprobs(model: ServedModel, adapter: str | None, rows: list[tuple[list[int], list[ImageInput]]]) -> list[Any]:
    (result,) = model.forward([ForwardJob(adapter, [datum(t, i) for t, i in rows], "cross_entropy")])
    return [torch.tensor(out["logprobs"].values) for out in result.loss_fn_outputs]


def hf_logprobs(hf: Any, family: str, rows: list[tuple[list[int], list[ImageInput]]]) -> list[torch.Tensor]:
    """One sequence at a time, with the inputs the Hugging Face processor makes: pixel values from the image
    processor, the image grid, and token types marking the image's tokens."""
    out = []
    processor = tiny_image_processor(family)
    with torch.no_grad():
        for tokens, images in rows:
            ids = torch.tensor([tokens])
            kwargs: dict[str, Any] = {}
            if images:
                pictures = [Image.open(io.BytesIO(base64.b64decode(i.data))).convert("RGB") for i in images]
                features = processor(images=pictures, return_tensors="pt")
                kwargs = {
                    "pixel_values": features["pixel_values"],
                    "image_grid_thw": features["image_grid_thw"],
                    "mm_token_type_ids": (ids == IMAGE).long(),
                }
            logits = hf(input_ids=ids, **kwargs).logits[0].float()
            out.append(torch.log_softmax(logits, -1).gather(1, torch.tensor([*tokens[1:], 2])[:, None])[:, 0])
    return out


def served(family: str) -> ServedModel:
    return ServedModel("m", tiny_vl_model(family), FP32, tiny_image_processor(family))


def trained(model: ServedModel, adapter: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in model.adapter(adapter).weights.b.values():
            b.copy_(torch.randn(b.shape, generator=g) * 0.3)


def rows_of(family: str) -> list[tuple[list[int], list[ImageInput]]]:
    """A mixed batch: an image, another size of image, text only, two images in one sequence."""
    first = with_image(family, [5, 6], [7, 8, 9])
    second = with_image(family, [11], [12, 13], width=90, height=160)
    text = ([20, 21, 22, 23], [])
    a = image(family, 2, seed=3)
    b = image(family, 2 + a.tokens + 3, width=40, height=40, seed=4)
    two = [30, VISION_START, *[IMAGE] * a.tokens, VISION_END, 31, VISION_START, *[IMAGE] * b.tokens, VISION_END, 32]
    return [first, second, text, (two, [a, b])]


@pytest.mark.parametrize("family", VL_FAMILIES)
def test_forward_equals_hugging_face_with_its_processors_inputs(family: str) -> None:
    model = served(family)
    rows = rows_of(family)
    want = hf_logprobs(tiny_vl_model(family), family, rows)
    for got, expected in zip(logprobs(model, None, rows), want, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the image matters: another picture in the same place changes what follows it
    tokens, (pic,) = rows[0]
    other = ImageInput(pic.offset, pic.tokens, "png", base64.b64encode(image_bytes(64, 48, seed=9)).decode(), 64, 48)
    (changed,) = logprobs(model, None, [(tokens, [other])])
    after = pic.offset + pic.tokens
    assert (changed[after:] - want[0][after:]).abs().max() > 1e-4


@pytest.mark.parametrize("family", VL_FAMILIES)
def test_lora_trains_the_language_model_only_and_loads_in_peft(family: str, tmp_path: Path) -> None:
    model = served(family)
    adapter = model.create_adapter("a", LORA)
    names = list(adapter.weights.a)
    assert names and not any("visual" in n for n in names)
    assert names == target_module_names(model.train.hf, LORA)
    rows = rows_of(family)
    before = logprobs(model, "a", rows)

    def loss() -> float:
        return -sum(float(t[w > 0].sum()) for t, w in zip(logprobs(model, "a", rows), weights, strict=True))

    weights = [torch.tensor(datum(t, i).loss_fn_inputs["weights"].values) for t, i in rows]
    start = loss()
    for _ in range(4):
        model.forward([ForwardJob("a", [datum(t, i) for t, i in rows], "cross_entropy", backward=True)])
        model.optim_step("a", AdamParams(learning_rate=2e-2))
    assert loss() < start - 1.0
    ours = logprobs(model, "a", rows)
    assert max((o - b).abs().max().item() for o, b in zip(ours, before, strict=True)) > 1e-3

    save_checkpoint(tmp_path / "c", model.adapter("a").weights.snapshot(), LORA, "tiny-vl", None, {})
    config = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(tiny_vl_model(family), str(tmp_path / "c")).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]  # PEFT wraps what the file holds
    for got, want in zip(ours, hf_logprobs(peft_model, family, rows), strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    loaded = load_checkpoint(tmp_path / "c", "cpu", model=model.train.hf)
    model.install_adapter("b", loaded.lora, loaded.weights, None)
    for got, want in zip(logprobs(model, "b", rows), ours, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_sampling_after_an_image_matches_hugging_face_and_the_trainer() -> None:
    family = "qwen2_5_vl"
    host = ModelHost.from_model("m", tiny_vl_model(family), FP32, image_processor=tiny_image_processor(family))
    host.served.create_adapter("a", LORA)
    trained(host.served, "a", seed=5)
    prompt, images = with_image(family, [5, 6], [7])
    greedy = SamplingParams(max_tokens=5, temperature=0.0)
    base, adapted, seeded = host.sampler.run(
        [
            SampleJob(prompt, greedy, 1, None, prompt_logprobs=True, images=images),
            SampleJob(prompt, greedy, 1, host.served.snapshot("a"), images=images),
            SampleJob(prompt, SamplingParams(max_tokens=4, temperature=1.0, seed=3), 3, None, images=images),
        ]
    )
    # greedy decoding by hand with Hugging Face's forward (the whole sequence each step)
    hf = tiny_vl_model(family)
    tokens = list(prompt)
    for _ in range(5):
        with torch.no_grad():
            tokens.append(int(hf_next_logits(hf, family, tokens, images).argmax()))
    assert base.sequences[0].tokens == tokens[len(prompt) :]
    assert base.prompt_logprobs is not None
    (want_prompt,) = hf_logprobs(hf, family, [(prompt, images)])
    torch.testing.assert_close(
        torch.tensor(base.prompt_logprobs[1:]), want_prompt[:-1], atol=1e-5, rtol=0
    )  # position i + 1 scored from position i
    for result in (adapted, seeded):
        for seq in result.sequences:
            full = prompt + seq.tokens
            (lp,) = logprobs(host.served, "a" if result is adapted else None, [(full[:-1], images)])
            n = len(seq.tokens)
            scored = lp[len(prompt) - 1 :]
            torch.testing.assert_close(torch.tensor(seq.logprobs[: n - 1]), scored[: n - 1], atol=1e-5, rtol=0)
    assert len({tuple(s.tokens) for s in seeded.sequences}) > 1


def hf_next_logits(hf: Any, family: str, tokens: list[int], images: list[ImageInput]) -> torch.Tensor:
    processor = tiny_image_processor(family)
    pictures = [Image.open(io.BytesIO(base64.b64decode(i.data))).convert("RGB") for i in images]
    features = processor(images=pictures, return_tensors="pt")
    ids = torch.tensor([tokens])
    out = hf(
        input_ids=ids,
        pixel_values=features["pixel_values"],
        image_grid_thw=features["image_grid_thw"],
        mm_token_type_ids=(ids == IMAGE).long() * _covered(len(tokens), images),
    )
    return out.logits[0, -1]


def _covered(n: int, images: list[ImageInput]) -> torch.Tensor:
    mask = torch.zeros(1, n, dtype=torch.long)
    for i in images:
        mask[0, i.offset : i.offset + i.tokens] = 1
    return mask


def test_images_that_do_not_fit_their_tokens_are_refused() -> None:
    family = "qwen3_vl"
    model = served(family)
    tokens, images = with_image(family, [5], [6])
    pic = images[0]
    cases = [
        (tokens[:-3], images, "outside"),  # the image runs past the end
        ([*tokens, IMAGE], images, "does not match the images' placeholders"),  # a stray placeholder
        (tokens, [ImageInput(pic.offset, pic.tokens - 1, "png", pic.data, 64, 48)], "placeholders"),
    ]
    for bad_tokens, bad_images, message in cases:
        with pytest.raises(InvalidRequestError, match=message):
            model.validate(ForwardJob(None, [datum(bad_tokens, bad_images)], "cross_entropy"))
    shifted = [IMAGE] * (pic.tokens + 1)
    wrong_count = ImageInput(0, pic.tokens + 1, "png", pic.data, 64, 48)
    with pytest.raises(InvalidRequestError, match=f"makes {pic.tokens} tokens of this 64x48 image"):
        model.validate(ForwardJob(None, [datum([*shifted, 5], [wrong_count])], "cross_entropy"))
    text_model = ServedModel("t", tiny_vl_model(family), FP32)  # no image processor: images are refused
    with pytest.raises(InvalidRequestError, match="takes none"):
        text_model.validate(ForwardJob(None, [datum(tokens, images)], "cross_entropy"))
