"""tinker-cookbook recipes, unmodified, as `python -m tinker_cookbook.recipes...` subprocesses against `tinkerd serve`.

The server is the e2e suite's (a subprocess on 127.0.0.1; by default the tiny random Llama with SmolLM2's tokenizer,
served under its directory, which the recipes then get as ``model_name``: the cookbook loads a tokenizer from a
directory). Everything is offline: HF_HUB_OFFLINE and HF_DATASETS_OFFLINE, telemetry off, and a proxy on a closed
loopback port for the one URL the cookbook fetches by itself (its pricing table; a failure there is only a warning).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tinker

from tests.e2e.conftest import API_KEY, server, tiny_model_dir, tokenizer_source  # noqa: F401  (fixtures)

RENDERER = "qwen3_instruct"  # ChatML without <think>: SmolLM2's format (docs/tinker-cookbook-offline.md)
RECIPE_TIMEOUT_S = 900.0

pytest.importorskip("tinker_cookbook", reason="tinker-cookbook is installed by `make install`")


def conversations_jsonl() -> Path:
    """The 128 short chats that ship inside the tinker-cookbook wheel."""
    import tinker_cookbook

    return Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"


def recipe_env(base_url: str, hf_home: Path | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "TINKER_BASE_URL": base_url,
        "TINKER_API_KEY": API_KEY,
        "TINKER_TELEMETRY": "0",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "https_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "no_proxy": "127.0.0.1,localhost",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    if hf_home is not None:
        env["HF_HOME"] = str(hf_home)
    return env


@dataclass(frozen=True)
class RecipeRun:
    log_path: Path
    output: str

    def metrics(self) -> list[dict[str, Any]]:
        lines = (self.log_path / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def checkpoints(self) -> list[dict[str, Any]]:
        lines = (self.log_path / "checkpoints.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]


def run_recipe(module: str, args: Mapping[str, object], env: Mapping[str, str], log_path: Path) -> RecipeRun:
    """``python -m <module> key=value ... log_path=<log_path>``; raises with the recipe's output if it fails."""
    argv = [f"{key}={value}" for key, value in args.items()] + [f"log_path={log_path}"]
    done = subprocess.run(
        [sys.executable, "-m", module, *argv],
        env=dict(env),
        cwd=log_path.parent,
        capture_output=True,
        text=True,
        timeout=RECIPE_TIMEOUT_S,
    )
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise AssertionError(f"{module} exited with {done.returncode}:\n{output[-6000:]}")
    return RecipeRun(log_path, output)


def assert_finite(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> None:
    """Every named metric is present in every row and finite, and no numeric metric in any row is nan or inf."""
    for row in rows:
        for key in keys:
            assert key in row, (key, sorted(row))
        bad = {k: v for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, (row.get("step"), bad)


def assert_checkpoints_load(base_url: str, records: Sequence[dict[str, Any]], renderer: str = RENDERER) -> None:
    """Each state path restores a training client (with its optimizer), each sampler path samples, and the run they
    belong to still carries the renderer name the recipe stored at creation (resume and load_checkpoint_path rely
    on that)."""
    service = tinker.ServiceClient(base_url=base_url, api_key=API_KEY)
    rest = tinker.RestClient(base_url=base_url, api_key=API_KEY)
    try:
        for record in records:
            state, sampler_path = record["state_path"], record["sampler_path"]
            assert state.startswith("tinker://") and "/weights/" in state
            assert sampler_path.startswith("tinker://") and "/sampler_weights/" in sampler_path
            run = rest.get_training_run_by_tinker_path(state).result()
            assert (run.user_metadata or {}).get("renderer_name") == renderer
            restored = service.create_training_client_from_state_with_optimizer(state).result()
            assert (restored.get_info().lora_rank or 0) > 0
            sampler = service.create_sampling_client(model_path=sampler_path).result()
            sampled = sampler.sample(
                tinker.types.ModelInput.from_ints([1, 2, 3]),
                num_samples=1,
                sampling_params=tinker.types.SamplingParams(max_tokens=2),
            ).result()
            assert len(sampled.sequences[0].tokens) >= 1
    finally:
        service.close("success").result()
