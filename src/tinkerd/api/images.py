"""Image chunks at the API edge: decoded, checked and measured here, so a bad image is a 400 and never reaches a worker.

A model input is text chunks (token ids) and image chunks. ``ModelInputBuilder`` lays them end to end: an image
becomes as many copies of the model's image token as its image processor makes of it (``domain.vision``), and the
image itself travels beside the tokens as an ``ImageInput`` (its file bytes, base64). Images are decoded with PIL
(the API never imports torch): the declared format must be the real one, the size must be non-zero and at most
``max_pixels`` (checked from the header, before the pixels are decoded), and the whole file must decode.

``ImageAssetPointerChunk`` names a file the server reads itself: an absolute local path, a ``file:`` URL or a
``data:`` URI. Remote URLs are refused: tinkerd does not fetch from the network. Paths are read only inside the image
root the server was started with (``--image-root``), after resolving symlinks and ``..``: without one, a pointer may
only be a ``data:`` URI, so an API key never lets its holder read the server's files.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import ImageInput
from tinkerd.domain.vision import VisionSpec, image_token_count

# Wire format name -> PIL's format name.
FORMATS = {"png": "PNG", "jpeg": "JPEG"}
MAX_IMAGE_FILE_BYTES = 64 * 1024 * 1024  # an image file a pointer chunk may name


@dataclass(frozen=True)
class ImageRules:
    """What a request's images are checked against: the served model's vision facts (None: a text-only model)."""

    model: str
    vision: VisionSpec | None
    max_pixels: int
    image_root: Path | None = None  # the directory pointer chunks may read files under (None: no files at all)


def decode_base64(value: str, where: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{where}: data is not valid base64") from None


def _measure(data: bytes, fmt: str, where: str, max_pixels: int) -> tuple[int, int]:
    """(width, height) of an image file that fully decodes as the declared format; InvalidRequestError otherwise."""
    if not data:
        raise InvalidRequestError(f"{where}: the image has no bytes")
    try:
        with Image.open(io.BytesIO(data), formats=tuple(FORMATS.values())) as image:
            actual = str(image.format or "?")
            if actual != FORMATS[fmt]:
                raise InvalidRequestError(f"{where}: format is {fmt!r} but the bytes are a {actual} image")
            width, height = image.size
            if width < 1 or height < 1:
                raise InvalidRequestError(f"{where}: the image is {width}x{height} pixels; it has no pixels")
            if width * height > max_pixels:
                raise InvalidRequestError(
                    f"{where}: the image is {width}x{height} = {width * height} pixels, more than this server's "
                    f"limit of {max_pixels} (--max-image-pixels)"
                )
            image.load()  # decode every pixel now: truncated or corrupt data fails here, not in a worker
    except InvalidRequestError:
        raise
    except Image.DecompressionBombError:
        message = f"{where}: the image has more pixels than the server's limit of {max_pixels}"
        raise InvalidRequestError(message) from None
    except UnidentifiedImageError:
        raise InvalidRequestError(f"{where}: the bytes are not a valid {fmt.upper()} image (bad header)") from None
    except Exception as exc:  # untrusted bytes: any decoder failure means a bad image, not a bug of ours
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidRequestError(f"{where}: the bytes are not a valid {fmt.upper()} image ({reason})") from None
    return width, height


def _inside_root(path: Path, root: Path | None, location: str, where: str) -> Path:
    """``path`` with symlinks and ``..`` resolved, if that lies under ``root``; InvalidRequestError otherwise."""
    if root is None:
        raise InvalidRequestError(
            f"{where}: location {location!r} is a file on the server, and this server reads no image files: send the "
            "bytes in an ImageChunk or a data: URI, or start tinkerd with --image-root DIR to allow files under DIR"
        )
    try:
        resolved, root = path.resolve(), root.resolve()
    except RuntimeError:  # a symlink loop (Python 3.11; later versions raise OSError, which the caller names)
        raise InvalidRequestError(f"{where}: location {location!r} is a symlink loop") from None
    if not resolved.is_relative_to(root):
        raise InvalidRequestError(
            f"{where}: location {location!r} is outside the image root {str(root)!r} (--image-root); this server "
            "reads image files under that directory only (symlinks and '..' resolved)"
        )
    return resolved


def read_location(location: str, where: str, root: Path | None = None) -> bytes:
    """The bytes an ``image_asset_pointer`` names: a base64 ``data:`` URI, or an absolute path or ``file:`` URL of a
    file under ``root`` (the resolved image root)."""
    if location.startswith("data:"):
        header, sep, payload = location.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InvalidRequestError(f"{where}: a data: location must be base64 ('data:image/png;base64,...')")
        return decode_base64(payload, where)
    parsed = urlparse(location)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InvalidRequestError(f"{where}: file URL {location!r} names another host; tinkerd reads local files")
        path = Path(unquote(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:
        raise InvalidRequestError(
            f"{where}: location {location!r} is a remote {parsed.scheme!r} URL; tinkerd does not fetch images from "
            "the network: send the bytes in an ImageChunk, or a path or file: URL on the server's machine"
        )
    else:
        path = Path(location)
    if not path.is_absolute():
        raise InvalidRequestError(f"{where}: location {location!r} must be an absolute path or a file: URL")
    try:
        path = _inside_root(path, root, location, where)  # the path read is the resolved one the check saw
        if not path.is_file():
            raise InvalidRequestError(f"{where}: no image file at {str(path)!r} on the server")
        size = path.stat().st_size
        if size > MAX_IMAGE_FILE_BYTES:
            raise InvalidRequestError(f"{where}: {str(path)!r} is {size} bytes, over {MAX_IMAGE_FILE_BYTES}")
        return path.read_bytes()
    except OSError as exc:
        raise InvalidRequestError(f"{where}: cannot read {str(path)!r} ({exc.strerror or exc})") from None


@dataclass
class ModelInputBuilder:
    """Text and image chunks, laid end to end into token ids and the images they hold."""

    where: str
    rules: ImageRules | None
    tokens: list[int] = field(default_factory=list)
    images: list[ImageInput] = field(default_factory=list)

    def text(self, tokens: Iterable[int], index: int) -> None:
        start = len(self.tokens)
        self.tokens.extend(tokens)
        vision = self.rules.vision if self.rules is not None else None
        if vision is not None:
            bad = next((t for t in self.tokens[start:] if t in vision.placeholders), None)
            if bad is not None:
                raise InvalidRequestError(
                    f"{self.where} chunk {index}: token {bad} is the model's image placeholder; send the image as an "
                    "image chunk instead"
                )

    def image(self, data: bytes, fmt: str | None, expected_tokens: int | None, index: int) -> None:
        where = f"{self.where} chunk {index}"
        rules = self.rules
        if rules is None or rules.vision is None:
            model = rules.model if rules is not None else "this model"
            raise InvalidRequestError(f"{where} is an image, but {model!r} is a text-only model")
        if fmt not in FORMATS:
            raise InvalidRequestError(f"{where}: format must be 'png' or 'jpeg', got {fmt!r}")
        width, height = _measure(data, fmt, where, rules.max_pixels)
        try:
            count = image_token_count(width, height, rules.vision)
        except InvalidRequestError as refused:
            raise InvalidRequestError(f"{where}: {refused}") from None
        if expected_tokens is not None and expected_tokens != count:
            raise InvalidRequestError(
                f"{where}: expected_tokens is {expected_tokens}, but the model's image processor makes {count} tokens "
                f"of this {width}x{height} image"
            )
        encoded = base64.b64encode(data).decode("ascii")
        offset = len(self.tokens)
        self.images.append(ImageInput(offset, count, fmt, encoded, width, height))
        self.tokens.extend([rules.vision.image_token_id] * count)

    def pointer(self, location: str | None, fmt: str | None, expected_tokens: int | None, index: int) -> None:
        where = f"{self.where} chunk {index}"
        if not location:
            raise InvalidRequestError(f"{where}: an image_asset_pointer needs a location")
        rules = self.rules
        if rules is None or rules.vision is None:  # refuse before reading anything: image() names the model
            self.image(b"", fmt, expected_tokens, index)
            return
        self.image(read_location(location, where, rules.image_root), fmt, expected_tokens, index)
