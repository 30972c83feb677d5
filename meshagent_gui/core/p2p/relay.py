"""The fallback path: QUIC datagrams carried through the Mesh Server's relay WebSocket.

When two agents have no direct path, their endpoints address each other as
``relay.<device id>`` (:func:`~meshagent_gui.core.p2p.endpoint.relay_address`); the endpoint
hands those datagrams to :meth:`RelayLink.send`, which frames them for ``/api/v1/relay``.
The packets stay QUIC packets, end-to-end encrypted and authenticated by both peers exactly as
on a direct path: the server sees only their size and forwards between devices sharing a room.

Wire (docs/server-api.md): binary frames; agent -> server ``target id (32 raw bytes) +
datagram``, server -> agent ``source id + datagram``. The server closes the socket 4401 when the
token it was opened with expires (unless the control link renewed the session in-band) and 4403
when the session is revoked; either way the link refreshes and reconnects. Nothing here ever
blocks the endpoint's transmit path or queues without bound: when the link is down or the queue
is full, datagrams are dropped and counted, and QUIC treats that as loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass
from typing import Final, Literal

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from meshagent_gui.core.mesh.authed_socket import ENROL_AGAIN, refreshable, run_authed_socket
from meshagent_gui.core.mesh.backoff import Backoff
from meshagent_gui.core.mesh.client import MeshClient, ws_url
from meshagent_gui.core.mesh.types import RELAY_ID_BYTES as ID_BYTES
from meshagent_gui.core.mesh.types import RELAY_MAX_DATAGRAM as MAX_DATAGRAM
from meshagent_gui.core.p2p.endpoint import Endpoint, relay_address, relay_peer
from meshagent_gui.core.p2p.engine import Address
from meshagent_gui.core.p2p.errors import EndpointClosedError

log = logging.getLogger(__name__)

MAX_FRAME: Final = ID_BYTES + MAX_DATAGRAM
OPEN_TIMEOUT: Final = 10.0
# Frames the websockets client buffers before it stops reading the socket (its default, 16,
# would throttle a QUIC flight long before the server's own queue does).
RECEIVE_QUEUE: Final = 256

RelayState = Literal["offline", "connecting", "online"]
_TRANSITIONS: Final[dict[RelayState, frozenset[RelayState]]] = {
    "offline": frozenset({"connecting"}),
    "connecting": frozenset({"online", "offline"}),
    "online": frozenset({"offline", "connecting"}),  # connecting: a token refresh and retry
}


@dataclass
class RelayStats:
    """Counters since the link was made; bytes count datagram payloads, not the 32-byte ids."""

    frames_in: int = 0
    bytes_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    dropped: int = 0  # outgoing datagrams dropped: link down, queue full, oversize, bad peer id
    malformed: int = 0  # incoming frames that were not binary id + datagram
    connects: int = 0


def relay_url(server_url: str) -> str:
    return ws_url(server_url, "/relay")


class RelayLink:
    """Holds the relay WebSocket for an endpoint, reconnecting until cancelled.

    Run :meth:`run` as a task. From its start to its end the endpoint's relay sender is
    :meth:`send` (datagrams are counted as dropped while the link is down).
    """

    def __init__(
        self,
        client: MeshClient,
        endpoint: Endpoint,
        *,
        reconnect_max: float = 30.0,
        queue_limit: int = 4096,
        open_timeout: float = OPEN_TIMEOUT,
    ) -> None:
        self._client = client
        self._endpoint = endpoint
        self._backoff = Backoff(cap=reconnect_max)
        self._open_timeout = open_timeout
        self._outbox: deque[bytes] = deque(maxlen=queue_limit)
        self._wakeup = asyncio.Event()
        self._connected = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._inbound: list[tuple[bytes, Address]] = []
        self._flush_scheduled = False
        self.state: RelayState = "offline"
        self.stats = RelayStats()
        self.last_error: str | None = None

    # ------------------------------------------------------------------ API

    async def wait_connected(self, timeout: float) -> None:
        """Return once the relay is usable; TimeoutError after ``timeout``."""
        await asyncio.wait_for(self._connected.wait(), timeout)

    def send(self, datagrams: list[bytes], addr: Address) -> None:
        """The endpoint's relay sender: queue datagrams for ``relay.<id>``; never blocks."""
        peer = relay_peer(addr)
        raw_id = _raw_id(peer) if peer is not None else None
        if raw_id is None or self._ws is None:
            self.stats.dropped += len(datagrams)
            return
        outbox = self._outbox
        for datagram in datagrams:
            if len(datagram) > MAX_DATAGRAM:
                self.stats.dropped += 1
                continue
            if len(outbox) == outbox.maxlen:
                self.stats.dropped += 1  # the deque drops its oldest: the stalest packet
            outbox.append(raw_id + datagram)
        self._wakeup.set()

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Stay connected until cancelled; on the way out the endpoint loses its relay."""
        self._endpoint.set_relay(self.send)
        try:
            while True:
                reason = await self._session()
                self._disconnected("offline")
                delay = self._backoff.next_delay()
                if reason == ENROL_AGAIN:
                    delay = self._backoff.cap  # nothing changes until the device enrols again
                self.last_error = reason
                log.info("relay connection lost (%s); retrying in %.1fs", reason, delay)
                await asyncio.sleep(delay)
        finally:
            self._endpoint.set_relay(None)
            if self.state != "offline":
                self._disconnected("offline")

    def _set_state(self, state: RelayState) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"relay link cannot go from {self.state} to {state}")
        self.state = state

    def _disconnected(self, state: RelayState) -> None:
        self._set_state(state)
        self._connected.clear()
        self._ws = None
        self.stats.dropped += len(self._outbox)  # stale by the next connection; QUIC resends
        self._outbox.clear()

    async def _session(self) -> str:
        """One connection from open to close; returns why it ended."""
        self._set_state("connecting")

        async def serve(ws: ClientConnection) -> str:
            if self.state == "online":  # a retry after the server refused a stale token
                self._disconnected("connecting")
            await self._confirm(ws)
            return await self._serve(ws)

        return await run_authed_socket(
            self._client,
            relay_url(self._client.url),
            serve,
            on_refresh_error=self._note_error,
            open_timeout=self._open_timeout,
            close_timeout=2,
            max_size=MAX_FRAME,
            max_queue=RECEIVE_QUEUE,
            compression=None,  # QUIC packets are encrypted: nothing to compress
            ping_interval=10,
            ping_timeout=10,
        )

    def _note_error(self, message: str) -> None:
        self.last_error = message

    async def _confirm(self, ws: ClientConnection) -> None:
        """Wait for one ping round trip before calling the link online.

        The server accepts the upgrade and then closes with 4401 for a bad token, and it sends
        nothing else on its own; the close frame precedes any pong on the wire, so a pong
        proves the token was accepted (a refusal raises ConnectionClosed here).
        """
        pong = await ws.ping()
        async with asyncio.timeout(self._open_timeout):
            await pong

    async def _serve(self, ws: ClientConnection) -> str:
        self._ws = ws
        self._set_state("online")
        self.stats.connects += 1
        self._backoff.reset()
        self._connected.set()
        log.info("relay connected to %s", self._client.url)
        reader = asyncio.create_task(self._read(ws), name="relay-reader")
        writer = asyncio.create_task(self._write(ws), name="relay-writer")
        try:
            done, _ = await asyncio.wait([reader, writer], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._ws = None
            for task in (reader, writer):
                task.cancel()
            await asyncio.wait([reader, writer])
        for task in done:
            error = task.exception()
            if isinstance(error, ConnectionClosed):
                if refreshable(error):
                    # 4401 (its token expired) or 4403 (session revoked): the caller refreshes
                    # the token and reconnects at once, or learns the device must enrol again.
                    raise error
                return f"closed ({error.rcvd.code})" if error.rcvd else "connection dropped"
            if error is not None:
                raise error
        return "closed by the server"

    async def _read(self, ws: ClientConnection) -> None:
        while True:
            frame = await ws.recv()
            if not isinstance(frame, bytes) or len(frame) <= ID_BYTES:
                self.stats.malformed += 1
                continue
            source = frame[:ID_BYTES].hex()
            payload = frame[ID_BYTES:]
            self.stats.frames_in += 1
            self.stats.bytes_in += len(payload)
            self._inbound.append((payload, relay_address(source)))
            # recv() returns buffered frames without yielding; feed the whole burst to the
            # endpoint at once (one QUIC processing pass), like its batched socket reads.
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush_inbound)

    def _flush_inbound(self) -> None:
        self._flush_scheduled = False
        batch, self._inbound = self._inbound, []
        if batch:
            with contextlib.suppress(EndpointClosedError, RuntimeError):
                self._endpoint.feed_datagrams(batch)

    async def _write(self, ws: ClientConnection) -> None:
        outbox = self._outbox
        while True:
            if not outbox:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            frame = outbox.popleft()
            await ws.send(frame)
            self.stats.frames_out += 1
            self.stats.bytes_out += len(frame) - ID_BYTES


def _raw_id(peer: str) -> bytes | None:
    try:
        raw = bytes.fromhex(peer)
    except ValueError:
        return None
    return raw if len(raw) == ID_BYTES else None
