"""The Loops routes in-process (the real app and ledger, the fake worker): operations, errors the SDK must not
retry, back-pressure it does retry, keys and user isolation, and one world of runs and checkpoints for both APIs."""

from __future__ import annotations

import time
from typing import Any

from tests.api.conftest import MODEL, Api, MakeApi, Response

KEYS = {"tml-alice": "alice", "tml-bob": "bob"}


class Loops:
    """Calls as the Loops SDK makes them: ``Authorization: Api-Key``, ops answered 202, results long-polled."""

    def __init__(self, api: Api, key: str | None = None) -> None:
        self.api = api
        self.headers = {"Authorization": f"Api-Key {key}"} if key else {}
        self.seq = 0

    def post(self, path: str, body: dict[str, Any] | None = None) -> Response:
        return self.api.client.post(path, json=body, headers={"X-API-Key": "", **self.headers})

    def get(self, path: str, **params: Any) -> Response:
        return self.api.client.get(path, params=params, headers={"X-API-Key": "", **self.headers})

    def ok(self, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self.post(path, body)
        assert response.status_code == 200, response.text
        return response.json()

    def trainer(self) -> tuple[str, str]:
        session = self.ok("/v1/loops/sessions")["session"]["id"]
        run = self.ok("/v1/loops/trainers", {"session_id": session, "base_model": MODEL, "lora_rank": 4})["run"]
        assert run["deployment_id"] is None and run["base_model"] == MODEL
        return run["id"], run["base_url"].removeprefix("http://testserver")

    def op(self, base: str, name: str, body: dict[str, Any] | None = None, seq_id: int | None = None) -> str:
        self.seq = seq_id if seq_id is not None else self.seq + 1
        response = self.post(f"{base}/{name}", {"seq_id": self.seq, **(body or {})})
        assert response.status_code == 202, response.text
        return response.json()["operation_id"]

    def result(self, base: str, operation_id: str) -> Any:
        deadline = time.monotonic() + 30
        while True:
            response = self.get(f"{base}/operations/{operation_id}")
            if response.status_code != 408 or time.monotonic() > deadline:
                break
        assert response.status_code == 200, response.text
        return response.json()


def _datum(tokens: list[int]) -> dict[str, Any]:
    targets = [-100, *tokens[2:], 0]
    return {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
        "loss_fn_inputs": {"target_tokens": {"data": targets, "dtype": "int64", "shape": [len(targets)]}},
    }


def test_a_run_trains_saves_and_samples_through_operations(api: Api) -> None:
    loops = Loops(api)
    run, base = loops.trainer()
    assert loops.get(f"{base}/health", base_model=MODEL).status_code == 200
    assert loops.result(base, loops.op(base, "init_trainer_server", {"lora_rank": 4})) == {
        "status": "done",
        "result": {"step": 0, "lora_rank": 4},
    }
    forward = loops.result(base, loops.op(base, "forward_backward", {"data": [_datum([3, 4, 5])]}))["result"]
    assert forward["loss"] == 3.0 and forward["metrics"] == {"loss": 3.0}  # the fake worker's loss:sum
    assert loops.result(base, loops.op(base, "optim_step", {}))["result"]["metrics"] is not None
    saved = loops.result(base, loops.op(base, "save_weights_for_sampler", {"name": "s1", "bump_version": True}))
    path = f"bt://loops:{run}/sampler_weights/s1"
    assert saved["result"]["path"] == path

    session = api.store.runs.get(run, "local").session_id
    sampler = loops.ok("/v1/loops/samplers", {"session_id": session, "run_id": run})["sampler"]
    assert sampler["model_id"] is None
    sbase = sampler["base_url"].removeprefix("http://testserver")
    body = {"prompt": [1, 2, 3], "n": 2, "max_tokens": 2, "prompt_logprobs": 0, "lora": path, "model": MODEL}
    response = loops.api.client.post(f"{sbase}/sample", json=body, headers={"Idempotency-Key": "k1"})
    assert response.status_code == 202
    choices = loops.result(sbase, response.json()["operation_id"])["result"]["choices"]
    assert [c["logprobs"]["tokens"] for c in choices] == [["token_id:7", "token_id:8"], ["token_id:7", "token_id:9"]]
    assert choices[0]["prompt_logprobs"] == [None, {"2": {"logprob": -2.0}}, {"3": {"logprob": -3.0}}]
    [pinned] = [f for f in api.worker.executed if f.kind == "sample"]
    assert api.store.samplers.get(pinned.model_id, "local").model_path == f"tinker://{run}/sampler_weights/s1"
    # A resent /sample (same Idempotency-Key) finds the request it made.
    again = loops.api.client.post(f"{sbase}/sample", json=body, headers={"Idempotency-Key": "k1"})
    assert again.json()["operation_id"] == response.json()["operation_id"]
    models = loops.get(f"{sbase}/v1/models").json()["data"]
    assert models == [{"id": MODEL, "object": "model", "parent": None}]
    # A dedicated or local client (ServiceClient.local) names no model: the completion comes in the answer itself.
    direct = loops.api.client.post(f"{sbase}/sample", json={**body, "model": None})
    assert direct.status_code == 200
    tokens = [c["logprobs"]["tokens"] for c in direct.json()["choices"]]
    assert tokens == [["token_id:7", "token_id:8"], ["token_id:7", "token_id:9"]]


def test_a_resubmitted_op_is_the_same_operation(api: Api) -> None:
    loops = Loops(api)
    _, base = loops.trainer()
    first = loops.op(base, "forward", {"data": [_datum([3, 4, 5])]}, seq_id=1)
    assert loops.op(base, "forward", {"data": [_datum([3, 4, 5])]}, seq_id=1) == first
    loops.result(base, first)
    assert len([f for f in api.worker.executed if f.kind == "forward"]) == 1


def test_user_errors_are_final_and_name_the_problem(api: Api) -> None:
    loops = Loops(api)
    run, base = loops.trainer()
    bad = loops.post(f"{base}/forward_backward", {"seq_id": 1, "data": [_datum([3, 99999])]})
    assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["detail"]
    # The SDK retries 400 and 404 for up to an hour unless the answer says it is final.
    assert bad.headers["x-baseten-error-source"] == "06"
    missing = loops.get("/loops/trainers/nope:train:0/health")
    assert missing.status_code == 404 and missing.headers["x-baseten-error-source"] == "06"
    wrong_run = loops.post(f"{base}/forward", {"seq_id": 2, "run_id": "other:train:0", "data": [_datum([3, 4])]})
    assert wrong_run.status_code == 400 and "other:train:0" in wrong_run.json()["detail"]
    # The refused seq_ids 1 and 2 do not hold up seq_id 3.
    assert loops.result(base, loops.op(base, "forward", {"data": [_datum([3, 4])]}, seq_id=3))["status"] == "done"
    failed = loops.result(base, loops.op(base, "forward", {"data": [_datum([3, 4])], "loss_fn": "fail_user"}))
    assert failed == {"status": "error", "error": "loss fail_user failed", "error_class": "ValueError"}
    assert loops.get(f"{base}/operations/req-unknown").status_code == 404
    unknown = loops.post("/v1/loops/trainers", {"session_id": "nope", "base_model": MODEL})
    assert unknown.status_code == 404 and "nope" in unknown.json()["detail"]
    assert loops.get(f"/loops/trainers/{run}/policy_version").status_code == 501


def test_a_poll_is_held_then_answered_408_and_a_full_queue_is_a_retryable_408(make_api: MakeApi) -> None:
    api = make_api(long_poll_s=0.5, max_queued_per_user=1)
    loops = Loops(api)
    _, base = loops.trainer()
    deadline = time.monotonic() + 10
    while True:  # the run's create (seq 0) may still be queued, filling the cap of 1: retry as the SDK does
        init = loops.post(f"{base}/init_trainer_server", {"seq_id": 1})
        if init.status_code != 408 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert init.status_code == 202, init.text
    loops.seq = 1
    loops.result(base, init.json()["operation_id"])
    api.worker.pause()
    waiting = loops.op(base, "forward", {"data": [_datum([3, 4])]})
    started = time.monotonic()
    assert loops.get(f"{base}/operations/{waiting}").status_code == 408
    assert time.monotonic() - started >= 0.4  # held, so the SDK's immediate re-poll does not spin
    full = loops.post(f"{base}/forward", {"seq_id": 3, "data": [_datum([3, 4])]})
    assert full.status_code == 408 and "x-baseten-error-source" not in full.headers
    api.worker.resume()
    assert loops.result(base, waiting)["status"] == "done"


def test_keys_and_isolation(make_api: MakeApi) -> None:
    api = make_api(api_keys=KEYS)
    assert Loops(api).post("/v1/loops/sessions").status_code == 401
    assert Loops(api, "tml-mallory").post("/v1/loops/sessions").status_code == 401
    alice = Loops(api, "tml-alice")
    run, base = alice.trainer()
    alice.result(base, alice.op(base, "init_trainer_server"))
    saved = alice.result(base, alice.op(base, "save_state", {"name": "w1"}))["result"]
    assert saved["path"] == f"bt://loops:{run}/weights/w1"
    [checkpoint] = alice.get("/v1/loops/checkpoints", run_id=run).json()["checkpoints"]
    session = api.store.runs.get(run, "alice").session_id

    bob = Loops(api, "tml-bob")
    assert bob.get(f"{base}/health").status_code == 404
    assert bob.post(f"{base}/forward", {"seq_id": 5, "data": [_datum([3, 4])]}).status_code == 404
    assert bob.get(f"{base}/operations/{alice.op(base, 'optim_step')}").status_code == 404
    assert bob.get("/v1/loops/checkpoints", run_id=run).status_code == 404
    assert bob.get("/v1/loops/checkpoints", checkpoint_path=saved["path"]).status_code == 404
    assert bob.get(f"/v1/loops/checkpoints/{checkpoint['id']}/source").status_code == 404
    assert bob.post("/v1/loops/samplers", {"session_id": session, "run_id": run}).status_code == 404
    bob_session = bob.ok("/v1/loops/sessions")["session"]["id"]
    assert bob.post("/v1/loops/samplers", {"session_id": bob_session, "model_path": saved["path"]}).status_code == 404
    assert (
        bob.post(
            "/v1/loops/trainers", {"session_id": bob_session, "base_model": MODEL, "path": saved["path"]}
        ).status_code
        == 404
    )
    sampler = bob.ok("/v1/loops/samplers", {"session_id": bob_session, "base_model": MODEL})["sampler"]
    sbase = sampler["base_url"].removeprefix("http://testserver")
    stolen = api.client.post(
        f"{sbase}/sample",
        json={"prompt": [1, 2], "max_tokens": 1},
        headers={**bob.headers, "X-Checkpoint-Path": saved["path"]},
    )
    assert stolen.status_code == 404
    assert alice.get(f"{sbase}/v1/models").status_code == 404  # nor may Alice use Bob's sampler


def test_both_apis_see_the_same_runs_and_checkpoints(api: Api) -> None:
    loops = Loops(api)
    run, base = loops.trainer()
    loops.result(base, loops.op(base, "save_weights_for_sampler", {"name": "s1"}))
    runs = api.get("training_runs").json()["training_runs"]
    assert run in [r["training_run_id"] for r in runs]
    tinker_view = api.get(f"training_runs/{run}/checkpoints").json()["checkpoints"]
    assert [c["tinker_path"] for c in tinker_view] == [f"tinker://{run}/sampler_weights/s1"]
    # A run made through the Tinker API, listed through Loops.
    tinker_run = api.model()
    api.result(api.ok("save_weights", {"model_id": tinker_run, "path": "t1", "seq_id": 1})["request_id"])
    [listed] = loops.get("/v1/loops/checkpoints", run_id=tinker_run).json()["checkpoints"]
    assert (listed["checkpoint_id"], listed["target"], listed["lora_adapter_config"]) == ("t1", "trainer", {"r": 4})
    by_path = loops.get("/v1/loops/checkpoints", checkpoint_path=f"bt://loops:{tinker_run}/weights/t1").json()
    assert by_path["checkpoints"] == [listed]
    assert loops.get("/v1/loops/capabilities").json() == {
        "supported_models": [{"model_name": MODEL, "max_context_length": 64}]
    }
