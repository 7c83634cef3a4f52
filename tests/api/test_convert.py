"""The conversion module on its own: tensors, stop rules, and results the SDK's own decoders read back."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from tinker import types
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from tests.api.conftest import SERVED
from tinkerd.api import schemas
from tinkerd.api.convert import sampling as convert
from tinkerd.api.convert.results import forward_result_proto, result_json, sample_result_proto
from tinkerd.api.convert.tensors import array_from_json, array_from_proto
from tinkerd.api.proto import tinker_public_pb2 as pb
from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import ArrayData, ForwardResult, SampledSequence, SampleResult
from tinkerd.domain.records import RequestKind, Sampler, utc_now
from tinkerd.domain.requests import Sample


def _sparse_sdk_tensor() -> types.TensorData:
    import torch

    dense = torch.zeros(3, 4, dtype=torch.int64)
    dense[1, 2] = 7
    return types.TensorData.from_torch_sparse(dense)


def test_sparse_csr_inputs_are_densified_from_json_and_proto() -> None:
    sdk = _sparse_sdk_tensor()
    assert sdk.sparse_crow_indices is not None  # the SDK did choose CSR for this mostly-zero tensor
    wire = {
        "data": np.asarray(sdk.data).tolist(), "dtype": sdk.dtype, "shape": sdk.shape,
        "sparse_crow_indices": sdk.sparse_crow_indices, "sparse_col_indices": sdk.sparse_col_indices,
    }  # fmt: skip
    from_json = array_from_json("target_tokens", schemas.TensorData.model_validate(wire))
    expected = [0] * 12
    expected[6] = 7
    assert (from_json.values, from_json.shape, from_json.dtype) == (expected, (3, 4), "int64")
    message = pb.Tensor(dtype=pb.DTYPE_INT64, shape=[3, 4])
    message.sparse_csr.values = np.array([7], dtype="<i8").tobytes()
    message.sparse_csr.crow_indices = np.array([0, 0, 1, 1], dtype="<i8").tobytes()
    message.sparse_csr.col_indices = np.array([2], dtype="<i8").tobytes()
    assert array_from_proto("target_tokens", message) == from_json


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"data": [1, 2, 3], "dtype": "int64", "shape": [2]}, "3 values but shape"),
        ({"data": [1.0, float("nan")], "dtype": "float32"}, "NaN"),
        (
            {"data": [1], "dtype": "int64", "shape": [1, 1], "sparse_crow_indices": [0, 1], "sparse_col_indices": [3]},
            "outside",
        ),
    ],
)
def test_bad_tensors_name_the_input(tensor: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message) as raised:
        array_from_json("weights", schemas.TensorData.model_validate(tensor))
    assert "weights" in str(raised.value)


def test_proto_tensor_byte_counts_are_checked() -> None:
    message = pb.Tensor(dtype=pb.DTYPE_FLOAT32, dense=b"\x00\x00\x00")
    with pytest.raises(InvalidRequestError, match="whole number"):
        array_from_proto("weights", message)


def _sample(stop: Any) -> Sample:
    sampler = Sampler(id="s:sample:0", session_id="s", owner="local", base_model=SERVED[0].name, created_at=utc_now())
    body = schemas.SampleRequest.model_validate(
        {"prompt": {"chunks": [{"tokens": [1, 2]}]}, "sampling_params": {"max_tokens": 4, "stop": stop}}
    )
    return convert.sample(body, sampler, SERVED[0])


def test_stop_rules() -> None:
    eos = SERVED[0].eos_token_ids
    assert (_sample(None).params.stop_strings, _sample(None).params.stop_token_ids) == ((), eos)
    assert (_sample("\n").params.stop_strings, _sample("\n").params.stop_token_ids) == (("\n",), eos)
    assert (_sample([]).params.stop_strings, _sample([]).params.stop_token_ids) == ((), ())
    assert _sample([13, 2]).params.stop_token_ids == (13, 2)
    assert _sample(["a", "b"]).params.stop_strings == ("a", "b")


def test_forward_result_proto_reads_back_with_the_sdk() -> None:
    result = ForwardResult(
        loss_fn_outputs=[
            {
                "logprobs": ArrayData.of_floats([-1.0, -2.0]),
                "ids": ArrayData(values=[1, 2, 3, 4], shape=(2, 2), dtype="int64"),
            },
            {"logprobs": ArrayData.of_floats([-3.0]), "ids": ArrayData(values=[5, 6], shape=(1, 2), dtype="int64")},
        ],
        metrics={"loss:sum": 6.0, "tokens:sum": 3.0},
    )
    output = deserialize_forward_backward_output(forward_result_proto(result))
    assert output.metrics == {"loss:sum": 6.0, "tokens:sum": 3.0}
    assert output.loss_fn_outputs[1]["logprobs"].to_numpy().tolist() == [-3.0]
    assert output.loss_fn_outputs[0]["ids"].to_numpy().tolist() == [[1, 2], [3, 4]]


def test_sample_result_proto_reads_back_with_the_sdk() -> None:
    result = SampleResult(
        sequences=[
            SampledSequence(tokens=[4, 2], logprobs=[-0.1, -0.2], stop_reason="stop"),
            SampledSequence(tokens=[4, 5, 6], logprobs=[-0.1, -0.3, -0.4], stop_reason="length"),
        ],
        prompt_logprobs=[None, -1.5],
        topk_prompt_logprobs=[None, [(3, -0.5), (9, -1.0)]],
    )
    decoded = deserialize_sample_response(sample_result_proto(result))
    assert [s.stop_reason for s in decoded.sequences] == ["stop", "length"]
    assert list(decoded.sequences[1].tokens) == [4, 5, 6]
    assert decoded.prompt_logprobs == [None, -1.5]
    assert decoded.topk_prompt_logprobs == [None, [(3, -0.5), (9, -1.0)]]
    as_json = result_json(RequestKind.SAMPLE, result)
    assert as_json["topk_prompt_logprobs"] == [None, [[3, -0.5], [9, -1.0]]]
