"""Issue 11, cases 2, 4, 5 and 9: enrolment proves the device key, bodies are capped before
they are read, guessing is limited atomically, and the error contract holds.

Driven in-process through httpx's ASGI transport (the body cap is also checked against the real
uvicorn server in test_limits.py)."""

from __future__ import annotations

import asyncio
import base64
import threading
import tracemalloc
from collections.abc import AsyncIterator, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import argon2
import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from meshagent_gui.core.mesh.types import API_PREFIX, enroll_proof_message
from meshagent_gui.server.app import ServerState, create_app
from meshagent_gui.server.limits import MAX_BODY_BYTES, FailureLimiter
from meshagent_gui.server.passwords import Passwords
from meshagent_gui.server.store import Store
from tests.unit.server.conftest import (
    PASSWORD,
    DeviceCertificate,
    FakeClock,
    add_user,
    enroll,
    make_certificate,
    proof,
)
from tests.unit.server.test_app import assert_error

# ---------------------------------------------------------------- case 2: proof of possession

_ECDSA = ec.ECDSA(hashes.SHA256())


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


async def _takeover_body(
    client: httpx.AsyncClient, victim: DeviceCertificate, join_code: str
) -> dict[str, Any]:
    """What an attacker can build: the victim's (public) certificate, signed with another key."""
    attacker = make_certificate("attacker")
    server_id = (await client.get("/info")).json()["server_id"]
    nonce = (await client.post("/enroll/challenge")).json()["nonce"]
    forged = attacker.key.sign(enroll_proof_message(server_id, nonce, victim.der), _ECDSA)
    return {
        "join_code": join_code,
        "device_name": "evil",
        "certificate": victim.pem,
        "nonce": nonce,
        "signature": _b64(forged),
    }


async def test_someone_elses_certificate_cannot_be_enrolled(
    client: httpx.AsyncClient, state: ServerState
) -> None:
    add_user(state, "ann")
    victim = await enroll(client, user="ann")
    store = state.db.store
    for new_user_code in (
        store.create_join_code(user=None, room=None, now=state.clock())[0],
        store.create_join_code(user=None, room="team", now=state.clock())[0],
    ):
        body = await _takeover_body(client, victim.certificate, new_user_code)
        assert_error(await client.post("/enroll", json=body), 401, "invalid_proof")
    # Nothing changed for the victim: same user, session alive.
    assert (await client.get("/devices", headers=victim.auth)).status_code == 200
    record = store.device(victim.device_id)
    assert record is not None and record.user == "ann"


async def test_the_nonce_is_single_use_fresh_and_bound_to_the_certificate(
    client: httpx.AsyncClient, state: ServerState, clock: FakeClock
) -> None:
    add_user(state, "ann")
    state.limiter = FailureLimiter(max_failures=100)  # each refusal below counts as a failure
    cert = make_certificate()
    body = {"username": "ann", "password": PASSWORD, "device_name": "pc", "certificate": cert.pem}
    signed = body | await proof(client, cert)
    assert (await client.post("/enroll", json=signed)).status_code == 200
    assert_error(await client.post("/enroll", json=signed), 401, "invalid_proof")  # replayed
    stale = body | await proof(client, cert)
    clock.advance(121)
    assert_error(await client.post("/enroll", json=stale), 401, "invalid_proof")
    other = make_certificate()
    swapped = body | await proof(client, other)  # a proof made for another certificate
    assert_error(await client.post("/enroll", json=swapped), 401, "invalid_proof")
    unknown = body | {"nonce": "made-up", "signature": (await proof(client, cert))["signature"]}
    assert_error(await client.post("/enroll", json=unknown), 401, "invalid_proof")
    garbage = body | {"nonce": (await proof(client, cert))["nonce"], "signature": "%%%"}
    assert_error(await client.post("/enroll", json=garbage), 401, "invalid_proof")
    assert_error(await client.post("/enroll", json=body), 422, "invalid_request")  # no proof


async def test_a_device_enrolled_to_one_user_cannot_move_to_another(
    client: httpx.AsyncClient, state: ServerState
) -> None:
    add_user(state, "ann")
    add_user(state, "bob")
    device = await enroll(client, user="ann")
    # Even holding the key (a shared machine), bob cannot take ann's device.
    body = {
        "username": "bob",
        "password": PASSWORD,
        "device_name": "pc",
        "certificate": device.certificate.pem,
    }
    moved = body | await proof(client, device.certificate)
    assert_error(await client.post("/enroll", json=moved), 403, "forbidden")
    for_bob = state.db.store.create_join_code(user="bob", room=None, now=state.clock())[0]
    code_body = {"join_code": for_bob, "device_name": "pc", "certificate": device.certificate.pem}
    coded = code_body | await proof(client, device.certificate)
    assert_error(await client.post("/enroll", json=coded), 403, "forbidden")
    assert (await client.get("/devices", headers=device.auth)).status_code == 200


async def test_re_enrolment_with_the_key_revokes_the_old_session_and_its_sockets(
    client: httpx.AsyncClient, state: ServerState, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_user(state, "ann")
    first = await enroll(client, user="ann")
    old_session = state.db.store.authenticate(first.access_token, now=state.clock())
    assert old_session is not None
    revoked: list[frozenset[str]] = []
    monkeypatch.setattr(state, "revoke_sockets", lambda ids: revoked.append(frozenset(ids)))
    again = await enroll(client, user="ann", certificate=first.certificate)
    assert again.device_id == first.device_id and again.user == "ann"
    assert_error(await client.get("/devices", headers=first.auth), 401, "unauthorized")
    assert revoked == [frozenset({old_session.session_id})]


async def test_refresh_token_reuse_closes_the_sessions_sockets(
    client: httpx.AsyncClient, state: ServerState, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_user(state, "ann")
    device = await enroll(client, user="ann")
    session = state.db.store.authenticate(device.access_token, now=state.clock())
    assert session is not None
    revoked: list[frozenset[str]] = []
    monkeypatch.setattr(state, "revoke_sockets", lambda ids: revoked.append(frozenset(ids)))
    refresh = {"refresh_token": device.refresh_token}
    assert (await client.post("/token/refresh", json=refresh)).status_code == 200
    assert_error(await client.post("/token/refresh", json=refresh), 401, "invalid_refresh_token")
    assert revoked == [frozenset({session.session_id})]


# ---------------------------------------------------------------- case 4: body cap


class _Body:
    """An ASGI ``receive`` that streams ``total`` bytes lazily, counting what the app pulled."""

    def __init__(self, total: int, chunk: int = 64 * 1024) -> None:
        self.chunk = bytes(chunk)  # one buffer, sent again and again: streaming costs nothing
        self.left = total
        self.pulled = 0

    async def __call__(self) -> dict[str, Any]:
        if self.left <= 0:
            return {"type": "http.disconnect"}
        self.pulled += 1
        self.left -= len(self.chunk)
        return {"type": "http.request", "body": self.chunk, "more_body": self.left > 0}


async def _call_asgi(
    state: ServerState, receive: Any, headers: list[tuple[bytes, bytes]]
) -> tuple[int, dict[str, str], bytes]:
    app = create_app(state)
    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": API_PREFIX + "/enroll",
        "raw_path": (API_PREFIX + "/enroll").encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"mesh.test"), (b"content-type", b"application/json"), *headers],
        "client": ("203.0.113.9", 4000),
        "server": ("mesh.test", 80),
    }
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    answer = {k.decode(): v.decode() for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], answer, body


HUGE = 300 * 1024 * 1024


async def test_a_declared_huge_body_is_refused_before_a_byte_is_read(
    state: ServerState,
) -> None:
    body = _Body(HUGE)
    status, headers, answer = await _call_asgi(
        state, body, [(b"content-length", str(HUGE).encode())]
    )
    assert status == 413 and body.pulled == 0
    assert httpx.Response(413, content=answer).json()["error"] == "too_large"
    assert headers["connection"] == "close"  # the server will not read the rest either


async def test_a_streamed_huge_body_is_cut_off_without_being_buffered(
    state: ServerState,
) -> None:
    body = _Body(HUGE)
    tracemalloc.start()
    try:
        status, _, answer = await _call_asgi(state, body, [])  # chunked: no length declared
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 413 and httpx.Response(413, content=answer).json()["error"] == "too_large"
    assert body.pulled <= MAX_BODY_BYTES // len(body.chunk) + 1
    assert peak < 4 * 1024 * 1024, f"{peak} bytes allocated for a refused body"


async def test_a_body_under_the_cap_still_works(
    client: httpx.AsyncClient, state: ServerState
) -> None:
    add_user(state, "ann")
    cert = make_certificate()
    body = {"username": "ann", "password": PASSWORD, "device_name": "pc", "certificate": cert.pem}
    body |= await proof(client, cert) | {"platform": "linux", "padding": "x" * 60_000}
    assert (await client.post("/enroll", json=body)).status_code == 200
    over = body | {"padding": "x" * MAX_BODY_BYTES}
    assert_error(await client.post("/enroll", json=over), 413, "too_large")


# ---------------------------------------------------------------- case 5: atomic limits


@pytest.fixture
def real_limits(tmp_path: Path, clock: FakeClock) -> Iterator[ServerState]:
    """The production limits: 10 failures per 5 minutes, two argon2 computations at a time."""
    opened = ServerState.open(
        tmp_path / "limits", passwords=_CountingPasswords(), limiter=FailureLimiter(), clock=clock
    )
    yield opened
    opened.close()


@pytest.fixture
async def limited_client(real_limits: ServerState) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(real_limits))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://mesh.test" + API_PREFIX
    ) as c:
        yield c


class _CountingPasswords(Passwords):
    """Cheap argon2 that counts the verifications and the most that ran at once."""

    def __init__(self) -> None:
        super().__init__(argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST))
        self.verified = 0
        self.most_at_once = 0
        self._lock = threading.Lock()
        self._now = 0

    def verify(self, stored_hash: str | None, password: str) -> bool:
        with self._lock:
            self.verified += 1
            self._now += 1
            self.most_at_once = max(self.most_at_once, self._now)
        try:
            return super().verify(stored_hash, password)
        finally:
            with self._lock:
                self._now -= 1


async def _signed_bodies(
    client: httpx.AsyncClient, count: int, extra: dict[str, str]
) -> list[dict[str, Any]]:
    cert = make_certificate()
    base = {"device_name": "guess", "certificate": cert.pem} | extra
    return [base | await proof(client, cert) for _ in range(count)]


async def test_300_concurrent_join_code_guesses_get_10_tries(
    limited_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked = 0
    real = Store.enroll_with_join_code

    def counting(self: Store, *args: Any, **kwargs: Any) -> Any:
        nonlocal checked
        checked += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Store, "enroll_with_join_code", counting)
    bodies = await _signed_bodies(limited_client, 300, {"join_code": "0000-0000-0000-0000"})
    answers = await asyncio.gather(*(limited_client.post("/enroll", json=b) for b in bodies))
    statuses = sorted(answer.status_code for answer in answers)
    assert checked <= 10, f"{checked} guesses reached the join-code check"
    assert statuses.count(401) == checked and statuses.count(429) == 300 - checked


async def test_40_concurrent_password_guesses_get_10_tries_two_at_a_time(
    limited_client: httpx.AsyncClient, real_limits: ServerState
) -> None:
    add_user(real_limits, "ann")
    passwords = real_limits.passwords
    assert isinstance(passwords, _CountingPasswords)
    bodies = await _signed_bodies(limited_client, 40, {"username": "ann", "password": "guess"})
    answers = await asyncio.gather(*(limited_client.post("/enroll", json=b) for b in bodies))
    statuses = [answer.status_code for answer in answers]
    assert passwords.verified <= 10, f"{passwords.verified} guesses reached argon2"
    assert statuses.count(401) == passwords.verified
    assert statuses.count(429) == 40 - passwords.verified
    assert passwords.most_at_once <= 2


async def test_a_right_answer_gives_its_slot_back(
    limited_client: httpx.AsyncClient, real_limits: ServerState
) -> None:
    add_user(real_limits, "ann")
    for _ in range(12):  # more than the limit: successes are not failures
        await enroll(limited_client, user="ann")


# ---------------------------------------------------------------- case 9: the contract


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"{not json", "application/json"),
        (b"[" * 60_000, "application/json"),  # too deep for json.loads: FastAPI's own 400 path
        (b"\xff\xfe{}", "application/json"),  # not UTF-8
        (b'{"device_name": "a", ', "application/json"),
        (b"", "application/json"),
    ],
)
async def test_an_unreadable_body_is_422_invalid_request(
    client: httpx.AsyncClient, content: bytes, content_type: str
) -> None:
    response = await client.post("/enroll", content=content, headers={"content-type": content_type})
    assert_error(response, 422, "invalid_request")


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/rooms", "GET, POST"),
        ("DELETE", "/enroll", "POST"),
        ("GET", "/enroll/challenge", "POST"),
        ("POST", "/devices", "GET"),
    ],
)
async def test_405_says_what_is_allowed(
    client: httpx.AsyncClient, method: str, path: str, allow: str
) -> None:
    response = await client.request(method, path)
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == allow


@pytest.mark.parametrize(
    "credentials",
    [
        {},
        {"username": "ann"},
        {"password": PASSWORD},
        {"join_code": "AAAA-AAAA-AAAA-AAAA", "username": "ann"},
        {"join_code": "AAAA-AAAA-AAAA-AAAA", "username": "ann", "password": PASSWORD},
    ],
)
async def test_join_code_xor_username_and_password(
    client: httpx.AsyncClient, credentials: dict[str, str]
) -> None:
    cert = make_certificate()
    body = {"device_name": "pc", "certificate": cert.pem} | credentials
    body |= await proof(client, cert)
    assert_error(await client.post("/enroll", json=body), 422, "invalid_request")


async def test_openapi_says_join_code_xor_username_and_password(
    client: httpx.AsyncClient,
) -> None:
    schema = (await client.get("http://mesh.test/openapi.json")).json()
    enroll_request = schema["components"]["schemas"]["EnrollRequest"]
    ways = [set(way["required"]) for way in enroll_request["oneOf"]]
    assert ways == [{"join_code"}, {"username", "password"}]
    assert {"nonce", "signature", "certificate"} <= set(enroll_request["required"])
    assert API_PREFIX + "/enroll/challenge" in schema["paths"]
