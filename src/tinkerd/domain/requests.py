"""The work a future asks for and what it answers, as plain data: the contract between the API and the worker.

The API turns wire requests into these, the ledger stores them as bytes (``codec``), and the worker decodes and
executes them. Results travel back the same way and the API renders them as JSON or protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tinkerd.domain.ops import (
    AdamParams,
    CellGrid,
    Datum,
    ForwardResult,
    ImageInput,
    LoraConfig,
    OptimStepResult,
    SampleResult,
    SamplingParams,
)
from tinkerd.domain.paths import CheckpointKind
from tinkerd.domain.records import FutureRecord

JsonObject = dict[str, object]


@dataclass(frozen=True)
class CreateModel:
    run_id: str
    base_model: str
    lora: LoraConfig
    user_metadata: JsonObject = field(default_factory=dict)


@dataclass(frozen=True)
class ForwardBackward:
    run_id: str
    datums: list[Datum]
    loss_fn: str
    loss_fn_config: dict[str, float] = field(default_factory=dict)
    backward: bool = True
    top_k_logprobs: int = 0  # also return each position's most likely next tokens (Loops' forward option)


@dataclass(frozen=True)
class OptimStep:
    run_id: str
    adam: AdamParams


@dataclass(frozen=True)
class SaveWeights:
    """save_state (kind "weights": adapter + optimizer), save_weights_for_sampler (kind "sampler_weights") or
    save_weights_external (kind "external_weights": the adapter as a PEFT directory to download)."""

    run_id: str
    kind: CheckpointKind
    name: str
    ttl_seconds: int | None = None
    overwrite: bool = False
    user_metadata: JsonObject = field(default_factory=dict)


@dataclass(frozen=True)
class SnapshotForSampler:
    """save_weights_and_get_sampling_client: an in-memory, version-pinned sampler; nothing is written to disk."""

    run_id: str
    sampler_id: str


@dataclass(frozen=True)
class LoadWeights:
    """Load a ``weights/`` checkpoint into a run; creates the run first when ``create`` carries its identity."""

    run_id: str
    path: str
    with_optimizer: bool
    create_base_model: str | None = None
    create: bool = False
    user_metadata: JsonObject = field(default_factory=dict)


@dataclass(frozen=True)
class Sample:
    sampler_id: str
    prompt: list[int]
    num_samples: int
    params: SamplingParams
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    # score only the last n prompt tokens (prompt_logprobs and topk_prompt_logprobs); None: all of them
    prompt_logprobs_last_n: int | None = None
    target_prompt_logprobs: CellGrid | None = None  # int ids, -1 cells dropped
    prompt_alt_tokens_k: int = 0
    images: list[ImageInput] = field(default_factory=list)  # in the prompt, which holds their placeholder tokens


@dataclass(frozen=True)
class UnloadModel:
    run_id: str


@dataclass(frozen=True)
class ResetAdapter:
    """A fresh adapter (same config and seed) and optimizer for an existing run: Loops' ``init_trainer_server``."""

    run_id: str


Request = (
    CreateModel
    | ForwardBackward
    | OptimStep
    | SaveWeights
    | SnapshotForSampler
    | LoadWeights
    | Sample
    | UnloadModel
    | ResetAdapter
)


@dataclass(frozen=True)
class CreateModelResult:
    model_id: str


@dataclass(frozen=True)
class PathResult:
    """save_weights / save_weights_for_sampler / load_weights: the tinker:// path concerned."""

    path: str
    model_id: str | None = None
    size_bytes: int | None = None
    # The run's optimizer step count when the weights were saved or loaded (Loops reports it as a policy version).
    step: int | None = None


@dataclass(frozen=True)
class SamplerResult:
    sampling_session_id: str


@dataclass(frozen=True)
class Empty:
    pass


@dataclass(frozen=True)
class AdapterState:
    """A run's adapter after ResetAdapter: its optimizer step count and LoRA rank."""

    step: int
    lora_rank: int


Result = (
    ForwardResult
    | OptimStepResult
    | SampleResult
    | CreateModelResult
    | PathResult
    | SamplerResult
    | Empty
    | AdapterState
)


@dataclass(frozen=True)
class SampleProgress:
    """Tokens a sample of a running sampling request produced since the last progress report (for streaming): the
    worker reports them to an api in its process that watches the request."""

    sample_index: int
    tokens: list[int]
    logprobs: list[float]


@dataclass(frozen=True)
class Finished:
    """A finished request as a worker hands it to the api in the same process: its record (state, stored result or
    error) and, when it completed, the result object itself (so the api need not decode it)."""

    record: FutureRecord
    value: Result | None = None
