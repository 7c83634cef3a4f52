"""Records as the console's JSON: plain dicts of what a page shows. User strings are passed as data; the pages put
them into the document as text, never as markup."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from tinkerd.console.memory import process_memory
from tinkerd.domain import curves
from tinkerd.domain.records import Checkpoint, Session, StepMetrics, TrainingRun
from tinkerd.store.overview import QueueDepth
from tinkerd.store.workers import WorkerInfo


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
        "owner": c.owner,
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


def worker(info: WorkerInfo, now: datetime, memory: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A process of the deployment as the ledger knows it (its lease, its last heartbeat, the runs it holds), with
    the memory its health endpoint reported, when it answered."""
    live = info.stopped_at is None and info.lease_expires_at > now
    return {
        "role": info.role,
        "id": info.id,
        "host": info.host,
        "pid": info.pid,
        "state": "live" if live else "gone",
        "models": sorted(info.base_models),
        "runs": info.runs if info.role == "trainer" else None,
        "capacity": info.capacity if info.role == "trainer" else None,
        "started_at": info.started_at.isoformat(),
        "heartbeat_at": info.heartbeat_at.isoformat(),
        "heartbeat_age_s": round((now - info.heartbeat_at).total_seconds(), 1),
        "lease_left_s": round((info.lease_expires_at - now).total_seconds(), 1) if live else None,
        "rss_bytes": None if memory is None else memory.get("rss_bytes"),
        "health_url": info.health_url,
    }


def in_process(role: str, id: str, detail: str, models: list[str], started_at: datetime) -> dict[str, Any]:
    """A role played inside this process (``tinkerd serve``): no lease to keep, no heartbeat; the memory is this
    process's."""
    return {
        "role": role,
        "id": id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "state": "in process",
        "detail": detail,
        "models": models,
        "runs": None,
        "capacity": None,
        "started_at": started_at.isoformat(),
        "heartbeat_at": None,
        "heartbeat_age_s": None,
        "lease_left_s": None,
        "rss_bytes": process_memory()["rss_bytes"],
        "health_url": None,
    }
