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
class ImageInput:
    """An image inside a token sequence: it stands for positions ``[offset, offset + tokens)``, which hold the model's
    image token. ``data`` is the image file (PNG or JPEG) in base64, checked and measured (``width`` x ``height``)
    where the request came in; ``tokens`` is what the model's image processor makes of that size."""

    offset: int
    tokens: int
    format: str
    data: str
    width: int
    height: int


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
    images: list[ImageInput] = field(default_factory=list)  # in order of offset; tokens hold their placeholders


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

# Which distribution the logprobs of sampled tokens (and of top-k sample logprobs and prompt_alt_tokens draws) are
# under. "tempered": log_softmax(logits / temperature), not truncated (the default, as hosted Tinker reports them);
# "sampled": the distribution the token was actually drawn from (tempered, cut to top-k/top-p and renormalised; 0
# for greedy); "model": log_softmax(logits), the untempered model distribution that forward() scores.
LogprobDistribution = Literal["tempered", "sampled", "model"]
LOGPROB_DISTRIBUTIONS: tuple[LogprobDistribution, ...] = ("tempered", "sampled", "model")

TopkRow = list[tuple[int, float]]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 means no top-k filter
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs_of: LogprobDistribution = "tempered"


@dataclass(frozen=True)
class CellGrid:
    """A [rows, cols] matrix given cell by cell: ``values[i]`` sits at (``rows[i]``, ``cols[i]``); the cells not
    listed are empty. ``sparse`` remembers whether it came (and goes back) as sparse CSR or dense."""

    shape: tuple[int, int]
    rows: list[int]
    cols: list[int]
    values: list[int] | list[float]
    sparse: bool = False


@dataclass(frozen=True)
class PromptAltTokens:
    """``k`` draws per prompt position after the first: ``tokens[i]`` / ``logprobs[i]`` are row i (position i + 1)."""

    tokens: list[list[int]]
    logprobs: list[list[float]]


@dataclass(frozen=True)
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: StopReason
    # per generated token: the k most likely (token, logprob) pairs under the reported distribution
    topk_logprobs: list[TopkRow] | None = None


@dataclass(frozen=True)
class SampleResult:
    sequences: list[SampledSequence]
    # logprob of each prompt token given the ones before it; the first is None
    prompt_logprobs: list[float | None] | None = None
    # per prompt position: the k most likely tokens and their logprobs; the first is None
    topk_prompt_logprobs: list[TopkRow | None] | None = None
    # the logprobs of the requested ids, in the request's layout (cells it left at -1 are absent)
    target_prompt_logprobs: CellGrid | None = None
    prompt_alt_tokens: PromptAltTokens | None = None
    extra: dict[str, float] = field(default_factory=dict)
