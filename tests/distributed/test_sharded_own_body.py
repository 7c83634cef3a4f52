"""GPT-OSS and Qwen3.5, whose packed forwards have bodies of their own (attention sinks and experts; gated delta-net
layers; also with sparse MLPs), on two gloo ranks holding the fp32 base sharded with FSDP2: the losses, per-datum
outputs, optimizer metrics, adapter weights and checkpoints one rank gives, with LoRA on every expert."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from tests.distributed.conftest import TwoRanks, one_rank
from tests.distributed.test_parity import (
    ADAM,
    CONFIGS,
    REL,
    _save,
    assert_same_adapter,
    assert_same_checkpoint,
    assert_same_results,
    ce_datums,
    rl_datums,
)
from tinkerd.domain.ops import ForwardResult, LoraConfig
from tinkerd.engine.served_model import ForwardJob
from tinkerd.engine.transformer import Transformer

pytestmark = pytest.mark.distributed

ADAPTERS = {
    "full": LoraConfig(rank=4, alpha=8.0, seed=1),  # attention, MLP or every expert, unembedding
    "attn": CONFIGS["c"],  # attention only
}


def jobs_of(step: int) -> list[list[ForwardJob]]:
    """A step's batches: two runs (two losses) and a forward-only job with top-k in one batch, with sequences past
    GPT-OSS's sliding window (4) and past a delta-net chunk (64 positions); then one datum, fewer than the ranks."""
    mixed = [
        ForwardJob("full", ce_datums(10 * step + 1, (9, 70, 4, 17)), "cross_entropy", backward=True),
        ForwardJob("attn", rl_datums(10 * step + 2, (14, 40)), "importance_sampling", backward=True),
        ForwardJob(None, ce_datums(10 * step + 3, (8, 3)), "cross_entropy", top_k=3),
    ]
    return [mixed, [ForwardJob("full", ce_datums(10 * step + 4, (11,)), "cross_entropy", backward=True)]]


def same_results_but_router_statistics(got: list[ForwardResult], want: list[ForwardResult]) -> None:
    """``assert_same_results`` but for the MoE router's load statistics, which only need to be there: each rank
    reports them over the tokens of its own share (engine/moe.py ``router_metrics``), so they differ from one rank's
    statistics over the whole batch by design, sharded or not."""
    for g, w in zip(got, want, strict=True):
        assert g.metrics.keys() == w.metrics.keys()

    def without(results: list[ForwardResult]) -> list[ForwardResult]:
        kept = [{k: v for k, v in r.metrics.items() if not k.startswith("router_")} for r in results]
        return [replace(r, metrics=m) for r, m in zip(results, kept, strict=True)]

    assert_same_results(without(got), without(want))


def test_training_and_checkpoints_are_one_rank_s(sharded_own_body: TwoRanks, tmp_path: Path) -> None:
    host = sharded_own_body.host
    assert host is not None and isinstance(host.sample_transformer, Transformer)
    two, one = sharded_own_body.model, one_rank(sharded_own_body.model_dir)
    train = two.train
    assert isinstance(train, Transformer) and type(train) is not Transformer  # a body of its own
    # between passes rank 0 holds a slice of every weight of every layer (experts, sinks, delta-net convolutions)
    for layer in train.layers:
        assert all(isinstance(p, DTensor) for p in layer.parameters())
    assert not any(isinstance(p, DTensor) for p in host.sample_transformer.hf.parameters())
    for model in (two, one):
        for adapter_id, config in ADAPTERS.items():
            model.create_adapter(adapter_id, config)
    assert bool(train.expert_targets) == any(train.sparse)  # the MoE layouts' experts take LoRA
    assert set(train.expert_targets) <= set(two.adapter("full").weights.a)
    initial = {k: [p.detach().clone() for p in one.adapter(k).weights.parameters()] for k in ADAPTERS}
    losses: list[float] = []
    for step in range(3):
        for jobs in jobs_of(step):
            got, want = two.forward(jobs), one.forward(jobs)
            same_results_but_router_statistics(got, want)
            losses.append(want[0].metrics["loss:sum"])
        for adapter_id in ADAPTERS:
            stepped_two, stepped_one = two.optim_step(adapter_id, ADAM), one.optim_step(adapter_id, ADAM)
            assert stepped_two.metrics["grad_norm"] == pytest.approx(stepped_one.metrics["grad_norm"], rel=REL)
            assert stepped_one.metrics["grad_norm"] > 0
    assert len(set(losses)) == 6  # not vacuous: other data, moved adapters
    for adapter_id in ADAPTERS:
        assert_same_adapter(two, one, adapter_id)
        now = two.adapter(adapter_id).weights.parameters()
        assert any(not torch.equal(p.detach(), p0) for p, p0 in zip(now, initial[adapter_id], strict=True))
        digests = two.digests(adapter_id)
        assert len(digests) == 2 and digests[0] == digests[1]
    trained = two.adapter("full").weights.b
    assert all(bool(trained[name].abs().max() > 0) for name in train.expert_targets)  # the experts' adapters learned
    assert_same_checkpoint(_save(two, "full", tmp_path / "two"), _save(one, "full", tmp_path / "one"))
