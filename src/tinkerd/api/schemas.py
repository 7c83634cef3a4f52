"""Wire schemas: the JSON bodies the Tinker SDK sends and accepts, with its exact field names.

Requests ignore unknown fields (newer SDKs keep adding some) and accept explicit nulls (SDKs up to 0.15 send them)
and missing ``type`` discriminators. Responses carry the ``type`` literals the SDK's strict validation accepts.
Conversion to and from domain types lives in ``convert``, nowhere else.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Counters the ledger stores as signed 64-bit integers: a negative or larger value is refused here with a message
# naming the field, rather than overflowing the database.
MAX_INT64 = 2**63 - 1
SeqId = Annotated[int, Field(ge=0, le=MAX_INT64)]


class WireModel(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


# -- shared pieces ---------------------------------------------------------------------------------------------------


class TensorData(WireModel):
    data: list[int] | list[float]
    dtype: Literal["int64", "float32"]
    shape: list[int] | None = None
    sparse_crow_indices: list[int] | None = None
    sparse_col_indices: list[int] | None = None


class Chunk(WireModel):
    # Old SDKs omit the discriminator of text chunks.
    type: str = "encoded_text"
    tokens: list[int] | None = None
    # "image": the file in base64; "image_asset_pointer": where the server reads it. Both: format, expected_tokens.
    data: str | None = None
    location: str | None = None
    format: str | None = None
    expected_tokens: int | None = None


class ModelInput(WireModel):
    chunks: list[Chunk]


class Datum(WireModel):
    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = Field(default_factory=dict)


class LoraConfig(WireModel):
    rank: int
    seed: int | None = None
    train_unembed: bool | None = True
    train_mlp: bool | None = True
    train_attn: bool | None = True


class OptimizerConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "adamw"


class AdamParams(WireModel):
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


# -- client, sessions --------------------------------------------------------------------------------------------------


class ClientConfigRequest(WireModel):
    sdk_version: str | None = None


class CreateSessionRequest(WireModel):
    tags: list[str] | None = None
    user_metadata: dict[str, Any] | None = None
    sdk_version: str | None = None
    project_id: str | None = None
    display_name: str | None = None


class CreateSessionResponse(WireModel):
    type: Literal["create_session"] = "create_session"
    session_id: str
    info_message: str | None = None


class SessionHeartbeatRequest(WireModel):
    session_id: str


class FinishReason(WireModel):
    type: Literal["success", "errored", "interrupted"]


class FinishSessionRequest(WireModel):
    reason: FinishReason | None = None
    detail: str | None = None


# -- training ----------------------------------------------------------------------------------------------------------


class CreateModelRequest(WireModel):
    session_id: str
    model_seq_id: SeqId
    base_model: str
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraConfig | None = None
    optimizer_config: OptimizerConfig | None = None


class GetInfoRequest(WireModel):
    model_id: str


class ModelData(WireModel):
    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


class GetInfoResponse(WireModel):
    type: Literal["get_info"] = "get_info"
    model_id: str
    model_data: ModelData
    optimizer_config: dict[str, Any] = Field(default_factory=lambda: {"type": "adamw"})
    is_lora: bool = True
    lora_rank: int | None = None
    model_name: str | None = None


class ForwardBackwardInput(WireModel):
    data: list[Datum]
    loss_fn: str
    loss_fn_config: dict[str, float | str] | None = None


class ForwardBackwardJsonRequest(WireModel):
    """/forward_backward as SDKs before 0.25 send it (0.25+ send protobuf)."""

    forward_backward_input: ForwardBackwardInput
    model_id: str
    seq_id: SeqId | None = None


class ForwardJsonRequest(WireModel):
    """/forward as SDKs before 0.25 send it."""

    forward_input: ForwardBackwardInput
    model_id: str
    seq_id: SeqId | None = None


class OptimStepRequest(WireModel):
    model_id: str
    seq_id: SeqId | None = None
    adam_params: AdamParams | None = None
    optim_params: dict[str, Any] | None = None
    optimizer_params: dict[str, Any] | None = None


class SaveWeightsRequest(WireModel):
    model_id: str
    path: str | None = None
    seq_id: SeqId | None = None
    ttl_seconds: int | None = None
    overwrite: bool | None = False
    user_metadata: dict[str, Any] | None = None


class SaveWeightsForSamplerRequest(WireModel):
    model_id: str
    path: str | None = None
    sampling_session_seq_id: SeqId | None = None
    kind: str | None = "snapshot"
    seq_id: SeqId | None = None
    ttl_seconds: int | None = None
    user_metadata: dict[str, Any] | None = None


class SaveWeightsExternalRequest(WireModel):
    model_id: str
    path: str  # the name of the export
    seq_id: SeqId | None = None
    ttl_seconds: int | None = None
    age_encryption_recipients: list[str] | None = None


class LoadWeightsRequest(WireModel):
    model_id: str | None = None
    seq_id: SeqId | None = None
    session_id: str | None = None
    model_seq_id: SeqId | None = None
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None
    path: str
    optimizer: bool | None = False
    optimizer_config: OptimizerConfig | None = None


class UnloadModelRequest(WireModel):
    model_id: str


# -- sampling ----------------------------------------------------------------------------------------------------------


class CreateSamplingSessionRequest(WireModel):
    session_id: str
    sampling_session_seq_id: SeqId
    base_model: str | None = None
    model_path: str | None = None


class CreateSamplingSessionResponse(WireModel):
    type: Literal["create_sampling_session"] = "create_sampling_session"
    sampling_session_id: str


class GetSamplerResponse(WireModel):
    sampler_id: str
    base_model: str
    model_path: str | None = None


class SamplingParams(WireModel):
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float | None = 1.0
    top_k: int | None = -1
    top_p: float | None = 1.0


class SampleRequest(WireModel):
    num_samples: int | None = 1
    prompt: ModelInput
    sampling_params: SamplingParams
    base_model: str | None = None
    model_path: str | None = None
    sampling_session_id: str | None = None
    seq_id: SeqId | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int | None = 0
    topk_sample_logprobs: int | None = 0
    target_prompt_logprobs: TensorData | None = None
    prompt_alt_tokens_k: int | None = 0
    prompt_logprobs_last_n: int | None = None


# -- futures -----------------------------------------------------------------------------------------------------------


class UntypedAPIFuture(WireModel):
    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None


class FutureRetrieveRequest(WireModel):
    request_id: str
    allow_metadata_only: bool | None = False


class TryAgainResponse(WireModel):
    type: Literal["try_again"] = "try_again"
    request_id: str
    queue_state: Literal["active", "paused_capacity", "paused_rate_limit"] = "active"
    queue_state_reason: str | None = None
