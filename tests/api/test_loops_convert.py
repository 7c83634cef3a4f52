"""The Loops loss semantics at the api (api.loops.convert): -100 targets, per-token normalisation, the flag that
skips it, and the completions JSON the SDK parses."""

from __future__ import annotations

from typing import Any

import pytest

from tinkerd.api.context import ServedModelInfo
from tinkerd.api.loops import convert, schemas
from tinkerd.domain import ops
from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.records import RequestKind
from tinkerd.domain.requests import PathResult

MODEL = ServedModelInfo(name="m", tokenizer_id=None, arch="LlamaForCausalLM", vocab_size=100, max_context_length=64)


def _datum(targets: list[int], weights: list[float] | None = None) -> dict[str, Any]:
    inputs: dict[str, Any] = {"target_tokens": {"data": targets, "dtype": "int64", "shape": [len(targets)]}}
    if weights is not None:
        inputs["weights"] = {"data": weights, "dtype": "float32", "shape": [len(weights)]}
    return {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": [5] * len(targets)}]},
        "loss_fn_inputs": inputs,
    }


def _convert(*datums: dict[str, Any], config: dict[str, Any] | None = None, loss_fn: str = "cross_entropy") -> Any:
    body = schemas.ForwardBackwardRequest.model_validate(
        {"seq_id": 2, "data": list(datums), "loss_fn": loss_fn, "loss_fn_config": config}
    )
    return convert.forward_backward(body, "s:train:0", MODEL, backward=True)


def test_minus_100_targets_without_weights_weigh_the_real_targets_per_token() -> None:
    request = _convert(_datum([-100, 7, 8]), _datum([9, -100, -100, 4]))
    first, second = request.datums
    assert first.loss_fn_inputs["target_tokens"].values == [0, 7, 8]
    assert second.loss_fn_inputs["target_tokens"].values == [9, 0, 0, 4]
    # 4 real targets in the request: each weighs 1/4, so the summed loss is the per-token mean.
    assert first.loss_fn_inputs["weights"].values == [0.0, 0.25, 0.25]
    assert second.loss_fn_inputs["weights"].values == [0.25, 0.0, 0.0, 0.25]
    assert request.loss_fn_config == {}


def test_skip_token_normalization_keeps_the_weights_and_is_not_passed_to_the_engine() -> None:
    request = _convert(_datum([1, -100, 3], [0.5, 1.0, 2.0]), config={"skip_token_normalization": True})
    [datum] = request.datums
    assert datum.loss_fn_inputs["weights"].values == [0.5, 0.0, 2.0]  # a -100 is masked even with weights
    assert request.loss_fn_config == {}
    assert convert.skips_normalization({"skip_token_normalization": True})
    assert not convert.skips_normalization(None)


def test_other_losses_pass_through_unnormalised() -> None:
    datum = _datum([1, 2])
    datum["loss_fn_inputs"] |= {
        "logprobs": {"data": [-1.0, -2.0], "dtype": "float32", "shape": [2]},
        "advantages": {"data": [1.0, 1.0], "dtype": "float32", "shape": [2]},
    }
    [converted] = _convert(datum, loss_fn="importance_sampling", config={"beta": 0.1}).datums
    assert "weights" not in converted.loss_fn_inputs
    assert converted.loss_fn_inputs["target_tokens"].values == [1, 2]


def test_dpo_takes_minus_100_targets_and_top_k_reaches_the_engine() -> None:
    datum = _datum([1, 2, 3])
    datum["loss_fn_inputs"]["target_tokens"]["data"] = [-100, 2, 3]
    datum["loss_fn_inputs"]["ref_logprobs"] = {"data": [0.0, -1.0, -2.0], "dtype": "float32", "shape": [3]}
    body = {"seq_id": 2, "data": [datum, datum], "loss_fn": "dpo", "top_k_logprobs": 4}
    request = convert.forward_backward(schemas.ForwardBackwardRequest.model_validate(body), "r", MODEL, backward=True)
    assert request.top_k_logprobs == 4
    for converted in request.datums:
        assert converted.loss_fn_inputs["weights"].values == [0.0, 1.0, 1.0]  # not normalised: dpo is per pair
        assert converted.loss_fn_inputs["target_tokens"].values == [0, 2, 3]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"top_k_logprobs": 21}, "top_k_logprobs must be between 0 and 20"),
        ({"top_k_logprobs": -1}, "top_k_logprobs must be between 0 and 20"),
        ({"data": []}, "at least one datum"),
        ({"loss_fn_config": {"beta": "x"}}, "loss_fn_config['beta']"),
    ],
)
def test_refusals_name_the_problem(change: dict[str, Any], message: str) -> None:
    body = {"seq_id": 2, "data": [_datum([1])], "loss_fn": "cross_entropy"} | change
    with pytest.raises(InvalidRequestError, match=message.replace("[", r"\[")):
        convert.forward_backward(schemas.ForwardBackwardRequest.model_validate(body), "r", MODEL, backward=True)


def test_a_token_outside_the_vocabulary_is_refused() -> None:
    datum = _datum([1])
    datum["model_input"]["chunks"][0]["tokens"] = [500]
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        _convert(datum)


def test_results_in_the_sdk_shapes() -> None:
    forward = ops.ForwardResult(
        loss_fn_outputs=[{"logprobs": ops.ArrayData.of_floats([-1.0, -2.0])}], metrics={"loss:sum": 1.5}
    )
    answer = convert.op_result(RequestKind.FORWARD, forward, skip_normalization=True)
    assert answer["loss"] == 1.5
    assert answer["metrics"] == {"loss": 1.5, "skip_token_normalization": 1.0}
    assert answer["loss_fn_outputs"] == [{"logprobs": {"data": [-1.0, -2.0], "dtype": "float32", "shape": [2]}}]
    saved = PathResult(path="tinker://s:train:0/sampler_weights/a", step=3)
    assert convert.op_result(RequestKind.SAVE_WEIGHTS_FOR_SAMPLER, saved) == {
        "version": 3,
        "path": "bt://loops:s:train:0/sampler_weights/a",
    }
    state = PathResult(path="tinker://s:train:0/weights/b", step=3)
    assert convert.op_result(RequestKind.SAVE_WEIGHTS, state)["path"] == "bt://loops:s:train:0/weights/b"
    assert convert.op_result(RequestKind.LOAD_WEIGHTS, state) == {"step": 3}


def test_completions_carry_token_ids_and_vllm_prompt_logprobs() -> None:
    result = ops.SampleResult(
        sequences=[ops.SampledSequence(tokens=[4, 2], logprobs=[-0.5, -0.25], stop_reason="stop")],
        prompt_logprobs=[None, -1.0],
        topk_prompt_logprobs=[None, [(9, -0.1), (7, -1.0)]],
    )
    [choice] = convert.sample_completions(result, [3, 7])["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"] == {"tokens": ["token_id:4", "token_id:2"], "token_logprobs": [-0.5, -0.25]}
    assert choice["prompt_logprobs"] == [None, {"7": {"logprob": -1.0}, "9": {"logprob": -0.1}}]
