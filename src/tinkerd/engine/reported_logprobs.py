"""Which distribution a reported logprob is under, for sampled tokens, their top-k lists and prompt_alt_tokens draws.

``sampling_ops.sample_tokens`` picks tokens and reports them under the tempered, untruncated distribution
``log_softmax(logits / temperature)`` ("tempered", the default). A request may ask for another one
(``SamplingParams.logprobs_of``):

- "sampled": the distribution the token was actually drawn from: tempered, cut to the tokens top-k and top-p keep
  (``sampling_ops.keep_thresholds``, the very rule the draw used) and renormalised over them; a greedy row (temperature
  0) is a point mass, so its token's logprob is 0. With it, an importance weight ``p / q`` is exact for the sample.
- "model": ``log_softmax(logits)``, what ``forward()`` scores for the same tokens, whatever the temperature.

These functions give the whole reported distribution of some rows as a [R, V] matrix (``-inf`` outside the kept set
under "sampled"), from which the chosen tokens' logprobs and the top-k lists are read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tinkerd.domain.ops import LogprobDistribution, TopkRow
from tinkerd.engine.sampling_ops import MIN_TEMPERATURE, keep_thresholds


def reported_logprobs(
    logits_R_V: torch.Tensor,
    temperature: Sequence[float],
    top_k: Sequence[int],
    top_p: Sequence[float],
    logprobs_of: Sequence[LogprobDistribution],
) -> torch.Tensor:
    """[R, V] fp32 logprobs of every token under each row's reported distribution (see the module docstring)."""
    out_R_V = torch.empty_like(logits_R_V, dtype=torch.float32)
    for i in range(logits_R_V.shape[0]):
        out_R_V[i] = _row(logits_R_V[i].float(), temperature[i], top_k[i], top_p[i], logprobs_of[i])
    return out_R_V


def _row(
    logits_V: torch.Tensor, temperature: float, top_k: int, top_p: float, mode: LogprobDistribution
) -> torch.Tensor:
    if mode == "model" or (mode == "tempered" and temperature == 0.0):
        return torch.log_softmax(logits_V, dim=-1)
    if temperature == 0.0:  # "sampled", greedy: all the mass on the argmax
        out_V = torch.full_like(logits_V, -torch.inf)
        out_V[logits_V.argmax()] = 0.0
        return out_V
    scaled_V = logits_V / max(temperature, MIN_TEMPERATURE)
    if mode == "tempered":
        return torch.log_softmax(scaled_V, dim=-1)
    # the normaliser as sample_tokens computes it, so the kept set is the one the draw used, to the last bit
    top = scaled_V.max()
    logz = (top + (scaled_V - top).exp().sum().log())[None]
    threshold = keep_thresholds(scaled_V[None, :], [top_k], [top_p], logz)[0]
    kept_V = scaled_V.masked_fill(scaled_V < threshold, -torch.inf)
    return torch.log_softmax(kept_V, dim=-1)


def chosen(logprobs_R_V: torch.Tensor, tokens_R: torch.Tensor) -> list[float]:
    return logprobs_R_V.gather(1, tokens_R[:, None].to(logprobs_R_V.device))[:, 0].tolist()


def topk_rows(logprobs_R_V: torch.Tensor, k: Sequence[int]) -> list[TopkRow]:
    """Per row, its ``k[i]`` most likely (token, logprob) pairs, most likely first; tokens the reported distribution
    excludes (``-inf``) are left out, so a row may hold fewer."""
    width = min(max(k, default=0), logprobs_R_V.shape[1])
    if width == 0:
        return [[] for _ in k]
    vals_R_K, ids_R_K = logprobs_R_V.topk(width, dim=-1)
    rows: list[TopkRow] = []
    for n, ids, vals in zip(k, ids_R_K.tolist(), vals_R_K.tolist(), strict=True):
        rows.append([(t, v) for t, v in zip(ids[:n], vals[:n], strict=True) if v != -float("inf")])
    return rows
