"""Requests to endpoints tinkerd does not implement: a 404 naming the endpoint, and no stalled run.

A training-client request to such an endpoint (``save_weights_external`` today, whatever a newer SDK adds tomorrow)
carries the run's next seq_id. Were it merely refused, that seq_id would never reach the ledger and every later
request of the run would wait for it forever; so when the JSON body names one of the caller's runs and a seq_id, the
request is recorded as a failed request of that run. Registered last, for every method: every implemented route
matches first, and a known path asked with another method is a 404 naming the method too (not a bare 405).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response

from tinkerd.api.context import ApiContext
from tinkerd.api.errors import error_response
from tinkerd.api.routes.common import Context, Owner, fill_refused_seq, in_thread
from tinkerd.domain.errors import TinkerdError
from tinkerd.domain.ids import validate_run_id
from tinkerd.domain.records import RequestKind

router = APIRouter()

_KINDS = {kind.value: kind for kind in RequestKind}


def _sequenced_run_request(body: bytes) -> tuple[str, int] | None:
    """(model_id, seq_id) if the body is a JSON object naming both, else None."""
    try:
        parsed: Any = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        return None
    if not isinstance(parsed, dict):
        return None
    model_id, seq_id = parsed.get("model_id"), parsed.get("seq_id")
    if not isinstance(model_id, str) or not isinstance(seq_id, int) or isinstance(seq_id, bool):
        return None
    if not 0 <= seq_id < 2**63:  # no run has such a seq_id (and the database could not hold it)
        return None
    return model_id, seq_id


def _fill_seq(ctx: ApiContext, owner: str, endpoint: str, body: bytes, message: str) -> None:
    found = _sequenced_run_request(body)
    if found is None:
        return
    try:
        run = ctx.store.runs.get(validate_run_id(found[0]), owner)
    except TinkerdError:  # not a run of the caller's: nothing of theirs can stall
        return
    # The placeholder only fails; its kind is the endpoint's when that names one, else a sequenced stand-in.
    kind = _KINDS.get(endpoint.rsplit("/", 1)[-1], RequestKind.FORWARD_BACKWARD)
    if kind.sequenced:
        fill_refused_seq(ctx, owner, run.id, found[1], kind, message)


@router.api_route("/{endpoint:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def unsupported(endpoint: str, request: Request, ctx: Context, owner: Owner) -> Response:
    message = f"tinkerd does not implement {request.method} /api/v1/{endpoint}"
    if request.method == "POST":
        await in_thread(_fill_seq, ctx, owner, endpoint, await request.body(), message)
    return error_response(404, message)
