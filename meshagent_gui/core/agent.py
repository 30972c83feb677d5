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

from meshagent_gui.context import Context
from meshagent_gui.errors import UserError

from .bus import EventBus
from .events import AnnouncementReceived, PeerCameOnline
from .ipc import AgentLock, Handler, IpcServer
from .mesh.client import Enrollment, MeshClient
from .mesh.link import MeshLink
from .mesh.types import Device

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
        self.link = MeshLink(
            self.client,
            self.bus,
            reconnect_max=float(ctx.config["server.reconnect_max"]),
            device_name=lambda device_id: self._names.get(device_id, device_id[:12]),
        )
        self.started_at = time.time()

    @classmethod
    def from_context(cls, ctx: Context) -> Agent:
        return cls(ctx, ctx.require_enrollment())

    # ------------------------------------------------------------ API (also served over IPC)

    async def devices(self) -> list[DeviceView]:
        devices = await self.client.devices()
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
        try:
            await ipc.start()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.link.run(), name="mesh-link")
                tasks.create_task(self._follow_events(), name="agent-events")
                if on_ready is not None:
                    result = on_ready()
                    if result is not None:
                        await result
        finally:
            await ipc.close()
            await self.client.aclose()
            lock.release()

    async def _follow_events(self) -> None:
        with self.bus.subscribed() as events:
            async for event in events:
                # Names come from REST: refresh when a stranger appears or rooms change.
                stranger = isinstance(event, PeerCameOnline) and event.device_id not in self._names
                moved = isinstance(event, AnnouncementReceived) and event.kind.startswith("room.")
                if stranger or moved:
                    with contextlib.suppress(UserError):
                        await self.devices()
