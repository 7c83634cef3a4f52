"""Provenance spans as the SDK encodes them: decoded into the domain datum, and malformed ones rejected by name."""

from __future__ import annotations

from typing import Any

import pytest
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from tinkerd.api.convert.forward_backward import forward_backward_from_proto, parse_forward_backward_proto
from tinkerd.api.proto import tinker_public_pb2 as pb
from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import ProvenanceSpan
from tinkerd.domain.provenance import sampled_positions

PROMPT = [1, 17, 300, 4000]
SAMPLED = [42, 7, 2]


def _rl_datum() -> types.Datum:
    """A prompt and a sampled completion, shifted by one, as the cookbook's RL data builds it."""
    tokens = PROMPT + SAMPLED
    n = len(tokens) - 1
    inputs: dict[str, Any] = {  # plain lists: the SDK types them by key
        "target_tokens": tokens[1:],
        "logprobs": [0.0] * n,
        "advantages": [0.0] * (len(PROMPT) - 1) + [0.5] * len(SAMPLED),
    }
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def _wire(datum: types.Datum) -> bytes:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[datum], loss_fn="stable_reinforce"),
        model_id="session-1:train:0",
        seq_id=1,
    )
    return forward_backward_request_to_proto(request).SerializeToString()


def _decode(body: bytes) -> Any:
    return forward_backward_from_proto(parse_forward_backward_proto(body)).request.datums[0]


def test_spans_from_the_sdk_arrive_in_the_domain_datum() -> None:
    datum = _rl_datum().with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id="req-1:0", length=len(PROMPT)),
            types.SampledProvenanceSpan(sequence_id="req-1:0", length=len(SAMPLED) - 1),
        ],
        loss_fn_inputs=[
            types.PromptProvenanceSpan(sequence_id="req-1:0", offset=1, length=len(PROMPT) - 1),
            types.SampledProvenanceSpan(sequence_id="req-1:0", length=len(SAMPLED)),
        ],
    )
    decoded = _decode(_wire(datum))
    assert decoded.model_input_spans == [
        ProvenanceSpan(kind="prompt", sequence_id="req-1:0", offset=0, length=4),
        ProvenanceSpan(kind="sampled", sequence_id="req-1:0", offset=0, length=2),
    ]
    assert decoded.loss_fn_input_spans[0] == ProvenanceSpan(kind="prompt", sequence_id="req-1:0", offset=1, length=3)
    assert sampled_positions(decoded.loss_fn_input_spans) == [False, False, False, True, True, True]


def test_a_datum_without_spans_has_no_provenance() -> None:
    decoded = _decode(_wire(_rl_datum()))
    assert decoded.model_input_spans is None and decoded.loss_fn_input_spans is None


def _with_spans(model_input: list[tuple[str, int, int]], targets: list[tuple[str, int, int]]) -> bytes:
    """A request whose one datum carries hand-written spans (kind, offset, length), bypassing the SDK's checks."""
    message = pb.ForwardBackwardRequest.FromString(_wire(_rl_datum()))
    datum = message.data[0]
    for spans, field in ((model_input, datum.model_input_spans), (targets, datum.loss_fn_input_spans)):
        for kind, offset, length in spans:
            run = field.add().prompt_tokens if kind == "prompt" else field.add().sampled_tokens
            run.sequence_id, run.offset, run.length = ("req-1:0" if kind != "no-id" else ""), offset, length
    return message.SerializeToString()


@pytest.mark.parametrize(
    ("model_input", "targets", "message"),
    [
        ([("prompt", 0, 6)], [], "loss_fn_input_spans cover 0 positions"),  # proto3: empty is absent
        ([("prompt", 0, 4)], [("sampled", 0, 6)], "model_input_spans cover 4 positions but model_input has 6"),
        ([("prompt", 0, 6)], [("sampled", 0, 5)], "loss_fn_input_spans cover 5 positions but target_tokens has 6"),
        ([("prompt", -1, 6)], [("sampled", 0, 6)], "offset -1"),
        ([("prompt", 0, 6)], [("no-id", 0, 6)], "empty sequence_id"),
    ],
)
def test_malformed_provenance_is_rejected_by_name(
    model_input: list[tuple[str, int, int]], targets: list[tuple[str, int, int]], message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        _decode(_with_spans(model_input, targets))
