"""Two gloo ranks holding the frozen base sharded with FSDP2 give the numbers one rank gives: losses, per-datum
outputs, adapter weights and checkpoints, also for a batch smaller than the number of ranks (a rank with nothing to
do still takes part in every all-gather); and rank 0 samples from its own whole copy as one rank would."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from tests.distributed.conftest import TwoRanks, one_rank
from tests.distributed.test_parity import (
    ADAM,
    CONFIGS,
    REL,
    assert_same_adapter,
    assert_same_results,
    ce_datums,
    rl_datums,
    step_jobs,
    trained_checkpoints,
)
from tests.engine.tiny_models import tiny_generic_model
from tinkerd.domain.errors import SettingsError
from tinkerd.domain.ops import ArrayData, Datum, LoraConfig, SamplingParams
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.distributed.sharding import shard_served
from tinkerd.engine.model_paths import load_hf_model
from tinkerd.engine.sample_job import SampleJob
from tinkerd.engine.sampler import Sampler
from tinkerd.engine.served_model import ForwardJob, ServedModel
from tinkerd.engine.transformer import Transformer
from tinkerd.worker.hosts import ModelHost

pytestmark = pytest.mark.distributed


def uneven_jobs(prefix: str, step: int) -> list[ForwardJob]:
    """Rank 0 gets the backward datum and rank 1 the forward-only one: each runs a pass of a kind the other has not."""
    return [
        ForwardJob(f"{prefix}a", ce_datums(100 + step, (23,)), "cross_entropy", backward=True),
        ForwardJob(None, ce_datums(200 + step, (5,)), "cross_entropy", top_k=3),
    ]


def one_datum(prefix: str, step: int) -> list[ForwardJob]:
    """Fewer datums than ranks: rank 1's share is empty."""
    return [ForwardJob(f"{prefix}b", ce_datums(500 + step, (11,)), "cross_entropy", backward=True)]


def test_the_base_is_sharded_and_the_sampler_keeps_a_whole_copy(sharded_two_ranks: TwoRanks) -> None:
    host = sharded_two_ranks.host
    assert host is not None
    train = host.served.train
    assert isinstance(train, Transformer) and isinstance(host.sample_transformer, Transformer)
    weight = train.layers[0].self_attn.q_proj.weight
    assert isinstance(weight, DTensor)  # between passes rank 0 holds a slice of each weight
    assert weight.to_local().shape[0] == weight.shape[0] // 2
    sample_weight = host.sample_transformer.layers[0].self_attn.q_proj.weight
    assert not isinstance(sample_weight, DTensor) and sample_weight.shape == weight.shape


def test_several_runs_three_steps_same_as_one_rank(sharded_two_ranks: TwoRanks) -> None:
    two, one = sharded_two_ranks.model, one_rank(sharded_two_ranks.model_dir)
    for model in (two, one):
        for suffix, config in CONFIGS.items():
            model.create_adapter(f"s-{suffix}", config)
    initial = {k: [p.detach().clone() for p in one.adapter(f"s-{k}").weights.parameters()] for k in CONFIGS}
    losses: list[float] = []
    for step in range(3):
        for jobs in (step_jobs("s-", step), uneven_jobs("s-", step), one_datum("s-", step)):
            got, want = two.forward(jobs), one.forward(jobs)
            assert_same_results(got, want)
            losses.append(want[0].metrics["loss:sum"])
        for suffix in CONFIGS:
            stepped_two = two.optim_step(f"s-{suffix}", ADAM)
            stepped_one = one.optim_step(f"s-{suffix}", ADAM)
            assert stepped_two.metrics["grad_norm"] == pytest.approx(stepped_one.metrics["grad_norm"], rel=REL)
            assert stepped_one.metrics["grad_norm"] > 0
    assert len(set(losses)) == 9  # not vacuous: other data, moved adapters
    for suffix in CONFIGS:
        assert_same_adapter(two, one, f"s-{suffix}")
        now = two.adapter(f"s-{suffix}").weights.parameters()
        assert any(not torch.equal(p.detach(), p0) for p, p0 in zip(now, initial[suffix], strict=True))
        digests = two.digests(f"s-{suffix}")
        assert len(digests) == 2 and digests[0] == digests[1]


def test_an_adapter_on_the_head_only_and_a_paired_loss(sharded_two_ranks: TwoRanks) -> None:
    """Rows whose adapter touches no layer (only the unembedding) and rows of an attention-only adapter, on
    different ranks of one batch: every rank still runs every layer's backward, so the all-gathers line up."""
    two, one = sharded_two_ranks.model, one_rank(sharded_two_ranks.model_dir)
    head_only = LoraConfig(rank=4, seed=5, train_attn=False, train_mlp=False, train_unembed=True)
    for model in (two, one):
        model.create_adapter("head", head_only)
        model.create_adapter("attn", CONFIGS["c"])
    for step in range(2):
        jobs = [
            ForwardJob("head", ce_datums(300 + step, (40,)), "cross_entropy", backward=True),
            ForwardJob("attn", rl_datums(400 + step, (12, 9)), "importance_sampling", backward=True),
        ]
        assert_same_results(two.forward(jobs), one.forward(jobs))
        for adapter_id in ("head", "attn"):
            two.optim_step(adapter_id, ADAM)
            one.optim_step(adapter_id, ADAM)
    for adapter_id in ("head", "attn"):
        assert_same_adapter(two, one, adapter_id)


def test_a_checkpoint_saved_sharded_is_the_one_rank_checkpoint(sharded_two_ranks: TwoRanks, tmp_path: Path) -> None:
    two, one = sharded_two_ranks.model, one_rank(sharded_two_ranks.model_dir)
    saved_two, _ = trained_checkpoints(two, one, tmp_path)
    trained = load_file(saved_two / "adapter_model.safetensors")
    assert any(bool(t.abs().max() > 0) for k, t in trained.items() if "lora_B" in k)


def test_rank_0_samples_a_sharded_run_as_one_rank_does(sharded_two_ranks: TwoRanks) -> None:
    host = sharded_two_ranks.host
    assert host is not None and isinstance(host.sampler, Sampler)
    two = sharded_two_ranks.model
    two.create_adapter("smp", LoraConfig(rank=4, seed=9))
    for _ in range(2):
        two.forward([ForwardJob("smp", ce_datums(31, (17, 6, 25)), "cross_entropy", backward=True)])
        two.optim_step("smp", ADAM)
    weights = two.snapshot("smp")
    hf = load_hf_model(sharded_two_ranks.model_dir, torch.device("cpu"))
    reference = ModelHost.from_model("one", hf, one_rank(sharded_two_ranks.model_dir).config)
    prompt = [1, 17, 30, 44, 5]
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=3)
    job = SampleJob(prompt, params, 2, weights, prompt_logprobs=True)
    assert isinstance(reference.sampler, Sampler)
    (got,) = host.sampler.run([job])
    (want,) = reference.sampler.run([job])
    assert [s.tokens for s in got.sequences] == [s.tokens for s in want.sequences]
    assert all(len(s.tokens) == 6 for s in got.sequences)
    for g, w in zip(got.sequences, want.sequences, strict=True):
        assert g.logprobs is not None and w.logprobs is not None
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), rtol=REL, atol=1e-6)
    # the samples report the training forward's logprobs: what forward() gives for the same tokens
    seq = got.sequences[0]
    tokens = prompt + seq.tokens
    scored = one_rank(sharded_two_ranks.model_dir)
    scored.install_adapter("smp", LoraConfig(rank=4, seed=9), weights, None)
    targets = tokens[1:]
    datum = Datum(
        tokens[:-1], {"target_tokens": ArrayData.of_ints(targets), "weights": ArrayData.of_floats([1.0] * len(targets))}
    )
    (result,) = scored.forward([ForwardJob("smp", [datum], "cross_entropy")])
    forward_logprobs = result.loss_fn_outputs[0]["logprobs"].values[len(prompt) - 1 :]
    assert seq.logprobs is not None
    torch.testing.assert_close(torch.tensor(seq.logprobs), torch.tensor(forward_logprobs), rtol=REL, atol=1e-5)


def test_a_model_on_the_generic_path_is_refused_before_any_collective() -> None:
    """The generic forward (transformers' own) does not gather sharded layers: refused, before sharding touches the
    process group (so this needs no ranks). GPT-OSS and Qwen3.5 shard: test_sharded_own_body.py."""
    served = ServedModel("tiny", tiny_generic_model("phi"), EngineConfig(device="cpu", train_dtype="float32"))
    with pytest.raises(SettingsError, match=r"needs tinkerd's packed forward.*--base-sharding replicated"):
        shard_served(served, world_size=2)
