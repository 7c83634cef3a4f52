"""Training routes: create_model, get_info, forward_backward / forward, optim_step; their 4xx paths."""

from __future__ import annotations

import numpy as np
from tinker.proto.response_conv import deserialize_forward_backward_output

from tests.api.conftest import MODEL, PROTOBUF, Api, tensor_json


def test_create_model_then_get_info(api: Api) -> None:
    session_id = api.session()
    future = api.ok(
        "create_model",
        {
            "session_id": session_id, "model_seq_id": 0, "base_model": MODEL, "user_metadata": {"k": "v"},
            "lora_config": {"rank": 8, "seed": 3, "train_unembed": False, "train_mlp": True, "train_attn": True},
            "optimizer_config": {"type": "adamw"}, "type": "create_model", "some_future_field": 1,
        },
    )  # fmt: skip
    model_id = f"{session_id}:train:0"
    assert future["model_id"] == model_id
    assert api.result(future["request_id"]) == {"type": "create_model", "model_id": model_id}
    info = api.ok("get_info", {"model_id": model_id, "type": "get_info"})
    assert info["model_data"] == {"arch": "LlamaForCausalLM", "model_name": MODEL, "tokenizer_id": "tiny/tokenizer"}
    assert (info["lora_rank"], info["is_lora"], info["optimizer_config"]) == (8, True, {"type": "adamw"})
    run = api.store.runs.get(model_id, "local")
    assert (run.lora.rank, run.lora.seed, run.lora.train_unembed, run.user_metadata) == (8, 3, False, {"k": "v"})


def test_create_model_is_idempotent_per_model_seq_id(api: Api) -> None:
    session_id = api.session()
    body = {"session_id": session_id, "model_seq_id": 0, "base_model": MODEL, "lora_config": {"rank": 4}}
    first, second = api.ok("create_model", body), api.ok("create_model", body)
    assert first["request_id"] == second["request_id"]


def test_create_model_refuses_bad_input(api: Api) -> None:
    session_id = api.session()
    base = {"session_id": session_id, "model_seq_id": 0, "base_model": MODEL, "lora_config": {"rank": 4}}
    unknown_model = api.post("create_model", {**base, "base_model": "no/such"})
    assert unknown_model.status_code == 404 and "no/such" in unknown_model.json()["error"]
    assert api.post("create_model", {**base, "session_id": "nope"}).status_code == 404
    assert "rank" in api.post("create_model", {**base, "lora_config": {"rank": 0}}).json()["error"]
    no_targets = {"rank": 4, "train_attn": False, "train_mlp": False, "train_unembed": False}
    assert api.post("create_model", {**base, "lora_config": no_targets}).status_code == 400
    dimuon = api.post("create_model", {**base, "optimizer_config": {"type": "dimuon", "version": 1}})
    assert dimuon.status_code == 400 and "dimuon" in dimuon.json()["error"]
    assert api.post("create_model", {**base, "model_seq_id": -1}).status_code == 400


def test_get_info_of_unknown_model_is_404(api: Api) -> None:
    assert api.post("get_info", {"model_id": "s:train:9"}).status_code == 404


def test_forward_backward_protobuf_result(api: Api) -> None:
    model_id = api.model()
    response = api.forward_backward(model_id, 1, [5, 6, 7])
    assert response.status_code == 200, response.text
    reply = api.retrieve(response.json()["request_id"], accept=PROTOBUF)
    assert reply.headers["content-type"].startswith(PROTOBUF)
    output = deserialize_forward_backward_output(reply.content)
    assert output.metrics == {"loss:sum": 3.0}
    np.testing.assert_array_equal(output.loss_fn_outputs[0]["logprobs"].to_numpy(), [-5.0, -6.0, -7.0])
    executed = api.worker.executed[-1]
    assert (executed.kind.value, executed.seq_id, executed.token_count) == ("forward_backward", 1, 3)


def test_forward_only_is_a_forward_and_json_when_asked(api: Api) -> None:
    model_id = api.model()
    response = api.forward_backward(model_id, 1, [4, 5], forward_only=True)
    body = api.result(response.json()["request_id"])  # Accept: application/json
    assert body["loss_fn_outputs"] == [{"logprobs": {"data": [-4.0, -5.0], "dtype": "float32", "shape": [2]}}]
    assert api.worker.executed[-1].kind.value == "forward"


def test_old_sdk_json_forward_backward_and_forward(api: Api) -> None:
    model_id = api.model()
    datum = {
        "model_input": {"chunks": [{"tokens": [1, 2]}]},  # no "type", as SDKs <= 0.15 send it
        "loss_fn_inputs": {
            "target_tokens": tensor_json([2, 3], "int64"),
            "weights": tensor_json([1.0, 1.0], "float32"),
        },
    }
    fb = api.ok(
        "forward_backward",
        {"forward_backward_input": {"data": [datum], "loss_fn": "cross_entropy"}, "model_id": model_id, "seq_id": 1},
    )
    assert api.result(fb["request_id"])["metrics"] == {"loss:sum": 2.0}
    fwd = api.ok(
        "forward", {"forward_input": {"data": [datum], "loss_fn": "cross_entropy"}, "model_id": model_id, "seq_id": 2}
    )
    api.result(fwd["request_id"])
    assert [f.kind.value for f in api.worker.executed[-2:]] == ["forward_backward", "forward"]


def test_forward_backward_refuses_bad_input(api: Api) -> None:
    model_id = api.model()
    garbage = api.client.post("/api/v1/forward_backward", content=b"\xff\xff\xff", headers={"content-type": PROTOBUF})
    assert garbage.status_code == 400 and "protobuf" in garbage.json()["error"]
    assert api.forward_backward("s:train:0", 1).status_code == 404
    out_of_vocab = api.forward_backward(model_id, 1, [1, 100])
    assert out_of_vocab.status_code == 400 and "100" in out_of_vocab.json()["error"]
    too_long = api.forward_backward(model_id, 1, list(range(65)))
    assert too_long.status_code == 400 and "context" in too_long.json()["error"]
    bad_json = api.post("forward_backward", {"model_id": model_id})
    assert bad_json.status_code == 400 and "forward_backward_input" in bad_json.json()["error"]
    sparse_bad = {
        "data": [1],
        "dtype": "int64",
        "shape": [2, 2],
        "sparse_crow_indices": [0, 5],
        "sparse_col_indices": [0],
    }
    datum = {"model_input": {"chunks": [{"tokens": [1, 2]}]}, "loss_fn_inputs": {"target_tokens": sparse_bad}}
    bad_sparse = api.post(
        "forward_backward",
        {"forward_backward_input": {"data": [datum], "loss_fn": "x"}, "model_id": model_id, "seq_id": 1},
    )
    assert bad_sparse.status_code == 400 and "target_tokens" in bad_sparse.json()["error"]


def test_resubmitting_a_seq_id_returns_the_same_future(api: Api) -> None:
    model_id = api.model()
    first, again = api.forward_backward(model_id, 1).json(), api.forward_backward(model_id, 1).json()
    assert first["request_id"] == again["request_id"]
    api.result(first["request_id"])
    # A seq_id taken by a different kind of request is a conflict (here: create_model's implicit seq 0).
    assert api.post("optim_step", {"model_id": model_id, "seq_id": 0, "adam_params": {}}).status_code == 409


def test_optim_step(api: Api) -> None:
    model_id = api.model()
    params = {"learning_rate": 0.01, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12, "weight_decay": 0.0}
    future = api.ok("optim_step", {"model_id": model_id, "seq_id": 1, "adam_params": params, "type": "optim_step"})
    assert api.result(future["request_id"]) == {"metrics": {"learning_rate:mean": 0.01}}
    # SDKs <= 0.3 send only the learning rate.
    partial = api.ok("optim_step", {"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 0.5}})
    assert api.result(partial["request_id"])["metrics"] == {"learning_rate:mean": 0.5}


def test_optim_step_refuses_bad_params(api: Api) -> None:
    model_id = api.model()
    for params in ({"learning_rate": -1}, {"beta1": 1.5}, {"eps": 0}):
        response = api.post("optim_step", {"model_id": model_id, "seq_id": 1, "adam_params": params})
        assert response.status_code == 400, params
    dimuon = {"type": "dimuon", "learning_rate": 0.01}
    assert api.post("optim_step", {"model_id": model_id, "seq_id": 1, "optimizer_params": dimuon}).status_code == 400


def test_unload_model(api: Api) -> None:
    model_id = api.model()
    future = api.ok("unload_model", {"model_id": model_id, "type": "unload_model"})
    assert api.result(future["request_id"]) == {"type": "unload_model", "model_id": model_id}
    executed = api.worker.executed[-1]
    assert (executed.kind.value, executed.seq_id) == ("unload_model", None)
    assert api.post("unload_model", {"model_id": "s:train:5"}).status_code == 404


def test_a_request_refused_at_submit_does_not_stall_its_run(api: Api) -> None:
    """The SDK numbered the refused request; the run's next seq_id must still run, not wait for it forever."""
    model_id = api.model()
    assert api.forward_backward(model_id, 1, [1, 500]).status_code == 400
    assert api.post("optim_step", {"model_id": model_id, "seq_id": 2, "adam_params": {"beta1": 7}}).status_code == 400
    request_id = api.forward_backward(model_id, 3).json()["request_id"]
    assert api.result(request_id)["metrics"] == {"loss:sum": 3.0}
    # The refused seq_id is recorded as failed; a retry of it finds that record rather than a new request.
    retried = api.forward_backward(model_id, 1).json()["request_id"]
    failure = api.retrieve(retried).json()
    assert failure["category"] == "user" and failure["error"].startswith("refused at submit")
