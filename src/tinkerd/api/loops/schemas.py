"""Wire schemas of the Baseten Loops protocol: the JSON the ``baseten-loops`` SDK (0.32) sends and reads.

Requests ignore unknown fields (the SDK adds tracing and routing fields freely); responses use the SDK's field
names. These types are the Loops front end's own: the Tinker routes never see them, and these never import the
Tinker wire types (an import-linter contract checks both). Conversion to and from domain types is in ``convert``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_INT64 = 2**63 - 1
SeqId = Annotated[int, Field(ge=0, le=MAX_INT64)]


class LoopsModel(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


# -- control plane -----------------------------------------------------------------------------------------------------


class CreateTrainerRequest(LoopsModel):
    session_id: str
    base_model: str
    lora_rank: int = 32
    replicas: int = 1
    seed: int | None = None
    max_seq_len: int | None = None
    name: str | None = None
    base_checkpoint: str | None = None
    path: str | None = None  # create_training_client_from_state: the checkpoint the SDK loads next


class CreateSamplerRequest(LoopsModel):
    session_id: str
    run_id: str | None = None  # a run's paired sampler
    base_model: str | None = None  # a standalone sampler of a base model ...
    model_path: str | None = None  # ... or of a checkpoint
    max_seq_length: int | None = None


class ValidateCheckpointRequest(LoopsModel):
    checkpoint_path: str
    run_id: str | None = None


class Run(LoopsModel):
    id: str
    base_model: str
    base_url: str
    deployment_id: str | None = None  # None: a "serverless" trainer, polled by /health alone


class Sampler(LoopsModel):
    id: str
    base_url: str
    model_id: str | None = None  # None: a "serverless" sampler (queued /sample, pinned by checkpoint path)
    deployment_id: str | None = None


class LoraAdapterConfig(LoopsModel):
    r: int


class Checkpoint(LoopsModel):
    id: str
    run_id: str
    checkpoint_id: str  # the name it was saved under
    checkpoint_type: str
    created_at: datetime
    base_model: str
    lora_adapter_config: LoraAdapterConfig
    size_bytes: int = 0
    target: Literal["sampler", "trainer"] | None = None


class CheckpointFile(LoopsModel):
    url: str
    relative_file_name: str
    node_rank: int = 0
    size_bytes: int
    last_modified: datetime


class CheckpointFilesResponse(LoopsModel):
    presigned_urls: list[CheckpointFile]
    next_page_token: int | None  # None ends the paging
    total_count: int


class SupportedModel(LoopsModel):
    model_name: str
    max_context_length: int | None = None


# -- trainer operations ------------------------------------------------------------------------------------------------


class OpBody(LoopsModel):
    """What every trainer op carries besides its own fields."""

    model: str | None = None
    run_id: str | None = None
    seq_id: SeqId


class InitTrainerServerRequest(OpBody):
    lora_rank: int | None = None
    base_model: str | None = None


class TensorData(LoopsModel):
    data: list[int | float | None]
    dtype: str
    shape: list[int] | None = None


class Chunk(LoopsModel):
    type: str = "encoded_text"
    tokens: list[int] | None = None
    data: str | None = None  # "image": the file in base64
    format: str | None = None
    expected_tokens: int | None = None


class ModelInput(LoopsModel):
    chunks: list[Chunk] = Field(default_factory=list)


class Datum(LoopsModel):
    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = Field(default_factory=dict)


class ForwardBackwardRequest(OpBody):
    data: list[Datum]
    loss_fn: str = "cross_entropy"
    loss_fn_config: dict[str, Any] | None = None
    top_k_logprobs: int = 0


class AdamParams(LoopsModel):
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0  # the SDK's default; 0 means no clipping


class OptimStepRequest(OpBody):
    adam_params: AdamParams = Field(default_factory=AdamParams)


class SaveRequest(OpBody):
    name: str
    ttl_seconds: int | None = None
    bump_version: bool = False


class LoadStateRequest(OpBody):
    path: str


# -- sampler ---------------------------------------------------------------------------------------------------------


class SampleRequest(LoopsModel):
    """vLLM ``/v1/completions`` style, with the prompt as token ids."""

    prompt: list[int] = Field(default_factory=list)
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    logprobs: int | None = None
    model: str | None = None
    lora: str | None = None  # the checkpoint a serverless sampler serves (also sent as X-Checkpoint-Path)
    model_input_chunks: list[Chunk] | None = None  # a prompt with images (then ``prompt`` is empty)
    return_token_ids: bool = False  # answer each choice's ``prompt_token_ids``: the prompt with images laid out
    structured_outputs: dict[str, Any] | None = None
