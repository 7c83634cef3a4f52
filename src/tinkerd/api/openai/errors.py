"""Errors on the OpenAI routes, in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

The Tinker routes answer in their own shape (``api/errors.py``); these routes use ``OpenAIRoute``, which turns every
error raised while handling a request (validation, authentication, the domain's errors) into OpenAI's shape, so the
``openai`` client raises its matching exception (``BadRequestError``, ``NotFoundError``, ...).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinkerd.api.auth import AuthenticationError
from tinkerd.api.errors import status_of
from tinkerd.domain.errors import InvalidRequestError, NotFoundError, TinkerdError

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          409: "conflict_error", 429: "rate_limit_error"}  # fmt: skip


class OpenAIError(InvalidRequestError):
    """A user's mistake with the parameter it concerns (``param``) and OpenAI's ``code`` for it."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class ModelNotFoundError(NotFoundError):
    """``model`` names nothing the caller may sample: a 404 with code ``model_not_found`` (never the base model)."""


def error_json(status: int, message: str, *, param: str | None = None, code: str | None = None) -> Response:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return Response(json.dumps(body), status_code=status, media_type="application/json")


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    problems = error.errors()
    parts: list[str] = []
    first_param: str | None = None
    for item in problems[:5]:
        location = [str(part) for part in item.get("loc", ()) if part != "body"]
        # a union reports each member it tried as a location step; the field is the first name
        name = ".".join(part for part in location if not part.startswith(("str", "list[", "int", "function"))) or None
        first_param = first_param or name
        parts.append(f"{name or 'body'}: {item.get('msg', 'invalid')}")
    more = len(problems) - len(parts)
    return "invalid request: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else ""), first_param


def error_response(exc: Exception) -> Response:
    """Any exception raised by an OpenAI route as OpenAI's error answer."""
    if isinstance(exc, RequestValidationError):
        message, param = _validation_message(exc)
        return error_json(400, message, param=param)
    if isinstance(exc, ModelNotFoundError):
        return error_json(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, OpenAIError):
        return error_json(400, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, AuthenticationError):
        return error_json(401, str(exc), code="invalid_api_key")
    if isinstance(exc, TinkerdError):
        status = status_of(exc)
        if status >= 500:
            log.error("internal error: %s", exc, exc_info=exc)
        return error_json(status, str(exc) or type(exc).__name__)
    if isinstance(exc, StarletteHTTPException):
        return error_json(exc.status_code, str(exc.detail))
    log.error("unhandled error on an OpenAI route", exc_info=exc)
    return error_json(500, f"internal server error ({type(exc).__name__})")


class OpenAIRoute(APIRoute):
    """A route whose errors are answered in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return error_response(exc)

        return handle
