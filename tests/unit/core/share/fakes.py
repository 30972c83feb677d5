"""Two (or more) transfer services joined by in-memory channels: no sockets, no QUIC.

A :class:`FakeNetwork` stands in for the P2P layer under :class:`TransferService`: sessions that
open channels, channels that carry message objects both ways (with a small window, so a sender
blocks on a receiver that does not read, as QUIC flow control makes it), and devices that stop
(their service tasks cancelled, as an agent's task group does at shutdown, then every channel
cut) and start again (a new service over the same folders: a restarted agent).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from meshagent_gui.core.bus import EventBus
from meshagent_gui.core.events import Event
from meshagent_gui.core.mesh.client import MeshClient
from meshagent_gui.core.p2p.peers import PathInfo, PeerManager, PeerUnreachable, Service
from meshagent_gui.core.p2p.session import ChannelClosed
from meshagent_gui.core.protocol import transfer as tp
from meshagent_gui.core.protocol.errors import ErrorCode
from meshagent_gui.core.protocol.messages import StreamRole
from meshagent_gui.core.share.disk import DISK, Disk
from meshagent_gui.core.share.service import TransferService

WINDOW = 8
"""Messages a channel holds unread before its writer's drain waits (flow control)."""


class FakeChannel:
    """One end of a channel: what the transfer service uses of a real one."""

    def __init__(self, peer_id: str, resource: str) -> None:
        self.peer_id = peer_id
        self.resource = resource
        self.grant: object = None
        self.other: FakeChannel = self
        self._inbox: deque[object] = deque()
        self._changed = asyncio.Event()
        self._end: ChannelClosed | None = None  # nothing more will arrive here
        self._broken: ChannelClosed | None = None  # nothing can be sent from here
        self.held: deque[object] | None = None
        """Messages to this end wait here, unseen, while a test holds the channel."""
        self.hold_after: int | None = None
        """Start holding once this many chunks have arrived here."""
        self.chunks_seen = 0

    # ------------------------------------------------------------ the service's side

    def post(self, message: object) -> None:
        if self._broken is not None:
            raise self._broken
        self.other._arrive(message)

    async def drain(self) -> None:
        other = self.other
        while self._broken is None and (len(other._inbox) >= WINDOW or other.held):
            await other._wait()
        if self._broken is not None:
            raise self._broken

    async def send(self, message: object) -> None:
        self.post(message)
        await self.drain()

    def poll(self) -> object | None:
        if self._inbox:
            message = self._inbox.popleft()
            self._wake()
            return message
        if self._end is not None:
            raise self._end
        return None

    async def receive(self) -> object:
        while True:
            message = self.poll()
            if message is not None:
                return message
            await self._wait()

    async def close(self, code: ErrorCode = ErrorCode.NO_ERROR, message: str = "") -> None:
        """Our direction ends (the peer reads to the end, then is told); theirs may go on."""
        self.other.end(ChannelClosed(code, message, by_peer=True))

    def abort(self, code: ErrorCode, message: str = "") -> None:
        self.other.end(ChannelClosed(code, message, by_peer=True), broken=True)
        self.end(ChannelClosed(code, message, by_peer=False), broken=True)

    # ------------------------------------------------------------ the network's side

    def _arrive(self, message: object) -> None:
        if self.held is not None:
            self.held.append(message)
            return
        self._inbox.append(message)
        if isinstance(message, tp.Chunk):
            self.chunks_seen += 1
            if self.hold_after is not None and self.chunks_seen >= self.hold_after:
                self.held = deque()
        self._wake()

    def release(self) -> None:
        """Stop holding: what was held arrives, in order."""
        held, self.held, self.hold_after = self.held or deque(), None, None
        for message in held:
            self._arrive(message)
        self._wake()
        self.other._wake()

    def end_both(self) -> None:
        """The connection is cut under both ends."""
        cut = ChannelClosed(ErrorCode.GOING_AWAY, "the connection was cut", by_peer=True)
        self.end(cut, broken=True)
        self.other.end(cut, broken=True)

    def end(self, error: ChannelClosed, *, broken: bool = False) -> None:
        """Nothing more arrives here (``broken``: nothing can be sent from here either)."""
        if self._end is None:
            self._end = error
        if broken and self._broken is None:
            self._broken = error
        self._wake()
        self.other._wake()

    def _wake(self) -> None:
        self._changed.set()

    async def _wait(self) -> None:
        self._changed.clear()
        await self._changed.wait()


@dataclass
class FakeDevice:
    device_id: str
    online: bool = True
    services: dict[StreamRole, Service] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    channels: list[FakeChannel] = field(default_factory=list)


class FakeNetwork:
    def __init__(self) -> None:
        self.devices: dict[str, FakeDevice] = {}
        self.hold_after: int | None = None
        """Channels opened from now on hold their messages after this many chunks."""

    def device(self, device_id: str) -> FakeDevice:
        return self.devices.setdefault(device_id, FakeDevice(device_id))

    def peers(self, device_id: str) -> PeerManager:
        return cast(PeerManager, FakePeers(self, self.device(device_id)))

    def open(
        self, dialer: FakeDevice, target_id: str, role: StreamRole, resource: str
    ) -> FakeChannel:
        target = self.devices.get(target_id)
        if target is None or not target.online or role not in target.services:
            raise PeerUnreachable(f"{target_id} is offline", code="peer_offline")
        ours = FakeChannel(target_id, resource)
        theirs = FakeChannel(dialer.device_id, resource)
        ours.other, theirs.other = theirs, ours
        theirs.hold_after = self.hold_after
        for device, channel in ((dialer, ours), (target, theirs)):
            device.channels.append(channel)
        handle = cast(
            Callable[[FakeChannel], Coroutine[Any, Any, None]], target.services[role].handle
        )
        task: asyncio.Task[None] = asyncio.create_task(handle(theirs))
        target.tasks.add(task)
        task.add_done_callback(target.tasks.discard)
        return ours

    async def stop(self, device_id: str) -> None:
        """As an agent stopped cleanly (Ctrl-C): its service tasks are cancelled first (its task
        group), then its connections close (every channel of it ends for both ends)."""
        device = self.devices[device_id]
        for task in list(device.tasks):
            task.cancel()
        await asyncio.gather(*device.tasks, return_exceptions=True)
        device.online = False
        device.services.clear()
        gone = ChannelClosed(ErrorCode.GOING_AWAY, "the connection closed", by_peer=True)
        for channel in device.channels:
            channel.end(gone, broken=True)
            channel.other.end(gone, broken=True)
        device.channels.clear()

    def start(self, device_id: str) -> None:
        self.devices[device_id].online = True

    async def held_channel(self, chunks: int) -> FakeChannel:
        """Hold the next channel opened after ``chunks`` chunks; that channel's receiving end
        once it holds (its writer then blocks, as on a full flow-control window)."""
        self.hold_after = chunks

        def holding() -> FakeChannel | None:
            for device in self.devices.values():
                for channel in device.channels:
                    if channel.held is not None:
                        return channel
            return None

        await wait_for(lambda: holding() is not None, f"a channel to hold after {chunks} chunks")
        self.hold_after = None
        found = holding()
        assert found is not None
        return found


class FakePeers:
    """What :class:`TransferService` uses of a :class:`PeerManager`."""

    def __init__(self, network: FakeNetwork, device: FakeDevice) -> None:
        self.network = network
        self.device = device

    def register(self, service: Service) -> None:
        self.device.services[service.role] = service

    async def session(self, peer_id: str) -> FakeSession:
        if not self.network.device(peer_id).online:
            raise PeerUnreachable(f"{peer_id} is offline", code="peer_offline")
        return FakeSession(self, peer_id)

    def path_of(self, session: FakeSession) -> PathInfo:
        return PathInfo("direct", "here", "there")


@dataclass
class FakeSession:
    peers: FakePeers
    peer_id: str

    async def open_channel(
        self, role: StreamRole, *, tokens: tuple[str, ...], resource: str
    ) -> FakeChannel:
        return self.peers.network.open(self.peers.device, self.peer_id, role, resource)


class FakeClient:
    async def capability(self, target: str, scope: str, resource: str = "") -> SimpleNamespace:
        return SimpleNamespace(token=f"{scope}:{resource}")


class Recorder:
    """Every event published on a bus, in order (a subscriber that never lags)."""

    def __init__(self, bus: EventBus) -> None:
        self.events: list[Event] = []
        original = bus.publish

        def publish(event: Event) -> None:
            self.events.append(event)
            original(event)

        bus.publish = publish  # type: ignore[method-assign]

    def of(self, kind: type[Any]) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind)]


@dataclass
class Side:
    service: TransferService
    bus: EventBus
    events: Recorder
    downloads: Path


def make_service(
    network: FakeNetwork,
    device_id: str,
    home: Path,
    *,
    downloads: Callable[[], Path] | None = None,
    global_rate: Callable[[], float | None] = lambda: None,
    disk: Disk = DISK,
) -> Side:
    """A transfer service of device ``device_id`` whose folders live in ``home``."""
    folder = home / "downloads"
    data = home / "data"
    for made in (folder, data):
        made.mkdir(parents=True, exist_ok=True)
    bus = EventBus()
    events = Recorder(bus)

    async def same_user(_: str) -> str | None:
        return "ann"

    service = TransferService(
        peers=network.peers(device_id),
        client=cast(MeshClient, FakeClient()),
        bus=bus,
        downloads=downloads or (lambda: folder),
        data_dir=data,
        own_user="ann",
        peer_user=same_user,
        peer_name=lambda peer: f"name-of-{peer}",
        auto_accept=lambda: "own",
        global_rate=global_rate,
        retry_delay=0.01,
        disk=disk,
    )
    return Side(service, bus, events, folder)


@contextlib.contextmanager
def closing(*sides: Side) -> Iterator[None]:
    try:
        yield
    finally:
        for side in sides:
            side.service.close()


async def wait_for(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Wait until ``condition()`` is true, looking again each time the loop has run a little."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.001)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None
