"""Choosing the next token for many sequences at once, each with its own temperature, top-k, top-p and random stream.

Randomness is one uniform number per row and step, drawn in advance from the row's own generator (seeded from the
request's seed and the sample's index) and turned into a token by inverse CDF over the vocabulary in token-id order.
Top-k and top-p only zero the weights of the tokens they exclude (a per-row threshold on the scaled logits), so the
token a row gets depends on its own logits and its own uniform alone: never on which rows share the batch or on how
many candidates they ask for. No full sort of the vocabulary happens unless a row asks for top-p without top-k and
its nucleus is wider than ``TOP_P_CANDIDATES`` tokens.

The logprob reported for a sampled token is under the distribution it was drawn from before truncation:
``log_softmax(logits / temperature)``. Tinker returns the logprobs used for sampling, temperature scaling included
(tinker-cookbook PR #86, confirmed by the maintainers), and RL losses use them as the importance-sampling denominator,
so they must describe the sampling distribution; top-k/top-p renormalisation is not reflected (as in vLLM/SGLang's
default). Greedy rows (temperature 0) report the untempered ``log_softmax(logits)``.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

# How many candidates a top-p-only row looks at before falling back to a full sort of its row.
TOP_P_CANDIDATES = 1024
_MASK64 = (1 << 64) - 1


def row_seed(seed: int | None, sample_index: int) -> int:
    """A 63-bit generator seed for sample ``sample_index`` of a request (splitmix64 of the pair); fresh if no seed."""
    if seed is None:
        return secrets.randbits(63)
    x = (seed * 0x9E3779B97F4A7C15 + (sample_index + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def draw_uniforms(seed: int | None, sample_index: int, count: int) -> list[float]:
    """The ``count`` uniforms in [0, 1) that sample ``sample_index`` consumes, one per generated token."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(row_seed(seed, sample_index))
    return torch.rand(count, generator=generator, dtype=torch.float64).tolist()


def sample_tokens(
    logits_B_V: torch.Tensor,
    temperature: Sequence[float],
    top_k: Sequence[int],
    top_p: Sequence[float],
    uniform: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row next tokens [B] (int64) and their logprobs [B] (fp32) from fp32 logits.

    ``temperature[i] == 0`` is greedy; ``top_k[i] <= 0`` or ``>= V`` means no top-k; ``top_p[i] >= 1`` means no
    top-p; ``uniform[i]`` in [0, 1) is the row's random draw for this step.
    """
    b = logits_B_V.shape[0]
    greedy = [i for i in range(b) if temperature[i] == 0.0]
    if len(greedy) == b:
        return _greedy(logits_B_V)
    if not greedy:
        return _random(logits_B_V, temperature, top_k, top_p, uniform)
    tokens_B = torch.empty(b, dtype=torch.long, device=logits_B_V.device)
    logprobs_B = torch.empty(b, dtype=torch.float32, device=logits_B_V.device)
    rand = [i for i in range(b) if temperature[i] != 0.0]
    g_idx = torch.tensor(greedy, device=logits_B_V.device)
    r_idx = torch.tensor(rand, device=logits_B_V.device)
    tokens_B[g_idx], logprobs_B[g_idx] = _greedy(logits_B_V[g_idx])
    tokens_B[r_idx], logprobs_B[r_idx] = _random(
        logits_B_V[r_idx],
        [temperature[i] for i in rand],
        [top_k[i] for i in rand],
        [top_p[i] for i in rand],
        [uniform[i] for i in rand],
    )
    return tokens_B, logprobs_B


def _greedy(logits_R_V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens_R = logits_R_V.argmax(dim=-1)
    chosen_R = logits_R_V.gather(1, tokens_R[:, None])[:, 0]
    return tokens_R, chosen_R - torch.logsumexp(logits_R_V, dim=-1)


MIN_TEMPERATURE = 1e-6


def _random(
    logits_R_V: torch.Tensor,
    temperature: Sequence[float],
    top_k: Sequence[int],
    top_p: Sequence[float],
    uniform: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    r, v = logits_R_V.shape
    device = logits_R_V.device
    if all(t == 1.0 for t in temperature):
        scaled_R_V = logits_R_V
    else:
        # A positive temperature far below any useful one (1e-320 was sent) would overflow the scaled logits to
        # infinity; from MIN_TEMPERATURE down the choice is the argmax anyway.
        temps = [max(t, MIN_TEMPERATURE) for t in temperature]
        scaled_R_V = logits_R_V / torch.tensor(temps, dtype=torch.float32, device=device)[:, None]
    max_R_1 = scaled_R_V.amax(dim=-1, keepdim=True)
    weights_R_V = (scaled_R_V - max_R_1).exp_()
    total_R = weights_R_V.sum(dim=-1)  # normaliser of the full (untruncated) tempered distribution
    logz_R = max_R_1[:, 0] + total_R.log()

    filtered = [i for i in range(r) if 0 < top_k[i] < v or top_p[i] < 1.0]
    if len(filtered) == r:  # the common case (one request's settings, or generate's default top-k): no gathers
        thresholds_R = keep_thresholds(scaled_R_V, top_k, top_p, logz_R)
        weights_R_V.masked_fill_(scaled_R_V < thresholds_R[:, None], 0.0)
    elif filtered:
        f_idx = torch.tensor(filtered, device=device)
        scaled_F_V = scaled_R_V[f_idx]
        thresholds_F = keep_thresholds(
            scaled_F_V, [top_k[i] for i in filtered], [top_p[i] for i in filtered], logz_R[f_idx]
        )
        weights_R_V[f_idx] = weights_R_V[f_idx].masked_fill_(scaled_F_V < thresholds_F[:, None], 0.0)

    # float64 prefix sums: in fp32, adding a 1e-9 weight to a running sum near 1 would lose it, starving late ids.
    cdf_R_V = weights_R_V.cumsum(dim=-1, dtype=torch.float64)
    target_R_1 = torch.tensor(uniform, dtype=torch.float64, device=device)[:, None] * cdf_R_V[:, -1:]
    # right=True: the first id whose prefix sum exceeds the target, which never lands on a zero-weight id
    tokens_R = torch.searchsorted(cdf_R_V, target_R_1, right=True)[:, 0].clamp_(max=v - 1)
    logprobs_R = scaled_R_V.gather(1, tokens_R[:, None])[:, 0] - logz_R
    return tokens_R, logprobs_R


def keep_thresholds(
    scaled_F_V: torch.Tensor,
    top_k: Sequence[int],
    top_p: Sequence[float],
    logz_F: torch.Tensor,
    exhaustive: bool = False,
) -> torch.Tensor:
    """Per row, the smallest scaled logit still kept by top-k then top-p (vLLM's order: the nucleus is taken over the
    top-k renormalised distribution). Ties with the threshold are kept. ``logz_F`` is each row's full log-normaliser.
    """
    f, v = scaled_F_V.shape
    device = scaled_F_V.device
    k_eff = [k if 0 < k < v else v for k in top_k]
    wide = min(v, TOP_P_CANDIDATES) if not exhaustive else v
    width = max(k if k < v else (wide if p < 1.0 else 1) for k, p in zip(k_eff, top_p, strict=True))
    vals_F_K = scaled_F_V.topk(width, dim=-1, sorted=True).values
    cols_K = torch.arange(width, device=device)
    k_F = torch.tensor(k_eff, device=device)
    in_topk_F_K = cols_K[None, :] < k_F[:, None]
    kth_F = vals_F_K.gather(1, (k_F.clamp(max=width) - 1)[:, None])[:, 0]
    thresholds_F = torch.where(k_F < v, kth_F, torch.full_like(kth_F, -torch.inf))

    p_rows = [i for i in range(f) if top_p[i] < 1.0]
    if not p_rows:
        return thresholds_F
    p_idx = torch.tensor(p_rows, device=device)
    vals_P_K = vals_F_K[p_idx]
    in_topk_P_K = in_topk_F_K[p_idx]
    limited_P = (k_F < v)[p_idx]
    masked_P_K = vals_P_K.masked_fill(~in_topk_P_K, -torch.inf)
    # the nucleus is over the top-k set when there is one, else over the whole vocabulary
    logz_P = torch.where(limited_P, torch.logsumexp(masked_P_K, dim=-1), logz_F[p_idx])
    probs_P_K = (masked_P_K - logz_P[:, None]).exp()
    cum_P_K = probs_P_K.cumsum(dim=-1, dtype=torch.float64)
    p_P = torch.tensor([top_p[i] for i in p_rows], dtype=torch.float64, device=device)
    # keep a candidate while the mass strictly before it is below top_p (so the first is always kept)
    keep_P_K = ((cum_P_K - probs_P_K) < p_P[:, None]) & in_topk_P_K
    n_keep_P = keep_P_K.sum(dim=-1).clamp(min=1)
    p_thresh_P = vals_P_K.gather(1, (n_keep_P - 1)[:, None])[:, 0]
    thresholds_F[p_idx] = torch.maximum(thresholds_F[p_idx], p_thresh_P)

    # a top-p-only row whose nucleus did not fit in the candidates it looked at: redo it over the whole vocabulary
    short_P = ~limited_P & (cum_P_K[:, -1] < p_P) & (n_keep_P == width)
    if not exhaustive and width < v and bool(short_P.any()):
        redo = [p_rows[j] for j in torch.nonzero(short_P)[:, 0].tolist()]
        r_idx = torch.tensor(redo, device=device)
        thresholds_F[r_idx] = keep_thresholds(
            scaled_F_V[r_idx], [top_k[i] for i in redo], [top_p[i] for i in redo], logz_F[r_idx], exhaustive=True
        )
    return thresholds_F
