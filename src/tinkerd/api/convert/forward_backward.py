"""Wire /forward_backward and /forward bodies (JSON or protobuf) -> a ``ForwardBackward`` domain request.

Decoding and checking are two steps: a body is decoded (and its datums, loss inputs, provenance and loss settings
checked on their own) before its run is known; ``check_forward_backward`` then checks it against the run's model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from tinkerd.api import schemas
from tinkerd.api.context import ServedModelInfo
from tinkerd.api.convert.model_input import model_input, model_input_from_proto
from tinkerd.api.convert.tensors import array_from_json, array_from_proto, check_tokens
from tinkerd.api.images import ImageRules
from tinkerd.api.proto import tinker_public_pb2 as pb
from tinkerd.domain import ops
from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ids import validate_run_id
from tinkerd.domain.provenance import check_provenance
from tinkerd.domain.requests import ForwardBackward


@dataclass(frozen=True)
class ForwardBackwardCall:
    """A decoded /forward_backward or /forward body, not yet checked against its run."""

    model_id: str
    seq_id: int | None
    request: ForwardBackward

    @property
    def token_count(self) -> int:
        return sum(len(datum.tokens) for datum in self.request.datums)


def _loss_config(numbers: dict[str, float], texts: dict[str, str]) -> dict[str, float]:
    if texts:
        key = sorted(texts)[0]
        raise InvalidRequestError(f"loss_fn_config[{key!r}] is text; tinkerd only takes numeric loss settings")
    for key, value in numbers.items():
        if not math.isfinite(value):
            raise InvalidRequestError(f"loss_fn_config[{key!r}] must be a finite number, got {value}")
    return numbers


def forward_backward_from_json(
    body: schemas.ForwardBackwardInput,
    model_id: str,
    seq_id: int | None,
    *,
    backward: bool,
    rules: ImageRules | None = None,
) -> ForwardBackwardCall:
    datums: list[ops.Datum] = []
    for i, datum in enumerate(body.data):
        built = model_input(f"data[{i}].model_input", datum.model_input.chunks, rules)
        inputs = {name: array_from_json(name, td) for name, td in datum.loss_fn_inputs.items()}
        datums.append(ops.Datum(tokens=built.tokens, loss_fn_inputs=inputs, images=built.images))
    config = body.loss_fn_config or {}
    numbers = {k: float(v) for k, v in config.items() if not isinstance(v, str)}
    texts = {k: v for k, v in config.items() if isinstance(v, str)}
    request = ForwardBackward(
        run_id=validate_run_id(model_id),
        datums=datums,
        loss_fn=body.loss_fn,
        loss_fn_config=_loss_config(numbers, texts),
        backward=backward,
    )
    return ForwardBackwardCall(model_id=request.run_id, seq_id=seq_id, request=request)


def parse_forward_backward_proto(body: bytes) -> pb.ForwardBackwardRequest:
    """The message, checked only as far as naming its model: the rest is checked by `forward_backward_from_proto`
    once the caller knows the run (see routes.training on why the order matters)."""
    message = pb.ForwardBackwardRequest()
    try:
        message.ParseFromString(body)
    except DecodeError as error:
        raise InvalidRequestError(f"body is not a valid ForwardBackwardRequest protobuf: {error}") from None
    if not message.model_id:
        raise InvalidRequestError("model_id is required")
    validate_run_id(message.model_id)
    return message


def _spans_from_proto(spans: Sequence[pb.ProvenanceSpan], where: str) -> list[ops.ProvenanceSpan]:
    converted: list[ops.ProvenanceSpan] = []
    for i, span in enumerate(spans):
        which = span.WhichOneof("span")
        if which == "prompt_tokens":
            run, kind = span.prompt_tokens, "prompt"
        elif which == "sampled_tokens":
            run, kind = span.sampled_tokens, "sampled"
        else:
            raise InvalidRequestError(f"{where}[{i}] is neither a prompt nor a sampled provenance span")
        converted.append(
            ops.ProvenanceSpan(kind=kind, sequence_id=run.sequence_id, offset=run.offset, length=run.length)
        )
    return converted


def _provenance_from_proto(datum: pb.Datum, where: str) -> dict[str, list[ops.ProvenanceSpan] | None]:
    """Proto3 cannot tell an empty repeated field from an absent one: a datum with no spans at all has none."""
    if not datum.model_input_spans and not datum.loss_fn_input_spans:
        return {"model_input_spans": None, "loss_fn_input_spans": None}
    return {
        "model_input_spans": _spans_from_proto(datum.model_input_spans, f"{where}.model_input_spans"),
        "loss_fn_input_spans": _spans_from_proto(datum.loss_fn_input_spans, f"{where}.loss_fn_input_spans"),
    }


def forward_backward_from_proto(
    message: pb.ForwardBackwardRequest, rules: ImageRules | None = None
) -> ForwardBackwardCall:
    datums: list[ops.Datum] = []
    for i, datum in enumerate(message.data):
        built = model_input_from_proto(f"data[{i}].model_input", datum.model_input, rules)
        inputs = {name: array_from_proto(name, tensor) for name, tensor in datum.loss_fn_inputs.items()}
        provenance = _provenance_from_proto(datum, f"data[{i}]")
        converted = ops.Datum(tokens=built.tokens, loss_fn_inputs=inputs, images=built.images, **provenance)
        check_provenance(converted, f"data[{i}]")
        datums.append(converted)
    numbers = dict(message.loss_fn_config)
    texts: dict[str, str] = {}
    for key, value in message.loss_fn_config_v2.items():
        if value.WhichOneof("value") == "text":
            texts[key] = value.text
        elif value.WhichOneof("value") == "number":
            numbers[key] = value.number
    request = ForwardBackward(
        run_id=validate_run_id(message.model_id),
        datums=datums,
        loss_fn=message.loss_fn,
        loss_fn_config=_loss_config(numbers, texts),
        backward=not message.forward_only,
    )
    return ForwardBackwardCall(model_id=request.run_id, seq_id=message.seq_id, request=request)


def check_forward_backward(call: ForwardBackwardCall, model: ServedModelInfo) -> None:
    if not call.request.datums:
        raise InvalidRequestError("data is empty: forward_backward needs at least one datum")
    if not call.request.loss_fn:
        raise InvalidRequestError("loss_fn is required")
    for i, datum in enumerate(call.request.datums):
        check_tokens(datum.tokens, f"data[{i}].model_input", model.vocab_size, model.max_context_length)
