"""A worker role's health endpoint: GET /healthz answers 200 with what the process is doing and its memory
(JSON), from a thread of its own, so a load balancer or `tinkerd status` can see a trainer even while it computes."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tinkerd.console.memory import process_memory
from tinkerd.settings import SettingsError


class HealthServer:
    def __init__(self, host: str, port: int, report: Callable[[], dict[str, Any]]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.rstrip("/") not in ("/healthz", "/api/v1/healthz"):
                    self.send_error(404, "only /healthz is served here")
                    return
                body = json.dumps({**report(), "memory": process_memory()}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise SettingsError(f"cannot listen on {host}:{port} for the health endpoint: {exc.strerror}") from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="tinkerd-health", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/healthz"

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
