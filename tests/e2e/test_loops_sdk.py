"""The real Baseten Loops SDK (``baseten-loops`` 0.32.0) and its ``tinker`` shim (``baseten-loops-tinker`` 0.17.0)
against ``tinkerd serve``, unmodified, through ``LOOPS_BASE_URL`` and an API key.

Each runs in its own cached Python 3.12 venv (tests/e2e/loops_venvs.py). The SDK's own request log
(``LOOPS_REQUEST_LOG``) is checked too: every route it took, no 404, no retried submit. If a venv cannot be built
the test fails with pip's output rather than skipping (a skipped compatibility test hides the drift it exists for).
"""

from __future__ import annotations

import json
import math
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import API_KEY, Server
from tests.e2e.loops_venvs import LOOPS, SHIM, loops_python
from tests.e2e.sdk_venvs import SdkVenvError, clean_env

pytestmark = pytest.mark.loops

HERE = Path(__file__).parent
CLIENT_TIMEOUT_S = 600
TARGETS = [330, 1345, 314, 260, 2593, 30, 216, 2]  # loops_client.py's weighted_datum targets


def _python(which: tuple[str, str, str]) -> Path:
    try:
        return loops_python(which)
    except SdkVenvError as error:
        pytest.fail(f"could not build the venv for {which[1]}: {error}")


def _drive(python: Path, script: Path, server: Server, tmp_path: Path, *args: str) -> tuple[dict[str, Any], list[Any]]:
    out, log = tmp_path / "out.json", tmp_path / "wire.jsonl"
    env = {k: v for k, v in clean_env().items() if not k.startswith(("TINKER_", "LOOPS_", "BASETEN_"))}
    env |= {
        "LOOPS_BASE_URL": server.url, "BASETEN_API_KEY": "k-test", "LOOPS_REQUEST_LOG": str(log),
        "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    }  # fmt: skip
    done = subprocess.run(
        [str(python), "-I", str(script), server.model, str(out), *args],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S, env=env,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.fail(f"{script.name} failed (exit {done.returncode}):\n{done.stderr[-6000:]}")
    return json.loads(out.read_text()), [json.loads(line) for line in log.read_text().splitlines()]


def _exchanges(wire: list[Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    requests = {w["seq"]: w for w in wire if w["kind"] == "request"}
    return [(requests[w["seq"]], w) for w in wire if w["kind"] == "response" and w["seq"] in requests]


def _route(path: str) -> str:
    """A logged path with its ids taken out: /loops/trainers/<run>/forward -> trainer:/forward."""
    path = path.split("?", 1)[0]
    for prefix, name in (("/loops/trainers/", "trainer:"), ("/loops/samplers/", "sampler:")):
        if path.startswith(prefix):
            rest = path[len(prefix) :].split("/", 1)[1] if "/" in path[len(prefix) :] else ""
            return name + "/" + ("operations" if rest.startswith("operations/") else rest)
    if path.startswith("/v1/loops/checkpoints/") and path.count("/") == 5:
        return "/v1/loops/checkpoints/<id>/" + path.rsplit("/", 1)[1]
    if path.startswith("/api/v1/files/"):
        return "/api/v1/files"
    return path


def _check_wire(wire: list[Any]) -> Counter[str]:
    """No 404 and no failure anywhere; each submit sent once (a resend reuses its Idempotency-Key)."""
    exchanges = _exchanges(wire)
    assert exchanges, "the SDK logged no requests"
    failed = [
        (q["method"], q["path"], r["status"], r["body"])
        for q, r in exchanges
        if r["status"] >= 400 and r["status"] != 408
    ]
    assert failed == []
    keys = [q["headers"].get("idempotency-key") for q, _ in exchanges if q["method"] == "POST"]
    resent = [k for k, n in Counter(k for k in keys if k).items() if n > 1]
    assert resent == [], "submits were retried"
    return Counter(_route(q["path"]) for q, _ in exchanges)


def test_loops_sdk_trains_saves_samples_and_downloads(server: Server, tmp_path: Path) -> None:
    python = _python(LOOPS)
    download = tmp_path / "download"
    out, wire = _drive(python, HERE / "loops_client.py", server, tmp_path, str(download))
    run = out["run_id"]
    assert out["capabilities"] == [server.model]

    # -100 targets without weights = weights on the real targets; both per-token means (the SDK's "loss").
    assert out["masked_loss"] == pytest.approx(out["weighted_loss"], rel=1e-4)
    assert out["masked_loss"] > 0
    # skip_token_normalization: the sum over the same 5 weighted tokens, and the flag echoed in the metrics.
    assert out["raw_loss"] == pytest.approx(5 * out["weighted_loss"], rel=1e-4)
    assert out["raw_metrics"]["skip_token_normalization"] == 1.0
    assert out["loss_after_step"] < out["weighted_loss"]
    assert out["loss_after_more_steps"] < out["loss_after_step"]
    # The Loops protocol's steps are recorded as the Tinker API's are: the run's curves have them.
    url = f"{server.url}/api/v1/training_runs/{run}/metrics"
    rows = httpx.get(url, headers={"X-API-Key": API_KEY}, timeout=30).json()["rows"]
    kinds = Counter(row["kind"] for row in rows)
    assert kinds["optim_step"] >= 9 and kinds["forward_backward"] >= 9, kinds
    assert all(row["loss:sum"] > 0 for row in rows if row["kind"] == "forward_backward")
    assert all(row["learning_rate"] > 0 for row in rows if row["kind"] == "optim_step")

    # Each save is its own checkpoint; a sampler stays pinned to its save while training goes on.
    assert out["s1_path"].startswith(f"bt://loops:{run}/sampler_weights/step-1")
    assert out["s2_path"].startswith(f"bt://loops:{run}/sampler_weights/step-2")
    assert len(out["s1_first"]) == 6
    assert out["s2_first"] != out["s1_first"]  # eight more steps changed the greedy continuation ...
    assert out["s1_again"] == out["s1_first"]  # ... but not what the first sampler serves
    assert out["standalone"] == out["s1_first"]  # a standalone sampler of that checkpoint (model_path)

    names = {c["name"]: c for c in out["checkpoints"]}
    assert {out["s1_name"], out["s2_path"].rsplit("/", 1)[1]} <= set(names)
    assert names[out["s1_name"]] == {"name": out["s1_name"], "type": "sampler_weights", "target": "sampler", "rank": 4}

    # The files, one per page, then downloaded: the same bytes as tinkerd's checkpoint directory.
    stored = server.log.parent / "data" / "checkpoints" / run / "sampler_weights" / out["s1_name"]
    expected = sorted(str(p.relative_to(stored)) for p in stored.rglob("*") if p.is_file())
    assert out["total_count"] == len(expected) and [f for page in out["pages"] for f in page] == expected
    assert all(len(page) == 1 for page in out["pages"])
    fetched = Path(out["download"]["dir"])
    for name in expected:
        assert (fetched / name).read_bytes() == (stored / name).read_bytes(), name

    # load_state_with_optimizer puts back the saved weights, and training goes on from there.
    assert out["state_path"] == f"bt://loops:{run}/weights/state-1"
    assert out["moved_loss"] != pytest.approx(out["state_loss"], rel=1e-5)
    assert out["reloaded_loss"] == pytest.approx(out["state_loss"], rel=1e-4)
    assert out["load_step"] == 9  # the optimizer steps taken before save_state
    # With the optimizer state back, the same step from the same weights lands exactly where it did before.
    assert out["continued_loss"] == pytest.approx(out["moved_loss"], rel=1e-5)

    # create_training_client_from_state_with_optimizer: a new run with the saved weights.
    assert out["restored_run"] != run
    assert out["restored_loss"] == pytest.approx(out["state_loss"], rel=1e-4)

    _check_losses_and_top_k(out)
    # ServiceClient.local(trainer_url, sampler_url) on a run made over the control plane: it trains and samples.
    local = out["local"]
    assert local["losses"][2] < local["losses"][0]
    assert local["sampled"] == local["base"] and len(local["sampled"]) == 6
    routes = _check_wire(wire)
    for route in (
        "/v1/loops/sessions", "/v1/loops/trainers", "/v1/loops/samplers", "/v1/loops/capabilities",
        "/v1/loops/checkpoints", "/v1/loops/checkpoints/<id>/files", "/api/v1/files",
        "trainer:/health", "trainer:/init_trainer_server", "trainer:/forward", "trainer:/forward_backward",
        "trainer:/optim_step", "trainer:/save_weights_for_sampler", "trainer:/save_state",
        "trainer:/load_state_with_optimizer", "trainer:/operations", "sampler:/sample", "sampler:/operations",
    ):  # fmt: skip
        assert routes[route] > 0, (route, routes)
    # Each run's paired sampler is made once and reused by every save (two runs: the SFT one and the DPO one); the
    # others are the standalone ones (model_path, and the base model the local sampler is compared with).
    assert routes["/v1/loops/samplers"] == 4


def _check_losses_and_top_k(out: dict[str, Any]) -> None:
    # DPO with reference logprobs from a snapshot taken before any step (the SDK's attach_reference_logprobs): the
    # policy is the reference at first, so z = 0 and the loss is log 2; the steps then separate chosen from rejected.
    dpo = out["dpo"]
    assert dpo[0]["loss"] == pytest.approx(math.log(2), abs=2e-3)
    assert dpo[0]["metrics"]["dpo_margin:mean"] == pytest.approx(0.0, abs=5e-3)
    assert [step["loss"] for step in dpo] == sorted((step["loss"] for step in dpo), reverse=True)
    assert dpo[-1]["loss"] < dpo[0]["loss"] - 1e-3 and dpo[-1]["metrics"]["dpo_margin:mean"] > 0
    # dppo on the trainer's own fresh sample: p = q, so no token leaves the trust region and each sampled token
    # contributes -A * p/q = -1; the KL term is 0.
    dppo = out["dppo"]
    assert dppo["trainer_logprobs"] == pytest.approx(dppo["answer_logprobs"], abs=1e-3)
    assert dppo["metrics"]["dppo_masked_fraction:mean"] == 0.0
    assert dppo["loss"] == pytest.approx(-len(dppo["answer_logprobs"]), abs=0.02)
    # top_k_logprobs=3: [T, 3] per datum, most likely first; the target's own logprob agrees where it is among them.
    top = out["top_k"]
    positions = top["logprobs"]["shape"][0]
    assert top["top_k_logprobs"]["shape"] == [positions, 3] == top["top_k_token_ids"]["shape"]
    assert top["top_k_token_ids"]["dtype"] == "int64"
    values, ids = top["top_k_logprobs"]["data"], top["top_k_token_ids"]["data"]
    for t, target_logprob in enumerate(top["logprobs"]["data"]):
        row, row_ids = values[3 * t : 3 * t + 3], ids[3 * t : 3 * t + 3]
        assert row == sorted(row, reverse=True) and target_logprob <= row[0] + 1e-5
        target = TARGETS[t]
        if target in row_ids:
            assert row[row_ids.index(target)] == pytest.approx(target_logprob, abs=1e-5)


def test_the_tinker_shim_runs_a_short_sft_loop(server: Server, tmp_path: Path) -> None:
    python = _python(SHIM)
    out, wire = _drive(python, HERE / "loops_shim_client.py", server, tmp_path)
    assert out["shim_version"] == SHIM[1].split("==")[1]
    losses = out["losses"]
    # 4 Adam steps at lr 0.01 from a random adapter seed: the loss falls over the loop, though a step may overshoot
    assert losses[-1] < losses[0] - 0.1 and min(losses) < losses[0], losses
    samples = out["samples"]
    # greedy: both samples alike; at most max_tokens, fewer when the model ends its turn (the sampler stops at eos)
    assert len(samples) == 2 and samples[0] == samples[1] and 1 <= len(samples[0]) <= 5
    assert "adapter_model.safetensors" in out["files"]
    routes = _check_wire(wire)
    assert routes["trainer:/forward_backward"] == 4 and routes["trainer:/optim_step"] == 4


def test_loops_sdk_trains_and_samples_with_an_image(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """A tiny random Qwen2.5-VL: an image datum trains, and a prompt with an image samples (the SDK sends it as
    ``model_input_chunks``); the prompt the sampler echoes holds the image's placeholder tokens."""
    from tests.e2e.conftest import start_server, stop_server
    from tests.engine.tiny_vlm import IMAGE, VISION_END, VISION_START, image_bytes, processor_tokens, save_tiny_vl

    python = _python(LOOPS)
    model = save_tiny_vl(tmp_path_factory.mktemp("models") / "tiny-qwen2.5-vl", "qwen2_5_vl")
    picture = tmp_path / "picture.png"
    picture.write_bytes(image_bytes(48, 40))
    n = processor_tokens("qwen2_5_vl", picture.read_bytes())
    server = start_server(tmp_path_factory.mktemp("serve-vl"), model)
    try:
        ids = f"{VISION_START},{VISION_END},{IMAGE}"
        out, wire = _drive(python, HERE / "loops_image_client.py", server, tmp_path, str(picture), str(n), ids)
    finally:
        stop_server(server.process)
    assert out["losses"][-1] < out["losses"][0] - 0.1, out["losses"]  # the loss before each of 4 steps
    expanded = [1, VISION_START, *[IMAGE] * n, VISION_END, 10]
    assert out["prompt_token_ids"] == expanded
    assert len(out["prompt_logprobs"]) == len(expanded) and out["prompt_logprobs"][0] is None
    assert all(isinstance(lp, float) for lp in out["prompt_logprobs"][1:])
    samples = out["samples"]
    assert len(samples) == 2 and samples[0] == samples[1] and 1 <= len(samples[0]) <= 3  # greedy
    assert "expected_tokens is" in out["refused"], out["refused"]
    routes = Counter(_route(q["path"]) for q, _ in _exchanges(wire))
    assert routes["sampler:/sample"] == 2 and routes["trainer:/forward_backward"] == 4
