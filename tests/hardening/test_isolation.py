"""Isolation with keys configured: alice can list, read, sample from, load or change nothing of bob's (runs,
sessions, samplers, checkpoints, futures) unless bob published a checkpoint, which alice may then load and sample.

Every refusal is a 404 that says "unknown ..." (never a 403: another user's ids are not confirmed to exist), and
nothing is queued or changed for bob. Downloads and deletion are covered where those routes live.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.hardening.fixtures import World, make_world
from tests.hardening.live import ALICE, BOB, PROTOBUF, Live, start_live
from tests.hardening.protos import fwdbwd_bytes
from tests.worker.harness import BASE

pytestmark = pytest.mark.integration


def _bob_state(live: Live, world: World) -> Any:
    """What alice must never change: bob's futures, runs, checkpoints (with their flags), samplers, sessions."""
    bob = world.bob
    checkpoints = live.store.checkpoints.list_for_run(bob.run_id, "bob", limit=100)
    return (
        live.store.futures.next_seq(bob.run_id),
        live.store.admission.queued("bob"),
        live.store.runs.get(bob.run_id, "bob"),
        [(c.tinker_path, c.public, c.expires_at) for c in checkpoints.items],
        live.store.samplers.get(bob.sampler_id, "bob"),
        live.store.sessions.get(bob.session_id, "bob").status,
    )


# (what, request as alice) for every way of reaching one of bob's things. Each must be a 404.
Request = Callable[[Live, World], Any]
FORBIDDEN: dict[str, Request] = {
    "get his training run": lambda live, w: live.get(f"training_runs/{w.bob.run_id}"),
    "get his run, accessible scope": lambda live, w: live.get(
        f"training_runs/{w.bob.run_id}", params={"access_scope": "accessible"}
    ),
    "list his run's checkpoints": lambda live, w: live.get(f"training_runs/{w.bob.run_id}/checkpoints"),
    "get_info of his run": lambda live, w: live.post("get_info", {"model_id": w.bob.run_id}),
    "get his session": lambda live, w: live.get(f"sessions/{w.bob.session_id}"),
    "heartbeat his session": lambda live, w: live.post("session_heartbeat", {"session_id": w.bob.session_id}),
    "finish his session": lambda live, w: live.post(f"sessions/{w.bob.session_id}/finish", {}),
    "get his sampler": lambda live, w: live.get(f"samplers/{w.bob.sampler_id}"),
    "retrieve his future": lambda live, w: live.post("retrieve_future", {"request_id": w.bob.request_id}),
    "weights_info of his checkpoint": lambda live, w: live.post("weights_info", {"tinker_path": w.bob.weights_path}),
    "forward_backward on his run": lambda live, w: live.client.post(
        "/api/v1/forward_backward", content=fwdbwd_bytes(w.bob.run_id, 99, [1, 2]), headers={"content-type": PROTOBUF}
    ),
    "forward (JSON) on his run": lambda live, w: live.post(
        "forward",
        {"forward_input": {"data": [], "loss_fn": "cross_entropy"}, "model_id": w.bob.run_id, "seq_id": 99},
    ),
    "optim_step on his run": lambda live, w: live.post("optim_step", {"model_id": w.bob.run_id, "seq_id": 99}),
    "save_weights of his run": lambda live, w: live.post(
        "save_weights", {"model_id": w.bob.run_id, "path": "stolen", "seq_id": 99}
    ),
    "save_weights_for_sampler of his run": lambda live, w: live.post(
        "save_weights_for_sampler", {"model_id": w.bob.run_id, "path": "stolen", "seq_id": 99}
    ),
    "snapshot his run into a sampler": lambda live, w: live.post(
        "save_weights_for_sampler", {"model_id": w.bob.run_id, "sampling_session_seq_id": 7, "seq_id": 99}
    ),
    "unload his run": lambda live, w: live.post("unload_model", {"model_id": w.bob.run_id}),
    "load his checkpoint into her run": lambda live, w: live.post(
        "load_weights", {"model_id": w.alice.run_id, "path": w.bob.weights_path, "seq_id": 10**6}
    ),
    "load his checkpoint into a new run": lambda live, w: live.post(
        "load_weights", {"session_id": w.alice.session_id, "model_seq_id": 50, "path": w.bob.weights_path}
    ),
    "create_model on his session": lambda live, w: live.post(
        "create_model", {"session_id": w.bob.session_id, "model_seq_id": 50, "base_model": BASE}
    ),
    "sample from his checkpoint": lambda live, w: live.post(
        "create_sampling_session",
        {"session_id": w.alice.session_id, "sampling_session_seq_id": 50, "model_path": w.bob.sampler_path},
    ),
    "create a sampler on his session": lambda live, w: live.post(
        "create_sampling_session", {"session_id": w.bob.session_id, "sampling_session_seq_id": 50, "base_model": BASE}
    ),
    "asample with his sampler": lambda live, w: live.post(
        "asample",
        {
            "sampling_session_id": w.bob.sampler_id,
            "seq_id": 0,
            "prompt": {"chunks": [{"tokens": [1, 2]}]},
            "sampling_params": {"max_tokens": 2},
        },
    ),
    "publish his checkpoint": lambda live, w: live.post(f"training_runs/{w.bob.run_id}/checkpoints/weights/c1/publish"),
    "unpublish his checkpoint": lambda live, w: live.client.delete(
        f"/api/v1/training_runs/{w.bob.run_id}/checkpoints/weights/c1/publish"
    ),
    "set the TTL of his checkpoint": lambda live, w: live.client.put(
        f"/api/v1/training_runs/{w.bob.run_id}/checkpoints/weights/c1/ttl", json={"ttl_seconds": 1}
    ),
}


@pytest.mark.parametrize("what", FORBIDDEN)
def test_alice_cannot_reach_bobs_things(live: Live, world: World, what: str) -> None:
    before = _bob_state(live, world)
    response = FORBIDDEN[what](live, world)
    assert response.status_code == 404, (what, response.status_code, response.text)
    assert "unknown" in response.json()["error"] or "not found" in response.json()["error"], response.text
    assert world.bob.run_id not in response.text or "unknown" in response.text
    assert _bob_state(live, world) == before


def test_listings_show_only_her_own(live: Live, world: World) -> None:
    runs = live.get("training_runs", params={"limit": 100}).json()["training_runs"]
    assert {run["training_run_id"] for run in runs} >= {world.alice.run_id}
    assert all(run["model_owner"] == "alice" for run in runs)
    accessible = live.get("training_runs", params={"limit": 100, "access_scope": "accessible"}).json()
    assert world.bob.run_id not in {run["training_run_id"] for run in accessible["training_runs"]}
    checkpoints = live.get("checkpoints").json()["checkpoints"]
    assert checkpoints and all(world.alice.run_id in c["tinker_path"] for c in checkpoints)
    sessions = live.get("sessions", params={"limit": 100}).json()["sessions"]
    assert world.alice.session_id in sessions and world.bob.session_id not in sessions


def test_keys_are_required_and_checked(live: Live) -> None:
    for headers in ({"X-API-Key": "tml-nobody"}, {"X-API-Key": ""}):
        response = live.client.get("/api/v1/training_runs", headers=headers)
        assert response.status_code == 401 and "key" in response.json()["error"].lower()
    anonymous = live.client.post("/api/v1/create_session", json={}, headers={"X-API-Key": ""})
    assert anonymous.status_code == 401


def test_a_published_checkpoint_can_be_loaded_and_sampled_until_unpublished(tmp_path_factory: Any) -> None:
    live = start_live(tmp_path_factory.mktemp("published"))
    try:
        world = make_world(live)
        bob = world.bob
        private = {"model_id": bob.run_id, "path": "private", "seq_id": live.next_seq(bob.run_id)}
        live.result(live.ok("save_weights", private, key=BOB)["request_id"], key=BOB)
        for kind in ("weights/c1", "sampler_weights/s1"):
            assert live.post(f"training_runs/{bob.run_id}/checkpoints/{kind}/publish", key=BOB).status_code == 200
        # Alice may now read the checkpoint's facts, load it into a new run, and sample from it...
        assert live.post("weights_info", {"tinker_path": bob.weights_path}).json()["base_model"] == BASE
        assert live.get(f"training_runs/{bob.run_id}", params={"access_scope": "accessible"}).status_code == 200
        load = {"session_id": world.alice.session_id, "model_seq_id": 7, "path": bob.weights_path, "optimizer": True}
        loaded = live.result(live.ok("load_weights", load)["request_id"])
        assert loaded["model_id"] == f"{world.alice.session_id}:train:7"
        assert live.store.runs.get(loaded["model_id"], "alice").owner == "alice"  # the new run is hers
        sampler = live.sampler(model_path=bob.sampler_path)
        sample = {"sampling_session_id": sampler, "seq_id": 0, "num_samples": 2,
                  "prompt": {"chunks": [{"tokens": [1, 2, 3]}]}, "sampling_params": {"max_tokens": 3}}  # fmt: skip
        assert len(live.result(live.ok("asample", sample)["request_id"])["sequences"]) == 2
        # ...but still not change it (visible to her now, so a 403 naming the owner rule), nor touch his run.
        refused = live.post(f"training_runs/{bob.run_id}/checkpoints/weights/c1/publish")
        assert refused.status_code == 403 and "owner" in refused.json()["error"]
        ttl = {"ttl_seconds": 5}
        refused = live.client.put(f"/api/v1/training_runs/{bob.run_id}/checkpoints/weights/c1/ttl", json=ttl)
        assert refused.status_code == 403 and "owner" in refused.json()["error"]
        assert live.post("optim_step", {"model_id": bob.run_id, "seq_id": 99}).status_code == 404
        listed = live.get(f"training_runs/{bob.run_id}/checkpoints").json()["checkpoints"]
        assert sorted(c["checkpoint_id"] for c in listed) == ["sampler_weights/s1", "weights/c1"]  # not "private"
        private_path = bob.weights_path.replace("/c1", "/private")
        assert live.post("weights_info", {"tinker_path": private_path}).status_code == 404
        # Unpublished: closed again for new loads and samplers.
        unpublish = f"/api/v1/training_runs/{bob.run_id}/checkpoints/weights/c1/publish"
        assert live.client.delete(unpublish, headers={"X-API-Key": BOB}).status_code == 200
        load = {**load, "model_seq_id": 8}
        assert live.post("load_weights", load).status_code == 404
        assert live.post("weights_info", {"tinker_path": bob.weights_path}).status_code == 404
    finally:
        live.close()


def test_the_same_ids_under_two_users_do_not_collide(live: Live, world: World) -> None:
    """Bob cannot claim alice's seq_ids either: a retry-looking request of his is refused, hers stays hers."""
    response = live.client.post(
        "/api/v1/forward_backward",
        content=fwdbwd_bytes(world.alice.run_id, 1, [1, 2]),
        headers={"content-type": PROTOBUF, "X-API-Key": BOB},
    )
    assert response.status_code == 404
    mine = live.post("retrieve_future", {"request_id": world.alice.request_id}, key=ALICE)
    assert mine.status_code == 200 and "loss_fn_outputs" in mine.json()
