"""Helpers every route module shares: the context dependency, JSON responses, and submitting a future."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from typing import Annotated, TypeVar

import anyio.to_thread
from fastapi import Depends, Request, Response
from pydantic import BaseModel

from tinkerd.api import auth, schemas
from tinkerd.api.context import ApiContext
from tinkerd.domain import codec
from tinkerd.domain.errors import CapacityError, InvalidRequestError, LimitExceededError, TinkerdError
from tinkerd.domain.records import FutureRecord, RequestKind
from tinkerd.domain.requests import Request as DomainRequest

T = TypeVar("T")

JSON = "application/json"
PROTOBUF = "application/x-protobuf"


async def _context(request: Request) -> ApiContext:
    return request.app.state.ctx


async def _owner(request: Request) -> str:
    # async, so that it runs on the event loop: a sync dependency would cost a thread hop per request.
    return auth.owner(request)


Context = Annotated[ApiContext, Depends(_context)]
Owner = Annotated[str, Depends(_owner)]


def json_response(model: BaseModel, status_code: int = 200) -> Response:
    # Serialised by pydantic's Rust core; None fields are left out (every optional field of the SDK's response
    # models defaults to None, and older SDKs choke on some explicit nulls).
    return Response(model.model_dump_json(exclude_none=True), status_code=status_code, media_type=JSON)


async def in_thread(function: Callable[..., T], *args: object) -> T:
    """Run blocking work (the store, protobuf decoding) off the event loop."""
    return await anyio.to_thread.run_sync(partial(function, *args))


def admit(ctx: ApiContext, owner: str, model_id: str, seq_id: int | None, kind: RequestKind) -> None:
    """429 when the owner's queue is full (see store.admission for the requests that always pass)."""
    if not ctx.store.admission.admits(owner, model_id, seq_id, kind, ctx.settings.max_queued_per_user):
        raise _queue_full(ctx, owner)


def _queue_full(ctx: ApiContext, owner: str) -> CapacityError:
    return CapacityError(
        f"too much work queued: user {owner!r} has {ctx.settings.max_queued_per_user} unfinished requests, the "
        "server's limit (tinkerd serve --max-queued-per-user); retry once some have finished"
    )


def check_run_cap(ctx: ApiContext, owner: str) -> None:
    """Before a new training run: the owner's runs in open sessions must be under the cap."""
    cap = ctx.settings.max_runs_per_user
    if cap > 0 and ctx.store.admission.open_runs(owner) >= cap:
        raise LimitExceededError(
            f"user {owner!r} has {cap} training runs in open sessions, the server's limit "
            "(tinkerd serve --max-runs-per-user); end a session (ServiceClient) to free its runs, "
            "or wait for idle ones to time out"
        )


def submit(
    ctx: ApiContext,
    owner: str,
    *,
    model_id: str,
    seq_id: int | None,
    kind: RequestKind,
    payload: DomainRequest,
    token_count: int = 0,
    admitted: bool = False,
) -> FutureRecord:
    """Record a request in the ledger (429 if the owner's queue is full, unless ``admitted`` already)."""
    try:
        encoded = codec.encode(payload)
    except ValueError:  # NaN or infinity somewhere in the request (the ledger stores JSON, which has no spelling)
        message = "the request holds a NaN or infinite number; every number must be finite"
        if seq_id is not None and kind.sequenced:
            fill_refused_seq(ctx, owner, model_id, seq_id, kind, message)
        raise InvalidRequestError(message) from None
    record, created = ctx.store.futures.submit_or_find(
        owner=owner,
        model_id=model_id,
        seq_id=seq_id,
        kind=kind,
        payload=encoded,
        token_count=token_count,
        # The queue cap is checked inside the ledger's transaction: one transaction per submit.
        admit=None
        if admitted
        else ctx.store.admission.queue_check(
            owner, model_id, seq_id, kind, ctx.settings.max_queued_per_user, lambda: _queue_full(ctx, owner)
        ),
        claim_for=ctx.dispatch.claim_for,
    )
    if created:  # a repeat is not dispatched again: it is in the ledger, or running, already
        ctx.dispatch.submitted(record, payload)
    return record


def fill_refused_seq(ctx: ApiContext, owner: str, run_id: str, seq_id: int, kind: RequestKind, reason: str) -> None:
    """Record a request the API refused as a failed request of its run, so that its seq_id is not a gap.

    The SDK numbered the request before sending it and numbers the next one after it; the ledger runs a run's
    requests strictly in seq_id order, so a seq_id that never reaches the ledger would stall the run forever.
    Best effort: whatever goes wrong here, the caller reports the original refusal.
    """
    with contextlib.suppress(TinkerdError):
        # Failed from the start, in one transaction, so the worker never claims it.
        ctx.store.admission.record_refused(
            owner=owner, model_id=run_id, seq_id=seq_id, kind=kind, message=f"refused at submit: {reason}"
        )


def future_response(future: schemas.UntypedAPIFuture) -> Response:
    return json_response(future)
