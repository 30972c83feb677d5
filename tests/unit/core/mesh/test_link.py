"""The control link's end of the socket lifetime rules, against the reference server in-process.

The server runs on a fake clock (tokens, expiry and the hub's sweep all read it), so a token's
end is reached by moving the clock, never by waiting an hour.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshagent_gui.context import Context
from meshagent_gui.core.bus import EventBus
from meshagent_gui.core.events import ServerDisconnected
from meshagent_gui.core.mesh.authed_socket import ENROL_AGAIN
from meshagent_gui.core.mesh.client import REFRESH_SECRET, MeshClient
from meshagent_gui.core.mesh.enroll import enroll
from meshagent_gui.core.mesh.link import MeshLink
from meshagent_gui.server.hub import HubLimits
from meshagent_gui.server.runner import RunningServer, ServerSettings, start_server
from meshagent_gui.server.store import ACCESS_TTL, Store, StoreError
from tests.unit.server.conftest import PASSWORD, FakeClock, cheap_passwords

WAIT = 10.0


@pytest.fixture(autouse=True)
def file_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHAGENT_SECRET_STORE", "file")


@dataclass
class Running:
    link: MeshLink
    client: MeshClient
    bus: EventBus
    task: asyncio.Task[None]


class Mesh:
    def __init__(self, tmp_path: Path, server: RunningServer, clock: FakeClock) -> None:
        self.tmp_path = tmp_path
        self.server = server
        self.clock = clock
        self._homes = 0

    async def home(self) -> Context:
        self._homes += 1
        ctx = Context.open(self.tmp_path / f"home{self._homes}")
        await self.enrol(ctx)
        return ctx

    async def enrol(self, ctx: Context) -> None:
        await enroll(ctx, self.server.url, username="ann", password=PASSWORD, device_name="dev")

    def expires_at(self, device_id: str) -> float:
        """When the hub will close this device's socket (the token it holds runs out)."""
        connection = self.server.state.hub.connection(device_id)
        assert connection is not None
        return connection.expires_at

    def session_of(self, device_id: str) -> str:
        connection = self.server.state.hub.connection(device_id)
        assert connection is not None
        return connection.auth_session

    @asynccontextmanager
    async def link(self, ctx: Context) -> AsyncIterator[Running]:
        client = MeshClient(self.server.url, secrets=ctx.secrets)
        bus = EventBus()
        link = MeshLink(client, bus, reconnect_max=0.2)
        task = asyncio.create_task(link.run())
        try:
            await link.wait_connected(WAIT)
            yield Running(link, client, bus, task)
        finally:
            task.cancel()
            await asyncio.wait([task])
            await client.aclose()


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    server = await start_server(ServerSettings(data_dir=tmp_path / "server"))
    clock = FakeClock(time.time())
    state = server.state
    state.passwords = cheap_passwords()
    state.clock = clock
    state.hub.clock = clock
    state.hub.limits = HubLimits(sweep_interval=0.05)
    password_hash = await asyncio.to_thread(state.passwords.hash, PASSWORD)
    await state.db.call(Store.create_user, "ann", password_hash, now=clock())
    try:
        yield Mesh(tmp_path, server, clock)
    finally:
        await server.stop()


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait (bounded) until the condition holds; never a timing assertion."""
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.02)


async def test_the_link_renews_its_socket_before_the_token_expires(mesh: Mesh) -> None:
    ctx = await mesh.home()
    device_id = ctx.identity.device_id
    mesh.clock.advance(ACCESS_TTL - 1.5)  # the token has 1.5 s left when the link connects
    async with mesh.link(ctx) as running:
        hub = mesh.server.state.hub
        first = mesh.expires_at(device_id)
        # The link refreshes on its own, then hands the new token to the server in-band.
        await eventually(lambda: mesh.expires_at(device_id) > first)
        mesh.clock.advance(60)  # well past the token the socket was opened with
        await hub.sweep()
        assert hub.is_online(device_id)
        assert running.link.state == "online" and running.link.connects == 1


async def test_a_revoked_session_whose_refresh_is_refused_says_enrol_again(mesh: Mesh) -> None:
    ctx = await mesh.home()
    async with mesh.link(ctx) as running:
        with running.bus.subscribed() as events:
            store = mesh.server.state.db.store
            stolen = ctx.secrets.get(REFRESH_SECRET)
            assert stolen is not None
            # Someone else used this device's refresh token, and the device would too: reuse.
            await mesh.server.state.db.call(Store.refresh, stolen, now=mesh.clock())
            with pytest.raises(StoreError):
                store.refresh(stolen, now=mesh.clock())
            async with asyncio.timeout(WAIT):
                while True:
                    event = await events.get()
                    if isinstance(event, ServerDisconnected):
                        break
        assert event.reason == ENROL_AGAIN
        assert running.link.last_error == ENROL_AGAIN
        assert not mesh.server.state.hub.is_online(ctx.identity.device_id)


async def test_a_session_revoked_by_re_enrolment_reconnects_with_the_new_tokens(
    mesh: Mesh,
) -> None:
    ctx = await mesh.home()
    device_id = ctx.identity.device_id
    async with mesh.link(ctx) as running:
        old_session = mesh.session_of(device_id)
        await mesh.enrol(ctx)  # the device enrolled again (new tokens in its secret store)
        await eventually(lambda: running.link.connects == 2 and running.link.state == "online")
        assert mesh.session_of(device_id) != old_session
