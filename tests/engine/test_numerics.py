"""The default (bf16) configuration learns like fp32, samples report forward()'s logprobs, and batches don't matter.

The learning test gives a tiny model a real model's magnitudes (weights of std 0.3 instead of 0.02: activations and
logits of order 1-10, as in SmolLM2): a first Adam step at lr 1e-4 then moves each activation by far less than half a
bf16 unit, which is where the old bf16 path (LoRA delta added onto the bf16 base output, bf16 residual stream) lost
the update. Measured on the old path: 0.17x and 0.38x of fp32's progress after steps 1 and 2; now 1.02x and 0.97x.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.engine.tiny_models import FAMILIES, tiny_model
from tinkerd.domain.ops import AdamParams, ArrayData, Datum, LoraConfig, SampleResult, SamplingParams
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.sample_job import SampleJob
from tinkerd.engine.sampler import Sampler
from tinkerd.engine.served_model import ForwardJob, ServedModel
from tinkerd.engine.transformer import Transformer
from tinkerd.worker.hosts import ModelHost

VOCAB = 96


def seqs_of(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n + 1,), generator=g).tolist() for n in lengths]


def datums(seqs: list[list[int]]) -> list[Datum]:
    return [
        Datum(
            tokens=s[:-1],
            loss_fn_inputs={
                "target_tokens": ArrayData.of_ints(s[1:]),
                "weights": ArrayData.of_floats([1.0] * (len(s) - 1)),
            },
        )
        for s in seqs
    ]


def mean_logprob(model: ServedModel, run: str, data: list[Datum]) -> float:
    out = model.forward([ForwardJob(run, data, "cross_entropy")])[0].loss_fn_outputs
    values = [v for o in out for v in o["logprobs"].values]
    return sum(values) / len(values)


def first_steps(model: ServedModel, data: list[Datum], steps: int, lr: float) -> list[float]:
    model.create_adapter("run", LoraConfig(rank=8, seed=0))
    start = mean_logprob(model, "run", data)
    moved: list[float] = []
    for _ in range(steps):
        model.forward([ForwardJob("run", data, "cross_entropy", backward=True)])
        model.optim_step("run", AdamParams(learning_rate=lr))
        moved.append(mean_logprob(model, "run", data) - start)
    return moved


def test_the_bf16_engine_moves_the_model_as_far_as_fp32_per_step() -> None:
    hf = tiny_model("llama")
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    data = datums(seqs_of([32] * 4, seed=1))
    ref = first_steps(ServedModel("m", copy.deepcopy(hf), EngineConfig(train_dtype="float32")), data, 2, 1e-4)
    got = first_steps(ServedModel("m", hf, EngineConfig(train_dtype="bfloat16")), data, 2, 1e-4)
    assert all(r > 0 for r in ref), ref
    for step, (g, r) in enumerate(zip(got, ref, strict=True), start=1):
        assert abs(g - r) <= 0.1 * abs(r), f"step {step}: bf16 moved {g:.3e}, fp32 {r:.3e}"


def host_of(family: str, **config: object) -> ModelHost:
    return ModelHost.from_model("m", tiny_model(family), EngineConfig(**config))  # type: ignore[arg-type]


def trained(host: ModelHost, run: str, seed: int) -> None:
    host.served.create_adapter(run, LoraConfig(rank=8, seed=seed))
    host.served.forward([ForwardJob(run, datums(seqs_of([24] * 3, seed=seed)), "cross_entropy", backward=True)])
    host.served.optim_step(run, AdamParams(learning_rate=1e-2))


def forward_logprobs(host: ModelHost, run: str, prompt: list[int], result: SampleResult) -> list[list[float]]:
    seqs = [prompt + s.tokens for s in result.sequences]
    out = host.served.forward([ForwardJob(run, datums(seqs), "cross_entropy")])[0].loss_fn_outputs
    return [[float(v) for v in o["logprobs"].values[len(prompt) - 1 :]] for o in out]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_sampled_logprobs_are_bit_identical_to_forward(family: str, dtype: str) -> None:
    host = host_of(family, train_dtype=dtype)
    trained(host, "run", seed=0)
    weights = host.served.snapshot("run")
    prompts = [seqs_of([5], seed=2)[0], seqs_of([17], seed=3)[0]]
    jobs = [
        SampleJob(prompt=p, params=SamplingParams(max_tokens=12, seed=4), num_samples=2, weights=weights)
        for p in prompts
    ]
    results = host.new_sampler().run(jobs)
    for prompt, result in zip(prompts, results, strict=True):
        expected = forward_logprobs(host, "run", prompt, result)
        assert [s.logprobs for s in result.sequences] == expected


def test_prompt_logprobs_and_tempered_logprobs_come_from_the_training_forward() -> None:
    host = host_of("llama")
    trained(host, "run", seed=0)
    prompt = seqs_of([9], seed=5)[0]
    params = SamplingParams(max_tokens=6, seed=1, temperature=0.7)
    job = SampleJob(prompt=prompt, params=params, num_samples=1, weights=host.served.snapshot("run"))
    (result,) = host.new_sampler().run([job])
    seq = prompt + result.sequences[0].tokens
    forward = host.served.forward([ForwardJob("run", datums([seq]), "cross_entropy")])[0].loss_fn_outputs[0]
    assert result.prompt_logprobs is None
    job_p = SampleJob(prompt=prompt, params=params, num_samples=1, weights=job.weights, prompt_logprobs=True)
    (with_prompt,) = host.new_sampler().run([job_p])
    assert with_prompt.prompt_logprobs == [None, *forward["logprobs"].values[: len(prompt) - 1]]
    # tempered: log_softmax(logits / T) of the trainer's logits, which a naive computation reproduces closely
    t = host.served.train
    assert isinstance(t, Transformer)
    from tinkerd.engine.lora import LoraRouting

    with torch.inference_mode():
        routing = LoraRouting.single(len(seq) - 1, job.weights)
        h = t.packed_hidden([seq[:-1]], routing)
        logits = t.scoring_logits(h, routing)[len(prompt) - 1 :]
        naive = torch.log_softmax(logits / 0.7, -1).gather(1, torch.tensor(seq[len(prompt) :])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(result.sequences[0].logprobs), naive, rtol=0, atol=1e-6)


def test_forward_logprobs_are_bit_identical_alone_and_in_a_mixed_batch() -> None:
    host = host_of("llama")
    trained(host, "a", seed=0)
    trained(host, "b", seed=1)
    mine = datums(seqs_of([7], seed=9))
    alone = host.served.forward([ForwardJob("a", mine, "cross_entropy")])[0].loss_fn_outputs[0]
    others_a = datums(seqs_of([3, 40, 7], seed=10))
    others_b = datums(seqs_of([64, 5], seed=11))
    mixed = host.served.forward(
        [
            ForwardJob("b", others_b, "cross_entropy"),
            ForwardJob("a", [*others_a[:2], mine[0], others_a[2]], "cross_entropy"),
            ForwardJob(None, others_b, "cross_entropy"),
        ]
    )[1].loss_fn_outputs[2]
    assert mixed["logprobs"].values == alone["logprobs"].values
    # forward_backward reports the same logprobs, alone and batched with other runs' training
    fb_alone = host.served.forward([ForwardJob("a", mine, "cross_entropy", backward=True)])[0]
    fb_mixed = host.served.forward(
        [
            ForwardJob("b", others_b, "cross_entropy", backward=True),
            ForwardJob("a", [others_a[1], mine[0]], "cross_entropy", backward=True),
        ]
    )[1]
    assert fb_alone.loss_fn_outputs[0]["logprobs"].values == alone["logprobs"].values
    assert fb_mixed.loss_fn_outputs[1]["logprobs"].values == alone["logprobs"].values


def test_sample_logprobs_are_bit_identical_alone_and_in_a_mixed_batch() -> None:
    host = host_of("llama")
    trained(host, "a", seed=0)
    trained(host, "b", seed=1)
    wa, wb = host.served.snapshot("a"), host.served.snapshot("b")
    mine = SampleJob(
        prompt=seqs_of([6], seed=12)[0], params=SamplingParams(max_tokens=10, seed=3), num_samples=1, weights=wa
    )
    (alone,) = host.new_sampler().run([mine])
    others = [
        SampleJob(
            prompt=seqs_of([30], seed=13)[0], params=SamplingParams(max_tokens=4, seed=5), num_samples=3, weights=wb
        ),
        SampleJob(
            prompt=seqs_of([2], seed=14)[0], params=SamplingParams(max_tokens=20, seed=6), num_samples=2, weights=wa
        ),
        SampleJob(
            prompt=seqs_of([11], seed=15)[0], params=SamplingParams(max_tokens=8, seed=7), num_samples=1, weights=None
        ),
    ]
    mixed = host.new_sampler().run([others[0], mine, *others[1:]])[1]
    assert mixed.sequences[0].tokens == alone.sequences[0].tokens
    assert mixed.sequences[0].logprobs == alone.sequences[0].logprobs


def test_without_rescoring_samples_report_the_decoders_own_logprobs() -> None:
    """``--sample-scores decoder``: no rescoring pass; the values are the fp32 decoder's, which a bf16 trainer's
    forward does not reproduce exactly (with rescoring, the default, it does, bit for bit)."""
    rescored, decoded = (host_of("llama", train_dtype="bfloat16", rescore_samples=r) for r in (True, False))
    for host in (rescored, decoded):
        trained(host, "run", seed=0)
    prompt = seqs_of([7], seed=6)[0]
    params = SamplingParams(max_tokens=10, seed=3)
    results = []
    for host in (rescored, decoded):
        job = SampleJob(prompt=prompt, params=params, num_samples=2, weights=host.served.snapshot("run"))
        results.append(host.new_sampler().run([job])[0])
        assert isinstance(host.sample_transformer, Transformer)
        decoder_only = Sampler(host.sample_transformer, host.decode_text).run([job])[0]
        assert [s.tokens for s in decoder_only.sequences] == [s.tokens for s in results[-1].sequences]
    with_rescoring, without = results
    assert [s.logprobs for s in with_rescoring.sequences] == forward_logprobs(rescored, "run", prompt, with_rescoring)
    assert [s.logprobs for s in without.sequences] == [s.logprobs for s in decoder_only.sequences]
    gaps = [
        abs(a - b)
        for s, f in zip(without.sequences, forward_logprobs(decoded, "run", prompt, without), strict=True)
        for a, b in zip(s.logprobs, f, strict=True)
    ]
    assert 0 < max(gaps) < 0.5, gaps
