"""The one place where errors become HTTP responses.

Body shape everywhere: ``{"error": <message>, "category": "user" | "server", "detail": <message>}``. ``error`` and
``category`` are what the SDK reads from a failed future; ``detail`` is FastAPI's convention, read by the SDK's CLI.
400 responses always carry a body: the SDK treats an empty 400 as a proxy glitch and retries it.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinkerd.api.auth import AuthenticationError
from tinkerd.api.signing import ExpiredLinkError
from tinkerd.domain.errors import (
    CapacityError,
    ConflictError,
    InvalidRequestError,
    LimitExceededError,
    NotFoundError,
    PermissionDeniedError,
    TinkerdError,
)
from tinkerd.domain.records import ErrorCategory

log = logging.getLogger(__name__)

# Most specific first: DatabaseBusyError is a CapacityError, for example.
_STATUS: tuple[tuple[type[TinkerdError], int], ...] = (
    (AuthenticationError, 401),
    (InvalidRequestError, 400),
    (PermissionDeniedError, 403),
    (NotFoundError, 404),
    (ExpiredLinkError, 410),
    (ConflictError, 409),
    (CapacityError, 429),
)


def status_of(error: TinkerdError) -> int:
    for cls, status in _STATUS:
        if isinstance(error, cls):
            return status
    return 500


def error_body(message: str, category: ErrorCategory) -> dict[str, str]:
    return {"error": message, "category": category, "detail": message}


def error_response(status: int, message: str) -> JSONResponse:
    category: ErrorCategory = "server" if status >= 500 else "user"
    headers: dict[str, str] = {}
    if status == 409:
        # The SDK's HTTP layer retries 409 ("lock timeout") by default; our conflicts do not go away by retrying.
        headers["x-should-retry"] = "false"
    elif status == 429:
        headers["retry-after"] = "1"
    return JSONResponse(error_body(message, category), status_code=status, headers=headers)


def _format_validation(error: RequestValidationError) -> str:
    parts: list[str] = []
    for item in error.errors()[:5]:
        location = ".".join(str(part) for part in item.get("loc", ()) if part != "body") or "body"
        parts.append(f"{location}: {item.get('msg', 'invalid')}")
    more = len(error.errors()) - len(parts)
    return "invalid request: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


async def _on_tinkerd_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TinkerdError)
    status = status_of(exc)
    if status >= 500:
        log.error("internal error: %s", exc, exc_info=exc)
    response = error_response(status, str(exc) or type(exc).__name__)
    if isinstance(exc, LimitExceededError):
        # The SDK retries a 429 (for minutes, on some calls); a cap on open runs does not lift that fast.
        del response.headers["retry-after"]
        response.headers["x-should-retry"] = "false"
    return response


async def _on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(400, _format_validation(exc))


async def _on_http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    response = error_response(exc.status_code, str(exc.detail))
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _on_unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=exc)
    return error_response(500, f"internal server error ({type(exc).__name__})")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(TinkerdError, _on_tinkerd_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
