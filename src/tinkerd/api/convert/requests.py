"""Wire requests -> domain requests and records: sessions, runs (created or loaded from a checkpoint), optimizer
steps, saves and loads of weights, and the samplers a save creates. Forward/backward bodies are in
``forward_backward``, model inputs in ``model_input``, sampling requests in ``sampling``.

Every function is pure: the routes look rows up and pass them in, so the rules here are testable without a server.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from tinkerd.api import schemas
from tinkerd.api.context import ServedModelInfo
from tinkerd.domain import ops
from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ids import sampler_id, training_run_id, validate_run_id, validate_session_id
from tinkerd.domain.paths import TinkerPath, parse_tinker_path, validate_checkpoint_name
from tinkerd.domain.records import Sampler, Session, TrainingRun
from tinkerd.domain.requests import CreateModel, LoadWeights, OptimStep, SaveWeights, SnapshotForSampler

MAX_TTL_SECONDS = 10 * 365 * 24 * 3600  # the Tinker docs' upper bound
MAX_SEED = 2**63 - 1  # seeds are stored as signed 64-bit integers


def _metadata(value: dict[str, Any] | None) -> dict[str, object]:
    return dict(value or {})


# -- sessions and runs -------------------------------------------------------------------------------------------------


def new_session(request: schemas.CreateSessionRequest, session_id: str, owner: str, now: datetime) -> Session:
    return Session(
        id=session_id,
        owner=owner,
        created_at=now,
        last_heartbeat_at=now,
        sdk_version=request.sdk_version or "",
        tags=tuple(request.tags or ()),
        user_metadata=_metadata(request.user_metadata),
        display_name=request.display_name,
        project_id=request.project_id,
    )


def _check_optimizer(config: schemas.OptimizerConfig | None) -> dict[str, object]:
    kind = config.type if config is not None else "adamw"
    if kind != "adamw":
        raise InvalidRequestError(f"optimizer {kind!r} is not supported; tinkerd trains with 'adamw'")
    return {"type": "adamw"}


def lora_from_wire(config: schemas.LoraConfig | None) -> ops.LoraConfig:
    if config is None:
        return ops.LoraConfig()
    if not 1 <= config.rank <= ops.MAX_LORA_RANK:
        raise InvalidRequestError(f"lora_config.rank must be between 1 and {ops.MAX_LORA_RANK}, got {config.rank}")
    if config.seed is not None and not 0 <= config.seed <= MAX_SEED:
        raise InvalidRequestError(f"lora_config.seed must be between 0 and {MAX_SEED}, got {config.seed}")
    lora = ops.LoraConfig(
        rank=config.rank,
        seed=config.seed,
        train_attn=config.train_attn is not False,
        train_mlp=config.train_mlp is not False,
        train_unembed=config.train_unembed is not False,
    )
    if not (lora.train_attn or lora.train_mlp or lora.train_unembed):
        raise InvalidRequestError("lora_config must train at least one of attention, MLP and unembedding")
    return lora


def create_model(
    request: schemas.CreateModelRequest, owner: str, now: datetime, model: ServedModelInfo
) -> tuple[TrainingRun, CreateModel]:
    run_id = training_run_id(request.session_id, request.model_seq_id)
    if not model.trainable:
        raise InvalidRequestError(f"base model {model.name!r} is served for sampling only")
    lora = lora_from_wire(request.lora_config)
    metadata = _metadata(request.user_metadata)
    run = TrainingRun(
        id=run_id,
        session_id=request.session_id,
        owner=owner,
        base_model=model.name,
        created_at=now,
        last_request_at=now,
        lora=lora,
        optimizer_config=_check_optimizer(request.optimizer_config),
        user_metadata=metadata,
    )
    return run, CreateModel(run_id=run_id, base_model=model.name, lora=lora, user_metadata=metadata)


# -- optimizer and weights ---------------------------------------------------------------------------------------------


def optim_step(request: schemas.OptimStepRequest) -> OptimStep:
    params = request.adam_params
    if params is None:
        other = request.optim_params or request.optimizer_params
        if other is not None and other.get("type", "adam") not in ("adam", "adamw"):
            raise InvalidRequestError(f"optimizer {other.get('type')!r} is not supported; send adam_params")
        params = schemas.AdamParams.model_validate(other or {})
    for name, value in params.model_dump().items():
        if not math.isfinite(value):
            raise InvalidRequestError(f"adam_params.{name} must be a finite number, got {value}")
    if params.learning_rate < 0:
        raise InvalidRequestError(f"adam_params.learning_rate must be >= 0, got {params.learning_rate}")
    if not (0 <= params.beta1 < 1 and 0 <= params.beta2 < 1):
        raise InvalidRequestError(f"adam_params betas must be in [0, 1), got {params.beta1} and {params.beta2}")
    if params.eps <= 0 or params.weight_decay < 0 or params.grad_clip_norm < 0:
        raise InvalidRequestError("adam_params: eps must be > 0, weight_decay and grad_clip_norm >= 0")
    adam = ops.AdamParams(**params.model_dump())
    return OptimStep(run_id=validate_run_id(request.model_id), adam=adam)


def _ttl(value: int | None) -> int | None:
    if value is not None and not 1 <= value <= MAX_TTL_SECONDS:
        raise InvalidRequestError(f"ttl_seconds must be between 1 and {MAX_TTL_SECONDS} (10 years), got {value}")
    return value


def save_weights(request: schemas.SaveWeightsRequest) -> SaveWeights:
    # save_state always names its checkpoint; a nameless request gets one from its place in the run's sequence.
    name = request.path if request.path else f"seq-{request.seq_id or 0}"
    return SaveWeights(
        run_id=validate_run_id(request.model_id),
        kind="weights",
        name=validate_checkpoint_name(name),
        ttl_seconds=_ttl(request.ttl_seconds),
        overwrite=bool(request.overwrite),
        user_metadata=_metadata(request.user_metadata),
    )


def save_sampler_weights(request: schemas.SaveWeightsForSamplerRequest) -> SaveWeights:
    assert request.path
    return SaveWeights(
        run_id=validate_run_id(request.model_id),
        kind="sampler_weights",
        name=validate_checkpoint_name(request.path),
        ttl_seconds=_ttl(request.ttl_seconds),
        # The SDK cannot ask for overwrite here, and re-saving a sampler under the same name (e.g. "final") is common.
        overwrite=True,
        user_metadata=_metadata(request.user_metadata),
    )


def save_external_weights(request: schemas.SaveWeightsExternalRequest) -> SaveWeights:
    """save_weights_external: the run's adapter as a PEFT directory under external_weights/, to be downloaded."""
    if request.age_encryption_recipients:
        raise InvalidRequestError(
            "age_encryption_recipients is not supported: tinkerd stores exports unencrypted on its own disk; "
            "save without it"
        )
    return SaveWeights(
        run_id=validate_run_id(request.model_id),
        kind="external_weights",
        name=validate_checkpoint_name(request.path),
        ttl_seconds=_ttl(request.ttl_seconds),
        # An export is read file by file while it downloads: replacing it under a reader would mix two versions.
        overwrite=False,
    )


def snapshot_sampler(
    request: schemas.SaveWeightsForSamplerRequest, run: TrainingRun, now: datetime
) -> tuple[Sampler, SnapshotForSampler]:
    """save_weights_and_get_sampling_client: a sampler pinned to the run's weights as of this request's seq_id."""
    assert request.sampling_session_seq_id is not None
    sampler = Sampler(
        id=sampler_id(run.session_id, request.sampling_session_seq_id),
        session_id=run.session_id,
        owner=run.owner,
        base_model=run.base_model,
        created_at=now,
        run_id=run.id,
        # The request's seq_id says which point of the run's history the snapshot holds.
        run_version=request.seq_id or 0,
    )
    return sampler, SnapshotForSampler(run_id=run.id, sampler_id=sampler.id)


def weights_path(value: str) -> TinkerPath:
    path = parse_tinker_path(value)
    if path.kind != "weights":
        raise InvalidRequestError(
            f"{value} is a sampler checkpoint; loading for training needs a tinker://<run>/weights/<name> path"
        )
    return path


def load_weights(request: schemas.LoadWeightsRequest, run_id: str) -> LoadWeights:
    return LoadWeights(run_id=run_id, path=str(weights_path(request.path)), with_optimizer=bool(request.optimizer))


def create_via_load(
    request: schemas.LoadWeightsRequest, source: TrainingRun, owner: str, now: datetime
) -> tuple[TrainingRun, LoadWeights]:
    """create_training_client_from_state: a new run `<session>:train:<model_seq_id>` shaped like the checkpoint's."""
    assert request.session_id is not None and request.model_seq_id is not None
    session_id = validate_session_id(request.session_id)
    run_id = training_run_id(session_id, request.model_seq_id)
    if request.base_model and request.base_model != source.base_model:
        raise InvalidRequestError(
            f"{request.path} was trained on {source.base_model!r}, not on the requested {request.base_model!r}"
        )
    metadata = _metadata(request.user_metadata)
    run = TrainingRun(
        id=run_id,
        session_id=session_id,
        owner=owner,
        base_model=source.base_model,
        created_at=now,
        last_request_at=now,
        lora=source.lora,
        optimizer_config=_check_optimizer(request.optimizer_config),
        user_metadata=metadata,
    )
    load = LoadWeights(
        run_id=run_id,
        path=str(weights_path(request.path)),
        with_optimizer=bool(request.optimizer),
        create_base_model=source.base_model,
        create=True,
        user_metadata=metadata,
    )
    return run, load
