"""Protobuf /forward_backward bodies: exactly what SDK 0.38 sends (its own encoder, via tests/api), and hostile ones.

The hostile ones are built field by field on our copy of the schema (tinkerd.api.proto), which matches the SDK's on
the wire, so they can hold what the SDK's own validation would never let through.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import strategies as st

from tests.api.conftest import fwdbwd_proto
from tests.hardening.strategies import EDGE_INTS, hostile_text
from tests.worker.harness import VOCAB
from tinkerd.api.proto import tinker_public_pb2 as pb

LOSSES = ["cross_entropy", "cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce"]
INPUT_NAMES = [
    "target_tokens", "weights", "logprobs", "advantages", "clip_low_threshold", "clip_high_threshold",
    "sequence_ratio_mask", "mask",
]  # fmt: skip


def fwdbwd_bytes(model_id: str, seq_id: int, tokens: list[int]) -> bytes:
    """A valid cross-entropy forward_backward, encoded by the SDK's own encoder."""
    return fwdbwd_proto(model_id, seq_id, tokens)


# -- hostile pieces ------------------------------------------------------------------------------------------------

token_ids = st.integers(0, VOCAB - 1) | st.sampled_from([-1, VOCAB, VOCAB + 1, 2**31 - 1, -(2**31)])
lengths = st.integers(1, 12) | st.sampled_from([0, 255, 256, 257, 300])
# True about one time in six; False is hypothesis's simplest choice, so shrinking moves towards the valid case.
_rarely = st.integers(0, 5).map(lambda n: n == 5)
floats32 = st.floats(-5, 5, width=32) | st.sampled_from([math.nan, math.inf, -math.inf, 3e38, -3e38, 0.0])


@st.composite
def token_lists(draw: st.DrawFn) -> list[int]:
    """Usually valid ids (short or at the context limit), sometimes one bad id somewhere."""
    n = draw(lengths)
    tokens = draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n))
    if tokens and draw(_rarely):
        tokens[draw(st.integers(0, len(tokens) - 1))] = draw(token_ids)
    return tokens


def _int32_bytes(values: list[int]) -> bytes:
    return np.asarray(values, dtype=np.int64).astype("<i4").tobytes()


def _dense(values: list[int] | list[float], dtype: int) -> pb.Tensor:
    tensor = pb.Tensor(shape=[len(values)])
    tensor.dtype = dtype  # type: ignore[assignment]  # an int: an unknown enum value is a test case too
    if dtype == pb.DTYPE_FLOAT32:
        tensor.dense = np.asarray(values, dtype="<f4").tobytes()
    else:
        wire = "<i8" if dtype == pb.DTYPE_INT64 else "<i4"
        tensor.dense = np.asarray(values, dtype=np.int64).astype(wire).tobytes()
    return tensor


def valid_inputs(loss_fn: str, tokens: list[int]) -> dict[str, pb.Tensor]:
    """What loss ``loss_fn`` needs for a datum of these tokens, well formed."""
    n = len(tokens)
    inputs = {"target_tokens": _dense([*tokens[1:], 0][:n], pb.DTYPE_INT64)}
    if loss_fn == "cross_entropy":
        inputs["weights"] = _dense([1.0] * n, pb.DTYPE_FLOAT32)
    else:
        inputs["logprobs"] = _dense([-1.0] * n, pb.DTYPE_FLOAT32)
        inputs["advantages"] = _dense([0.5] * n, pb.DTYPE_FLOAT32)
    if loss_fn == "gspo":
        inputs["sequence_ratio_mask"] = _dense([1.0] * n, pb.DTYPE_FLOAT32)
    return inputs


@st.composite
def broken_tensor(draw: st.DrawFn, tensor: pb.Tensor, n: int) -> pb.Tensor:
    """``tensor`` wrong in one way: shape, dtype, byte count, values, or a garbled sparse encoding."""
    broken = pb.Tensor()
    broken.CopyFrom(tensor)
    how = draw(st.sampled_from(["shape", "dtype", "bytes", "values", "count", "sparse"]))
    if how == "shape":
        del broken.shape[:]
        broken.shape.extend(draw(st.lists(st.sampled_from([-1, 0, 1, 2, n + 1, 2**40]), max_size=3)))
    elif how == "dtype":
        broken.dtype = draw(st.sampled_from([pb.DTYPE_UNSPECIFIED, pb.DTYPE_INT32, pb.DTYPE_BFLOAT16, 99]))  # type: ignore[assignment]
    elif how == "bytes":
        broken.dense = tensor.dense[:-1] if tensor.dense else b"\x01"
    elif how == "values":
        count = len(tensor.dense) // (8 if tensor.dtype == pb.DTYPE_INT64 else 4)
        if tensor.dtype == pb.DTYPE_FLOAT32:
            values: list[Any] = draw(st.lists(floats32, min_size=count, max_size=count))
        else:
            values = draw(st.lists(token_ids, min_size=count, max_size=count))
        broken.CopyFrom(_dense(values, tensor.dtype))
    elif how == "count":
        m = draw(st.integers(0, n + 3).filter(lambda m: m != n))
        broken.CopyFrom(_dense([0] * m if tensor.dtype == pb.DTYPE_INT64 else [0.0] * m, tensor.dtype))
    else:
        crow = draw(st.lists(st.sampled_from(EDGE_INTS[:12]) | st.integers(0, 4), max_size=4))
        col = draw(st.lists(st.integers(-2, 6), max_size=4))
        broken.sparse_csr.CopyFrom(
            pb.SparseCsr(
                values=tensor.dense,
                crow_indices=np.asarray([c % 2**63 for c in crow], dtype="<i8").tobytes(),
                col_indices=np.asarray(col, dtype="<i8").tobytes(),
            )
        )
    return broken


@st.composite
def datums(draw: st.DrawFn, loss_fn: str) -> pb.Datum:
    """A datum for ``loss_fn``; a third of the time with one thing wrong."""
    tokens = draw(token_lists())
    datum = pb.Datum()
    datum.model_input.add().encoded_text.tokens = _int32_bytes(tokens)
    inputs = valid_inputs(loss_fn, tokens)
    fault = draw(st.sampled_from(["none", "none", "none", "none", "tensor", "missing", "extra", "chunk"]))
    if fault == "tensor":
        name = draw(st.sampled_from(sorted(inputs)))
        inputs[name] = draw(broken_tensor(inputs[name], len(tokens)))
    elif fault == "missing":
        del inputs[draw(st.sampled_from(sorted(inputs)))]
    elif fault == "extra":
        name = draw(st.sampled_from(INPUT_NAMES))
        inputs[name] = _dense(draw(st.lists(floats32, min_size=len(tokens), max_size=len(tokens))), pb.DTYPE_FLOAT32)
    elif fault == "chunk":
        which = draw(st.sampled_from(["image", "odd_bytes", "empty"]))
        if which == "image":
            datum.model_input.add().image.data = b"\x89PNG"
        elif which == "odd_bytes":
            datum.model_input.add().encoded_text.tokens = b"\x01\x02\x03"  # 3 bytes: not int32s
        else:
            del datum.model_input[:]
    for name, tensor in inputs.items():
        datum.loss_fn_inputs[name].CopyFrom(tensor)
    return datum


@st.composite
def fwdbwd_messages(draw: st.DrawFn, model_id: str, seq_id: int) -> pb.ForwardBackwardRequest:
    loss_fn = draw(st.sampled_from(LOSSES))
    message = pb.ForwardBackwardRequest(
        model_id=model_id,
        seq_id=seq_id,
        loss_fn=draw(hostile_text) if draw(_rarely) else loss_fn,
        forward_only=draw(st.booleans()),
    )
    message.data.extend(draw(st.lists(datums(loss_fn), min_size=0 if draw(_rarely) else 1, max_size=3)))
    config: dict[str, Any] = {}
    if draw(_rarely):
        config = draw(
            st.dictionaries(
                st.sampled_from(["clip_low_threshold", "clip_high_threshold", "beta", "temperature", ""]),
                st.floats(allow_nan=True, allow_infinity=True) | hostile_text,
                max_size=3,
            )
        )
    for key, value in config.items():
        if isinstance(value, str):
            message.loss_fn_config_v2[key].text = value
        else:
            message.loss_fn_config[key] = value
            message.loss_fn_config_v2[key].number = value
    return message


@st.composite
def corrupted(draw: st.DrawFn, data: bytes) -> bytes:
    """The bytes of a valid message, cut short, bit-flipped or with junk appended."""
    how = draw(st.sampled_from(["truncate", "flip", "append"]))
    if how == "truncate" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "flip" and data:
        buffer = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            position = draw(st.integers(0, len(buffer) - 1))
            buffer[position] ^= 1 << draw(st.integers(0, 7))
        return bytes(buffer)
    return data + draw(st.binary(min_size=1, max_size=16))
