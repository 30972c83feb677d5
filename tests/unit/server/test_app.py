"""The REST API, driven in-process through httpx's ASGI transport."""

from __future__ import annotations

from typing import Any

import httpx
import jwt
import pytest

from meshagent_gui.core.mesh.types import (
    OWN_DEVICES_ONLY,
    SCOPES,
    CapabilityGrant,
    DeviceList,
    EnrollResponse,
    JoinCode,
    KeySet,
    RoomList,
    ServerInfo,
    TokenPair,
)
from meshagent_gui.server.app import ServerState
from tests.unit.server.conftest import (
    PASSWORD,
    Enrolled,
    FakeClock,
    add_user,
    enroll,
    make_certificate,
    proof,
)


async def join(
    client: httpx.AsyncClient, room: str, owner: Enrolled, member: Enrolled, role: str = "member"
) -> None:
    """``member`` joins ``room`` the consented way: invited by ``owner``, then accepting."""
    invited = await client.post(
        f"/rooms/{room}/invitations", json={"user": member.user, "role": role}, headers=owner.auth
    )
    assert invited.status_code == 202, invited.text
    accepted = await client.post(f"/invitations/{room}/accept", headers=member.auth)
    assert accepted.status_code == 200, accepted.text


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "message"} and body["error"] == code, body
    assert body["message"]


async def test_info_keys_and_openapi(client: httpx.AsyncClient, state: ServerState) -> None:
    info = ServerInfo.model_validate((await client.get("/info")).json())
    assert info.server_id == state.server_id and info.time == state.clock()
    keys = KeySet.model_validate((await client.get("/keys")).json())
    assert [key.status for key in keys.keys] == ["active"]
    schema = (await client.get("http://mesh.test/openapi.json")).json()
    for path in ("/enroll", "/token/refresh", "/devices", "/rooms", "/capabilities", "/join-codes"):
        assert "/api/v1" + path in schema["paths"]


async def test_enroll_with_password(client: httpx.AsyncClient, state: ServerState) -> None:
    add_user(state, "ann")
    cert = make_certificate()
    body = {"username": "Ann", "password": PASSWORD, "device_name": "laptop"}
    body |= {"certificate": cert.pem} | await proof(client, cert)
    answer = EnrollResponse.model_validate((await client.post("/enroll", json=body)).json())
    assert answer.device_id == cert.fingerprint and answer.user == "ann"
    assert answer.server_id == state.server_id and answer.access_expires_in == 3600
    assert answer.keys == state.keys.public_keys()


async def test_enroll_refusals(client: httpx.AsyncClient, state: ServerState) -> None:
    add_user(state, "ann")
    cert = make_certificate()
    base = {"device_name": "laptop", "certificate": cert.pem}
    wrong = base | {"username": "ann", "password": "wrong"} | await proof(client, cert)
    assert_error(await client.post("/enroll", json=wrong), 401, "invalid_credentials")
    base |= await proof(client, cert)  # the checks below refuse the body before the proof
    assert_error(await client.post("/enroll", json=base), 422, "invalid_request")
    both = base | {"join_code": "AAAA-AAAA-AAAA-AAAA", "username": "ann", "password": "x"}
    assert_error(await client.post("/enroll", json=both), 422, "invalid_request")
    bad_cert = base | {"username": "ann", "password": PASSWORD, "certificate": "nope"}
    assert_error(await client.post("/enroll", json=bad_cert), 400, "bad_certificate")
    assert_error(await client.post("/enroll", json={"device_name": ""}), 422, "invalid_request")
    control = base | {"username": "ann", "password": PASSWORD, "device_name": "a\x1bb"}
    assert_error(await client.post("/enroll", json=control), 422, "invalid_request")
    assert_error(
        await client.post(
            "/enroll", content=b"{not json", headers={"content-type": "application/json"}
        ),
        422,
        "invalid_request",
    )


async def test_join_code_errors_are_distinct(
    client: httpx.AsyncClient, state: ServerState, clock: FakeClock
) -> None:
    store = state.db.store
    used, _ = store.create_join_code(user=None, room=None, now=clock())
    expiring, _ = store.create_join_code(user=None, room=None, ttl=60, now=clock())
    first = await enroll(client, join_code=used, name="Desk PC")
    assert first.user == "desk-pc"
    cert = make_certificate()
    body = {"device_name": "x", "certificate": cert.pem}
    reused = body | {"join_code": used} | await proof(client, cert)
    assert_error(await client.post("/enroll", json=reused), 401, "join_code_used")
    clock.advance(61)
    late = body | {"join_code": expiring} | await proof(client, cert)
    assert_error(await client.post("/enroll", json=late), 401, "join_code_expired")


async def test_failed_attempts_are_rate_limited_per_address(
    client: httpx.AsyncClient, state: ServerState, clock: FakeClock
) -> None:
    add_user(state, "ann")
    cert = make_certificate()
    body = {"device_name": "x", "certificate": cert.pem}
    for _ in range(3):
        guess = body | {"join_code": "0000-0000-0000-0000"} | await proof(client, cert)
        assert_error(await client.post("/enroll", json=guess), 401, "join_code_unknown")
    good = body | {"username": "ann", "password": PASSWORD}
    assert_error(
        await client.post("/enroll", json=good | await proof(client, cert)), 429, "rate_limited"
    )
    clock.advance(61)  # the window slides
    response = await client.post("/enroll", json=good | await proof(client, cert))
    assert response.status_code == 200


async def test_refresh_rotates_and_refuses_reuse(
    client: httpx.AsyncClient, state: ServerState
) -> None:
    add_user(state, "ann")
    device = await enroll(client, user="ann")
    response = await client.post("/token/refresh", json={"refresh_token": device.refresh_token})
    pair = TokenPair.model_validate(response.json())
    assert pair.refresh_token != device.refresh_token
    assert_error(
        await client.post("/token/refresh", json={"refresh_token": device.refresh_token}),
        401,
        "invalid_refresh_token",
    )
    # The reuse revoked the session: the new pair is dead too.
    assert_error(
        await client.get("/devices", headers={"Authorization": f"Bearer {pair.access_token}"}),
        401,
        "unauthorized",
    )


async def test_authentication_is_required(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/devices"), 401, "unauthorized")
    assert_error(
        await client.get("/devices", headers={"Authorization": "Bearer mesh_at_nope"}),
        401,
        "unauthorized",
    )
    assert_error(
        await client.get("/rooms", headers={"Authorization": "Basic abc"}), 401, "unauthorized"
    )


async def test_access_token_expires(
    client: httpx.AsyncClient, state: ServerState, clock: FakeClock
) -> None:
    add_user(state, "ann")
    device = await enroll(client, user="ann")
    assert (await client.get("/devices", headers=device.auth)).status_code == 200
    clock.advance(3600)
    assert_error(await client.get("/devices", headers=device.auth), 401, "unauthorized")


async def users_with_devices(
    client: httpx.AsyncClient, state: ServerState, *names: str
) -> dict[str, Enrolled]:
    devices = {}
    for name in names:
        add_user(state, name)
        devices[name] = await enroll(client, user=name, name=f"{name}-laptop")
    return devices


async def test_devices_lists_those_sharing_a_room(
    client: httpx.AsyncClient, state: ServerState
) -> None:
    devices = await users_with_devices(client, state, "ann", "bob")
    ann2 = await enroll(client, user="ann", name="ann-phone")
    listed = DeviceList.model_validate(
        (await client.get("/devices", headers=devices["ann"].auth)).json()
    )
    assert [(d.id, d.rooms, d.online) for d in listed.devices] == [
        (ann2.device_id, ["@ann"], False)
    ]
    response = await client.post("/rooms", json={"name": "team"}, headers=devices["ann"].auth)
    assert response.json() == {"name": "team", "role": "owner", "members": ["ann"]}
    await join(client, "team", devices["ann"], devices["bob"], "viewer")
    listed = DeviceList.model_validate(
        (await client.get("/devices", headers=devices["bob"].auth)).json()
    )
    assert {(d.name, d.user, tuple(d.rooms)) for d in listed.devices} == {
        ("ann-laptop", "ann", ("team",)),
        ("ann-phone", "ann", ("team",)),
    }


async def test_patch_self(client: httpx.AsyncClient, state: ServerState) -> None:
    add_user(state, "ann")
    device = await enroll(client, user="ann")
    body = {"name": "desk", "addresses": ["192.0.2.7:4433", "[2001:db8::1]:4433"]}
    response = await client.patch("/devices/self", json=body, headers=device.auth)
    assert response.status_code == 200
    assert response.json()["name"] == "desk"
    assert response.json()["addresses"] == body["addresses"]
    too_many = {"addresses": [f"192.0.2.{i}:1" for i in range(33)]}
    assert_error(
        await client.patch("/devices/self", json=too_many, headers=device.auth),
        422,
        "invalid_request",
    )


async def test_rooms_and_membership_errors(client: httpx.AsyncClient, state: ServerState) -> None:
    devices = await users_with_devices(client, state, "ann", "bob", "cat")
    ann, bob = devices["ann"].auth, devices["bob"].auth
    assert (await client.post("/rooms", json={"name": "team"}, headers=ann)).status_code == 200
    assert_error(
        await client.post("/rooms", json={"name": "team"}, headers=bob), 409, "room_exists"
    )
    assert_error(
        await client.post("/rooms", json={"name": "@mine"}, headers=bob), 422, "invalid_request"
    )
    invite = "/rooms/team/invitations"
    assert_error(await client.post(invite, json={"user": "cat"}, headers=bob), 404, "unknown_room")
    await join(client, "team", devices["ann"], devices["bob"])
    assert_error(await client.post(invite, json={"user": "cat"}, headers=bob), 403, "forbidden")
    for user in ("zed", "cat"):  # no user-name oracle
        invited = await client.post(invite, json={"user": user}, headers=ann)
        assert (invited.status_code, invited.json()) == (202, {"status": "invited"})
    assert_error(
        await client.post("/rooms/nope/invitations", json={"user": "cat"}, headers=ann),
        404,
        "unknown_room",
    )
    # The forced add of old is gone.
    forced = await client.post("/rooms/team/members", json={"user": "cat"}, headers=ann)
    assert forced.status_code == 404
    rooms = RoomList.model_validate((await client.get("/rooms", headers=bob)).json())
    assert [(r.name, r.role) for r in rooms.rooms] == [("@bob", "owner"), ("team", "member")]


@pytest.mark.parametrize("role", ["owner", "member", "viewer", None])
async def test_capability_acl(
    client: httpx.AsyncClient, state: ServerState, role: str | None
) -> None:
    devices = await users_with_devices(client, state, "ann", "bob")
    await client.post("/rooms", json={"name": "team"}, headers=devices["bob"].auth)
    if role is not None:
        await join(client, "team", devices["bob"], devices["ann"], role)
    allowed = {
        "owner": set(SCOPES) - OWN_DEVICES_ONLY,  # terminal:open: toward one's own devices only
        "member": set(SCOPES) - OWN_DEVICES_ONLY,
        "viewer": {"p2p:connect", "terminal:view"},
    }.get(role or "", set())
    target = devices["bob"].device_id
    for scope in SCOPES:
        response = await client.post(
            "/capabilities", json={"aud": target, "scope": scope}, headers=devices["ann"].auth
        )
        if scope in allowed:
            assert response.status_code == 200, response.text
        elif role is None:  # sharing no room: the device does not exist for ann
            assert_error(response, 404, "unknown_device")
        else:
            assert_error(response, 403, "not_allowed")


async def test_capability_token_is_signed_for_the_caller(
    client: httpx.AsyncClient, state: ServerState
) -> None:
    add_user(state, "ann")
    laptop = await enroll(client, user="ann", name="laptop")
    phone = await enroll(client, user="ann", name="phone")
    body = {"aud": phone.device_id, "scope": "share:file", "resource": "r1", "ttl": 60}
    grant = CapabilityGrant.model_validate(
        (await client.post("/capabilities", json=body, headers=laptop.auth)).json()
    )
    [key] = state.keys.public_keys()
    claims: dict[str, Any] = jwt.decode(
        grant.token,
        jwt.PyJWK({"kty": "OKP", "crv": "Ed25519", "x": key.x}),
        algorithms=["EdDSA"],
        audience=phone.device_id,
        issuer=state.server_id,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    assert claims["sub"] == laptop.device_id and claims["res"] == "r1"
    assert grant.expires_at == claims["exp"] == int(state.clock()) + 60
    assert_error(
        await client.post(
            "/capabilities", json={"aud": "ab" * 32, "scope": "share:file"}, headers=laptop.auth
        ),
        404,
        "unknown_device",
    )
    assert_error(
        await client.post(
            "/capabilities",
            json={"aud": laptop.device_id, "scope": "share:file"},
            headers=laptop.auth,
        ),
        403,
        "not_allowed",
    )
    assert_error(
        await client.post(
            "/capabilities", json={"aud": phone.device_id, "scope": "root"}, headers=laptop.auth
        ),
        422,
        "invalid_request",
    )


async def test_join_codes_endpoint(client: httpx.AsyncClient, state: ServerState) -> None:
    add_user(state, "boss", admin=True)
    devices = await users_with_devices(client, state, "ann", "bob")
    boss = await enroll(client, user="boss")
    ann = devices["ann"].auth

    own = JoinCode.model_validate((await client.post("/join-codes", json={}, headers=ann)).json())
    assert own.expires_at == state.clock() + 600
    assert (await enroll(client, join_code=own.code, name="ann-tablet")).user == "ann"

    assert_error(
        await client.post("/join-codes", json={"user": "bob"}, headers=ann), 403, "forbidden"
    )
    assert_error(
        await client.post("/join-codes", json={"new_user": True}, headers=ann), 403, "forbidden"
    )
    for_bob = await client.post("/join-codes", json={"user": "bob", "ttl": 60}, headers=boss.auth)
    assert JoinCode.model_validate(for_bob.json()).expires_at == state.clock() + 60
    fresh = await client.post("/join-codes", json={"new_user": True}, headers=boss.auth)
    newcomer = await enroll(client, join_code=fresh.json()["code"], name="Guest Box")
    assert newcomer.user == "guest-box"
    assert_error(
        await client.post("/join-codes", json={"user": "nobody"}, headers=boss.auth),
        404,
        "unknown_user",
    )
    assert_error(
        await client.post("/join-codes", json={"ttl": 5}, headers=ann), 422, "invalid_request"
    )

    # Inviting into a room: it must be the caller's own (a missing one is created for them).
    # Another's room answers like a taken name at POST /rooms, another's personal room like
    # one that does not exist: no oracle.
    team = await client.post("/join-codes", json={"room": "team"}, headers=ann)
    assert team.status_code == 200
    assert_error(
        await client.post("/join-codes", json={"room": "team"}, headers=devices["bob"].auth),
        409,
        "room_exists",
    )
    assert_error(
        await client.post("/join-codes", json={"room": "@bob"}, headers=ann), 404, "unknown_room"
    )
    assert (await enroll(client, join_code=team.json()["code"], name="ann-watch")).user == "ann"
    rooms = RoomList.model_validate((await client.get("/rooms", headers=ann)).json())
    assert ("team", "owner") in [(r.name, r.role) for r in rooms.rooms]


async def test_unknown_paths_answer_the_error_shape(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/nope"), 404, "not_found")
    assert_error(await client.delete("/info"), 405, "method_not_allowed")
