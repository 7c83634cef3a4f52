"""Two gloo ranks on this CPU: the test process is rank 0, and rank 1 is a real follower process started by the same
launcher `tinkerd serve --ranks 2` uses (roles/ranks.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.engine.tiny_models import tiny_generic_model, tiny_hybrid_model, tiny_model
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.distributed import DistributedServedModel
from tinkerd.engine.model_paths import load_hf_model
from tinkerd.engine.served_model import ServedModel
from tinkerd.roles.ranks import Ranks, engine_config, handshake, start_ranks
from tinkerd.settings import Settings
from tinkerd.worker.hosts import ModelHost

# fp32 base matmuls, where a row's numbers do not depend on the rows packed with it (engine/lora.py,
# MIN_INVARIANT_ROWS), so one rank and two ranks can agree within 1e-5. With the default bf16 base, a datum's
# logprobs moved by about 2e-4 relative between a one-rank pack and a two-rank share (bf16 rounding; the e2e test
# runs that configuration).
ENGINE = EngineConfig(device="cpu", train_dtype="float32")


@dataclass
class TwoRanks:
    model: DistributedServedModel
    ranks: Ranks
    model_dir: Path
    host: ModelHost | None = None  # with a sharded base: rank 0's host, whose sampler keeps a whole copy


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
        models=[str(model_dir)], cache_dir=tmp_path_factory.mktemp("cache"), ranks=2, threads=1, dtype="float32"
    )  # the default timeout: on a loaded machine a rank takes a minute to import torch and join
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


@pytest.fixture(scope="module")
def sharded_two_ranks(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoRanks]:
    """Two ranks holding the fp32 base sharded with FSDP2, built as `tinkerd serve --ranks 2 --base-sharding sharded`
    builds rank 0: a host whose trainer holds half of each weight and whose sampler keeps a whole copy."""
    with sharded_ranks(model_dir, tmp_path_factory) as two:
        yield two


# the families whose packed forward has a body of its own (engine/gpt_oss.py, engine/qwen3_5.py)
OWN_BODY_FAMILIES = ("gpt_oss", "qwen3_5", "qwen3_5_moe")


@pytest.fixture(scope="module", params=OWN_BODY_FAMILIES)
def sharded_own_body(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoRanks]:
    """``sharded_two_ranks`` for a tiny GPT-OSS (4 experts, attention sinks, sliding windows), a tiny Qwen3.5 (gated
    delta-net layers beside full attention) and a tiny Qwen3.5-MoE (its MLPs sparse); one family's ranks at a time."""
    family: str = request.param
    out = tmp_path_factory.mktemp("models") / f"tiny-{family}"
    model: Any = tiny_generic_model(family) if family == "gpt_oss" else tiny_hybrid_model(family)
    model.save_pretrained(out)
    with sharded_ranks(out, tmp_path_factory) as two:
        yield two


@contextmanager
def sharded_ranks(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoRanks]:
    """Rank 0 of two sharded ranks serving ``model_dir`` (rank 1 is a follower process), left cleanly at the end."""
    settings = Settings.load(
        models=[str(model_dir)], cache_dir=tmp_path_factory.mktemp("cache"), ranks=2, threads=1, dtype="float32",
        base_sharding="sharded",
    )  # fmt: skip
    ranks = start_ranks(settings)
    assert ranks is not None
    try:
        engine = engine_config(settings, ranks.device)
        assert engine.shard_base and engine.train_dtype == "float32"
        hf = load_hf_model(model_dir, torch.device(ranks.device))
        host = ModelHost.from_model(str(model_dir), hf, engine, make_served=ranks.make_served)
        model = host.served
        assert isinstance(model, DistributedServedModel)
        handshake(ranks.channel, {str(model_dir): model})
        yield TwoRanks(model, ranks, model_dir, host)
    finally:
        ranks.close()
    assert [child.returncode for child in ranks.children] == [0]
