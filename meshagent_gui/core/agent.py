"""The agent: composition of the core services behind one async API and one event stream.

``meshagent up`` and the tray app both run exactly this. Other ``meshagent`` commands reach it
through the local IPC endpoint; when none runs they use the same methods in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from meshagent_gui.context import Context
from meshagent_gui.errors import UserError

from .bus import EventBus
from .events import AnnouncementReceived, PeerCameOnline
from .ipc import AgentLock, Handler, IpcServer
from .mesh.client import Enrollment, MeshClient, MeshError
from .mesh.link import MeshLink
from .mesh.types import Device, PublicKey
from .notify.gotify import GotifyClient
from .notify.router import GotifySink, NotificationRouter, NotificationSink
from .protocol.captoken import (
    Capability,
    CapabilityVerifier,
    UnknownKey,
    public_key_from_jwk_x,
)

# A token naming an unknown key makes us refetch the server's keys, at most this often, so
# that garbage key ids cannot turn peers into a flood of requests to the server.
KEY_REFETCH_INTERVAL = 30.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceView:
    """A device as shown to the user (devices --json, the tray's device list)."""

    id: str
    name: str
    user: str
    platform: str
    online: bool
    last_seen: float | None
    path: str  # direct / relay / none: filled by the P2P layer once it knows

    @classmethod
    def of(cls, device: Device, online: bool) -> DeviceView:
        return cls(
            device.id, device.name, device.user, device.platform, online, device.last_seen, "none"
        )


class Agent:
    def __init__(self, ctx: Context, enrollment: Enrollment) -> None:
        self.ctx = ctx
        self.enrollment = enrollment
        self.bus = EventBus()
        self.client = MeshClient(enrollment.url, secrets=ctx.secrets)
        self._names: dict[str, str] = {}
        self._known: list[Device] = []
        self.link = MeshLink(
            self.client,
            self.bus,
            reconnect_max=float(ctx.config["server.reconnect_max"]),
            device_name=lambda device_id: self._names.get(device_id, device_id[:12]),
        )
        self.started_at = time.time()
        # Front ends add theirs (desktop toasts); Gotify joins when it is configured.
        self.notification_sinks: list[NotificationSink] = []
        self.verifier = CapabilityVerifier(
            issuer=enrollment.server_id,
            device_id=enrollment.device_id,
            keys=_verifying_keys(enrollment.keys),
        )
        self._keys_fetched_at = float("-inf")

    @classmethod
    def from_context(cls, ctx: Context) -> Agent:
        return cls(ctx, ctx.require_enrollment())

    # ------------------------------------------------------------ API (also served over IPC)

    async def devices(self) -> list[DeviceView]:
        try:
            devices = await self.client.devices()
        except MeshError as exc:
            if exc.code not in ("server_unreachable", "server_timeout") or not self._known:
                raise
            # The server is away: what we knew, with nobody online (we cannot tell).
            return [DeviceView.of(d, False) for d in self._known]
        self._known = devices
        self._names.update({d.id: d.name for d in devices})
        if self.link.state == "online":
            return [DeviceView.of(d, d.id in self.link.online) for d in devices]
        return [DeviceView.of(d, d.online) for d in devices]

    async def status(self) -> dict[str, Any]:
        return {
            "device_id": self.enrollment.device_id,
            "device_name": self.ctx.device_name,
            "user": self.enrollment.user,
            "server": self.enrollment.url,
            "link": self.link.state,
            "session_id": self.link.session_id,
            "clock_skew": self.link.clock_skew,
            "last_error": self.link.last_error,
            "connects": self.link.connects,
            "online_peers": sorted(self.link.online),
            "uptime": time.time() - self.started_at,
        }

    async def request_capability(self, target: str, scope: str, resource: str = "") -> str:
        """A capability token from the server for `scope` on `target` (the peer verifies it)."""
        return (await self.client.capability(target, scope, resource)).token

    async def verify_capability(
        self, token: str, *, peer_id: str, scope: str, resource: str | None = None
    ) -> Capability:
        """Check a peer's token offline; an unknown key id refetches the server's keys once."""
        try:
            return self.verifier.verify(
                token, now=time.time(), peer_id=peer_id, scope=scope, resource=resource
            )
        except UnknownKey:
            if time.monotonic() - self._keys_fetched_at < KEY_REFETCH_INTERVAL:
                raise
        await self._refetch_keys()
        return self.verifier.verify(
            token, now=time.time(), peer_id=peer_id, scope=scope, resource=resource
        )

    async def _refetch_keys(self) -> None:
        self._keys_fetched_at = time.monotonic()
        keys = await self.client.keys()
        self.verifier.set_keys(_verifying_keys(keys))
        self.enrollment.keys = keys
        await asyncio.to_thread(self.enrollment.save, self.ctx.paths.data_dir)
        log.info("refetched the server's signing keys (%d)", len(keys))

    def ipc_handlers(self) -> dict[str, Handler]:
        async def devices(_: dict[str, Any]) -> Any:
            return [vars(d) for d in await self.devices()]

        async def status(_: dict[str, Any]) -> Any:
            return await self.status()

        return {"devices": devices, "status": status}

    # ------------------------------------------------------------ running

    async def run(self, *, on_ready: Callable[[], Awaitable[None] | None] | None = None) -> None:
        """Run until cancelled: server link, IPC endpoint and the event consumers."""
        lock = AgentLock(self.ctx.paths.lock_file)
        lock.acquire()
        ipc = IpcServer(self.ctx.paths.ipc_path, self.ipc_handlers())
        gotify = self._gotify_client()
        sinks = [*self.notification_sinks, *([GotifySink(gotify)] if gotify else [])]
        router = NotificationRouter(self.ctx.config, sinks)
        try:
            await ipc.start()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.link.run(), name="mesh-link")
                tasks.create_task(self._follow_events(), name="agent-events")
                tasks.create_task(self._notify(router), name="agent-notify")
                if on_ready is not None:
                    result = on_ready()
                    if result is not None:
                        await result
        finally:
            await ipc.close()
            await self.client.aclose()
            if gotify is not None:
                await gotify.aclose()
            lock.release()

    def _gotify_client(self) -> GotifyClient | None:
        url = str(self.ctx.config["gotify.url"])
        token = self.ctx.secrets.get("gotify.token")
        if not url or not token:
            return None
        try:
            return GotifyClient(url, token)
        except UserError as exc:
            log.warning("Gotify notifications are off: %s", exc.message)
            return None

    async def _notify(self, router: NotificationRouter) -> None:
        with self.bus.subscribed() as events:
            async for event in events:
                await router.handle(event)

    async def _follow_events(self) -> None:
        with self.bus.subscribed() as events:
            async for event in events:
                # Names come from REST: refresh when a stranger appears or rooms change.
                stranger = isinstance(event, PeerCameOnline) and event.device_id not in self._names
                moved = isinstance(event, AnnouncementReceived) and event.kind.startswith("room.")
                if stranger or moved:
                    with contextlib.suppress(UserError):
                        await self.devices()


def _verifying_keys(keys: list[PublicKey]) -> dict[str, Ed25519PublicKey]:
    return {key.kid: public_key_from_jwk_x(key.x) for key in keys}
