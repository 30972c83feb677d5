"""Issue 11: consented rooms, capabilities from one room, no oracles, audit, per-user Gotify.

Devices are enrolled straight into the store (enrolment has its own tests); everything else goes
through the REST API in-process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest

from meshagent_gui.core.mesh.types import SCOPES
from meshagent_gui.server.app import ServerState
from meshagent_gui.server.notify import UserNotifier
from meshagent_gui.server.store import INVITATION_TTL, MAX_PENDING_PER_INVITER, Store
from tests.unit.server.conftest import FakeClock, new_device


@dataclass(frozen=True)
class Dev:
    device_id: str
    user: str
    access_token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


def device(state: ServerState, user: str, name: str | None = None) -> Dev:
    store = state.db.store
    if store.user(user) is None:
        store.create_user(user, None, now=state.clock())
    enrolment = store.enroll_user_device(user, new_device(name or f"{user}-pc"), now=state.clock())
    return Dev(enrolment.device.id, user, enrolment.tokens.access_token)


def body_of(response: httpx.Response) -> tuple[int, Any]:
    return response.status_code, response.json()


async def make_room(client: httpx.AsyncClient, name: str, owner: Dev) -> None:
    response = await client.post("/rooms", json={"name": name}, headers=owner.auth)
    assert response.status_code == 200, response.text


async def invite(
    client: httpx.AsyncClient, room: str, by: Dev, user: str, role: str = "member"
) -> httpx.Response:
    return await client.post(
        f"/rooms/{room}/invitations", json={"user": user, "role": role}, headers=by.auth
    )


async def join(
    client: httpx.AsyncClient, room: str, owner: Dev, member: Dev, role: str = "member"
) -> None:
    assert (await invite(client, room, owner, member.user, role)).status_code == 202
    accepted = await client.post(f"/invitations/{room}/accept", headers=member.auth)
    assert accepted.status_code == 200, accepted.text


async def capability(
    client: httpx.AsyncClient, holder: Dev, target: Dev, scope: str, room: str | None = None
) -> httpx.Response:
    body: dict[str, Any] = {"aud": target.device_id, "scope": scope}
    if room is not None:
        body["room"] = room
    return await client.post("/capabilities", json=body, headers=holder.auth)


def claims_of(state: ServerState, token: str) -> dict[str, Any]:
    [key] = state.keys.public_keys()
    decoded: dict[str, Any] = jwt.decode(
        token,
        jwt.PyJWK({"kty": "OKP", "crv": "Ed25519", "x": key.x}),
        algorithms=["EdDSA"],
        options={
            "verify_aud": False,
            "verify_exp": False,
            "verify_iat": False,
            "verify_nbf": False,
        },
    )
    return decoded


async def visible_users(client: httpx.AsyncClient, who: Dev) -> set[str]:
    listed = (await client.get("/devices", headers=who.auth)).json()["devices"]
    return {d["user"] for d in listed}


# ---------------------------------------------------------------- case 1: forced membership


async def test_forced_membership_is_gone(client: httpx.AsyncClient, state: ServerState) -> None:
    mallory, victim = device(state, "mallory"), device(state, "victim")
    await make_room(client, "trap", mallory)
    # The old forced add: gone (405 with Allow, or 404: never a membership).
    forced = await client.post(
        "/rooms/trap/members", json={"user": "victim", "role": "viewer"}, headers=mallory.auth
    )
    assert forced.status_code in (404, 405)
    assert (await invite(client, "trap", mallory, "victim")).status_code == 202
    # Before the victim accepts, the inviter sees and reaches nothing of the victim's.
    assert await visible_users(client, mallory) == set()
    members = (await client.get("/rooms", headers=mallory.auth)).json()["rooms"]
    assert {"name": "trap", "role": "owner", "members": ["mallory"]} in members
    for scope in SCOPES:
        for room in (None, "trap"):
            refused = await capability(client, mallory, victim, scope, room)
            assert body_of(refused) == (
                404,
                {"error": "unknown_device", "message": "There is no such device."},
            )
    # The victim sees the invitation and may decline it: still nothing shared.
    pending = (await client.get("/invitations", headers=victim.auth)).json()["invitations"]
    assert [(i["room"], i["role"], i["invited_by"]) for i in pending] == [
        ("trap", "member", "mallory")
    ]
    declined = await client.post("/invitations/trap/decline", headers=victim.auth)
    assert body_of(declined) == (200, {"status": "declined"})
    assert (await client.get("/invitations", headers=victim.auth)).json()["invitations"] == []
    again = await client.post("/invitations/trap/accept", headers=victim.auth)
    assert again.status_code == 404 and again.json()["error"] == "unknown_room"
    assert await visible_users(client, mallory) == set()


async def test_accepting_an_invitation_shares_by_its_role(
    client: httpx.AsyncClient, state: ServerState
) -> None:
    ann, bob = device(state, "ann"), device(state, "bob")
    await make_room(client, "team", ann)
    await join(client, "team", ann, bob, role="viewer")
    assert await visible_users(client, ann) == {"bob"}
    assert await visible_users(client, bob) == {"ann"}
    allowed = {"p2p:connect", "terminal:view"}
    for scope in SCOPES:
        response = await capability(client, bob, ann, scope)
        if scope in allowed:
            assert response.status_code == 200, response.text
            assert response.json()["room"] == "team"
            assert claims_of(state, response.json()["token"])["room"] == "team"
        else:
            assert response.json()["error"] == "not_allowed"
    # The owner holds its role toward the viewer's devices (the viewer consented to that).
    assert (await capability(client, ann, bob, "share:file")).json()["room"] == "team"


async def test_a_viewer_cannot_raise_its_role_with_a_room_of_its_own(
    client: httpx.AsyncClient, state: ServerState
) -> None:
    victim, viewer = device(state, "victim"), device(state, "viewer")
    await make_room(client, "home", victim)
    await join(client, "home", victim, viewer, role="viewer")
    await make_room(client, "escalate", viewer)
    assert (await invite(client, "escalate", viewer, "victim", "member")).status_code == 202
    # Not accepted: the viewer's own room grants nothing toward the victim.
    for scope in ("share:file", "share:folder", "terminal:control"):
        assert (await capability(client, viewer, victim, scope)).json()["error"] == "not_allowed"
        named = await capability(client, viewer, victim, scope, "escalate")
        assert named.json()["error"] == "not_allowed"
    # Even once the victim also joins the viewer's room, a token says which room granted it,
    # so a session the victim shares only in "home" refuses a token of "escalate".
    accepted = await client.post("/invitations/escalate/accept", headers=victim.auth)
    assert accepted.status_code == 200
    grant = (await capability(client, viewer, victim, "terminal:control")).json()
    assert grant["room"] == "escalate"
    assert claims_of(state, grant["token"])["room"] == "escalate"
    view = (await capability(client, viewer, victim, "terminal:view", "home")).json()
    assert claims_of(state, view["token"])["room"] == "home"
    refused = await capability(client, viewer, victim, "terminal:control", "home")
    assert refused.json()["error"] == "not_allowed"


async def test_own_devices_get_every_scope_from_the_personal_room(
    client: httpx.AsyncClient, state: ServerState
) -> None:
    laptop, phone = device(state, "ann", "laptop"), device(state, "ann", "phone")
    for scope in SCOPES:
        grant = await capability(client, laptop, phone, scope)
        assert grant.status_code == 200 and grant.json()["room"] == "@ann"
    assert claims_of(state, grant.json()["token"])["room"] == "@ann"
    self_grant = await capability(client, laptop, laptop, "share:file")
    assert self_grant.json()["error"] == "not_allowed"


async def test_invitations_expire_and_die_with_the_inviters_ownership(
    client: httpx.AsyncClient, state: ServerState, clock: FakeClock
) -> None:
    ann, bob, cat = device(state, "ann"), device(state, "bob"), device(state, "cat")
    await make_room(client, "team", ann)
    await invite(client, "team", ann, "bob")
    clock.advance(INVITATION_TTL)
    ann, bob, cat = device(state, "ann"), device(state, "bob"), device(state, "cat")  # fresh tokens
    assert (await client.get("/invitations", headers=bob.auth)).json()["invitations"] == []
    assert (await client.post("/invitations/team/accept", headers=bob.auth)).status_code == 404
    # Re-inviting replaces; an inviter that is no longer an owner voids its invitations.
    await join(client, "team", ann, cat, role="owner")
    await invite(client, "team", ann, "bob", "viewer")
    await invite(client, "team", ann, "bob", "member")
    [pending] = (await client.get("/invitations", headers=bob.auth)).json()["invitations"]
    assert pending["role"] == "member"
    demoted = await client.patch(
        "/rooms/team/members/ann", json={"role": "member"}, headers=cat.auth
    )
    assert demoted.status_code == 200, demoted.text
    assert (await client.get("/invitations", headers=bob.auth)).json()["invitations"] == []


async def test_only_owners_invite_and_nobody_into_a_personal_room(
    client: httpx.AsyncClient, state: ServerState
) -> None:
    ann, bob = device(state, "ann"), device(state, "bob")
    await make_room(client, "team", ann)
    await join(client, "team", ann, bob)
    refused = await invite(client, "team", bob, "cat")
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
    personal = await invite(client, "@ann", ann, "bob")
    assert personal.status_code == 403 and personal.json()["error"] == "forbidden"


# ---------------------------------------------------------------- join codes, roles, leaving


async def test_room_join_codes(client: httpx.AsyncClient, state: ServerState) -> None:
    ann, bob, cat = device(state, "ann"), device(state, "bob"), device(state, "cat")
    await make_room(client, "team", ann)
    code = (await client.post("/rooms/team/join-codes", json={}, headers=ann.auth)).json()["code"]
    joined = await client.post("/rooms/join", json={"code": code.lower()}, headers=bob.auth)
    assert joined.status_code == 200
    assert joined.json() == {"name": "team", "role": "member", "members": ["ann", "bob"]}
    used = await client.post("/rooms/join", json={"code": code}, headers=cat.auth)
    assert used.status_code == 401 and used.json()["error"] == "join_code_used"
    unknown = await client.post("/rooms/join", json={"code": "nope"}, headers=cat.auth)
    assert unknown.json()["error"] == "join_code_unknown"
    not_owner = await client.post("/rooms/team/join-codes", json={}, headers=bob.auth)
    assert not_owner.status_code == 403
    personal = await client.post("/rooms/@ann/join-codes", json={}, headers=ann.auth)
    assert personal.status_code == 403


async def test_roles_and_leaving(client: httpx.AsyncClient, state: ServerState) -> None:
    ann, bob, cat = device(state, "ann"), device(state, "bob"), device(state, "cat")
    await make_room(client, "team", ann)
    await join(client, "team", ann, bob)
    changed = await client.patch(
        "/rooms/team/members/bob", json={"role": "viewer"}, headers=ann.auth
    )
    assert changed.status_code == 200
    assert (await capability(client, bob, ann, "share:file")).json()["error"] == "not_allowed"
    # Only owners change roles; only of members; a room keeps an owner.
    by_bob = await client.patch(
        "/rooms/team/members/ann", json={"role": "viewer"}, headers=bob.auth
    )
    assert by_bob.status_code == 403
    last = await client.patch("/rooms/team/members/ann", json={"role": "member"}, headers=ann.auth)
    assert last.status_code == 403 and last.json()["error"] == "forbidden"
    for user in ("cat", "ghost"):  # a real non-member and no user at all: the same answer
        missing = await client.patch(
            f"/rooms/team/members/{user}", json={"role": "viewer"}, headers=ann.auth
        )
        assert body_of(missing) == (
            404,
            {"error": "unknown_user", "message": f"{user!r} is not a member of 'team'."},
        )
    # Members cannot remove others; the last owner cannot leave while others remain.
    assert (await client.delete("/rooms/team/members/ann", headers=bob.auth)).status_code == 403
    assert (await client.delete("/rooms/team/members/ann", headers=ann.auth)).status_code == 403
    left = await client.delete("/rooms/team/members/bob", headers=bob.auth)
    assert body_of(left) == (200, {"status": "left"})
    assert await visible_users(client, ann) == set()
    assert (await capability(client, bob, ann, "p2p:connect")).json()["error"] == "unknown_device"
    await join(client, "team", ann, cat)
    removed = await client.delete("/rooms/team/members/cat", headers=ann.auth)
    assert body_of(removed) == (200, {"status": "removed"})
    # The last member leaving deletes the room: its name is free again, with a fresh log.
    assert (await client.delete("/rooms/team/members/ann", headers=ann.auth)).status_code == 200
    await make_room(client, "team", cat)
    log = (await client.get("/rooms/team/audit", headers=cat.auth)).json()["entries"]
    assert log == []
    personal = await client.delete("/rooms/@ann/members/ann", headers=ann.auth)
    assert personal.status_code == 403


# ---------------------------------------------------------------- case 8: oracles


async def test_rooms_one_is_not_in_answer_like_rooms_that_do_not_exist(
    client: httpx.AsyncClient, state: ServerState
) -> None:
    owner, stranger = device(state, "owner"), device(state, "stranger")
    await make_room(client, "secret", owner)
    code = (await client.post("/rooms/secret/join-codes", json={}, headers=owner.auth)).json()

    async def probes() -> list[tuple[int, Any]]:
        auth = stranger.auth
        calls = [
            client.post("/rooms/secret/invitations", json={"user": "owner"}, headers=auth),
            client.post("/rooms/secret/join-codes", json={}, headers=auth),
            client.patch("/rooms/secret/members/owner", json={"role": "viewer"}, headers=auth),
            client.delete("/rooms/secret/members/owner", headers=auth),
            client.delete("/rooms/secret/members/stranger", headers=auth),
            client.get("/rooms/secret/audit", headers=auth),
            client.post("/invitations/secret/accept", headers=auth),
            client.post("/invitations/secret/decline", headers=auth),
            client.post(
                "/terminal/control", json={"session_id": "s", "rooms": ["secret"]}, headers=auth
            ),
            client.post(
                "/capabilities",
                json={"aud": owner.device_id, "scope": "p2p:connect", "room": "secret"},
                headers=auth,
            ),
        ]
        return [body_of(await call) for call in calls]

    existing = await probes()
    assert all(status == 404 for status, _ in existing), existing
    assert existing[0] == (
        404,
        {"error": "unknown_room", "message": "There is no room 'secret'."},
    )
    # The owner leaves: the room is gone. Every answer stays byte for byte the same.
    assert (await client.delete("/rooms/secret/members/owner", headers=owner.auth)).is_success
    assert await probes() == existing
    del code


async def test_another_users_personal_room_answers_like_no_user(
    client: httpx.AsyncClient, state: ServerState
) -> None:
    ann = device(state, "ann")
    device(state, "bob")

    async def probe(room: str) -> list[tuple[int, Any]]:
        answers = [
            await client.post(f"/rooms/{room}/invitations", json={"user": "x"}, headers=ann.auth),
            await client.get(f"/rooms/{room}/audit", headers=ann.auth),
            await client.post("/join-codes", json={"room": room}, headers=ann.auth),
        ]
        return [(r.status_code, json.loads(r.text.replace(room, "ROOM"))) for r in answers]

    assert await probe("@bob") == await probe("@ghost")
    assert (await probe("@bob"))[0][0] == 404


async def test_invitations_are_no_user_name_oracle(
    client: httpx.AsyncClient, state: ServerState
) -> None:
    ann, bob = device(state, "ann"), device(state, "bob")
    await make_room(client, "team", ann)
    answers = {
        user: body_of(await invite(client, "team", ann, user))
        for user in ("bob", "nobody-here", "ann")  # real, missing, already a member
    }
    assert all(answer == (202, {"status": "invited"}) for answer in answers.values())
    # Even the room's log says the same of each: what the owner did, not what it found.
    log = (await client.get("/rooms/team/audit", headers=ann.auth)).json()["entries"]
    invited = [e["subject"] for e in log if e["kind"] == "room.invited"]
    assert sorted(invited) == ["ann", "bob", "nobody-here"]
    assert len((await client.get("/invitations", headers=bob.auth)).json()["invitations"]) == 1


async def test_enrolment_join_codes_name_rooms_without_an_oracle(
    client: httpx.AsyncClient, state: ServerState
) -> None:
    ann, bob = device(state, "ann"), device(state, "bob")
    await make_room(client, "taken", bob)
    code_room = await client.post("/join-codes", json={"room": "taken"}, headers=ann.auth)
    create = await client.post("/rooms", json={"name": "taken"}, headers=ann.auth)
    assert body_of(code_room) == body_of(create)
    assert create.json()["error"] == "room_exists"


async def test_invitation_floods_are_bounded(client: httpx.AsyncClient, state: ServerState) -> None:
    mallory, victim = device(state, "mallory"), device(state, "victim")
    for n in range(MAX_PENDING_PER_INVITER + 3):
        await make_room(client, f"r{n}", mallory)
        assert (await invite(client, f"r{n}", mallory, "victim")).status_code == 202
    pending = (await client.get("/invitations", headers=victim.auth)).json()["invitations"]
    assert len(pending) == MAX_PENDING_PER_INVITER


# ---------------------------------------------------------------- audit


async def test_audit_log_for_room_owners(client: httpx.AsyncClient, state: ServerState) -> None:
    ann, bob = device(state, "ann"), device(state, "bob")
    await make_room(client, "team", ann)
    await join(client, "team", ann, bob)
    await client.patch("/rooms/team/members/bob", json={"role": "viewer"}, headers=ann.auth)
    assert (await capability(client, bob, ann, "terminal:view")).status_code == 200
    entries = (await client.get("/rooms/team/audit?limit=10", headers=ann.auth)).json()["entries"]
    assert [e["kind"] for e in entries] == [
        "capability.granted",
        "room.role_changed",
        "room.joined",
        "room.invited",
    ]
    grant = entries[0]
    assert (grant["actor_user"], grant["actor_device"], grant["subject"]) == (
        "bob",
        bob.device_id,
        ann.device_id,
    )
    assert grant["detail"]["scope"] == "terminal:view"
    assert entries[1]["detail"] == {"from": "member", "to": "viewer"}
    one = await client.get("/rooms/team/audit?limit=1", headers=ann.auth)
    assert len(one.json()["entries"]) == 1
    refused = await client.get("/rooms/team/audit", headers=bob.auth)
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
    # A personal room's log: the user's own enrolments and revocations.
    again = state.db.store.enroll_user_device("ann", new_device("ann-pc"), now=state.clock())
    assert again.revoked_sessions == ()
    personal = (await client.get("/rooms/@ann/audit", headers=ann.auth)).json()["entries"]
    assert [e["kind"] for e in personal][:2] == ["device.enrolled", "device.enrolled"]


def test_reenrolment_and_refresh_reuse_report_revoked_sessions(store: Store) -> None:
    store.create_user("ann", None, now=1.0)
    laptop = new_device("laptop")
    first = store.enroll_user_device("ann", laptop, now=1.0)
    second = store.enroll_user_device("ann", laptop, now=2.0)
    assert len(second.revoked_sessions) == 1
    refreshed = store.refresh(second.tokens.refresh_token, now=3.0)
    del refreshed, first
    with pytest.raises(Exception) as refused:
        store.refresh(second.tokens.refresh_token, now=4.0)
    assert getattr(refused.value, "code", None) == "invalid_refresh_token"
    assert len(getattr(refused.value, "revoked_sessions", ())) == 1
    assert getattr(refused.value, "user", None) == "ann"
    kinds = [e.kind for e in store.audit_log("@ann", by="ann")]
    assert kinds == ["session.revoked", "session.revoked", "device.enrolled", "device.enrolled"]


# ---------------------------------------------------------------- terminal control, Gotify


class FakeGotify:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.keys: list[str | None] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.messages.append(json.loads(request.content))
        self.keys.append(request.headers.get("X-Gotify-Key"))
        return httpx.Response(200, json={"id": len(self.messages)})


@pytest.fixture
def gotify(state: ServerState) -> FakeGotify:
    fake = FakeGotify()
    state.notifier = UserNotifier(state.db, transport=httpx.MockTransport(fake.handler))
    return fake


async def test_notify_settings_keep_the_token_server_side(
    client: httpx.AsyncClient, state: ServerState, gotify: FakeGotify
) -> None:
    ann = device(state, "ann")
    assert (await client.get("/users/self/notify", headers=ann.auth)).json() == {
        "gotify_url": None,
        "token_set": False,
    }
    put = await client.put(
        "/users/self/notify",
        json={"gotify_url": "https://gotify.example/", "gotify_token": "AbCd.secret"},
        headers=ann.auth,
    )
    assert put.json() == {"gotify_url": "https://gotify.example/", "token_set": True}
    assert "AbCd" not in (await client.get("/users/self/notify", headers=ann.auth)).text
    # Changing the URL alone keeps the token; a null URL switches notifications off.
    moved = await client.put(
        "/users/self/notify", json={"gotify_url": "https://g2.example/"}, headers=ann.auth
    )
    assert moved.json() == {"gotify_url": "https://g2.example/", "token_set": True}
    for bad in ("http://169.254.169.254/", "ftp://x/", "https://u:p@x/"):
        refused = await client.put("/users/self/notify", json={"gotify_url": bad}, headers=ann.auth)
        assert refused.status_code == 422, bad
    off = await client.put("/users/self/notify", json={"gotify_url": None}, headers=ann.auth)
    assert off.json() == {"gotify_url": None, "token_set": False}


async def test_invitation_and_terminal_control_notify_and_audit(
    client: httpx.AsyncClient, state: ServerState, gotify: FakeGotify
) -> None:
    ann, bob, eve = device(state, "ann"), device(state, "bob"), device(state, "eve")
    for who in (ann, bob):
        await client.put(
            "/users/self/notify",
            json={"gotify_url": "https://gotify.example/", "gotify_token": f"tok-{who.user}"},
            headers=who.auth,
        )
    await make_room(client, "team", ann)
    await invite(client, "team", ann, "bob")
    await invite(client, "team", ann, "bob")  # a re-invite does not page again
    await state.notifier.drain()
    assert gotify.keys == ["tok-bob"]
    assert "team" in gotify.messages[0]["message"]
    await client.post("/invitations/team/accept", headers=bob.auth)
    report = {"session_id": "term-1", "controller_device": bob.device_id, "rooms": ["team"]}
    done = await client.post("/terminal/control", json=report, headers=ann.auth)
    assert body_of(done) == (202, {"status": "recorded"})
    await state.notifier.drain()
    assert gotify.keys == ["tok-bob", "tok-ann"]
    released = {"session_id": "term-1", "controller_device": None, "rooms": ["team"]}
    assert (await client.post("/terminal/control", json=released, headers=ann.auth)).is_success
    await state.notifier.drain()
    assert len(gotify.keys) == 2  # releasing control is logged, not paged
    entries = (await client.get("/rooms/team/audit", headers=ann.auth)).json()["entries"]
    controls = [e for e in entries if e["kind"] == "terminal.control"]
    assert [(e["subject"], e["detail"]["controller_user"]) for e in controls] == [
        (None, None),
        (bob.device_id, "bob"),
    ]
    # A controller outside the rooms, or a room the host is not in: refused alike.
    stranger = {**report, "controller_device": eve.device_id}
    refused = await client.post("/terminal/control", json=stranger, headers=ann.auth)
    assert refused.status_code == 404 and refused.json()["error"] == "unknown_device"
    own: dict[str, Any] = {"session_id": "t", "controller_device": None, "rooms": []}
    assert (await client.post("/terminal/control", json=own, headers=eve.auth)).is_success
    eve_log = (await client.get("/rooms/@eve/audit", headers=eve.auth)).json()["entries"]
    assert eve_log[0]["kind"] == "terminal.control"


async def test_gotify_failures_do_not_reach_the_request(
    client: httpx.AsyncClient, state: ServerState, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    state.notifier = UserNotifier(state.db, transport=httpx.MockTransport(broken), retries=0)
    ann, bob = device(state, "ann"), device(state, "bob")
    await client.put(
        "/users/self/notify",
        json={"gotify_url": "https://gotify.example/", "gotify_token": "sekrit-token"},
        headers=bob.auth,
    )
    await make_room(client, "team", ann)
    assert (await invite(client, "team", ann, "bob")).status_code == 202
    await state.notifier.drain()
    assert "not delivered" in caplog.text
    assert "sekrit-token" not in caplog.text
