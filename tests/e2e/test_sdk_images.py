"""Image chunks through the real `tinker` SDK against `tinkerd serve` on a tiny random Qwen2.5-VL with a real
(locally built) image processor: training on an image-captioning toy set lowers the loss, sampling after an image
works, compute_logprobs reads an image the server finds on
its disk, and bad images are 400s after which the server keeps serving."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import tinker
import torch
from PIL import Image
from tinker import types

from tests.e2e.conftest import API_KEY, Server, start_server, stop_server
from tests.engine.tiny_vlm import IMAGE, VISION_END, VISION_START, png_header, processor_tokens, save_tiny_vl

pytestmark = pytest.mark.e2e

FAMILY = "qwen2_5_vl"
# A toy captioning set: a tinted picture and its three-token caption (the last one is the end of text).
CAPTIONS = {(220, 40, 40): [40, 41, 2], (40, 200, 60): [50, 51, 2], (50, 60, 230): [60, 61, 2]}


def picture(rgb: tuple[int, int, int], size: tuple[int, int] = (48, 40), seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(-30, 30, (size[1], size[0], 3), generator=g)
    pixels = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def prompt_chunks(image: types.ModelInputChunk) -> list[types.ModelInputChunk]:
    """<bos> <vision_start> [image] <vision_end> "caption:" — as a Qwen-VL renderer lays an image out."""
    return [types.EncodedTextChunk(tokens=[1, VISION_START]), image, types.EncodedTextChunk(tokens=[VISION_END, 10])]


def image_chunk(data: bytes, expected: int | None = None) -> types.ImageChunk:
    return types.ImageChunk(data=data, format="png", expected_tokens=expected or processor_tokens(FAMILY, data))


def caption_datum(data: bytes, caption: list[int]) -> types.Datum:
    n = processor_tokens(FAMILY, data)
    chunks = prompt_chunks(image_chunk(data))
    chunks[-1] = types.EncodedTextChunk(tokens=[VISION_END, 10, *caption[:-1]])
    full = [1, VISION_START, *[IMAGE] * n, VISION_END, 10, *caption]
    targets = full[1:]
    weights = [0.0] * (len(targets) - len(caption)) + [1.0] * len(caption)
    return types.Datum(
        model_input=types.ModelInput(chunks=chunks),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=targets, dtype="int64", shape=[len(targets)]),
            "weights": types.TensorData(data=weights, dtype="float32", shape=[len(weights)]),
        },
    )


def text_datum(tokens: list[int]) -> types.Datum:
    n = len(tokens) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[n]),
            "weights": types.TensorData(data=[1.0] * n, dtype="float32", shape=[n]),
        },
    )


@pytest.fixture(scope="module")
def vl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model = save_tiny_vl(tmp_path_factory.mktemp("models") / "tiny-qwen2.5-vl", FAMILY)
    serve = tmp_path_factory.mktemp("serve")
    (serve / "images").mkdir()
    running = start_server(serve, model, args=["--image-root", str(serve / "images")])
    try:
        yield running
    finally:
        stop_server(running.process)


def train_captions(server: Server, steps: int) -> tuple[float, float, tinker.SamplingClient]:
    """(caption loss before, after, a sampler of the trained weights): ``steps`` steps on the toy set, each batch
    with a text-only datum too."""
    service = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    training = service.create_lora_training_client(base_model=server.model, rank=8, seed=0).result()
    data = [caption_datum(picture(rgb), caption) for rgb, caption in CAPTIONS.items()]
    mixed = [*data, text_datum([1, 20, 21, 22, 23])]

    def loss() -> float:
        return training.forward(data, "cross_entropy").result().metrics["loss:sum"]

    before = loss()
    for _ in range(steps):
        training.forward_backward(mixed, "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=3e-2)).result()
    return before, loss(), training.save_weights_and_get_sampling_client(f"captions-{steps}")


def caption(sampler: tinker.SamplingClient, rgb: tuple[int, int, int]) -> types.SampledSequence:
    """The greedy caption of a picture of this tint the model never saw."""
    prompt = types.ModelInput(chunks=prompt_chunks(image_chunk(picture(rgb, seed=7))))
    greedy = types.SamplingParams(max_tokens=3, temperature=0.0)
    (seq,) = sampler.sample(prompt, num_samples=1, sampling_params=greedy).result().sequences
    return seq


def test_training_on_images_lowers_the_loss_and_samples_after_an_image(vl_server: Server) -> None:
    before, after, sampler = train_captions(vl_server, steps=6)
    assert after < before * 0.7, (before, after)
    seq = caption(sampler, (220, 40, 40))
    assert len(seq.tokens) == 3 and seq.logprobs is not None and len(seq.logprobs) == 3


def test_a_pointer_to_a_file_on_the_server_and_bad_images(vl_server: Server, tmp_path: Path) -> None:
    service = tinker.ServiceClient(base_url=vl_server.url, api_key=API_KEY)
    try:
        sampler = service.create_sampling_client(base_model=vl_server.model)
        data = picture((220, 40, 40))
        path = vl_server.log.parent / "images" / "red.png"  # under the server's --image-root
        path.write_bytes(data)
        (tmp_path / "red.png").write_bytes(data)
        pointer = types.ImageAssetPointerChunk(format="png", location=path.as_uri(), expected_tokens=None)
        by_pointer = sampler.compute_logprobs(types.ModelInput(chunks=prompt_chunks(pointer))).result()
        inline = sampler.compute_logprobs(types.ModelInput(chunks=prompt_chunks(image_chunk(data)))).result()
        assert by_pointer == inline and len(inline) == 4 + processor_tokens(FAMILY, data)
        other = sampler.compute_logprobs(types.ModelInput(chunks=prompt_chunks(image_chunk(picture((0, 0, 0))))))
        assert other.result()[-1] != inline[-1]  # the text after the image sees it

        n = processor_tokens(FAMILY, data)
        jpeg = io.BytesIO()
        Image.open(io.BytesIO(data)).save(jpeg, format="JPEG")
        bad = [
            (types.ImageChunk(data=b"\x89PNG\r\n\x1a\n garbage", format="png", expected_tokens=n), "not a valid PNG"),
            (types.ImageChunk(data=jpeg.getvalue(), format="png", expected_tokens=n), "bytes are a JPEG"),
            (types.ImageChunk(data=data[:200], format="png", expected_tokens=n), "not a valid PNG"),
            (types.ImageChunk(data=data, format="png", expected_tokens=n + 3), f"expected_tokens is {n + 3}"),
            (types.ImageChunk(data=png_header(5000, 3400), format="png"), "limit of 16777216"),
            (types.ImageAssetPointerChunk(format="png", location="https://example.com/x.png"), "does not fetch"),
            (types.ImageAssetPointerChunk(format="png", location=str(tmp_path / "red.png")), "outside the image root"),
        ]
        params = types.SamplingParams(max_tokens=2, temperature=0.0)
        for chunk, message in bad:
            prompt = types.ModelInput(chunks=prompt_chunks(chunk))
            with pytest.raises(tinker.BadRequestError, match=message):
                sampler.sample(prompt, num_samples=1, sampling_params=params).result()
        training = service.create_lora_training_client(base_model=vl_server.model, rank=4).result()
        wrong = caption_datum(data, [40, 41, 2])
        wrong.model_input.chunks[1] = types.ImageChunk(data=b"junk", format="png", expected_tokens=n)
        with pytest.raises(tinker.BadRequestError, match="not a valid PNG"):
            training.forward_backward([wrong], "cross_entropy").result()
        # the server keeps serving, and the run survives its user's mistakes
        ok = sampler.sample(types.ModelInput(chunks=prompt_chunks(image_chunk(data))), 1, params).result()
        assert len(ok.sequences[0].tokens) == 2
        assert training.forward([caption_datum(data, [40, 41, 2])], "cross_entropy").result().metrics["loss:sum"] > 0
    finally:
        service.close("success").result()
