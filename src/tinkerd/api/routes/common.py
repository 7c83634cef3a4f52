"""Helpers every route module shares: the context dependency, JSON responses, and submitting a future."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Response
from pydantic import BaseModel

from tinkerd.api import auth, schemas
from tinkerd.api.context import ApiContext, ServedModelInfo
from tinkerd.api.images import ImageRules
from tinkerd.api.submit import admit, check_run_cap, fill_refused_seq, in_thread, submit

__all__ = ["admit", "check_run_cap", "fill_refused_seq", "in_thread", "submit"]

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


def future_response(future: schemas.UntypedAPIFuture) -> Response:
    return json_response(future)


def image_rules(ctx: ApiContext, model: ServedModelInfo) -> ImageRules:
    """What image chunks sent to this model are checked against."""
    settings = ctx.settings
    return ImageRules(model.name, model.vision, settings.max_image_pixels, settings.image_root)
