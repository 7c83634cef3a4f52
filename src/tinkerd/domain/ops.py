"""The operations the engine performs, as plain data (no tensors, no wire schemas)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DType = Literal["int64", "float32"]


@dataclass(frozen=True)
class ArrayData:
    """A dense array: flat row-major values plus a shape."""

    values: list[int] | list[float]
    shape: tuple[int, ...]
    dtype: DType = "float32"

    @staticmethod
    def of_ints(values: list[int]) -> ArrayData:
        return ArrayData(values=values, shape=(len(values),), dtype="int64")

    @staticmethod
    def of_floats(values: list[float]) -> ArrayData:
        return ArrayData(values=values, shape=(len(values),), dtype="float32")


SpanKind = Literal["prompt", "sampled"]


@dataclass(frozen=True)
class ProvenanceSpan:
    """A run of ``length`` consecutive datum positions that reproduce positions ``[offset, offset + length)`` of a
    sampled sequence's prompt ("prompt") or of its sampled tokens ("sampled"); ``sequence_id`` names the sequence
    as the sampler returned it."""

    kind: SpanKind
    sequence_id: str
    offset: int
    length: int


@dataclass(frozen=True)
class Datum:
    """One training example: input tokens and the loss function's inputs (target_tokens, weights, advantages, ...).

    Provenance comes as a pair or not at all: ``model_input_spans`` tile ``tokens`` and ``loss_fn_input_spans`` tile
    the rows of ``loss_fn_inputs['target_tokens']`` (see ``domain.provenance``).
    """

    tokens: list[int]
    loss_fn_inputs: dict[str, ArrayData]
    model_input_spans: list[ProvenanceSpan] | None = None
    loss_fn_input_spans: list[ProvenanceSpan] | None = None


# The largest LoRA rank a run may ask for (checked at the api and again by the engine).
MAX_LORA_RANK = 1024


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 32
    alpha: float = 32.0
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True


@dataclass(frozen=True)
class AdamParams:
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0  # 0 means no clipping


@dataclass(frozen=True)
class ForwardResult:
    """Per-datum outputs (e.g. 'logprobs', 'elementwise_loss') and batch metrics named 'name:reduction'."""

    loss_fn_outputs: list[dict[str, ArrayData]]
    metrics: dict[str, float]


@dataclass(frozen=True)
class OptimStepResult:
    metrics: dict[str, float]


StopReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 means no top-k filter
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: StopReason


@dataclass(frozen=True)
class SampleResult:
    sequences: list[SampledSequence]
    # logprob of each prompt token given the ones before it; the first is None
    prompt_logprobs: list[float | None] | None = None
    # per prompt position: the k most likely tokens and their logprobs; the first is None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
    extra: dict[str, float] = field(default_factory=dict)
