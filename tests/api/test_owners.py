"""Owner isolation with a keys file: every row is scoped to the user of the calling key."""

from __future__ import annotations

from tests.api.conftest import MODEL, Api, MakeApi


def _as(api: Api, key: str) -> Api:
    api.client.headers["X-API-Key"] = key
    return api


def test_users_cannot_see_or_touch_each_others_work(make_api: MakeApi) -> None:
    api = make_api(api_keys={"tml-alice": "alice", "tml-bob": "bob"})
    alice_session = _as(api, "tml-alice").session()
    model_id = api.model(alice_session)
    request_id = api.forward_backward(model_id, 1).json()["request_id"]
    api.result(request_id)
    body = {"model_id": model_id, "path": "c1", "seq_id": 2}
    path = api.result(api.ok("save_weights", body)["request_id"])["path"]
    assert api.store.runs.get(model_id, "alice").owner == "alice"

    _as(api, "tml-bob")
    assert api.post("get_info", {"model_id": model_id}).status_code == 404
    assert api.forward_backward(model_id, 3).status_code == 404
    assert api.post("retrieve_future", {"request_id": request_id}).status_code == 404
    assert api.get(f"training_runs/{model_id}").status_code == 404
    assert api.get(f"training_runs/{model_id}/metrics").status_code == 404
    assert api.get(f"training_runs/{model_id}/metrics", params={"format": "csv"}).status_code == 404
    assert api.get("training_runs").json()["training_runs"] == []
    assert api.get("checkpoints").json()["checkpoints"] == []
    assert api.post("session_heartbeat", {"session_id": alice_session}).status_code == 404
    # Bob cannot hang a model or a sampler on Alice's session, nor load her checkpoint.
    create = {"session_id": alice_session, "model_seq_id": 1, "base_model": MODEL, "lora_config": {"rank": 4}}
    assert api.post("create_model", create).status_code == 404
    bob_session = api.session()
    load = {"session_id": bob_session, "model_seq_id": 0, "path": path, "optimizer": False}
    assert api.post("load_weights", load).status_code == 404
    sampler = {
        "session_id": bob_session,
        "sampling_session_seq_id": 0,
        "model_path": path.replace("weights", "sampler_weights"),
    }
    assert api.post("create_sampling_session", sampler).status_code == 404


def test_published_checkpoints_are_readable_by_others(make_api: MakeApi) -> None:
    api = make_api(api_keys={"tml-alice": "alice", "tml-bob": "bob"})
    model_id = _as(api, "tml-alice").model()
    path = api.result(api.ok("save_weights", {"model_id": model_id, "path": "c1", "seq_id": 1})["request_id"])["path"]
    assert api.post(f"training_runs/{model_id}/checkpoints/weights/c1/publish").status_code == 200

    bob_session = _as(api, "tml-bob").session()
    load = {"session_id": bob_session, "model_seq_id": 0, "path": path, "optimizer": False}
    future = api.ok("load_weights", load)
    api.result(future["request_id"])
    assert api.store.runs.get(f"{bob_session}:train:0", "bob").base_model == MODEL
    assert api.get(f"training_runs/{model_id}", params={"access_scope": "accessible"}).status_code == 200
    # Only the owner may change it: others, who can see it, are told so.
    assert api.post(f"training_runs/{model_id}/checkpoints/weights/c1/publish").status_code == 403
