"""Client bootstrap: /client/config, /client/dynamic_config, telemetry, server capabilities, health."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from tinkerd.api import rest_schemas
from tinkerd.api.convert.results import supported_model
from tinkerd.api.routes.common import Context, Owner, json_response

router = APIRouter()

# What the SDK should do against this server (fields of ClientConfigResponse; every one optional):
_CLIENT_CONFIG: dict[str, Any] = {
    "pjwt_auth_enabled": False,  # static tml- keys only, no JWT exchange
    # The ledger runs a model's requests in seq_id order and waits for gaps, so chunks may arrive in any order.
    "parallel_fwdbwd_chunks": True,
    # On loopback, compressing costs more CPU than it saves; a remote deployment can turn it on by override.
    "proto_compress_fwdbwd": False,
    "sample_use_retrieve_futures": False,
    "custom_loss_server_side": False,
    "sample_join_sampling_session": False,
    # The SDK's httpx transport rather than its pyqwest (Rust) one: on loopback a 1-datum forward through the SDK is
    # about 0.6 ms faster this way, and no slower for a 32 x 256-token batch (bench/RESULTS.md, API overhead).
    "use_pyqwest_transport": False,
}


@router.post("/client/config")
async def client_config(ctx: Context, _owner: Owner) -> dict[str, Any]:
    return {**_CLIENT_CONFIG, **ctx.settings.client_config_overrides}


@router.post("/client/dynamic_config")
async def client_dynamic_config(_owner: Owner) -> dict[str, Any]:
    return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}


@router.post("/telemetry")
async def telemetry(_owner: Owner) -> dict[str, str]:
    # Accepted and dropped: we keep no usage data. Answering keeps the SDK from logging warnings.
    return {"status": "accepted"}


@router.get("/get_server_capabilities")
async def get_server_capabilities(ctx: Context, _owner: Owner) -> Response:
    models = [supported_model(model) for model in ctx.models.values()]
    return json_response(rest_schemas.GetServerCapabilitiesResponse(supported_models=models))


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
