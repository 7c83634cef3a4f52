"""The CUDA path: two NCCL ranks on cuda:0 and cuda:1 (bf16 base) train like one rank. Runs where 2 GPUs exist."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.test_parity import ADAM, CONFIGS, step_jobs
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.distributed import DistributedServedModel
from tinkerd.engine.model_paths import load_hf_model
from tinkerd.engine.served_model import ServedModel
from tinkerd.roles.ranks import handshake, start_ranks
from tinkerd.settings import Settings

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for NCCL ranks on cuda:0 and cuda:1 (none here)"
    ),
]

# GPU bf16 kernels are not batch invariant the way tinkerd's CPU path is: a row's result may depend on its batch.
REL_CUDA = 1e-3


def test_two_nccl_ranks_train_like_one(model_dir: Path, tmp_path: Path) -> None:
    settings = Settings.load(models=[str(model_dir)], cache_dir=tmp_path, ranks=2, device="cuda", rank_timeout_s=120)
    ranks = start_ranks(settings)
    assert ranks is not None and ranks.device == "cuda:0"
    try:
        engine = EngineConfig(device=ranks.device, train_dtype="bfloat16")
        two = ranks.make_served(str(model_dir), load_hf_model(model_dir, torch.device(ranks.device)), engine)
        assert isinstance(two, DistributedServedModel)
        handshake(ranks.channel, {str(model_dir): two})
        one = ServedModel(str(model_dir), load_hf_model(model_dir, torch.device("cuda:0")), engine)
        for model in (two, one):
            for suffix, config in CONFIGS.items():
                model.create_adapter(f"p-{suffix}", config)
        for step in range(3):
            jobs = step_jobs("p-", step)
            got, want = two.forward(jobs), one.forward(jobs)
            for g, w in zip(got, want, strict=True):
                assert g.metrics["loss:sum"] == pytest.approx(w.metrics["loss:sum"], rel=REL_CUDA)
            for suffix in CONFIGS:
                two.optim_step(f"p-{suffix}", ADAM)
                one.optim_step(f"p-{suffix}", ADAM)
        for suffix in CONFIGS:
            digests = two.digests(f"p-{suffix}")
            assert digests[0] == digests[1]  # NCCL's all_reduce leaves every rank with the same bits
    finally:
        ranks.close()
