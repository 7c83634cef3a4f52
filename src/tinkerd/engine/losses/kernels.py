"""The loss formulas as pure tensor functions, each returning the per-token loss (its sum is the datum's loss).

Notation, as in the Tinker docs: ``logprobs`` is log p_theta (the learner), ``sampler_logprobs`` is log q (the
sampler that produced the tokens), ``advantages`` is A. Nothing here normalises: every loss is a plain sum of
per-token terms, so weights and advantages carry any normalisation the caller wants.

Where a formula has a stop-gradient (sg), the value inside it is computed from ``const_logprobs``, which callers set
to ``logprobs.detach()``. Taking it as a separate argument, rather than detaching inside, keeps each kernel a smooth
function of ``logprobs`` alone, so the tests can check its gradient numerically with ``torch.autograd.gradcheck``.

Thresholds may be Python floats or per-token tensors of shape [T].
"""

from __future__ import annotations

import torch

Threshold = float | torch.Tensor


def _log_ratio(logprobs_T: torch.Tensor, sampler_logprobs_T: torch.Tensor, advantages_T: torch.Tensor) -> torch.Tensor:
    """log(p/q) per token, zeroed where the advantage is zero.

    A token with zero advantage contributes nothing to any ratio-weighted loss, whatever its ratio. Zeroing its
    log-ratio first means a huge one there (say a prompt position padded with a very negative sampler logprob) cannot
    overflow exp() to inf and turn the sum into inf * 0 = nan, nor leak nan into the gradient.
    """
    return torch.where(advantages_T != 0, logprobs_T - sampler_logprobs_T, torch.zeros_like(logprobs_T))


def _clamp(x: torch.Tensor, low: Threshold, high: Threshold) -> torch.Tensor:
    """torch.clamp, which takes two numbers or two tensors but not one of each: lift a lone number to a tensor."""
    if isinstance(low, float) and isinstance(high, float):
        return torch.clamp(x, low, high)
    return torch.clamp(x, torch.as_tensor(low, dtype=x.dtype), torch.as_tensor(high, dtype=x.dtype))


def cross_entropy(logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """-w * log p, token by token ([T] or [T, K]). Weights may be any real number, negative ones included."""
    return -logprobs * weights


def importance_sampling(
    logprobs_T: torch.Tensor, sampler_logprobs_T: torch.Tensor, advantages_T: torch.Tensor
) -> torch.Tensor:
    """-(p/q) * A: REINFORCE corrected for the sampler differing from the learner."""
    ratio_T = torch.exp(_log_ratio(logprobs_T, sampler_logprobs_T, advantages_T))
    return -ratio_T * advantages_T


def ppo(
    logprobs_T: torch.Tensor,
    sampler_logprobs_T: torch.Tensor,
    advantages_T: torch.Tensor,
    clip_low: Threshold,
    clip_high: Threshold,
) -> torch.Tensor:
    """-min(r * A, clip(r, low, high) * A) with r = p/q, per token (the clip bounds are ratios, e.g. 0.8 and 1.2)."""
    ratio_T = torch.exp(_log_ratio(logprobs_T, sampler_logprobs_T, advantages_T))
    clipped_T = _clamp(ratio_T, clip_low, clip_high)
    return -torch.minimum(ratio_T * advantages_T, clipped_T * advantages_T)


def cispo(
    logprobs_T: torch.Tensor,
    const_logprobs_T: torch.Tensor,
    sampler_logprobs_T: torch.Tensor,
    advantages_T: torch.Tensor,
    clip_low: Threshold,
    clip_high: Threshold,
) -> torch.Tensor:
    """-sg(clip(p/q, low, high)) * log p * A: the clipped ratio only scales the policy gradient, so no token's
    gradient is ever cut to zero (unlike PPO)."""
    ratio_T = torch.exp(_log_ratio(const_logprobs_T, sampler_logprobs_T, advantages_T))
    weight_T = _clamp(ratio_T, clip_low, clip_high)
    return -weight_T * logprobs_T * advantages_T


def dro(
    logprobs_T: torch.Tensor, sampler_logprobs_T: torch.Tensor, advantages_T: torch.Tensor, beta: float
) -> torch.Tensor:
    """-(log p * A - beta/2 * (log p - log q)^2): a quadratic pull toward the sampler on every token, even those
    with zero advantage."""
    return -(logprobs_T * advantages_T - 0.5 * beta * (logprobs_T - sampler_logprobs_T) ** 2)


def gspo(
    logprobs_T: torch.Tensor,
    const_logprobs_T: torch.Tensor,
    sampler_logprobs_T: torch.Tensor,
    advantages_T: torch.Tensor,
    sequence_ratio_mask_T: torch.Tensor,
    clip_low: Threshold,
    clip_high: Threshold,
) -> torch.Tensor:
    """GSPO-token: PPO's clipped objective with every token's ratio set to the sequence ratio.

    The sequence ratio s is the geometric mean of p/q over the tokens ``sequence_ratio_mask`` marks (nonzero). Token
    t's ratio is s in value, with the gradient of its own log p: ``sg(s) * p_t / sg(p_t)``. With no marked token the
    mean is over nothing; we take s = 1 (an empty geometric mean) rather than nan.
    """
    in_ratio_T = sequence_ratio_mask_T != 0
    diffs_T = torch.where(in_ratio_T, const_logprobs_T - sampler_logprobs_T, torch.zeros_like(const_logprobs_T))
    sequence_log_ratio = diffs_T.sum() / in_ratio_T.sum().clamp(min=1)
    ratio_T = torch.exp(sequence_log_ratio + logprobs_T - const_logprobs_T)
    clipped_T = _clamp(ratio_T, clip_low, clip_high)
    return -torch.minimum(ratio_T * advantages_T, clipped_T * advantages_T)


def truncated_importance_reinforce(
    logprobs_T: torch.Tensor,
    const_logprobs_T: torch.Tensor,
    sampler_logprobs_T: torch.Tensor,
    advantages_T: torch.Tensor,
    truncation: float,
) -> torch.Tensor:
    """-sg(min(p/q, C)) * log p * A: REINFORCE with a truncated, stop-gradient importance weight.

    Our stand-in for ``stable_reinforce`` (see ``registry``): the weight corrects for the sampler differing from the
    learner, and the cap C bounds how far one stale or numerically divergent token can push the update.
    """
    ratio_T = torch.exp(_log_ratio(const_logprobs_T, sampler_logprobs_T, advantages_T))
    weight_T = torch.clamp(ratio_T, max=truncation)
    return -weight_T * logprobs_T * advantages_T


def sampled_log_ratio_penalty(
    logprobs_T: torch.Tensor, sampler_logprobs_T: torch.Tensor, sampled_T: torch.Tensor, coeff: float
) -> torch.Tensor:
    """coeff/2 * (log p - log q)^2 on the sampled tokens, 0 elsewhere: a pull toward the sampler, as in DRO."""
    diff_T = torch.where(sampled_T, logprobs_T - sampler_logprobs_T, torch.zeros_like(logprobs_T))
    return 0.5 * coeff * diff_T**2


def dppo(
    logprobs_T: torch.Tensor,
    sampler_logprobs_T: torch.Tensor,
    advantages_T: torch.Tensor,
    mask_T: torch.Tensor,
    mask_high: float,
    mask_low: float,
    adv_tau: float,
    kl_tau: float,
) -> torch.Tensor:
    """DPPO with a binary total-variation trust region, plus a squared log-ratio pull toward the sampler, per token:

    ``-keep * adv_tau * A * p/q + kl_tau * m * (log p - log q)^2``, where ``m`` is the token mask and ``keep`` drops
    (from the policy-gradient term only) a masked-in token whose probability has left the trust region in the
    direction its advantage pushes: ``p - q > mask_high`` with A > 0, or ``p - q < -mask_low`` with A < 0 (p and q
    are probabilities here, not ratios). The trust-region test is on values, so it carries no gradient.
    """
    inside_T = mask_T != 0
    log_ratio_T = torch.where(inside_T, logprobs_T - sampler_logprobs_T, torch.zeros_like(logprobs_T))
    with torch.no_grad():
        left_T = dppo_left_trust_region(logprobs_T, sampler_logprobs_T, advantages_T, mask_T, mask_high, mask_low)
        keep_T = (inside_T & ~left_T).to(logprobs_T.dtype)
    policy_T = keep_T * adv_tau * advantages_T * torch.exp(log_ratio_T)
    return -policy_T + kl_tau * mask_T * log_ratio_T**2


def dppo_left_trust_region(
    logprobs_T: torch.Tensor,
    sampler_logprobs_T: torch.Tensor,
    advantages_T: torch.Tensor,
    mask_T: torch.Tensor,
    mask_high: float,
    mask_low: float,
) -> torch.Tensor:
    """[T] bool: the masked-in tokens DPPO drops from its policy-gradient term (for the metrics)."""
    moved_T = torch.exp(logprobs_T) - torch.exp(sampler_logprobs_T)
    left_T = torch.where(advantages_T > 0, moved_T > mask_high, (advantages_T < 0) & (moved_T < -mask_low))
    return left_T & (mask_T != 0)


def dpo(
    chosen_logprobs_T: torch.Tensor,
    chosen_ref_T: torch.Tensor,
    chosen_weights_T: torch.Tensor,
    rejected_logprobs_T: torch.Tensor,
    rejected_ref_T: torch.Tensor,
    rejected_weights_T: torch.Tensor,
    beta: float,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One preference pair's DPO loss (the sigmoid form, with conservative label smoothing), and the two implicit
    rewards' log-ratios it compares.

    ``s = sum_t w_t * (log p_t - log ref_t)`` over each sequence's weighted targets; ``z = beta * (s_chosen -
    s_rejected)``; loss ``= -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)`` with ``eps = label_smoothing``.
    Returns (loss, s_chosen, s_rejected), all scalars; only the loss is meant for backward.
    """
    s_chosen = (chosen_weights_T * (chosen_logprobs_T - chosen_ref_T)).sum()
    s_rejected = (rejected_weights_T * (rejected_logprobs_T - rejected_ref_T)).sum()
    z = beta * (s_chosen - s_rejected)
    loss = -(1.0 - label_smoothing) * torch.nn.functional.logsigmoid(z) - label_smoothing * (
        torch.nn.functional.logsigmoid(-z)
    )
    return loss, s_chosen, s_rejected
