"""The console's JSON API under /console/api: reads over the store for the pages, scoped to the caller's key
exactly as the Tinker API is (same header, same owner). Changes (publish, TTL, delete) and sampling are not here:
the pages call the Tinker API for those."""

from __future__ import annotations

import importlib.metadata
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from tinkerd.api.auth import owner as owner_of_key
from tinkerd.api.context import ApiContext
from tinkerd.console import views
from tinkerd.console.memory import machine_memory, process_memory
from tinkerd.console.tokens import Tokenizers
from tinkerd.domain.ids import validate_run_id

router = APIRouter()
Owner = Annotated[str, Depends(owner_of_key)]
_STARTED = time.time()
MAX_RUNS = 500


def _ctx(request: Request) -> ApiContext:
    return request.app.state.ctx


def _tokenizers(request: Request) -> Tokenizers:
    state = request.app.state
    if not hasattr(state, "console_tokenizers"):
        state.console_tokenizers = Tokenizers(state.console.tokenizer_dirs)
    return state.console_tokenizers


Ctx = Annotated[ApiContext, Depends(_ctx)]


@router.get("/me")
def me(request: Request, ctx: Ctx, owner: Owner) -> dict[str, Any]:
    return {"owner": owner, "single_user": request.app.state.keys.single_user, "models": sorted(ctx.models)}


@router.get("/runs")
def runs(ctx: Ctx, owner: Owner, limit: Annotated[int, Query(ge=1, le=MAX_RUNS)] = 200) -> dict[str, Any]:
    """The caller's runs, newest first, with state, last step and last loss (filtering is the page's)."""
    page = ctx.store.runs.list_for_owner(owner, limit=limit)
    ids = [run.id for run in page.items]
    last = ctx.store.metrics.last_losses(ids, owner)
    status = ctx.store.overview.session_status_of_runs(ids, owner)
    queued = {d.model_id: d.pending + d.running for d in ctx.store.overview.queue_depths(owner)}
    items = [
        views.run_summary(run, views.run_state(run, status.get(run.id), queued.get(run.id, 0)), last.get(run.id))
        for run in page.items
    ]
    return {"runs": items, "total_count": page.total_count}


@router.get("/runs/{run_id}")
def run(run_id: str, ctx: Ctx, owner: Owner) -> dict[str, Any]:
    found = ctx.store.runs.get(validate_run_id(run_id), owner)  # 404 for anyone else's
    last = ctx.store.metrics.last_losses([found.id], owner).get(found.id)
    status = ctx.store.overview.session_status_of_runs([found.id], owner).get(found.id)
    queued = {d.model_id: d for d in ctx.store.overview.queue_depths(owner)}.get(found.id)
    depth = 0 if queued is None else queued.pending + queued.running
    checkpoints = ctx.store.checkpoints.list_for_run(found.id, owner, limit=1000)
    return {
        "run": views.run_detail(found, views.run_state(found, status, depth), last),
        "checkpoints": [views.checkpoint(c) for c in checkpoints.items],
        "queued": depth,
    }


@router.get("/sessions")
def sessions(ctx: Ctx, owner: Owner, limit: Annotated[int, Query(ge=1, le=MAX_RUNS)] = 100) -> dict[str, Any]:
    page = ctx.store.sessions.list_for_owner(owner, limit=limit)
    items = []
    for s in page.items:
        samplers = []
        for sampler_id in ctx.store.samplers.ids_for_session(s.id, owner):
            sampler = ctx.store.samplers.get(sampler_id, owner)
            samplers.append({"id": sampler.id, "base_model": sampler.base_model, "model_path": sampler.model_path})
        items.append(views.session(s, ctx.store.runs.ids_for_session(s.id, owner), samplers))
    return {"sessions": items, "total_count": page.total_count}


@router.get("/samplables")
def samplables(ctx: Ctx, owner: Owner) -> dict[str, Any]:
    """What the playground can sample: each served base model, then every sampler checkpoint the caller may read
    (their own, and the ones other users published), newest first."""
    models = [
        {"base_model": m.name, "model_path": None, "label": m.name, "owner": None, "mine": True, "public": False}
        for m in ctx.models.values()
        if m.sampleable
    ]
    served = {m.name for m in ctx.models.values() if m.sampleable}
    for c, base_model in ctx.store.checkpoints.readable_with_base(owner, "sampler_weights", limit=MAX_RUNS):
        if base_model not in served:
            continue  # its base model is not served here now: creating a sampler from it would fail
        models.append(
            {"base_model": base_model, "model_path": c.tinker_path, "label": c.tinker_path, "owner": c.owner,
             "mine": c.owner == owner, "public": c.public}
        )  # fmt: skip
    return {"models": models}


@router.get("/server")
def server(request: Request, ctx: Ctx, owner: Owner) -> dict[str, Any]:
    roles = request.app.state.console.roles
    return {
        "version": importlib.metadata.version("tinkerd"),
        "uptime_s": round(time.time() - _STARTED, 1),
        "models": [
            {
                "name": m.name,
                "arch": m.arch,
                "vocab_size": m.vocab_size,
                "max_context_length": m.max_context_length,
                "trainable": m.trainable,
                "sampleable": m.sampleable,
            }
            for m in ctx.models.values()
        ],
        "queue": views.queue(ctx.store.overview.queue_depths(owner)),
        "queue_total": views.queue([ctx.store.overview.queue_totals()])[0],
        "roles": roles() if roles is not None else [],
        "memory": process_memory() | machine_memory(),
        "limits": {
            "max_queued_per_user": ctx.settings.max_queued_per_user,
            "max_runs_per_user": ctx.settings.max_runs_per_user,
        },
    }


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class TokenizeRequest(BaseModel):
    model: str = Field(description="A served base model's name")
    text: str | None = None
    messages: list[Message] | None = None


class DetokenizeRequest(BaseModel):
    model: str
    tokens: list[int] = Field(max_length=100_000)


@router.post("/tokenize")
def tokenize(body: TokenizeRequest, request: Request, ctx: Ctx, _owner: Owner) -> dict[str, Any]:
    ctx.model(body.model)  # 404 naming the served models
    tokenizers = _tokenizers(request)
    if body.messages is not None:
        tokens = tokenizers.encode_chat(body.model, [m.model_dump() for m in body.messages])
    else:
        tokens = tokenizers.encode_text(body.model, body.text or "")
    return {"tokens": tokens, "pieces": tokenizers.pieces(body.model, tokens)}


@router.post("/detokenize")
def detokenize(body: DetokenizeRequest, request: Request, ctx: Ctx, _owner: Owner) -> dict[str, Any]:
    ctx.model(body.model)
    return {"pieces": _tokenizers(request).pieces(body.model, body.tokens)}
