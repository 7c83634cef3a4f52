"""Real things to aim hostile requests at: each user's session, run, checkpoints, samplers and a finished request."""

from __future__ import annotations

from dataclasses import dataclass

from tests.hardening.live import ALICE, BOB, PROTOBUF, Live
from tests.hardening.protos import fwdbwd_bytes
from tinkerd.api.app import API_PREFIX


@dataclass(frozen=True)
class Owned:
    session_id: str
    run_id: str
    weights_path: str  # tinker://<run>/weights/c1
    sampler_path: str  # tinker://<run>/sampler_weights/s1
    sampler_id: str
    request_id: str  # a finished forward_backward


def make_owned(live: Live, key: str) -> Owned:
    session_id = live.session(key=key)
    run_id = live.run(key=key, session_id=session_id)
    response = live.client.post(
        f"{API_PREFIX}/forward_backward",
        content=fwdbwd_bytes(run_id, live.next_seq(run_id), [5, 6, 7]),
        headers={"content-type": PROTOBUF, "X-API-Key": key},
    )
    assert response.status_code == 200, response.text
    request_id = response.json()["request_id"]
    live.result(request_id, key=key)
    save = {"model_id": run_id, "path": "c1", "seq_id": live.next_seq(run_id)}
    weights_path = live.result(live.ok("save_weights", save, key=key)["request_id"], key=key)["path"]
    save = {"model_id": run_id, "path": "s1", "seq_id": live.next_seq(run_id)}
    sampler_path = live.result(live.ok("save_weights_for_sampler", save, key=key)["request_id"], key=key)["path"]
    sampler_id = live.sampler(key=key, model_path=sampler_path)
    return Owned(session_id, run_id, weights_path, sampler_path, sampler_id, request_id)


@dataclass(frozen=True)
class World:
    alice: Owned  # the caller in fuzz tests
    bob: Owned  # someone else: nothing of his may be reachable

    def pools(self) -> dict[str, list[str]]:
        """Field name -> values worth trying for it: the caller's own, the other user's, near misses."""
        a, b = self.alice, self.bob
        runs = [a.run_id, b.run_id, a.run_id + "0", f"{a.session_id}:train:9"]
        paths = [a.weights_path, a.sampler_path, b.weights_path, b.sampler_path, a.weights_path + "x"]
        return {
            "session_id": [a.session_id, b.session_id],
            "model_id": runs,
            "run_id": runs,
            "sampling_session_id": [a.sampler_id, b.sampler_id],
            "sampler_id": [a.sampler_id, b.sampler_id],
            "base_model": ["tiny-llama", "HuggingFaceTB/SmolLM2-135M-Instruct"],
            "path": [*paths, "c2", "s2"],
            "model_path": paths,
            "tinker_path": paths,
            "request_id": [a.request_id, b.request_id],
            "kind": ["weights", "sampler_weights"],
            "name": ["c1", "s1"],
            "type": ["encoded_text", "image", "adamw", "success"],
            "loss_fn": ["cross_entropy", "ppo", "importance_sampling", "cispo", "dro", "gspo", "nope"],
        }


def make_world(live: Live) -> World:
    return World(alice=make_owned(live, ALICE), bob=make_owned(live, BOB))
