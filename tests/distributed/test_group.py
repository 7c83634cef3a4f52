"""Which rank a process is and which backend and device it takes: torchrun's variables, gloo/NCCL by device."""

from __future__ import annotations

import pytest

from tinkerd.domain.errors import SettingsError
from tinkerd.engine.distributed import RankInfo, backend_for, rank_device, rank_from_env
from tinkerd.roles.ranks import check_sharding, engine_config, this_rank
from tinkerd.settings import Settings


def test_backend_and_device_follow_the_configured_device() -> None:
    assert backend_for("cpu") == "gloo"
    assert backend_for("cuda") == backend_for("cuda:0") == "nccl"
    assert rank_device("cuda", 3) == "cuda:3"  # one device per rank, by local rank
    assert rank_device("cuda:0", 1) == "cuda:1"
    assert rank_device("cpu", 5) == "cpu"


def test_torchrun_variables() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "29600"}
    info = rank_from_env(env)
    assert info == RankInfo(3, 8, 1, "10.0.0.2", 29600)
    assert info is not None and not info.is_leader
    assert rank_from_env(info.env()) == info  # what tinkerd sets for the ranks it starts, read back
    assert rank_from_env({}) is None
    assert rank_from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None  # one rank: no group at all
    with pytest.raises(SettingsError, match="outside"):
        rank_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(SettingsError, match="whole numbers"):
        rank_from_env({"RANK": "x", "WORLD_SIZE": "4"})


def test_ranks_setting_and_torchrun_must_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert this_rank(Settings.load(ranks=1)) is None  # the default: no ranks, no collectives
    launched = this_rank(Settings.load(ranks=3))
    assert launched is not None and launched.is_leader and launched.world_size == 3 and launched.master_port > 0
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    under_torchrun = this_rank(Settings.load())
    assert under_torchrun is not None and under_torchrun.world_size == 2
    with pytest.raises(SettingsError, match="WORLD_SIZE"):
        this_rank(Settings.load(ranks=4))


def test_cuda_samples_from_the_training_weights() -> None:
    cpu = engine_config(Settings.load(dtype="bfloat16"), "cpu")
    assert (cpu.train_dtype, cpu.sample_dtype) == ("bfloat16", "float32")  # CPU keeps its fp32 decoding copy
    cuda = engine_config(Settings.load(threads=2), "cuda:1")
    # "auto" resolves per device (bf16 on a CUDA device with bf16); the sampler follows whatever the trainer uses
    assert cuda.device == "cuda:1" and cuda.sample_dtype == cuda.train_dtype == "auto" and cuda.num_threads == 2


def test_a_sharded_base_and_what_it_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    check_sharding(Settings.load())  # replicated, the default: nothing to refuse
    check_sharding(Settings.load(ranks=2, base_sharding="sharded"))
    check_sharding(Settings.load(ranks=2, base_sharding="sharded", sampler="vllm"), "trainer")
    with pytest.raises(SettingsError, match="--ranks 2 or more"):
        check_sharding(Settings.load(base_sharding="sharded"))
    with pytest.raises(SettingsError, match="sampler"):
        check_sharding(Settings.load(base_sharding="sharded"), "sampler")
    with pytest.raises(SettingsError, match="vllm"):
        check_sharding(Settings.load(ranks=2, base_sharding="sharded", sampler="vllm"))
    with pytest.raises(SettingsError):
        Settings.load(base_sharding="halved")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_sharding(Settings.load(base_sharding="sharded"))  # under torchrun, WORLD_SIZE gives the ranks

    # rank 0 of a sharded serve samples and rescores from one whole copy in the training dtype and layout
    sharded = engine_config(Settings.load(dtype="bfloat16", base_sharding="sharded"), "cpu")
    assert sharded.shard_base and (sharded.train_dtype, sharded.sample_dtype) == ("bfloat16", "bfloat16")
    assert not sharded.decode_layout
    decoder = engine_config(Settings.load(dtype="bfloat16", base_sharding="sharded", sample_scores="decoder"), "cpu")
    assert decoder.sample_dtype == "float32" and decoder.decode_layout  # no rescoring: the fast fp32 decoding copy
    assert not engine_config(Settings.load(), "cpu").shard_base
