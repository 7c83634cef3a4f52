"""The RestClient's views: training runs, checkpoints (list, weights_info, publish, TTL, delete). Reads are
owner-scoped; ``access_scope=accessible`` also shows runs with a published checkpoint. Downloads are in ``downloads``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response

from tinkerd.api import rest_schemas
from tinkerd.api.context import ApiContext
from tinkerd.api.convert import requests as convert
from tinkerd.api.convert import results
from tinkerd.api.routes.common import Context, Owner, json_response
from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ids import validate_run_id
from tinkerd.domain.paths import TinkerPath, parse_checkpoint_id, parse_tinker_path
from tinkerd.domain.records import TrainingRun, utc_now

router = APIRouter()

AccessScope = Annotated[Literal["owned", "accessible"], Query()]
Limit = Annotated[int, Query()]
Offset = Annotated[int, Query()]


def _run_to_wire(ctx: ApiContext, run: TrainingRun, owner: str) -> rest_schemas.TrainingRun:
    return results.training_run_to_wire(
        run,
        ctx.store.checkpoints.latest(run.id, owner, "weights"),
        ctx.store.checkpoints.latest(run.id, owner, "sampler_weights"),
    )


@router.get("/training_runs")
def list_training_runs(
    ctx: Context, owner: Owner, limit: Limit = 20, offset: Offset = 0, access_scope: AccessScope = "owned"
) -> Response:
    page = ctx.store.runs.list_for_owner(owner, limit=limit, offset=offset, accessible=access_scope == "accessible")
    return json_response(
        rest_schemas.TrainingRunsResponse(
            training_runs=[_run_to_wire(ctx, run, owner) for run in page.items],
            cursor=rest_schemas.Cursor(offset=page.offset, limit=page.limit, total_count=page.total_count),
        )
    )


@router.get("/training_runs/{run_id}")
def get_training_run(run_id: str, ctx: Context, owner: Owner, access_scope: AccessScope = "owned") -> Response:
    run = ctx.store.runs.get(validate_run_id(run_id), owner, accessible=access_scope == "accessible")
    return json_response(_run_to_wire(ctx, run, owner))


def _checkpoints_response(page_items: list[rest_schemas.Checkpoint], offset: int, limit: int, total: int) -> Response:
    cursor = rest_schemas.Cursor(offset=offset, limit=limit, total_count=total)
    return json_response(rest_schemas.CheckpointsListResponse(checkpoints=page_items, cursor=cursor))


@router.get("/training_runs/{run_id}/checkpoints")
def list_run_checkpoints(run_id: str, ctx: Context, owner: Owner, limit: Limit = 1000, offset: Offset = 0) -> Response:
    page = ctx.store.checkpoints.list_for_run(validate_run_id(run_id), owner, limit=limit, offset=offset)
    items = [results.checkpoint_to_wire(c) for c in page.items]
    return _checkpoints_response(items, page.offset, page.limit, page.total_count)


@router.get("/checkpoints")
def list_user_checkpoints(ctx: Context, owner: Owner, limit: Limit = 100, offset: Offset = 0) -> Response:
    page = ctx.store.checkpoints.list_for_owner(owner, limit=limit, offset=offset)
    items = [results.checkpoint_to_wire(c) for c in page.items]
    return _checkpoints_response(items, page.offset, page.limit, page.total_count)


@router.post("/weights_info")
def weights_info(body: rest_schemas.WeightsInfoRequest, ctx: Context, owner: Owner) -> Response:
    checkpoint = ctx.store.checkpoints.get(parse_tinker_path(body.tinker_path), owner)
    run = ctx.store.runs.get(checkpoint.run_id, owner, accessible=True)
    return json_response(results.weights_info(run))


def checkpoint_path(run_id: str, kind: str, name: str) -> TinkerPath:
    # The SDK puts the two-segment checkpoint id ("weights/<name>") into the URL verbatim.
    checkpoint_kind, checkpoint_name = parse_checkpoint_id(f"{kind}/{name}")
    return TinkerPath(validate_run_id(run_id), checkpoint_kind, checkpoint_name)


@router.post("/training_runs/{run_id}/checkpoints/{kind}/{name}/publish")
def publish_checkpoint(run_id: str, kind: str, name: str, ctx: Context, owner: Owner) -> Response:
    ctx.store.checkpoints.set_public(checkpoint_path(run_id, kind, name), owner, True)
    return Response("{}", media_type="application/json")


@router.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}/publish")
def unpublish_checkpoint(run_id: str, kind: str, name: str, ctx: Context, owner: Owner) -> Response:
    ctx.store.checkpoints.set_public(checkpoint_path(run_id, kind, name), owner, False)
    return Response("{}", media_type="application/json")


@router.put("/training_runs/{run_id}/checkpoints/{kind}/{name}/ttl")
def set_checkpoint_ttl(
    run_id: str, kind: str, name: str, body: rest_schemas.SetTtlRequest, ctx: Context, owner: Owner
) -> Response:
    ttl = body.ttl_seconds
    if ttl is not None and not 1 <= ttl <= convert.MAX_TTL_SECONDS:
        raise InvalidRequestError(f"ttl_seconds must be between 1 and {convert.MAX_TTL_SECONDS}, got {ttl}")
    expires_at = None if ttl is None else utc_now() + timedelta(seconds=ttl)
    ctx.store.checkpoints.set_expiry(checkpoint_path(run_id, kind, name), owner, expires_at)
    return Response("{}", media_type="application/json")


@router.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}")
def delete_checkpoint(run_id: str, kind: str, name: str, ctx: Context, owner: Owner) -> Response:
    """Owner only. The row goes first, in one transaction: from then on nothing lists, loads, samples or downloads
    the checkpoint (every reader checks the row first). The files go next, moved aside in one rename and then
    removed: a load that checked the row just before fails as a user error naming the missing file (never a server
    error, never a mix of two checkpoints' files), and a download already streaming a file finishes it. A sampler
    holding the weights in memory stops at its next request, which re-checks the row."""
    path = checkpoint_path(run_id, kind, name)
    ctx.store.checkpoints.delete(path, owner)
    if ctx.files is not None:
        ctx.files.delete(path, prune=False)  # the worker may be making this run's directories for a save
    return Response("{}", media_type="application/json")
