"""JSON over HTTP to the vLLM server on loopback, with the standard library (one request per call, no pool).

Errors come in two kinds the caller treats differently: ``EngineUnreachable`` (nothing answered or the connection
broke: the engine may be dead or dying, so a retry after a restart may succeed) and ``EngineRefused`` (vLLM answered
with an error status; a 5xx from a server that still passes its health check is about the request, not the engine).
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any


class EngineUnreachable(ConnectionError):
    """vLLM did not answer."""


class EngineRefused(Exception):
    """vLLM answered an error status: ``status`` and its message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _message(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:500]
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if "detail" in data:
            return str(data["detail"])
    return json.dumps(data)[:500]


def call(base_url: str, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 600.0) -> Any:
    """The decoded JSON answer (or the raw text, for endpoints that answer text), or one of the two errors."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base_url + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raise EngineRefused(exc.code, _message(exc.read())) from None
    except (TimeoutError, urllib.error.URLError, http.client.HTTPException, ConnectionError, OSError) as exc:
        raise EngineUnreachable(f"vLLM did not answer {path}: {exc}") from None
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def healthy(base_url: str, timeout: float = 2.0) -> bool:
    try:
        call(base_url, "GET", "/health", timeout=timeout)
    except (EngineUnreachable, EngineRefused):
        return False
    return True
