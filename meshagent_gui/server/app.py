"""The REST API and WebSocket endpoint of the reference Mesh Server (docs/server-api.md)."""

from __future__ import annotations

import logging
import time
import unicodedata
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Annotated, Any, Concatenate, Final, ParamSpec, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from fastapi import APIRouter, Depends, FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from meshagent_gui import __version__
from meshagent_gui.core.mesh.types import (
    API_PREFIX,
    ApiError,
    CapabilityGrant,
    CapabilityRequest,
    Device,
    DeviceList,
    DeviceUpdate,
    EnrollRequest,
    EnrollResponse,
    JoinCode,
    JoinCodeCreate,
    KeySet,
    MemberAdd,
    RefreshRequest,
    Room,
    RoomCreate,
    RoomList,
    ServerInfo,
    TokenPair,
)
from meshagent_gui.server.hub import Hub, HubLimits
from meshagent_gui.server.passwords import Passwords
from meshagent_gui.server.relay import Relay
from meshagent_gui.server.store import (
    JOIN_CODE_TTL,
    AsyncStore,
    DeviceRecord,
    Enrolment,
    NewDevice,
    Principal,
    RoomRecord,
    Store,
    StoreError,
)
from meshagent_gui.server.tokens import SigningKeys

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
    "forbidden": 403,
    "not_allowed": 403,
    "not_found": 404,
    "unknown_device": 404,
    "unknown_room": 404,
    "unknown_user": 404,
    "method_not_allowed": 405,
    "room_exists": 409,
    "user_exists": 409,
    "rate_limited": 429,
}
# Refusals that count toward the per-address limit of failed login / join-code attempts.
GUESSING_ERRORS: Final = frozenset(
    {"invalid_credentials", "join_code_unknown", "join_code_expired", "join_code_used"}
)


class ApiException(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def from_store(cls, error: StoreError) -> ApiException:
        return cls(error.code, error.message)


class FailureLimiter:
    """Counts failed attempts per client address in a sliding window."""

    def __init__(self, max_failures: int = 10, window: float = 300.0) -> None:
        self.max_failures = max_failures
        self.window = window
        self._failures: dict[str, deque[float]] = {}

    def blocked(self, address: str, now: float) -> bool:
        failures = self._failures.get(address)
        if failures is None:
            return False
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[address]
            return False
        return len(failures) >= self.max_failures

    def record_failure(self, address: str, now: float) -> None:
        if len(self._failures) > 100_000:
            self._forget_stale(now)
        self._failures.setdefault(address, deque(maxlen=self.max_failures)).append(now)

    def _forget_stale(self, now: float) -> None:
        for address in [
            a for a, f in self._failures.items() if not f or f[-1] <= now - self.window
        ]:
            del self._failures[address]


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
    clock: Callable[[], float] = time.time
    stun_port: int | None = None  # set by the runner once its UDP socket is bound

    @property
    def server_id(self) -> str:
        return self.db.store.server_id

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
        )

    def close(self) -> None:
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


def _certificate_fingerprint(pem: str) -> str:
    try:
        certificate = x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise ApiException(
            "bad_certificate", "The certificate is not a PEM X.509 certificate."
        ) from exc
    return sha256(certificate.public_bytes(Encoding.DER)).hexdigest()


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


# The Authorization header is read by hand (not HTTPBearer's auto_error) so a missing or bad
# token answers our own 401 body; the scheme is still declared for the OpenAPI document.
_bearer = HTTPBearer(auto_error=False, description="the access token from /enroll")


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI: the error statuses a route may answer, all with the ApiError body."""
    return {status: {"model": ApiError} for status in (*statuses, 422)}


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
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(
            exc.status_code, "invalid_request"
        )
        response = _error_response(code, str(exc.detail))
        response.status_code = exc.status_code
        return response

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

    @router.get("/info")
    async def info() -> ServerInfo:
        return ServerInfo(
            server_id=state.server_id,
            name=state.name,
            version=__version__,
            time=state.clock(),
            stun_port=state.stun_port,
        )

    @router.get("/keys")
    async def keys() -> KeySet:
        state.keys.reload_if_changed()
        return KeySet(keys=state.keys.public_keys())

    @router.post("/enroll", responses=_errors(400, 401, 403, 429))
    async def enroll(body: EnrollRequest, request: Request) -> EnrollResponse:
        address = _client_address(request)
        if state.limiter.blocked(address, state.clock()):
            raise ApiException("rate_limited", "Too many failed attempts; try again later.")
        by_code = body.join_code is not None
        by_password = body.username is not None or body.password is not None
        if by_code == by_password:
            raise ApiException(
                "invalid_request", "Give either join_code, or username and password."
            )
        device = NewDevice(
            id=_certificate_fingerprint(body.certificate),
            name=_clean_device_name(body.device_name),
            platform=body.platform,
            certificate=body.certificate,
        )
        try:
            enrolment = await _enroll(body, device)
        except ApiException as exc:
            if exc.code in GUESSING_ERRORS:
                state.limiter.record_failure(address, state.clock())
            raise
        if enrolment.membership is not None:
            hub.membership_changed(enrolment.membership)
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

    async def _enroll(body: EnrollRequest, device: NewDevice) -> Enrolment:
        now = state.clock()
        if body.join_code is not None:
            return await store_call(Store.enroll_with_join_code, body.join_code, device, now=now)
        if body.username is None or body.password is None:
            raise ApiException("invalid_request", "Give both username and password.")
        user = body.username.strip().lower()
        stored = await state.db.call(Store.password_hash, user)
        if not await state.passwords.verify_async(stored, body.password):
            raise ApiException("invalid_credentials", "Wrong user name or password.")
        return await store_call(Store.enroll_user_device, user, device, now=now)

    @router.post("/token/refresh", responses=_errors(401))
    async def refresh(body: RefreshRequest) -> TokenPair:
        tokens = await store_call(Store.refresh, body.refresh_token, now=state.clock())
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
            role = await state.db.call(Store.role, body.room, caller.user)
            exists = role is not None or await state.db.call(Store.room_exists, body.room)
            if exists and role != "owner":
                raise ApiException("forbidden", f"Only an owner of {body.room!r} can invite to it.")
        code, expires_at = await store_call(
            Store.create_join_code,
            user=user,
            room=body.room,
            ttl=body.ttl or JOIN_CODE_TTL,
            now=state.clock(),
            room_owner=caller.user,
        )
        return JoinCode(code=code, expires_at=expires_at)

    # ------------------------------------------------------------ devices

    @router.get("/devices", responses=_errors(401))
    async def devices(caller: Caller) -> DeviceList:
        visible = await state.db.call(Store.visible_devices, caller.device_id)
        return DeviceList(devices=[device_model(record, rooms) for record, rooms in visible])

    @router.patch("/devices/self", responses=_errors(401))
    async def update_self(body: DeviceUpdate, caller: Caller) -> Device:
        name = None if body.name is None else _clean_device_name(body.name)
        record = await store_call(
            Store.update_device, caller.device_id, name=name, addresses=body.addresses
        )
        return device_model(record)

    # ------------------------------------------------------------ rooms

    @router.get("/rooms", responses=_errors(401))
    async def rooms(caller: Caller) -> RoomList:
        records = await state.db.call(Store.rooms_of, caller.user)
        return RoomList(rooms=[_room(record) for record in records])

    @router.post("/rooms", responses=_errors(401, 409))
    async def create_room(body: RoomCreate, caller: Caller) -> Room:
        record = await store_call(Store.create_room, body.name, caller.user, now=state.clock())
        return _room(record)

    @router.post("/rooms/{name}/members", responses=_errors(401, 403, 404))
    async def add_member(name: str, body: MemberAdd, caller: Caller) -> Room:
        change = await store_call(
            Store.add_member, name, body.user, body.role, by=caller.user, now=state.clock()
        )
        hub.membership_changed(change)
        record = await store_call(Store.room_for, name, caller.user)
        return _room(record)

    # ------------------------------------------------------------ capabilities

    @router.post("/capabilities", responses=_errors(401, 403, 404))
    async def capability(body: CapabilityRequest, caller: Caller) -> CapabilityGrant:
        target = await state.db.call(Store.device, body.aud)
        if target is None:
            raise ApiException("unknown_device", "There is no such device.")
        allowed = await state.db.call(Store.allowed_scopes, caller.user, target.user)
        if body.scope not in allowed or target.id == caller.device_id:
            raise ApiException(
                "not_allowed", f"You may not ask for {body.scope!r} toward that device."
            )
        state.keys.reload_if_changed()
        token, expires_at = state.keys.issue(
            issuer=state.server_id,
            holder=caller.device_id,
            target=target.id,
            scope=body.scope,
            resource=body.resource,
            now=state.clock(),
            ttl=body.ttl or 300,
        )
        return CapabilityGrant(token=token, expires_at=expires_at)

    # ------------------------------------------------------------ WebSocket

    async def accept_device(socket: WebSocket) -> Principal | None:
        principal = None
        scheme, _, token = socket.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            principal = await state.db.call(Store.authenticate, token.strip(), now=state.clock())
        # Accept first so the refusal is a close code (4401) the agent can act on.
        await socket.accept()
        if principal is None:
            await socket.close(CLOSE_UNAUTHORIZED, "unauthorized")
        return principal

    @router.websocket("/ws")
    async def websocket(socket: WebSocket) -> None:
        if (principal := await accept_device(socket)) is not None:
            await hub.serve(socket, principal)

    @router.websocket("/relay")
    async def relay(socket: WebSocket) -> None:
        if (principal := await accept_device(socket)) is not None:
            await state.relay.serve(socket, principal)

    app.include_router(router)
    return app
