"""Two gloo ranks on this CPU: the test process is rank 0, and rank 1 is a real follower process started by the same
launcher `tinkerd serve --ranks 2` uses (roles/ranks.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.engine.tiny_models import tiny_model
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.distributed import DistributedServedModel
from tinkerd.engine.model_paths import load_hf_model
from tinkerd.engine.served_model import ServedModel
from tinkerd.roles.ranks import Ranks, handshake, start_ranks
from tinkerd.settings import Settings

# The default training dtype (bf16 base matmuls): the configuration users run.
ENGINE = EngineConfig(device="cpu", train_dtype="bfloat16")


@dataclass
class TwoRanks:
    model: DistributedServedModel
    ranks: Ranks
    model_dir: Path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    model: Any = tiny_model("llama", seed=0, vocab_size=96, tie=False)
    model.save_pretrained(out)
    return out


def one_rank(model_dir: Path) -> ServedModel:
    return ServedModel(str(model_dir), load_hf_model(model_dir, torch.device("cpu")), ENGINE)


@pytest.fixture(scope="module")
def two_ranks(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoRanks]:
    settings = Settings.load(
        models=[str(model_dir)], cache_dir=tmp_path_factory.mktemp("cache"), ranks=2, rank_timeout_s=60, threads=1
    )
    ranks = start_ranks(settings)
    assert ranks is not None
    try:
        hf = load_hf_model(model_dir, torch.device(ranks.device))
        model = ranks.make_served(str(model_dir), hf, ENGINE)
        assert isinstance(model, DistributedServedModel)
        handshake(ranks.channel, {str(model_dir): model})
        yield TwoRanks(model, ranks, model_dir)
    finally:
        ranks.close()
    assert [child.returncode for child in ranks.children] == [0]  # the follower left cleanly on Shutdown
