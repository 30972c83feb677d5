"""Control-plane REST client: enrolment, token refresh, devices, capabilities.

``httpx`` is the I/O boundary: tests inject a transport. Every failure the user can act on
becomes one :class:`MeshError` with a stable code; nothing else escapes as a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ValidationError

from meshagent_gui import __version__
from meshagent_gui.errors import UserError
from meshagent_gui.secrets import SecretStore

from .types import (
    API_PREFIX,
    ApiError,
    CapabilityGrant,
    CapabilityRequest,
    Device,
    DeviceList,
    DeviceUpdate,
    EnrollRequest,
    EnrollResponse,
    KeySet,
    PublicKey,
    RefreshRequest,
    ServerInfo,
    TokenPair,
)

log = logging.getLogger(__name__)

ACCESS_SECRET: Final = "server.access_token"
REFRESH_SECRET: Final = "server.refresh_token"
M = TypeVar("M", bound=BaseModel)

# What the agent says for the server's stable error codes (docs/server-api.md).
_MESSAGES: Final = {
    "invalid_credentials": "wrong user name or password",
    "join_code_unknown": "that join code is not valid (mistyped?)",
    "join_code_expired": "that join code has expired: ask for a new one",
    "join_code_used": "that join code was already used: ask for a new one",
    "invalid_refresh_token": "this device's session was revoked or expired: log in again",
    "rate_limited": "too many failed attempts: wait a minute and try again",
    "not_allowed": "the server does not allow that (check rooms and roles)",
    "unknown_device": "no such device on the server",
}


class MeshError(UserError):
    """A control-plane failure with the server's error code (or a local one)."""


def normalize_url(url: str) -> str:
    """Check a server URL and return it without a trailing slash, or raise one clear error."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise MeshError(
            f"malformed server URL {url!r}: expected http(s)://host[:port]", code="bad_url"
        )
    try:
        _ = parts.port
    except ValueError:
        raise MeshError(f"malformed server URL {url!r}: bad port", code="bad_url") from None
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def ws_url(url: str, endpoint: str = "/ws") -> str:
    """The WebSocket URL of an API endpoint (``/ws``, ``/relay``) of the server at ``url``."""
    return ("wss" + url[5:] if url.startswith("https") else "ws" + url[4:]) + API_PREFIX + endpoint


@dataclass
class Enrollment:
    """What this device learnt at enrolment; tokens themselves live in the SecretStore."""

    url: str
    server_id: str
    device_id: str
    user: str
    keys: list[PublicKey] = field(default_factory=list)

    FILE: ClassVar[str] = "enrollment.json"

    @classmethod
    def load(cls, data_dir: Path) -> Enrollment | None:
        path = data_dir / cls.FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            raw["keys"] = [PublicKey.model_validate(k) for k in raw.get("keys", [])]
            return cls(**raw)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, ValidationError) as exc:
            raise MeshError(
                f"{path} is damaged ({exc}); run meshagent login again", code="enrollment_invalid"
            ) from exc

    def save(self, data_dir: Path) -> None:
        path = data_dir / self.FILE
        tmp = path.with_suffix(".tmp")
        body = {
            "url": self.url,
            "server_id": self.server_id,
            "device_id": self.device_id,
            "user": self.user,
            "keys": [k.model_dump() for k in self.keys],
        }
        tmp.write_text(json.dumps(body, indent=1), encoding="utf-8")
        os.replace(tmp, path)


class MeshClient:
    """REST calls to one Mesh Server, with the access token refreshed when it runs out."""

    def __init__(
        self,
        url: str,
        *,
        secrets: SecretStore | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.url = normalize_url(url)
        self._secrets = secrets
        self._http = httpx.AsyncClient(
            base_url=self.url + API_PREFIX,
            transport=transport,
            timeout=timeout,
            headers={"User-Agent": f"meshagent/{__version__}"},
        )
        self._refresh_lock = asyncio.Lock()

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------ tokens

    @property
    def access_token(self) -> str | None:
        return self._secrets.get(ACCESS_SECRET) if self._secrets else None

    def store_tokens(self, pair: TokenPair) -> None:
        if self._secrets is None:
            raise RuntimeError("no SecretStore to keep the tokens in")
        self._secrets.set(ACCESS_SECRET, pair.access_token)
        self._secrets.set(REFRESH_SECRET, pair.refresh_token)

    async def refresh(self, stale_access: str | None) -> str:
        """Trade the refresh token for a new pair; one refresh at a time, however many callers."""
        async with self._refresh_lock:
            current = self.access_token
            if current is not None and current != stale_access:
                return current  # someone else refreshed while we waited
            refresh = self._secrets.get(REFRESH_SECRET) if self._secrets else None
            if refresh is None:
                raise MeshError(
                    "this device is not logged in: run meshagent login", code="not_enrolled"
                )
            pair = await self._call(
                "POST", "/token/refresh", TokenPair, body=RefreshRequest(refresh_token=refresh)
            )
            self.store_tokens(pair)
            return pair.access_token

    # ------------------------------------------------------------ endpoints

    async def info(self) -> ServerInfo:
        return await self._call("GET", "/info", ServerInfo)

    async def keys(self) -> list[PublicKey]:
        return (await self._call("GET", "/keys", KeySet)).keys

    async def enroll(self, request: EnrollRequest) -> EnrollResponse:
        return await self._call("POST", "/enroll", EnrollResponse, body=request)

    async def devices(self) -> list[Device]:
        return (await self._authed("GET", "/devices", DeviceList)).devices

    async def update_self(self, update: DeviceUpdate) -> Device:
        return await self._authed("PATCH", "/devices/self", Device, body=update)

    async def capability(
        self, target: str, scope: str, resource: str = "", ttl: int | None = None
    ) -> CapabilityGrant:
        body = CapabilityRequest.model_validate(
            {"aud": target, "scope": scope, "resource": resource, "ttl": ttl}
        )
        return await self._authed("POST", "/capabilities", CapabilityGrant, body=body)

    async def create_join_code(
        self, user: str | None = None, room: str | None = None, ttl: int | None = None
    ) -> dict[str, Any]:
        body = {k: v for k, v in {"user": user, "room": room, "ttl": ttl}.items() if v is not None}
        response = await self._send("POST", "/join-codes", body, self.access_token)
        if response.status_code == 401:
            response = await self._send(
                "POST", "/join-codes", body, await self.refresh(self.access_token)
            )
        data: dict[str, Any] = self._parse_json(response)
        return data

    async def measure_clock_skew(self) -> tuple[float, float]:
        """(server clock - ours, round trip) in seconds, from one /info call."""
        start = time.time()
        info = await self.info()
        end = time.time()
        return info.time - (start + end) / 2, end - start

    # ------------------------------------------------------------ plumbing

    async def _authed(
        self, method: str, path: str, model: type[M], body: BaseModel | None = None
    ) -> M:
        token = self.access_token
        if token is None:
            token = await self.refresh(None)
        try:
            return await self._call(method, path, model, body=body, token=token)
        except MeshError as exc:
            if exc.code != "unauthorized":
                raise
        return await self._call(method, path, model, body=body, token=await self.refresh(token))

    async def _call(
        self,
        method: str,
        path: str,
        model: type[M],
        *,
        body: BaseModel | None = None,
        token: str | None = None,
    ) -> M:
        payload = body.model_dump(exclude_none=True) if body is not None else None
        response = await self._send(method, path, payload, token)
        data = self._parse_json(response)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise MeshError(
                f"the server at {self.url} sent an answer this agent does not understand"
                f" ({path}: {exc.error_count()} invalid fields)",
                code="bad_response",
            ) from exc

    async def _send(
        self, method: str, path: str, payload: Any, token: str | None
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            return await self._http.request(method, path, json=payload, headers=headers)
        except httpx.TimeoutException as exc:
            raise MeshError(
                f"the Mesh Server at {self.url} did not answer in time", code="server_timeout"
            ) from exc
        except httpx.TransportError as exc:
            raise MeshError(
                f"cannot reach the Mesh Server at {self.url}: {_reason(exc)}",
                code="server_unreachable",
            ) from exc

    def _parse_json(self, response: httpx.Response) -> Any:
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.is_success and data is not None:
            return data
        if isinstance(data, dict) and "error" in data:
            error = ApiError.model_validate(data)
            text = _MESSAGES.get(error.error, error.message)
            raise MeshError(text, code=error.error)
        if response.status_code == 401:
            raise MeshError("the server refused this device's token", code="unauthorized")
        raise MeshError(
            f"unexpected answer from {self.url}: HTTP {response.status_code}"
            + (" (is this a Mesh Server?)" if data is None else ""),
            code="bad_response",
        )


def _reason(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    if "Connection refused" in text or "connect" in text.lower():
        return "connection refused (is the server running?)"
    return text
