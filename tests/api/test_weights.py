"""Saving and loading weights: save_weights, save_weights_for_sampler (named and ephemeral), load_weights (both
addressing modes)."""

from __future__ import annotations

from tests.api.conftest import MODEL, Api


def _save_state(api: Api, model_id: str, seq_id: int, name: str = "ckpt1", **extra: object) -> dict[str, object]:
    body = {"model_id": model_id, "path": name, "seq_id": seq_id, "overwrite": False, "type": "save_weights", **extra}
    return api.result(api.ok("save_weights", body)["request_id"])


def test_save_weights_returns_the_tinker_path(api: Api) -> None:
    model_id = api.model()
    result = _save_state(api, model_id, 1, ttl_seconds=7200, user_metadata={"step": "1"})
    assert result == {"type": "save_weights", "path": f"tinker://{model_id}/weights/ckpt1", "model_id": model_id}


def test_save_weights_refuses_bad_names_and_ttls(api: Api) -> None:
    model_id = api.model()
    for name in ("../x", "a/b", ".hidden", "with space"):
        response = api.post("save_weights", {"model_id": model_id, "path": name, "seq_id": 1})
        assert response.status_code == 400, name
        assert "checkpoint name" in response.json()["error"]
    no_ttl = api.post("save_weights", {"model_id": model_id, "path": "ok", "seq_id": 1, "ttl_seconds": 0})
    assert no_ttl.status_code == 400 and "ttl_seconds" in no_ttl.json()["error"]
    assert api.post("save_weights", {"model_id": "s:train:3", "path": "ok", "seq_id": 1}).status_code == 404


def test_save_weights_for_sampler_named(api: Api) -> None:
    model_id = api.model()
    body = {"model_id": model_id, "path": "samp1", "kind": "snapshot", "seq_id": 1, "type": "save_weights_for_sampler"}
    result = api.result(api.ok("save_weights_for_sampler", body)["request_id"])
    assert result == {
        "type": "save_weights_for_sampler", "path": f"tinker://{model_id}/sampler_weights/samp1", "model_id": model_id,
    }  # fmt: skip


def test_save_weights_for_sampler_ephemeral_creates_a_sampler(api: Api) -> None:
    session_id = api.session()
    model_id = api.model(session_id)
    body = {"model_id": model_id, "sampling_session_seq_id": 0, "kind": "snapshot", "seq_id": 1}
    result = api.result(api.ok("save_weights_for_sampler", body)["request_id"])
    sampler_id = f"{session_id}:sample:0"
    assert result == {"type": "save_weights_for_sampler", "sampling_session_id": sampler_id}
    sampler = api.store.samplers.get(sampler_id, "local")
    assert (sampler.run_id, sampler.run_version, sampler.base_model) == (model_id, 1, MODEL)
    view = api.get(f"samplers/{sampler_id}").json()
    assert view == {"sampler_id": sampler_id, "base_model": MODEL}


def test_save_weights_for_sampler_needs_a_name_or_a_sampling_seq(api: Api) -> None:
    model_id = api.model()
    response = api.post("save_weights_for_sampler", {"model_id": model_id, "seq_id": 1})
    assert response.status_code == 400 and "sampling_session_seq_id" in response.json()["error"]


def test_load_weights_into_an_existing_run(api: Api) -> None:
    model_id = api.model()
    path = f"tinker://{model_id}/weights/ckpt1"
    _save_state(api, model_id, 1)
    body = {"model_id": model_id, "seq_id": 2, "path": path, "optimizer": True, "type": "load_weights"}
    assert api.result(api.ok("load_weights", body)["request_id"]) == {
        "type": "load_weights", "path": path, "model_id": model_id,
    }  # fmt: skip


def test_load_weights_by_session_creates_the_run_the_sdk_names(api: Api) -> None:
    source = api.model(user_metadata={"origin": "a"})
    _save_state(api, source, 1)
    session_id = api.session()
    body = {
        "session_id": session_id, "model_seq_id": 3, "path": f"tinker://{source}/weights/ckpt1", "optimizer": False,
        "user_metadata": {"copy": "yes"}, "type": "load_weights",
    }  # fmt: skip
    future = api.ok("load_weights", body)
    new_id = f"{session_id}:train:3"
    assert future["model_id"] == new_id
    api.result(future["request_id"])
    info = api.ok("get_info", {"model_id": new_id})
    assert (info["model_id"], info["lora_rank"], info["model_data"]["model_name"]) == (new_id, 4, MODEL)
    assert api.store.runs.get(new_id, "local").user_metadata == {"copy": "yes"}
    executed = api.worker.executed[-1]
    assert (executed.model_id, executed.seq_id) == (new_id, 0)


def test_load_weights_refuses_bad_paths(api: Api) -> None:
    model_id = api.model()
    for seq_id, (path, status) in enumerate(
        (
            ("s3://bucket/x", 400),
            ("tinker://run/weights", 400),
            (f"tinker://{model_id}/sampler_weights/x", 400),
            (f"tinker://{model_id}/weights/missing", 404),
        ),
        start=1,
    ):
        response = api.post("load_weights", {"model_id": model_id, "seq_id": seq_id, "path": path, "optimizer": False})
        assert response.status_code == status, (path, response.text)
    _save_state(api, model_id, 5)
    neither = api.post("load_weights", {"path": f"tinker://{model_id}/weights/ckpt1", "optimizer": False})
    assert neither.status_code == 400 and "session_id" in neither.json()["error"]
