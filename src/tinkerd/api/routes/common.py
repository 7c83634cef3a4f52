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
from tinkerd.domain.errors import TinkerdError
from tinkerd.domain.records import FutureRecord, RequestKind
from tinkerd.domain.requests import Empty
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


def submit(
    ctx: ApiContext,
    owner: str,
    *,
    model_id: str,
    seq_id: int | None,
    kind: RequestKind,
    payload: DomainRequest,
    token_count: int = 0,
) -> FutureRecord:
    record = ctx.store.futures.submit(
        owner=owner,
        model_id=model_id,
        seq_id=seq_id,
        kind=kind,
        payload=codec.encode(payload),
        token_count=token_count,
    )
    if ctx.on_submit is not None:
        # Handed over here rather than after the response is sent: the worker starts sooner, and the SDK sends its
        # next request (often the optim_step behind a forward_backward) without waiting for this one's result.
        ctx.on_submit(record, payload)
    return record


def fill_refused_seq(ctx: ApiContext, owner: str, run_id: str, seq_id: int, kind: RequestKind, reason: str) -> None:
    """Record a request the API refused as a failed request of its run, so that its seq_id is not a gap.

    The SDK numbered the request before sending it and numbers the next one after it; the ledger runs a run's
    requests strictly in seq_id order, so a seq_id that never reaches the ledger would stall the run forever.
    Best effort: whatever goes wrong here, the caller reports the original refusal.
    """
    with contextlib.suppress(TinkerdError):
        record = ctx.store.futures.submit(
            owner=owner, model_id=run_id, seq_id=seq_id, kind=kind, payload=codec.encode(Empty())
        )
        # Only our own placeholder (a repeat of an accepted request would have passed the same checks).
        if record.kind is kind and not record.state.finished:
            # Should the worker claim it first, it fails it too: an Empty request never runs.
            ctx.store.futures.fail(record.request_id, f"refused at submit: {reason}", "user")


def future_response(future: schemas.UntypedAPIFuture) -> Response:
    return json_response(future)
