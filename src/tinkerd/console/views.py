"""Records as the console's JSON: plain dicts of what a page shows. User strings are passed as data; the pages put
them into the document as text, never as markup."""

from __future__ import annotations

from typing import Any

from tinkerd.domain import curves
from tinkerd.domain.records import Checkpoint, Session, StepMetrics, TrainingRun
from tinkerd.store.overview import QueueDepth


def run_state(run: TrainingRun, session_status: str | None, queued: int) -> str:
    """What a person wants to know first: is it broken, busy, open for more work, or over."""
    if run.corrupted:
        return "corrupted"
    if queued:
        return "training"
    return "idle" if session_status in (None, "active") else "closed"


def run_summary(run: TrainingRun, state: str, last: StepMetrics | None) -> dict[str, Any]:
    return {
        "id": run.id,
        "base_model": run.base_model,
        "lora_rank": run.lora.rank,
        "owner": run.owner,
        "state": state,
        "last_step": None if last is None else last.step,
        "last_loss": None if last is None else curves.loss_per_token(last),
        "created_at": run.created_at.isoformat(),
        "last_request_at": run.last_request_at.isoformat(),
        "user_metadata": run.user_metadata,
    }


def run_detail(run: TrainingRun, state: str, last: StepMetrics | None) -> dict[str, Any]:
    lora = run.lora
    return run_summary(run, state, last) | {
        "session_id": run.session_id,
        "is_lora": run.is_lora,
        "lora": {
            "rank": lora.rank,
            "alpha": lora.alpha,
            "seed": lora.seed,
            "train_attn": lora.train_attn,
            "train_mlp": lora.train_mlp,
            "train_unembed": lora.train_unembed,
        },
        "optimizer_config": run.optimizer_config,
        "corrupted": run.corrupted,
    }


def checkpoint(c: Checkpoint) -> dict[str, Any]:
    return {
        "tinker_path": c.tinker_path,
        "run_id": c.run_id,
        "kind": c.kind,
        "name": c.name,
        "size_bytes": c.size_bytes,
        "public": c.public,
        "created_at": c.created_at.isoformat(),
        "expires_at": None if c.expires_at is None else c.expires_at.isoformat(),
        "user_metadata": c.user_metadata,
    }


def session(s: Session, run_ids: list[str], samplers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": s.id,
        "status": s.status,
        "sdk_version": s.sdk_version,
        "tags": list(s.tags),
        "user_metadata": s.user_metadata,
        "display_name": s.display_name,
        "created_at": s.created_at.isoformat(),
        "last_heartbeat_at": s.last_heartbeat_at.isoformat(),
        "closed_at": None if s.closed_at is None else s.closed_at.isoformat(),
        "runs": run_ids,
        "samplers": samplers,
    }


def queue(depths: list[QueueDepth]) -> list[dict[str, Any]]:
    return [{"model_id": d.model_id, "pending": d.pending, "running": d.running} for d in depths]
