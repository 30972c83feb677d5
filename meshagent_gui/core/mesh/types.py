"""Wire types of the control plane, defined once and used by the agent and the reference server.

REST bodies are pydantic models (the server's OpenAPI schema is generated from them); WebSocket
messages are JSON objects with a ``type`` field, parsed with :data:`WS_MESSAGE` (a tagged union).
See docs/server-api.md for the contract any Mesh Server must offer.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Final, Literal, Self, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator
from pydantic.json_schema import SkipJsonSchema

API_PREFIX: Final = "/api/v1"
# Relay frames (/api/v1/relay): a raw device id, then one QUIC datagram.
RELAY_ID_BYTES: Final = 32
RELAY_MAX_DATAGRAM: Final = 1500
# Offered as the WebSocket subprotocol, it makes a relay frame a batch: the id, then one or more
# datagrams each after its 2-byte big-endian length, a frame at most RELAY_MAX_BATCH bytes.
RELAY_BATCH_PROTOCOL: Final = "meshagent-relay-batch"
RELAY_MAX_BATCH: Final = 32 * 1024
# WebSocket close codes of /ws and /relay (docs/server-api.md): refresh the token and retry.
CLOSE_UNAUTHORIZED: Final = 4401  # bad or expired access token
CLOSE_REVOKED: Final = 4403  # the session was revoked; a refused refresh means: enrol again
# p2p:connect admits a QUIC connection (its first stream); the others admit service streams.
Scope = Literal[
    "p2p:connect",
    "share:file",
    "share:folder",
    "terminal:view",
    "terminal:control",
    "tunnel:connect",
    "terminal:open",
]
SCOPES: Final[tuple[Scope, ...]] = get_args(Scope)
Role = Literal["owner", "member", "viewer"]
# Granted only toward the caller's own devices (the personal room): no room role gives them.
OWN_DEVICES_ONLY: Final = frozenset({"terminal:open"})

# Which scopes each room role may ask for toward the other devices of the room.
ROLE_SCOPES: Final[dict[str, frozenset[str]]] = {
    "owner": frozenset(SCOPES) - OWN_DEVICES_ONLY,
    "member": frozenset(SCOPES) - OWN_DEVICES_ONLY,
    "viewer": frozenset({"p2p:connect", "terminal:view"}),
}
PERSONAL_ROOM_PREFIX: Final = "@"


def personal_room(user: str) -> str:
    """A user's own room: all of their devices and nobody else (nobody can be invited)."""
    return PERSONAL_ROOM_PREFIX + user


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
    # The deployment's TURN servers (turn:host:port), when it has one; credentials come from
    # POST /turn/credentials (TurnCredentials).
    turn_urls: list[str] = []
    # The latest Mesh Agent release the server knows of (`server --agent-version`), or None.
    agent_version: str | None = None


class TurnCredentials(Wire):
    """Short-lived credentials for the advertised TURN servers (coturn's REST scheme): usable
    until ``expires_at`` (unix seconds), then refused by the TURN server itself."""

    urls: list[str]
    username: str
    password: str
    expires_at: int


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


ENROLL_PROOF_CONTEXT: Final = b"mesh-enroll-v1\n"
CHALLENGE_TTL: Final = 120


def enroll_proof_message(server_id: str, nonce: str, certificate_der: bytes) -> bytes:
    """What the enrolling device signs with its key: binds the server, the nonce and the cert."""
    digest = hashlib.sha256(certificate_der).hexdigest()
    return ENROLL_PROOF_CONTEXT + f"{server_id}\n{nonce}\n{digest}".encode()


class EnrollChallenge(Wire):
    """``POST /enroll/challenge``: a single-use nonce the enrolling device signs."""

    nonce: str
    expires_in: int = Field(description="seconds the nonce stays valid")


# The two ways to enrol, as JSON Schema: exactly one of the two sets of fields.
_ENROLL_CREDENTIALS: Final[dict[str, Any]] = {
    "oneOf": [
        {
            "required": ["join_code"],
            "not": {"anyOf": [{"required": ["username"]}, {"required": ["password"]}]},
        },
        {"required": ["username", "password"], "not": {"required": ["join_code"]}},
    ]
}


class _EnrollCredentials(Wire):
    """How an enrolment proves the right to join: a join code, or a username and password."""

    model_config = ConfigDict(extra="ignore", frozen=True, json_schema_extra=_ENROLL_CREDENTIALS)
    # The length limits sit on the str, not the union: on the union pydantic applies them to a
    # JSON null too and fails with a TypeError (a 500, found by the schemathesis fuzz test).
    join_code: Annotated[str, Field(max_length=64)] | SkipJsonSchema[None] = None
    username: Annotated[str, Field(max_length=64)] | SkipJsonSchema[None] = None
    password: Annotated[str, Field(max_length=1024)] | SkipJsonSchema[None] = None

    @model_validator(mode="after")
    def _one_way_to_enroll(self) -> Self:
        by_code = self.join_code is not None
        by_password = self.username is not None or self.password is not None
        half_password = by_password and (self.username is None or self.password is None)
        if by_code == by_password or half_password:
            raise ValueError("give either join_code, or username and password")
        return self


class EnrollRequest(_EnrollCredentials):
    """``POST /enroll``: either ``join_code``, or ``username`` and ``password`` (never both).

    ``nonce`` comes from ``POST /enroll/challenge``; ``signature`` is the device key's signature
    (ECDSA-SHA256, DER, base64url without padding) over :func:`enroll_proof_message`: it proves
    the caller holds the key of ``certificate``, which is public (every P2P peer sees it).
    """

    device_name: str = Field(min_length=1, max_length=64)
    platform: str = Field(default="", max_length=32)
    certificate: str = Field(
        max_length=16384, description="the device's self-signed X.509 certificate, PEM"
    )
    nonce: str = Field(min_length=1, max_length=128, description="from POST /enroll/challenge")
    signature: str = Field(
        min_length=1,
        max_length=512,
        description="base64url (no padding) signature of the device key over the enrolment proof",
    )


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


class MemberUpdate(Wire):
    """``PATCH /rooms/{name}/members/{user}``: an owner changes an existing member's role."""

    role: Role


class InvitationCreate(Wire):
    """``POST /rooms/{name}/invitations``: an owner invites a user, who must accept."""

    user: str = Field(min_length=1, max_length=32)
    role: Role = "member"


class Invitation(Wire):
    """A pending invitation, as its invitee sees it (``GET /invitations``)."""

    room: str
    role: Role
    invited_by: str
    created_at: float
    expires_at: float


class InvitationList(Wire):
    invitations: list[Invitation]


class StatusAnswer(Wire):
    """An answer that says only that the request was taken (it reveals nothing else)."""

    status: str


class RoomJoinCodeCreate(Wire):
    ttl: int | None = Field(default=None, ge=30, le=7 * 86400, description="seconds; default 600")


class RoomJoin(Wire):
    """``POST /rooms/join``: join a room with a code its owner gave you."""

    code: str = Field(min_length=1, max_length=64)


class AuditEntry(Wire):
    id: int
    at: float
    kind: str = Field(
        description="device.enrolled, session.revoked, capability.granted, room.invited, "
        "room.joined, room.left, room.role_changed, terminal.control or link.claimed"
    )
    room: str | None = None
    actor_user: str | None = None
    actor_device: str | None = None
    subject: str | None = None
    detail: dict[str, Any] = {}


class AuditLog(Wire):
    entries: list[AuditEntry]


class NotifySettings(Wire):
    """The caller's own Gotify target; the token itself is never sent back."""

    gotify_url: str | None = None
    token_set: bool = False


class NotifySettingsUpdate(Wire):
    """``PUT /users/self/notify``; ``gotify_url`` null switches the notifications off."""

    gotify_url: str | None = Field(default=None, min_length=1, max_length=512)
    gotify_token: str | None = Field(default=None, min_length=1, max_length=256)


class TerminalControlReport(Wire):
    """``POST /terminal/control``: the host reports who controls its terminal session now."""

    session_id: str = Field(min_length=1, max_length=128)
    controller_device: str | None = Field(
        default=None, max_length=64, description="null: nobody (control released or revoked)"
    )
    rooms: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default=[], max_length=32, description="the rooms the session is shared in"
    )


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
    room: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="the room whose role grants the scope; omitted: your personal room for "
        "your own devices, else the first shared room (by name) whose role allows it",
    )


class CapabilityGrant(Wire):
    token: str
    expires_at: float
    room: str | None = Field(default=None, description="the room the grant came from")


# ---------------------------------------------------------------- browsers and share links

# A browser's device id: the SHA-256 of its RTCCertificate (what its SDP's a=fingerprint says).
FINGERPRINT_PATTERN: Final = r"^[0-9a-f]{64}$"
BROWSER_PLATFORM: Final = "browser"
GUEST_PLATFORM: Final = "guest"  # a share link's recipient: reaches its one sender, nothing else
# Devices reached over WebRTC only (they have no QUIC endpoint).
WEBRTC_PLATFORMS: Final = frozenset({BROWSER_PLATFORM, GUEST_PLATFORM})
WS_TICKET_TTL: Final = 30
LINK_TTL: Final = 900
MAX_LINK_TTL: Final = 86400


class BrowserEnrollRequest(_EnrollCredentials):
    """``POST /enroll/browser``: a web page enrols its RTCCertificate's fingerprint.

    No proof of possession (a page can neither sign with nor export its certificate's key):
    DTLS proves it on every connection instead, and a token for this id is useless without it.
    """

    device_name: str = Field(min_length=1, max_length=64)
    fingerprint: str = Field(
        pattern=FINGERPRINT_PATTERN,
        description="SHA-256 of the page's RTCCertificate, 64 lowercase hex digits",
    )


class WsTicket(Wire):
    """``POST /ws/ticket``: a single-use ticket for ``GET /ws?ticket=`` (browsers cannot set
    headers on a WebSocket)."""

    ticket: str
    expires_in: int = Field(description="seconds the ticket stays valid")


class LinkCreate(Wire):
    """``POST /links``: the sender's agent asks for a one-time share link."""

    name: str = Field(min_length=1, max_length=255, description="what the recipient will save")
    size: int = Field(
        ge=0, le=2**53, description="bytes, as the recipient will receive them (a JS number)"
    )
    ttl: int | None = Field(
        default=None, ge=30, le=MAX_LINK_TTL, description="seconds; default 900"
    )


class ShareLink(Wire):
    link_id: str
    secret: str = Field(description="goes in the URL's fragment, never to the server in a path")
    path: str = Field(description="/s/<link_id>; the URL is <server>/s/<link_id>#<secret>")
    expires_at: float


class LinkStatus(Wire):
    """``GET /links/{link_id}``: the sender's view of its link (``guest`` once claimed)."""

    link_id: str
    expires_at: float
    guest: str | None = None


class LinkClaim(Wire):
    """``POST /links/{link_id}/claim``: the page that opened the link claims it (once)."""

    secret: str = Field(min_length=1, max_length=128)
    fingerprint: str = Field(pattern=FINGERPRINT_PATTERN)


class LinkClaimed(Wire):
    """A guest session: reaches the link's sender and nothing else; no refresh token."""

    access_token: str
    expires_in: int
    device_id: str
    server_id: str
    keys: list[PublicKey]
    sender: str = Field(description="the sender's device id (the one that will dial the guest)")
    sender_name: str
    name: str
    size: int


# ---------------------------------------------------------------- WebSocket


class ServerHello(Wire):
    type: Literal["hello"] = "hello"
    device_id: str
    session_id: str
    server_time: float
    heartbeat_interval: float
    online: list[str] = Field(default=[], description="reachable devices online now")
    access_expires_at: float | None = Field(
        default=None,
        description="server time when this socket closes (4401) unless an `auth` frame renews it",
    )


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
    rooms: list[Annotated[str, Field(min_length=1, max_length=65)]] | None = Field(
        default=None,
        max_length=32,
        description="rooms to announce into (the announcer must be in each); "
        "default: the announcer's personal room, i.e. its own devices",
    )


class Withdraw(Wire):
    type: Literal["withdraw"] = "withdraw"
    key: str


class ServerEvent(Wire):
    """Server -> client: something happened (room membership, announcements)."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)
    type: Literal["event"] = "event"
    kind: str
    from_: str | None = Field(default=None, alias="from")
    data: dict[str, Any] = {}
    key: str | None = Field(
        default=None, description="the standing announcement's key (also on `<kind>.ended`)"
    )
    rooms: list[str] = Field(
        default=[], description="the announcement's rooms that the recipient is in"
    )


class Auth(Wire):
    """Client -> server on `/ws`: a fresh access token for this socket (after a refresh).

    The server answers nothing on success (the socket now lives until this token expires) and
    closes 4401 when the token is not valid for this device.
    """

    type: Literal["auth"] = "auth"
    access_token: str = Field(min_length=1, max_length=512)


class WsError(Wire):
    type: Literal["error"] = "error"
    error: str
    message: str
    device_id: str | None = Field(
        default=None, description="the device the refused frame was addressed to, if any"
    )


WsMessage = Annotated[
    ServerHello | Presence | Signal | Announce | Withdraw | ServerEvent | WsError | Auth,
    Field(discriminator="type"),
]
WS_MESSAGE: Final[TypeAdapter[WsMessage]] = TypeAdapter(WsMessage)


def dump_ws(message: Wire) -> str:
    return message.model_dump_json(by_alias=True, exclude_none=True)
