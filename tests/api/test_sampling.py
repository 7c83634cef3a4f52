"""Sampling: create_sampling_session, samplers/{id}, asample (ids per sample, protobuf or JSON results)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from tinker.proto.response_conv import deserialize_sample_response

from tests.api.conftest import MODEL, PROTOBUF, Api


def _sampler(api: Api, **source: object) -> str:
    session_id = api.session()
    body = {"session_id": session_id, "sampling_session_seq_id": 0, "type": "create_sampling_session", **source}
    return api.ok("create_sampling_session", body)["sampling_session_id"]


def _sample_body(sampler_id: str, seq_id: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "num_samples": 2, "prompt": {"chunks": [{"tokens": [5, 6, 7], "type": "encoded_text"}]},
        "sampling_params": {"max_tokens": 3, "stop": ["\n"], "temperature": 0.7, "top_k": -1, "top_p": 1.0},
        "sampling_session_id": sampler_id, "seq_id": seq_id, "prompt_logprobs": True, "topk_prompt_logprobs": 0,
        "topk_sample_logprobs": 0, "prompt_alt_tokens_k": 0, "record_stability_info": False, "type": "sample",
        **extra,
    }  # fmt: skip


def test_sampler_of_a_base_model(api: Api) -> None:
    sampler_id = _sampler(api, base_model=MODEL)
    assert sampler_id.endswith(":sample:0")
    assert api.get(f"samplers/{sampler_id}").json() == {"sampler_id": sampler_id, "base_model": MODEL}


def test_sampler_of_a_checkpoint_takes_its_base_model(api: Api) -> None:
    model_id = api.model()
    body = {"model_id": model_id, "path": "s1", "seq_id": 1}
    path = api.result(api.ok("save_weights_for_sampler", body)["request_id"])["path"]
    sampler_id = _sampler(api, model_path=path)
    assert api.get(f"samplers/{sampler_id}").json() == {
        "sampler_id": sampler_id,
        "base_model": MODEL,
        "model_path": path,
    }


def test_create_sampling_session_refuses_bad_sources(api: Api) -> None:
    session_id = api.session()
    base = {"session_id": session_id, "sampling_session_seq_id": 0}
    assert api.post("create_sampling_session", base).status_code == 400
    assert api.post("create_sampling_session", {**base, "base_model": "no/such"}).status_code == 404
    assert api.post("create_sampling_session", {**base, "model_path": "tinker://x"}).status_code == 400
    missing = {**base, "model_path": "tinker://r:train:0/sampler_weights/n"}
    assert api.post("create_sampling_session", missing).status_code == 404
    assert api.get("samplers/nope:sample:0").status_code == 404


def test_asample_returns_one_sequence_id_per_sample_and_a_protobuf_result(api: Api) -> None:
    sampler_id = _sampler(api, base_model=MODEL)
    future = api.ok("asample", _sample_body(sampler_id), headers={"X-Tinker-Sampling-Backpressure": "1"})
    ids = future["sample_sequence_ids"]
    assert len(ids) == 2 and len(set(ids)) == 2
    reply = api.retrieve(future["request_id"], accept=PROTOBUF)
    assert reply.headers["content-type"].startswith(PROTOBUF)
    result = deserialize_sample_response(reply.content)
    assert [list(s.tokens) for s in result.sequences] == [[7, 8], [7, 9]]
    assert [s.stop_reason for s in result.sequences] == ["length", "length"]
    assert result.sequences[0].logprobs == [-0.5, -0.25]
    prompt_logprobs = result.prompt_logprobs
    assert prompt_logprobs is not None and prompt_logprobs[0] is None and prompt_logprobs[1:] == [-6.0, -7.0]
    # A retried submit (same sampler, same seq_id) is the same request with the same ids.
    assert api.ok("asample", _sample_body(sampler_id))["sample_sequence_ids"] == ids


def test_asample_json_result_for_old_sdks(api: Api) -> None:
    sampler_id = _sampler(api, base_model=MODEL)
    future = api.ok("asample", _sample_body(sampler_id, prompt_logprobs=None))
    body = api.result(future["request_id"])
    assert body["sequences"][1] == {"stop_reason": "length", "tokens": [7, 9], "logprobs": [-0.5, -0.25]}
    assert "prompt_logprobs" not in body


def test_asample_refuses_bad_input(api: Api) -> None:
    sampler_id = _sampler(api, base_model=MODEL)

    def status(**extra: Any) -> int:
        return api.post("asample", _sample_body(sampler_id, **extra)).status_code

    assert status(sampling_session_id=None) == 400
    assert status(sampling_session_id="x:sample:9") == 404
    assert status(num_samples=0) == 400
    assert status(prompt={"chunks": [{"tokens": [1, 500]}]}) == 400
    assert status(prompt={"chunks": []}) == 400
    assert status(prompt={"chunks": [{"type": "image", "data": "", "format": "png"}]}) == 400
    assert status(sampling_params={"max_tokens": 0}) == 400
    assert status(sampling_params={"max_tokens": 62}) == 400  # 3 prompt + 62 > 64 context
    assert status(topk_sample_logprobs=-1) == 400
    assert status(prompt_alt_tokens_k=-1) == 400
    assert status(target_prompt_logprobs={"data": [1.5, 2.5], "dtype": "float32", "shape": [2, 1]}) == 400
    assert status(target_prompt_logprobs={"data": [1, 2], "dtype": "int64", "shape": [2]}) == 400
    assert status(target_prompt_logprobs={"data": [1, 2], "dtype": "int64", "shape": [3, 1]}) == 400
    sparse = {"data": [1], "dtype": "int64", "shape": [2, 1], "sparse_crow_indices": [0, 1], "sparse_col_indices": [4]}
    assert status(target_prompt_logprobs=sparse) == 400
    bad_header = api.client.post(
        "/api/v1/asample", json=_sample_body(sampler_id), headers={"X-Tinkerd-Sample-Logprobs": "raw"}
    )
    assert bad_header.status_code == 400 and "X-Tinkerd-Sample-Logprobs" in bad_header.text


def test_nan_prompt_logprobs_are_what_the_sdk_decodes_as_none(api: Api) -> None:
    sampler_id = _sampler(api, base_model=MODEL)
    future = api.ok("asample", _sample_body(sampler_id, num_samples=1, sampling_params={"max_tokens": 1}))
    content = api.retrieve(future["request_id"], accept=PROTOBUF).content
    from tinkerd.api.proto import tinker_public_pb2 as pb

    message = pb.SampleResponse.FromString(content)
    raw = np.frombuffer(message.prompt_logprobs, dtype="<f4")
    assert math.isnan(raw[0]) and raw[1:].tolist() == [-6.0, -7.0]


def test_non_finite_numbers_are_refused_at_submit(api: Api) -> None:
    sampler = _sampler(api, base_model=MODEL)
    body = json.dumps(
        {"sampling_session_id": sampler, "seq_id": 0, "num_samples": 1, "prompt": {"chunks": [{"tokens": [1, 2]}]},
         "sampling_params": {"max_tokens": 2, "temperature": float("nan")}}
    )  # fmt: skip
    assert "NaN" in body  # what Python's json writes, and what the fuzz sent
    response = api.client.post("/api/v1/asample", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "NaN" in response.json()["error"]
