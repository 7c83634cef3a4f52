"""Sampled tokens scored again by the training forward, so a sample reports exactly what ``forward()`` computes.

The sampler decodes with its own fast stack (an fp32 copy in oneDNN's packed layout, a KV cache, one token per
step), whose logits differ from the training forward's packed bf16 pass by float summation order and precision.
RL losses divide the trainer's probability by the sampler's, so any difference is off-policy noise in the importance
weight. Instead of reporting the decoder's numbers, every finished request is run once more through the trainer's
own ``packed_hidden`` + ``target_logprobs`` (the functions ``ServedModel.forward`` uses), in one packed pass over
prompt + completion of all its samples. Both are batch-invariant (see ``lora.MIN_INVARIANT_ROWS``), so the logprobs
of a sample are bit-identical to ``forward()`` on the same tokens, whatever shared either batch. The cost is one
prefill-sized pass per finished request (about the cost of its prompt's prefill, in bf16).

Which distribution (``SamplingParams.logprobs_of``, see engine/reported_logprobs.py): "tempered" (the default)
reports the trainer's ``log_softmax(logits)[token]`` for a row sampled at temperature 1 (or greedily) and
``log_softmax(logits / temperature)[token]`` at another temperature; "model" the trainer's ``log_softmax(logits)``
whatever the temperature; "sampled" (tempered, cut to what top-k/top-p kept) keeps the decoder's own values: it is
by definition the distribution the decoder drew from, and a cut recomputed from other logits can move a boundary
token. Prompt logprobs (the chosen token at each prompt position) come from the same pass, and only the positions
the request asked for are replaced.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from tinkerd.domain.ops import SampleResult, SamplingParams
from tinkerd.engine.lora import LoraRouting, LoraWeights, Segment
from tinkerd.engine.sampling_ops import MIN_TEMPERATURE
from tinkerd.engine.transformer import Transformer

MAX_RESCORE_TOKENS = 8192


@dataclass(frozen=True)
class RescoreItem:
    """A finished request: its prompt, the adapter and sampling parameters it sampled with, and what it returned."""

    prompt: Sequence[int]
    weights: LoraWeights | None
    params: SamplingParams
    result: SampleResult


@dataclass(frozen=True)
class _Row:
    item: int
    sample: int
    tokens: list[int]  # prompt + completion[:-1]: position i predicts tokens[i + 1] (or the last completion token)
    targets: list[int]


def _routing(rows: Sequence[_Row], items: Sequence[RescoreItem]) -> LoraRouting:
    segments: list[Segment] = []
    start = 0
    for row in rows:
        weights = items[row.item].weights
        end = start + len(row.tokens)
        if segments and segments[-1].weights is weights:
            segments[-1] = Segment(segments[-1].start, end, weights)
        else:
            segments.append(Segment(start, end, weights))
        start = end
    return LoraRouting(tuple(segments))


def _groups(rows: list[_Row], budget: int) -> list[list[_Row]]:
    groups: list[list[_Row]] = []
    tokens = 0
    for row in rows:
        if groups and tokens + len(row.tokens) <= budget:
            groups[-1].append(row)
            tokens += len(row.tokens)
        else:
            groups.append([row])
            tokens = len(row.tokens)
    return groups


def rescore(transformer: Transformer, items: Sequence[RescoreItem]) -> list[SampleResult]:
    """Each item's result with its sequences' (and chosen prompt tokens') logprobs from the training forward."""
    rows: list[_Row] = []
    for i, item in enumerate(items):
        prompt = list(item.prompt)
        for s, seq in enumerate(item.result.sequences):
            if not seq.tokens:
                continue
            tokens = prompt + seq.tokens[:-1]
            rows.append(_Row(i, s, tokens, tokens[1:] + seq.tokens[-1:]))
    # rows of one adapter next to each other: one LoRA segment each
    rows.sort(key=lambda r: 0 if items[r.item].weights is None else id(items[r.item].weights))
    new_logprobs: dict[tuple[int, int], list[float]] = {}
    new_prompt: dict[int, list[float | None]] = {}
    with torch.inference_mode():
        for group in _groups(rows, MAX_RESCORE_TOKENS):
            _score_group(transformer, items, group, new_logprobs, new_prompt)
    out: list[SampleResult] = []
    for i, item in enumerate(items):
        result = item.result
        sequences = [
            replace(seq, logprobs=new_logprobs.get((i, s), seq.logprobs)) for s, seq in enumerate(result.sequences)
        ]
        prompt_logprobs = result.prompt_logprobs
        if prompt_logprobs is not None and i in new_prompt:
            prompt_logprobs = new_prompt[i]
        out.append(replace(result, sequences=sequences, prompt_logprobs=prompt_logprobs))
    return out


def _score_group(
    t: Transformer,
    items: Sequence[RescoreItem],
    group: list[_Row],
    new_logprobs: dict[tuple[int, int], list[float]],
    new_prompt: dict[int, list[float | None]],
) -> None:
    routing = _routing(group, items)
    h_N_d = t.packed_hidden([r.tokens for r in group], routing)
    targets_N_1 = torch.tensor([tok for r in group for tok in r.targets], dtype=torch.long, device=t.device)[:, None]
    logprobs_N = t.target_logprobs(h_N_d, targets_N_1, routing)[:, 0]
    starts = itertools.accumulate((len(r.tokens) for r in group), initial=0)
    for row, off in zip(group, starts, strict=False):
        item = items[row.item]
        p = len(item.prompt)
        end = off + len(row.tokens)
        params = item.params
        temperature = params.temperature
        mode = params.logprobs_of
        if mode == "sampled":
            # the distribution the token was drawn from is the decoder's own, cut to what top-k/top-p kept there:
            # recomputing the cut from the trainer's logits can move a boundary token in or out and renormalise
            # differently, so these keep the decoder's values
            chosen = list(item.result.sequences[row.sample].logprobs)
        elif mode == "model" or temperature in (0.0, 1.0):
            chosen = logprobs_N[off + p - 1 : end].tolist()
        else:
            h_C_d = h_N_d[off + p - 1 : end]
            logits_C_V = t.scoring_logits(h_C_d, LoraRouting.single(h_C_d.shape[0], item.weights))
            tempered = torch.log_softmax(logits_C_V / max(temperature, MIN_TEMPERATURE), dim=-1)
            chosen = tempered.gather(1, targets_N_1[off + p - 1 : end])[:, 0].tolist()
        new_logprobs[(row.item, row.sample)] = chosen
        asked = item.result.prompt_logprobs
        if asked is not None and row.item not in new_prompt:
            scored = [None, *logprobs_N[off : off + p - 1].tolist()]
            # prompt_logprobs_last_n leaves the earlier positions empty: keep them so
            new_prompt[row.item] = [None if old is None else new for old, new in zip(asked, scored, strict=True)]
