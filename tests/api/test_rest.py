"""The RestClient's views: training runs (with user_metadata and last checkpoints), checkpoints, weights_info, TTL."""

from __future__ import annotations

from tests.api.conftest import MODEL, Api


def _run_with_checkpoints(api: Api) -> str:
    model_id = api.model(user_metadata={"team": "x", "n": 3})
    save = {"model_id": model_id, "path": "c1", "seq_id": 1, "user_metadata": {"a": "b"}}
    api.result(api.ok("save_weights", save)["request_id"])
    api.result(api.ok("save_weights_for_sampler", {"model_id": model_id, "path": "s1", "seq_id": 2})["request_id"])
    return model_id


def test_get_training_run(api: Api) -> None:
    model_id = _run_with_checkpoints(api)
    run = api.get(f"training_runs/{model_id}", params={"access_scope": "owned"}).json()
    assert run["training_run_id"] == model_id
    assert (run["base_model"], run["model_owner"], run["is_lora"], run["lora_rank"]) == (MODEL, "local", True, 4)
    assert run["user_metadata"] == {"team": "x", "n": "3"}  # the SDK declares str -> str
    assert run["last_checkpoint"]["tinker_path"] == f"tinker://{model_id}/weights/c1"
    assert run["last_checkpoint"]["checkpoint_type"] == "training"
    assert run["last_checkpoint"]["user_metadata"] == {"a": "b"}
    assert run["last_sampler_checkpoint"]["checkpoint_id"] == "sampler_weights/s1"
    assert api.get("training_runs/no:train:0").status_code == 404
    assert api.get("training_runs/x", params={"access_scope": "everyone"}).status_code == 400


def test_list_training_runs_pages(api: Api) -> None:
    first, second = api.model(), api.model()
    page = api.get("training_runs", params={"limit": 1, "offset": 0}).json()
    assert page["cursor"] == {"offset": 0, "limit": 1, "total_count": 2}
    assert [r["training_run_id"] for r in page["training_runs"]] == [second]
    rest = api.get("training_runs", params={"limit": 1, "offset": 1}).json()
    assert [r["training_run_id"] for r in rest["training_runs"]] == [first]
    assert api.get("training_runs", params={"limit": 0}).status_code == 400


def test_checkpoint_listings_and_weights_info(api: Api) -> None:
    model_id = _run_with_checkpoints(api)
    listed = api.get(f"training_runs/{model_id}/checkpoints").json()
    assert sorted(c["checkpoint_id"] for c in listed["checkpoints"]) == ["sampler_weights/s1", "weights/c1"]
    assert listed["cursor"]["total_count"] == 2
    assert api.get("checkpoints").json()["cursor"]["total_count"] == 2
    info = api.ok("weights_info", {"tinker_path": f"tinker://{model_id}/weights/c1"})
    assert info == {
        "base_model": MODEL, "is_lora": True, "lora_rank": 4, "train_unembed": True, "train_mlp": True,
        "train_attn": True, "optimizer_config": {"type": "adamw"},
    }  # fmt: skip
    assert api.post("weights_info", {"tinker_path": "tinker://nope"}).status_code == 400


def test_publish_and_ttl(api: Api) -> None:
    model_id = _run_with_checkpoints(api)
    base = f"/api/v1/training_runs/{model_id}/checkpoints/weights/c1"
    assert api.client.post(f"{base}/publish").status_code == 200
    assert api.store.checkpoints.get(f"tinker://{model_id}/weights/c1", "local").public
    assert api.client.delete(f"{base}/publish").status_code == 200
    assert api.client.put(f"{base}/ttl", json={"ttl_seconds": 3600}).status_code == 200
    assert api.store.checkpoints.get(f"tinker://{model_id}/weights/c1", "local").expires_at is not None
    assert api.client.put(f"{base}/ttl", json={"ttl_seconds": None}).status_code == 200
    assert api.client.put(f"{base}/ttl", json={"ttl_seconds": -5}).status_code == 400
    assert api.client.post(f"/api/v1/training_runs/{model_id}/checkpoints/bogus/c1/publish").status_code == 400
