"""The built-in losses against naive per-token references, numerical gradients, and the mistakes users make."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.engine.losses import (
    LOSSES,
    LossInputs,
    compute_loss,
    kernels,
    reduce_metrics,
    required_inputs,
)

# ---- naive references: plain loops over floats, returning (loss, dloss/dlogprob per token) ----

Floats = list[float]
Reference = Callable[[Floats, dict[str, Floats]], tuple[float, Floats]]


def _clip(x: float, low: float, high: float) -> float:
    return min(max(x, low), high)


def ref_cross_entropy(lp: Floats, inp: dict[str, Floats]) -> tuple[float, Floats]:
    w = inp["weights"]
    return sum(-lp[t] * w[t] for t in range(len(lp))), [-w[t] for t in range(len(lp))]


def ref_importance_sampling(lp: Floats, inp: dict[str, Floats]) -> tuple[float, Floats]:
    q, a = inp["logprobs"], inp["advantages"]
    ratios = [math.exp(lp[t] - q[t]) for t in range(len(lp))]
    return sum(-r * a[t] for t, r in enumerate(ratios)), [-r * a[t] for t, r in enumerate(ratios)]


def _clipped_surrogate(ratio: float, adv: float, low: float, high: float) -> tuple[float, float]:
    """-min(r*A, clip(r)*A) and its derivative in log p (the clipped branch is flat outside [low, high])."""
    unclipped, clipped = ratio * adv, _clip(ratio, low, high) * adv
    if unclipped <= clipped or low < ratio < high:
        return -min(unclipped, clipped), -ratio * adv
    return -clipped, 0.0


def ref_ppo(lp: Floats, inp: dict[str, Floats], low: float = 0.8, high: float = 1.2) -> tuple[float, Floats]:
    q, a = inp["logprobs"], inp["advantages"]
    terms = [_clipped_surrogate(math.exp(lp[t] - q[t]), a[t], low, high) for t in range(len(lp))]
    return sum(v for v, _ in terms), [g for _, g in terms]


def ref_cispo(lp: Floats, inp: dict[str, Floats], low: float = 0.8, high: float = 1.2) -> tuple[float, Floats]:
    q, a = inp["logprobs"], inp["advantages"]
    weights = [_clip(math.exp(lp[t] - q[t]), low, high) for t in range(len(lp))]
    return sum(-w * lp[t] * a[t] for t, w in enumerate(weights)), [-w * a[t] for t, w in enumerate(weights)]


def ref_dro(lp: Floats, inp: dict[str, Floats], beta: float = 0.05) -> tuple[float, Floats]:
    q, a = inp["logprobs"], inp["advantages"]
    loss = sum(-(lp[t] * a[t] - 0.5 * beta * (lp[t] - q[t]) ** 2) for t in range(len(lp)))
    return loss, [-(a[t] - beta * (lp[t] - q[t])) for t in range(len(lp))]


def ref_gspo(lp: Floats, inp: dict[str, Floats], low: float = 0.8, high: float = 1.2) -> tuple[float, Floats]:
    q, a, mask = inp["logprobs"], inp["advantages"], inp["sequence_ratio_mask"]
    marked = [t for t in range(len(lp)) if mask[t] != 0]
    s = math.exp(sum(lp[t] - q[t] for t in marked) / len(marked)) if marked else 1.0
    # Each token's ratio is s in value but moves only with its own log p (d ratio_t / d lp_t = s).
    terms = [_clipped_surrogate(s, a[t], low, high) for t in range(len(lp))]
    return sum(v for v, _ in terms), [g for _, g in terms]


def ref_stable_reinforce(lp: Floats, inp: dict[str, Floats]) -> tuple[float, Floats]:
    q, a = inp["logprobs"], inp["advantages"]
    weights = [min(math.exp(lp[t] - q[t]), 2.0) for t in range(len(lp))]
    return sum(-w * lp[t] * a[t] for t, w in enumerate(weights)), [-w * a[t] for t, w in enumerate(weights)]


def ref_dppo(
    lp: Floats, inp: dict[str, Floats], high: float = 0.2, low: float = 0.2, adv_tau: float = 1.0, kl_tau: float = 1e-3
) -> tuple[float, Floats]:
    """Tokens with an advantage count; one whose probability moved past the bound its advantage pushes toward leaves
    the policy-gradient term; every counted token keeps the squared log-ratio term."""
    q, a = inp["logprobs"], inp["advantages"]
    loss, grad = 0.0, []
    for t in range(len(lp)):
        if a[t] == 0:
            grad.append(0.0)
            continue
        moved = math.exp(lp[t]) - math.exp(q[t])
        keep = not ((a[t] > 0 and moved > high) or (a[t] < 0 and moved < -low))
        policy = adv_tau * a[t] * math.exp(lp[t] - q[t]) if keep else 0.0
        loss += -policy + kl_tau * (lp[t] - q[t]) ** 2
        grad.append(-policy + 2 * kl_tau * (lp[t] - q[t]))
    return loss, grad


REFERENCES: dict[str, Reference] = {
    "cross_entropy": ref_cross_entropy,
    "importance_sampling": ref_importance_sampling,
    "ppo": ref_ppo,
    "cispo": ref_cispo,
    "dro": ref_dro,
    "gspo": ref_gspo,
    "stable_reinforce": ref_stable_reinforce,
    "dppo": ref_dppo,
}


def random_datum(loss: str, seed: int, length: int = 9) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Float64 learner logprobs and loss_fn_inputs whose ratios p/q straddle the default clip range."""
    g = torch.Generator().manual_seed(seed)
    logprobs = -3 * torch.rand(length, generator=g, dtype=torch.float64)
    sampler = logprobs + 0.5 * torch.randn(length, generator=g, dtype=torch.float64)
    advantages = torch.randn(length, generator=g, dtype=torch.float64)
    advantages[0] = 0.0  # a prompt position
    inputs = {"target_tokens": torch.randint(0, 50, (length,), generator=g)}
    if loss == "cross_entropy":
        inputs["weights"] = torch.randn(length, generator=g, dtype=torch.float64)  # negatives included
    else:
        inputs["logprobs"], inputs["advantages"] = sampler, advantages
    if loss == "gspo":
        inputs["sequence_ratio_mask"] = (torch.arange(length) >= 2).double()
    return logprobs, inputs


def sampled_where_advantaged(inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The provenance the cookbook's RL data carries: the tokens with an advantage are the sampled ones."""
    return inputs["advantages"] != 0 if "advantages" in inputs else None


def run(
    loss: str,
    logprobs: torch.Tensor,
    inputs: dict[str, torch.Tensor],
    sampled: torch.Tensor | None = None,
    **config: float,
):
    """The loss and its gradient; ``sampled`` (provenance) defaults to the positions with a nonzero advantage."""
    leaf = logprobs.clone().requires_grad_(True)
    sampled = sampled if sampled is not None else sampled_where_advantaged(inputs)
    out = compute_loss(loss, LossInputs(logprobs=leaf, inputs=inputs, config=config, sampled=sampled))
    out.loss.backward()
    assert leaf.grad is not None
    return out, leaf.grad


# ---- every loss against its naive reference ----


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_loss_and_gradient_match_naive_reference(loss: str, seed: int) -> None:
    logprobs, inputs = random_datum(loss, seed)
    out, grad = run(loss, logprobs, inputs)
    plain = {k: v.tolist() for k, v in inputs.items()}
    want_loss, want_grad = REFERENCES[loss](logprobs.tolist(), plain)
    assert out.loss.item() == pytest.approx(want_loss, rel=1e-12, abs=1e-12)
    assert grad.tolist() == pytest.approx(want_grad, rel=1e-12, abs=1e-12)
    assert out.metrics["loss:sum"] == pytest.approx(want_loss, rel=1e-12, abs=1e-12)
    assert torch.equal(out.outputs["logprobs"], logprobs)
    assert out.outputs["elementwise_loss"].sum().item() == pytest.approx(want_loss, rel=1e-12, abs=1e-12)
    assert not out.outputs["logprobs"].requires_grad


def test_random_data_exercises_both_sides_of_the_clip_range() -> None:
    # Guards the reference test above: it only proves the clipping if some ratios fall outside [0.8, 1.2].
    ratios = torch.cat([(lp - inp["logprobs"]).exp() for lp, inp in (random_datum("ppo", s) for s in range(4))])
    assert (ratios < 0.8).any() and (ratios > 1.2).any() and ((ratios > 0.8) & (ratios < 1.2)).any()


@pytest.mark.parametrize("loss", ["ppo", "cispo", "gspo"])
def test_clip_thresholds_from_config_and_per_token_inputs(loss: str) -> None:
    logprobs, inputs = random_datum(loss, seed=7)
    plain = {k: v.tolist() for k, v in inputs.items()}
    reference = REFERENCES[loss]
    out, grad = run(loss, logprobs, inputs, clip_low_threshold=0.9, clip_high_threshold=1.1)
    want_loss, want_grad = reference(logprobs.tolist(), plain, 0.9, 1.1)  # type: ignore[call-arg]
    assert out.loss.item() == pytest.approx(want_loss, rel=1e-12)
    assert grad.tolist() == pytest.approx(want_grad, rel=1e-12, abs=1e-12)
    # The same bounds given per token in the datum win over loss_fn_config.
    low, high = torch.full((9,), 0.9, dtype=torch.float64), torch.full((9,), 1.1, dtype=torch.float64)
    per_token = dict(inputs, clip_low_threshold=low, clip_high_threshold=high)
    out2, grad2 = run(loss, logprobs, per_token, clip_low_threshold=0.5, clip_high_threshold=1.5)
    assert out2.loss.item() == pytest.approx(want_loss, rel=1e-12)
    assert torch.allclose(grad2, grad, rtol=1e-12, atol=1e-12)


def test_empty_config_means_tinker_defaults() -> None:
    for loss, config in [
        ("ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
        ("cispo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
        ("dro", {"beta": 0.05}),
    ]:
        logprobs, inputs = random_datum(loss, seed=3)
        assert run(loss, logprobs, inputs)[0].loss.item() == run(loss, logprobs, inputs, None, **config)[0].loss.item()


# ---- numerical gradients (float64) ----


def _gradcheck(fn: Callable[[torch.Tensor], torch.Tensor], logprobs: torch.Tensor) -> None:
    leaf = logprobs.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda lp: fn(lp).sum(), (leaf,))


@pytest.mark.parametrize("loss", ["cross_entropy", "importance_sampling", "ppo", "dro"])
def test_gradcheck_through_compute_loss(loss: str) -> None:
    # These have no stop-gradient, so autograd through the public path must match finite differences.
    logprobs, inputs = random_datum(loss, seed=11)
    _gradcheck(lambda lp: compute_loss(loss, LossInputs(lp, inputs)).loss, logprobs)


def test_gradcheck_soft_target_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(5, 3, generator=g, dtype=torch.float64)
    inputs = {"target_tokens": torch.randint(0, 9, (5, 3), generator=g), "weights": torch.rand(5, 3, generator=g)}
    _gradcheck(lambda lp: compute_loss("cross_entropy", LossInputs(lp, inputs)).loss, logprobs)


@pytest.mark.parametrize("loss", ["cispo", "gspo", "stable_reinforce", "sampled_log_ratio_penalty"])
def test_gradcheck_kernels_with_stop_gradient(loss: str) -> None:
    # Holding the stop-gradient values fixed (const) makes each kernel a smooth function of logprobs alone.
    logprobs, inputs = random_datum(loss, seed=5)
    const, q, adv = logprobs.clone(), inputs["logprobs"], inputs["advantages"]
    kernel: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "cispo": lambda lp: kernels.cispo(lp, const, q, adv, 0.8, 1.2),
        "gspo": lambda lp: kernels.gspo(lp, const, q, adv, inputs["sequence_ratio_mask"], 0.8, 1.2),
        "stable_reinforce": lambda lp: kernels.truncated_importance_reinforce(lp, const, q, adv, 2.0),
        "sampled_log_ratio_penalty": lambda lp: kernels.sampled_log_ratio_penalty(lp, q, adv != 0, 0.3),
    }
    _gradcheck(kernel[loss], logprobs)


# ---- clipping behaviour a user would notice ----

RATIOS = [0.5, 0.79, 0.81, 1.0, 1.19, 1.21, 2.0]


def _ratio_datum(advantage: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logprobs = torch.full((len(RATIOS),), -1.0, dtype=torch.float64)
    sampler = logprobs - torch.tensor(RATIOS, dtype=torch.float64).log()
    advantages = torch.full((len(RATIOS),), advantage, dtype=torch.float64)
    return logprobs, {"target_tokens": torch.zeros(len(RATIOS), dtype=torch.long), "logprobs": sampler,
                      "advantages": advantages}  # fmt: skip


def test_ppo_stops_pushing_a_token_once_its_ratio_leaves_the_trust_region() -> None:
    logprobs, inputs = _ratio_datum(advantage=1.0)
    out, grad = run("ppo", logprobs, inputs)
    # A > 0: above 1.2 the objective is flat (capped at 1.2); below 0.8 the unclipped, smaller term keeps its gradient.
    assert grad.tolist() == pytest.approx([-0.5, -0.79, -0.81, -1.0, -1.19, 0.0, 0.0])
    assert out.outputs["elementwise_loss"][-2:].tolist() == pytest.approx([-1.2, -1.2])
    logprobs, inputs = _ratio_datum(advantage=-1.0)
    out, grad = run("ppo", logprobs, inputs)
    # A < 0: mirror image, flat below 0.8, still pushed down above 1.2.
    assert grad.tolist() == pytest.approx([0.0, 0.0, 0.81, 1.0, 1.19, 1.21, 2.0])
    assert out.outputs["elementwise_loss"][:2].tolist() == pytest.approx([0.8, 0.8])


def test_cispo_clips_the_weight_but_never_drops_a_token() -> None:
    logprobs, inputs = _ratio_datum(advantage=1.0)
    out, grad = run("cispo", logprobs, inputs)
    assert grad.tolist() == pytest.approx([-0.8, -0.8, -0.81, -1.0, -1.19, -1.2, -1.2])
    assert out.loss.item() == pytest.approx(sum(_clip(r, 0.8, 1.2) for r in RATIOS) * -1.0 * -1.0)


def test_gspo_clips_whole_sequences_by_their_geometric_mean_ratio() -> None:
    logprobs = torch.full((4,), -1.0, dtype=torch.float64)
    mask = torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    adv = torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    # Token ratios 1.5, 1.5, 1.5 on the marked tokens: the sequence is outside [0.8, 1.2] and, with A > 0, all of it
    # stops moving, even though each token's own ratio would tell the same story.
    sampler = logprobs - torch.tensor([5.0, 1.5, 1.5, 1.5], dtype=torch.float64).log()
    inputs = {"target_tokens": torch.zeros(4, dtype=torch.long), "logprobs": sampler, "advantages": adv,
              "sequence_ratio_mask": mask}  # fmt: skip
    out, grad = run("gspo", logprobs, inputs)
    assert grad.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0])
    assert out.loss.item() == pytest.approx(-3 * 1.2)
    # Ratios 2.0, 1.0, 0.5 average (geometrically) to 1.0: inside the range, so every token keeps its gradient even
    # though token-level PPO would freeze the first marked one.
    sampler = logprobs - torch.tensor([5.0, 2.0, 1.0, 0.5], dtype=torch.float64).log()
    out, grad = run("gspo", logprobs, dict(inputs, logprobs=sampler))
    assert grad.tolist() == pytest.approx([0.0, -1.0, -1.0, -1.0])


def test_gspo_with_no_marked_token_uses_ratio_one() -> None:
    logprobs, inputs = random_datum("gspo", seed=2)
    out, grad = run("gspo", logprobs, dict(inputs, sequence_ratio_mask=torch.zeros(9)))
    assert out.loss.item() == pytest.approx(-inputs["advantages"].sum().item())
    assert torch.allclose(grad, -inputs["advantages"])


def test_gspo_without_a_mask_averages_over_the_sampled_tokens() -> None:
    logprobs, inputs = random_datum("gspo", seed=6)
    del inputs["sequence_ratio_mask"]
    sampled = torch.arange(9) >= 4
    want, want_grad = run("gspo", logprobs, dict(inputs, sequence_ratio_mask=sampled.double()))
    out, grad = run("gspo", logprobs, inputs, sampled=sampled)
    assert out.loss.item() == pytest.approx(want.loss.item(), rel=1e-12)
    assert torch.allclose(grad, want_grad)
    # No provenance either: the tokens with an advantage are the sampled ones.
    by_advantage, _ = run("gspo", logprobs, dict(inputs, sequence_ratio_mask=(inputs["advantages"] != 0).double()))
    leaf = logprobs.clone().requires_grad_(True)
    bare = compute_loss("gspo", LossInputs(logprobs=leaf, inputs=inputs))
    assert bare.loss.item() == pytest.approx(by_advantage.loss.item(), rel=1e-12)


def test_stable_reinforce_on_policy_is_plain_reinforce() -> None:
    logprobs, inputs = random_datum("stable_reinforce", seed=4)
    _, grad = run("stable_reinforce", logprobs, dict(inputs, logprobs=logprobs.clone()))
    assert torch.allclose(grad, -inputs["advantages"])


def test_stable_reinforce_kl_coeff_pulls_sampled_tokens_toward_the_sampler() -> None:
    logprobs, inputs = random_datum("stable_reinforce", seed=8)
    sampled = sampled_where_advantaged(inputs)
    assert sampled is not None
    base, base_grad = run("stable_reinforce", logprobs, inputs)
    out, grad = run("stable_reinforce", logprobs, inputs, kl_coeff=0.3)
    diff = torch.where(sampled, logprobs - inputs["logprobs"], torch.zeros_like(logprobs))
    assert out.loss.item() == pytest.approx(base.loss.item() + 0.15 * (diff**2).sum().item(), rel=1e-12)
    assert torch.allclose(grad, base_grad + 0.3 * diff)
    assert "kl_coeff" in _error("stable_reinforce", logprobs, inputs, sampled, kl_coeff=-0.1)


def test_stable_reinforce_needs_provenance_and_advantages_on_sampled_tokens_only() -> None:
    logprobs, inputs = random_datum("stable_reinforce", seed=9)
    assert "provenance" in _error("stable_reinforce", logprobs, inputs, None)
    sampled = torch.arange(9) >= 3  # positions 1 and 2 carry advantages but no sampled span covers them
    message = _error("stable_reinforce", logprobs, inputs, sampled)
    assert "position 1" in message and "SampledProvenanceSpan" in message
    assert "cover" in _error("ppo", logprobs, inputs, torch.ones(4, dtype=torch.bool))


# ---- cross-entropy specifics ----


def test_negative_weights_push_a_token_down() -> None:
    logprobs = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    targets = torch.tensor([3, 4])
    pos, pos_grad = run("cross_entropy", logprobs, {"target_tokens": targets, "weights": torch.tensor([1.0, 0.0])})
    neg, neg_grad = run("cross_entropy", logprobs, {"target_tokens": targets, "weights": torch.tensor([-1.0, 0.0])})
    assert neg.loss.item() == -pos.loss.item() == -1.0
    # Gradient descent on the loss raises log p with a positive weight and lowers it with a negative one.
    assert pos_grad.tolist() == [-1.0, 0.0] and neg_grad.tolist() == [1.0, 0.0]


def test_soft_targets_weight_each_of_k_candidate_tokens() -> None:
    logprobs = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]], dtype=torch.float64))
    teacher = torch.tensor([[0.6, 0.4, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    inputs = {"target_tokens": torch.tensor([[1, 2, 3], [4, 5, 6]]), "weights": teacher}
    out, grad = run("cross_entropy", logprobs, inputs)
    want = -(0.6 * math.log(0.5) + 0.4 * math.log(0.3) + 1.0 * math.log(0.9))
    assert out.loss.item() == pytest.approx(want)
    assert torch.equal(grad, -teacher)
    assert out.outputs["logprobs"].shape == (2, 3)


def test_fp32_logprobs_keep_fp32_loss_whatever_the_input_dtypes() -> None:
    logprobs, inputs = random_datum("ppo", seed=0)
    out, _ = run("ppo", logprobs.float(), inputs)
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(run("ppo", logprobs, inputs)[0].loss.item(), rel=1e-5)


@pytest.mark.parametrize("loss", ["importance_sampling", "ppo", "cispo", "stable_reinforce"])
def test_extreme_ratio_on_a_zero_advantage_position_is_harmless(loss: str) -> None:
    # Someone pads prompt positions with a huge negative sampler logprob: exp(p/q) would overflow to inf there.
    logprobs, inputs = random_datum(loss, seed=1)
    padded = inputs["logprobs"].clone()
    padded[0] = -1e4
    out, grad = run(loss, logprobs, dict(inputs, logprobs=padded))
    clean, clean_grad = run(loss, logprobs, inputs)
    assert out.loss.item() == pytest.approx(clean.loss.item(), rel=1e-12)
    assert torch.equal(grad, clean_grad)


# ---- errors a user gets instead of a crash or a silent wrong answer ----


def _error(
    loss: str,
    logprobs: torch.Tensor,
    inputs: dict[str, torch.Tensor],
    sampled: torch.Tensor | None = None,
    **config: object,
) -> str:
    with pytest.raises(InvalidRequestError) as info:
        compute_loss(loss, LossInputs(logprobs, inputs, config, sampled))  # type: ignore[arg-type]
    return str(info.value)


def test_unknown_loss_name_lists_the_real_ones() -> None:
    message = _error("grpo", *random_datum("ppo", 0))
    assert "grpo" in message and "importance_sampling" in message and "stable_reinforce" in message
    with pytest.raises(InvalidRequestError):
        required_inputs("grpo")


def test_missing_required_inputs_are_named() -> None:
    logprobs, inputs = random_datum("ppo", 0)
    del inputs["advantages"]
    assert "advantages" in _error("ppo", logprobs, inputs)


def test_shape_mismatches_are_rejected() -> None:
    logprobs, inputs = random_datum("ppo", 0)
    assert "'advantages'" in _error("ppo", logprobs, dict(inputs, advantages=inputs["advantages"][:-1]))
    assert "'mask'" in _error("ppo", logprobs, dict(inputs, mask=torch.ones(4)))  # extra inputs need rows too
    assert "logprobs" in _error("ppo", logprobs[:-1], inputs)  # the model's logprobs vs target_tokens
    soft_targets = dict(inputs, target_tokens=torch.zeros(9, 2, dtype=torch.long))
    assert "(N,)" in _error("ppo", logprobs, soft_targets)
    ce = {"target_tokens": torch.zeros(9, 2, dtype=torch.long), "weights": torch.ones(9)}
    assert "'weights'" in _error("cross_entropy", torch.zeros(9, 2), ce)


def test_bad_input_values_are_rejected() -> None:
    logprobs, inputs = random_datum("ppo", 0)
    assert "integers" in _error("ppo", logprobs, dict(inputs, target_tokens=inputs["target_tokens"].double()))
    nan_adv = inputs["advantages"].clone()
    nan_adv[3] = float("nan")
    assert "nan" in _error("ppo", logprobs, dict(inputs, advantages=nan_adv))
    crossed = dict(inputs, clip_low_threshold=torch.full((9,), 1.3), clip_high_threshold=torch.full((9,), 1.1))
    assert "clip_low_threshold" in _error("ppo", logprobs, crossed)


def test_config_is_checked_against_what_the_loss_accepts() -> None:
    logprobs, inputs = random_datum("ppo", 0)
    assert "clip_ratio" in _error("ppo", logprobs, inputs, clip_ratio=0.2)
    assert "beta" in _error("importance_sampling", logprobs, inputs, beta=0.1)
    assert "finite number" in _error("ppo", logprobs, inputs, clip_low_threshold="0.8")
    assert "finite number" in _error("ppo", logprobs, inputs, clip_low_threshold=True)
    assert "clip_high_threshold" in _error("ppo", logprobs, inputs, clip_low_threshold=1.3, clip_high_threshold=1.1)
    assert "beta" in _error("dro", logprobs, inputs, beta=-1.0)


def test_required_inputs_for_the_engine() -> None:
    assert required_inputs("cross_entropy") == ("target_tokens", "weights")
    assert required_inputs("ppo") == ("target_tokens", "logprobs", "advantages")
    assert required_inputs("gspo") == ("target_tokens", "logprobs", "advantages")
    assert required_inputs("dpo") == ("target_tokens", "weights", "ref_logprobs")
    assert set(LOSSES) == {
        "cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce", "dppo"
    }  # fmt: skip


# ---- batch metrics ----


def test_reduce_metrics_combines_by_suffix() -> None:
    per_datum = [
        {"loss:sum": 1.5, "ratio:mean": 1.0, "ratio:max": 2.0, "ratio:min": 0.5, "plain": 1.0},
        {"loss:sum": 2.5, "ratio:mean": 3.0, "ratio:max": 5.0, "ratio:min": 0.1, "plain": 3.0, "odd:p90": 4.0},
    ]
    assert reduce_metrics(per_datum) == {
        "loss:sum": 4.0,
        "ratio:mean": 2.0,
        "ratio:max": 5.0,
        "ratio:min": 0.1,
        "plain": 2.0,
        "odd:p90": 4.0,  # an unknown reduction averages over the datums that report it
    }
    assert reduce_metrics([]) == {}


# ---- sampler/trainer drift ----

RL_LOSSES = ["importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce", "dppo"]


@pytest.mark.parametrize("loss", RL_LOSSES)
def test_rl_losses_report_drift_on_the_scored_tokens_against_a_naive_loop(loss: str) -> None:
    logprobs, inputs = random_datum(loss, seed=21)
    sampled = torch.ones_like(logprobs, dtype=torch.bool)
    sampled[:3] = False  # provenance: the first three positions are prompt tokens, with no advantage
    inputs["advantages"] = inputs["advantages"].masked_fill(~sampled, 0.0)
    out, _ = run(loss, logprobs, inputs, sampled=sampled)
    diffs = [float(logprobs[t] - inputs["logprobs"][t]) for t in range(len(logprobs)) if sampled[t]]
    m = out.metrics
    assert m["sampler_drift_tokens:sum"] == len(diffs)
    assert m["sampler_logprob_abs_diff:mean"] == pytest.approx(sum(abs(d) for d in diffs) / len(diffs))
    assert m["sampler_logprob_abs_diff:max"] == pytest.approx(max(abs(d) for d in diffs))
    assert m["sampler_kl_k1:mean"] == pytest.approx(-sum(diffs) / len(diffs))
    assert m["sampler_kl_k3:mean"] == pytest.approx(sum(math.exp(d) - 1 - d for d in diffs) / len(diffs))


def test_without_provenance_drift_is_over_the_tokens_with_an_advantage() -> None:
    logprobs, inputs = random_datum("importance_sampling", seed=3)
    out = compute_loss("importance_sampling", LossInputs(logprobs=logprobs, inputs=inputs))
    weighted = inputs["advantages"] != 0
    assert out.metrics["sampler_drift_tokens:sum"] == int(weighted.sum()) == len(logprobs) - 1
    assert "sampler_drift_tokens:sum" not in run("cross_entropy", *random_datum("cross_entropy", seed=3))[0].metrics


def test_drift_means_weigh_datums_by_their_tokens_and_wild_logprobs_stay_finite() -> None:
    short = {"sampler_drift_tokens:sum": 1.0, "sampler_logprob_abs_diff:mean": 4.0, "sampler_logprob_abs_diff:max": 4.0,
             "sampler_kl_k1:mean": 4.0, "sampler_kl_k3:mean": 1.0, "loss:sum": 1.0}  # fmt: skip
    long = {"sampler_drift_tokens:sum": 3.0, "sampler_logprob_abs_diff:mean": 0.0, "sampler_logprob_abs_diff:max": 0.0,
            "sampler_kl_k1:mean": 0.0, "sampler_kl_k3:mean": 0.0, "loss:sum": 1.0}  # fmt: skip
    combined = reduce_metrics([short, long])
    assert combined["sampler_logprob_abs_diff:mean"] == combined["sampler_kl_k1:mean"] == 1.0  # (4 * 1 + 0 * 3) / 4
    assert combined["sampler_kl_k3:mean"] == 0.25 and combined["sampler_logprob_abs_diff:max"] == 4.0
    assert combined["sampler_drift_tokens:sum"] == 4.0
    logprobs = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    inputs = {"target_tokens": torch.zeros(2, dtype=torch.long), "logprobs": torch.tensor([-1e30, -2.0]),
              "advantages": torch.ones(2)}  # fmt: skip
    m = compute_loss("importance_sampling", LossInputs(logprobs=logprobs, inputs=inputs)).metrics
    assert all(math.isfinite(v) for k, v in m.items() if k.startswith("sampler_"))
