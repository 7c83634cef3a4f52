"""Wire schemas of the REST endpoints: capabilities, runs, checkpoints, sessions, downloads and the account.

The same rules as ``schemas`` (the SDK's calls): requests ignore unknown fields, responses carry the SDK's exact
field names. Conversion from domain types lives in ``convert``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from tinkerd.api.schemas import WireModel

# -- REST: capabilities, runs, checkpoints, sessions -------------------------------------------------------------------


class SupportedModel(WireModel):
    model_name: str
    max_context_length: int | None = None
    trainable: bool = True
    sampleable: bool = True


class GetServerCapabilitiesResponse(WireModel):
    supported_models: list[SupportedModel]


class Cursor(WireModel):
    offset: int
    limit: int
    total_count: int


class Checkpoint(WireModel):
    checkpoint_id: str
    checkpoint_type: Literal["training", "sampler", "external"]
    time: datetime
    tinker_path: str
    size_bytes: int | None = None
    public: bool = False
    user_metadata: dict[str, str] | None = None
    expires_at: datetime | None = None


class CheckpointsListResponse(WireModel):
    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None


class TrainingRun(WireModel):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    corrupted: bool = False
    lora_rank: int | None = None
    last_request_time: datetime
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, str] | None = None


class TrainingRunsResponse(WireModel):
    training_runs: list[TrainingRun]
    cursor: Cursor


class WeightsInfoRequest(WireModel):
    tinker_path: str


class WeightsInfoResponse(WireModel):
    base_model: str
    is_lora: bool
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None
    optimizer_config: dict[str, Any] | None = None


class SetTtlRequest(WireModel):
    ttl_seconds: int | None = None


class GetSessionResponse(WireModel):
    training_run_ids: list[str]
    sampler_ids: list[str]
    user_metadata: dict[str, str] | None = None
    display_name: str | None = None


class ListSessionsResponse(WireModel):
    sessions: list[str]


# -- downloads and account ---------------------------------------------------------------------------------------------


class CheckpointFile(WireModel):
    """One downloadable file (the fields of Baseten Loops' checkpoint file lists)."""

    relative_file_name: str
    url: str
    size_bytes: int
    last_modified: datetime


class ExternalWeightsUrlsResponse(WireModel):
    """The SDK reads `urls` and `expires`; the rest pages through checkpoints with many files (the SDK ignores it)."""

    urls: dict[str, str]  # relative file path -> signed URL
    expires: datetime
    files: list[CheckpointFile]
    total_count: int
    next_page_token: int | None = None  # pass as page_token for the next page; None on the last page


class CheckpointArchiveUrlResponse(WireModel):
    url: str
    expires: datetime


class ApiKeyOrgDetails(WireModel):
    name: str


class ApiKeyUserDetails(WireModel):
    email: str


class ApiKeyDetails(WireModel):
    org_details: ApiKeyOrgDetails
    user_details: ApiKeyUserDetails


class SelfApiKeyResponse(WireModel):
    key_id: int
    name: str
    note: str
    details: ApiKeyDetails


class CheckpointStorageRow(WireModel):
    org_user_urn: str | None = None
    user_name: str | None = None
    checkpoint_count: int
    size_bytes: int
    size_gigabytes: float


class CurrentCheckpointStorageUsageResponse(WireModel):
    data: list[CheckpointStorageRow]
