"""The relay: opaque QUIC datagrams between two devices that have no direct path.

One WebSocket per agent at ``/api/v1/relay``, binary frames only. Agent -> server:
``target device id (32 raw bytes) + datagram``; server -> agent: ``source id + datagram``.
The datagrams are QUIC packets, still end-to-end encrypted: the server sees only their size.
It forwards between devices that share a room, and drops (never queues without bound) when the
receiver is slow or the sender exceeds its rate: QUIC treats that as loss and slows down.

A socket opened with the ``meshagent-relay-batch`` subprotocol sends and receives batches: the id,
then datagrams each after a 2-byte length, up to 32 KiB a frame (one frame, one pass through
this server for a whole flight of packets). Batches between two such sockets pass unopened and
queued frames from one source merge; toward a socket without it a batch is split.

The byte budget belongs to the device, not the socket: reconnecting buys no fresh burst. A
socket lives as long as its session, like the hub's: closed 4403 when the session is revoked,
4401 when the token it was opened with expires (unless ``/ws`` renewed that session in-band).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from typing import Final

from starlette.websockets import WebSocket, WebSocketDisconnect

from meshagent_gui.core.mesh.types import (
    CLOSE_REVOKED,
    CLOSE_UNAUTHORIZED,
    RELAY_BATCH_PROTOCOL,
    RELAY_MAX_BATCH,
)
from meshagent_gui.core.mesh.types import RELAY_ID_BYTES as ID_BYTES
from meshagent_gui.core.mesh.types import RELAY_MAX_DATAGRAM as MAX_DATAGRAM

from .hub import BucketTable, Hub
from .store import Principal

log = logging.getLogger(__name__)

CLOSE_BAD_FRAME: Final = 1003
CLOSE_TIMEOUT: Final = 5.0
LENGTH: Final = struct.Struct("!H")


@dataclass(frozen=True)
class RelayLimits:
    bytes_per_second: float = 16 * 1024 * 1024  # per device
    burst_bytes: float = 2 * 1024 * 1024
    max_queued: int = 2048  # frames waiting for one receiver
    max_queued_bytes: int = 4 * 1024 * 1024  # and their bytes (a batch holds many datagrams)


@dataclass
class RelayCounters:
    """Frames (a batch is one) forwarded, dropped (rate, full queue) and refused (no target)."""

    forwarded: int = 0
    dropped: int = 0
    refused: int = 0


class _Peer:
    def __init__(self, principal: Principal, limits: RelayLimits, *, batched: bool) -> None:
        self.device_id = principal.device_id
        self.raw_id = bytes.fromhex(principal.device_id)
        self.user = principal.user
        self.session_id = principal.session_id
        self.expires_at = principal.access_expires_at
        self.batched = batched
        self.outbox: deque[bytes] = deque()
        self.queued_bytes = 0
        self.max_queued = limits.max_queued
        self.max_queued_bytes = limits.max_queued_bytes
        self.wakeup = asyncio.Event()
        self.close_with: tuple[int, str] | None = None

    def push(self, frame: bytes) -> bool:
        """Queue a frame in this socket's format; False when older ones made room for it (the
        stalest packets go first)."""
        outbox = self.outbox
        room = True
        while outbox and (
            len(outbox) >= self.max_queued or self.queued_bytes + len(frame) > self.max_queued_bytes
        ):
            self.queued_bytes -= len(outbox.popleft())
            room = False
        outbox.append(frame)
        self.queued_bytes += len(frame)
        self.wakeup.set()
        return room

    def pop(self) -> bytes:
        """The next frame to write; for a batching socket, queued frames of the same source
        merged into one (up to RELAY_MAX_BATCH bytes)."""
        outbox = self.outbox
        frame = outbox.popleft()
        size = len(frame)
        if self.batched and outbox:
            source = frame[:ID_BYTES]
            parts = [frame]
            while outbox and outbox[0].startswith(source):
                extra = len(outbox[0]) - ID_BYTES
                if size + extra > RELAY_MAX_BATCH:
                    break
                parts.append(outbox.popleft()[ID_BYTES:])
                size += extra
            if len(parts) > 1:
                self.queued_bytes -= size + (len(parts) - 1) * ID_BYTES
                return b"".join(parts)
        self.queued_bytes -= size
        return frame

    def clear(self) -> None:
        self.outbox.clear()
        self.queued_bytes = 0

    def close(self, code: int, reason: str) -> None:
        if self.close_with is None:
            self.close_with = (code, reason)
            self.clear()
            self.wakeup.set()


class Relay:
    def __init__(self, hub: Hub, limits: RelayLimits | None = None) -> None:
        self._hub = hub
        self._peers: dict[bytes, _Peer] = {}
        self.limits = limits or RelayLimits()
        self.stats = RelayCounters()
        hub.add_session_sockets(self)

    @property
    def limits(self) -> RelayLimits:
        return self._limits

    @limits.setter
    def limits(self, limits: RelayLimits) -> None:
        """New limits (tests tighten them); the per-device budgets start over."""
        self._limits = limits
        self._buckets = BucketTable(limits.bytes_per_second, limits.burst_bytes)

    @property
    def connection_count(self) -> int:
        return len(self._peers)

    async def serve(self, websocket: WebSocket, principal: Principal) -> None:
        """Serve an accepted socket (accepted with RELAY_BATCH_PROTOCOL when it offered it)."""
        peer = _Peer(principal, self.limits, batched=offers_batches(websocket))
        previous = self._peers.get(peer.raw_id)
        self._peers[peer.raw_id] = peer
        if previous is not None:
            previous.clear()
        self._hub.ensure_sweeper()
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
        generation = self._hub.generation
        peers_of_sender = await self._hub.peer_users(peer.user)
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if peer.close_with is not None:
                    continue  # closing: read on until the client's close arrives
                frame = message.get("bytes")
                limit = RELAY_MAX_BATCH if peer.batched else ID_BYTES + MAX_DATAGRAM
                if frame is None or not ID_BYTES < len(frame) <= limit:
                    peer.close(CLOSE_BAD_FRAME, "binary relay frames only")
                    continue
                if generation != self._hub.generation:  # rooms changed: who may we reach?
                    generation = self._hub.generation
                    peers_of_sender = await self._hub.peer_users(peer.user)
                self._forward(peer, frame, peers_of_sender, loop.time())
        except WebSocketDisconnect:
            return

    def _forward(self, peer: _Peer, frame: bytes, allowed: frozenset[str], now: float) -> None:
        """One frame (a batch, from a batching socket) toward its target, in the target's
        format: a batch passes unopened to a batching target (the receiver checks its lengths,
        as it must for anything a peer sends), and is split for any other."""
        target = self._peers.get(frame[:ID_BYTES])
        if target is None or target.user not in allowed or target.close_with is not None:
            self.stats.refused += 1
        elif not self._buckets.take(peer.device_id, now, len(frame) - ID_BYTES):
            self.stats.dropped += 1
        elif peer.batched == target.batched:
            self._deliver(target, peer.raw_id + frame[ID_BYTES:])
        elif target.batched:  # one datagram for a batching receiver: a batch of one
            datagram = frame[ID_BYTES:]
            self._deliver(target, peer.raw_id + LENGTH.pack(len(datagram)) + datagram)
        else:
            for datagram in split_batch(frame):
                self._deliver(target, peer.raw_id + datagram)

    def _deliver(self, target: _Peer, frame: bytes) -> None:
        """Queue ``frame`` for ``target``, counted dropped when it pushed an older one out."""
        if target.push(frame):
            self.stats.forwarded += 1
        else:
            self.stats.dropped += 1

    async def _write(self, websocket: WebSocket, peer: _Peer) -> None:
        try:
            while peer.close_with is None:
                if not peer.outbox:
                    peer.wakeup.clear()
                    await peer.wakeup.wait()
                    continue
                await websocket.send_bytes(peer.pop())
            code, reason = peer.close_with
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await websocket.close(code, reason)
        except (WebSocketDisconnect, TimeoutError, RuntimeError, OSError):
            return

    # ------------------------------------------------------------ socket lifetime (the sweep)

    def session_ids(self) -> set[str]:
        return {peer.session_id for peer in self._peers.values()}

    def close_sessions(self, session_ids: Collection[str], code: int = CLOSE_REVOKED) -> None:
        """Close every relay socket of these sessions now (4403: revoked)."""
        wanted = set(session_ids)
        for peer in list(self._peers.values()):
            if peer.session_id in wanted:
                log.info("closing the relay of %s: session revoked", peer.device_id[:12])
                peer.close(code, "session revoked")

    def close_expired(self, now: float) -> None:
        for peer in list(self._peers.values()):
            renewed = self._hub.renewed_until(peer.session_id) or 0.0
            if max(peer.expires_at, renewed) <= now:
                peer.close(CLOSE_UNAUTHORIZED, "access token expired")

    def prune(self, now: float) -> None:
        del now  # the buckets run on the loop's clock (they meter bytes, not sessions)
        loop_now = asyncio.get_running_loop().time()
        self._buckets.prune(loop_now, {peer.device_id for peer in self._peers.values()})


def offers_batches(websocket: WebSocket) -> bool:
    """Whether the client offered RELAY_BATCH_PROTOCOL (the route accepts it then)."""
    return RELAY_BATCH_PROTOCOL in websocket.scope.get("subprotocols", ())


def split_batch(frame: bytes) -> list[bytes]:
    """The datagrams of a batch frame; a damaged tail (a length past the end, or 0) ends it."""
    datagrams: list[bytes] = []
    offset, end = ID_BYTES, len(frame)
    while offset + 2 < end:
        (length,) = LENGTH.unpack_from(frame, offset)
        offset += 2
        if not 0 < length <= MAX_DATAGRAM or offset + length > end:
            break
        datagrams.append(frame[offset : offset + length])
        offset += length
    return datagrams
