"""The WebSocket hub through a real server on 127.0.0.1 and the ``websockets`` client."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from meshagent_gui.core.mesh.types import API_PREFIX
from meshagent_gui.server.hub import HubLimits
from meshagent_gui.server.runner import RunningServer, ServerSettings, start_server
from meshagent_gui.server.store import NewDevice, Store
from tests.unit.server.conftest import PASSWORD, Enrolled, cheap_passwords, make_certificate

WAIT = 10.0  # generous bound on every network wait; never a timing assertion

Frame = dict[str, Any]


class Mesh:
    """A running server plus helpers to enrol devices and open their WebSockets."""

    def __init__(self, server: RunningServer, http: httpx.AsyncClient) -> None:
        self.server = server
        self.http = http

    async def user(self, name: str) -> None:
        password_hash = await asyncio.to_thread(self.server.state.passwords.hash, PASSWORD)
        await self.server.state.db.call(Store.create_user, name, password_hash, now=0.0)

    async def device(self, user: str, name: str) -> Enrolled:
        """A device enrolled straight in the store (enrolment itself is tested in test_app)."""
        cert = make_certificate(name)
        device = NewDevice(id=cert.fingerprint, name=name, platform="linux", certificate=cert.pem)
        enrolment = await self.server.state.db.call(
            Store.enroll_user_device, user, device, now=time.time()
        )
        return Enrolled(
            device_id=enrolment.device.id,
            user=user,
            access_token=enrolment.tokens.access_token,
            refresh_token=enrolment.tokens.refresh_token,
            certificate=cert,
        )

    async def join(self, owner: Enrolled, room: str, member: Enrolled, role: str) -> None:
        """``owner`` invites ``member``'s user into ``room`` (made if new); the user accepts."""
        await self.http.post("/rooms", json={"name": room}, headers=owner.auth)
        invited = await self.http.post(
            f"/rooms/{room}/invitations",
            json={"user": member.user, "role": role},
            headers=owner.auth,
        )
        assert invited.status_code == 202, invited.text
        accepted = await self.http.post(f"/invitations/{room}/accept", headers=member.auth)
        assert accepted.status_code == 200, accepted.text

    @asynccontextmanager
    async def online(self, device: Enrolled) -> AsyncIterator[Agent]:
        async with connect(self.ws_url, additional_headers=device.auth, open_timeout=WAIT) as ws:
            agent = Agent(ws, device)
            hello = await agent.receive()
            assert hello["type"] == "hello" and hello["device_id"] == device.device_id
            agent.hello = hello
            yield agent

    @property
    def ws_url(self) -> str:
        return "ws" + self.server.url.removeprefix("http") + API_PREFIX + "/ws"


class Agent:
    def __init__(self, ws: ClientConnection, device: Enrolled) -> None:
        self.ws = ws
        self.device = device
        self.hello: Frame = {}

    @property
    def id(self) -> str:
        return self.device.device_id

    async def send(self, **frame: Any) -> None:
        await self.ws.send(json.dumps(frame))

    async def receive(self) -> Frame:
        async with asyncio.timeout(WAIT):
            frame: Frame = json.loads(await self.ws.recv())
        return frame

    async def receive_until(self, wanted: Callable[[Frame], bool]) -> Frame:
        while True:
            frame = await self.receive()
            if wanted(frame):
                return frame

    async def closed_with(self) -> int | None:
        """Read until the server closes; the close code it sent."""
        async with asyncio.timeout(WAIT):
            try:
                while True:
                    await self.ws.recv()
            except ConnectionClosed as exc:
                return exc.rcvd.code if exc.rcvd else None


def presence(device: Agent | Enrolled, online: bool) -> Callable[[Frame], bool]:
    device_id = device.id if isinstance(device, Agent) else device.device_id
    return lambda f: f == f | {"type": "presence", "device_id": device_id, "online": online}


async def start_mesh(tmp_path: Path, heartbeat: float = 2.0) -> AsyncIterator[Mesh]:
    server = await start_server(
        ServerSettings(data_dir=tmp_path / "server", heartbeat_interval=heartbeat)
    )
    server.state.passwords = cheap_passwords()
    try:
        async with httpx.AsyncClient(base_url=server.url + API_PREFIX, timeout=WAIT) as http:
            yield Mesh(server, http)
    finally:
        await server.stop()


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    async for running in start_mesh(tmp_path):
        yield running


async def two_devices(mesh: Mesh) -> tuple[Enrolled, Enrolled]:
    await mesh.user("ann")
    return await mesh.device("ann", "laptop"), await mesh.device("ann", "phone")


async def test_presence_between_two_devices(mesh: Mesh) -> None:
    laptop, phone = await two_devices(mesh)
    async with mesh.online(laptop) as first:
        assert first.hello["online"] == []
        assert first.hello["heartbeat_interval"] == 2.0
        async with mesh.online(phone) as second:
            assert second.hello["online"] == [laptop.device_id]
            await first.receive_until(presence(phone, True))
            listed = (await mesh.http.get("/devices", headers=laptop.auth)).json()["devices"]
            assert [(d["id"], d["online"]) for d in listed] == [(phone.device_id, True)]
        offline = await first.receive_until(presence(phone, False))
        assert offline["at"] > 0
    listed = (await mesh.http.get("/devices", headers=phone.auth)).json()["devices"]
    assert listed[0]["online"] is False and listed[0]["last_seen"] is not None


async def test_signal_relay_allowed_and_refused(mesh: Mesh) -> None:
    laptop, phone = await two_devices(mesh)
    await mesh.user("eve")
    eve = await mesh.device("eve", "eve-box")
    async with mesh.online(laptop) as ann, mesh.online(eve) as stranger:
        await ann.send(type="signal", to=phone.device_id, payload={"sdp": 1})
        error = await ann.receive()
        assert (error["type"], error["error"], error["device_id"]) == (
            "error",
            "device_offline",
            phone.device_id,
        )
        async with mesh.online(phone) as target:
            await ann.send(type="signal", to=phone.device_id, payload={"candidates": ["a"]})
            relayed = await target.receive()
            assert relayed == {
                "type": "signal",
                "from": laptop.device_id,
                "payload": {"candidates": ["a"]},
            }
            await stranger.send(type="signal", to=phone.device_id, payload={})
            refused = await stranger.receive()
            assert (refused["error"], refused["device_id"]) == ("not_allowed", phone.device_id)
            await stranger.send(type="signal", payload={})
            assert (await stranger.receive())["error"] == "bad_message"


async def test_bad_frames_get_error_frames(mesh: Mesh) -> None:
    laptop, _ = await two_devices(mesh)
    async with mesh.online(laptop) as ann:
        for frame in ("not json", json.dumps({"type": "hello"}), json.dumps({"type": "nope"})):
            await ann.ws.send(frame)
            assert (await ann.receive())["error"] == "bad_message"
        await ann.ws.send(b"\x00binary")
        assert (await ann.receive())["error"] == "bad_message"
        await ann.send(type="announce", kind="room.member_added", data={})
        assert (await ann.receive())["error"] == "bad_message"
        await ann.send(type="announce", kind="share.offer.ended", data={})
        assert (await ann.receive())["error"] == "bad_message"


async def test_standing_announcements_are_replayed_and_ended(mesh: Mesh) -> None:
    laptop, phone = await two_devices(mesh)
    session = {"session_id": "s1", "title": "bash"}
    async with mesh.online(laptop) as host:
        await host.send(type="announce", kind="terminal.session", data=session, key="t1")
        await host.send(type="announce", kind="share.offer", data={"n": 1}, key="o1")
        async with mesh.online(phone) as viewer:
            replayed = [await viewer.receive(), await viewer.receive()]
            assert {(f["kind"], f["key"], f["from"]) for f in replayed} == {
                ("terminal.session", "t1", laptop.device_id),
                ("share.offer", "o1", laptop.device_id),
            }
            await host.send(type="withdraw", key="t1")
            ended = await viewer.receive()
            assert (ended["kind"], ended["key"], ended["data"]) == (
                "terminal.session.ended",
                "t1",
                session,
            )
            await host.send(type="announce", kind="ping", data={"x": 1})  # not standing
            transient = await viewer.receive()
            assert (transient["kind"], "key" in transient) == ("ping", False)
            await host.ws.close()
            on_disconnect = await viewer.receive()
            assert (on_disconnect["kind"], on_disconnect["key"]) == ("share.offer.ended", "o1")
            await viewer.receive_until(presence(laptop, False))


async def test_announcements_to_listed_devices_only(mesh: Mesh) -> None:
    await mesh.user("ann")
    laptop, phone, tablet = [await mesh.device("ann", name) for name in ("l", "p", "t")]
    async with mesh.online(laptop) as host, mesh.online(phone) as chosen:
        await host.send(type="announce", kind="share.offer", data={}, to=[phone.device_id], key="k")
        assert (await chosen.receive_until(lambda f: f["type"] == "event"))["key"] == "k"
        async with mesh.online(tablet) as other:
            # The tablet sees presence, but not the offer made to the phone only.
            await host.send(type="announce", kind="marker", data={})
            assert (await other.receive())["kind"] == "marker"


async def test_bad_token_closes_with_4401(mesh: Mesh) -> None:
    for headers in ({"Authorization": "Bearer mesh_at_forged"}, {}):
        async with connect(mesh.ws_url, additional_headers=headers, open_timeout=WAIT) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(WAIT):
                    await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


async def test_a_newer_connection_replaces_the_old_one(mesh: Mesh) -> None:
    laptop, phone = await two_devices(mesh)
    async with mesh.online(phone) as watcher, mesh.online(laptop) as old:
        await watcher.receive_until(presence(laptop, True))
        await old.send(type="announce", kind="terminal.session", data={}, key="t")
        await watcher.receive_until(lambda f: f.get("kind") == "terminal.session")
        async with mesh.online(laptop) as new:
            assert await old.closed_with() == 4409
            # The old connection's announcements end; the device itself stays online.
            ended = await watcher.receive()
            assert ended["kind"] == "terminal.session.ended"
            await new.send(type="signal", to=phone.device_id, payload={"n": 2})
            assert await watcher.receive() == {
                "type": "signal",
                "from": laptop.device_id,
                "payload": {"n": 2},
            }
            assert mesh.server.state.hub.is_online(laptop.device_id)


async def test_member_added_event_introduces_the_devices(mesh: Mesh) -> None:
    await mesh.user("ann")
    await mesh.user("bob")
    ann, bob = await mesh.device("ann", "ann-pc"), await mesh.device("bob", "bob-pc")
    async with mesh.online(ann) as owner, mesh.online(bob) as newcomer:
        assert newcomer.hello["online"] == []
        await mesh.http.post("/rooms", json={"name": "team"}, headers=ann.auth)
        await owner.send(type="announce", kind="private", data={}, key="p")
        await owner.send(type="announce", kind="terminal.session", data={}, key="t", rooms=["team"])
        await mesh.join(ann, "team", bob, "viewer")
        added = {"type": "event", "kind": "room.member_added"}
        data = {"room": "team", "user": "bob", "role": "viewer"}
        for agent in (owner, newcomer):
            event = await agent.receive_until(lambda f: f == f | added)
            assert (event["data"], event["rooms"]) == (data, ["team"])
        await newcomer.receive_until(presence(ann, True))
        # Only what was announced into the room: not ann's announcement to her own devices.
        shared = await newcomer.receive_until(lambda f: f.get("type") == "event")
        assert (shared["kind"], shared["rooms"]) == ("terminal.session", ["team"])
        await owner.receive_until(presence(bob, True))
        await newcomer.send(type="signal", to=ann.device_id, payload={})
        assert (await owner.receive())["from"] == bob.device_id


async def test_oversized_frame_closes_with_1009(mesh: Mesh) -> None:
    laptop, _ = await two_devices(mesh)
    async with mesh.online(laptop) as ann:
        await ann.send(type="announce", kind="big", data={"blob": "x" * 70_000})
        assert await ann.closed_with() == 1009


async def test_a_client_that_stops_reading_is_dropped(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    mesh.server.state.hub.limits = HubLimits(
        max_queued_bytes=256 * 1024,
        frames_per_second=1e6,
        announce_per_second=1e6,
        announce_burst=1e6,
        announce_bytes_per_second=1e9,
        announce_burst_bytes=1e9,
    )
    laptop, phone = await two_devices(mesh)
    caplog.set_level(logging.WARNING, logger="meshagent_gui.server.hub")
    async with mesh.online(laptop) as sender, mesh.online(phone) as stalled:
        await sender.receive_until(presence(phone, True))
        stalled.ws.transport.pause_reading()
        blob = {"blob": "y" * 60_000}
        gone = asyncio.create_task(sender.receive_until(presence(phone, False)))
        for _ in range(2_000):  # bounded: the drop comes after a few MiB of kernel buffers
            if gone.done():
                break
            await sender.send(type="announce", kind="flood", data=blob)
            await asyncio.sleep(0)
        await gone
        assert "does not read its frames" in caplog.text
        # What was already in flight still arrives, then the connection ends.
        stalled.ws.transport.resume_reading()
        assert await stalled.closed_with() in (None, 1008)


async def test_a_silent_client_goes_offline_after_missed_heartbeats(tmp_path: Path) -> None:
    async for mesh in start_mesh(tmp_path, heartbeat=0.3):
        laptop, phone = await two_devices(mesh)
        async with mesh.online(laptop) as watcher, mesh.online(phone) as frozen:
            await watcher.receive_until(presence(phone, True))
            frozen.ws.transport.pause_reading()  # no pongs from now on
            await watcher.receive_until(presence(phone, False))
            frozen.ws.transport.resume_reading()
