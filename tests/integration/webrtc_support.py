"""A WebRTC-only device for the integration tests, as the web client is to an agent: its
certificate is its identity, the server's WebSocket carries its ``webrtc`` signals, and the
agent's own transfer code does the transfer work (it uses what TransferService needs of a
PeerManager). test_webrtc.py dials agents with it; test_browser_peers.py answers them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

from meshagent_gui import identity
from meshagent_gui.core.bus import EventBus
from meshagent_gui.core.events import SignalReceived
from meshagent_gui.core.mesh.client import MeshClient
from meshagent_gui.core.mesh.link import MeshLink
from meshagent_gui.core.p2p.peers import PathInfo, PeerManager
from meshagent_gui.core.p2p.session import MeshSession
from meshagent_gui.core.p2p.webrtc_peers import WebRTCPeers
from meshagent_gui.core.share.service import TransferService
from meshagent_gui.secrets import FileStore, SecretStore

from .harness import Server


class WebRTCStandIn:
    def __init__(self, server: Server, home: Path, name: str, cert: identity.Identity | None):
        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        self.identity = cert or identity.generate(name)  # its RTCCertificate: id = its print
        self.client = MeshClient(
            server.url, secrets=SecretStore(FileStore(home / "secrets.json"), "file")
        )
        self.bus = EventBus()
        self.link = MeshLink(self.client, self.bus)
        self.sessions: dict[str, MeshSession] = {}
        self.rtc: WebRTCPeers | None = None
        self._tasks: asyncio.TaskGroup | None = None

    async def run(self) -> None:
        """The server link, and its ``webrtc`` signals to WebRTCPeers (as PeerManager does)."""
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            tasks.create_task(self.link.run())
            with self.bus.subscribed() as events:
                async for event in events:
                    if isinstance(event, SignalReceived) and self.rtc is not None:
                        tasks.create_task(self.rtc.on_signal(event.sender, event.payload))

    def path_of(self, session: MeshSession) -> PathInfo:
        return PathInfo("direct", "webrtc", "webrtc")

    def transfer_service(
        self, *, downloads: Path, own_user: str, auto_accept: str, reconnect_window: float = 600.0
    ) -> TransferService:
        data = self.home / "data"
        data.mkdir(exist_ok=True)

        async def no_user(_: str) -> str | None:
            return None

        return TransferService(
            peers=cast(PeerManager, self),
            client=self.client,
            bus=self.bus,
            downloads=lambda: downloads,
            data_dir=data,
            own_user=own_user,
            peer_user=no_user,
            peer_name=lambda peer: peer[:8],
            auto_accept=lambda: auto_accept,
            global_rate=lambda: None,
            reconnect_window=reconnect_window,
        )
