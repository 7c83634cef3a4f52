"""Wire model inputs -> token ids and images: chunks laid end to end, from JSON or from protobuf.

A text chunk is its token ids; an image chunk is its placeholder tokens plus the image (``api.images`` checks and
counts them against the model's rules). Shared by forward/backward bodies and sampling prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

from tinkerd.api import schemas
from tinkerd.api.convert.tensors import tokens_from_proto
from tinkerd.api.images import ImageRules, ModelInputBuilder, decode_base64
from tinkerd.api.proto import tinker_public_pb2 as pb
from tinkerd.domain.errors import InvalidRequestError


def model_input(where: str, chunks: list[schemas.Chunk], rules: ImageRules | None) -> ModelInputBuilder:
    """JSON chunks laid end to end: token ids (an image is its placeholder tokens) and the images they hold."""
    built = ModelInputBuilder(where, rules)
    for index, chunk in enumerate(chunks):
        if chunk.type == "encoded_text":
            built.text(chunk.tokens or (), index)
        elif chunk.type == "image":
            data = decode_base64(chunk.data or "", f"{where} chunk {index}")
            built.image(data, chunk.format, chunk.expected_tokens, index)
        elif chunk.type == "image_asset_pointer":
            built.pointer(chunk.location, chunk.format, chunk.expected_tokens, index)
        else:
            raise InvalidRequestError(f"{where} chunk {index} is {chunk.type!r}; tinkerd takes text and image chunks")
    return built


def text_chunks(where: str, chunks: list[schemas.Chunk]) -> list[int]:
    """Token ids of a model input that must be text only (image chunks are refused)."""
    return model_input(where, chunks, None).tokens


def model_input_from_proto(where: str, chunks: Sequence[pb.Chunk], rules: ImageRules | None) -> ModelInputBuilder:
    """Protobuf chunks laid end to end, as ``model_input`` lays JSON ones."""
    built = ModelInputBuilder(where, rules)
    for index, chunk in enumerate(chunks):
        which = chunk.WhichOneof("chunk")
        if which == "encoded_text":
            built.text(tokens_from_proto(chunk.encoded_text.tokens), index)
        elif which == "image":
            image = chunk.image
            if image.HasField("override_dimensions"):
                raise InvalidRequestError(f"{where} chunk {index}: override_dimensions is not supported")
            expected = image.expected_tokens if image.HasField("expected_tokens") else None
            built.image(image.data, image.format, expected, index)
        else:
            raise InvalidRequestError(f"{where} chunk {index} is {which!r}; tinkerd takes text and image chunks")
    return built
