"""A small Gotify server on loopback that keeps to gotify/server's documented behaviour.

What it mirrors (gotify/server ``router/router.go``, ``auth/authentication.go``,
``api/message.go``, ``error/handler.go``):

* ``POST /message`` takes an application token from ``?token=``, ``X-Gotify-Key`` or
  ``Authorization: Bearer`` (checked in that order). An unknown token, a *client* token or none
  at all is 401; valid user credentials (Basic auth) are 403, since only apps may send.
* The body is JSON, or a form (query string and urlencoded body). A type mismatch is a 400 with
  Go's ``json: cannot unmarshal ...`` text; a missing or empty ``message`` is a 400
  ``Field 'message' is required``. A blank title becomes the app's name; no priority means the
  app's default priority. The answer is the stored message ``{id, appid, message, title,
  priority, date[, extras]}``.
* ``GET /version`` needs no token. Anything else is Gotify's 404 ``page not found``.
* Errors are ``{"error": <status text>, "errorCode": <status>, "errorDescription": <text>}``.

Test knobs: :meth:`FakeGotify.fail_next` (answer N requests with a 5xx) and
:meth:`FakeGotify.drop_next` (close N connections without an answer).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import itertools
import json
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import parse_qs, urlsplit

APP_TOKEN: Final = "AmeshAgentFake."  # Gotify app tokens start with "A", client tokens with "C"
CLIENT_TOKEN: Final = "CphoneClientFak"
VERSION: Final = "2.6.3"


@dataclass(frozen=True)
class FakeApp:
    id: int
    name: str
    default_priority: int = 0


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    target: str  # path and query string, as sent
    headers: Mapping[str, str]  # names lower-cased
    body: bytes


@dataclass
class _Failures:
    status: int = 500
    fail_count: int = 0
    drop_count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> int | str | None:
        with self.lock:
            if self.drop_count:
                self.drop_count -= 1
                return "drop"
            if self.fail_count:
                self.fail_count -= 1
                return self.status
        return None


class FakeGotify:
    """``with FakeGotify() as gotify:`` serves on ``gotify.url`` until the block ends."""

    def __init__(
        self,
        *,
        apps: Mapping[str, FakeApp] | None = None,
        client_tokens: tuple[str, ...] = (CLIENT_TOKEN,),
        users: Mapping[str, str] | None = None,
        prefix: str = "",
    ) -> None:
        self.apps: dict[str, FakeApp] = dict(apps or {APP_TOKEN: FakeApp(1, "Mesh Agent")})
        self.client_tokens = client_tokens
        self.users: dict[str, str] = dict(users or {"admin": "admin"})
        self.prefix = prefix.rstrip("/")
        self.messages: list[dict[str, Any]] = []  # as stored and answered, oldest first
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._failures = _Failures()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def app_token(self) -> str:
        return next(iter(self.apps))

    @property
    def client_token(self) -> str:
        return self.client_tokens[0]

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeGotify is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{self.prefix}"

    def fail_next(self, count: int, status: int = 500) -> None:
        """Answer the next ``count`` requests with ``status`` (a Gotify-style error body)."""
        with self._failures.lock:
            self._failures.fail_count = count
            self._failures.status = status

    def drop_next(self, count: int) -> None:
        """Close the next ``count`` connections after reading the request, without answering."""
        with self._failures.lock:
            self._failures.drop_count = count

    def start(self) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving; the port is closed afterwards (connections are refused)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            open_connections = list(self._connections)
        for connection in open_connections:  # kept-alive ones would otherwise still be served
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- what the handler threads call -------------------------------------------------------

    def _answer(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> _Reply:
        with self._lock:
            self.requests.append(RecordedRequest(method, target, dict(headers), body))
        failure = self._failures.take()
        if failure == "drop":
            return _DROP
        if isinstance(failure, int):
            return _error(failure, "fake failure")
        url = urlsplit(target)
        path = url.path
        if self.prefix:
            if not path.startswith(self.prefix + "/"):
                return _error(404, "page not found")
            path = path[len(self.prefix) :]
        if method == "GET" and path == "/version":
            return _json(
                200, {"version": VERSION, "commit": "fake", "buildDate": "2025-01-01T00:00:00Z"}
            )
        if method == "POST" and path == "/message":
            return self._create_message(url.query, headers, body)
        return _error(404, "page not found")

    def _create_message(self, query: str, headers: Mapping[str, str], body: bytes) -> _Reply:
        app = self._authenticate(query, headers)
        if isinstance(app, _Reply):
            return app
        fields = _bind(query, headers.get("content-type", ""), body)
        if isinstance(fields, _Reply):
            return fields
        if not fields.get("message"):
            return _error(400, "Field 'message' is required")
        title = fields.get("title") or ""
        priority = fields.get("priority")
        stored: dict[str, Any] = {
            "id": 0,
            "appid": app.id,
            "message": fields["message"],
            "title": title if title.strip() else app.name,
            "priority": app.default_priority if priority is None else priority,
            "date": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
        if fields.get("extras") is not None:
            stored["extras"] = fields["extras"]
        with self._lock:
            stored["id"] = next(self._ids)
            self.messages.append(stored)
        return _json(200, stored)

    def _authenticate(self, query: str, headers: Mapping[str, str]) -> FakeApp | _Reply:
        token = (
            parse_qs(query).get("token", [""])[0]
            or headers.get("x-gotify-key", "")
            or _bearer(headers.get("authorization", ""))
        )
        if token in self.apps:
            return self.apps[token]
        user = _basic_user(headers.get("authorization", ""))
        if user is not None and self.users.get(user[0]) == user[1]:
            return _error(403, "you are not allowed to access this api")
        # Client tokens are only valid on client endpoints: here they are as unknown as any other.
        return _error(
            401, "you need to provide a valid access token or user credentials to access this api"
        )


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    drop: bool = False


_DROP: Final = _Reply(0, b"", drop=True)


def _json(status: int, payload: Any) -> _Reply:
    return _Reply(status, json.dumps(payload).encode())


def _error(status: int, description: str) -> _Reply:
    return _json(
        status,
        {"error": HTTPStatus(status).phrase, "errorCode": status, "errorDescription": description},
    )


def _bearer(header: str) -> str:
    prefix = "bearer "
    return header[len(prefix) :] if header[: len(prefix)].lower() == prefix else ""


def _basic_user(header: str) -> tuple[str, str] | None:
    if header[:6].lower() != "basic ":
        return None
    try:
        name, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return name, password


_GO_TYPES: Final = {"title": "string", "message": "string", "priority": "int"}


def _bind(query: str, content_type: str, body: bytes) -> dict[str, Any] | _Reply:
    """Gin's binding of ``model.MessageExternal``: JSON for application/json, else a form."""
    if content_type.split(";", maxsplit=1)[0].strip().lower() == "application/json":
        return _bind_json(body)
    form = parse_qs(query)
    if content_type.startswith("application/x-www-form-urlencoded"):
        form.update(parse_qs(body.decode("utf-8", "replace")))
    fields: dict[str, Any] = {name: form[name][0] for name in ("title", "message") if name in form}
    if "priority" in form:
        raw = form["priority"][0]
        try:
            fields["priority"] = int(raw)
        except ValueError:
            return _error(400, f'strconv.ParseInt: parsing "{raw}": invalid syntax')
    return fields


def _bind_json(body: bytes) -> dict[str, Any] | _Reply:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return _error(400, f"invalid JSON: {exc}")
    if not isinstance(document, dict):
        return _error(
            400,
            f"json: cannot unmarshal {_go_kind(document)} into Go value of type"
            " model.MessageExternal",
        )
    # encoding/json matches field names case-insensitively and ignores unknown (and read-only) ones.
    fields = {key.lower(): value for key, value in document.items()}
    bound: dict[str, Any] = {}
    for name, go_type in (*_GO_TYPES.items(), ("extras", "map[string]interface {}")):
        value = fields.get(name)
        if value is None:
            continue
        valid = (
            isinstance(value, str)
            if go_type == "string"
            else isinstance(value, int) and not isinstance(value, bool)
            if go_type == "int"
            else isinstance(value, dict)
        )
        if not valid:
            return _error(
                400,
                f"json: cannot unmarshal {_go_kind(value)} into Go struct field"
                f" MessageExternal.{name} of type {go_type}",
            )
        bound[name] = value
    return bound


def _go_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return f"number {value}" if isinstance(value, float) else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[_Handler], fake: FakeGotify) -> None:
        self.fake = fake
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like Gotify behind Go's net/http
    timeout = 10  # an idle kept-alive connection frees its thread
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.fake._lock:
            self.server.fake._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.fake._lock:
            self.server.fake._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read the records
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in self.headers.items()}
        reply = self.server.fake._answer(method, self.path, headers, body)
        if reply.drop:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)
