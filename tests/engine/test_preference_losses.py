"""The Loops losses that the Tinker API lacks: ``dpo`` (pairs of datums) against a naive reference, in the loss
functions and through the engine's passes, and ``dppo``'s trust region."""

from __future__ import annotations

import math

import pytest
import torch

from tests.engine.test_served_model import grads, randomize_b, served
from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import ArrayData, Datum, LoraConfig
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.losses import LossInputs, compute_loss
from tinkerd.engine.losses.preference import compute_pair_loss
from tinkerd.engine.served_model import ForwardJob

Floats = list[float]


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def ref_dpo(
    pairs: list[tuple[Floats, Floats, Floats, Floats, Floats, Floats]], beta: float = 0.1, smoothing: float = 0.0
) -> tuple[float, list[tuple[Floats, Floats]]]:
    """Mean over pairs of -(1-e) log s(z) - e log s(-z), z = beta (sum w (lp - ref) chosen - same rejected); and
    d loss / d logprob for each pair's chosen and rejected tokens. Each pair: (lp, ref, w) chosen then rejected."""
    total, gradients = 0.0, []
    for lp_c, ref_c, w_c, lp_r, ref_r, w_r in pairs:
        s_c = sum(w * (a - b) for a, b, w in zip(lp_c, ref_c, w_c, strict=True))
        s_r = sum(w * (a - b) for a, b, w in zip(lp_r, ref_r, w_r, strict=True))
        z = beta * (s_c - s_r)
        total += -(1 - smoothing) * _logsigmoid(z) - smoothing * _logsigmoid(-z)
        dz = (-(1 - smoothing) * _sigmoid(-z) + smoothing * _sigmoid(z)) / len(pairs)
        gradients.append(([dz * beta * w for w in w_c], [-dz * beta * w for w in w_r]))
    return total / len(pairs), gradients


def _side(seed: int, length: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    lp = -3 * torch.rand(length, generator=g, dtype=torch.float64)
    weights = (torch.arange(length) >= 2).double()  # the first two positions are the prompt
    inputs = {
        "target_tokens": torch.randint(0, 50, (length,), generator=g),
        "weights": weights,
        "ref_logprobs": lp + 0.3 * torch.randn(length, generator=g, dtype=torch.float64),
    }
    return lp, inputs


@pytest.mark.parametrize(("beta", "smoothing"), [(0.1, 0.0), (0.5, 0.0), (0.3, 0.2)])
def test_dpo_matches_the_naive_reference_in_loss_metrics_and_gradient(beta: float, smoothing: float) -> None:
    sides = [_side(seed, length) for seed, length in [(1, 7), (2, 5), (3, 9), (4, 9)]]
    leaves = [lp.clone().requires_grad_(True) for lp, _ in sides]
    config = {"beta": beta, "label_smoothing": smoothing}
    outs = []
    for i in (0, 2):
        chosen = LossInputs(leaves[i], sides[i][1], config)
        rejected = LossInputs(leaves[i + 1], sides[i + 1][1], config)
        outs.extend(compute_pair_loss("dpo", chosen, rejected, num_pairs=2))
    torch.stack([o.loss for o in outs]).sum().backward()
    plain = [(lp.tolist(), x["ref_logprobs"].tolist(), x["weights"].tolist()) for lp, x in sides]
    want_loss, want_grads = ref_dpo([(*plain[0], *plain[1]), (*plain[2], *plain[3])], beta, smoothing)
    assert sum(o.metrics["loss:sum"] for o in outs) == pytest.approx(want_loss, rel=1e-12)
    for pair, (g_c, g_r) in enumerate(want_grads):
        got_c, got_r = leaves[2 * pair].grad, leaves[2 * pair + 1].grad
        assert got_c is not None and got_r is not None
        assert got_c.tolist() == pytest.approx(g_c, rel=1e-12, abs=1e-15)
        assert got_r.tolist() == pytest.approx(g_r, rel=1e-12, abs=1e-15)
    # the pair's metrics ride on its chosen datum only
    assert "dpo_accuracy:mean" in outs[0].metrics and "dpo_accuracy:mean" not in outs[1].metrics
    s_c = sum(w * (a - b) for a, b, w in zip(*plain[0], strict=True))
    s_r = sum(w * (a - b) for a, b, w in zip(*plain[1], strict=True))
    assert outs[0].metrics["dpo_margin:mean"] == pytest.approx(beta * (s_c - s_r), rel=1e-12)
    assert outs[0].metrics["dpo_accuracy:mean"] == (1.0 if s_c > s_r else 0.0)


def test_dpo_config_and_inputs_are_checked() -> None:
    lp, inputs = _side(0, 6)
    with pytest.raises(InvalidRequestError, match="label_smoothing"):
        compute_pair_loss("dpo", LossInputs(lp, inputs, {"label_smoothing": 0.7}), LossInputs(lp, inputs), 1)
    with pytest.raises(InvalidRequestError, match="ref_logprobs"):
        lacking = {k: v for k, v in inputs.items() if k != "ref_logprobs"}
        compute_pair_loss("dpo", LossInputs(lp, lacking), LossInputs(lp, inputs), 1)
    with pytest.raises(InvalidRequestError, match="does not take"):
        compute_pair_loss("dpo", LossInputs(lp, inputs, {"kl_tau": 1.0}), LossInputs(lp, inputs), 1)


def _pair_datum(tokens: list[int], ref: list[float], weights: list[float]) -> Datum:
    inputs = {
        "target_tokens": ArrayData.of_ints([*tokens[1:], 2]),
        "weights": ArrayData.of_floats(weights),
        "ref_logprobs": ArrayData.of_floats(ref),
    }
    return Datum(tokens, inputs)


def _preference_batch() -> list[Datum]:
    g = torch.Generator().manual_seed(5)
    out = []
    for n in (6, 9, 4, 7, 8, 5):  # three pairs of different lengths, so a small pass splits the batch
        tokens = torch.randint(3, 96, (n,), generator=g).tolist()
        ref = (-4 * torch.rand(n, generator=g)).tolist()
        out.append(_pair_datum(tokens, ref, [0.0, *[1.0] * (n - 1)]))
    return out


def test_dpo_through_the_engine_keeps_pairs_whole_and_its_gradient_is_the_references() -> None:
    # With passes of at most 10 tokens the six datums need several passes: each pair must still meet in one.
    data = _preference_batch()
    dpo_model, ce_model = served(EngineConfig(train_dtype="float32", max_tokens_per_pass=10)), served()
    for m in (dpo_model, ce_model):
        m.create_adapter("a", LoraConfig(rank=4, seed=3))
        randomize_b(m, "a", 3)
    (result,) = dpo_model.forward([ForwardJob("a", data, "dpo", {"beta": 0.5}, backward=True)])
    lps = [list(map(float, out["logprobs"].values)) for out in result.loss_fn_outputs]
    plain = [(lp, list(d.loss_fn_inputs["ref_logprobs"].values), list(d.loss_fn_inputs["weights"].values))
             for lp, d in zip(lps, data, strict=True)]  # fmt: skip
    pairs = [(*plain[i], *plain[i + 1]) for i in range(0, len(plain), 2)]
    want_loss, want_grads = ref_dpo(pairs, beta=0.5)
    assert result.metrics["loss:sum"] == pytest.approx(want_loss, rel=1e-5)
    assert 0.0 <= result.metrics["dpo_accuracy:mean"] <= 1.0
    # The same gradient through cross_entropy: its d loss / d logprob is -weight, so weights = -d(dpo)/d logprob.
    ce_data = []
    for i, d in enumerate(data):
        g = want_grads[i // 2][i % 2]
        ce_data.append(Datum(d.tokens, {"target_tokens": d.loss_fn_inputs["target_tokens"],
                                        "weights": ArrayData.of_floats([-x for x in g])}))  # fmt: skip
    ce_model.forward([ForwardJob("a", ce_data, "cross_entropy", backward=True)])
    for x, y in zip(grads(dpo_model, "a"), grads(ce_model, "a"), strict=True):
        assert float(y.abs().max()) > 0
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4)


def test_dpo_needs_whole_pairs() -> None:
    model = served()
    model.create_adapter("a", LoraConfig(rank=4))
    job = ForwardJob("a", _preference_batch()[:3], "dpo", backward=True)
    with pytest.raises(InvalidRequestError, match="even number of datums; it has 3"):
        model.validate(job)


def test_dppo_drops_only_tokens_pushed_past_the_trust_region() -> None:
    # Token probabilities p against the sampler's q: 0.6 vs 0.3 rose by 0.3 (> 0.2), 0.35 vs 0.3 rose by 0.05.
    p = torch.tensor([0.6, 0.35, 0.6, 0.1], dtype=torch.float64)
    q = torch.tensor([0.3, 0.3, 0.3, 0.4], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    inputs = {"target_tokens": torch.zeros(4, dtype=torch.long), "logprobs": q.log(), "advantages": adv}
    leaf = p.log().requires_grad_(True)
    out = compute_loss("dppo", LossInputs(leaf, inputs, {"kl_tau": 0.0}))
    out.loss.backward()
    assert leaf.grad is not None
    grad = leaf.grad.tolist()
    assert grad[0] == 0.0  # rose too far with A > 0: dropped
    assert grad[1] == pytest.approx(-0.35 / 0.3)  # inside: -A * p/q
    assert grad[2] == pytest.approx(0.6 / 0.3)  # rose, but A < 0 pushes it down: kept
    assert grad[3] == 0.0  # fell by 0.3 with A < 0: dropped
    assert out.metrics["dppo_masked_fraction:mean"] == pytest.approx(0.5)


def test_units_keep_each_pair_in_one_pass_and_one_rank_share() -> None:
    from tinkerd.engine.batching import micro_batches, units
    from tinkerd.engine.distributed.split import balance

    model = served()
    rows = model.rows_of_jobs(
        [ForwardJob(None, _preference_batch(), "dpo"), ForwardJob(None, _preference_batch(), "cross_entropy")]
    )
    paired = lambda row: row.job == 0  # noqa: E731
    grouped = units(rows, paired)
    assert [[(r.job, r.index) for r in u] for u in grouped][:3] == [
        [(0, 0), (0, 1)],
        [(0, 2), (0, 3)],
        [(0, 4), (0, 5)],
    ]
    assert all(len(u) == 1 for u in grouped[3:]) and len(grouped) == 9
    for group in micro_batches(rows, 10, paired):
        keys = {(r.job, r.index) for r in group}
        assert all((0, i ^ 1) in keys for (j, i) in keys if j == 0)
    shares = balance([sum(len(r.tokens) for r in u) for u in grouped], 2)
    assert sorted(i for share in shares for i in share) == list(range(len(grouped)))
