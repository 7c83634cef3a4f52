"""Older `tinker` SDKs against `tinkerd serve`: the core flow, so that protocol drift shows up as a failing test.

Each version runs tests/e2e/old_sdk_client.py in its own venv (tests/e2e/sdk_venvs.py; cached under the tinkerd
cache dir) against the session's server, and the SDK's answers are checked here. The versions span the wire eras
(../shared/docs/tinker-wire-protocol.md §7):

- 0.15.0: no /client/config; JSON /forward and /forward_backward bodies; every result as JSON.
- 0.24.1: /client/config; JSON /forward and /forward_backward bodies; results as protobuf when offered.
- 0.25.0: protobuf /forward_backward only (forward is forward_only); protobuf results; /client/dynamic_config.

If the venv cannot be built (no package registry), the test FAILS with pip's output rather than skipping: a skipped
compatibility test would hide exactly the drift it exists to catch.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Server
from tests.e2e.sdk_venvs import SdkVenvError, clean_env, sdk_python

pytestmark = [pytest.mark.e2e, pytest.mark.oldsdk]

CLIENT = Path(__file__).with_name("old_sdk_client.py")
PROMPT_LEN = 7  # old_sdk_client.PROMPT
CLIENT_TIMEOUT_S = 600


@dataclass(frozen=True)
class Era:
    version: str
    asks_client_config: bool
    forward_endpoint: str  # where TrainingClient.forward goes
    fwd_bwd_body: str  # Content-Type of /forward_backward
    proto_results: bool  # whether any retrieve_future answer is protobuf


ERAS = [
    Era("0.15.0", asks_client_config=False, forward_endpoint="/api/v1/forward", fwd_bwd_body="application/json",
        proto_results=False),
    Era("0.24.1", asks_client_config=True, forward_endpoint="/api/v1/forward", fwd_bwd_body="application/json",
        proto_results=True),
    Era("0.25.0", asks_client_config=True, forward_endpoint="/api/v1/forward_backward",
        fwd_bwd_body="application/x-protobuf", proto_results=True),
]  # fmt: skip


def _run_client(python: Path, server: Server, out: Path) -> dict[str, Any]:
    done = subprocess.run(
        [str(python), "-I", str(CLIENT), server.url, server.model, str(out)],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
        env={k: v for k, v in clean_env().items() if not k.startswith("TINKER_")} | {"HF_HUB_OFFLINE": "1"},
    )
    if done.returncode != 0:
        pytest.fail(f"the old SDK's flow failed (exit {done.returncode}):\n{done.stderr[-6000:]}")
    return json.loads(out.read_text())


def _loss(forward: dict[str, Any]) -> float:
    return float(forward["metrics"]["loss:sum"])


def _logprobs(forward: dict[str, Any]) -> list[float]:
    [values] = forward["logprobs"]  # one datum
    return values


@pytest.mark.parametrize("era", ERAS, ids=[era.version for era in ERAS])
def test_core_flow_with_an_older_sdk(era: Era, server: Server, tmp_path: Path) -> None:
    try:
        python = sdk_python(era.version)
    except SdkVenvError as error:
        pytest.fail(f"could not build the venv for tinker=={era.version}: {error}")
    out = _run_client(python, server, tmp_path / "out.json")
    assert out["sdk_version"] == era.version
    run = out["model_id"]

    assert out["capabilities"] == [server.model]
    assert out["info"] == {"model_name": server.model, "lora_rank": 4}

    # forward: per-token logprobs of the targets, and a loss:sum that is their negated sum.
    before = out["forward_before"]
    assert len(_logprobs(before)) == PROMPT_LEN - 1 and all(lp < 0 for lp in _logprobs(before))
    assert _loss(before) == pytest.approx(-sum(_logprobs(before)), rel=1e-4)

    # forward_backward + optim_step: the loss falls at every step and the first step saw the untrained adapter.
    losses = out["train_losses"]
    assert losses[0] == pytest.approx(_loss(before), rel=1e-3)
    assert all(later < earlier for earlier, later in pairwise(losses)), losses
    after = out["forward_after"]
    assert _loss(after) < losses[-1]
    assert isinstance(out["optim_metrics"], dict)

    # save_state, then three ways back to it: a new run from the state (with and without optimizer), load_state.
    assert out["state_path"] == f"tinker://{run}/weights/old-sdk-state"
    assert out["restored_model_id"] != run
    for key in ("restored_forward", "reloaded_forward", "with_optimizer_forward"):
        assert _logprobs(out[key]) == pytest.approx(_logprobs(after), abs=1e-4), key
    assert _loss(out["moved_forward"]) < _loss(after)  # the step between save and load did change the weights

    # A sampler checkpoint of the reloaded weights: greedy samples agree with each other and with the snapshot.
    assert out["sampler_path"] == f"tinker://{run}/sampler_weights/old-sdk-sampler"
    greedy = out["greedy"]["sequences"]
    assert len(greedy) == 2 and greedy[0]["tokens"] == greedy[1]["tokens"]
    for sequence in greedy:
        assert sequence["stop_reason"] == "length" and len(sequence["tokens"]) == 6
        assert len(sequence["logprobs"]) == 6 and all(lp <= 0 for lp in sequence["logprobs"])
    assert out["snapshot_greedy"]["sequences"][0]["tokens"] == greedy[0]["tokens"]
    assert out["greedy_with_prompt_logprobs"]["sequences"][0]["tokens"] == greedy[0]["tokens"]
    assert out["async"]["sample"]["sequences"][0]["tokens"] == greedy[0]["tokens"]
    assert _logprobs(out["async"]["forward"]) == pytest.approx(_logprobs(after), abs=1e-4)

    # compute_logprobs / prompt logprobs: none for the first token, then the trained model's logprobs of the prompt
    # (the sampler decodes in fp32, training runs in bf16, hence the tolerance).
    computed = out["compute_logprobs"]
    assert computed[0] is None and len(computed) == PROMPT_LEN
    assert computed[1:] == pytest.approx(_logprobs(after), abs=0.05)
    assert out["greedy_with_prompt_logprobs"]["prompt_logprobs"] == pytest.approx(computed, abs=1e-4)

    # The flow took this version's wire path, and every exchange succeeded (no retries, no tolerated 404s).
    wire = out["wire"]
    assert [w for w in wire if w["status"] != 200] == []
    paths = {w["path"] for w in wire}
    assert ("/api/v1/client/config" in paths) == era.asks_client_config
    assert era.forward_endpoint in paths
    assert ("/api/v1/forward" in paths) == (era.forward_endpoint == "/api/v1/forward")
    assert {w["content_type"] for w in wire if w["path"] == "/api/v1/forward_backward"} == {era.fwd_bwd_body}
    result_types = {w["response_type"] for w in wire if w["path"] == "/api/v1/retrieve_future"}
    assert ("application/x-protobuf" in result_types) == era.proto_results
