"""Wire types of the control plane, defined once and used by the agent and the reference server.

REST bodies are pydantic models (the server's OpenAPI schema is generated from them); WebSocket
messages are JSON objects with a ``type`` field, parsed with :data:`WS_MESSAGE` (a tagged union).
See docs/server-api.md for the contract any Mesh Server must offer.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

API_PREFIX: Final = "/api/v1"
# Relay frames (/api/v1/relay): a raw device id, then one QUIC datagram.
RELAY_ID_BYTES: Final = 32
RELAY_MAX_DATAGRAM: Final = 1500
# p2p:connect admits a QUIC connection (its first stream); the others admit service streams.
SCOPES: Final = ("p2p:connect", "share:file", "share:folder", "terminal:view", "terminal:control")
Scope = Literal["p2p:connect", "share:file", "share:folder", "terminal:view", "terminal:control"]
Role = Literal["owner", "member", "viewer"]

# Which scopes each room role may ask for toward the other devices of the room.
ROLE_SCOPES: Final[dict[str, frozenset[str]]] = {
    "owner": frozenset(SCOPES),
    "member": frozenset(SCOPES),
    "viewer": frozenset({"p2p:connect", "terminal:view"}),
}


class Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# ---------------------------------------------------------------- REST


class ApiError(Wire):
    error: str
    message: str


class ServerInfo(Wire):
    server_id: str
    name: str
    version: str
    time: float
    stun_port: int | None = None


class PublicKey(Wire):
    """An Ed25519 token-signing key as a JWK (RFC 8037), plus our ``status``."""

    kid: str
    kty: Literal["OKP"] = "OKP"
    crv: Literal["Ed25519"] = "Ed25519"
    alg: Literal["EdDSA"] = "EdDSA"
    use: Literal["sig"] = "sig"
    x: str
    status: Literal["active", "retired"] = "active"


class KeySet(Wire):
    keys: list[PublicKey]


class EnrollRequest(Wire):
    join_code: str | None = None
    username: str | None = None
    password: str | None = None
    device_name: str = Field(min_length=1, max_length=64)
    platform: str = Field(default="", max_length=32)
    certificate: str = Field(description="the device's self-signed X.509 certificate, PEM")


class TokenPair(Wire):
    access_token: str
    access_expires_in: int
    refresh_token: str


class EnrollResponse(TokenPair):
    device_id: str
    user: str
    server_id: str
    keys: list[PublicKey]


class RefreshRequest(Wire):
    refresh_token: str


class Device(Wire):
    id: str = Field(description="SHA-256 fingerprint of the device certificate, lowercase hex")
    name: str
    platform: str
    user: str
    online: bool
    last_seen: float | None
    addresses: list[str] = []
    rooms: list[str] = []


class DeviceList(Wire):
    devices: list[Device]


Address = Annotated[str, Field(min_length=1, max_length=100)]


class DeviceUpdate(Wire):
    name: str | None = Field(default=None, min_length=1, max_length=64)
    addresses: list[Address] | None = Field(
        default=None, max_length=32, description="the device's own candidate addresses"
    )


class Room(Wire):
    name: str
    role: Role
    members: list[str] = []


class RoomList(Wire):
    rooms: list[Room]


class RoomCreate(Wire):
    name: str = Field(min_length=1, max_length=64)


class MemberAdd(Wire):
    user: str
    role: Role = "member"


class JoinCodeCreate(Wire):
    """Ask for a one-time enrolment code (``POST /join-codes``).

    ``user`` defaults to the caller's own user; only an admin may name another user or ask for
    ``new_user`` (the enrolling device gets a new user named after it). With ``room`` the
    enrolled user joins that room as a member; the caller must own it (or be an admin), and a
    missing room is created with the caller's user as owner.
    """

    user: str | None = Field(default=None, min_length=1, max_length=32)
    room: str | None = Field(default=None, min_length=1, max_length=64)
    ttl: int | None = Field(default=None, ge=30, le=7 * 86400, description="seconds; default 600")
    new_user: bool = False


class JoinCode(Wire):
    code: str = Field(description="four groups of four Crockford base32 characters")
    expires_at: float


class CapabilityRequest(Wire):
    aud: str = Field(description="target device id")
    scope: Scope
    resource: str = Field(default="", max_length=256)
    ttl: int | None = Field(default=None, ge=1, le=300)


class CapabilityGrant(Wire):
    token: str
    expires_at: float


# ---------------------------------------------------------------- WebSocket


class Hello(Wire):
    type: Literal["hello"] = "hello"
    device_id: str
    session_id: str
    server_time: float
    heartbeat_interval: float
    online: list[str] = Field(default=[], description="reachable devices online now")


class Presence(Wire):
    type: Literal["presence"] = "presence"
    device_id: str
    online: bool
    at: float


class Signal(Wire):
    """Opaque message between two devices that share a room (client sends ``to``, gets ``from``)."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)
    type: Literal["signal"] = "signal"
    to: str | None = None
    from_: str | None = Field(default=None, alias="from")
    payload: dict[str, Any]


class Announce(Wire):
    """Client -> server: tell devices that share a room (all, or ``to``) about something.

    ``key`` names a standing announcement (a terminal session, a share offer): the server keeps
    it while the connection lives, re-sends it to devices that come online, and emits
    ``<kind>.ended`` when it is withdrawn or the connection drops. The client re-announces its
    standing announcements after a reconnect.
    """

    type: Literal["announce"] = "announce"
    kind: str = Field(min_length=1, max_length=64)
    data: dict[str, Any] = {}
    to: list[str] | None = None
    key: str | None = Field(default=None, max_length=128)


class Withdraw(Wire):
    type: Literal["withdraw"] = "withdraw"
    key: str


class Event(Wire):
    """Server -> client: something happened (room membership, announcements)."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)
    type: Literal["event"] = "event"
    kind: str
    from_: str | None = Field(default=None, alias="from")
    data: dict[str, Any] = {}
    key: str | None = Field(
        default=None, description="the standing announcement's key (also on `<kind>.ended`)"
    )


class WsError(Wire):
    type: Literal["error"] = "error"
    error: str
    message: str
    device_id: str | None = Field(
        default=None, description="the device the refused frame was addressed to, if any"
    )


WsMessage = Annotated[
    Hello | Presence | Signal | Announce | Withdraw | Event | WsError, Field(discriminator="type")
]
WS_MESSAGE: Final[TypeAdapter[WsMessage]] = TypeAdapter(WsMessage)


def dump_ws(message: Wire) -> str:
    return message.model_dump_json(by_alias=True, exclude_none=True)
