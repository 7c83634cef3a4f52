"""The continuous-batching sampler against its slow twins: full recompute, one request at a time, one adapter alone."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import pytest
import torch

from tests.engine.tiny_models import FAMILIES, tiny_model
from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import LoraConfig, SampleResult, SamplingParams
from tinkerd.engine import sampling_ops
from tinkerd.engine.decode_layout import PackedLinear, can_pack, use_decode_layout
from tinkerd.engine.lora import LoraRouting, LoraWeights, init_lora_weights
from tinkerd.engine.sample_job import SampleJob
from tinkerd.engine.sampler import Sampler
from tinkerd.engine.transformer import Transformer

VOCAB = 96


def letters(ids: list[int]) -> str:
    return "".join(chr(97 + i % 26) for i in ids)


def sharp_model(family: str) -> torch.nn.Module:
    """A tiny model with weights large enough that its distributions are peaked and greedy decoding does not loop."""
    model = tiny_model(family)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


@functools.cache
def engine(family: str = "llama") -> Transformer:
    return Transformer(sharp_model(family), torch.float32)


@functools.cache
def adapter(seed: int) -> LoraWeights:
    weights = init_lora_weights(engine().hf, LoraConfig(rank=4, seed=seed), engine().device)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in weights.b.values():
            b.copy_(torch.randn(b.shape, generator=generator) * 0.3)
    return weights


def full_logprobs(
    t: Transformer, seq: Sequence[int], weights: LoraWeights | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """log_softmax(logits / temperature) at every position of one whole sequence by the packed (training) forward."""
    with torch.no_grad():
        routing = LoraRouting.single(len(seq), weights)
        return torch.log_softmax(t.logits(t.packed_hidden([list(seq)], routing), routing) / temperature, dim=-1)


def recomputed_logprobs(
    t: Transformer, prompt: list[int], tokens: list[int], weights: LoraWeights | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """What a sampler should report for ``tokens`` generated after ``prompt``, from one full forward."""
    every = full_logprobs(t, prompt + tokens, weights, temperature)[len(prompt) - 1 : -1]
    return every.gather(1, torch.tensor(tokens)[:, None])[:, 0]


def greedy_by_recompute(t: Transformer, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(full_logprobs(t, seq)[-1].argmax()))
    return seq[len(prompt) :]


def job(
    prompt: list[int],
    weights: LoraWeights | None = None,
    num_samples: int = 1,
    *,
    base: Mapping[str, object] | None = None,
    **params: object,
) -> SampleJob:
    """A request; ``base`` holds shared sampling parameters that the keyword ones override."""
    merged = {**(base or {}), **params}
    return SampleJob(prompt, SamplingParams(**merged), num_samples, weights)  # type: ignore[arg-type]


def tokens_of(result: SampleResult) -> list[list[int]]:
    return [s.tokens for s in result.sequences]


def assert_same_results(got: Sequence[SampleResult], expected: Sequence[SampleResult]) -> None:
    def reasons(results: Sequence[SampleResult]) -> list[list[str]]:
        return [[s.stop_reason for s in r.sequences] for r in results]

    assert [tokens_of(r) for r in got] == [tokens_of(r) for r in expected] and reasons(got) == reasons(expected)
    for g, e in zip(got, expected, strict=True):
        for gs, es in zip(g.sequences, e.sequences, strict=True):
            torch.testing.assert_close(torch.tensor(gs.logprobs), torch.tensor(es.logprobs), atol=1e-5, rtol=1e-5)


PROMPTS = [[1, 5, 9, 33, 4], [3, 4, 70, 8, 9, 10, 11, 12, 13, 14, 15], [7]]
RANDOM_PARAMS: list[dict[str, object]] = [
    {"temperature": 1.0, "seed": 1},
    {"temperature": 0.7, "top_k": 5, "seed": 2},
    {"temperature": 1.3, "top_p": 0.8, "seed": 3},
    {"temperature": 0.0},
    {"temperature": 0.9, "top_k": 10, "top_p": 0.5, "seed": 4},
]


# -- parity with the slow twins -----------------------------------------------------------------------------------


@pytest.mark.heavy
@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decode_equals_full_recompute(family: str) -> None:
    t = engine(family)
    n = 20  # prompts of 5 and 11 tokens + 20: past mistral's sliding window of 8
    results = Sampler(t).run([job(p, max_tokens=n, temperature=0.0) for p in PROMPTS[:2]])
    for prompt, result in zip(PROMPTS[:2], results, strict=True):
        (seq,) = result.sequences
        assert seq.tokens == greedy_by_recompute(t, prompt, n)
        expected = recomputed_logprobs(t, prompt, seq.tokens)
        torch.testing.assert_close(torch.tensor(seq.logprobs), expected, atol=2e-5, rtol=1e-5)
        assert seq.stop_reason == "length"


@pytest.mark.heavy
def test_the_cache_grows_past_its_first_capacity_without_losing_anything() -> None:
    t = engine("mistral")
    first = job(PROMPTS[2], max_tokens=150, temperature=0.0)  # one slot of 64 positions at first, then 128, 256
    sampler = Sampler(t)
    tickets = [sampler.submit(first)]
    finished: dict[int, SampleResult] = {}
    for _ in range(70):
        finished.update(sampler.step())
    tickets += [sampler.submit(job(p, num_samples=3, max_tokens=9, temperature=0.0)) for p in PROMPTS]  # more slots
    while sampler.has_work():
        finished.update(sampler.step())
    assert sampler.cache.slot_capacity == 0  # memory handed back once nothing is live
    assert finished[tickets[0]].sequences[0].tokens == greedy_by_recompute(t, PROMPTS[2], 150)
    for ticket, prompt in zip(tickets[1:], PROMPTS, strict=True):
        assert tokens_of(finished[ticket]) == [greedy_by_recompute(t, prompt, 9)] * 3


def test_a_bf16_sampler_agrees_with_its_own_full_forward() -> None:
    t = Transformer(sharp_model("qwen2"), torch.bfloat16)
    (result,) = Sampler(t).run([job(PROMPTS[0], num_samples=2, max_tokens=12, temperature=1.0, seed=2)])
    for seq in result.sequences:
        expected = recomputed_logprobs(t, PROMPTS[0], seq.tokens)
        torch.testing.assert_close(torch.tensor(seq.logprobs), expected, atol=0.05, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampled_logprobs_are_tempered_logprobs_of_a_full_forward(temperature: float) -> None:
    t = engine()
    prompt = PROMPTS[0]
    (result,) = Sampler(t).run([job(prompt, num_samples=3, max_tokens=16, temperature=temperature, seed=5)])
    for seq in result.sequences:
        expected = recomputed_logprobs(t, prompt, seq.tokens, temperature=temperature)
        torch.testing.assert_close(torch.tensor(seq.logprobs), expected, atol=2e-5, rtol=1e-5)
    assert len({tuple(s.tokens) for s in result.sequences}) == 3  # the samples of one request differ


@pytest.mark.heavy
def test_a_batch_equals_its_requests_run_one_at_a_time() -> None:
    t = engine()
    jobs = [job(p, num_samples=2, max_tokens=12, base=kw) for p in PROMPTS for kw in RANDOM_PARAMS]
    together = Sampler(t).run(jobs)
    alone = [Sampler(t).run([j])[0] for j in jobs]
    assert_same_results(together, alone)


def test_mixed_adapters_equal_separate_runs() -> None:
    t = engine()
    adapters = [None, adapter(1), adapter(2), None, adapter(1)]
    jobs = [job(PROMPTS[i % 3], w, num_samples=2, max_tokens=10, base=RANDOM_PARAMS[i]) for i, w in enumerate(adapters)]
    together = Sampler(t).run(jobs)
    alone = [Sampler(t).run([j])[0] for j in jobs]
    assert_same_results(together, alone)
    # the adapters matter: the same greedy request answers differently under each
    greedy = Sampler(t).run([job(PROMPTS[0], w, max_tokens=8, temperature=0.0) for w in (None, adapter(1), adapter(2))])
    assert len({tuple(r.sequences[0].tokens) for r in greedy}) == 3
    # and an adapter's logprobs are those of a full forward through the same adapter
    seq = greedy[1].sequences[0]
    expected = recomputed_logprobs(t, PROMPTS[0], seq.tokens, adapter(1))
    torch.testing.assert_close(torch.tensor(seq.logprobs), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.heavy
def test_same_seed_gives_same_tokens_whatever_shares_the_batch() -> None:
    t = engine()
    target = job(PROMPTS[1], num_samples=3, max_tokens=16, temperature=1.0, top_p=0.95, seed=123)
    alone = Sampler(t).run([target])[0]
    companions = [job(p, adapter(2), num_samples=3, max_tokens=20, temperature=1.2) for p in PROMPTS]
    crowded = Sampler(t).run([*companions[:2], target, companions[2]])[2]
    assert_same_results([crowded], [alone])
    again = Sampler(t).run([target])[0]
    assert tokens_of(again) == tokens_of(alone)
    # without a seed, randomness is fresh
    unseeded = job(PROMPTS[1], max_tokens=16, temperature=1.0)
    assert Sampler(t).run([unseeded])[0].sequences[0].tokens != Sampler(t).run([unseeded])[0].sequences[0].tokens


@pytest.mark.heavy
def test_joining_a_running_batch_changes_nothing_for_those_running() -> None:
    t = engine()
    first = job(PROMPTS[0], num_samples=2, max_tokens=15, temperature=1.0, seed=9)
    late = [
        job(PROMPTS[1], adapter(1), num_samples=3, max_tokens=6, temperature=0.8, seed=3),
        job(PROMPTS[2], max_tokens=16, temperature=0.0),
    ]
    sampler = Sampler(t)
    ticket = sampler.submit(first)
    finished: dict[int, SampleResult] = {}
    for _ in range(4):
        finished.update(sampler.step())
    assert not finished and sampler.has_work()  # the first request is mid-decode when the others arrive
    late_tickets = [sampler.submit(j) for j in late]
    while sampler.has_work():
        finished.update(sampler.step())
    assert_same_results([finished[ticket]], Sampler(t).run([first]))
    assert_same_results([finished[x] for x in late_tickets], Sampler(t).run(late))


@pytest.mark.heavy
def test_more_samples_than_slots_share_one_prefill_and_match_a_wide_batch() -> None:
    t = engine()
    jobs = [job(PROMPTS[0], num_samples=5, max_tokens=7, seed=1), job(PROMPTS[1], num_samples=3, max_tokens=4, seed=2)]
    narrow = Sampler(t, max_batch=2).run(jobs)
    assert_same_results(narrow, Sampler(t).run(jobs))


@pytest.mark.heavy
@pytest.mark.parametrize("pack", [True, False], ids=["onednn-packed", "column-major"])
def test_the_decode_layout_changes_storage_not_results(pack: bool) -> None:
    t = Transformer(sharp_model("qwen2"), torch.float32)  # its own copy (changed in place); q,k,v have biases
    if pack and not can_pack(t):
        pytest.skip("this torch has no oneDNN")
    jobs = [job(p, adapter(1), num_samples=2, max_tokens=8, base=RANDOM_PARAMS[i]) for i, p in enumerate(PROMPTS)]
    before = Sampler(t).run(jobs)
    use_decode_layout(t, pack=pack)
    assert t.embed.weight is t.lm_head.weight  # still tied: one copy of the embedding
    if pack:
        assert isinstance(t.lm_head, PackedLinear) and isinstance(t.layers[1].mlp.down_proj, PackedLinear)
        with pytest.raises(RuntimeError, match="sampling only"):  # no silent training through packed weights
            t.lm_head(torch.ones(1, 64, requires_grad=True))
    else:
        assert t.lm_head.weight.stride() == (1, VOCAB)
    assert_same_results(Sampler(t).run(jobs), before)


# -- stopping ------------------------------------------------------------------------------------------------------


def test_stop_token_ids_end_the_sequence_and_are_included() -> None:
    t = engine()
    greedy = greedy_by_recompute(t, PROMPTS[0], 12)
    stop_at = next(i for i in range(3, 12) if greedy[i] not in greedy[:i])
    (result,) = Sampler(t).run([job(PROMPTS[0], max_tokens=12, temperature=0.0, stop_token_ids=(greedy[stop_at], 95))])
    assert result.sequences[0].tokens == greedy[: stop_at + 1]
    assert result.sequences[0].stop_reason == "stop"


def test_stop_strings_end_the_sequence_with_the_completing_token() -> None:
    t = engine()
    greedy = greedy_by_recompute(t, PROMPTS[1], 16)
    text = letters(greedy)
    stop = text[6:9]  # spans three tokens; it may already occur earlier, so find where the text first contains it
    end = next(i for i in range(1, 17) if stop in letters(greedy[:i]))
    sampler = Sampler(t, decode_text=letters)
    (result,) = sampler.run([job(PROMPTS[1], max_tokens=16, temperature=0.0, stop_strings=("zzzz", stop))])
    assert result.sequences[0].tokens == greedy[:end]
    assert result.sequences[0].stop_reason == "stop"
    assert letters(result.sequences[0].tokens).endswith(stop)


def test_max_tokens_one_finishes_right_after_prefill() -> None:
    t = engine()
    sampler = Sampler(t)
    ticket = sampler.submit(job(PROMPTS[0], num_samples=2, max_tokens=1, temperature=0.0))
    ((got, result),) = sampler.step()
    assert got == ticket and not sampler.has_work()
    assert [s.tokens for s in result.sequences] == [greedy_by_recompute(t, PROMPTS[0], 1)] * 2
    assert all(s.stop_reason == "length" for s in result.sequences)


# -- sampling parameters -------------------------------------------------------------------------------------------


def test_top_k_one_equals_greedy() -> None:
    t = engine()
    greedy, top1 = Sampler(t).run(
        [job(PROMPTS[1], max_tokens=12, temperature=0.0), job(PROMPTS[1], max_tokens=12, top_k=1, seed=4)]
    )
    assert_same_results([top1], [greedy])


def test_filters_keep_exactly_the_top_k_and_the_nucleus() -> None:
    generator = torch.Generator().manual_seed(0)
    v = 3000  # wider than TOP_P_CANDIDATES, with flat rows, so the full-sort fallback runs too
    logits = torch.randn(6, v, generator=generator) * torch.tensor([3.0, 3.0, 0.1, 0.1, 3.0, 2.0])[:, None]
    top_k = [7, -1, -1, 2000, 50, 1]
    top_p = [1.0, 0.9, 0.95, 0.9, 0.3, 0.5]
    got = sampling_ops.keep_thresholds(logits, top_k, top_p, torch.logsumexp(logits, dim=-1))
    for i in range(6):
        vals = logits[i].sort(descending=True).values
        k = top_k[i] if 0 < top_k[i] < v else v
        kept = vals[:k]
        probs = torch.softmax(kept.double(), dim=0)
        n = int(((probs.cumsum(0) - probs) < top_p[i]).sum())
        assert got[i] == kept[n - 1], i


def test_inverse_cdf_draws_follow_the_filtered_distribution() -> None:
    logits = torch.tensor([[2.0, 0.5, 1.0, -1.0, 0.0, 1.5]])
    n = 20000
    uniforms = [(i + 0.5) / n for i in range(n)]  # a stratified grid: frequencies must match probabilities closely
    tokens, logprobs = sampling_ops.sample_tokens(logits.expand(n, -1), [0.5] * n, [4] * n, [1.0] * n, uniforms)
    kept = torch.tensor([2.0, 0.5, 1.0, 1.5]) / 0.5
    expected = torch.zeros(6).index_put_((torch.tensor([0, 1, 2, 5]),), torch.softmax(kept, dim=0))
    torch.testing.assert_close(torch.bincount(tokens, minlength=6) / n, expected, atol=1e-3, rtol=0)
    tempered = torch.log_softmax(logits[0] / 0.5, dim=0)  # logprobs are untruncated, tempered
    torch.testing.assert_close(logprobs, tempered[tokens])


# -- prompt logprobs and frozen snapshots --------------------------------------------------------------------------


def test_prompt_logprobs_and_topk_equal_a_full_forward() -> None:
    t = engine()
    prompt = PROMPTS[1]
    request = SampleJob(
        prompt, SamplingParams(max_tokens=2), 1, adapter(1), prompt_logprobs=True, topk_prompt_logprobs=4
    )
    only_topk = SampleJob(prompt, SamplingParams(max_tokens=1), 1, None, topk_prompt_logprobs=2)
    result, topk_only = Sampler(t).run([request, only_topk])
    expected = full_logprobs(t, prompt, adapter(1))
    assert result.prompt_logprobs is not None and result.prompt_logprobs[0] is None
    want = expected[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(result.prompt_logprobs[1:]), want, atol=2e-5, rtol=1e-5)
    assert result.topk_prompt_logprobs is not None and result.topk_prompt_logprobs[0] is None
    assert len(result.topk_prompt_logprobs) == len(prompt)
    for pos, pairs in enumerate(result.topk_prompt_logprobs[1:]):
        assert pairs is not None
        vals, ids = expected[pos].topk(4)
        assert [tok for tok, _ in pairs] == ids.tolist()
        torch.testing.assert_close(torch.tensor([lp for _, lp in pairs]), vals, atol=2e-5, rtol=1e-5)
    assert topk_only.prompt_logprobs is None
    assert topk_only.topk_prompt_logprobs is not None and len(topk_only.topk_prompt_logprobs[1] or []) == 2


@pytest.mark.heavy
def test_a_frozen_snapshot_samples_the_same_after_the_live_adapter_changes() -> None:
    t = engine()
    live = init_lora_weights(t.hf, LoraConfig(rank=4, seed=3), t.device)
    with torch.no_grad():
        for b in live.b.values():
            b.normal_(std=0.3)
    snapshot = live.snapshot()
    request = job(PROMPTS[0], snapshot, num_samples=2, max_tokens=10, seed=8)
    before = Sampler(t).run([request, job(PROMPTS[0], live, max_tokens=10, temperature=0.0)])
    with torch.no_grad():
        for b in live.b.values():
            b.add_(0.5)
    after = Sampler(t).run([request, job(PROMPTS[0], live, max_tokens=10, temperature=0.0)])
    assert_same_results(after[:1], before[:1])
    assert after[1].sequences[0].logprobs != before[1].sequences[0].logprobs


# -- validation ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (job([]), "prompt is empty"),
        (job([1, VOCAB]), f"prompt token {VOCAB} at position 1"),
        (job([1, -1]), "prompt token -1"),
        (job([1], num_samples=0), "num_samples"),
        (job([1], num_samples=10_000), "num_samples"),
        (job([1], max_tokens=0), "max_tokens must be at least 1"),
        (job([1] * 200, max_tokens=57), "exceeds the model's context of 256"),
        (job([1], temperature=-0.5), "temperature"),
        (job([1], temperature=math.nan), "temperature"),
        (job([1], top_p=0.0), "top_p"),
        (job([1], top_p=1.5), "top_p"),
        (job([1], top_k=0), "top_k"),
        (job([1], top_k=-3), "top_k"),
        (job([1], stop_token_ids=(VOCAB + 3,)), "stop token id"),
        (job([1], stop_strings=("",)), "stop strings must not be empty"),
        (SampleJob([1], SamplingParams(), 1, None, topk_prompt_logprobs=-1), "topk_prompt_logprobs"),
        (SampleJob([1], SamplingParams(), 1, None, topk_prompt_logprobs=VOCAB + 1), "topk_prompt_logprobs"),
    ],
)
def test_invalid_requests_are_refused_with_a_clear_message(request_: SampleJob, message: str) -> None:
    sampler = Sampler(engine(), decode_text=letters)
    with pytest.raises(InvalidRequestError, match=message):
        sampler.submit(request_)
    assert not sampler.has_work()


def test_stop_strings_need_a_decoder_and_a_full_context_is_accepted() -> None:
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        Sampler(engine()).submit(job([1], stop_strings=("ab",)))
    (result,) = Sampler(engine()).run([job([1] * 250, max_tokens=6, temperature=0.0)])  # 250 + 6 = the 256 context
    assert len(result.sequences[0].tokens) == 6


def test_a_vanishing_temperature_picks_the_argmax_with_finite_logprobs() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 20
    tokens, logprobs = sampling_ops.sample_tokens(logits, [1e-320, 1e-7, 1e-300], [-1] * 3, [1.0] * 3, [0.3] * 3)
    assert tokens.tolist() == logits.argmax(dim=-1).tolist()
    assert torch.isfinite(logprobs).all()


# -- cancelling and streaming ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps_before", [0, 1, 4])
def test_a_cancelled_request_frees_its_slots_and_leaves_the_others_unchanged(steps_before: int) -> None:
    t = engine()
    kept = job(PROMPTS[0], num_samples=2, max_tokens=12, temperature=1.0, seed=5)
    dropped = job(PROMPTS[1], adapter(1), num_samples=3, max_tokens=40, temperature=1.0, seed=6)
    sampler = Sampler(t, max_batch=4)  # the dropped request waits for slots, then stamps, then decodes
    keep_ticket, drop_ticket = sampler.submit(kept), sampler.submit(dropped)
    finished: dict[int, SampleResult] = {}
    for _ in range(steps_before):
        finished.update(sampler.step())
    assert sampler.cancel(drop_ticket) and not sampler.cancel(drop_ticket)
    assert sampler.progress(drop_ticket) is None
    while sampler.has_work():
        finished.update(sampler.step())
    assert set(finished) == {keep_ticket}
    assert sampler.cache.num_free == sampler.max_batch
    assert_same_results([finished[keep_ticket]], Sampler(t).run([kept]))


def test_progress_reports_prefixes_of_the_final_sequences() -> None:
    sampler = Sampler(engine(), max_batch=2)
    request = job(PROMPTS[0], num_samples=3, max_tokens=6, temperature=1.0, seed=8)
    ticket = sampler.submit(request)
    seen: list[list[list[int]]] = []
    finished: dict[int, SampleResult] = {}
    while sampler.has_work():
        finished.update(sampler.step())
        progress = sampler.progress(ticket)
        if progress is not None:
            seen.append([list(tokens) for tokens, _ in progress])
    final = tokens_of(finished[ticket])
    assert seen and sampler.progress(ticket) is None
    assert any(len(tokens) == 0 for tokens in seen[0])  # the third sample had no slot at first
    for snapshot in seen:
        for tokens, whole in zip(snapshot, final, strict=True):
            assert whole[: len(tokens)] == tokens
