"""Control-plane REST client: enrolment, token refresh, devices, rooms, capabilities, audit.

``httpx`` is the I/O boundary: tests inject a transport. Every failure the user can act on
becomes one :class:`MeshError` with a stable code; nothing else escapes as a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final, Protocol, TypeVar
from urllib.parse import quote, urlsplit

import httpx
from pydantic import BaseModel, ValidationError

from meshagent_gui import __version__
from meshagent_gui.errors import UserError
from meshagent_gui.secrets import SecretStore

from .types import (
    API_PREFIX,
    ApiError,
    AuditEntry,
    AuditLog,
    CapabilityGrant,
    CapabilityRequest,
    Device,
    DeviceList,
    DeviceUpdate,
    EnrollChallenge,
    EnrollRequest,
    EnrollResponse,
    Invitation,
    InvitationCreate,
    InvitationList,
    JoinCode,
    KeySet,
    LinkCreate,
    LinkStatus,
    MemberUpdate,
    PublicKey,
    RefreshRequest,
    Role,
    Room,
    RoomCreate,
    RoomJoin,
    RoomJoinCodeCreate,
    RoomList,
    ServerInfo,
    ShareLink,
    TerminalControlReport,
    TokenPair,
    TurnCredentials,
    Wire,
    enroll_proof_message,
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
    "invalid_proof": "the server did not accept this device's proof of its key: try again",
    "too_large": "the request was too large for the server",
    "not_allowed": "the server does not allow that (check rooms and roles)",
    "unknown_device": "no such device on the server",
    "unknown_room": "no such room (or you are not in it)",
}


# The calls other commands make by name (`meshagent rooms ...`), through the running agent
# when there is one: see MeshClient.call.
NAMED_CALLS: Final = frozenset(
    {
        "rooms",
        "create_room",
        "invite",
        "invitations",
        "accept_invitation",
        "decline_invitation",
        "leave_room",
        "set_role",
        "room_join_code",
        "join_room",
        "room_audit",
    }
)


class MeshError(UserError):
    """A control-plane failure with the server's error code (or a local one)."""


class DeviceKey(Protocol):
    """What enrolment needs of the device identity (:class:`meshagent_gui.identity.Identity`)."""

    @property
    def certificate_pem(self) -> bytes: ...

    @property
    def certificate_der(self) -> bytes: ...

    def sign(self, message: bytes) -> bytes: ...


@dataclass(frozen=True)
class EnrollCredentials:
    """How the device enrols: a join code, or a user name and password (one of the two)."""

    device_name: str
    platform: str
    join_code: str | None = None
    username: str | None = None
    password: str | None = None

    def fields(self) -> dict[str, str]:
        given = {
            "device_name": self.device_name,
            "platform": self.platform,
            "join_code": self.join_code,
            "username": self.username,
            "password": self.password,
        }
        return {name: value for name, value in given.items() if value is not None}


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
        user: str | None = None,
    ) -> None:
        self.url = normalize_url(url)
        self.user = user
        """This device's user (from enrolment): the member that :meth:`leave_room` removes."""
        self._secrets = secrets
        self._http = httpx.AsyncClient(
            base_url=self.url + API_PREFIX,
            transport=transport,
            timeout=timeout,
            headers={"User-Agent": f"meshagent/{__version__}"},
        )
        self._refresh_lock = asyncio.Lock()
        # Told every new access token (the control link renews its socket in-band with it).
        self.token_listeners: list[Callable[[str], None]] = []
        # When the token stored by this process runs out (our clock); None: not known.
        self.access_expires_at: float | None = None

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
        self.access_expires_at = time.time() + pair.access_expires_in
        for listener in list(self.token_listeners):
            listener(pair.access_token)

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

    async def enroll(self, key: DeviceKey, credentials: EnrollCredentials) -> EnrollResponse:
        """Enrol ``key``'s certificate, proving we hold the key (signing a server nonce)."""
        info = await self.info()
        try:
            challenge = await self._call("POST", "/enroll/challenge", EnrollChallenge)
        except MeshError as exc:
            if exc.code not in {"not_found", "method_not_allowed"}:
                raise
            raise MeshError(
                f"the server at {self.url} does not ask for proof of the device key at"
                " enrolment (it is too old); refusing to enrol with it",
                code="server_too_old",
            ) from exc
        proof = enroll_proof_message(info.server_id, challenge.nonce, key.certificate_der)
        signature = base64.urlsafe_b64encode(key.sign(proof)).rstrip(b"=").decode("ascii")
        try:
            request = EnrollRequest(
                **credentials.fields(),
                certificate=key.certificate_pem.decode("ascii"),
                nonce=challenge.nonce,
                signature=signature,
            )
        except ValidationError as exc:
            problems = "; ".join(str(error["msg"]) for error in exc.errors())
            raise MeshError(f"cannot enrol: {problems}", code="usage") from None
        answer = await self._call("POST", "/enroll", EnrollResponse, body=request)
        if answer.server_id != info.server_id:
            raise MeshError(
                "the server changed its identity during enrolment; refusing to trust it",
                code="server_changed",
            )
        return answer

    async def devices(self) -> list[Device]:
        return (await self._authed("GET", "/devices", DeviceList)).devices

    async def update_self(self, update: DeviceUpdate) -> Device:
        return await self._authed("PATCH", "/devices/self", Device, body=update)

    async def capability(
        self,
        target: str,
        scope: str,
        resource: str = "",
        ttl: int | None = None,
        room: str | None = None,
    ) -> CapabilityGrant:
        """A token for ``scope`` toward ``target``, granted by our role in ``room`` (None: the
        server picks, see CapabilityRequest)."""
        body = CapabilityRequest.model_validate(
            {"aud": target, "scope": scope, "resource": resource, "ttl": ttl, "room": room}
        )
        return await self._authed("POST", "/capabilities", CapabilityGrant, body=body)

    async def turn_credentials(self) -> TurnCredentials:
        """Short-lived credentials for the deployment's TURN server (``POST /turn/credentials``;
        404 when the server has none)."""
        return await self._authed("POST", "/turn/credentials", TurnCredentials)

    async def create_link(self, name: str, size: int, ttl: int | None = None) -> ShareLink:
        """A one-time share link for what this device will send (``POST /links``)."""
        body = LinkCreate(name=name, size=size, ttl=ttl)
        return await self._authed("POST", "/links", ShareLink, body=body)

    async def link_status(self, link_id: str) -> LinkStatus:
        return await self._authed("GET", f"/links/{_seg(link_id)}", LinkStatus)

    async def withdraw_link(self, link_id: str) -> None:
        """Nobody may claim our unclaimed link any more (``DELETE /links/{id}``)."""
        await self._authed("DELETE", f"/links/{_seg(link_id)}", _Ignored)

    # Rooms: joining one always takes this user's own act (accepting, or using a join code).

    async def rooms(self) -> list[Room]:
        return (await self._authed("GET", "/rooms", RoomList)).rooms

    async def create_room(self, name: str) -> Room:
        return await self._authed("POST", "/rooms", Room, body=RoomCreate(name=name))

    async def invite(self, room: str, user: str, role: Role = "member") -> None:
        """Invite ``user``; the server answers the same whether or not the user exists."""
        body = InvitationCreate(user=user, role=role)
        await self._authed("POST", f"/rooms/{_seg(room)}/invitations", _Ignored, body=body)

    async def invitations(self) -> list[Invitation]:
        return (await self._authed("GET", "/invitations", InvitationList)).invitations

    async def accept_invitation(self, room: str) -> Room:
        return await self._authed("POST", f"/invitations/{_seg(room)}/accept", Room)

    async def decline_invitation(self, room: str) -> None:
        await self._authed("POST", f"/invitations/{_seg(room)}/decline", _Ignored)

    async def leave_room(self, room: str) -> None:
        if not self.user:
            raise MeshError(
                "this device is not logged in: run meshagent login", code="not_enrolled"
            )
        await self._authed("DELETE", f"/rooms/{_seg(room)}/members/{_seg(self.user)}", _Ignored)

    async def remove_member(self, room: str, user: str) -> None:
        """An owner removes ``user`` from ``room`` (:meth:`leave_room` for oneself)."""
        await self._authed("DELETE", f"/rooms/{_seg(room)}/members/{_seg(user)}", _Ignored)

    async def set_role(self, room: str, user: str, role: Role) -> Room:
        path = f"/rooms/{_seg(room)}/members/{_seg(user)}"
        return await self._authed("PATCH", path, Room, body=MemberUpdate(role=role))

    async def room_join_code(self, room: str, ttl: int | None = None) -> JoinCode:
        body = RoomJoinCodeCreate(ttl=ttl)
        return await self._authed("POST", f"/rooms/{_seg(room)}/join-codes", JoinCode, body=body)

    async def join_room(self, code: str) -> Room:
        return await self._authed("POST", "/rooms/join", Room, body=RoomJoin(code=code))

    async def room_audit(self, room: str, limit: int = 100) -> list[AuditEntry]:
        path = f"/rooms/{_seg(room)}/audit?limit={int(limit)}"
        return (await self._authed("GET", path, AuditLog)).entries

    async def report_terminal_control(
        self, session_id: str, controller_device: str | None, rooms: list[str]
    ) -> None:
        """Tell the server who controls our terminal session now (None: nobody but us)."""
        body = TerminalControlReport(
            session_id=session_id, controller_device=controller_device, rooms=rooms
        )
        await self._authed("POST", "/terminal/control", _Ignored, body=body)

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

    async def call(self, method: str, args: dict[str, Any]) -> Any:
        """One of :data:`NAMED_CALLS` with keyword ``args``, answered as JSON values (for IPC)."""
        if method not in NAMED_CALLS:
            raise MeshError(f"no request {method!r}", code="bad_request")
        return _json_of(await getattr(self, method)(**args))

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
        # 204 has no body: an empty object, for the calls whose answer we ignore anyway.
        data = {} if response.status_code == 204 else self._parse_json(response)
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


class _Ignored(Wire):
    """An answer that carries nothing we use (202 `{"status": ...}`, 204)."""


def _json_of(value: Any) -> Any:
    """A call's answer as JSON values (pydantic models, lists of them, None)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_json_of(item) for item in value]
    return value


def _seg(name: str) -> str:
    """A room or user name as one URL path segment."""
    return quote(name, safe="@")


def _reason(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    if "Connection refused" in text or "connect" in text.lower():
        return "connection refused (is the server running?)"
    return text
