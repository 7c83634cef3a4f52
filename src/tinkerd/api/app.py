"""The app factory: ``create_app(store, models, dispatch, settings)`` -> a FastAPI app speaking the Tinker API
(under ``/api/v1``), the Baseten Loops API (``api.loops``) and the OpenAI API (under ``/v1``).

The composition root hands in plain data (an open Store, facts about the served models, the dispatch that connects
it to the workers); nothing here imports torch or the engine, so the API starts in a fraction of a second.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI

from tinkerd.api.auth import KeyRing
from tinkerd.api.bodies import BodyMiddleware
from tinkerd.api.context import ApiContext, ApiSettings, ServedModelInfo
from tinkerd.api.deliveries import DeliveryLog
from tinkerd.api.dispatch import Dispatch, InProcess
from tinkerd.api.errors import install_error_handlers
from tinkerd.api.loops import ROUTERS as LOOPS_ROUTERS
from tinkerd.api.loops import LoopsErrorMiddleware
from tinkerd.api.notify import FutureNotifier
from tinkerd.api.openai import install as install_openai
from tinkerd.api.routes import ROUTERS
from tinkerd.api.signing import UrlSigner, load_or_create_secret
from tinkerd.store import Store
from tinkerd.store.files import CheckpointFiles

API_PREFIX = "/api/v1"


def create_app(
    store: Store,
    models: Sequence[ServedModelInfo] | Mapping[str, ServedModelInfo],
    dispatch: Dispatch | None = None,
    settings: ApiSettings | None = None,
) -> FastAPI:
    """Build the app. `dispatch` connects it to the workers (api/dispatch.py); the default, ``InProcess`` without a
    worker, records requests in the ledger for whoever claims them."""
    dispatch = dispatch or InProcess(FutureNotifier())
    settings = settings or ApiSettings()
    if not isinstance(models, Mapping):  # a Mapping may be live (the split api's view of its trainers' models)
        names = [model.name for model in models]
        if len(set(names)) != len(names):
            raise ValueError(f"served model names must be unique, got {names}")
        models = {model.name: model for model in models}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        dispatch.notifier.bind(asyncio.get_running_loop())
        dispatch.start()
        try:
            yield
        finally:
            dispatch.close()
            await deliveries.drain()

    app = FastAPI(
        title="tinkerd",
        version=importlib.metadata.version("tinkerd"),
        summary="A self-hosted server for the Tinker fine-tuning API",
        lifespan=lifespan,
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        redoc_url=None,
    )
    deliveries = DeliveryLog(store)
    data_dir = settings.data_dir
    app.state.ctx = ApiContext(
        store=store,
        models=models,
        dispatch=dispatch,
        settings=settings,
        deliveries=deliveries,
        files=CheckpointFiles(data_dir) if data_dir is not None else None,
        signer=UrlSigner(load_or_create_secret(data_dir)) if data_dir is not None else None,
    )
    app.state.keys = KeyRing(settings.api_keys)
    install_error_handlers(app)
    app.add_middleware(BodyMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(LoopsErrorMiddleware)
    for router in ROUTERS:
        app.include_router(router, prefix=API_PREFIX)
    for router in LOOPS_ROUTERS:  # Baseten Loops: /v1/loops and the base URLs it hands out (see api.loops)
        app.include_router(router)
    install_openai(app)  # /v1/models, /v1/completions, /v1/chat/completions, in OpenAI's wire format
    return app
