"""Mounting the console on the API's app: the pages, their static files, the JSON API, and the security headers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import RedirectResponse

from tinkerd.console.routes import router

CONSOLE_PATH = "/console"

# Everything comes from this server; nothing inline (scripts, styles, event handlers), no frames, no plugins.
# uPlot sizes its elements through the CSSOM (element.style), which style-src does not govern.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css"}

Roles = Callable[[], list[dict[str, Any]]]


@dataclass(frozen=True)
class ConsoleConfig:
    """What the composition root tells the console: where each served model's tokenizer lies (for the sampling
    playground), and a callable describing the roles/workers of this deployment (for the server page)."""

    tokenizer_dirs: Mapping[str, Path] = field(default_factory=dict)
    roles: Roles | None = None


def _static_files() -> dict[str, bytes]:
    root = resources.files("tinkerd.console") / "static"
    found: dict[str, bytes] = {}

    def walk(node: Any, prefix: str) -> None:
        for child in node.iterdir():
            name = f"{prefix}{child.name}"
            if child.is_dir():
                walk(child, name + "/")
            elif Path(child.name).suffix in _TYPES:
                found[name] = child.read_bytes()

    walk(root, "")
    return found


def mount_console(app: FastAPI, config: ConsoleConfig | None = None) -> None:
    """Serve the console at /console on ``app`` (an app from ``tinkerd.api.create_app``)."""
    app.state.console = config or ConsoleConfig()
    files = _static_files()  # read once: a few small files, and no path from a URL ever touches the disk

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        if request.url.path.startswith(CONSOLE_PATH):
            response.headers.update(SECURITY_HEADERS)
        return response

    @app.get("/", include_in_schema=False)
    def root() -> Response:
        return RedirectResponse(f"{CONSOLE_PATH}/")

    @app.get(CONSOLE_PATH, include_in_schema=False)
    @app.get(f"{CONSOLE_PATH}/", include_in_schema=False)
    def index() -> Response:
        return Response(files["index.html"], media_type=_TYPES[".html"])

    @app.get(CONSOLE_PATH + "/static/{name:path}", include_in_schema=False)
    def static(name: str) -> Response:
        body = files.get(name)
        if body is None:
            return Response("not found", status_code=404, media_type="text/plain")
        return Response(body, media_type=_TYPES[Path(name).suffix])

    app.include_router(router, prefix=CONSOLE_PATH + "/api")
