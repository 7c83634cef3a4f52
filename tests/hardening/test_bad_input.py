"""One named case per kind of bad input the issue lists: the status, and words the message must contain.

The fuzz tests send thousands of such requests; these pin down what a user reads. Mistakes only the engine can see
(an unknown loss, inputs whose length disagrees with the tokens) are accepted and then fail their future with a
"user" error that names the problem, through retrieve_future like any result.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.hardening.fixtures import World
from tests.hardening.live import PROTOBUF, Live
from tests.hardening.protos import fwdbwd_bytes, valid_inputs
from tests.worker.harness import BASE, VOCAB
from tinkerd.api.proto import tinker_public_pb2 as pb

pytestmark = pytest.mark.integration


def _fb(run_id: str, tokens: list[int], **inputs: pb.Tensor) -> bytes:
    message = pb.ForwardBackwardRequest(model_id=run_id, seq_id=0, loss_fn="cross_entropy")
    datum = message.data.add()
    datum.model_input.add().encoded_text.tokens = b"".join(t.to_bytes(4, "little", signed=True) for t in tokens)
    for name, tensor in {**valid_inputs("cross_entropy", tokens), **inputs}.items():
        datum.loss_fn_inputs[name].CopyFrom(tensor)
    return message.SerializeToString()


def _nan_weights(n: int) -> pb.Tensor:
    return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[n], dense=b"\x00\x00\xc0\x7f" * n)  # float32 NaN


def _sample(sampler: str, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "sampling_session_id": sampler,
        "seq_id": 0,
        "num_samples": 1,
        "prompt": {"chunks": [{"tokens": [1, 2, 3]}]},
        "sampling_params": {"max_tokens": 4},
    }
    params = changes.pop("sampling_params", {})
    return {**body, **changes, "sampling_params": {**body["sampling_params"], **params}}


# name -> (endpoint, body builder (bytes: protobuf), status, words the message must contain)
CASES: dict[str, tuple[str, Any, int, tuple[str, ...]]] = {
    "malformed JSON": ("create_session", lambda w: b'{"tags": [', 400, ("invalid request", "JSON")),
    "JSON that is not an object": ("get_info", lambda w: b"[1, 2]", 400, ("invalid request",)),
    "NaN literal in JSON": (
        "optim_step",
        lambda w: (
            b'{"model_id": "%s", "seq_id": 1000000, "adam_params": {"learning_rate": NaN}}' % w.alice.run_id.encode()
        ),
        400,
        ("learning_rate",),
    ),
    "malformed protobuf": ("forward_backward", lambda w: b"\xff\xff\xff", 400, ("ForwardBackwardRequest",)),
    "wrong type": (
        "create_model",
        lambda w: {"session_id": w.alice.session_id, "model_seq_id": "first", "base_model": BASE},
        400,
        ("model_seq_id",),
    ),
    "missing field": (
        "create_model",
        lambda w: {"session_id": w.alice.session_id, "model_seq_id": 3},
        400,
        ("base_model", "required"),
    ),
    "token id outside the vocabulary": (
        "forward_backward",
        lambda w: _fb(w.alice.run_id, [1, VOCAB]),
        400,
        ("token id 96", "vocabulary"),
    ),
    "negative token id": (
        "asample",
        lambda w: _sample(w.alice.sampler_id, prompt={"chunks": [{"tokens": [-1]}]}),
        400,
        ("-1", "vocabulary"),
    ),
    "sequence longer than the context": (
        "forward_backward",
        lambda w: _fb(w.alice.run_id, [1] * 300),
        400,
        ("300 tokens", "context of 256"),
    ),
    "prompt + max_tokens past the context": (
        "asample",
        lambda w: _sample(w.alice.sampler_id, sampling_params={"max_tokens": 254}),
        400,
        ("exceeds", "256"),
    ),
    "shapes that disagree with the values": (
        "forward_backward",
        lambda w: _fb(
            w.alice.run_id, [1, 2, 3], weights=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[5], dense=b"\0" * 12)
        ),
        400,
        ("weights", "shape [5]"),
    ),
    "NaN in a loss input": (
        "forward_backward",
        lambda w: _fb(w.alice.run_id, [1, 2], weights=_nan_weights(2)),
        400,
        ("weights", "NaN"),
    ),
    "infinite learning rate": (
        "optim_step",
        lambda w: {"model_id": w.alice.run_id, "seq_id": 10**6, "adam_params": {"learning_rate": 1e999}},
        400,
        ("learning_rate", "finite"),
    ),
    "negative max_tokens": (
        "asample",
        lambda w: _sample(w.alice.sampler_id, sampling_params={"max_tokens": -5}),
        400,
        ("max_tokens", "-5"),
    ),
    "huge max_tokens": (
        "asample",
        lambda w: _sample(w.alice.sampler_id, sampling_params={"max_tokens": 10**12}),
        400,
        ("max_tokens",),
    ),
    "zero num_samples": ("asample", lambda w: _sample(w.alice.sampler_id, num_samples=0), 400, ("num_samples",)),
    "huge num_samples": ("asample", lambda w: _sample(w.alice.sampler_id, num_samples=10**9), 400, ("num_samples",)),
    "rank zero": (
        "create_model",
        lambda w: {"session_id": w.alice.session_id, "model_seq_id": 3, "base_model": BASE, "lora_config": {"rank": 0}},
        400,
        ("rank",),
    ),
    "huge rank": (
        "create_model",
        lambda w: {
            "session_id": w.alice.session_id,
            "model_seq_id": 3,
            "base_model": BASE,
            "lora_config": {"rank": 10**6},
        },
        400,
        ("rank", "1024"),
    ),
    "seq_id past int64": ("optim_step", lambda w: {"model_id": w.alice.run_id, "seq_id": 2**64}, 400, ("seq_id",)),
    "unknown base model": (
        "create_model",
        lambda w: {"session_id": w.alice.session_id, "model_seq_id": 3, "base_model": "no/such"},
        404,
        ("no/such", "served"),
    ),
    "unknown model id": ("get_info", lambda w: {"model_id": "nobody:train:0"}, 404, ("unknown training run",)),
    "another user's model id": ("get_info", lambda w: {"model_id": w.bob.run_id}, 404, ("unknown training run",)),
    "path traversal in a checkpoint name": (
        "save_weights",
        lambda w: {"model_id": w.alice.run_id, "seq_id": 10**6, "path": "../../etc"},
        400,
        ("checkpoint name", "../../etc"),
    ),
    "path traversal in a tinker:// path": (
        "weights_info",
        lambda w: {"tinker_path": "tinker://../weights/x"},
        400,
        ("..",),
    ),
    "extra segments in a tinker:// path": (
        "load_weights",
        lambda w: {"model_id": w.alice.run_id, "seq_id": 10**6, "path": f"{w.alice.weights_path}/../../x"},
        400,
        ("checkpoint path",),
    ),
    "not a tinker:// path": (
        "create_sampling_session",
        lambda w: {"session_id": w.alice.session_id, "sampling_session_seq_id": 9, "model_path": "/etc/passwd"},
        400,
        ("tinker://",),
    ),
    "huge offset": ("GET training_runs?offset=99999999999999999999", None, 400, ("offset",)),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_a_4xx_naming_the_problem(live: Live, world: World, case: str) -> None:
    endpoint, build, status, words = CASES[case]
    if endpoint.startswith("GET "):
        response = live.get(endpoint.removeprefix("GET "))
    else:
        body = build(world)
        if isinstance(body, bytes):
            kind = PROTOBUF if endpoint == "forward_backward" else "application/json"
            response = live.client.post(f"/api/v1/{endpoint}", content=body, headers={"content-type": kind})
        else:
            response = live.post(endpoint, body)
    assert response.status_code == status, (case, response.status_code, response.text)
    message = response.json()["error"]
    assert all(word in message for word in words), (case, message)
    assert response.json()["category"] == "user"


def _accepted_then_failed(live: Live, run_id: str, message: pb.ForwardBackwardRequest) -> dict[str, Any]:
    message.seq_id = live.next_seq(run_id)
    response = live.client.post(
        "/api/v1/forward_backward", content=message.SerializeToString(), headers={"content-type": PROTOBUF}
    )
    assert response.status_code == 200, response.text
    outcome = live.wait(response.json()["request_id"], accept=f"{PROTOBUF}, application/json")
    assert isinstance(outcome, dict) and outcome["category"] == "user", outcome
    return outcome


def test_an_unknown_loss_fails_its_future_with_the_known_ones_listed(live: Live, world: World) -> None:
    run_id = live.run()
    message = pb.ForwardBackwardRequest()
    message.ParseFromString(fwdbwd_bytes(run_id, 0, [1, 2, 3]))
    message.loss_fn = "kl_divergence"
    failed = _accepted_then_failed(live, run_id, message)
    assert "unknown loss_fn 'kl_divergence'" in failed["error"] and "cross_entropy" in failed["error"]


def test_inputs_whose_length_disagrees_with_the_tokens_fail_their_future(live: Live, world: World) -> None:
    run_id = live.run()
    message = pb.ForwardBackwardRequest()
    message.ParseFromString(
        _fb(run_id, [1, 2, 3], weights=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2], dense=b"\0" * 8))
    )
    failed = _accepted_then_failed(live, run_id, message)
    assert "weights" in failed["error"] and "3" in failed["error"], failed
    # The run goes on.
    ok = live.client.post(
        "/api/v1/forward_backward",
        content=fwdbwd_bytes(run_id, live.next_seq(run_id), [1, 2, 3]),
        headers={"content-type": PROTOBUF},
    )
    assert "loss_fn_outputs" in live.result(ok.json()["request_id"])


@pytest.mark.parametrize("seq_id", [-1, -(2**63) - 1, 2**63])
def test_seq_ids_outside_int64_are_refused_by_name(live: Live, world: World, seq_id: int) -> None:
    """Found by the schema fuzz: seq_id -2**63-1 overflowed SQLite's integer (a 500) before it was bounded."""
    for endpoint, body in [
        ("optim_step", {"model_id": world.alice.run_id, "seq_id": seq_id}),
        ("asample", _sample(world.alice.sampler_id, seq_id=seq_id)),
        ("save_weights", {"model_id": world.alice.run_id, "seq_id": seq_id, "path": "x"}),
        # Found by the random fuzz in session 3: save_weights_external's seq_id had no bound.
        ("save_weights_external", {"model_id": world.alice.run_id, "seq_id": seq_id, "path": "x"}),
    ]:
        response = live.post(endpoint, body)
        assert response.status_code == 400 and "seq_id" in response.json()["error"], (endpoint, response.text)


def test_a_float_past_float32_is_named_not_called_infinite(live: Live, world: World) -> None:
    """Found by the JSON fuzz: 1e308 in a float32 input became infinity silently, and was refused as "NaN or
    infinite", which the user never sent."""
    datum = {
        "model_input": {"chunks": [{"tokens": [1, 2]}]},
        "loss_fn_inputs": {
            "target_tokens": {"data": [2, 3], "dtype": "int64", "shape": [2]},
            "weights": {"data": [1.0, 1e308], "dtype": "float32", "shape": [2]},
        },
    }
    body = {"forward_input": {"data": [datum], "loss_fn": "cross_entropy"}, "model_id": world.alice.run_id}
    response = live.post("forward", body)
    assert response.status_code == 400 and "do not fit float32" in response.json()["error"], response.text
