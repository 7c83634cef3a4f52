"""Request bodies: size limits and ``Content-Encoding: zstd``, applied before any route parses a body.

A pure ASGI middleware rather than per-route code, so JSON routes keep FastAPI's ordinary body parsing whatever
the encoding. The SDK compresses only /forward_backward, and only when /client/config asks it to.
"""

from __future__ import annotations

import json

import zstandard
from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tinkerd.api.errors import error_body


class BodyLimitError(Exception):
    pass


async def _send_error(send: Send, status: int, message: str) -> None:
    body = json.dumps(error_body(message, "user")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def decompress_zstd(data: bytes, max_bytes: int) -> bytes:
    """Decompress a zstd frame, refusing to produce more than `max_bytes` (a small body may expand enormously)."""
    reader = zstandard.ZstdDecompressor().stream_reader(data)
    out = reader.read(max_bytes + 1)
    # stream_reader.read may return less than asked before the end; keep reading until it is exhausted.
    while len(out) <= max_bytes:
        more = reader.read(max_bytes + 1 - len(out))
        if not more:
            break
        out += more
    if len(out) > max_bytes:
        raise BodyLimitError(f"decompressed request body exceeds {max_bytes} bytes")
    return out


class BodyMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _too_large(self) -> str:
        return (
            f"request body exceeds the server's limit of {self.max_body_bytes} bytes "
            "(tinkerd serve --max-body-mb); send smaller batches"
        )

    def _counting(self, receive: Receive) -> Receive:
        """``receive`` that refuses a body growing past the limit as it streams in (a chunked body declares no
        length); the route reading it fails with 413 before the whole body is in memory."""
        size = 0

        async def counted() -> Message:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > self.max_body_bytes:
                    # FastAPI's HTTPException: its body parsing re-raises that type as it is (others become 400).
                    raise HTTPException(413, self._too_large())
            return message

        return counted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        encoding = headers.get(b"content-encoding", b"").decode("latin-1").strip().lower()
        if encoding in ("", "identity"):
            declared = headers.get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.max_body_bytes:
                await _send_error(send, 413, self._too_large())
                return
            await self.app(scope, self._counting(receive), send)
            return
        if encoding != "zstd":
            await _send_error(send, 415, f"unsupported Content-Encoding {encoding!r}; use zstd or none")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await _send_error(send, 413, self._too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        try:
            body = decompress_zstd(b"".join(chunks), self.max_body_bytes)
        except BodyLimitError as error:
            await _send_error(send, 413, str(error))
            return
        except zstandard.ZstdError as error:
            await _send_error(send, 400, f"request body is not valid zstd: {error}")
            return
        # Downstream sees a plain body: drop the encoding and fix the length.
        new_headers = [
            (name, value) for name, value in scope["headers"] if name not in (b"content-encoding", b"content-length")
        ]
        new_headers.append((b"content-length", str(len(body)).encode()))
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app({**scope, "headers": new_headers}, replay, send)
