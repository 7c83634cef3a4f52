"""Two gloo ranks give the numbers one rank gives: losses, per-datum outputs, optimizer metrics, adapter weights and
checkpoints, for several runs sharing each batch; and a failed share leaves no gradient behind on any rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.conftest import TwoRanks, one_rank
from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import AdamParams, ArrayData, Datum, ForwardResult, LoraConfig
from tinkerd.engine.checkpoint import load_checkpoint, save_checkpoint
from tinkerd.engine.optim import AdamState
from tinkerd.engine.served_model import ForwardJob, ServedModel

pytestmark = pytest.mark.distributed

VOCAB = 96
ADAM = AdamParams(learning_rate=1e-2)
REL = 1e-5


def ce_datums(seed: int, lengths: tuple[int, ...]) -> list[Datum]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        tokens = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        targets = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        weights = torch.rand(n, generator=g).tolist()
        out.append(
            Datum(tokens, {"target_tokens": ArrayData.of_ints(targets), "weights": ArrayData.of_floats(weights)})
        )
    return out


def rl_datums(seed: int, lengths: tuple[int, ...]) -> list[Datum]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for datum in ce_datums(seed, lengths):
        n = len(datum.tokens)
        sampler = (-torch.rand(n, generator=g) * 5).tolist()
        advantages = torch.randn(n, generator=g).tolist()
        inputs = {"target_tokens": datum.loss_fn_inputs["target_tokens"], "logprobs": ArrayData.of_floats(sampler)}
        inputs["advantages"] = ArrayData.of_floats(advantages)
        out.append(Datum(datum.tokens, inputs))
    return out


def step_jobs(prefix: str, step: int) -> list[ForwardJob]:
    """One batch mixing three runs (two losses) and a forward-only job on the base model."""
    return [
        ForwardJob(f"{prefix}a", ce_datums(10 * step + 1, (9, 31, 4, 17, 17)), "cross_entropy", backward=True),
        ForwardJob(f"{prefix}b", ce_datums(10 * step + 2, (25, 6, 12)), "cross_entropy", backward=True),
        ForwardJob(f"{prefix}c", rl_datums(10 * step + 3, (14, 40)), "importance_sampling", backward=True),
        ForwardJob(None, ce_datums(10 * step + 4, (8, 3, 22)), "cross_entropy"),
    ]


CONFIGS = {
    "a": LoraConfig(rank=4, alpha=8.0, seed=1, train_unembed=False),
    "b": LoraConfig(rank=8, alpha=16.0, seed=2),
    "c": LoraConfig(rank=2, alpha=4.0, seed=3, train_mlp=False),
}


def assert_same_results(got: list[ForwardResult], want: list[ForwardResult]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.metrics.keys() == w.metrics.keys()
        for name, value in w.metrics.items():
            assert g.metrics[name] == pytest.approx(value, rel=REL, abs=1e-9), name
        assert len(g.loss_fn_outputs) == len(w.loss_fn_outputs)
        for go, wo in zip(g.loss_fn_outputs, w.loss_fn_outputs, strict=True):  # request order, datum by datum
            assert go.keys() == wo.keys()
            for key in wo:
                assert go[key].shape == wo[key].shape
                torch.testing.assert_close(
                    torch.tensor(go[key].values), torch.tensor(wo[key].values), rtol=REL, atol=1e-6
                )


def assert_same_adapter(two: ServedModel, one: ServedModel, adapter_id: str) -> None:
    got, want = two.adapter(adapter_id), one.adapter(adapter_id)
    for g, w in zip(got.weights.parameters(), want.weights.parameters(), strict=True):
        torch.testing.assert_close(g.detach(), w.detach(), rtol=0, atol=1e-5)
    assert got.optimizer.steps == want.optimizer.steps


def test_several_runs_three_steps_same_as_one_rank(two_ranks: TwoRanks) -> None:
    two, one = two_ranks.model, one_rank(two_ranks.model_dir)
    for model in (two, one):
        for suffix, config in CONFIGS.items():
            model.create_adapter(f"p-{suffix}", config)
    initial = {k: [p.detach().clone() for p in one.adapter(f"p-{k}").weights.parameters()] for k in CONFIGS}
    losses: list[float] = []
    for step in range(3):
        jobs = step_jobs("p-", step)
        got, want = two.forward(jobs), one.forward(jobs)
        assert_same_results(got, want)
        losses.append(want[0].metrics["loss:sum"])
        for suffix in CONFIGS:
            stepped_two = two.optim_step(f"p-{suffix}", ADAM)
            stepped_one = one.optim_step(f"p-{suffix}", ADAM)
            assert stepped_two.metrics["grad_norm"] == pytest.approx(stepped_one.metrics["grad_norm"], rel=REL)
            assert stepped_one.metrics["grad_norm"] > 0
    # not vacuous: the adapters moved, and the same data scores differently after training
    assert len(set(losses)) == 3
    after = two.forward(step_jobs("p-", 0))
    assert after[0].metrics["loss:sum"] != pytest.approx(losses[0], rel=1e-3)
    for suffix in CONFIGS:
        assert_same_adapter(two, one, f"p-{suffix}")
        now = two.adapter(f"p-{suffix}").weights.parameters()
        assert any(not torch.equal(p.detach(), p0) for p, p0 in zip(now, initial[suffix], strict=True))
        digests = two.digests(f"p-{suffix}")
        assert len(digests) == 2 and digests[0] == digests[1]  # rank 1 holds bit for bit what rank 0 holds


def test_an_adapter_without_a_seed_is_the_same_on_every_rank(two_ranks: TwoRanks) -> None:
    two = two_ranks.model
    two.create_adapter("noseed", LoraConfig(rank=4, seed=None))
    assert two.adapter("noseed").config.seed is None  # the run's config is what the user gave
    digests = two.digests("noseed")
    assert digests[0] == digests[1] != "absent"
    two.remove_adapter("noseed")
    assert two.digests("noseed") == ["absent", "absent"]


def _save(model: ServedModel, adapter_id: str, dest: Path) -> Path:
    adapter = model.adapter(adapter_id)
    save_checkpoint(dest, adapter.weights, adapter.config, model.name, adapter.optimizer.state_dict(), {})
    return dest


def assert_same_checkpoint(saved_two: Path, saved_one: Path) -> None:
    """The same files, the same adapter config, and every tensor within 1e-5 (optimizer state included)."""
    files = sorted(p.name for p in saved_one.iterdir())
    assert sorted(p.name for p in saved_two.iterdir()) == files and "adapter_model.safetensors" in files
    assert json.loads((saved_two / "adapter_config.json").read_text()) == json.loads(
        (saved_one / "adapter_config.json").read_text()
    )
    for name in files:
        if name.endswith(".safetensors"):
            got, want = load_file(saved_two / name), load_file(saved_one / name)
            assert got.keys() == want.keys() and got
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5)


def trained_checkpoints(two: ServedModel, one: ServedModel, tmp_path: Path) -> tuple[Path, Path]:
    """Adapter "ck" trained two steps on 2 ranks and on 1, each saved: checked to be the same checkpoint."""
    config = LoraConfig(rank=4, alpha=8.0, seed=7)
    data = ce_datums(5, (13, 7, 29, 3))
    for model in (two, one):
        model.create_adapter("ck", config)
        for _ in range(2):
            model.forward([ForwardJob("ck", data, "cross_entropy", backward=True)])
            model.optim_step("ck", ADAM)
    saved_two, saved_one = _save(two, "ck", tmp_path / "two"), _save(one, "ck", tmp_path / "one")
    assert_same_checkpoint(saved_two, saved_one)
    return saved_two, saved_one


def _install(model: ServedModel, adapter_id: str, src: Path) -> None:
    loaded = load_checkpoint(src, model.device)
    optimizer = AdamState()
    assert loaded.optimizer_state is not None
    optimizer.load_state_dict(loaded.optimizer_state)
    model.install_adapter(adapter_id, loaded.lora, loaded.weights, optimizer)


def test_checkpoints_are_the_same_and_load_across_rank_counts(two_ranks: TwoRanks, tmp_path: Path) -> None:
    two, one = two_ranks.model, one_rank(two_ranks.model_dir)
    saved_two, saved_one = trained_checkpoints(two, one, tmp_path)

    # the 2-rank checkpoint on 1 rank, the 1-rank checkpoint on 2 ranks: both train on as the original would
    _install(one, "from-two", saved_two)
    _install(two, "from-one", saved_one)
    more = ce_datums(6, (11, 19))
    job = [ForwardJob("ck", more, "cross_entropy", backward=True)]
    want = one.forward(job)
    for model, adapter_id in ((one, "from-two"), (two, "from-one")):
        got = model.forward([ForwardJob(adapter_id, more, "cross_entropy", backward=True)])
        assert_same_results(got, want)
        model.optim_step(adapter_id, ADAM)
    one.optim_step("ck", ADAM)
    reference = list(one.adapter("ck").weights.parameters())
    for loaded in (two.adapter("from-one"), one.adapter("from-two")):
        for g, w in zip(loaded.weights.parameters(), reference, strict=True):
            torch.testing.assert_close(g.detach(), w.detach(), rtol=0, atol=1e-5)
    digests = two.digests("from-one")
    assert digests[0] == digests[1]


@pytest.mark.parametrize("bad_first", [True, False])
def test_a_share_that_fails_on_one_rank_leaves_no_gradient_anywhere(two_ranks: TwoRanks, bad_first: bool) -> None:
    two, one = two_ranks.model, one_rank(two_ranks.model_dir)
    adapter_id = f"fail-{bad_first}"
    for model in (two, one):
        model.create_adapter(adapter_id, LoraConfig(rank=4, seed=11))
    good = ForwardJob(adapter_id, ce_datums(21, (30 if not bad_first else 10,)), "cross_entropy", backward=True)
    # the heavier datum goes to rank 0, the other to rank 1: the failure is on one rank only, either way round
    bad_datums = ce_datums(22, (30 if bad_first else 10,))
    bad = ForwardJob(adapter_id, bad_datums, "cross_entropy", {"bogus": 1.0}, backward=True)
    with pytest.raises(InvalidRequestError, match="bogus"):
        two.forward([good, bad])
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):  # refused before any rank runs
        bad_token = Datum([VOCAB + 5], {"target_tokens": ArrayData.of_ints([1])})
        two.forward([ForwardJob(adapter_id, [bad_token], "cross_entropy")])
    # the group is healthy and no half gradient was left: the next step equals one rank's that never saw the failure
    for model in (two, one):
        model.forward([good])
        model.optim_step(adapter_id, ADAM)
    assert_same_adapter(two, one, adapter_id)
    digests = two.digests(adapter_id)
    assert digests[0] == digests[1]
