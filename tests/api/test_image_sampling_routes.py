"""Images through the sampling routes in-process (the real app and ledger, the fake worker) on a tiny Qwen2.5-VL
whose image processor is the real one: the Loops ``/sample`` with ``model_input_chunks`` as the Loops SDK sends
them, bad images there answered 400 naming the problem, and the Tinker ``asample`` reading a pointer chunk's file
only under ``--image-root``."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from tests.api.conftest import SERVED, Api, MakeApi
from tests.api.test_loops_routes import Loops
from tests.engine.tiny_vlm import IMAGE, VIDEO, image_bytes, processor_tokens, tiny_image_processor
from tinkerd.api import ServedModelInfo
from tinkerd.domain import codec
from tinkerd.domain.requests import Sample
from tinkerd.domain.vision import vision_spec_of

VL = "tiny/vl"
START, END = 120, 121  # <|vision_start|>, <|vision_end|> of the tiny vocabulary
FINAL = "06"  # x-baseten-error-source of an answer the Loops SDK must not retry


def vl_model(tmp_path: Path) -> ServedModelInfo:
    """A tiny Qwen2.5-VL as the API knows it: its preprocessor config as the real image processor saves it."""
    tiny_image_processor("qwen2_5_vl").save_pretrained(tmp_path / "vl")
    preprocessor = json.loads((tmp_path / "vl" / "preprocessor_config.json").read_text())
    config = {"model_type": "qwen2_5_vl", "image_token_id": IMAGE, "video_token_id": VIDEO}
    return ServedModelInfo(
        name=VL, tokenizer_id=None, arch="Qwen2_5_VLForConditionalGeneration", vocab_size=128,
        max_context_length=512, eos_token_ids=(2,), vision=vision_spec_of(config, preprocessor),
    )  # fmt: skip


@pytest.fixture
def vl_api(make_api: MakeApi, tmp_path: Path) -> Api:
    """A text model and the tiny VL; image files readable under ``tmp_path / "images"``."""
    (tmp_path / "images").mkdir()
    return make_api([*SERVED, vl_model(tmp_path)], image_root=(tmp_path / "images").resolve())


def _loops_sampler(loops: Loops, model: str = VL) -> str:
    session = loops.ok("/v1/loops/sessions")["session"]["id"]
    sampler = loops.ok("/v1/loops/samplers", {"session_id": session, "base_model": model})["sampler"]
    return sampler["base_url"].removeprefix("http://testserver")


def _chunks(data: bytes, expected: int, fmt: str = "png") -> list[dict[str, Any]]:
    """As the Loops SDK serialises an ImageChunk prompt: standard base64, between text chunks."""
    image = {"type": "image", "data": base64.b64encode(data).decode(), "format": fmt, "expected_tokens": expected}
    return [{"type": "encoded_text", "tokens": [1, START]}, image, {"type": "encoded_text", "tokens": [END, 10]}]


def _sample_body(chunks: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The SDK's body for a prompt with an image: ``prompt`` empty, the chunks, ``return_token_ids``."""
    body = {"prompt": [], "n": 2, "temperature": 1.0, "top_p": 1.0, "logprobs": 0, "return_tokens_as_token_ids": True}
    return {**body, "model_input_chunks": chunks, "return_token_ids": True, "max_tokens": 2, "model": VL, **extra}


def test_a_loops_sample_lays_an_image_out_as_the_tinker_api_does(vl_api: Api) -> None:
    loops = Loops(vl_api)
    base = _loops_sampler(loops)
    data = image_bytes(64, 48)
    n = processor_tokens("qwen2_5_vl", data)
    response = loops.post(f"{base}/sample", _sample_body(_chunks(data, n), prompt_logprobs=0))
    assert response.status_code == 202, response.text
    choices = loops.result(base, response.json()["operation_id"])["result"]["choices"]

    expanded = [1, START, *[IMAGE] * n, END, 10]
    assert n == 4 and [c["prompt_token_ids"] for c in choices] == [expanded, expanded]
    assert [c["token_ids"] for c in choices] == [[7, 8], [7, 9]]
    assert len(choices[0]["prompt_logprobs"]) == len(expanded)  # aligned with the expanded prompt the SDK reads
    (future,) = [f for f in vl_api.worker.executed if f.kind == "sample"]
    request = codec.decode(future.payload or b"")
    assert isinstance(request, Sample) and request.prompt == expanded
    (image,) = request.images
    assert (image.offset, image.tokens, image.width, image.height) == (2, n, 64, 48)
    assert base64.b64decode(image.data) == data

    body = _sample_body(_chunks(data, n))
    del body["model"]  # a dedicated or local client: the completion comes in the answer itself
    direct = loops.post(f"{base}/sample", body)
    assert direct.status_code == 200 and direct.json()["choices"][0]["prompt_token_ids"] == expanded

    text = loops.post(f"{base}/sample", {"prompt": [1, 5, 6], "max_tokens": 2, "model": VL})  # text, as before
    (choice, *_) = loops.result(base, text.json()["operation_id"])["result"]["choices"]
    assert "prompt_token_ids" not in choice and choice["token_ids"] == [7, 8]


def test_bad_images_in_a_loops_sample_are_final_400s_naming_the_problem(vl_api: Api) -> None:
    loops = Loops(vl_api)
    base = _loops_sampler(loops)
    data = image_bytes(64, 48)
    jpeg = image_bytes(64, 48, fmt="JPEG")
    pointer = {"type": "image_asset_pointer", "format": "png", "location": "/etc/passwd"}
    cases = [
        (_sample_body(_chunks(b"\x89PNG\r\n\x1a\n not really", 4)), "model_input_chunks chunk 1: the bytes are not"),
        (_sample_body(_chunks(jpeg, 4)), "format is 'png' but the bytes are a JPEG"),
        (_sample_body(_chunks(data, 7)), "expected_tokens is 7, but the model's image processor makes 4 tokens"),
        (_sample_body([{"type": "image", "data": "%%%", "format": "png"}]), "chunk 0: data is not valid base64"),
        (_sample_body([pointer]), "chunk 0 is 'image_asset_pointer'; tinkerd takes text and image chunks"),
        (_sample_body([{"type": "encoded_text", "tokens": [IMAGE]}]), "the model's image placeholder"),
        (_sample_body(_chunks(data, 4), prompt=[1, 2]), "as prompt or as model_input_chunks, not both"),
        (_sample_body(_chunks(data, 4), max_tokens=510), "prompt (8 tokens) + max_tokens (510)"),
        (_sample_body([{"type": "image", "data": 5}]), "model_input_chunks.0.data"),
    ]
    for body, message in cases:
        refused = loops.post(f"{base}/sample", body)
        assert refused.status_code == 400 and message in refused.json()["detail"], (message, refused.text)
        assert refused.headers["x-baseten-error-source"] == FINAL
    text_base = _loops_sampler(loops, SERVED[0].name)
    refused = loops.post(f"{text_base}/sample", _sample_body(_chunks(data, 4)))
    assert refused.status_code == 400 and "'tiny/model' is a text-only model" in refused.json()["detail"]
    assert not [f for f in vl_api.worker.executed if f.kind == "sample"]  # nothing reached the worker


def _asample(api: Api, location: str) -> Any:
    session = api.session()
    body = {"session_id": session, "sampling_session_seq_id": 0, "type": "create_sampling_session", "base_model": VL}
    sampler_id = api.ok("create_sampling_session", body)["sampling_session_id"]
    pointer = {"type": "image_asset_pointer", "format": "png", "location": location}
    chunks = [{"type": "encoded_text", "tokens": [1, START]}, pointer, {"type": "encoded_text", "tokens": [END]}]
    sample = {
        "num_samples": 1, "prompt": {"chunks": chunks}, "sampling_params": {"max_tokens": 2},
        "sampling_session_id": sampler_id, "seq_id": 0, "type": "sample",
    }  # fmt: skip
    return api.post("asample", sample)


def test_a_pointer_chunk_reads_files_under_the_image_root_only(vl_api: Api, tmp_path: Path) -> None:
    root = (tmp_path / "images").resolve()
    (root / "cat.png").write_bytes(image_bytes(64, 48))
    (tmp_path / "secret.png").write_bytes(image_bytes(64, 48))
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    assert _asample(vl_api, str(root / "cat.png")).status_code == 200
    assert _asample(vl_api, (root / "cat.png").as_uri()).status_code == 200
    for outside in (str(tmp_path / "secret.png"), f"{root}/../secret.png", str(root / "link.png"), "/etc/passwd"):
        refused = _asample(vl_api, outside)
        assert refused.status_code == 400, outside
        assert f"is outside the image root '{root}' (--image-root)" in refused.json()["detail"], outside


def test_without_an_image_root_pointer_chunks_read_no_files(make_api: MakeApi, tmp_path: Path) -> None:
    no_root = make_api([vl_model(tmp_path)])
    path = tmp_path / "cat.png"
    path.write_bytes(image_bytes(64, 48))
    refused = _asample(no_root, str(path))
    assert refused.status_code == 400 and "this server reads no image files" in refused.json()["detail"]
    assert "--image-root DIR" in refused.json()["detail"]
    inline = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    assert _asample(no_root, inline).status_code == 200  # a data: URI carries its bytes: no file is read
