"""A browser-like peer reaches a real agent over WebRTC, signalled through the real server.

The "browser" is in the test: an aiortc peer connection whose DTLS certificate is its identity
(it enrols with that certificate, so its device id is its DTLS fingerprint), the server's
WebSocket for the ``webrtc.*`` signals, and the agent's own transfer service code to send. The
agent is a real ``meshagent up`` process: it checks the offer's token, answers, verifies the
DTLS fingerprint against the token and receives the file like one from any device.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any, cast

from meshagent_gui import identity
from meshagent_gui.core.mesh.client import EnrollCredentials
from meshagent_gui.core.p2p.candidates import own_addresses
from meshagent_gui.core.p2p.peers import (
    PeerUnreachable,
    capability_validator,
)
from meshagent_gui.core.p2p.session import HandshakeRefusedError, MeshSession
from meshagent_gui.core.p2p.webrtc_peers import WebRTCPeers
from meshagent_gui.core.protocol.captoken import CapabilityVerifier, public_key_from_jwk_x
from meshagent_gui.core.protocol.handshake import Validator
from meshagent_gui.core.protocol.transfer import TRANSFER_REGISTRY
from meshagent_gui.core.share.service import TransferService

from .harness import AgentHome, Server, wait_until
from .webrtc_support import WebRTCStandIn


class Browser(WebRTCStandIn):
    """An enrolled device whose only transport is WebRTC (what the web client is): it dials."""

    def __init__(self, server: Server, home: Path, *, cert: identity.Identity | None = None):
        super().__init__(server, home, "browser", cert)
        self.verifier: CapabilityVerifier | None = None

    async def enrol(self, join_code: str) -> None:
        answer = await self.client.enroll(
            self.identity,
            EnrollCredentials(device_name="browser", platform="web", join_code=join_code),
        )
        assert answer.device_id == self.identity.device_id  # = its DTLS fingerprint
        self.client.store_tokens(answer)
        self.verifier = CapabilityVerifier(
            issuer=answer.server_id,
            device_id=answer.device_id,
            keys={k.kid: public_key_from_jwk_x(k.x) for k in answer.keys},
        )
        info = await self.client.info()
        verifier = self.verifier

        async def stun() -> tuple[str, int]:
            return ("127.0.0.1", info.stun_port or 0)

        async def refuse(sender: str, token: object) -> bool:
            return False  # this browser only dials

        def validator(peer_id: str) -> Validator:
            return capability_validator(verifier, peer_id, {}, on_unknown_key=lambda: None)

        self.rtc = WebRTCPeers(
            credentials=lambda: self.identity,
            link=self.link,
            stun=stun,
            admit_offer=refuse,
            validator=validator,
            adopt=lambda mesh, dialer: True,
            local_addresses=own_addresses,
            registry=TRANSFER_REGISTRY,
        )

    async def connect(self, peer_id: str) -> MeshSession:
        assert self.rtc is not None
        grant = await self.client.capability(peer_id, "p2p:connect")
        mesh = await self.rtc.dial(peer_id, grant.token)
        self.sessions[peer_id] = mesh
        return mesh

    # what TransferService uses of a PeerManager
    def register(self, service: Any) -> None:
        pass

    async def session(self, peer_id: str) -> MeshSession:
        return self.sessions.get(peer_id) or await self.connect(peer_id)

    def transfers(self) -> TransferService:
        return self.transfer_service(
            downloads=self.home, own_user="ann", auto_accept="none", reconnect_window=5.0
        )


async def _agent_id(browser: Browser, name: str) -> str:
    for _ in range(100):
        for device in await browser.client.devices():
            if device.name == name and device.online:
                return device.id
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} never came online")


async def test_a_browser_peer_sends_a_file_to_an_agent_over_webrtc(
    server: Server, make_agent: Any, tmp_path: Path
) -> None:
    server.add_user("ann")
    downloads = tmp_path / "downloads"
    agent: AgentHome = make_agent("desk", **{"downloads.dir": str(downloads)})
    agent.login(server, server.join_code("ann"))
    agent.up()

    browser = Browser(server, tmp_path / "browser")
    await browser.enrol(server.join_code("ann"))
    link = asyncio.create_task(browser.run())
    service = None
    try:
        await browser.link.wait_connected(10)
        agent_id = await _agent_id(browser, "desk")
        mesh = await asyncio.wait_for(browser.connect(agent_id), 30)
        assert mesh.peer_id == agent_id  # the agent's DTLS certificate is its device one

        payload = os.urandom(1024 * 1024 + 7)
        source = tmp_path / "from-the-browser.bin"
        source.write_bytes(payload)
        service = browser.transfers()
        [result] = await asyncio.wait_for(service.send([source], agent_id), 60)
        assert result.sent == len(payload)
        arrived = downloads / "from-the-browser.bin"
        wait_until(arrived.exists, 10, "the file in the agent's downloads")
        assert arrived.read_bytes() == payload
        log = (agent.home / "state" / "meshagent.log").read_text()
        assert f"peer {browser.identity.device_id[:12]}: direct path (webrtc" in log
    finally:
        if service is not None:
            service.close()
        for mesh in browser.sessions.values():
            await mesh.aclose()
            await cast(Any, mesh.connection).aclose()
        link.cancel()
        await asyncio.gather(link, return_exceptions=True)
        await browser.client.aclose()


async def test_an_agent_refuses_a_webrtc_peer_with_someone_elses_token(
    server: Server, make_agent: Any, tmp_path: Path
) -> None:
    """Mallory (a device of a user in no room with the agent) cannot get a token for it; a
    device of the agent's user can, but a copy of its token is no use with another DTLS
    certificate: the offer is ignored, no answer comes, nothing connects."""
    server.add_user("ann")
    agent: AgentHome = make_agent("desk")
    agent.login(server, server.join_code("ann"))
    agent.up()
    owner = Browser(server, tmp_path / "owner")
    await owner.enrol(server.join_code("ann"))
    thief = Browser(server, tmp_path / "thief")
    await thief.enrol(server.join_code("ann"))  # enrolled, so the server relays its signals
    tasks = [asyncio.create_task(b.run()) for b in (owner, thief)]
    try:
        await owner.link.wait_connected(10)
        await thief.link.wait_connected(10)
        agent_id = await _agent_id(owner, "desk")
        stolen = (await owner.client.capability(agent_id, "p2p:connect")).token
        assert thief.rtc is not None
        thief.rtc.answer_timeout = 3.0
        started = time.monotonic()
        try:
            await thief.rtc.dial(agent_id, stolen)
        except (TimeoutError, PeerUnreachable, HandshakeRefusedError):
            pass
        else:
            raise AssertionError("a stolen token opened a session")
        assert time.monotonic() - started < 20
        log = (agent.home / "state" / "meshagent.log").read_text()
        assert f"ignored a p2p offer from {thief.identity.device_id[:12]}: wrong_holder" in log
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await owner.client.aclose()
        await thief.client.aclose()
