"""QUIC between two agents through the reference server's relay: real server, real enrolment,
real endpoints, real WebSockets."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.asyncio.server import ServerConnection, serve

from meshagent_gui.context import Context
from meshagent_gui.core.mesh.authed_socket import ENROL_AGAIN
from meshagent_gui.core.mesh.client import ACCESS_SECRET, REFRESH_SECRET, MeshClient
from meshagent_gui.core.mesh.enroll import enroll
from meshagent_gui.core.p2p import Endpoint, PeerConnection, PeerStream
from meshagent_gui.core.p2p.endpoint import relay_address
from meshagent_gui.core.p2p.relay import MAX_DATAGRAM, RelayLink
from meshagent_gui.server.runner import RunningServer, ServerSettings, start_server
from meshagent_gui.server.store import Store, StoreError
from tests.unit.server.conftest import PASSWORD, cheap_passwords

WAIT = 10.0
PAYLOAD = 2 * 1024 * 1024


@pytest.fixture(autouse=True)
def file_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHAGENT_SECRET_STORE", "file")


@dataclass
class Agent:
    ctx: Context
    client: MeshClient
    endpoint: Endpoint
    link: RelayLink

    @property
    def id(self) -> str:
        return self.ctx.identity.device_id


class Mesh:
    """The reference server (restartable on its port) and enrolled agent homes."""

    def __init__(self, tmp_path: Path, server: RunningServer) -> None:
        self.tmp_path = tmp_path
        self.server: RunningServer | None = server
        self.url = server.url
        self._homes = 0

    @property
    def running(self) -> RunningServer:
        assert self.server is not None
        return self.server

    async def user(self, name: str) -> None:
        state = self.running.state
        password_hash = await asyncio.to_thread(state.passwords.hash, PASSWORD)
        await state.db.call(Store.create_user, name, password_hash, now=0.0)

    async def home(self, user: str) -> Context:
        self._homes += 1
        ctx = Context.open(self.tmp_path / f"home{self._homes}")
        await enroll(
            ctx, self.url, username=user, password=PASSWORD, device_name=f"dev{self._homes}"
        )
        return ctx

    async def stop(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            await server.stop()

    async def restart(self) -> None:
        await self.stop()
        port = int(self.url.rsplit(":", 1)[1])
        self.server = await start_server(
            ServerSettings(data_dir=self.tmp_path / "server", port=port)
        )

    @asynccontextmanager
    async def agent(
        self, ctx: Context, engine: str | None = None, *, queue_limit: int = 4096
    ) -> AsyncIterator[Agent]:
        client = MeshClient(self.url, secrets=ctx.secrets)
        endpoint = Endpoint(ctx.identity, engine=engine)
        await endpoint.start("127.0.0.1", 0)
        link = RelayLink(client, endpoint, reconnect_max=1.0, queue_limit=queue_limit)
        task = asyncio.create_task(link.run())
        try:
            await link.wait_connected(WAIT)
            yield Agent(ctx, client, endpoint, link)
        finally:
            task.cancel()
            await asyncio.wait([task])
            await endpoint.close()
            await client.aclose()


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    server = await start_server(ServerSettings(data_dir=tmp_path / "server"))
    server.state.passwords = cheap_passwords()
    running = Mesh(tmp_path, server)
    try:
        await running.user("ann")
        yield running
    finally:
        await running.stop()


async def eventually(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.02)


async def read_all(stream: PeerStream) -> bytes:
    got = bytearray()
    while part := await stream.read(65536):
        got += part
    return bytes(got)


async def exchange(dialer: PeerConnection, listener: PeerConnection, size: int) -> None:
    """``size`` random bytes each way on one stream, at the same time; hashes compared."""
    ours, theirs = os.urandom(size), os.urandom(size)

    async def dialer_side() -> bytes:
        stream = await dialer.open_stream()

        async def write() -> None:
            await stream.write(ours)
            stream.write_eof()

        _, got = await asyncio.gather(write(), read_all(stream))
        return got

    async def listener_side() -> bytes:
        stream = await listener.accept_stream()

        async def write() -> None:
            await stream.write(theirs)
            stream.write_eof()

        _, got = await asyncio.gather(write(), read_all(stream))
        return got

    async with asyncio.timeout(3 * WAIT):
        at_dialer, at_listener = await asyncio.gather(dialer_side(), listener_side())
    assert hashlib.sha256(at_listener).digest() == hashlib.sha256(ours).digest()
    assert hashlib.sha256(at_dialer).digest() == hashlib.sha256(theirs).digest()


async def test_quic_end_to_end_over_the_relay(mesh: Mesh, engine: str) -> None:
    laptop, phone = await mesh.home("ann"), await mesh.home("ann")
    async with mesh.agent(laptop, engine) as a, mesh.agent(phone, engine) as b:
        assert a.link.state == b.link.state == "online"
        conn = await a.endpoint.connect(relay_address(b.id), b.id, timeout=WAIT)
        incoming = await asyncio.wait_for(b.endpoint.accept(), WAIT)
        # Both ends authenticated each other through the relay, as on a direct path.
        assert (conn.peer_id, incoming.peer_id) == (b.id, a.id)
        assert conn.engine == incoming.engine == engine
        await exchange(conn, incoming, PAYLOAD)
        assert a.link.stats.bytes_out >= PAYLOAD and b.link.stats.bytes_in >= PAYLOAD
        assert b.link.stats.bytes_out >= PAYLOAD and a.link.stats.bytes_in >= PAYLOAD
        assert a.link.stats.frames_out > PAYLOAD // MAX_DATAGRAM
        assert a.link.stats.malformed == b.link.stats.malformed == 0
        # Batched (both ends speak it): fewer frames through the server than datagrams.
        forwarded = mesh.running.state.relay.stats.forwarded
        assert 0 < forwarded < a.link.stats.frames_out + b.link.stats.frames_out
        conn.close()


async def test_another_users_device_cannot_reach_through_the_relay(mesh: Mesh) -> None:
    await mesh.user("eve")
    laptop, intruder = await mesh.home("ann"), await mesh.home("eve")
    async with mesh.agent(laptop) as a, mesh.agent(intruder) as eve:
        with pytest.raises(TimeoutError):
            await eve.endpoint.connect(relay_address(a.id), a.id, timeout=1.0)
        assert mesh.running.state.relay.stats.refused > 0
        assert mesh.running.state.relay.stats.forwarded == 0
        assert a.link.stats.frames_in == 0
        assert a.endpoint.connections == []


async def test_relay_link_comes_back_after_a_server_restart(mesh: Mesh) -> None:
    laptop, phone = await mesh.home("ann"), await mesh.home("ann")
    async with mesh.agent(laptop) as a, mesh.agent(phone) as b:
        assert a.link.stats.connects == 1
        await mesh.restart()
        await eventually(lambda: a.link.stats.connects == 2 and b.link.stats.connects == 2)
        await a.link.wait_connected(WAIT)
        await b.link.wait_connected(WAIT)
        conn = await a.endpoint.connect(relay_address(b.id), b.id, timeout=WAIT)
        incoming = await asyncio.wait_for(b.endpoint.accept(), WAIT)
        await exchange(conn, incoming, 64 * 1024)


async def test_drops_are_counted_and_never_block(mesh: Mesh) -> None:
    laptop, phone = await mesh.home("ann"), await mesh.home("ann")
    async with mesh.agent(laptop, queue_limit=4) as a, mesh.agent(phone) as b:
        to_b = relay_address(b.id)
        # Called from the endpoint's transmit path: it must return at once, queue at most 4.
        a.link.send([b"x" * 100] * 10, to_b)
        assert a.link.stats.dropped == 6
        a.link.send([b"x" * (MAX_DATAGRAM + 1)], to_b)  # the server would close on it
        a.link.send([b"x"], ("relay.not-hex", 0))
        assert a.link.stats.dropped == 8
        # The four that were queued arrive (the endpoint drops them: no such connection).
        await eventually(lambda: b.link.stats.frames_in == 4)
        assert b.link.stats.bytes_in == 400
        await eventually(lambda: b.endpoint.dropped_datagrams >= 4)
    # Shut down: the endpoint no longer has the relay, and the link drops what it is given.
    assert a.link.state == "offline"
    a.link.send([b"y"], to_b)
    assert a.link.stats.dropped == 9
    await eventually(lambda: mesh.running.state.relay.connection_count == 0)


async def test_bad_access_token_is_refreshed_once(mesh: Mesh) -> None:
    ctx = await mesh.home("ann")
    ctx.secrets.set(ACCESS_SECRET, "not-a-token")
    async with mesh.agent(ctx) as a:
        # The server closed the first attempt with 4401; the link refreshed and came up.
        assert a.link.state == "online" and a.link.stats.connects == 1
        assert ctx.secrets.get(ACCESS_SECRET) not in (None, "not-a-token")


async def test_malformed_frames_are_ignored(mesh: Mesh) -> None:
    """A server that sends junk: text, too short, then one good frame."""
    ctx = await mesh.home("ann")
    source = bytes(range(32))

    async def junk(ws: ServerConnection) -> None:
        await ws.send("text")
        await ws.send(b"\x01" * 32)
        await ws.send(source + b"\x40" + b"q" * 40)
        await ws.wait_closed()

    async with serve(junk, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        fake = Mesh(mesh.tmp_path, mesh.running)
        fake.url = f"http://127.0.0.1:{port}"
        async with fake.agent(ctx) as a:
            await eventually(lambda: a.link.stats.malformed == 2 and a.link.stats.frames_in == 1)
            # The good frame reached the endpoint (which dropped it: no such connection).
            await eventually(lambda: a.endpoint.dropped_datagrams == 1)
            assert a.link.stats.bytes_in == 41


async def test_the_relay_link_follows_its_session(mesh: Mesh) -> None:
    """Re-enrolment revokes the old session: its relay socket closes 4403 and the link comes
    back with the new tokens; a session revoked for good leaves it saying: enrol again."""
    ctx = await mesh.home("ann")
    async with mesh.agent(ctx) as a:
        await enroll(ctx, mesh.url, username="ann", password=PASSWORD, device_name="dev1")
        await eventually(lambda: a.link.stats.connects == 2 and a.link.state == "online")
        stolen = ctx.secrets.get(REFRESH_SECRET)
        assert stolen is not None
        state = mesh.running.state
        await state.db.call(Store.refresh, stolen, now=state.clock())
        with pytest.raises(StoreError):  # reuse: the session is revoked
            await state.db.call(Store.refresh, stolen, now=state.clock())
        await eventually(lambda: a.link.last_error == ENROL_AGAIN)
        assert a.link.state != "online"
