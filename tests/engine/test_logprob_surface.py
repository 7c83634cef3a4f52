"""The sampler's logprob options against naive computations from one full forward: which distribution sampled tokens'
logprobs are under (tempered, sampled, model), top-k sample logprobs, prompt logprobs of the last n tokens, target
prompt logprobs and prompt_alt_tokens draws."""

from __future__ import annotations

import math

import pytest
import torch

from tests.engine.test_sampler import PROMPTS, adapter, engine, full_logprobs, job
from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import CellGrid, LogprobDistribution, SamplingParams
from tinkerd.engine.sample_job import SampleJob
from tinkerd.engine.sampler import Sampler
from tinkerd.engine.transformer import Transformer


def naive_distribution(
    logits_V: torch.Tensor, temperature: float, top_k: int, top_p: float, mode: LogprobDistribution
) -> torch.Tensor:
    """The reported distribution as a textbook would compute it: sort, cut, renormalise (-inf outside)."""
    logits_V = logits_V.double()
    if mode == "model" or (mode == "tempered" and temperature == 0):
        return torch.log_softmax(logits_V, -1)
    if temperature == 0:
        out = torch.full_like(logits_V, -math.inf)
        out[int(logits_V.argmax())] = 0.0
        return out
    probs = torch.softmax(logits_V / temperature, -1)
    if mode == "tempered":
        return probs.log()
    order = torch.argsort(probs, descending=True).tolist()
    kept = order[:top_k] if top_k > 0 else order
    mass = sum(float(probs[i]) for i in kept)
    nucleus: list[int] = []
    before = 0.0
    for i in kept:  # top-p over the top-k renormalised distribution: keep while the mass before is below top_p
        if before < top_p:
            nucleus.append(i)
        before += float(probs[i]) / mass
    out = torch.full_like(logits_V, -math.inf)
    total = sum(float(probs[i]) for i in nucleus)
    for i in nucleus:
        out[i] = math.log(float(probs[i]) / total)
    return out


def logits_along(t: Transformer, seq: list[int], weights: object = None) -> torch.Tensor:
    """Untempered logprobs at every position of ``seq`` (log_softmax keeps the logits' differences)."""
    return full_logprobs(t, seq, weights)  # type: ignore[arg-type]


CASES = [
    (mode, *setting) for mode in ("tempered", "sampled", "model") for setting in [(0.9, 10, 0.5), (0.0, -1, 1.0)]
] + [("sampled", 0.7, 5, 1.0), ("sampled", 1.3, -1, 0.8)]


@pytest.mark.parametrize(("mode", "temperature", "top_k", "top_p"), CASES)
def test_sampled_token_logprobs_and_topk_are_under_the_chosen_distribution(
    mode: LogprobDistribution, temperature: float, top_k: int, top_p: float
) -> None:
    t = engine()
    prompt = PROMPTS[0]
    params = SamplingParams(max_tokens=4, temperature=temperature, top_k=top_k, top_p=top_p, seed=11, logprobs_of=mode)
    k = 4
    (result,) = Sampler(t).run([SampleJob(prompt, params, 2, adapter(1), topk_sample_logprobs=k)])
    for seq in result.sequences:
        every = logits_along(t, prompt + seq.tokens, adapter(1))[len(prompt) - 1 : -1]
        assert seq.topk_logprobs is not None and len(seq.topk_logprobs) == len(seq.tokens)
        for pos, token in enumerate(seq.tokens):
            naive = naive_distribution(every[pos], temperature, top_k, top_p, mode)
            assert seq.logprobs[pos] == pytest.approx(float(naive[token]), abs=1e-4)
            want = [(i, float(naive[i])) for i in torch.argsort(naive, descending=True)[:k].tolist()]
            want = [(i, v) for i, v in want if v != -math.inf]
            got = seq.topk_logprobs[pos]
            assert [i for i, _ in got] == [i for i, _ in want]
            assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-4)
        if mode == "sampled" and temperature == 0:
            assert seq.logprobs == [0.0] * len(seq.tokens)


def test_the_distribution_never_changes_the_tokens_drawn() -> None:
    base = {"max_tokens": 8, "temperature": 0.8, "top_k": 6, "top_p": 0.9, "seed": 5}
    runs = {
        mode: Sampler(engine()).run([job(PROMPTS[1], num_samples=3, base=base, logprobs_of=mode)])[0]
        for mode in ("tempered", "sampled", "model")
    }
    tokens = {mode: [s.tokens for s in r.sequences] for mode, r in runs.items()}
    assert tokens["tempered"] == tokens["sampled"] == tokens["model"]
    # cutting the tail and renormalising can only raise a kept token's logprob
    for s_t, s_s in zip(runs["tempered"].sequences, runs["sampled"].sequences, strict=True):
        assert all(a <= b + 1e-6 for a, b in zip(s_t.logprobs, s_s.logprobs, strict=True))


def test_prompt_logprobs_last_n_scores_only_the_suffix() -> None:
    t = engine()
    prompt = PROMPTS[1]
    params = SamplingParams(max_tokens=1)
    full, last = Sampler(t).run(
        [
            SampleJob(prompt, params, 1, None, prompt_logprobs=True, topk_prompt_logprobs=3),
            SampleJob(prompt, params, 1, None, prompt_logprobs=True, topk_prompt_logprobs=3, prompt_logprobs_last_n=4),
        ]
    )
    assert full.prompt_logprobs is not None and last.prompt_logprobs is not None
    assert last.prompt_logprobs[:-4] == [None] * (len(prompt) - 4)
    assert last.prompt_logprobs[-4:] == pytest.approx(full.prompt_logprobs[-4:], abs=1e-6)
    assert last.topk_prompt_logprobs is not None and full.topk_prompt_logprobs is not None
    assert last.topk_prompt_logprobs[:-4] == [None] * (len(prompt) - 4)
    assert [[i for i, _ in row or []] for row in last.topk_prompt_logprobs[-4:]] == [
        [i for i, _ in row or []] for row in full.topk_prompt_logprobs[-4:]
    ]


def test_target_prompt_logprobs_are_the_model_logprobs_of_the_named_ids() -> None:
    t = engine()
    prompt = PROMPTS[1]
    rows = len(prompt) - 1
    cells = [(0, 0, 17), (0, 2, 3), (4, 1, 95), (rows - 1, 0, prompt[-1]), (rows - 1, 2, 0)]
    grid = CellGrid((rows, 3), [r for r, _, _ in cells], [c for _, c, _ in cells], [v for _, _, v in cells])
    params = SamplingParams(max_tokens=1, temperature=0.5, logprobs_of="sampled")  # prompt side: always the model's
    (result,) = Sampler(t).run([SampleJob(prompt, params, 1, adapter(2), target_prompt_logprobs=grid)])
    every = logits_along(t, prompt, adapter(2))
    got = result.target_prompt_logprobs
    assert got is not None and (got.rows, got.cols, got.shape) == (grid.rows, grid.cols, grid.shape)
    expected = [float(every[r, v]) for r, _, v in cells]  # row i is predicted at position i, scores position i + 1
    assert list(got.values) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(
    ("temperature", "mode"), [(1.0, "tempered"), (0.6, "model"), (0.6, "sampled"), (0.0, "sampled")]
)
def test_prompt_alt_tokens_are_draws_with_their_reported_logprobs(
    temperature: float, mode: LogprobDistribution
) -> None:
    t = engine()
    prompt = PROMPTS[1]
    k = 64
    params = SamplingParams(max_tokens=1, temperature=temperature, seed=3, logprobs_of=mode)
    (result,) = Sampler(t).run([SampleJob(prompt, params, 1, None, prompt_alt_tokens_k=k)])
    alt = result.prompt_alt_tokens
    assert alt is not None and len(alt.tokens) == len(alt.logprobs) == len(prompt) - 1
    every = logits_along(t, prompt)
    for row in range(len(prompt) - 1):
        naive = naive_distribution(every[row], temperature, -1, 1.0, mode)
        assert len(alt.tokens[row]) == k
        assert alt.logprobs[row] == pytest.approx([float(naive[i]) for i in alt.tokens[row]], abs=1e-4)
    if temperature == 0.0:
        assert all(len(set(r)) == 1 and r[0] == int(every[i].argmax()) for i, r in enumerate(alt.tokens))
    else:  # draws follow the tempered distribution: the most likely token is drawn about as often as it should be
        probs = torch.softmax(every[:, :] / temperature, -1)
        top = probs.argmax(-1)
        share = sum(r.count(int(top[i])) for i, r in enumerate(alt.tokens)) / (k * (len(prompt) - 1))
        assert share == pytest.approx(float(probs.max(-1).values.mean()), abs=0.08)
    again = Sampler(t).run([SampleJob(prompt, params, 1, None, prompt_alt_tokens_k=k)])[0].prompt_alt_tokens
    assert again is not None and again.tokens == alt.tokens  # the request's seed fixes the draws


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (SampleJob([1, 2, 3], SamplingParams(), 1, None, topk_sample_logprobs=-1), "topk_sample_logprobs"),
        (SampleJob([1, 2, 3], SamplingParams(), 1, None, prompt_logprobs_last_n=1), "set prompt_logprobs"),
        (SampleJob([1, 2, 3], SamplingParams(), 1, None, prompt_logprobs=True, prompt_logprobs_last_n=3), "between 1"),
        (SampleJob([1, 2, 3], SamplingParams(), 1, None, prompt_alt_tokens_k=2000), "prompt_alt_tokens_k"),
        (
            SampleJob([1, 2, 3], SamplingParams(), 1, None, target_prompt_logprobs=CellGrid((3, 1), [0], [0], [4])),
            "2 rows",
        ),
        (
            SampleJob([1, 2, 3], SamplingParams(), 1, None, target_prompt_logprobs=CellGrid((2, 1), [0], [0], [-1])),
            "no token",
        ),
        (
            SampleJob([1, 2, 3], SamplingParams(), 1, None, target_prompt_logprobs=CellGrid((2, 1), [0], [0], [96])),
            "vocabulary",
        ),
        (SampleJob([1, 2, 3], SamplingParams(logprobs_of="raw"), 1, None), "one of"),  # type: ignore[arg-type]
    ],
)
def test_bad_logprob_options_are_refused_with_a_clear_message(request_: SampleJob, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        Sampler(engine()).submit(request_)
