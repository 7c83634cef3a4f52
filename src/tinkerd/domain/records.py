"""What tinkerd remembers: sessions, training runs, checkpoints, samplers and the futures ledger.

Plain frozen dataclasses shared by the api, the store and the worker. Timestamps are timezone-aware UTC.
Dict fields (user_metadata) hold JSON values; treat them as read-only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Generic, Literal, TypeVar

from tinkerd.domain.ops import LoraConfig
from tinkerd.domain.paths import CheckpointKind, TinkerPath

JsonObject = dict[str, Any]
Clock = Callable[[], datetime]

# create_model (and create-via-load_weights) implicitly own seq 0 of a new model; training ops start at 1.
FIRST_SEQ_ID = 0


def utc_now() -> datetime:
    return datetime.now(UTC)


class RequestKind(StrEnum):
    """What a future asks for. The values are stored in the ledger; never rename one."""

    CREATE_MODEL = "create_model"
    FORWARD = "forward"
    FORWARD_BACKWARD = "forward_backward"
    OPTIM_STEP = "optim_step"
    SAVE_WEIGHTS = "save_weights"
    SAVE_WEIGHTS_FOR_SAMPLER = "save_weights_for_sampler"
    SAVE_WEIGHTS_EXTERNAL = "save_weights_external"
    LOAD_WEIGHTS = "load_weights"
    SAMPLE = "sample"
    CREATE_CUSTOM_LOSS = "create_custom_loss"
    UNLOAD_MODEL = "unload_model"
    # A seq_id that never arrived, recorded as failed so the model's later requests could go on (see store.futures).
    MISSING = "missing"

    @property
    def sequenced(self) -> bool:
        """True for the kinds that must run in seq_id order per model (every training-client operation).

        Sampling seq_ids only make retries idempotent (the wire protocol §3.4 says they are no ordering
        constraint), and custom losses are per session.
        """
        return self not in (RequestKind.SAMPLE, RequestKind.CREATE_CUSTOM_LOSS)


def is_ordered(kind: RequestKind, seq_id: int | None) -> bool:
    """Whether a request waits for its model's earlier seq_ids. A request without a seq_id is never ordered."""
    return seq_id is not None and kind.sequenced


class FutureState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (FutureState.COMPLETED, FutureState.FAILED)


ErrorCategory = Literal["user", "server"]


@dataclass(frozen=True)
class FutureRecord:
    """One row of the futures ledger: a request that does work, and eventually its result or error."""

    request_id: str
    owner: str
    model_id: str  # training run id, sampler id or session id: the key seq_id is scoped to
    seq_id: int | None
    kind: RequestKind
    ordered: bool
    state: FutureState
    # None when not loaded (reads for polling skip it) or dropped after the request finished (see store.futures).
    payload: bytes | None
    result: bytes | None
    error_message: str | None
    error_category: ErrorCategory | None
    token_count: int  # the submitter's cost estimate, used by the planner's budgets
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    claimed_by: str | None = None
    delivered_count: int = 0
    delivered_at: datetime | None = None

    @property
    def delivered(self) -> bool:
        return self.delivered_count > 0


SessionStatus = Literal["active", "finished", "timed_out"]
FinishReason = Literal["success", "errored", "interrupted"]


@dataclass(frozen=True)
class Session:
    id: str
    owner: str
    created_at: datetime
    last_heartbeat_at: datetime
    sdk_version: str = ""
    tags: tuple[str, ...] = ()
    user_metadata: JsonObject = field(default_factory=dict)
    display_name: str | None = None
    project_id: str | None = None
    status: SessionStatus = "active"
    finish_reason: FinishReason | None = None  # set when status == "finished" (the client called finish)
    status_detail: str | None = None
    closed_at: datetime | None = None

    @property
    def closed(self) -> bool:
        return self.status != "active"


@dataclass(frozen=True)
class TrainingRun:
    """A LoRA training run (the SDK's "model"). Its id is also its model id."""

    id: str
    session_id: str
    owner: str
    base_model: str
    created_at: datetime
    last_request_at: datetime
    lora: LoraConfig = field(default_factory=LoraConfig)
    is_lora: bool = True
    optimizer_config: JsonObject = field(default_factory=lambda: {"type": "adamw"})
    user_metadata: JsonObject = field(default_factory=dict)
    corrupted: bool = False


@dataclass(frozen=True)
class Checkpoint:
    run_id: str
    kind: CheckpointKind
    name: str
    owner: str
    created_at: datetime
    size_bytes: int | None = None
    expires_at: datetime | None = None
    public: bool = False
    user_metadata: JsonObject = field(default_factory=dict)

    @property
    def path(self) -> TinkerPath:
        return TinkerPath(self.run_id, self.kind, self.name)

    @property
    def tinker_path(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class Sampler:
    """A sampling session: a base model, optionally with an adapter from a checkpoint or a live run snapshot."""

    id: str
    session_id: str
    owner: str
    base_model: str
    created_at: datetime
    model_path: str | None = None  # tinker:// path of the adapter, when sampling from a checkpoint
    run_id: str | None = None  # the run whose in-memory snapshot this samples (save_weights_and_get_sampling_client)
    run_version: int | None = None  # which snapshot of that run


T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of an offset/limit listing; (offset, limit, total_count) is the wire protocol's Cursor."""

    items: tuple[T, ...]
    offset: int
    limit: int
    total_count: int

    @property
    def next_offset(self) -> int | None:
        end = self.offset + len(self.items)
        return end if end < self.total_count and self.items else None


@dataclass(frozen=True)
class StepMetrics:
    """The metrics one training request of a run returned (forward_backward or optim_step), kept for curves.

    ``metrics`` are the request's own, as its client saw them ('loss:sum', 'grad_norm', 'learning_rate', ...);
    ``loss_weight`` is the sum of the batch's loss weights (tokens that count), so loss per token is
    ``metrics['loss:sum'] / loss_weight``; ``step`` counts the run's optim_steps recorded before this one.
    """

    run_id: str
    owner: str
    kind: RequestKind
    seq_id: int | None
    metrics: dict[str, float]
    loss_weight: float | None
    recorded_at: datetime
    step: int = 0  # filled in when read
    id: int = 0  # the row's position in the run's history, filled in when read (poll with ``after=id``)
