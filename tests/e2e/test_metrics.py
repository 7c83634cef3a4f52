"""Step metrics: what the SDK's forward_backward and optim_step return is recorded in the ledger, served as JSON
and CSV to the run's owner only, and shown or plotted by `tinkerd runs metrics`."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import API_KEY, Server
from tests.e2e.test_sdk_training import PROMPT, datum

STEPS = 3
LEARNING_RATES = [1e-2, 5e-3, 2e-3]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "from tinkerd.cli import main; main()", "runs", "metrics", *args]
    env = {**os.environ, "COLUMNS": "200"}  # a wide terminal: rich wraps headers of narrow ones
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, env=env)


def test_training_metrics_are_recorded_served_and_plotted(server: Server, tmp_path: Path) -> None:
    service = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    try:
        training = service.create_lora_training_client(base_model=server.model, rank=4, seed=3).result()
        returned: list[tuple[float, float]] = []
        for lr in LEARNING_RATES:
            fb = training.forward_backward([datum()], "cross_entropy").result()
            step = training.optim_step(types.AdamParams(learning_rate=lr)).result()
            assert step.metrics is not None
            returned.append((fb.metrics["loss:sum"], step.metrics["grad_norm"]))
    finally:
        service.close("success").result()
    run_id = training.model_id
    url = f"{server.url}/api/v1/training_runs/{run_id}/metrics"

    body = httpx.get(url, headers={"X-API-Key": API_KEY}).json()
    rows = body["rows"]
    assert [(r["kind"], r["step"]) for r in rows] == [
        (kind, step) for step in range(STEPS) for kind in ("forward_backward", "optim_step")
    ]
    fbs = [r for r in rows if r["kind"] == "forward_backward"]
    optims = [r for r in rows if r["kind"] == "optim_step"]
    assert [r["loss:sum"] for r in fbs] == pytest.approx([loss for loss, _ in returned])
    # loss per token: the summed loss over the summed weights (every target token weighs 1)
    assert [r["loss_per_token"] for r in fbs] == pytest.approx([loss / (len(PROMPT) - 1) for loss, _ in returned])
    assert [r["learning_rate"] for r in optims] == pytest.approx(LEARNING_RATES)
    assert [r["grad_norm"] for r in optims] == pytest.approx([g for _, g in returned])
    assert fbs[-1]["loss_per_token"] < fbs[0]["loss_per_token"]

    # Polling for new rows only: nothing after the last one.
    later = httpx.get(url, params={"after": body["last_id"]}, headers={"X-API-Key": API_KEY}).json()
    assert later["rows"] == [] and later["last_id"] == body["last_id"]
    tail = httpx.get(url, params={"after": rows[-4]["id"]}, headers={"X-API-Key": API_KEY}).json()["rows"]
    assert [(r["kind"], r["step"]) for r in tail] == [("optim_step", 1), ("forward_backward", 2), ("optim_step", 2)]

    text = httpx.get(url, params={"format": "csv"}, headers={"X-API-Key": API_KEY}).text
    table = list(csv.DictReader(io.StringIO(text)))
    assert len(table) == 2 * STEPS
    assert float(table[1]["learning_rate"]) == pytest.approx(LEARNING_RATES[0]) and table[1]["loss:sum"] == ""

    bad = httpx.get(url, params={"after": -1}, headers={"X-API-Key": API_KEY})
    assert bad.status_code == 400 and "after" in bad.text
    missing = httpx.get(f"{server.url}/api/v1/training_runs/nope:train:0/metrics", headers={"X-API-Key": API_KEY})
    assert missing.status_code == 404

    data_dir = server.log.parent / "data"
    shown = _cli(run_id, "--data-dir", str(data_dir))
    assert shown.returncode == 0, shown.stderr
    assert "loss/token" in shown.stdout and "learning_rate" in shown.stdout
    as_csv = _cli(run_id, "--csv", "--data-dir", str(data_dir))
    assert as_csv.stdout == text
    png = tmp_path / "curves.png"
    plotted = _cli(run_id, "--plot", str(png), "--data-dir", str(data_dir))
    assert plotted.returncode == 0, plotted.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    unknown = _cli("nope:train:0", "--data-dir", str(data_dir))
    assert unknown.returncode == 1 and "nope:train:0" in unknown.stderr
