"""What every Loops route shares: the caller (``Authorization: Api-Key``), URLs handed out, ``bt://`` paths, and how
errors reach the Loops SDK.

Checkpoints made through Loops live where the Tinker API keeps them; ``bt://loops:<run>/<kind>/<name>`` is only
another spelling of ``tinker://<run>/<kind>/<name>``, so both protocols (and the ``tinker`` CLI) see the same ones.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from fastapi import Depends, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tinkerd.api.auth import API_KEY_HEADER, KeyRing
from tinkerd.api.context import ApiContext
from tinkerd.domain.errors import InvalidRequestError, NotFoundError
from tinkerd.domain.paths import TinkerPath, parse_tinker_path

CONTROL_PREFIX = "/v1/loops"
TRAINER_PREFIX = "/loops/trainers"
SAMPLER_PREFIX = "/loops/samplers"
BT_SCHEME = "bt://loops:"


async def _context(request: Request) -> ApiContext:
    return request.app.state.ctx


async def _owner(request: Request) -> str:
    """The Loops SDK sends ``Authorization: Api-Key <key>`` (and nothing in single-user setups); the Tinker header
    ``X-API-Key`` is accepted too, so one key works for both protocols."""
    ring: KeyRing = request.app.state.keys
    key: str | None = None
    authorization = request.headers.get("authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() in ("api-key", "bearer") and value.strip():
        key = value.strip()
    return ring.owner_of(key or request.headers.get(API_KEY_HEADER))


Context = Annotated[ApiContext, Depends(_context)]
Owner = Annotated[str, Depends(_owner)]


def server_root(request: Request) -> str:
    """The URL the caller reached us by, without a trailing slash: base URLs handed out are built on it."""
    return str(request.base_url).rstrip("/")


def trainer_url(request: Request, run_id: str) -> str:
    return f"{server_root(request)}{TRAINER_PREFIX}/{run_id}"


def sampler_url(request: Request, sampler_id: str) -> str:
    return f"{server_root(request)}{SAMPLER_PREFIX}/{sampler_id}"


# -- paths -------------------------------------------------------------------------------------------------------------


def to_bt(path: TinkerPath) -> str:
    run_id, kind, name = path.parts()
    return f"{BT_SCHEME}{run_id}/{kind}/{name}"


def from_bt(value: str) -> TinkerPath:
    """A checkpoint path as the Loops SDK sends it: ``bt://loops:<run>/<kind>/<name>`` (a ``tinker://`` path works
    too). InvalidRequestError naming the value otherwise."""
    if value.startswith(BT_SCHEME):
        return parse_tinker_path("tinker://" + value[len(BT_SCHEME) :].rstrip("/"))
    if value.startswith("tinker://"):
        return parse_tinker_path(value)
    raise InvalidRequestError(
        f"checkpoint path {value!r} is not a bt://loops:<run_id>/<weights|sampler_weights>/<name> path"
    )


def checkpoint_id(path: TinkerPath) -> str:
    """The opaque ``id`` of a checkpoint in the Loops API: its path, base64url-encoded (one URL segment)."""
    return base64.urlsafe_b64encode(str(path).encode()).decode().rstrip("=")


def path_of_checkpoint_id(value: str) -> TinkerPath:
    try:
        decoded = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        return parse_tinker_path(decoded)
    except (binascii.Error, UnicodeDecodeError, ValueError, InvalidRequestError):
        raise NotFoundError(f"no checkpoint with id {value!r}") from None


# -- errors ------------------------------------------------------------------------------------------------------------

# The SDK retries 400, 404 and 408 on submits for up to an hour, unless the answer says the "gateway" refused it for
# good (X-Baseten-Error-Source 06). A mistake of ours or the user's must reach the caller at once, so every final 4xx
# carries that mark; 408 stays retryable (a held poll, a sample behind its version floor).
_FINAL_STATUSES = frozenset({400, 401, 403, 404, 405, 409, 410, 413, 415, 422})
GATEWAY_SOURCE = "06"


def _is_loops_path(path: str) -> bool:
    return path.startswith((CONTROL_PREFIX + "/", "/loops/"))


class LoopsErrorMiddleware:
    """On Loops paths: final 4xx answers are marked not retryable, and a retryable 429 (a full queue, which the
    SDK does not retry on trainer ops) becomes a 408, which it does retry with the same idempotency key."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_loops_path(scope.get("path", "")):
            await self.app(scope, receive, send)
            return

        async def send_marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", []))
                final = any(k.lower() == b"x-should-retry" and v == b"false" for k, v in headers)
                if status == 429 and not final:
                    message = {**message, "status": 408}
                elif status in _FINAL_STATUSES or status == 429:
                    headers.append((b"x-baseten-error-source", GATEWAY_SOURCE.encode()))
                    headers.append((b"x-baseten-error-code", str(status).encode()))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_marked)
