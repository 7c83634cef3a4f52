"""Domain records <-> table rows, in one place. Repositories never build rows or records by hand."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from sqlalchemy import RowMapping

from tinkerd.domain.ops import LoraConfig
from tinkerd.domain.paths import validate_checkpoint_kind
from tinkerd.domain.records import (
    Checkpoint,
    ErrorCategory,
    FinishReason,
    FutureRecord,
    FutureState,
    RequestKind,
    Sampler,
    Session,
    SessionStatus,
    TrainingRun,
)

Row = RowMapping | Mapping[str, Any]  # a result row or a plain dict


def _json_object(value: Any) -> dict[str, Any]:
    # A fresh dict per record, so one caller mutating it cannot change what another reads.
    return dict(value) if isinstance(value, Mapping) else {}


def session_to_row(session: Session) -> dict[str, Any]:
    return {
        "id": session.id,
        "owner": session.owner,
        "sdk_version": session.sdk_version,
        "tags": list(session.tags),
        "user_metadata": dict(session.user_metadata),
        "display_name": session.display_name,
        "project_id": session.project_id,
        "status": session.status,
        "finish_reason": session.finish_reason,
        "status_detail": session.status_detail,
        "created_at": session.created_at,
        "last_heartbeat_at": session.last_heartbeat_at,
        "closed_at": session.closed_at,
    }


def session_from_row(row: Row) -> Session:
    return Session(
        id=row["id"],
        owner=row["owner"],
        sdk_version=row["sdk_version"],
        tags=tuple(str(tag) for tag in row["tags"] or ()),
        user_metadata=_json_object(row["user_metadata"]),
        display_name=row["display_name"],
        project_id=row["project_id"],
        status=cast(SessionStatus, row["status"]),
        finish_reason=cast(FinishReason | None, row["finish_reason"]),
        status_detail=row["status_detail"],
        created_at=row["created_at"],
        last_heartbeat_at=row["last_heartbeat_at"],
        closed_at=row["closed_at"],
    )


def run_to_row(run: TrainingRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "session_id": run.session_id,
        "owner": run.owner,
        "base_model": run.base_model,
        "is_lora": run.is_lora,
        "lora_rank": run.lora.rank,
        "lora_alpha": run.lora.alpha,
        "lora_seed": run.lora.seed,
        "train_attn": run.lora.train_attn,
        "train_mlp": run.lora.train_mlp,
        "train_unembed": run.lora.train_unembed,
        "optimizer_config": dict(run.optimizer_config),
        "user_metadata": dict(run.user_metadata),
        "corrupted": run.corrupted,
        "created_at": run.created_at,
        "last_request_at": run.last_request_at,
    }


def run_from_row(row: Row) -> TrainingRun:
    return TrainingRun(
        id=row["id"],
        session_id=row["session_id"],
        owner=row["owner"],
        base_model=row["base_model"],
        is_lora=bool(row["is_lora"]),
        lora=LoraConfig(
            rank=int(row["lora_rank"]),
            alpha=float(row["lora_alpha"]),
            seed=row["lora_seed"],
            train_attn=bool(row["train_attn"]),
            train_mlp=bool(row["train_mlp"]),
            train_unembed=bool(row["train_unembed"]),
        ),
        optimizer_config=_json_object(row["optimizer_config"]),
        user_metadata=_json_object(row["user_metadata"]),
        corrupted=bool(row["corrupted"]),
        created_at=row["created_at"],
        last_request_at=row["last_request_at"],
    )


def checkpoint_to_row(checkpoint: Checkpoint) -> dict[str, Any]:
    return {
        "run_id": checkpoint.run_id,
        "kind": checkpoint.kind,
        "name": checkpoint.name,
        "owner": checkpoint.owner,
        "size_bytes": checkpoint.size_bytes,
        "public": checkpoint.public,
        "user_metadata": dict(checkpoint.user_metadata),
        "created_at": checkpoint.created_at,
        "expires_at": checkpoint.expires_at,
    }


def checkpoint_from_row(row: Row) -> Checkpoint:
    return Checkpoint(
        run_id=row["run_id"],
        kind=validate_checkpoint_kind(row["kind"]),
        name=row["name"],
        owner=row["owner"],
        size_bytes=row["size_bytes"],
        public=bool(row["public"]),
        user_metadata=_json_object(row["user_metadata"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
    )


def sampler_to_row(sampler: Sampler) -> dict[str, Any]:
    return {
        "id": sampler.id,
        "session_id": sampler.session_id,
        "owner": sampler.owner,
        "base_model": sampler.base_model,
        "model_path": sampler.model_path,
        "run_id": sampler.run_id,
        "run_version": sampler.run_version,
        "created_at": sampler.created_at,
    }


def sampler_from_row(row: Row) -> Sampler:
    return Sampler(
        id=row["id"],
        session_id=row["session_id"],
        owner=row["owner"],
        base_model=row["base_model"],
        model_path=row["model_path"],
        run_id=row["run_id"],
        run_version=row["run_version"],
        created_at=row["created_at"],
    )


def future_to_row(future: FutureRecord) -> dict[str, Any]:
    return {
        "request_id": future.request_id,
        "owner": future.owner,
        "model_id": future.model_id,
        "seq_id": future.seq_id,
        "kind": future.kind.value,
        "ordered": future.ordered,
        "state": future.state.value,
        "payload": future.payload,
        "result": future.result,
        "error_message": future.error_message,
        "error_category": future.error_category,
        "token_count": future.token_count,
        "claimed_by": future.claimed_by,
        "delivered_count": future.delivered_count,
        "created_at": future.created_at,
        "started_at": future.started_at,
        "finished_at": future.finished_at,
        "delivered_at": future.delivered_at,
    }


def future_from_row(row: Row) -> FutureRecord:
    """A ledger row as a record; `payload` is None when the query did not select it."""
    return FutureRecord(
        request_id=row["request_id"],
        owner=row["owner"],
        model_id=row["model_id"],
        seq_id=row["seq_id"],
        kind=RequestKind(row["kind"]),
        ordered=bool(row["ordered"]),
        state=FutureState(row["state"]),
        payload=row.get("payload"),
        result=row["result"],
        error_message=row["error_message"],
        error_category=cast(ErrorCategory | None, row["error_category"]),
        token_count=int(row["token_count"]),
        claimed_by=row["claimed_by"],
        delivered_count=int(row["delivered_count"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        delivered_at=row["delivered_at"],
    )
