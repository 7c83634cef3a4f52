"""Image chunks at the API edge: token counts agree with the real image processor, and every bad image is a 400
naming the problem (checked without torch, before anything reaches a worker)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tests.engine.tiny_vlm import (
    IMAGE,
    VIDEO,
    VL_FAMILIES,
    image_bytes,
    png_header,
    processor_tokens,
    tiny_image_processor,
)
from tinkerd.api import schemas
from tinkerd.api.convert.model_input import model_input
from tinkerd.api.images import ImageRules, ModelInputBuilder
from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.vision import VisionSpec, image_token_count, vision_spec_of


def spec_of(family: str, tmp_path: Path) -> VisionSpec:
    """The spec the server reads from a model directory: the processor's own saved preprocessor_config.json."""
    import json

    tiny_image_processor(family).save_pretrained(tmp_path)
    preprocessor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    spec = vision_spec_of({"model_type": family, "image_token_id": IMAGE, "video_token_id": VIDEO}, preprocessor)
    assert spec is not None
    return spec


def rules(spec: VisionSpec | None, max_pixels: int = 4096 * 4096, image_root: Path | None = None) -> ImageRules:
    return ImageRules(model="tiny-vl", vision=spec, max_pixels=max_pixels, image_root=image_root)


@pytest.mark.parametrize("family", VL_FAMILIES)
def test_the_token_count_is_the_image_processors(family: str, tmp_path: Path) -> None:
    spec = spec_of(family, tmp_path)
    sizes = [(1, 1), (5, 300), (28, 28), (64, 48), (100, 33), (57, 200), (300, 299), (640, 480), (31, 1200)]
    counts = set()
    for width, height in sizes:
        data = image_bytes(width, height)
        counts.add(image_token_count(width, height, spec))
        assert image_token_count(width, height, spec) == processor_tokens(family, data), (width, height)
    assert len(counts) > 3  # the sizes reach both bounds and between


def test_a_hub_style_preprocessor_config_with_min_and_max_pixels() -> None:
    config = {"model_type": "qwen2_5_vl", "image_token_id": 151655, "video_token_id": 151656}
    spec = vision_spec_of(config, {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2})
    assert spec == VisionSpec(151655, 14, 2, 3136, 12845056, 151656)
    assert vision_spec_of({"model_type": "llama"}, {"patch_size": 14}) is None
    assert vision_spec_of(config, {}) is None  # no image processor: images are refused


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_an_image_becomes_its_placeholder_tokens_where_its_chunk_is(fmt: str, tmp_path: Path) -> None:
    spec = spec_of("qwen2_5_vl", tmp_path)
    data = image_bytes(64, 48, fmt=fmt.upper())
    chunks = [
        schemas.Chunk(tokens=[5, 120]),
        schemas.Chunk(type="image", data=base64.b64encode(data).decode(), format=fmt, expected_tokens=4),
        schemas.Chunk(tokens=[121, 7]),
    ]
    built = model_input("prompt", chunks, rules(spec))
    assert built.tokens == [5, 120, IMAGE, IMAGE, IMAGE, IMAGE, 121, 7]
    (image,) = built.images
    assert (image.offset, image.tokens, image.format, image.width, image.height) == (2, 4, fmt, 64, 48)
    assert base64.b64decode(image.data) == data


def test_a_pointer_to_a_local_file_reads_it(tmp_path: Path) -> None:
    spec = spec_of("qwen3_vl", tmp_path)
    path = tmp_path / "cat.png"
    path.write_bytes(image_bytes(64, 64))
    inline = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    for location in (str(path), path.as_uri(), f"{tmp_path}/sub/../cat.png", inline):
        built = ModelInputBuilder("prompt", rules(spec, image_root=tmp_path))
        built.pointer(location, "png", None, 0)
        assert built.images[0].data == base64.b64encode(path.read_bytes()).decode()


def test_a_pointer_reads_no_file_outside_the_image_root(tmp_path: Path) -> None:
    spec = spec_of("qwen3_vl", tmp_path / "model")
    root, outside = tmp_path / "images", tmp_path / "private"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(image_bytes(64, 64))
    (root / "cat.png").write_bytes(image_bytes(64, 64))
    (root / "escape.png").symlink_to(outside / "secret.png")
    (root / "door").symlink_to(outside, target_is_directory=True)
    (root / "loop.png").symlink_to(root / "loop.png")
    (tmp_path / "shortcut").symlink_to(root, target_is_directory=True)
    refusals = [
        (str(outside / "secret.png"), "is outside the image root"),
        (f"{root}/../private/secret.png", "is outside the image root"),
        (str(root / "escape.png"), "is outside the image root"),
        (str(root / "door" / "secret.png"), "is outside the image root"),
        ((outside / "missing.png").as_uri(), "is outside the image root"),  # no hint of what exists outside
        (str(root / "loop.png"), "loop"),
        (str(root / "missing.png"), "no image file at"),
    ]
    for location, message in refusals:
        built = ModelInputBuilder("prompt", rules(spec, image_root=root))
        with pytest.raises(InvalidRequestError, match="prompt chunk 1") as refused:
            built.pointer(location, "png", None, 1)
        assert message in str(refused.value), (location, str(refused.value))
        if "outside" in message:
            assert f"{str(root)!r} (--image-root)" in str(refused.value)
    # A symlink to the root, and a root given through a symlink, both lead inside.
    through_links = [(root, tmp_path / "shortcut" / "cat.png"), (tmp_path / "shortcut", root / "cat.png")]
    for root_given, location in through_links:
        built = ModelInputBuilder("prompt", rules(spec, image_root=root_given))
        built.pointer(str(location), "png", None, 0)
        assert len(built.images) == 1
    # Without a root, a pointer reads no file at all (a data: URI carries its bytes).
    with pytest.raises(InvalidRequestError, match=r"this server reads no image files.*--image-root DIR"):
        ModelInputBuilder("prompt", rules(spec)).pointer(str(root / "cat.png"), "png", None, 0)


BAD = [
    ("corrupt bytes", b"\x89PNG\r\n\x1a\nnot really", "png", "not a valid PNG"),
    ("random bytes", b"hello world, no image here", "png", "not a valid PNG"),
    ("empty", b"", "png", "no bytes"),
    ("wrong format", image_bytes(32, 32, fmt="JPEG"), "png", "format is 'png' but the bytes are a JPEG"),
    ("unknown format", image_bytes(32, 32), "gif", "format must be 'png' or 'jpeg'"),
    ("truncated", image_bytes(64, 64, fmt="JPEG")[:300], "jpeg", "not a valid JPEG"),
    ("zero size", png_header(0, 10), "png", "not a valid PNG image (bad header)"),
    ("huge", png_header(5000, 5000), "png", "limit of 16777216"),
    ("very huge", png_header(100_000, 100_000), "png", "limit of 16777216"),
    ("aspect ratio", image_bytes(1000, 2), "png", "aspect ratio"),
]


@pytest.mark.parametrize(("name", "data", "fmt", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_images_are_refused_naming_the_problem(
    name: str, data: bytes, fmt: str, message: str, tmp_path: Path
) -> None:
    built = ModelInputBuilder("data[0].model_input", rules(spec_of("qwen2_5_vl", tmp_path)))
    with pytest.raises(InvalidRequestError, match=r"data\[0\]\.model_input chunk 3") as refused:
        built.image(data, fmt, None, 3)
    assert message in str(refused.value)


def test_expected_tokens_that_disagree_name_both_numbers(tmp_path: Path) -> None:
    built = ModelInputBuilder("prompt", rules(spec_of("qwen2_5_vl", tmp_path)))
    with pytest.raises(InvalidRequestError, match="expected_tokens is 7, but the model's image processor makes 4"):
        built.image(image_bytes(64, 48), "png", 7, 1)


def test_other_refusals(tmp_path: Path) -> None:
    spec = spec_of("qwen2_5_vl", tmp_path)
    text_only = ModelInputBuilder("prompt", rules(None))
    with pytest.raises(InvalidRequestError, match="'tiny-vl' is a text-only model"):
        text_only.image(image_bytes(8, 8), "png", None, 0)
    with pytest.raises(InvalidRequestError, match="'tiny-vl' is a text-only model"):
        text_only.pointer(str(tmp_path / "anything.png"), "png", None, 0)
    with pytest.raises(InvalidRequestError, match="image placeholder"):
        ModelInputBuilder("prompt", rules(spec)).text([5, IMAGE, 6], 0)
    with pytest.raises(InvalidRequestError, match="image placeholder"):
        ModelInputBuilder("prompt", rules(spec)).text([VIDEO], 0)
    small = ModelInputBuilder("prompt", rules(spec, max_pixels=100))
    with pytest.raises(InvalidRequestError, match="12x12 = 144 pixels, more than this server's limit of 100"):
        small.image(image_bytes(12, 12), "png", None, 0)
    pointer = ModelInputBuilder("prompt", rules(spec, image_root=tmp_path))
    for location, message in [
        ("https://example.com/cat.png", "remote 'https' URL; tinkerd does not fetch"),
        ("s3://bucket/cat.png", "remote 's3' URL"),
        ("file://otherhost/cat.png", "names another host"),
        ("cat.png", "must be an absolute path"),
        (str(tmp_path / "missing.png"), "no image file at"),
        (str(tmp_path), "no image file at"),
        ("data:image/png,rawbytes", "must be base64"),
        ("", "needs a location"),
    ]:
        with pytest.raises(InvalidRequestError, match="prompt chunk 2") as refused:
            pointer.pointer(location, "png", None, 2)
        assert message in str(refused.value), location
    assert pointer.tokens == [] and pointer.images == []


def test_the_loops_front_end_takes_image_chunks_in_training(tmp_path: Path) -> None:
    from tinkerd.api.context import ServedModelInfo
    from tinkerd.api.loops import convert as loops_convert
    from tinkerd.api.loops import schemas as loops_schemas

    spec = spec_of("qwen2_5_vl", tmp_path)
    picture = base64.b64encode(image_bytes(64, 48)).decode()
    chunks = [
        {"type": "encoded_text", "tokens": [5, 120]},
        {"type": "image", "data": picture, "format": "png", "expected_tokens": 4},
        {"type": "encoded_text", "tokens": [121]},
    ]
    targets = {"data": [120] + [IMAGE] * 4 + [121, 2], "dtype": "int64", "shape": [7]}
    data = [{"model_input": {"chunks": chunks}, "loss_fn_inputs": {"target_tokens": targets}}]
    body = loops_schemas.ForwardBackwardRequest.model_validate({"data": data, "loss_fn": "cross_entropy", "seq_id": 2})
    model = ServedModelInfo(name="vl", tokenizer_id=None, arch="Qwen2_5_VL", vocab_size=128, max_context_length=512)
    request = loops_convert.forward_backward(body, "s:train:0", model, backward=True, rules=rules(spec))
    (datum,) = request.datums
    assert datum.tokens == [5, 120, IMAGE, IMAGE, IMAGE, IMAGE, 121]
    assert [(i.offset, i.tokens) for i in datum.images] == [(2, 4)]
