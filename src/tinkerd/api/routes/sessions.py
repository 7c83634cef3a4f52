"""Client sessions: create, heartbeat (410 once closed, which stops the SDK's loop), finish, and the REST views."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from tinkerd.api import rest_schemas, schemas
from tinkerd.api.convert import requests as convert
from tinkerd.api.errors import error_response
from tinkerd.api.routes.common import Context, Owner, json_response
from tinkerd.domain.ids import new_session_id, validate_session_id
from tinkerd.domain.records import utc_now

router = APIRouter()


@router.post("/create_session")
def create_session(body: schemas.CreateSessionRequest, ctx: Context, owner: Owner) -> Response:
    session = ctx.store.sessions.create(convert.new_session(body, new_session_id(), owner, utc_now()))
    return json_response(schemas.CreateSessionResponse(session_id=session.id))


@router.post("/session_heartbeat")
def session_heartbeat(body: schemas.SessionHeartbeatRequest, ctx: Context, owner: Owner) -> Response:
    session = ctx.store.sessions.heartbeat(validate_session_id(body.session_id), owner)
    if session.closed:
        return error_response(410, f"session {session.id} is {session.status.replace('_', ' ')}")
    return Response('{"type":"session_heartbeat"}', media_type="application/json")


@router.post("/sessions/{session_id}/finish")
def finish_session(session_id: str, body: schemas.FinishSessionRequest, ctx: Context, owner: Owner) -> Response:
    reason = body.reason.type if body.reason is not None else "success"
    ctx.store.sessions.finish(validate_session_id(session_id), owner, reason, body.detail)
    return Response("{}", media_type="application/json")


@router.get("/sessions/{session_id}")
def get_session(session_id: str, ctx: Context, owner: Owner) -> Response:
    session = ctx.store.sessions.get(validate_session_id(session_id), owner)
    return json_response(
        rest_schemas.GetSessionResponse(
            training_run_ids=ctx.store.runs.ids_for_session(session.id, owner),
            sampler_ids=ctx.store.samplers.ids_for_session(session.id, owner),
            user_metadata={k: str(v) for k, v in session.user_metadata.items()},
            display_name=session.display_name,
        )
    )


@router.get("/sessions")
def list_sessions(
    ctx: Context, owner: Owner, limit: Annotated[int, Query()] = 20, offset: Annotated[int, Query()] = 0
) -> Response:
    page = ctx.store.sessions.list_for_owner(owner, limit=limit, offset=offset)
    return json_response(rest_schemas.ListSessionsResponse(sessions=[session.id for session in page.items]))
