"""Limits instead of crashes: request size (413), queued work per user (429, retryable) and open runs per user (429,
not retryable), each with a message naming the limit and the setting that raises it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from typer.testing import CliRunner

from tests.hardening.live import ALICE, BOB, PROTOBUF, Live, start_live
from tests.hardening.protos import fwdbwd_bytes
from tests.worker.harness import BASE
from tinkerd.cli import app
from tinkerd.settings import Settings, SettingsError

pytestmark = pytest.mark.integration

LIMIT = 4096


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Live]:
    live = start_live(tmp_path / "live", max_body_bytes=LIMIT)
    yield live
    live.close()


def _proto(live: Live, body: bytes, **headers: str) -> object:
    return live.client.post("/api/v1/forward_backward", content=body, headers={"content-type": PROTOBUF, **headers})


def test_oversized_bodies_get_413_and_the_server_goes_on(small: Live) -> None:
    run_id = small.run()
    big = fwdbwd_bytes(run_id, 1, list(range(1, 90)) * 20)  # ~1800 tokens: over 4 KiB of protobuf
    assert len(big) > LIMIT
    declared = _proto(small, big)
    assert declared.status_code == 413  # type: ignore[attr-defined]
    assert f"limit of {LIMIT} bytes" in declared.json()["error"]  # type: ignore[attr-defined]
    # A chunked body declares no length: it is counted as it streams in.
    chunked = small.client.post(
        "/api/v1/forward_backward", content=iter([big[:3000], big[3000:]]), headers={"content-type": PROTOBUF}
    )
    assert chunked.status_code == 413 and "--max-body-mb" in chunked.json()["error"]
    streamed_json = small.client.post(
        "/api/v1/create_session", content=iter([b'{"tags": ["', b"x" * LIMIT, b'"]}']),
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert streamed_json.status_code == 413
    # A small zstd body that inflates past the limit (a zip bomb) is stopped while decompressing.
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (LIMIT * 100))
    assert len(bomb) < LIMIT
    inflated = _proto(small, bomb, **{"content-encoding": "zstd"})
    assert inflated.status_code == 413 and "decompressed" in inflated.json()["error"]  # type: ignore[attr-defined]
    # Nothing of these reached the ledger, and the run goes on with the seq_id the refused requests carried.
    ok = _proto(small, fwdbwd_bytes(run_id, 1, [1, 2, 3]))
    assert ok.status_code == 200, ok.text  # type: ignore[attr-defined]
    assert "loss_fn_outputs" in small.result(ok.json()["request_id"])  # type: ignore[attr-defined]


def test_a_full_queue_answers_429_and_lets_retries_and_gap_fillers_through(tmp_path: Path) -> None:
    live = start_live(tmp_path / "live", max_queued_per_user=3, start_worker=False)
    try:
        session_id = live.session()
        create = {"session_id": session_id, "model_seq_id": 0, "base_model": BASE, "lora_config": {"rank": 2}}
        live.ok("create_model", create)  # queued: 1 (seq 0)
        run_id = f"{session_id}:train:0"
        first = _proto(live, fwdbwd_bytes(run_id, 1, [1, 2]))
        assert first.status_code == 200  # type: ignore[attr-defined]
        assert _proto(live, fwdbwd_bytes(run_id, 3, [1, 2])).status_code == 200  # type: ignore[attr-defined]
        # Full (3). The SDK's retry of an accepted request still gets its request back...
        again = _proto(live, fwdbwd_bytes(run_id, 1, [1, 2]))
        assert again.json()["request_id"] == first.json()["request_id"]  # type: ignore[attr-defined]
        # ...and seq 2 fills the gap that seq 3 waits on (refusing it would stall the run for good)...
        assert _proto(live, fwdbwd_bytes(run_id, 2, [1, 2])).status_code == 200  # type: ignore[attr-defined]
        # ...but new work is refused with a 429 the SDK backs off from (Retry-After), naming the limit.
        refused = _proto(live, fwdbwd_bytes(run_id, 4, [1, 2]))
        assert refused.status_code == 429  # type: ignore[attr-defined]
        assert refused.headers["retry-after"] == "1"  # type: ignore[attr-defined]
        assert "--max-queued-per-user" in refused.json()["error"]  # type: ignore[attr-defined]
        sampler = live.sampler()
        sample = {"sampling_session_id": sampler, "seq_id": 0, "num_samples": 1,
                  "prompt": {"chunks": [{"tokens": [1, 2]}]}, "sampling_params": {"max_tokens": 2}}  # fmt: skip
        assert live.post("asample", sample).status_code == 429
        assert live.post("create_model", {**create, "model_seq_id": 1}).status_code == 429
        # The cap is per user: bob is not held up by alice's queue.
        bob_sampler = live.sampler(key=BOB)
        assert live.post("asample", {**sample, "sampling_session_id": bob_sampler}, key=BOB).status_code == 200
        # Once the worker drains the queue, the same requests are accepted and run.
        live.resume()
        live.result(first.json()["request_id"])  # type: ignore[attr-defined]
        for seq in (2, 3):
            live.result(_proto(live, fwdbwd_bytes(run_id, seq, [1, 2])).json()["request_id"])  # type: ignore[attr-defined]
        accepted = _proto(live, fwdbwd_bytes(run_id, 4, [1, 2]))
        assert accepted.status_code == 200, accepted.text  # type: ignore[attr-defined]
        live.result(accepted.json()["request_id"])  # type: ignore[attr-defined]
        live.result(live.ok("asample", sample)["request_id"])
    finally:
        live.close()


def test_open_runs_per_user_are_capped_and_freed_by_ending_the_session(tmp_path: Path) -> None:
    live = start_live(tmp_path / "live", max_runs_per_user=2)
    try:
        session_id = live.session()
        runs = [live.run(session_id=session_id), live.run(session_id=live.session())]
        body = {"session_id": session_id, "model_seq_id": 5, "base_model": BASE, "lora_config": {"rank": 2}}
        refused = live.post("create_model", body)
        assert refused.status_code == 429
        # Not worth retrying: the SDK gives up at once and shows the message.
        assert refused.headers["x-should-retry"] == "false" and "retry-after" not in refused.headers
        assert "2 training runs in open sessions" in refused.json()["error"]
        assert "--max-runs-per-user" in refused.json()["error"]
        # Nothing was left behind by the refusal; a retry of a run that exists is not a new run.
        assert live.get(f"training_runs/{session_id}:train:5").status_code == 404
        retry = {"session_id": session_id, "model_seq_id": 0, "base_model": BASE, "lora_config": {"rank": 2}}
        assert live.post("create_model", retry).status_code == 200
        # Another user has a cap of their own.
        live.run(key=BOB)
        # Ending a session frees its runs' places.
        assert live.post(f"sessions/{session_id}/finish", {"reason": {"type": "success"}}).status_code == 200
        live.run()
        assert live.post("get_info", {"model_id": runs[1]}, key=ALICE).status_code == 200
    finally:
        live.close()


def test_limit_settings_come_from_flags_or_the_environment() -> None:
    env = {"TINKERD_MAX_BODY_MB": "8", "TINKERD_MAX_QUEUED_PER_USER": "5", "TINKERD_MAX_RUNS_PER_USER": "0"}
    settings = Settings.load(env)
    assert (settings.max_body_mb, settings.max_queued_per_user, settings.max_runs_per_user) == (8, 5, 0)
    assert Settings.load(env, max_queued_per_user=7).max_queued_per_user == 7  # a flag wins over the variable
    defaults = Settings.load({})
    assert (defaults.max_body_mb, defaults.max_queued_per_user, defaults.max_runs_per_user) == (256, 1024, 64)
    with pytest.raises(SettingsError, match="TINKERD_MAX_QUEUED_PER_USER must be a whole number"):
        Settings.load({"TINKERD_MAX_QUEUED_PER_USER": "lots"})
    with pytest.raises(SettingsError, match="max_body_mb must be at least 1"):
        Settings.load({}, max_body_mb=0)
    help_text = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200).output
    assert all(flag in help_text for flag in ("--max-body-mb", "--max-queued-per-user", "--max-runs-per-user"))
