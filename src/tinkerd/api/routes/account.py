"""Who the caller is and what they store: what `tinker auth login` and `tinker billing checkpoint-storage` ask.

tinkerd keeps no organisations, e-mail addresses or prices, so these answers hold only what it knows: the owner a
key maps to, and the checkpoints that owner stores. What it does not record at all (billing usage, session traces)
answers 404 saying so, rather than empty data that would read as "nothing happened".
"""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from tinkerd.api import rest_schemas
from tinkerd.api.auth import API_KEY_HEADER
from tinkerd.api.routes.common import Context, Owner, json_response
from tinkerd.domain.errors import InvalidRequestError, NotFoundError

router = APIRouter()

ORG_NAME = "tinkerd"
_GIGABYTE = 10**9


@router.get("/auth/apikey/me")
def api_key_me(request: Request, owner: Owner) -> Response:
    """The calling key's public facts (401 for a key this server does not know). The id is derived from the key's
    digest, so it is stable for a key and reveals nothing of it; the "e-mail" is the owner's user name."""
    digest = hashlib.sha256(request.headers.get(API_KEY_HEADER, "").encode("utf-8")).digest()
    key_id = int.from_bytes(digest[:6], "big")
    details = rest_schemas.ApiKeyDetails(
        org_details=rest_schemas.ApiKeyOrgDetails(name=ORG_NAME),
        user_details=rest_schemas.ApiKeyUserDetails(email=owner),
    )
    return json_response(
        rest_schemas.SelfApiKeyResponse(key_id=key_id, name=f"tinkerd key of {owner}", note="", details=details)
    )


@router.get("/billing/usage/checkpoints/current")
def checkpoint_storage(ctx: Context, owner: Owner, project_id: Annotated[str | None, Query()] = None) -> Response:
    """The caller's checkpoint count and bytes, as one row; no costs (tinkerd has no prices)."""
    if project_id is not None:
        raise InvalidRequestError("tinkerd does not group checkpoint storage by project; ask without project_id")
    count, size = ctx.store.checkpoints.storage_usage(owner)
    row = rest_schemas.CheckpointStorageRow(
        org_user_urn=owner, user_name=owner, checkpoint_count=count, size_bytes=size, size_gigabytes=size / _GIGABYTE
    )
    return json_response(rest_schemas.CurrentCheckpointStorageUsageResponse(data=[row] if count else []))


@router.get("/billing/usage/events")
def billing_usage(_owner: Owner) -> Response:
    raise NotFoundError(
        "tinkerd records no billing usage (it has no prices); `tinker billing checkpoint-storage` shows what you store"
    )


@router.get("/sessions/{session_id}/trace_export")
def session_trace_export(session_id: str, _owner: Owner) -> Response:
    raise NotFoundError(f"tinkerd records no session traces, so session {session_id!r} has none to export")
