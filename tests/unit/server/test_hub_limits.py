"""The hub's limits, room scoping and socket lifetime, driven through fake sockets.

A fake socket lets a test stall a reader exactly (no kernel buffers in between) and the hub
runs on a fake clock, so budgets, expiry and sweeps are deterministic.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from starlette.websockets import WebSocket

from meshagent_gui.server.hub import Hub, HubLimits
from meshagent_gui.server.store import ACCESS_TTL, AsyncStore, Principal, Store
from tests.unit.server.conftest import FakeClock, new_device

WAIT = 10.0  # bound on every wait; never a timing assertion
Frame = dict[str, Any]
BLOB = {"blob": "x" * 60_000}  # a 60 KB announcement


class FakeSocket:
    """The hub's side of a WebSocket; the test plays the agent."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: list[Frame] = []
        self.reading = asyncio.Event()
        self.reading.set()
        self.close_code: int | None = None
        self._arrived = asyncio.Event()
        self._seen = 0

    # the hub calls these
    async def receive(self) -> dict[str, Any]:
        return await self.incoming.get()

    async def send_text(self, text: str) -> None:
        await self.reading.wait()
        self.sent.append(json.loads(text))
        self._arrived.set()

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.close_code = code
        self.incoming.put_nowait({"type": "websocket.disconnect"})
        self._arrived.set()

    # the test calls these
    def send(self, **frame: Any) -> None:
        self.incoming.put_nowait({"type": "websocket.receive", "text": json.dumps(frame)})

    async def next(self, wanted: Callable[[Frame], bool] = lambda _: True) -> Frame:
        """The next frame (after the last one returned) that ``wanted`` accepts."""
        async with asyncio.timeout(WAIT):
            while True:
                while self._seen < len(self.sent):
                    frame = self.sent[self._seen]
                    self._seen += 1
                    if wanted(frame):
                        return frame
                self._arrived.clear()
                await self._arrived.wait()


class Device:
    def __init__(self, principal: Principal, socket: FakeSocket, task: asyncio.Task[None]):
        self.principal = principal
        self.socket = socket
        self.task = task
        self.hello: Frame = {}

    @property
    def id(self) -> str:
        return self.principal.device_id

    async def ended(self) -> int | None:
        """Wait for the hub to be done with this socket; the close code it sent, if any."""
        async with asyncio.timeout(WAIT):
            await asyncio.wait([self.task])
        return self.socket.close_code


class Mesh:
    def __init__(self, store: Store, hub: Hub, clock: FakeClock) -> None:
        self.store = store
        self.hub = hub
        self.clock = clock
        self.tokens: dict[str, tuple[str, str]] = {}  # device id -> (access, refresh)
        self.tasks: list[asyncio.Task[None]] = []

    def standing(self, device: Device) -> dict[str, Any]:
        connection = self.hub.connection(device.id)
        assert connection is not None
        return dict(connection.standing)

    def user(self, name: str) -> None:
        self.store.create_user(name, None, now=self.clock())

    def enrol(self, user: str, name: str = "laptop") -> Principal:
        enrolment = self.store.enroll_user_device(user, new_device(name), now=self.clock())
        tokens = enrolment.tokens
        principal = self.store.authenticate(tokens.access_token, now=self.clock())
        assert principal is not None
        self.tokens[principal.device_id] = (tokens.access_token, tokens.refresh_token)
        return principal

    def room(self, name: str, owner: str, **members: str) -> None:
        """``members``: user -> role; each is invited and accepts (their consent)."""
        self.store.create_room(name, owner, now=self.clock())
        for user, role in members.items():
            self.store.invite(name, user, role, by=owner, by_device=None, now=self.clock())  # type: ignore[arg-type]
            change = self.store.accept_invitation(name, user, device=None, now=self.clock())
            self.hub.membership_changed(change)

    async def connect(self, principal: Principal, *, reading: bool = True) -> Device:
        socket = FakeSocket()
        if not reading:
            socket.reading.clear()
        task = asyncio.create_task(self.hub.serve(cast(WebSocket, socket), principal))
        self.tasks.append(task)
        device = Device(principal, socket, task)
        if reading:
            device.hello = await socket.next()
            assert device.hello["type"] == "hello"
        return device


@asynccontextmanager
async def running_mesh(tmp_path: Path, limits: HubLimits) -> AsyncIterator[Mesh]:
    store = Store.open(tmp_path / "data")
    db = AsyncStore(store)
    clock = FakeClock()
    hub = Hub(db, limits=limits, clock=clock)
    mesh = Mesh(store, hub, clock)
    try:
        yield mesh
    finally:
        for task in mesh.tasks:
            task.cancel()
        await asyncio.gather(*mesh.tasks, return_exceptions=True)
        db.close()


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    async with running_mesh(tmp_path, HubLimits(sweep_interval=0.02)) as running:
        yield running


def event(kind: str) -> Callable[[Frame], bool]:
    return lambda f: f.get("type") == "event" and f.get("kind") == kind


def error(code: str) -> Callable[[Frame], bool]:
    return lambda f: f.get("type") == "error" and f.get("error") == code


def presence(device: Device, online: bool) -> Callable[[Frame], bool]:
    return lambda f: f == f | {"type": "presence", "device_id": device.id, "online": online}


async def settled(hub: Hub) -> None:
    """Let the hub process what the test queued (its tasks run on this loop)."""
    for _ in range(20):
        await asyncio.sleep(0)


def team(mesh: Mesh, *viewers: str) -> None:
    """ann owns the room "team"; each viewer joined it (invited, accepted) as a viewer."""
    for name in ("ann", *viewers):
        mesh.user(name)
    mesh.room("team", "ann", **dict.fromkeys(viewers, "viewer"))


# ---------------------------------------------------------------- case 3: standing announcements


async def test_standing_announcements_are_capped_per_device(mesh: Mesh) -> None:
    team(mesh, "eve")
    eve = await mesh.connect(mesh.enrol("eve"))
    for n in range(16):
        eve.socket.send(type="announce", kind="offer", data={"n": n}, key=f"k{n}", rooms=["team"])
    eve.socket.send(type="announce", kind="offer", data={}, key="k16", rooms=["team"])
    assert (await eve.socket.next(error("rate_limited")))["message"].startswith("Too many standing")
    eve.socket.send(type="withdraw", key="k0")
    eve.socket.send(type="withdraw", key="k1")
    eve.socket.send(type="announce", kind="offer", data=BLOB, key="big", rooms=["team"])
    eve.socket.send(type="announce", kind="offer", data=BLOB, key="bigger", rooms=["team"])
    await eve.socket.next(error("too_large"))
    await settled(mesh.hub)
    standing = mesh.standing(eve)
    assert "big" in standing and "bigger" not in standing and len(standing) == 15


async def test_a_viewer_with_20_big_standing_announcements_cannot_close_a_newcomer(
    mesh: Mesh,
) -> None:
    team(mesh, "eve")
    eve = await mesh.connect(mesh.enrol("eve"))
    for n in range(20):
        eve.socket.send(type="announce", kind="offer", data=BLOB, key=f"k{n}", rooms=["team"])
    await eve.socket.next(error("too_large"))
    ann = await mesh.connect(mesh.enrol("ann"))
    assert ann.hello["online"] == [eve.id]
    replayed = await ann.socket.next(event("offer"))
    assert replayed["rooms"] == ["team"] and replayed["from"] == eve.id
    eve.socket.send(type="signal", to=ann.id, payload={"still": "here"})
    assert (await ann.socket.next(lambda f: f["type"] == "signal"))["payload"] == {"still": "here"}
    assert not ann.task.done()


async def test_replay_is_truncated_instead_of_closing_the_newcomer(mesh: Mesh) -> None:
    """20 devices of a viewer, each holding one 60 KB standing announcement: 1.2 MB of replay."""
    team(mesh, "eve")
    for n in range(20):
        eve = await mesh.connect(mesh.enrol("eve", f"eve-{n}"))
        eve.socket.send(type="announce", kind="offer", data=BLOB, key="k", rooms=["team"])
    await settled(mesh.hub)
    ann = await mesh.connect(mesh.enrol("ann"))
    assert len(ann.hello["online"]) == 20
    truncated = await ann.socket.next(error("replay_truncated"))
    replayed = [f for f in ann.socket.sent if f.get("kind") == "offer"]
    assert 0 < len(replayed) < 20 and truncated is ann.socket.sent[-1]
    # The newcomer stays, and live frames reach it.
    eve.socket.send(type="announce", kind="ping", data={}, rooms=["team"])
    assert (await ann.socket.next(event("ping")))["from"] == eve.id
    assert not ann.task.done()


async def test_a_live_burst_limits_the_sender_not_the_readers(mesh: Mesh) -> None:
    team(mesh, "eve")
    ann = await mesh.connect(mesh.enrol("ann"))
    eve = await mesh.connect(mesh.enrol("eve"))
    await ann.socket.next(presence(eve, True))
    ann.socket.reading.clear()  # a reader on a slow link: nothing leaves its outbox meanwhile
    for _ in range(100):
        eve.socket.send(type="announce", kind="burst", data=BLOB, rooms=["team"])
    eve.socket.send(type="signal", to=ann.id, payload={"after": "burst"})
    # The signal comes after all 100 announcements: once it is queued, the burst is done.
    await eve.socket.next(error("rate_limited"))
    await settled(mesh.hub)
    ann.socket.reading.set()
    await ann.socket.next(lambda f: f["type"] == "signal")
    delivered = [f for f in ann.socket.sent if f.get("kind") == "burst"]
    assert 0 < len(delivered) <= 5  # the burst budget: 256 KiB of 60 KB announcements
    assert not ann.task.done()


async def test_the_fan_out_budget_refills_and_survives_reconnects(mesh: Mesh) -> None:
    team(mesh)
    principal = mesh.enrol("ann")
    phone = await mesh.connect(mesh.enrol("ann", "phone"))
    laptop = await mesh.connect(principal)
    for _ in range(5):
        laptop.socket.send(type="announce", kind="burst", data=BLOB)
    await laptop.socket.next(error("rate_limited"))
    laptop = await mesh.connect(principal)  # a new socket of the same device: no fresh budget
    laptop.socket.send(type="announce", kind="burst", data=BLOB)
    await laptop.socket.next(error("rate_limited"))
    mesh.clock.advance(2.0)  # 128 KiB refilled
    laptop.socket.send(type="announce", kind="after-pause", data=BLOB)
    assert (await phone.socket.next(event("after-pause")))["rooms"] == ["@ann"]


# ---------------------------------------------------------------- rooms the announcer chose


async def test_announcements_go_only_into_the_chosen_rooms(mesh: Mesh) -> None:
    team(mesh, "bob")
    mesh.user("carl")
    mesh.room("side", "carl", ann="member")
    ann = await mesh.connect(mesh.enrol("ann"))
    phone = await mesh.connect(mesh.enrol("ann", "phone"))
    bob = await mesh.connect(mesh.enrol("bob"))
    carl = await mesh.connect(mesh.enrol("carl"))
    ann.socket.send(type="announce", kind="own", data={}, key="own")  # default: own devices
    ann.socket.send(type="announce", kind="shared", data={}, key="t", rooms=["team", "side"])
    ann.socket.send(type="announce", kind="nope", data={}, rooms=["elsewhere"])
    assert (await ann.socket.next(error("not_allowed")))["message"]
    assert (await phone.socket.next(event("own")))["rooms"] == ["@ann"]
    assert (await phone.socket.next(event("shared")))["rooms"] == ["side", "team"]
    assert (await bob.socket.next(event("shared")))["rooms"] == ["team"]
    assert (await carl.socket.next(event("shared")))["rooms"] == ["side"]
    await settled(mesh.hub)
    for device in (bob, carl):
        assert not [f for f in device.socket.sent if f.get("kind") in ("own", "nope")]


async def test_leaving_a_room_ends_what_it_no_longer_sees(mesh: Mesh) -> None:
    team(mesh, "bob")
    ann = await mesh.connect(mesh.enrol("ann"))
    bob = await mesh.connect(mesh.enrol("bob"))
    await ann.socket.next(presence(bob, True))
    ann.socket.send(type="announce", kind="terminal.session", data={}, key="t", rooms=["team"])
    bob.socket.send(type="announce", kind="share.offer", data={}, key="o", rooms=["team"])
    await bob.socket.next(event("terminal.session"))
    await ann.socket.next(event("share.offer"))
    change = mesh.store.remove_member("team", "bob", by="bob", by_device=None, now=mesh.clock())
    mesh.hub.membership_changed(change)
    removed = await ann.socket.next(event("room.member_removed"))
    assert removed["data"] == {"room": "team", "user": "bob", "role": None}
    await bob.socket.next(event("room.member_removed"))
    assert (await bob.socket.next(event("terminal.session.ended")))["key"] == "t"
    await bob.socket.next(presence(ann, False))
    assert (await ann.socket.next(event("share.offer.ended")))["key"] == "o"
    await ann.socket.next(presence(bob, False))
    bob.socket.send(type="signal", to=ann.id, payload={})
    assert (await bob.socket.next(error("not_allowed")))["device_id"] == ann.id
    assert mesh.standing(bob) == {}  # it left with bob


async def test_joining_a_room_replays_only_that_rooms_announcements(mesh: Mesh) -> None:
    team(mesh)
    mesh.user("bob")
    ann = await mesh.connect(mesh.enrol("ann"))
    bob = await mesh.connect(mesh.enrol("bob"))
    assert bob.hello["online"] == []
    ann.socket.send(type="announce", kind="private", data={}, key="p")
    ann.socket.send(type="announce", kind="terminal.session", data={}, key="t", rooms=["team"])
    await settled(mesh.hub)
    mesh.room("side", "ann")
    mesh.store.invite("team", "bob", "viewer", by="ann", by_device=None, now=mesh.clock())
    assert not [f for f in bob.socket.sent if f["type"] != "hello"]  # invited is not joined
    change = mesh.store.accept_invitation("team", "bob", device=None, now=mesh.clock())
    mesh.hub.membership_changed(change)
    added = await bob.socket.next(event("room.member_added"))
    assert added["data"] == {"room": "team", "user": "bob", "role": "viewer"}
    await bob.socket.next(presence(ann, True))
    assert (await bob.socket.next(event("terminal.session")))["rooms"] == ["team"]
    await ann.socket.next(presence(bob, True))
    await settled(mesh.hub)
    assert not [f for f in bob.socket.sent if f.get("kind") == "private"]
    role = mesh.store.set_role("team", "bob", "member", by="ann", by_device=None, now=mesh.clock())
    mesh.hub.membership_changed(role)
    assert (await bob.socket.next(event("room.role_changed")))["data"]["role"] == "member"


async def test_server_events_reach_rooms_and_users(mesh: Mesh) -> None:
    team(mesh, "bob")
    mesh.user("carl")
    ann = await mesh.connect(mesh.enrol("ann"))
    bob = await mesh.connect(mesh.enrol("bob"))
    carl = await mesh.connect(mesh.enrol("carl"))
    mesh.hub.room_event(["team"], "terminal.control", {"session_id": "s"})
    for device in (ann, bob):
        got = await device.socket.next(event("terminal.control"))
        assert (got["rooms"], got["data"], "from" in got) == (["team"], {"session_id": "s"}, False)
    mesh.hub.user_event("carl", "room.invited", {"room": "team"})
    assert (await carl.socket.next(event("room.invited")))["data"] == {"room": "team"}
    await settled(mesh.hub)
    assert not [f for f in carl.socket.sent if f.get("kind") == "terminal.control"]


# ---------------------------------------------------------------- case 6: sockets and sessions


async def test_a_revoked_session_is_closed_4403_and_gets_nothing_more(mesh: Mesh) -> None:
    team(mesh)
    laptop = await mesh.connect(mesh.enrol("ann"))
    phone = await mesh.connect(mesh.enrol("ann", "phone"))
    await laptop.socket.next(presence(phone, True))
    mesh.hub.close_sessions({laptop.principal.session_id})
    # Neither way does anything pass once the session is revoked.
    phone.socket.send(type="signal", to=laptop.id, payload={"after": "revocation"})
    laptop.socket.send(type="announce", kind="after-revocation", data={})
    assert await laptop.ended() == 4403
    await phone.socket.next(presence(laptop, False))
    assert not [f for f in laptop.socket.sent if f["type"] == "signal"]
    assert not [f for f in phone.socket.sent if f.get("kind") == "after-revocation"]


async def test_a_revocation_nobody_reported_is_found_by_the_sweep(mesh: Mesh) -> None:
    team(mesh)
    laptop = await mesh.connect(mesh.enrol("ann"))
    phone = await mesh.connect(mesh.enrol("ann", "phone"))
    _, refresh = mesh.tokens[laptop.id]
    mesh.store.refresh(refresh, now=mesh.clock())
    with pytest.raises(Exception, match="not valid"):
        mesh.store.refresh(refresh, now=mesh.clock())  # reuse: the session is revoked
    assert await laptop.ended() == 4403
    await phone.socket.next(presence(laptop, False))
    assert not phone.task.done()


async def test_an_expired_token_closes_the_socket_4401(mesh: Mesh) -> None:
    team(mesh)
    laptop = await mesh.connect(mesh.enrol("ann"))
    assert laptop.hello["access_expires_at"] == laptop.principal.access_expires_at
    mesh.clock.advance(ACCESS_TTL + 1)
    assert await laptop.ended() == 4401


async def test_an_auth_frame_renews_the_socket(mesh: Mesh) -> None:
    team(mesh)
    laptop = await mesh.connect(mesh.enrol("ann"))
    phone = mesh.enrol("ann", "phone")
    mesh.clock.advance(ACCESS_TTL - 60)
    tokens = mesh.store.refresh(mesh.tokens[laptop.id][1], now=mesh.clock())
    laptop.socket.send(type="auth", access_token=tokens.access_token)
    await settled(mesh.hub)
    mesh.clock.advance(120)  # past the first token's expiry
    await mesh.hub.sweep()
    assert not laptop.task.done()
    # Another device's token is no renewal: closed as unauthorized.
    laptop.socket.send(type="auth", access_token=mesh.tokens[phone.device_id][0])
    assert await laptop.ended() == 4401


async def test_an_auth_frame_with_a_bad_token_closes_4401(mesh: Mesh) -> None:
    team(mesh)
    laptop = await mesh.connect(mesh.enrol("ann"))
    laptop.socket.send(type="auth", access_token="mesh_at_forged")
    assert await laptop.ended() == 4401


async def test_a_room_made_while_its_owner_is_online_connects_its_members(mesh: Mesh) -> None:
    for name in ("ann", "bob"):
        mesh.user(name)
    ann = await mesh.connect(mesh.enrol("ann"))
    bob = await mesh.connect(mesh.enrol("bob"))
    mesh.room("team", "ann", bob="member")  # the hub never heard of "team" before bob joined
    await ann.socket.next(presence(bob, True))
    ann.socket.send(type="signal", to=bob.id, payload={"hi": 1})
    assert (await bob.socket.next(lambda f: f["type"] == "signal"))["payload"] == {"hi": 1}
    mesh.hub.room_event(["team"], "terminal.control", {})
    assert (await ann.socket.next(event("terminal.control")))["rooms"] == ["team"]
