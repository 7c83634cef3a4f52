"""Combining per-datum metrics into a batch's, by the reduction each name carries ('loss:sum', 'x:mean', ...), and the
sampler/trainer drift metrics of the RL losses."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

_REDUCERS: dict[str, Callable[[list[float]], float]] = {
    "sum": sum,
    "mean": lambda values: sum(values) / len(values),
    "max": max,
    "min": min,
}

# How the trainer's logprobs p of a datum's tokens compare with the sampler's q it carries (loss_fn_inputs
# 'logprobs'), over its scored tokens (see ``drift_metrics``); the means are over tokens, also across datums.
DRIFT_TOKENS = "sampler_drift_tokens:sum"  # how many tokens were compared
DRIFT_ABS_MEAN = "sampler_logprob_abs_diff:mean"  # mean |log p - log q|
DRIFT_ABS_MAX = "sampler_logprob_abs_diff:max"  # max |log p - log q|
DRIFT_K1 = "sampler_kl_k1:mean"  # mean (log q - log p): the cookbook's optim/kl_sample_train_v1 on these tokens
DRIFT_K3 = "sampler_kl_k3:mean"  # mean (exp(r) - 1 - r), r = log p - log q: an unbiased, >= 0 KL(q || p) estimate
_TOKEN_WEIGHTED = (DRIFT_ABS_MEAN, DRIFT_K1, DRIFT_K3)
# |log p - log q| beyond this many nats is taken as this many in k3, so a wild sampler logprob cannot overflow it.
_K3_LOG_RATIO_CAP = 50.0


def drift_metrics(p_T: torch.Tensor, q_T: torch.Tensor, scored_T: torch.Tensor) -> dict[str, float]:
    """Drift metrics of one datum: trainer logprobs ``p_T``, sampler logprobs ``q_T``, bool ``scored_T``."""
    with torch.no_grad():
        r = (p_T.detach().double() - q_T.double())[scored_T]
        n = int(r.numel())
        if n == 0:
            return {DRIFT_TOKENS: 0.0, DRIFT_ABS_MEAN: 0.0, DRIFT_ABS_MAX: 0.0, DRIFT_K1: 0.0, DRIFT_K3: 0.0}
        capped = r.clamp(-_K3_LOG_RATIO_CAP, _K3_LOG_RATIO_CAP)
        return {
            DRIFT_TOKENS: float(n),
            DRIFT_ABS_MEAN: float(r.abs().mean()),
            DRIFT_ABS_MAX: float(r.abs().max()),
            DRIFT_K1: float((-r).mean()),
            DRIFT_K3: float((capped.exp() - 1 - capped).mean()),
        }


def reduce_metrics(per_datum: Sequence[dict[str, float]]) -> dict[str, float]:
    """One value per metric name over the datums that report it: ':sum' sums, ':max'/':min' take the extreme,
    ':mean' and any other or missing suffix average; the drift means average over compared tokens, not datums."""
    values_by_name: dict[str, list[float]] = {}
    for metrics in per_datum:
        for name, value in metrics.items():
            values_by_name.setdefault(name, []).append(float(value))
    combined: dict[str, float] = {}
    for name, values in values_by_name.items():
        suffix = name.rpartition(":")[2] if ":" in name else ""
        combined[name] = _REDUCERS.get(suffix, _REDUCERS["mean"])(values)
    weights = [m.get(DRIFT_TOKENS, 0.0) for m in per_datum]
    total = sum(weights)
    for name in _TOKEN_WEIGHTED:
        if name in combined:
            weighted = sum(w * m.get(name, 0.0) for w, m in zip(weights, per_datum, strict=True))
            combined[name] = weighted / total if total > 0 else 0.0
    return combined
