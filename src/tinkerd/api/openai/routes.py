"""The OpenAI-compatible API under ``/v1``, on the Tinker API's port and keys: ``/v1/models``,
``/v1/completions`` and ``/v1/chat/completions``. ``OpenAI(base_url="http://HOST:PORT/v1", api_key=KEY)``.

The ``openai`` client sends its key as ``Authorization: Bearer KEY``; ``X-API-Key`` works too, as on the Tinker API.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tinkerd.api.auth import API_KEY_HEADER, KeyRing
from tinkerd.api.context import ApiContext
from tinkerd.api.openai import chat, completions
from tinkerd.api.openai.errors import OpenAIRoute
from tinkerd.api.openai.models import SAMPLEABLE_KINDS, resolve
from tinkerd.api.openai.schemas import ChatCompletionRequest, CompletionRequest
from tinkerd.api.openai.text import TextCodecs
from tinkerd.api.submit import in_thread

PREFIX = "/v1"
MODELS_LISTED = 1000  # the caller's checkpoints listed by /v1/models (any other readable one works by name)

router = APIRouter(route_class=OpenAIRoute)


async def _context(request: Request) -> ApiContext:
    return request.app.state.ctx


async def _codecs(request: Request) -> TextCodecs:
    return request.app.state.text_codecs


async def _owner(request: Request) -> str:
    keys: KeyRing = request.app.state.keys
    key = request.headers.get(API_KEY_HEADER)
    authorization = request.headers.get("authorization", "")
    if not key and authorization.lower().startswith("bearer "):
        key = authorization[7:].strip()
    return keys.owner_of(key)


Context = Annotated[ApiContext, Depends(_context)]
Codecs = Annotated[TextCodecs, Depends(_codecs)]
Owner = Annotated[str, Depends(_owner)]


def _model(name: str, created: int, owned_by: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": created, "owned_by": owned_by}


def _list_models(ctx: ApiContext, owner: str) -> list[dict[str, object]]:
    models = [_model(m.name, 0, "tinkerd") for m in ctx.models.values() if m.sampleable]
    page = ctx.store.checkpoints.list_for_owner(owner, limit=MODELS_LISTED)
    for checkpoint in page.items:
        if checkpoint.kind in SAMPLEABLE_KINDS:
            models.append(_model(checkpoint.tinker_path, int(checkpoint.created_at.timestamp()), checkpoint.owner))
    return models


@router.get("/models")
async def list_models(ctx: Context, owner: Owner) -> Response:
    return JSONResponse({"object": "list", "data": await in_thread(_list_models, ctx, owner)})


@router.get("/models/{model:path}")
async def get_model(model: str, ctx: Context, owner: Owner) -> Response:
    target = await in_thread(resolve, ctx, owner, model)
    return JSONResponse(_model(target.name, 0, "tinkerd" if target.model_path is None else owner))


@router.post("/completions")
async def post_completions(
    body: CompletionRequest, request: Request, ctx: Context, codecs: Codecs, owner: Owner
) -> Response:
    return await completions.completions(request, ctx, codecs, owner, body)


@router.post("/chat/completions")
async def post_chat_completions(
    body: ChatCompletionRequest, request: Request, ctx: Context, codecs: Codecs, owner: Owner
) -> Response:
    return await chat.chat_completions(request, ctx, codecs, owner, body)


def install(app: FastAPI) -> None:
    """Add the OpenAI routes to an app whose ``state`` holds ``ctx`` and ``keys`` (``create_app`` does this)."""
    app.state.text_codecs = TextCodecs()
    app.include_router(router, prefix=PREFIX)
