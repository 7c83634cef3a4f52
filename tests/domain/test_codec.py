"""Ledger payloads survive the trip through bytes exactly, ints staying ints."""

from __future__ import annotations

import pytest

from tinkerd.domain import codec
from tinkerd.domain import requests as r
from tinkerd.domain.ops import (
    AdamParams,
    ArrayData,
    Datum,
    ForwardResult,
    LoraConfig,
    OptimStepResult,
    SampledSequence,
    SampleResult,
    SamplingParams,
)

VALUES: list[object] = [
    r.CreateModel("s:train:0", "base", LoraConfig(rank=8, seed=None, train_unembed=False), {"k": [1, "x"]}),
    r.ForwardBackward(
        "s:train:0",
        [Datum([1, 2], {"target_tokens": ArrayData.of_ints([2, 3]), "weights": ArrayData([1.0, -0.5], (2,))})],
        "ppo",
        {"clip_low_threshold": 0.7},
        backward=False,
    ),
    r.OptimStep("s:train:0", AdamParams(learning_rate=3e-4, grad_clip_norm=1.0)),
    r.SaveWeights("s:train:0", "sampler_weights", "final", ttl_seconds=3600),
    r.SnapshotForSampler("s:train:0", "s:sample:3"),
    r.LoadWeights("s:train:1", "tinker://s:train:0/weights/a", True, "base", True),
    r.Sample("s:sample:0", [1, 2, 3], 4, SamplingParams(max_tokens=5, seed=7, stop_strings=("\n",)), True, 3),
    r.UnloadModel("s:train:0"),
    ForwardResult([{"logprobs": ArrayData([-0.25, -1.5], (2,))}], {"loss:sum": 1.75}),
    OptimStepResult({"grad_norm": 0.5}),
    SampleResult([SampledSequence([4, 2], [-0.1, -0.2], "stop")], [None, -3.0], [None, [(5, -0.5), (6, -1.0)]]),
    r.CreateModelResult("s:train:0"),
    r.PathResult("tinker://s:train:0/weights/a", size_bytes=10),
    r.SamplerResult("s:sample:1"),
    r.Empty(),
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_round_trip_is_exact(value: object) -> None:
    assert codec.decode(codec.encode(value)) == value


def test_integer_arrays_decode_as_integers() -> None:
    datum = Datum([1], {"target_tokens": ArrayData.of_ints([7])})
    back = codec.decode_as(codec.encode(r.ForwardBackward("m", [datum], "cross_entropy")), r.ForwardBackward)
    assert back.datums[0].loss_fn_inputs["target_tokens"].values == [7]
    assert isinstance(back.datums[0].loss_fn_inputs["target_tokens"].values[0], int)


def test_unknown_types_and_nan_are_refused() -> None:
    with pytest.raises(TypeError):
        codec.encode(object())
    with pytest.raises(ValueError):
        codec.encode(ForwardResult([], {"loss:sum": float("nan")}))
    with pytest.raises(TypeError):
        codec.decode_as(codec.encode(r.Empty()), r.PathResult)
