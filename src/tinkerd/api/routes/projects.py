"""Projects: copying weights into one (``copy_weights``), moving a session into one (``assign_session_project``),
and searching sessions (``search_sessions``), with the semantics the SDK's docstrings give.

tinkerd has no project administration: a project is a label on a session (and so on its runs and samplers), set
when the session is created or by ``assign_session_project``. Every user may use any project name; a session
without one is in ``default``. Sessions are private to their owner, so "accessible" sessions are one's own.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import timedelta

from fastapi import APIRouter, Response

from tinkerd.api import rest_schemas
from tinkerd.api.context import ApiContext
from tinkerd.api.routes.common import Context, Owner, in_thread, json_response
from tinkerd.domain.errors import ConflictError, InvalidRequestError
from tinkerd.domain.ids import new_session_id, training_run_id, validate_session_id
from tinkerd.domain.paths import TinkerPath, parse_tinker_path
from tinkerd.domain.records import Checkpoint, Session, TrainingRun, utc_now

router = APIRouter()

DEFAULT_PROJECT = "default"
MIN_COPY_TTL_S = 3600  # the SDK's documented range: 1 hour to 10 years
MAX_COPY_TTL_S = 10 * 365 * 24 * 3600


# -- copy_weights ------------------------------------------------------------------------------------------------------


def _link_tree(source: TinkerPath, dest: TinkerPath, ctx: ApiContext) -> int:
    """The source checkpoint's files under the copy's directory, hard-linked (no bytes duplicated; a copy where the
    file system cannot link). Built aside and renamed into place, so the copy appears whole or not at all."""
    files, _ = ctx.downloads()
    stored = files.list_files(source)
    target = files.write_dir(dest)
    if target.exists():
        raise ConflictError(f"checkpoint {dest} already exists")
    staging = target.with_name(f".{target.name}.copying-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for item in stored:
            origin, copy = files.file_of(source, item.relpath), staging / item.relpath
            copy.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(origin, copy)
            except OSError:
                shutil.copy2(origin, copy)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files.published(dest)
    return sum(item.size_bytes for item in stored)


def _copy(ctx: ApiContext, owner: str, body: rest_schemas.CopyWeightsRequest) -> str:
    source = parse_tinker_path(body.source_path)
    ctx.store.checkpoints.get(source, owner)  # 404 unless the caller may read it
    source_run = ctx.store.runs.get(source.run_id, owner, accessible=True)
    if body.ttl_seconds is not None and not MIN_COPY_TTL_S <= body.ttl_seconds <= MAX_COPY_TTL_S:
        raise InvalidRequestError(f"ttl_seconds must be between 3600 (1 hour) and 10 years, got {body.ttl_seconds}")
    now = utc_now()
    if body.session_id is not None:
        if body.model_seq_id is None:
            raise InvalidRequestError("copy_weights with a session_id needs its model_seq_id too")
        session = ctx.store.sessions.get(validate_session_id(body.session_id), owner)
        run_id = training_run_id(session.id, body.model_seq_id)
    elif body.destination_project_id:
        session = ctx.store.sessions.create(
            Session(id=new_session_id(), owner=owner, created_at=now, last_heartbeat_at=now,
                    sdk_version="copy_weights", project_id=body.destination_project_id)
        )  # fmt: skip
        run_id = training_run_id(session.id, 0)
    else:
        raise InvalidRequestError("copy_weights needs a destination_project_id, or a session_id and model_seq_id")
    # A run that only holds the copy: nothing loads it into a trainer, so it cannot be trained on.
    run = TrainingRun(
        id=run_id, session_id=session.id, owner=owner, base_model=source_run.base_model, created_at=now,
        last_request_at=now, lora=source_run.lora, user_metadata={"copied_from": str(source)},
    )  # fmt: skip
    ctx.store.runs.create(run)
    dest = TinkerPath(run.id, source.kind, source.name)
    size = _link_tree(source, dest, ctx)
    expires_at = None if body.ttl_seconds is None else now + timedelta(seconds=body.ttl_seconds)
    try:
        ctx.store.checkpoints.add(Checkpoint(run.id, dest.kind, dest.name, owner, now, size, expires_at))
    except Exception:
        files, _ = ctx.downloads()
        files.delete(dest)
        raise
    return str(dest)


@router.post("/copy_weights")
async def copy_weights(body: rest_schemas.CopyWeightsRequest, ctx: Context, owner: Owner) -> Response:
    path = await in_thread(_copy, ctx, owner, body)
    return json_response(rest_schemas.CopyWeightsResponse(tinker_path=path))


# -- session projects --------------------------------------------------------------------------------------------------


@router.put("/sessions/{session_id}/project")
def assign_session_project(
    session_id: str, body: rest_schemas.AssignProjectRequest, ctx: Context, owner: Owner
) -> Response:
    if not body.project_id:
        raise InvalidRequestError("project_id is required (sessions cannot be moved out of a project)")
    ctx.store.sessions.set_project(validate_session_id(session_id), owner, body.project_id)
    return Response("{}", media_type="application/json")


# -- search_sessions ---------------------------------------------------------------------------------------------------


def _status(session: Session) -> dict[str, object]:
    if session.status == "active":
        return {"type": "active"}
    if session.status == "finished":
        return {"type": "client_finished", "reason": {"type": session.finish_reason or "success"}}
    return {"type": "cancelled", "detail": session.status_detail}  # timed out: no heartbeat for too long


def _status_matches(session: Session, queries: list[rest_schemas.StatusQuery] | None) -> bool:
    if queries is None:
        return True
    status = _status(session)
    for query in queries:
        if query.type != status["type"]:
            continue
        reasons = query.reasons if query.type == "client_finished" else None
        if reasons is not None and (session.finish_reason or "success") not in reasons:
            continue
        return True
    return False


def _matches(session: Session, request: rest_schemas.SessionSearchRequest) -> bool:
    by_id = request.session_id is not None and session.id == request.session_id
    if request.display_name is not None:
        name = (session.display_name or "").lower()
        by_name = all(word in name for word in request.display_name.lower().split())
        if not (by_id or by_name):
            return False
    elif request.session_id is not None and not by_id:
        return False
    project = session.project_id or DEFAULT_PROJECT
    if request.project_ids is not None and project not in request.project_ids:
        return False
    metadata = {k: str(v) for k, v in session.user_metadata.items()}
    if any(metadata.get(k) != v for k, v in request.user_metadata.items()):
        return False
    return _status_matches(session, request.statuses)


def _owner_included(request: rest_schemas.SessionSearchRequest, owner: str) -> bool:
    if request.owner.type != "user":
        return True  # "own", and "accessible" (only one's own sessions are accessible here)
    return any(urn == owner or urn.rsplit(":", 1)[-1] == owner for urn in request.owner.owner_urns or ())


def _summary(ctx: ApiContext, session: Session, owner: str) -> rest_schemas.SessionSummary:
    count, size = 0, 0
    for run_id in ctx.store.runs.ids_for_session(session.id, owner):
        for checkpoint in ctx.store.checkpoints.list_for_run(run_id, owner, limit=1000).items:
            count += 1
            size += checkpoint.size_bytes or 0
    return rest_schemas.SessionSummary(
        session_id=session.id, created_at=session.created_at, owner=owner,
        project_id=session.project_id or DEFAULT_PROJECT, status=_status(session), checkpoints_count=count,
        display_name=session.display_name, user_metadata={k: str(v) for k, v in session.user_metadata.items()},
        checkpoint_storage_bytes=size,
    )  # fmt: skip


def _search(
    ctx: ApiContext, owner: str, request: rest_schemas.SessionSearchRequest
) -> rest_schemas.SessionSearchResponse:
    if not _owner_included(request, owner):
        return rest_schemas.SessionSearchResponse(sessions=[])
    before = None if request.cursor is None else (request.cursor.last_created_at, request.cursor.last_session_id)
    found: list[Session] = []
    more = False
    candidates: Iterator[Session] = ctx.store.sessions.newest_first(owner, before=before)
    for session in candidates:
        if not _matches(session, request):
            continue
        if len(found) == request.limit:
            more = True
            break
        found.append(session)
    cursor = None
    if more:
        cursor = rest_schemas.SessionSearchCursor(last_created_at=found[-1].created_at, last_session_id=found[-1].id)
    return rest_schemas.SessionSearchResponse(sessions=[_summary(ctx, s, owner) for s in found], next_cursor=cursor)


@router.post("/sessions/search")
async def search_sessions(body: rest_schemas.SessionSearchRequest, ctx: Context, owner: Owner) -> Response:
    return json_response(await in_thread(_search, ctx, owner, body))
