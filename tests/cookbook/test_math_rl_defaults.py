"""The math_rl recipe with its own defaults (loss stable_reinforce, provenance spans on every datum) runs against
tinkerd: the one recipe run in the default suite, so CI proves the cookbook path on every change. The rest of the
recipe matrix is in test_recipes.py (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cookbook.conftest import RENDERER, assert_finite, recipe_env, run_recipe
from tests.e2e.conftest import Server

pytestmark = [pytest.mark.e2e, pytest.mark.cookbook]


def test_math_rl_with_default_loss_trains_and_checkpoints(server: Server, tmp_path: Path) -> None:
    run = run_recipe(
        "tinker_cookbook.recipes.math_rl.train",
        {
            "env": "arithmetic",
            "model_name": server.model,
            "renderer_name": RENDERER,
            "group_size": 2,
            "groups_per_batch": 2,
            "max_tokens": 4,
            "lora_rank": 4,
            "max_steps": 2,
            "save_every": 1,
            "eval_every": 0,
            "behavior_if_log_dir_exists": "delete",
        },
        recipe_env(server.url),
        tmp_path / "rl-defaults",
    )
    assert "loss_fn': 'stable_reinforce'" in (tmp_path / "rl-defaults" / "config.json").read_text().replace('"', "'")
    trained = [row for row in run.metrics() if "env/all/reward/total" in row]
    assert [row["step"] for row in trained] == [0, 1]
    assert_finite(trained, ["env/all/reward/total", "optim/kl_sample_train_v1", "optim/entropy"])
    # The trainer's logprobs (from forward_backward) and the sampler's agree: same model, same numerics.
    assert all(abs(row["optim/kl_sample_train_v1"]) < 0.05 for row in trained)
    names = [record["name"] for record in run.checkpoints()]
    assert names == ["000001", "000002", "final"]
