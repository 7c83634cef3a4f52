"""Multi-tenant LoRA training on one frozen base: every fast path against its slow twin."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.engine.tiny_models import tiny_model
from tinkerd.domain.errors import InvalidRequestError, NotFoundError
from tinkerd.domain.ops import AdamParams, ArrayData, Datum, LoraConfig
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.served_model import ForwardJob, ServedModel

FP32 = EngineConfig(train_dtype="float32", sample_dtype="float32")


def served(config: EngineConfig = FP32, family: str = "llama") -> ServedModel:
    return ServedModel(f"tiny-{family}", tiny_model(family), config)


def datum(tokens: list[int], targets: list[int] | None = None, weights: list[float] | None = None) -> Datum:
    targets = targets if targets is not None else [*tokens[1:], 2]
    weights = weights if weights is not None else [1.0] * len(tokens)
    return Datum(tokens, {"target_tokens": ArrayData.of_ints(targets), "weights": ArrayData.of_floats(weights)})


def batch(seed: int = 0, lengths: tuple[int, ...] = (7, 3, 12, 7, 1)) -> list[Datum]:
    g = torch.Generator().manual_seed(seed)
    return [datum(torch.randint(3, 96, (n,), generator=g).tolist()) for n in lengths]


def randomize_b(model: ServedModel, adapter_id: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in model.adapter(adapter_id).weights.b.values():
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def logprobs(model: ServedModel, adapter: str | None, datums: list[Datum]) -> list[list[float]]:
    (result,) = model.forward([ForwardJob(adapter, datums, "cross_entropy")])
    return [list(map(float, out["logprobs"].values)) for out in result.loss_fn_outputs]


def assert_nested_close(got: list[list[float]], want: list[list[float]], atol: float) -> None:
    assert [len(x) for x in got] == [len(x) for x in want]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(torch.tensor(g), torch.tensor(w), atol=atol, rtol=0)


def grads(model: ServedModel, adapter: str) -> list[torch.Tensor]:
    return [
        p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for p in model.adapter(adapter).weights.parameters()
    ]


def test_fresh_adapter_equals_base_model() -> None:
    model = served()
    model.create_adapter("a", LoraConfig(rank=8, seed=3))
    data = batch()
    assert_nested_close(logprobs(model, "a", data), logprobs(model, None, data), atol=1e-6)


def test_batch_equals_rows_one_at_a_time() -> None:
    model = served()
    model.create_adapter("a", LoraConfig(rank=8, seed=3))
    randomize_b(model, "a", 1)
    data = batch(lengths=(5, 9, 2, 9, 16, 1))
    together = logprobs(model, "a", data)
    alone = [logprobs(model, "a", [d])[0] for d in data]
    for t, a in zip(together, alone, strict=True):
        assert t == pytest.approx(a, abs=1e-5)


def test_mixed_adapter_batch_equals_separate_runs_outputs_and_gradients() -> None:
    model = served()
    for name, seed in (("a", 1), ("b", 2)):
        model.create_adapter(name, LoraConfig(rank=4 if name == "a" else 8, seed=seed, train_unembed=name == "a"))
        randomize_b(model, name, seed)
    data_a, data_b = batch(1), batch(2, lengths=(4, 11))

    # The guard: were the adapters no-ops, mixed and separate runs would agree without proving anything. Each adapter
    # must move its outputs off the base's by far more than the tolerance below, and the two must differ.
    def flat(adapter: str | None, data: list[Datum]) -> torch.Tensor:
        return torch.cat([torch.tensor(row) for row in logprobs(model, adapter, data)])

    for name, data in (("a", data_a), ("b", data_b)):
        assert (flat(name, data) - flat(None, data)).abs().max() > 1e-2, name
    assert (flat("a", data_b) - flat("b", data_b)).abs().max() > 1e-2
    mixed = model.forward(
        [
            ForwardJob("a", data_a, "cross_entropy", backward=True),
            ForwardJob(None, data_b, "cross_entropy"),
            ForwardJob("b", data_b, "cross_entropy", backward=True),
        ]
    )
    mixed_grads = {name: grads(model, name) for name in ("a", "b")}
    assert all(any(g.abs().max() > 0 for g in mixed_grads[name]) for name in ("a", "b"))  # gradients that say something
    for adapter in model.adapters.values():
        for p in adapter.weights.parameters():
            p.grad = None
    separate = [
        model.forward([ForwardJob(n, d, "cross_entropy", backward=True)])[0] for n, d in (("a", data_a), ("b", data_b))
    ]
    base = model.forward([ForwardJob(None, data_b, "cross_entropy")])[0]
    for got, want in zip((mixed[0], mixed[2], mixed[1]), (*separate, base), strict=True):
        assert got.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], rel=1e-5)
        for g, w in zip(got.loss_fn_outputs, want.loss_fn_outputs, strict=True):
            assert g["logprobs"].values == pytest.approx(w["logprobs"].values, abs=1e-5)
    for name in ("a", "b"):
        for m, s in zip(mixed_grads[name], grads(model, name), strict=True):
            torch.testing.assert_close(m, s, atol=1e-5, rtol=1e-4)


@pytest.mark.heavy
def test_training_one_adapter_never_moves_another() -> None:
    model = served()
    model.create_adapter("a", LoraConfig(rank=8, seed=1))
    model.create_adapter("b", LoraConfig(rank=8, seed=2))
    randomize_b(model, "b", 5)
    before = [p.detach().clone() for p in model.adapter("b").weights.parameters()]
    before_out = logprobs(model, "b", batch(3))
    for _ in range(3):
        model.forward([ForwardJob("a", batch(4), "cross_entropy", backward=True)])
        model.optim_step("a", AdamParams(learning_rate=1e-2))
    assert all(p.grad is None for p in model.adapter("b").weights.parameters())
    for p, q in zip(before, model.adapter("b").weights.parameters(), strict=True):
        assert torch.equal(p, q)
    assert logprobs(model, "b", batch(3)) == before_out
    assert logprobs(model, "a", batch(3)) != before_out


def test_gradients_accumulate_across_calls_until_optim_step() -> None:
    model = served()
    model.create_adapter("a", LoraConfig(rank=8, seed=1))
    randomize_b(model, "a", 1)
    data = batch(6)
    model.forward([ForwardJob("a", data[:2], "cross_entropy", backward=True)])
    model.forward([ForwardJob("a", data[2:], "cross_entropy", backward=True)])
    two_calls = grads(model, "a")
    for p in model.adapter("a").weights.parameters():
        p.grad = None
    model.forward([ForwardJob("a", data, "cross_entropy", backward=True)])
    for x, y in zip(two_calls, grads(model, "a"), strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_micro_batches_give_the_same_gradients_as_one_pass() -> None:
    small = served(EngineConfig(train_dtype="float32", max_tokens_per_pass=10))
    big = served()
    for m in (small, big):
        m.create_adapter("a", LoraConfig(rank=8, seed=1))
        randomize_b(m, "a", 1)
        m.forward([ForwardJob("a", batch(6), "cross_entropy", backward=True)])
    for x, y in zip(grads(small, "a"), grads(big, "a"), strict=True):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-5)


@pytest.mark.heavy
def test_training_lowers_the_loss_of_what_it_trains_on() -> None:
    model = served()
    model.create_adapter("a", LoraConfig(rank=8, seed=1))
    data = batch(7, lengths=(12, 12))
    losses = []
    for _ in range(20):
        (out,) = model.forward([ForwardJob("a", data, "cross_entropy", backward=True)])
        losses.append(out.metrics["loss:sum"])
        model.optim_step("a", AdamParams(learning_rate=3e-3))
    assert losses[-1] < 0.5 * losses[0]
    assert all(b < a for a, b in itertools.pairwise(losses))


def test_bf16_training_dtype_tracks_fp32() -> None:
    lp32 = logprobs(served(), None, batch())
    lp16 = logprobs(served(EngineConfig(train_dtype="bfloat16")), None, batch())
    gap = max(abs(a - b) for x, y in zip(lp32, lp16, strict=True) for a, b in zip(x, y, strict=True))
    assert gap < 0.1


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (Datum([5, 500], {"target_tokens": ArrayData.of_ints([1, 2])}), "outside the vocabulary"),
        (Datum([], {"target_tokens": ArrayData.of_ints([])}), "no tokens"),
        (Datum([5, 6], {"target_tokens": ArrayData.of_ints([1, 96])}), "target_tokens contain ids outside"),
        (Datum([5, 6], {"target_tokens": ArrayData.of_ints([1])}), "target_tokens has shape"),
        (Datum([5, 6], {"weights": ArrayData.of_floats([1.0, 1.0])}), "needs"),
        (datum([5, 6], weights=[float("nan"), 1.0]), "NaN"),
        (Datum([5] * 300, {"target_tokens": ArrayData.of_ints([5] * 300)}), "exceed the model's context"),
        (Datum([5, 6], {"target_tokens": ArrayData([1, 2, 3], (2,), "int64")}), "needs 2 values"),
    ],
)
def test_bad_datums_are_rejected_with_a_clear_message(bad: Datum, message: str) -> None:
    model = served()
    model.create_adapter("a", LoraConfig(rank=4))
    with pytest.raises(InvalidRequestError, match=message):
        model.forward([ForwardJob("a", [bad], "cross_entropy", backward=True)])


def test_unknown_adapter_loss_and_frozen_base_are_rejected() -> None:
    model = served()
    model.create_adapter("a", LoraConfig(rank=4))
    with pytest.raises(NotFoundError):
        model.forward([ForwardJob("nope", batch(), "cross_entropy")])
    with pytest.raises(InvalidRequestError, match="unknown"):
        model.validate(ForwardJob("a", batch(), "no_such_loss"))
    with pytest.raises(InvalidRequestError, match="frozen"):
        model.forward([ForwardJob(None, batch(), "cross_entropy", backward=True)])
    with pytest.raises(InvalidRequestError, match="learning_rate"):
        model.optim_step("a", AdamParams(learning_rate=float("nan")))
