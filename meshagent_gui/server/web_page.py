"""What the reference server does for web pages: serve the web client, and refuse other sites.

The web client is package data (``meshagent_gui/server/web/``), served at ``/app/`` with a
strict Content-Security-Policy; ``/s/<link_id>`` (a share link) is the same page, which routes on
its path. No cookies are ever set: a page keeps its tokens in its own storage and sends them in
headers, so another site cannot make a browser act with them (no CSRF surface). What is left is
a page of another site calling the API with credentials it obtained some other way, or a
WebSocket opened from it (WebSockets are not subject to CORS): :class:`OriginGuard` refuses any
request whose ``Origin`` is neither the server's own nor one the operator allowed.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Final

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from meshagent_gui.core.mesh.types import ApiError
from meshagent_gui.server.limits import AsgiApp, Receive, Responder, Scope, Send

WEB_DIR: Final = Path(__file__).parent / "web"
APP_PATH: Final = "/app/"
INDEX: Final = "index.html"

# mimetypes depends on the host's tables (.js and .wasm vary): the types are fixed here.
CONTENT_TYPES: Final[dict[str, str]] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".wasm": "application/wasm",
    ".json": "application/json",
    ".map": "application/json",
    ".webmanifest": "application/manifest+json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
}
# 'wasm-unsafe-eval' lets the page compile WebAssembly (and nothing else eval-like);
# 'unsafe-inline' styles: xterm.js writes <style> elements; scripts stay 'self' only.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; "
    "style-src 'self' 'unsafe-inline'; connect-src 'self' ws: wss:; img-src 'self' data: blob:; "
    "worker-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'none'"
)
PAGE_HEADERS: Final[dict[str, str]] = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    # A share link's path names the link: it must not leave in a Referer.
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
_HTTP_SCHEME: Final = {"http": "http", "https": "https", "ws": "http", "wss": "https"}


def own_origin(scope: Scope) -> str | None:
    """``scheme://host[:port]`` as the client addressed this server (its ``Host`` header)."""
    host = _header(scope, b"host")
    scheme = _HTTP_SCHEME.get(str(scope.get("scheme", "http")))
    if host is None or scheme is None:
        return None
    return f"{scheme}://{host}".lower()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


class OriginGuard:
    """Pure ASGI middleware: a request or WebSocket upgrade from a foreign ``Origin`` is refused.

    Agents and command-line clients send no ``Origin``; browsers send it on every cross-origin
    request, every POST and every WebSocket upgrade, so a page of another site cannot reach the
    API or open a socket. ``allowed`` lists further origins the operator trusts (a web app on
    another host). A refused HTTP request gets ``refuse``'s 403; a refused upgrade is closed
    before it is accepted (the client sees HTTP 403).
    """

    def __init__(self, app: AsgiApp, *, allowed: Collection[str], refuse: Responder) -> None:
        self.app = app
        self.allowed = frozenset(origin.rstrip("/").lower() for origin in allowed)
        self.refuse = refuse

    def admits(self, scope: Scope) -> bool:
        origin = _header(scope, b"origin")
        if origin is None:
            return True
        origin = origin.rstrip("/").lower()
        return origin in self.allowed or origin == own_origin(scope)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.admits(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await self.refuse(scope, receive, send)
        else:
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008, "reason": "forbidden origin"})


def _page_file(relative: str) -> Path | None:
    """The file under the web folder, or None (missing, hidden, or outside the folder)."""
    parts = [part for part in relative.split("/") if part]
    if any(part.startswith(".") or "\\" in part or "\0" in part for part in parts):
        return None
    root = WEB_DIR.resolve()
    path = (root.joinpath(*parts) if parts else root).resolve()
    if path.is_dir():
        path = path / INDEX
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path


def _serve(relative: str) -> Response:
    path = _page_file(relative)
    if path is None:
        missing = _page_file(INDEX) is None
        message = (
            "The web client is not installed with this server."
            if missing
            else "There is no such file in the web client."
        )
        return JSONResponse(ApiError(error="not_found", message=message).model_dump(), 404)
    content_type = CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
    return FileResponse(path, media_type=content_type, headers=PAGE_HEADERS)


def mount_web_page(app: FastAPI) -> None:
    """``/`` and ``/app`` redirect to ``/app/``; ``/app/<file>``; ``/s/<link_id>`` (the page)."""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    @app.api_route("/app", methods=["GET", "HEAD"], include_in_schema=False)
    async def to_app() -> Response:
        return RedirectResponse(APP_PATH, status_code=307)

    # Plain functions: FastAPI runs them in its thread pool, so the file lookups (stat,
    # resolve) stay off the event loop.
    @app.api_route("/app/{relative:path}", methods=["GET", "HEAD"], include_in_schema=False)
    def page_file(relative: str) -> Response:
        return _serve(relative)

    @app.api_route("/s/{link_id}", methods=["GET", "HEAD"], include_in_schema=False)
    def share_link_page(link_id: str) -> Response:
        return _serve(INDEX)
