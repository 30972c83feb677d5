"""The relay: opaque QUIC datagrams between two devices that have no direct path.

One WebSocket per agent at ``/api/v1/relay``, binary frames only. Agent -> server:
``target device id (32 raw bytes) + datagram``; server -> agent: ``source id + datagram``.
The datagrams are QUIC packets, still end-to-end encrypted: the server sees only their size.
It forwards between devices that share a room, and drops (never queues without bound) when the
receiver is slow or the sender exceeds its rate: QUIC treats that as loss and slows down.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Final

from starlette.websockets import WebSocket, WebSocketDisconnect

from meshagent_gui.core.mesh.types import RELAY_ID_BYTES as ID_BYTES
from meshagent_gui.core.mesh.types import RELAY_MAX_DATAGRAM as MAX_DATAGRAM

from .hub import Hub, TokenBucket
from .store import Principal

log = logging.getLogger(__name__)

CLOSE_BAD_FRAME: Final = 1003


@dataclass(frozen=True)
class RelayLimits:
    bytes_per_second: float = 16 * 1024 * 1024
    burst_bytes: float = 2 * 1024 * 1024
    max_queued: int = 2048  # datagrams waiting for one receiver


@dataclass
class RelayStats:
    forwarded: int = 0
    dropped: int = 0
    refused: int = 0


class _Peer:
    def __init__(self, principal: Principal, limits: RelayLimits, now: float) -> None:
        self.device_id = principal.device_id
        self.raw_id = bytes.fromhex(principal.device_id)
        self.user = principal.user
        self.bucket = TokenBucket(limits.bytes_per_second, limits.burst_bytes, now)
        self.outbox: deque[bytes] = deque(maxlen=limits.max_queued)
        self.wakeup = asyncio.Event()

    def push(self, frame: bytes) -> bool:
        dropped = len(self.outbox) == self.outbox.maxlen
        self.outbox.append(frame)  # a full deque drops its oldest: the stalest packet
        self.wakeup.set()
        return not dropped


class Relay:
    def __init__(self, hub: Hub, limits: RelayLimits | None = None) -> None:
        self._hub = hub
        self.limits = limits or RelayLimits()
        self._peers: dict[bytes, _Peer] = {}
        self.stats = RelayStats()

    @property
    def connection_count(self) -> int:
        return len(self._peers)

    async def serve(self, websocket: WebSocket, principal: Principal) -> None:
        loop = asyncio.get_running_loop()
        peer = _Peer(principal, self.limits, loop.time())
        previous = self._peers.get(peer.raw_id)
        self._peers[peer.raw_id] = peer
        if previous is not None:
            previous.outbox.clear()
        try:
            async with asyncio.TaskGroup() as tasks:
                reader = tasks.create_task(self._read(websocket, peer))
                writer = tasks.create_task(self._write(websocket, peer))
                reader.add_done_callback(lambda _: writer.cancel())
                writer.add_done_callback(lambda _: reader.cancel())
        finally:
            if self._peers.get(peer.raw_id) is peer:
                del self._peers[peer.raw_id]

    async def _read(self, websocket: WebSocket, peer: _Peer) -> None:
        loop = asyncio.get_running_loop()
        peers_of_sender = await self._hub.peer_users(peer.user)
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                frame = message.get("bytes")
                if frame is None or not ID_BYTES < len(frame) <= ID_BYTES + MAX_DATAGRAM:
                    await websocket.close(CLOSE_BAD_FRAME, "binary relay frames only")
                    return
                target = self._peers.get(frame[:ID_BYTES])
                if target is None or target.user not in peers_of_sender:
                    self.stats.refused += 1
                    continue
                if not peer.bucket.take(loop.time(), len(frame) - ID_BYTES):
                    self.stats.dropped += 1
                    continue
                if target.push(peer.raw_id + frame[ID_BYTES:]):
                    self.stats.forwarded += 1
                else:
                    self.stats.dropped += 1
        except WebSocketDisconnect:
            return

    async def _write(self, websocket: WebSocket, peer: _Peer) -> None:
        try:
            while True:
                if not peer.outbox:
                    peer.wakeup.clear()
                    await peer.wakeup.wait()
                    continue
                await websocket.send_bytes(peer.outbox.popleft())
        except (WebSocketDisconnect, RuntimeError, OSError):
            return
