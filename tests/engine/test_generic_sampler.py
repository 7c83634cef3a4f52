"""The generic sampler's cached decode (the model's own cache) against its slow twin, recomputing every prefix."""

from __future__ import annotations

import pytest
import torch

from tests.engine.test_generic_model import FP32, families, trained
from tests.engine.tiny_models import tiny_generic_model
from tinkerd.domain.ops import LoraConfig, SampleResult, SamplingParams
from tinkerd.engine.generic_model import GenericTransformer
from tinkerd.engine.generic_sampler import GenericSampler
from tinkerd.engine.lora import LoraWeights
from tinkerd.engine.sample_job import SampleJob
from tinkerd.engine.served_model import ServedModel

LORA = LoraConfig(rank=4, alpha=8.0, seed=1)
LONG = [3, 4, 5, 6, 7, 8, 9, 10, 11]  # longer than gpt_oss's window of 4 before decoding even starts
SHORT = [10, 11, 12]


def adapted(family: str) -> tuple[GenericTransformer, LoraWeights, LoraWeights]:
    model = ServedModel("m", tiny_generic_model(family), FP32)
    for name, seed in (("a", 5), ("b", 6)):
        model.create_adapter(name, LORA)
        trained(model, name, seed)
    assert isinstance(model.train, GenericTransformer)
    return model.train, model.snapshot("a"), model.snapshot("b")


def jobs(a: LoraWeights, b: LoraWeights) -> list[SampleJob]:
    """Greedy and seeded, three adapters (the base too), two prompt lengths, shared and separate prompt groups,
    stop tokens that end samples of one request at different steps, prompt logprobs and top-k lists."""
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    seeded = SamplingParams(max_tokens=7, temperature=1.0, seed=7)
    stops = SamplingParams(max_tokens=9, temperature=1.0, seed=3, stop_token_ids=tuple(range(3, 60, 2)))
    return [
        SampleJob(LONG, greedy, 1, None, prompt_logprobs=True, topk_prompt_logprobs=3),
        SampleJob(LONG, greedy, 1, a),
        SampleJob(SHORT, seeded, 3, b, topk_sample_logprobs=2),
        SampleJob(LONG, seeded, 2, a),  # same adapter and length as the second: one prompt group, one cohort
        SampleJob(SHORT, stops, 4, a),
        SampleJob(SHORT, SamplingParams(max_tokens=1, temperature=0.0), 2, b),  # finishes at its prefill
    ]


def assert_same(got: list[SampleResult], want: list[SampleResult]) -> None:
    for g, w in zip(got, want, strict=True):
        for gs, ws in zip(g.sequences, w.sequences, strict=True):
            assert gs.tokens == ws.tokens
            assert gs.stop_reason == ws.stop_reason
            torch.testing.assert_close(torch.tensor(gs.logprobs), torch.tensor(ws.logprobs), atol=2e-5, rtol=1e-5)
            assert (gs.topk_logprobs is None) == (ws.topk_logprobs is None)
            for gk, wk in zip(gs.topk_logprobs or [], ws.topk_logprobs or [], strict=True):
                assert [t for t, _ in gk] == [t for t, _ in wk]
        assert (g.prompt_logprobs is None) == (w.prompt_logprobs is None)
        if g.prompt_logprobs is not None and w.prompt_logprobs is not None:
            torch.testing.assert_close(torch.tensor(g.prompt_logprobs[1:]), torch.tensor(w.prompt_logprobs[1:]))


@pytest.mark.parametrize("family", families("phi", "olmo"))
@pytest.mark.parametrize("max_batch", [64, 3])  # 3: samples wait for slots and are stamped from the prompt later
def test_cached_decode_equals_recomputation(family: str, max_batch: int) -> None:
    model, a, b = adapted(family)
    cached = GenericSampler(model, max_batch=max_batch)
    recompute = GenericSampler(model, max_batch=max_batch, decode_with_cache=False)
    assert cached.cached and not recompute.cached
    want = recompute.run(jobs(a, b))
    got = cached.run(jobs(a, b))
    assert_same(got, want)
    stopped = got[4].sequences
    assert {s.stop_reason for s in stopped} == {"stop", "length"} or len({len(s.tokens) for s in stopped}) > 1
    assert len({tuple(s.tokens) for s in got[2].sequences}) > 1  # seeded samples differ from one another


def test_requests_of_one_adapter_and_length_decode_in_one_forward_per_step() -> None:
    model, a, _ = adapted("phi")
    calls = 0

    def count(*_: object) -> None:
        nonlocal calls
        calls += 1

    model.hf.register_forward_hook(count)
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=1)
    GenericSampler(model).run([SampleJob(LONG, params, 2, a), SampleJob([*SHORT, 5, 6, 7, 8, 9, 10], params, 3, a)])
    assert calls == 1 + 5  # one prefill, then one forward per further token for all five rows


def test_cancelled_and_finished_rows_leave_their_cohort() -> None:
    model, a, _ = adapted("phi")
    cached = GenericSampler(model)
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=2)
    gone = cached.submit(SampleJob(LONG, params, 2, a))
    kept = cached.submit(SampleJob(LONG, params, 2, a))
    cached.step()
    assert cached.cancel(gone)
    results: dict[int, SampleResult] = {}
    while cached.has_work():
        results.update(cached.step())
    assert list(results) == [kept]
    (want,) = GenericSampler(model, decode_with_cache=False).run([SampleJob(LONG, params, 2, a)])
    assert_same([results[kept]], [want])


@pytest.mark.heavy
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_cached_decode_after_images_equals_recomputation(family: str) -> None:
    """Multimodal rotary positions run behind the token count after an image: decoding continues from the offsets
    each prompt's own prefill found, also while prompts without images (offset 0) decode beside it."""
    from tests.engine.test_vision import served, with_image
    from tests.engine.test_vision import trained as trained_vl

    model = served(family)
    model.create_adapter("a", LORA)
    trained_vl(model, "a", seed=5)
    assert isinstance(model.train, GenericTransformer)
    a = model.snapshot("a")
    first, first_images = with_image(family, [5, 6], [7])
    second, second_images = with_image(family, [11], [12, 13], width=90, height=160)
    third, third_images = with_image(family, [9], [8], width=40, height=40, seed=4)
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    seeded = SamplingParams(max_tokens=5, temperature=1.0, seed=3)
    jobs = [
        SampleJob(first, greedy, 1, None, prompt_logprobs=True, images=first_images),
        SampleJob([20, 21, 22, 23], greedy, 2, a),  # text only, prefilled after an image prompt
        SampleJob(second, seeded, 3, a, images=second_images),
        SampleJob(third, greedy, 1, a, images=third_images),
    ]
    cached = GenericSampler(model.train)
    assert cached.cached
    want = GenericSampler(model.train, decode_with_cache=False).run(jobs)
    got = cached.run(jobs)
    assert_same(got, want)
