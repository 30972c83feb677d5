"""The REST API and WebSocket endpoint of the reference Mesh Server (docs/server-api.md)."""

from __future__ import annotations

import contextlib
import logging
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Annotated, Any, Concatenate, Final, ParamSpec, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from fastapi import APIRouter, Depends, FastAPI, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.status import WS_1008_POLICY_VIOLATION

from meshagent_gui import __version__
from meshagent_gui.core.mesh.types import (
    API_PREFIX,
    BROWSER_PLATFORM,
    CLOSE_REVOKED,
    GUEST_PLATFORM,
    LINK_TTL,
    RELAY_BATCH_PROTOCOL,
    WEBRTC_PLATFORMS,
    ApiError,
    AuditEntry,
    AuditLog,
    BrowserEnrollRequest,
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
    JoinCodeCreate,
    KeySet,
    LinkClaim,
    LinkClaimed,
    LinkCreate,
    LinkStatus,
    MemberUpdate,
    NotifySettings,
    NotifySettingsUpdate,
    RefreshRequest,
    Room,
    RoomCreate,
    RoomJoin,
    RoomJoinCodeCreate,
    RoomList,
    ServerInfo,
    ShareLink,
    StatusAnswer,
    TerminalControlReport,
    TokenPair,
    TurnCredentials,
    WsTicket,
)
from meshagent_gui.server.hub import Hub, HubLimits
from meshagent_gui.server.limits import MAX_BODY_BYTES, BodyLimit, FailureLimiter
from meshagent_gui.server.notify import NotifySettingsError, UserNotifier, check_target
from meshagent_gui.server.passwords import Passwords, PasswordsBusy
from meshagent_gui.server.proof import ChallengeCache, holds_key
from meshagent_gui.server.relay import Relay, offers_batches
from meshagent_gui.server.store import (
    JOIN_CODE_TTL,
    PERSONAL_ROOM_PREFIX,
    AsyncStore,
    AuditRecord,
    DeviceRecord,
    Enrolment,
    NewDevice,
    Principal,
    RefreshReuse,
    RoomRecord,
    Store,
    StoreError,
    personal_room,
)
from meshagent_gui.server.tickets import TicketBook
from meshagent_gui.server.tokens import SigningKeys
from meshagent_gui.server.turn import TurnIssuer
from meshagent_gui.server.web_page import OriginGuard, mount_web_page

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

KEYS_FILE_NAME: Final = "signing-keys.json"
CLOSE_UNAUTHORIZED: Final = 4401

# The HTTP status of every stable error code.
ERROR_STATUS: Final[dict[str, int]] = {
    "invalid_request": 422,
    "bad_certificate": 400,
    "unauthorized": 401,
    "invalid_credentials": 401,
    "join_code_unknown": 401,
    "join_code_expired": 401,
    "join_code_used": 401,
    "invalid_refresh_token": 401,
    "invalid_proof": 401,
    "forbidden": 403,
    "forbidden_origin": 403,
    "not_allowed": 403,
    "not_found": 404,
    "unknown_device": 404,
    "unknown_room": 404,
    "unknown_user": 404,
    "link_unknown": 404,
    "link_claimed": 409,
    "link_expired": 410,
    "method_not_allowed": 405,
    "room_exists": 409,
    "user_exists": 409,
    "too_large": 413,
    "rate_limited": 429,
}
# Refusals that count toward the per-address limit of failed login / join-code attempts.
# A wrong enrolment proof counts too: the nonce is a secret of sorts, and an honest device
# never gets one wrong.
GUESSING_ERRORS: Final = frozenset(
    {
        "invalid_credentials",
        "join_code_unknown",
        "join_code_expired",
        "join_code_used",
        "invalid_proof",
        "link_unknown",
    }
)
# What a share link's sender may ask toward its guest: connect, and send it what it claimed.
GUEST_SCOPES: Final = frozenset({"p2p:connect", "share:file", "share:folder"})
# What a share link's guest may call (besides the unauthenticated endpoints): its socket, and
# the one device it may reach. Everything else answers 403 forbidden.
GUEST_PATHS: Final = frozenset({API_PREFIX + "/ws/ticket", API_PREFIX + "/devices"})


class ApiException(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def from_store(cls, error: StoreError) -> ApiException:
        return cls(error.code, error.message)


@contextlib.contextmanager
def guessing_attempt(limiter: FailureLimiter, key: str, now: float) -> Iterator[None]:
    """One attempt at a secret (password, join code), counted before it runs.

    Refused with ``rate_limited`` when ``key`` has no attempts left. The reserved slot is given
    back unless the attempt ends with a guessing error (:data:`GUESSING_ERRORS`) or invalid
    proof, so concurrent guesses can never all pass a check made before any of them failed.
    """
    slot = limiter.reserve(key, now)
    if slot is None:
        raise ApiException("rate_limited", "Too many failed attempts; try again later.")
    try:
        yield
    except ApiException as exc:
        if exc.code not in GUESSING_ERRORS:
            slot.release()
        raise
    except StoreError as exc:
        if exc.code not in GUESSING_ERRORS:
            slot.release()
        raise
    except BaseException:
        slot.release()
        raise
    slot.release()


@dataclass
class ServerState:
    """Everything the app needs: database, keys, hub, limits. Built by :meth:`open`."""

    name: str
    db: AsyncStore
    keys: SigningKeys
    hub: Hub
    relay: Relay
    passwords: Passwords = field(default_factory=Passwords)
    limiter: FailureLimiter = field(default_factory=FailureLimiter)
    challenges: ChallengeCache = field(default_factory=ChallengeCache)  # enrolment nonces
    clock: Callable[[], float] = time.time
    stun_port: int | None = None  # set by the runner once its UDP socket is bound
    agent_version: str | None = None  # the latest agent release, announced in /info
    turn: TurnIssuer | None = None  # the deployment's TURN server, if any (server/turn.py)
    # Origins besides the server's own whose pages may call the API (OriginGuard, CORS).
    allowed_origins: tuple[str, ...] = ()
    tickets: TicketBook = field(default_factory=TicketBook)  # browsers' /ws tickets
    notifier: UserNotifier = field(init=False)  # per-user Gotify; tests replace it

    def __post_init__(self) -> None:
        self.notifier = UserNotifier(self.db)

    @property
    def server_id(self) -> str:
        return self.db.store.server_id

    def revoke_sockets(self, session_ids: Iterable[str]) -> None:
        """Close the `/ws` and `/relay` sockets of revoked sessions now (close code 4403).

        Call it with the ids a store method revoked (refresh-token reuse, re-enrolment, device
        removal); the hub's sweep would find them within seconds anyway, this is at once.
        """
        ids = frozenset(session_ids)
        if ids:
            self.hub.close_sessions(ids, CLOSE_REVOKED)
            self.relay.close_sessions(ids, CLOSE_REVOKED)

    @classmethod
    def open(
        cls,
        data_dir: Path,
        *,
        name: str = "Mesh Server",
        heartbeat_interval: float = 10.0,
        passwords: Passwords | None = None,
        limiter: FailureLimiter | None = None,
        hub_limits: HubLimits | None = None,
        clock: Callable[[], float] = time.time,
        allowed_origins: Iterable[str] = (),
    ) -> ServerState:
        """Open the store and keys in ``data_dir`` (blocking: call it off the event loop)."""
        store = Store.open(data_dir)
        try:
            keys = SigningKeys.load_or_create(data_dir / KEYS_FILE_NAME)
        except BaseException:
            store.close()
            raise
        db = AsyncStore(store)
        hub = Hub(db, heartbeat_interval=heartbeat_interval, limits=hub_limits, clock=clock)
        return cls(
            name=name,
            db=db,
            keys=keys,
            hub=hub,
            relay=Relay(hub),
            passwords=passwords or Passwords(),
            limiter=limiter or FailureLimiter(),
            clock=clock,
            allowed_origins=tuple(allowed_origins),
        )

    def close(self) -> None:
        self.hub.stop()
        self.passwords.close()
        self.db.close()


def _error_response(code: str, message: str) -> JSONResponse:
    return JSONResponse(
        ApiError(error=code, message=message).model_dump(), status_code=ERROR_STATUS.get(code, 400)
    )


def _describe_validation(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "The request is not valid."
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    message = str(first.get("msg", "invalid"))
    return f"Invalid request: {where}: {message}." if where else f"Invalid request: {message}."


def _load_certificate(pem: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise ApiException(
            "bad_certificate", "The certificate is not a PEM X.509 certificate."
        ) from exc


def _check_possession(
    certificate: x509.Certificate, body: EnrollRequest, state: ServerState
) -> None:
    """The enrolling device must hold the certificate's key (the certificate itself is public)."""
    fresh = state.challenges.redeem(body.nonce, state.clock())
    if not fresh or not holds_key(
        certificate, server_id=state.server_id, nonce=body.nonce, signature=body.signature
    ):
        raise ApiException(
            "invalid_proof",
            "The enrolment proof is missing, expired or not signed with this certificate's key;"
            " fetch a new challenge (POST /enroll/challenge) and sign it.",
        )


async def _forbidden_origin(scope: Any, receive: Any, send: Any) -> None:
    """The 403 of :class:`OriginGuard`: a page of another site called the API."""
    response = _error_response(
        "forbidden_origin", "Requests from pages of other sites are not accepted here."
    )
    await response(scope, receive, send)


async def _too_large(scope: Any, receive: Any, send: Any) -> None:
    """The 413 of :class:`BodyLimit`; the connection closes so the rest is never read."""
    message = f"The request body is larger than {MAX_BODY_BYTES} bytes."
    response = _error_response("too_large", message)
    response.headers["Connection"] = "close"
    await response(scope, receive, send)


def _allowed_methods(routes: Iterable[BaseRoute], scope: Any) -> str:
    """The ``Allow`` header of a 405: the methods of every route on the path, not just one."""
    methods: set[str] = set()
    for route in routes:
        match, _ = route.matches(scope)  # PARTIAL: the path matches, the method does not
        route_methods = getattr(route, "methods", None)
        if match != Match.NONE and route_methods:
            methods |= set(route_methods)
    return ", ".join(sorted(methods))


def _clean_device_name(name: str) -> str:
    cleaned = name.strip()
    if not cleaned or any(unicodedata.category(char).startswith("C") for char in cleaned):
        raise ApiException(
            "invalid_request", "The device name must be printable text (1-64 characters)."
        )
    return cleaned


def _client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _room(record: RoomRecord) -> Room:
    return Room(name=record.name, role=record.role, members=list(record.members))


def _audit_entry(record: AuditRecord) -> AuditEntry:
    return AuditEntry(
        id=record.id,
        at=record.at,
        kind=record.kind,
        room=record.room,
        actor_user=record.actor_user,
        actor_device=record.actor_device,
        subject=record.subject,
        detail=record.detail,
    )


# The Authorization header is read by hand (not HTTPBearer's auto_error) so a missing or bad
# token answers our own 401 body; the scheme is still declared for the OpenAPI document.
_bearer = HTTPBearer(auto_error=False, description="the access token from /enroll")


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI: the error statuses a route may answer, all with the ApiError body.

    Every route may answer 413 (:class:`BodyLimit` refuses any request body over the cap) and
    422 (validation).
    """
    return {status: {"model": ApiError} for status in (*statuses, 413, 422)}


async def _authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    state: ServerState = request.app.state.mesh
    principal = None
    if credentials is not None:
        principal = await state.db.call(
            Store.authenticate, credentials.credentials, now=state.clock()
        )
    if principal is None:
        raise ApiException("unauthorized", "Missing, unknown or expired access token.")
    if principal.guest_of is not None and request.url.path not in GUEST_PATHS:
        raise ApiException("forbidden", "A share link's guest may only receive what it was sent.")
    return principal


Caller = Annotated[Principal, Depends(_authenticate)]


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(
        title="Mesh Server",
        version=__version__,
        description="The control plane of Mesh Agent (reference implementation). "
        "See docs/server-api.md.",
    )
    app.state.mesh = state
    router = APIRouter(prefix=API_PREFIX)
    hub = state.hub

    @app.exception_handler(ApiException)
    async def api_error(_: Request, exc: ApiException) -> JSONResponse:
        return _error_response(exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response("invalid_request", _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's own "There was an error parsing the body" (e.g. JSON that is not UTF-8):
            # the documented answer to a body that cannot be read is 422 invalid_request.
            return _error_response("invalid_request", "The request body is not valid JSON.")
        if exc.status_code == 413:
            return _error_response("too_large", str(exc.detail))
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(
            exc.status_code, "invalid_request"
        )
        response = _error_response(code, str(exc.detail))
        response.status_code = exc.status_code
        if exc.status_code == 405:
            routes = [*app.router.routes, *router.routes]
            response.headers["Allow"] = _allowed_methods(routes, request.scope)
        return response

    # A body over the cap is refused before anything reads it.
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES, too_large=_too_large)
    if state.allowed_origins:
        # Pages of the allowed origins need CORS answers (preflights) to send Authorization.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(state.allowed_origins),
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )
    # Outermost: a foreign page is refused before anything else runs.
    app.add_middleware(OriginGuard, allowed=state.allowed_origins, refuse=_forbidden_origin)
    mount_web_page(app)

    async def store_call(
        method: Callable[Concatenate[Store, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """A store call whose refusals become API errors."""
        try:
            return await state.db.call(method, *args, **kwargs)
        except StoreError as exc:
            raise ApiException.from_store(exc) from None

    def device_model(record: DeviceRecord, rooms: tuple[str, ...] = ()) -> Device:
        return Device(
            id=record.id,
            name=record.name,
            platform=record.platform,
            user=record.user,
            online=hub.is_online(record.id),
            last_seen=record.last_seen,
            addresses=list(record.addresses),
            rooms=list(rooms),
        )

    # ------------------------------------------------------------ enrolment and tokens

    @router.get("/info", responses=_errors())
    async def info() -> ServerInfo:
        return ServerInfo(
            server_id=state.server_id,
            name=state.name,
            version=__version__,
            time=state.clock(),
            stun_port=state.stun_port,
            turn_urls=list(state.turn.config.urls) if state.turn else [],
            agent_version=state.agent_version,
        )

    @router.post("/turn/credentials", responses=_errors(401, 403, 404, 429))
    async def turn_credentials(caller: Caller) -> TurnCredentials:
        """Short-lived credentials for the advertised TURN servers (server/turn.py)."""
        if state.turn is None:
            raise ApiException("not_found", "This server has no TURN relay configured.")
        issued = state.turn.issue(caller.device_id, state.clock())
        if issued is None:
            raise ApiException("rate_limited", "Too many TURN credential requests; slow down.")
        return issued

    @router.get("/keys", responses=_errors())
    async def keys() -> KeySet:
        state.keys.reload_if_changed()
        return KeySet(keys=state.keys.public_keys())

    @router.post("/enroll/challenge", responses=_errors())
    async def enroll_challenge() -> EnrollChallenge:
        """A single-use nonce for the enrolment proof (see EnrollRequest)."""
        challenges = state.challenges
        return EnrollChallenge(nonce=challenges.issue(state.clock()), expires_in=challenges.ttl)

    @router.post("/enroll", responses=_errors(400, 401, 403, 429))
    async def enroll(body: EnrollRequest, request: Request) -> EnrollResponse:
        if body.platform in WEBRTC_PLATFORMS:
            # They mean "reach it over WebRTC only" (and a guest: "in no room"): set by the
            # server for pages, never claimed by a device that proved a key.
            raise ApiException("invalid_request", f"The platform {body.platform!r} is reserved.")
        with guessing_attempt(state.limiter, _client_address(request), state.clock()):
            certificate = _load_certificate(body.certificate)
            device = NewDevice(
                id=sha256(certificate.public_bytes(Encoding.DER)).hexdigest(),
                name=_clean_device_name(body.device_name),
                platform=body.platform,
                certificate=body.certificate,
            )
            _check_possession(certificate, body, state)
            enrolment = await _enroll(body, device)
        return enrolled(enrolment)

    @router.post("/enroll/browser", responses=_errors(401, 403, 429))
    async def enroll_browser(body: BrowserEnrollRequest, request: Request) -> EnrollResponse:
        """A web page enrols the fingerprint of its RTCCertificate (no proof: see the model)."""
        with guessing_attempt(state.limiter, _client_address(request), state.clock()):
            device = NewDevice(
                id=body.fingerprint,
                name=_clean_device_name(body.device_name),
                platform=BROWSER_PLATFORM,
                certificate="",  # the page cannot export it; DTLS shows it on every use
            )
            enrolment = await _enroll(body, device)
        return enrolled(enrolment)

    def enrolled(enrolment: Enrolment) -> EnrollResponse:
        device = enrolment.device
        state.revoke_sockets(enrolment.revoked_sessions)
        if enrolment.membership is not None:
            hub.membership_changed(enrolment.membership)
        state.notifier.notify(
            enrolment.device.user,
            "Device enrolled",
            f"The device {device.name!r} ({device.platform or 'unknown platform'}) was enrolled"
            " on your account.",
        )
        state.keys.reload_if_changed()
        return EnrollResponse(
            device_id=enrolment.device.id,
            user=enrolment.device.user,
            server_id=state.server_id,
            keys=state.keys.public_keys(),
            access_token=enrolment.tokens.access_token,
            access_expires_in=enrolment.tokens.access_expires_in,
            refresh_token=enrolment.tokens.refresh_token,
        )

    async def _enroll(body: EnrollRequest | BrowserEnrollRequest, device: NewDevice) -> Enrolment:
        now = state.clock()
        if body.join_code is not None:
            return await store_call(Store.enroll_with_join_code, body.join_code, device, now=now)
        assert body.username is not None and body.password is not None  # the model's validator
        user = body.username.strip().lower()
        stored = await state.db.call(Store.password_hash, user)
        try:
            verified = await state.passwords.verify_async(stored, body.password)
        except PasswordsBusy:
            raise ApiException(
                "rate_limited", "The server is busy checking passwords; try again in a moment."
            ) from None
        if not verified:
            raise ApiException("invalid_credentials", "Wrong user name or password.")
        return await store_call(Store.enroll_user_device, user, device, now=now)

    @router.post("/token/refresh", responses=_errors(401))
    async def refresh(body: RefreshRequest) -> TokenPair:
        try:
            tokens = await state.db.call(Store.refresh, body.refresh_token, now=state.clock())
        except RefreshReuse as reuse:
            # The token leaked: its session is gone, and so must be the sockets it opened.
            state.revoke_sockets(reuse.revoked_sessions)
            if reuse.user is not None:
                state.notifier.notify(
                    reuse.user,
                    "Session revoked",
                    "A device's refresh token was used twice, so its session was revoked; that"
                    " device must log in again.",
                )
            raise ApiException.from_store(reuse) from None
        except StoreError as exc:
            raise ApiException.from_store(exc) from None
        return TokenPair(
            access_token=tokens.access_token,
            access_expires_in=tokens.access_expires_in,
            refresh_token=tokens.refresh_token,
        )

    @router.post("/join-codes", responses=_errors(401, 403, 404))
    async def create_join_code(body: JoinCodeCreate, caller: Caller) -> JoinCode:
        user: str | None = body.user or caller.user
        if body.new_user:
            if body.user is not None:
                raise ApiException("invalid_request", "Give either user or new_user, not both.")
            user = None
        if (user != caller.user) and not caller.admin:
            raise ApiException("forbidden", "Only an admin can make join codes for other users.")
        if body.room is not None and not caller.admin:
            await check_join_code_room(body.room, caller.user)
        code, expires_at = await store_call(
            Store.create_join_code,
            user=user,
            room=body.room,
            ttl=body.ttl or JOIN_CODE_TTL,
            now=state.clock(),
            room_owner=caller.user,
        )
        return JoinCode(code=code, expires_at=expires_at)

    async def check_join_code_room(room: str, user: str) -> None:
        """An enrolment code may name a room the caller owns, or a new one (made for them).

        No oracle beyond what creating a room already tells: a room the caller is not in
        answers like a taken name at ``POST /rooms``, another user's personal room like one
        that does not exist.
        """
        role = await state.db.call(Store.role, room, user)
        if role == "owner":
            return
        if role is not None:
            raise ApiException("forbidden", f"Only an owner of {room!r} can invite to it.")
        if room.startswith(PERSONAL_ROOM_PREFIX):
            raise ApiException("unknown_room", f"There is no room {room!r}.")
        if await state.db.call(Store.room_exists, room):
            raise ApiException("room_exists", f"The room {room!r} already exists.")

    # ------------------------------------------------------------ devices

    @router.get("/devices", responses=_errors(401))
    async def devices(caller: Caller) -> DeviceList:
        if caller.guest_of is not None:  # a share link's guest sees its sender, nobody else
            sender = await state.db.call(Store.device, caller.guest_of)
            return DeviceList(devices=[] if sender is None else [device_model(sender)])
        visible = await state.db.call(Store.visible_devices, caller.device_id)
        return DeviceList(devices=[device_model(record, rooms) for record, rooms in visible])

    @router.patch("/devices/self", responses=_errors(401))
    async def update_self(body: DeviceUpdate, caller: Caller) -> Device:
        name = None if body.name is None else _clean_device_name(body.name)
        record = await store_call(
            Store.update_device, caller.device_id, name=name, addresses=body.addresses
        )
        return device_model(record)

    # ------------------------------------------------------------ rooms (consented)

    @router.get("/rooms", responses=_errors(401))
    async def rooms(caller: Caller) -> RoomList:
        records = await state.db.call(Store.rooms_of, caller.user)
        return RoomList(rooms=[_room(record) for record in records])

    @router.post("/rooms", responses=_errors(401, 409))
    async def create_room(body: RoomCreate, caller: Caller) -> Room:
        record = await store_call(Store.create_room, body.name, caller.user, now=state.clock())
        hub.room_created(record.name, caller.user)
        return _room(record)

    @router.post("/rooms/{name}/invitations", status_code=202, responses=_errors(401, 403, 404))
    async def invite(name: str, body: InvitationCreate, caller: Caller) -> StatusAnswer:
        # The answer is the same whether the user exists, is a member already or was invited:
        # this endpoint is no user-name oracle.
        fresh = await store_call(
            Store.invite,
            name,
            body.user,
            body.role,
            by=caller.user,
            by_device=caller.device_id,
            now=state.clock(),
        )
        if fresh:
            data = {"room": name, "role": body.role, "invited_by": caller.user}
            hub.user_event(body.user, "room.invited", data)
            state.notifier.notify(
                body.user,
                "Room invitation",
                f"{caller.user} invites you to the room {name!r} as {body.role}. "
                "Accept with: meshagent rooms accept " + name,
            )
        return StatusAnswer(status="invited")

    @router.get("/invitations", responses=_errors(401))
    async def invitations(caller: Caller) -> InvitationList:
        records = await state.db.call(Store.invitations_of, caller.user, now=state.clock())
        return InvitationList(
            invitations=[
                Invitation(
                    room=r.room,
                    role=r.role,
                    invited_by=r.invited_by,
                    created_at=r.created_at,
                    expires_at=r.expires_at,
                )
                for r in records
            ]
        )

    @router.post("/invitations/{room}/accept", responses=_errors(401, 404))
    async def accept_invitation(room: str, caller: Caller) -> Room:
        change = await store_call(
            Store.accept_invitation, room, caller.user, device=caller.device_id, now=state.clock()
        )
        hub.membership_changed(change)
        return _room(await store_call(Store.room_for, room, caller.user))

    @router.post("/invitations/{room}/decline", responses=_errors(401, 404))
    async def decline_invitation(room: str, caller: Caller) -> StatusAnswer:
        await store_call(Store.decline_invitation, room, caller.user, now=state.clock())
        return StatusAnswer(status="declined")

    @router.post("/rooms/{name}/join-codes", responses=_errors(401, 403, 404))
    async def create_room_join_code(
        name: str, body: RoomJoinCodeCreate, caller: Caller
    ) -> JoinCode:
        code, expires_at = await store_call(
            Store.create_room_join_code,
            name,
            by=caller.user,
            ttl=body.ttl or JOIN_CODE_TTL,
            now=state.clock(),
        )
        return JoinCode(code=code, expires_at=expires_at)

    @router.post("/rooms/join", responses=_errors(401, 429))
    async def join_room(body: RoomJoin, caller: Caller, request: Request) -> Room:
        # The slot is reserved before the code is checked: atomic under concurrency.
        with guessing_attempt(state.limiter, _client_address(request), state.clock()):
            change = await store_call(
                Store.join_with_code,
                body.code,
                caller.user,
                device=caller.device_id,
                now=state.clock(),
            )
        hub.membership_changed(change)
        return _room(await store_call(Store.room_for, change.room, caller.user))

    @router.patch("/rooms/{name}/members/{user}", responses=_errors(401, 403, 404))
    async def set_role(name: str, user: str, body: MemberUpdate, caller: Caller) -> Room:
        change = await store_call(
            Store.set_role,
            name,
            user,
            body.role,
            by=caller.user,
            by_device=caller.device_id,
            now=state.clock(),
        )
        hub.membership_changed(change)
        return _room(await store_call(Store.room_for, name, caller.user))

    @router.delete("/rooms/{name}/members/{user}", responses=_errors(401, 403, 404))
    async def remove_member(name: str, user: str, caller: Caller) -> StatusAnswer:
        change = await store_call(
            Store.remove_member,
            name,
            user,
            by=caller.user,
            by_device=caller.device_id,
            now=state.clock(),
        )
        hub.membership_changed(change)
        return StatusAnswer(status="left" if user == caller.user else "removed")

    @router.get("/rooms/{name}/audit", responses=_errors(401, 403, 404))
    async def audit(
        name: str, caller: Caller, limit: Annotated[int, Query(ge=1, le=500)] = 100
    ) -> AuditLog:
        records = await store_call(Store.audit_log, name, by=caller.user, limit=limit)
        return AuditLog(entries=[_audit_entry(record) for record in records])

    # ------------------------------------------------------------ capabilities

    @router.post("/capabilities", responses=_errors(401, 403, 404))
    async def capability(body: CapabilityRequest, caller: Caller) -> CapabilityGrant:
        target = await state.db.call(Store.device, body.aud)
        if target is None:
            raise ApiException("unknown_device", "There is no such device.")
        if target.id == caller.device_id:
            raise ApiException(
                "not_allowed", f"You may not ask for {body.scope!r} toward that device."
            )
        room: str | None
        if target.platform == GUEST_PLATFORM:
            # A share link's guest is reached by its sender only, to be sent what it claimed.
            sender = await state.db.call(Store.guest_sender, target.id)
            if sender != caller.device_id:
                raise ApiException("unknown_device", "There is no such device.")
            if body.scope not in GUEST_SCOPES:
                raise ApiException(
                    "not_allowed", f"You may not ask for {body.scope!r} toward a guest."
                )
            room = None
        else:
            # One room decides (the named one, or the store's pick), never the best role overall.
            room = await store_call(
                Store.grant_room, caller.user, target.user, body.scope, body.room
            )
        state.keys.reload_if_changed()
        now = state.clock()
        token, expires_at = state.keys.issue(
            issuer=state.server_id,
            holder=caller.device_id,
            target=target.id,
            scope=body.scope,
            resource=body.resource,
            now=now,
            ttl=body.ttl or 300,
            room=room,
        )
        await state.db.call(
            Store.record,
            "capability.granted",
            room=room or personal_room(caller.user),  # toward a guest: the sender's own log
            actor_user=caller.user,
            actor_device=caller.device_id,
            subject=target.id,
            detail={"scope": body.scope, "resource": body.resource, "expires_at": expires_at},
            now=now,
        )
        return CapabilityGrant(token=token, expires_at=expires_at, room=room)

    # ------------------------------------------------------------ terminal control, notify

    @router.post("/terminal/control", status_code=202, responses=_errors(401, 404))
    async def terminal_control(body: TerminalControlReport, caller: Caller) -> StatusAnswer:
        """The host device reports who controls its terminal session now."""
        rooms = sorted(set(body.rooms)) or [personal_room(caller.user)]
        controller = await store_call(
            Store.record_terminal_control,
            session_id=body.session_id,
            host_user=caller.user,
            host_device=caller.device_id,
            controller_device=body.controller_device,
            rooms=rooms,
            now=state.clock(),
        )
        data = {
            "session_id": body.session_id,
            "host_device": caller.device_id,
            "host_user": caller.user,
            "controller_device": body.controller_device,
            "controller_user": None if controller is None else controller.user,
        }
        hub.room_event(rooms, "terminal.control", data)
        if controller is not None and controller.id != caller.device_id:
            state.notifier.notify(
                caller.user,
                "Terminal control granted",
                f"{controller.name} ({controller.user}) now controls your terminal session "
                f"{body.session_id}.",
            )
        return StatusAnswer(status="recorded")

    @router.get("/users/self/notify", responses=_errors(401))
    async def notify_settings(caller: Caller) -> NotifySettings:
        return await current_notify(caller.user)

    @router.put("/users/self/notify", responses=_errors(401))
    async def set_notify_settings(body: NotifySettingsUpdate, caller: Caller) -> NotifySettings:
        url = None
        if body.gotify_url is not None:
            try:
                url = await check_target(body.gotify_url, body.gotify_token)
            except NotifySettingsError as exc:
                raise ApiException("invalid_request", str(exc)) from None
        await store_call(Store.set_notify, caller.user, url, body.gotify_token)
        return await current_notify(caller.user)

    async def current_notify(user: str) -> NotifySettings:
        target = await state.db.call(Store.notify_target, user)
        if target is None:
            return NotifySettings()
        return NotifySettings(gotify_url=target.url, token_set=target.token is not None)

    # ------------------------------------------------------------ share links

    @router.post("/links", responses=_errors(401, 403, 429))
    async def create_link(body: LinkCreate, caller: Caller) -> ShareLink:
        """The sender's agent asks for a one-time link; the page at /s/<id>#<secret> claims it."""
        link, secret = await store_call(
            Store.create_link,
            caller.device_id,
            name=body.name,
            size=body.size,
            ttl=body.ttl or LINK_TTL,
            now=state.clock(),
        )
        return ShareLink(
            link_id=link.id, secret=secret, path=f"/s/{link.id}", expires_at=link.expires_at
        )

    @router.get("/links/{link_id}", responses=_errors(401, 404))
    async def link_status(link_id: str, caller: Caller) -> LinkStatus:
        """The sender asks whether its link was claimed (the event may have found it offline)."""
        link, guest = await store_call(Store.link_status, link_id, caller.device_id)
        return LinkStatus(link_id=link.id, expires_at=link.expires_at, guest=guest)

    @router.delete("/links/{link_id}", responses=_errors(401, 404, 409))
    async def withdraw_link(link_id: str, caller: Caller) -> StatusAnswer:
        """The sender cancelled before anyone opened the link: nobody may claim it now."""
        await store_call(Store.withdraw_link, link_id, caller.device_id, now=state.clock())
        return StatusAnswer(status="withdrawn")

    @router.post("/links/{link_id}/claim", responses=_errors(403, 404, 409, 410, 429))
    async def claim_link(link_id: str, body: LinkClaim, request: Request) -> LinkClaimed:
        with guessing_attempt(state.limiter, _client_address(request), state.clock()):
            claim = await store_call(
                Store.claim_link, link_id, body.secret, body.fingerprint, now=state.clock()
            )
        # The sender's agent dials the guest now (over WebRTC) and sends what the link names.
        hub.device_event(
            claim.sender.id,
            "link.claimed",
            {"link_id": link_id, "guest": claim.guest.id, "name": claim.link.name},
        )
        state.keys.reload_if_changed()
        return LinkClaimed(
            access_token=claim.tokens.access_token,
            expires_in=claim.tokens.access_expires_in,
            device_id=claim.guest.id,
            server_id=state.server_id,
            keys=state.keys.public_keys(),
            sender=claim.sender.id,
            sender_name=claim.sender.name,
            name=claim.link.name,
            size=claim.link.size,
        )

    # ------------------------------------------------------------ WebSocket

    @router.post("/ws/ticket", responses=_errors(401))
    async def ws_ticket(caller: Caller) -> WsTicket:
        """A single-use ticket opening this device's ``/ws`` (for pages: no header there)."""
        tickets = state.tickets
        return WsTicket(ticket=tickets.issue(caller, state.clock()), expires_in=int(tickets.ttl))

    async def accept_device(
        socket: WebSocket, *, ticket_allowed: bool = False, subprotocol: str | None = None
    ) -> Principal | None:
        principal = None
        scheme, _, token = socket.headers.get("authorization", "").partition(" ")
        ticket = socket.query_params.get("ticket") if ticket_allowed else None
        if scheme.lower() == "bearer" and token.strip():
            principal = await state.db.call(Store.authenticate, token.strip(), now=state.clock())
        elif ticket:
            principal = await redeem_ticket(ticket)
        # Accept first so the refusal is a close code (4401) the agent can act on.
        await socket.accept(subprotocol=subprotocol)
        if principal is None:
            await socket.close(CLOSE_UNAUTHORIZED, "unauthorized")
        return principal

    async def redeem_ticket(ticket: str) -> Principal | None:
        principal = state.tickets.redeem(ticket, state.clock())
        if principal is None:
            return None
        # Revoked since the ticket was issued (or the token expired): no socket.
        live = await state.db.call(Store.live_sessions, {principal.session_id})
        if principal.session_id not in live or principal.access_expires_at <= state.clock():
            return None
        return principal

    # Both sockets live as long as the session: the hub's sweep closes them 4401 when the token
    # they were opened with expires (unless /ws renewed it with an `auth` frame) and 4403 when
    # the session is revoked (state.revoke_sockets does that at once).
    @router.websocket("/ws")
    async def websocket(socket: WebSocket) -> None:
        if (principal := await accept_device(socket, ticket_allowed=True)) is not None:
            await hub.serve(socket, principal)

    @router.websocket("/relay")
    async def relay(socket: WebSocket) -> None:
        batches = RELAY_BATCH_PROTOCOL if offers_batches(socket) else None
        if (principal := await accept_device(socket, subprotocol=batches)) is None:
            return
        if principal.guest_of is not None:  # a guest reaches its sender over WebRTC only
            await socket.close(WS_1008_POLICY_VIOLATION, "a share link's guest has no relay")
            return
        await state.relay.serve(socket, principal)

    app.include_router(router)
    return app
