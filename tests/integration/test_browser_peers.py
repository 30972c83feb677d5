"""A real agent sends to a browser over WebRTC: ``meshagent send PATH --to <browser>`` and
``meshagent send PATH --link``, through the real server.

The browser is a Python stand-in doing what the web client does: it enrols through
``/enroll/browser`` (or claims a share link) with the fingerprint of its DTLS certificate, holds
the server's WebSocket, answers the agent's ``webrtc.offer`` once the offer's token checks out
(its ``aud`` is the page, its holder the sender), and receives with the agent's own transfer
code. The real page is tested in Chromium by the web client's tests; this one pins the agent
and the server.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
import zipfile
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
import pytest

from meshagent_gui.core.mesh.types import (
    API_PREFIX,
    EnrollResponse,
    LinkClaimed,
    PublicKey,
    TokenPair,
)
from meshagent_gui.core.p2p.candidates import own_addresses
from meshagent_gui.core.p2p.peers import Service, capability_validator
from meshagent_gui.core.p2p.session import ChannelClosed, MeshSession
from meshagent_gui.core.p2p.webrtc_peers import WebRTCPeers
from meshagent_gui.core.protocol.captoken import (
    CapabilityVerifier,
    ReplayCache,
    TokenError,
    public_key_from_jwk_x,
)
from meshagent_gui.core.protocol.handshake import Validator
from meshagent_gui.core.protocol.messages import StreamRole
from meshagent_gui.core.protocol.transfer import TRANSFER_REGISTRY
from meshagent_gui.core.share.service import TransferService

from .harness import AgentHome, Process, Server, wait_until
from .webrtc_support import WebRTCStandIn

WAIT = 60.0


class Page(WebRTCStandIn):
    """What the web client is to an agent: a WebRTC-only device that receives."""

    def __init__(self, server: Server, home: Path) -> None:
        super().__init__(server, home, "page", None)
        self.server = server
        self.downloads = home / "downloads"
        self.downloads.mkdir()
        self.services: dict[StreamRole, Service] = {}
        self.task: asyncio.Task[None] | None = None  # run(), once started
        self.refused_offers = 0

    @property
    def id(self) -> str:
        return self.identity.device_id

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.server.url + API_PREFIX) as http:
            # A page sends its own origin with every POST.
            return await http.post(path, json=body, headers={"Origin": self.server.url})

    async def enrol(self, join_code: str, name: str) -> None:
        body = {"join_code": join_code, "device_name": name, "fingerprint": self.id}
        response = await self._post("/enroll/browser", body)
        assert response.status_code == 200, response.text
        answer = EnrollResponse.model_validate(response.json())
        assert answer.device_id == self.id
        self.client.store_tokens(answer)
        self._listen(answer.server_id, answer.keys)

    async def claim(self, url: str) -> LinkClaimed:
        parts = urlsplit(url)
        link_id = parts.path.removeprefix("/s/")
        body = {"secret": parts.fragment, "fingerprint": self.id}
        response = await self._post(f"/links/{link_id}/claim", body)
        assert response.status_code == 200, response.text
        claimed = LinkClaimed.model_validate(response.json())
        pair = TokenPair(
            access_token=claimed.access_token,
            access_expires_in=claimed.expires_in,
            refresh_token="none",  # a guest gets none
        )
        self.client.store_tokens(pair)
        self._listen(claimed.server_id, claimed.keys)
        return claimed

    def _listen(self, server_id: str, keys: list[PublicKey]) -> None:
        verifier = CapabilityVerifier(
            issuer=server_id,
            device_id=self.id,
            keys={key.kid: public_key_from_jwk_x(key.x) for key in keys},
        )
        offers = ReplayCache(64)

        async def admit(sender: str, token: object) -> bool:
            try:
                verifier.verify(
                    str(token),
                    now=time.time(),
                    peer_id=sender,
                    scope="p2p:connect",
                    replay_cache=offers,
                )
            except (TokenError, ValueError):
                self.refused_offers += 1
                return False
            return True

        def validator(peer_id: str) -> Validator:
            scopes = {role: service.scopes for role, service in self.services.items()}
            return capability_validator(verifier, peer_id, scopes, on_unknown_key=lambda: None)

        async def no_stun() -> None:
            return None  # loopback: host candidates are enough

        self.rtc = WebRTCPeers(
            credentials=lambda: self.identity,
            link=self.link,
            stun=no_stun,
            admit_offer=admit,
            validator=validator,
            adopt=self._adopt,
            local_addresses=own_addresses,
            registry=TRANSFER_REGISTRY,
        )

    def _adopt(self, mesh: MeshSession, dialer: str) -> bool:
        assert self._tasks is not None
        self.sessions[mesh.peer_id] = mesh
        self._tasks.create_task(self._serve(mesh))
        return True

    async def _serve(self, mesh: MeshSession) -> None:
        assert self._tasks is not None
        while True:
            try:
                channel = await mesh.accept_channel()
            except ChannelClosed:
                return
            self._tasks.create_task(_awaited(self.services[channel.role].handle(channel)))

    # what TransferService uses of a PeerManager
    def register(self, service: Service) -> None:
        self.services[service.role] = service

    async def session(self, peer_id: str) -> MeshSession:
        return self.sessions[peer_id]

    def receiver(self) -> TransferService:
        # The page shows the offer; here it takes it.
        return self.transfer_service(downloads=self.downloads, own_user="", auto_accept="all")

    async def aclose(self) -> None:
        for mesh in self.sessions.values():
            await mesh.aclose()
            await cast(Any, mesh.connection).aclose()
        await self.client.aclose()


@pytest.fixture(scope="module")
def desk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, AgentHome]]:
    """The server and ann's agent `desk`, up; shared by the module's tests."""
    root = tmp_path_factory.mktemp("browser-peers")
    logs = root / "logs"
    logs.mkdir()
    server = Server(root / "server", logs).start()
    agent = AgentHome(
        root / "desk", logs, "desk", config={"server.reconnect_max": "1", "device.name": "desk"}
    )
    try:
        server.add_user("ann")
        agent.login(server, server.join_code("ann"))
        agent.up()
        yield server, agent
    finally:
        agent.stop()
        server.stop()


@pytest.fixture
async def page(desk: tuple[Server, AgentHome], tmp_path: Path) -> AsyncIterator[Page]:
    server, _ = desk
    running = Page(server, tmp_path / "page")
    try:
        yield running
    finally:
        if running.task is not None:
            running.task.cancel()
            await asyncio.gather(running.task, return_exceptions=True)
        await running.aclose()


async def start(page: Page) -> None:
    """The page's receiver and its socket (after it enrolled or claimed a link)."""
    page.receiver()
    page.task = asyncio.create_task(page.run())
    await page.link.wait_connected(10)


async def test_send_to_a_browser_over_webrtc(
    desk: tuple[Server, AgentHome], page: Page, tmp_path: Path
) -> None:
    server, agent = desk
    await page.enrol(server.join_code("ann"), "Chromium on desk")
    await start(page)
    listed = {d["name"]: d for d in agent.devices()}
    assert listed["Chromium on desk"]["platform"] == "browser"
    assert listed["Chromium on desk"]["id"] == page.id
    payload = os.urandom(2 * 1024 * 1024 + 3)
    source = tmp_path / "report.bin"
    source.write_bytes(payload)
    out = await asyncio.to_thread(agent.ok, "send", str(source), "--to", "Chromium on desk")
    assert "report.bin" in out
    assert (page.downloads / "report.bin").read_bytes() == payload
    log = (agent.home / "state" / "meshagent.log").read_text()
    assert f"peer {page.id[:12]}: direct path (webrtc" in log


async def test_a_folder_reaches_a_browser_as_one_zip(
    desk: tuple[Server, AgentHome], page: Page, tmp_path: Path
) -> None:
    server, agent = desk
    await page.enrol(server.join_code("ann"), "Chromium folder")
    await start(page)
    folder = tmp_path / "photos"
    (folder / "2024" / "empty").mkdir(parents=True)
    files = {
        "photos/a.txt": b"hello\n",
        "photos/2024/b.bin": os.urandom(700_000),
        "photos/2024/c\u00e9.jpg": os.urandom(5000),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    await asyncio.to_thread(agent.ok, "send", str(folder), "--to", "Chromium folder")
    arrived = page.downloads / "photos.zip"
    wait_until(arrived.exists, 10, "photos.zip in the page's downloads")
    with zipfile.ZipFile(io.BytesIO(arrived.read_bytes())) as unzipped:
        assert unzipped.testzip() is None
        assert {n: unzipped.read(n) for n in files} == files
        assert "photos/2024/empty/" in unzipped.namelist()
    assert not (page.downloads / "photos").exists()  # one file, not a folder


async def test_a_share_link_sends_to_whoever_opens_it_once(
    desk: tuple[Server, AgentHome], page: Page, tmp_path: Path
) -> None:
    server, agent = desk
    payload = os.urandom(300_000)
    source = tmp_path / "for-you.bin"
    source.write_bytes(payload)
    sending = Process(
        ["--home", str(agent.home), "send", str(source), "--link", "--ttl", "120"],
        agent.logs / "send-link.log",
        env=agent.env,
    )
    try:
        url = (await asyncio.to_thread(sending.read_line, r"(http://\S+/s/\S+#\S+)")).group(1)
        assert url.startswith(server.url + "/s/")
        claimed = await page.claim(url)
        assert (claimed.name, claimed.size) == ("for-you.bin", len(payload))
        await start(page)
        assert await asyncio.to_thread(sending.proc.wait, WAIT) == 0
    finally:
        sending.stop()
    assert (page.downloads / "for-you.bin").read_bytes() == payload
    # Spent: a second page is refused, and the guest reaches nobody but the sender.
    async with httpx.AsyncClient(base_url=server.url + API_PREFIX) as http:
        again = await http.post(
            url.split("#")[0].replace("/s/", API_PREFIX + "/links/") + "/claim",
            json={"secret": url.split("#")[1], "fingerprint": "ab" * 32},
        )
        assert again.status_code == 409 and again.json()["error"] == "link_claimed"
        guest = {"Authorization": f"Bearer {claimed.access_token}"}
        listed = (await http.get("/devices", headers=guest)).json()["devices"]
        assert [d["id"] for d in listed] == [claimed.sender]
        refused = await http.get("/rooms", headers=guest)
        assert refused.status_code == 403


async def test_a_browser_in_no_shared_room_is_out_of_reach(
    desk: tuple[Server, AgentHome], page: Page, tmp_path: Path
) -> None:
    """Eve's page shares no room with ann's agent: it is no device to it, nothing is offered."""
    server, agent = desk
    server.add_user("eve")
    await page.enrol(server.join_code("eve"), "Eve's browser")
    await start(page)
    source = tmp_path / "secret.txt"
    source.write_text("not for eve")
    for target in ("Eve's browser", page.id):
        done = await asyncio.to_thread(agent.cli, "send", str(source), "--to", target)
        assert done.returncode != 0
        assert "shares a room with this one" in done.stderr and "Traceback" not in done.stderr
    assert not page.sessions and page.refused_offers == 0
    assert not any(page.downloads.iterdir())


async def _awaited(work: Awaitable[None]) -> None:
    await work  # a TaskGroup takes coroutines; a service's handler is any awaitable
