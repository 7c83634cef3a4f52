"""What a sampling request asks about its prompt, computed from the prefill's hidden states: prompt logprobs (all,
or the last n), top-k prompt logprobs, the logprobs of chosen ids (``target_prompt_logprobs``) and independent
draws at every position (``prompt_alt_tokens``).

Row ``i`` of every per-position answer is prompt position ``i + 1``, predicted from the hidden state at position
``i``. Prompt logprobs, top-k prompt logprobs and target logprobs are the untempered model distribution
(``log_softmax(logits)``, what ``compute_logprobs`` and ``forward()`` report); prompt_alt_tokens are drawn at the
request's temperature and reported under the request's ``logprobs_of`` (see ``reported_logprobs``). Full-vocabulary
logits are materialised ``chunk`` positions at a time, only over the positions some answer needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tinkerd.domain.ops import CellGrid, LogprobDistribution, PromptAltTokens, SamplingParams, TopkRow
from tinkerd.engine.reported_logprobs import reported_logprobs
from tinkerd.engine.sampling_ops import MIN_TEMPERATURE, row_seed

# The random stream of a request's prompt_alt_tokens draws: a sample index no request's samples reach.
ALT_TOKENS_STREAM = 1 << 40


@dataclass(frozen=True)
class PromptQuestions:
    prompt_logprobs: bool = False
    topk: int = 0
    last_n: int | None = None  # prompt_logprobs and topk over the last n prompt tokens only
    targets: CellGrid | None = None  # int ids; row i = position i + 1
    alt_k: int = 0

    def any(self) -> bool:
        return self.prompt_logprobs or self.topk > 0 or self.targets is not None or self.alt_k > 0


@dataclass
class PromptAnswers:
    prompt_logprobs: list[float | None] | None = None
    topk: list[TopkRow | None] | None = None
    targets: CellGrid | None = None
    alt: PromptAltTokens | None = None


def answer(
    prompt: list[int],
    params: SamplingParams,
    questions: PromptQuestions,
    logits_of: Callable[[int, int], torch.Tensor],
    chunk: int,
) -> PromptAnswers:
    """``logits_of(s, e)`` is the [e - s, V] fp32 logits of prompt positions s..e-1 (each predicting the next)."""
    rows = len(prompt) - 1
    first_scored = rows - questions.last_n if questions.last_n is not None else 0
    starts = []
    if questions.prompt_logprobs or questions.topk > 0:
        starts.append(first_scored)
    if questions.alt_k > 0:
        starts.append(0)
    if questions.targets is not None:
        t = questions.targets
        starts.append(min((r for r, v in zip(t.rows, t.values, strict=True) if v != -1), default=rows))
    start = min(starts, default=rows)

    chosen: list[float | None] = [None] * len(prompt)
    topk: list[TopkRow | None] = [None] * len(prompt)
    target_values = [0.0] * (len(questions.targets.rows) if questions.targets else 0)
    cells_by_row: dict[int, list[int]] = {}
    if questions.targets is not None:
        for c, r in enumerate(questions.targets.rows):
            if int(questions.targets.values[c]) != -1:  # a listed -1 cell asks for nothing and answers 0.0
                cells_by_row.setdefault(r, []).append(c)
    alt_tokens: list[list[int]] = []
    alt_logprobs: list[list[float]] = []
    generator = torch.Generator(device="cpu")
    generator.manual_seed(row_seed(params.seed, ALT_TOKENS_STREAM))
    targets_P = torch.tensor(prompt, dtype=torch.long)

    for s in range(start, rows, chunk):
        e = min(rows, s + chunk)
        logits_C_V = logits_of(s, e).float()
        logprobs_C_V = torch.log_softmax(logits_C_V, dim=-1)
        lo = max(s, first_scored)
        if (questions.prompt_logprobs or questions.topk > 0) and lo < e:
            scored_C_V = logprobs_C_V[lo - s :]
            got = scored_C_V.gather(1, targets_P[lo + 1 : e + 1, None].to(scored_C_V.device))[:, 0].tolist()
            chosen[lo + 1 : e + 1] = got
            if questions.topk > 0:
                vals, ids = scored_C_V.topk(min(questions.topk, scored_C_V.shape[1]), dim=-1)
                pairs = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), vals.tolist(), strict=True)]
                topk[lo + 1 : e + 1] = pairs
        if cells_by_row and questions.targets is not None:
            for r in range(s, e):
                for c in cells_by_row.get(r, ()):
                    target_values[c] = float(logprobs_C_V[r - s, int(questions.targets.values[c])])
        if questions.alt_k > 0:
            tokens_C_K, lps_C_K = _alt_draws(logits_C_V, params, questions.alt_k, generator)
            alt_tokens += tokens_C_K
            alt_logprobs += lps_C_K

    answers = PromptAnswers()
    if questions.prompt_logprobs:
        answers.prompt_logprobs = chosen
    if questions.topk > 0:
        answers.topk = topk
    if questions.targets is not None:
        t = questions.targets
        answers.targets = CellGrid(t.shape, t.rows, t.cols, target_values, t.sparse)
    if questions.alt_k > 0:
        answers.alt = PromptAltTokens(alt_tokens, alt_logprobs)
    return answers


def _alt_draws(
    logits_C_V: torch.Tensor, params: SamplingParams, k: int, generator: torch.Generator
) -> tuple[list[list[int]], list[list[float]]]:
    """``k`` draws with replacement per row from softmax(logits / temperature) (the argmax, k times, at temperature
    0), with their logprobs under the request's reported distribution (temperature only: draws are never cut)."""
    c = logits_C_V.shape[0]
    if params.temperature == 0.0:
        tokens_C_K = logits_C_V.argmax(dim=-1, keepdim=True).expand(c, k)
    else:
        probs_C_V = torch.softmax(logits_C_V / max(params.temperature, MIN_TEMPERATURE), dim=-1)
        tokens_C_K = torch.multinomial(probs_C_V.cpu(), k, replacement=True, generator=generator)
    modes: list[LogprobDistribution] = [params.logprobs_of] * c
    reported_C_V = reported_logprobs(logits_C_V, [params.temperature] * c, [-1] * c, [1.0] * c, modes)
    lps_C_K = reported_C_V.gather(1, tokens_C_K.to(reported_C_V.device))
    return tokens_C_K.tolist(), lps_C_K.tolist()
