"""The fallback path: QUIC datagrams carried through the Mesh Server's relay WebSocket.

When two agents have no direct path, their endpoints address each other as
``relay.<device id>`` (:func:`~meshagent_gui.core.p2p.endpoint.relay_address`); the endpoint
hands those datagrams to :meth:`RelayLink.send`, which frames them for ``/api/v1/relay``.
The packets stay QUIC packets, end-to-end encrypted and authenticated by both peers exactly as
on a direct path: the server sees only their size and forwards between devices sharing a room.

Wire (docs/server-api.md): binary frames; agent -> server ``target id (32 raw bytes) +
datagram``, server -> agent ``source id + datagram``. Offering the ``meshagent-relay-batch``
subprotocol makes each frame a batch (the id, then datagrams each after a 2-byte length): a
flight of QUIC packets for one peer is one frame, one pass through the server; a server that
predates it does not select it, and the link speaks single frames. The server closes the
socket 4401 when the token it was opened with expires (unless the control link renewed the
session in-band) and 4403 when the session is revoked; either way the link refreshes and
reconnects. Nothing here ever
blocks the endpoint's transmit path or queues without bound: when the link is down or the queue
is full, datagrams are dropped and counted, and QUIC treats that as loss.

When the server advertises a TURN server (``GET /info`` ``turn_urls``), the link also keeps a
TURN allocation (:class:`TurnRelay`, credentials from ``POST /turn/credentials``), renewed
before its credentials expire; a peer whose relayed address signalling told us
(:meth:`RelayLink.add_turn_peer`) is reached through it instead, so the same ``relay.<id>``
connection is carried by the TURN server and the Mesh Server relays none of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Final, Literal

from aioice.stun import TransactionFailed
from aioice.turn import TurnClientUdpProtocol
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from meshagent_gui.core.mesh.authed_socket import ENROL_AGAIN, refreshable, run_authed_socket
from meshagent_gui.core.mesh.backoff import Backoff
from meshagent_gui.core.mesh.client import MeshClient, MeshError, ws_url
from meshagent_gui.core.mesh.types import RELAY_BATCH_PROTOCOL, RELAY_MAX_BATCH, TurnCredentials
from meshagent_gui.core.mesh.types import RELAY_ID_BYTES as ID_BYTES
from meshagent_gui.core.mesh.types import RELAY_MAX_DATAGRAM as MAX_DATAGRAM
from meshagent_gui.core.p2p.endpoint import Endpoint, relay_address, relay_peer
from meshagent_gui.core.p2p.engine import Address
from meshagent_gui.core.p2p.errors import EndpointClosedError
from meshagent_gui.core.p2p.udp import DatagramIO, create_io, open_socket

log = logging.getLogger(__name__)

MAX_FRAME: Final = ID_BYTES + MAX_DATAGRAM
LENGTH: Final = struct.Struct("!H")  # a datagram's length in a batch frame
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
    """Counters since the link was made; frames count datagrams (a batch frame carries several),
    bytes their payloads, not the 32-byte ids nor the lengths."""

    frames_in: int = 0
    bytes_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    sends: int = 0  # WebSocket frames written (fewer than frames_out when batched)
    dropped: int = 0  # outgoing datagrams dropped: link down, queue full, oversize, bad peer id
    malformed: int = 0  # incoming frames (or a batch's rest) that were not id + datagram(s)
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
        batch: bool = True,
    ) -> None:
        self._client = client
        self._offer_batches = batch  # False: single frames, as before (benchmarks compare)
        self._endpoint = endpoint
        self._backoff = Backoff(cap=reconnect_max)
        self._open_timeout = open_timeout
        self._outbox: deque[tuple[bytes, bytes]] = deque(maxlen=queue_limit)  # (raw id, datagram)
        self._wakeup = asyncio.Event()
        self._connected = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._batched = False  # the server took RELAY_BATCH_PROTOCOL for this connection
        self._inbound: list[tuple[bytes, Address]] = []
        self._flush_scheduled = False
        self.state: RelayState = "offline"
        self.stats = RelayStats()
        self.last_error: str | None = None
        self.turn: TurnRelay | None = None  # preferred for the peers it knows
        # The credentials :attr:`turn` was opened with, renewed with it: WebRTC connections
        # take them too (a relayed ICE candidate), rather than asking the server again.
        self.turn_credentials: TurnCredentials | None = None
        self._retiring: list[TurnRelay] = []  # replaced allocations, still carrying old peers
        self._turn_backoff = Backoff(initial=5.0, cap=TURN_RETRY_MAX)
        self._retire_timers: list[asyncio.TimerHandle] = []
        self.turn_bytes_out = 0  # datagram bytes sent through closed TURN allocations

    # ------------------------------------------------------------------ API

    async def wait_connected(self, timeout: float) -> None:
        """Return once the relay is usable; TimeoutError after ``timeout``."""
        await asyncio.wait_for(self._connected.wait(), timeout)

    def turn_address(self) -> Address | None:
        """Our TURN allocation's relayed address, for signalling (None: no TURN)."""
        return self.turn.relayed_address if self.turn is not None else None

    def add_turn_peer(self, device_id: str, relayed: Address) -> None:
        """Signalling told us ``device_id``'s relayed address: reach it through TURN."""
        if self.turn is not None:
            self.turn.add_peer(device_id, relayed)

    def forget_turn_peer(self, device_id: str) -> None:
        """Reach ``device_id`` through the WebSocket relay again (TURN did not get through)."""
        for turn in self._turns():
            turn.remove_peer(device_id)

    def turn_carries(self, device_id: str) -> bool:
        """Whether ``device_id``'s relay traffic goes through a TURN allocation."""
        return any(turn.knows(device_id) for turn in self._turns())

    def _turns(self) -> list[TurnRelay]:
        return ([self.turn] if self.turn is not None else []) + self._retiring

    def send(self, datagrams: list[bytes], addr: Address) -> None:
        """The endpoint's relay sender: queue datagrams for ``relay.<id>``; never blocks.

        A peer reachable through a TURN allocation (:attr:`turn`, or one being replaced that
        still knows the peer) goes that way instead."""
        for turn in self._turns():
            if turn.send(datagrams, addr):
                return
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
            outbox.append((raw_id, datagram))
        self._wakeup.set()

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Stay connected until cancelled; on the way out the endpoint loses its relay."""
        self._endpoint.set_relay(self.send)
        turn_keeper = asyncio.create_task(self._keep_turn(), name="relay-turn")
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
            turn_keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await turn_keeper
            log.info(
                "relay totals: %d bytes sent through the server's relay, %d through TURN",
                self.stats.bytes_out,
                self.turn_bytes_out,
            )
            self._endpoint.set_relay(None)
            if self.state != "offline":
                self._disconnected("offline")

    # ------------------------------------------------------------------ TURN allocation

    async def _keep_turn(self) -> None:
        """Hold a TURN allocation while the server advertises one, renewing it (new credentials,
        new allocation) before the credentials expire; the replaced one keeps carrying the
        peers it knows for :data:`TURN_GRACE` seconds, until signalling taught them the new
        address. Failures only leave TURN out (the WebSocket relay remains) and retry later."""
        try:
            while True:
                renew_in = await self._allocate()
                if renew_in is None:
                    return  # the server has no TURN
                await asyncio.sleep(renew_in)
        finally:
            for timer in self._retire_timers:
                timer.cancel()
            for turn in self._turns():
                self.turn_bytes_out += turn.stats.bytes_out
                await turn.close()
            self.turn = None
            self.turn_credentials = None
            self._retiring.clear()

    async def _allocate(self) -> float | None:
        """One allocation; seconds until the next, or None when the server offers no TURN."""
        try:
            info = await self._client.info()
            if not info.turn_urls:
                return None
            issued = await self._client.turn_credentials()
            server = await turn_server(issued.urls)
            if server is None:
                log.info("no usable TURN URL among %s (UDP turn: only)", issued.urls)
                return None
            turn = TurnRelay(self._endpoint)
            await turn.open(server, issued.username, issued.password)
        except (MeshError, OSError, TimeoutError, TransactionFailed, ValueError) as exc:
            delay = self._turn_backoff.next_delay()
            log.info("no TURN allocation (%s); retrying in %.0fs", exc or "timeout", delay)
            return delay
        self._turn_backoff.reset()
        previous, self.turn = self.turn, turn
        self.turn_credentials = issued
        log.info("TURN allocation %s:%s on %s:%s", *(turn.relayed_address or ("?", 0)), *server)
        if previous is not None:
            self._retiring.append(previous)
            timer = asyncio.get_running_loop().call_later(TURN_GRACE, self._retire, previous)
            self._retire_timers.append(timer)
        return max(TURN_RENEW_MIN, issued.expires_at - time.time() - TURN_RENEW_MARGIN)

    def _retire(self, turn: TurnRelay) -> None:
        self._retire_timers = [t for t in self._retire_timers if not t.cancelled()]
        if turn in self._retiring:
            self._retiring.remove(turn)
            self.turn_bytes_out += turn.stats.bytes_out
            turn.close_soon()

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
            max_size=RELAY_MAX_BATCH,
            max_queue=RECEIVE_QUEUE,
            subprotocols=[RELAY_BATCH_PROTOCOL] if self._offer_batches else None,
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
        self._batched = ws.subprotocol == RELAY_BATCH_PROTOCOL
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
        batched = self._batched
        while True:
            frame = await ws.recv()
            if not isinstance(frame, bytes) or len(frame) <= ID_BYTES:
                self.stats.malformed += 1
                continue
            source = relay_address(frame[:ID_BYTES].hex())
            if batched:
                self._read_batch(frame, source)
            else:
                payload = frame[ID_BYTES:]
                self.stats.frames_in += 1
                self.stats.bytes_in += len(payload)
                self._inbound.append((payload, source))
            # recv() returns buffered frames without yielding; feed the whole burst to the
            # endpoint at once (one QUIC processing pass), like its batched socket reads.
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush_inbound)

    def _read_batch(self, frame: bytes, source: Address) -> None:
        """The datagrams of a batch frame (what a peer sent, passed on unopened: a length past
        the end or of 0 makes the rest of the frame malformed)."""
        inbound = self._inbound
        offset, end = ID_BYTES, len(frame)
        while offset < end:
            if offset + 2 >= end:
                self.stats.malformed += 1
                return
            (length,) = LENGTH.unpack_from(frame, offset)
            offset += 2
            if not 0 < length <= MAX_DATAGRAM or offset + length > end:
                self.stats.malformed += 1
                return
            inbound.append((frame[offset : offset + length], source))
            self.stats.frames_in += 1
            self.stats.bytes_in += length
            offset += length

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
            if self._batched:
                frame = self._next_batch()
            else:
                raw_id, datagram = outbox.popleft()
                frame = raw_id + datagram
                self.stats.frames_out += 1
                self.stats.bytes_out += len(datagram)
            await ws.send(frame)
            self.stats.sends += 1

    def _next_batch(self) -> bytes:
        """The queued datagrams for the first queued peer, in order, as one batch frame."""
        outbox = self._outbox
        raw_id, datagram = outbox.popleft()
        pack = LENGTH.pack
        parts = [raw_id, pack(len(datagram)), datagram]
        size = ID_BYTES + 2 + len(datagram)
        count, payload = 1, len(datagram)
        while outbox and outbox[0][0] == raw_id and size + 2 + len(outbox[0][1]) <= RELAY_MAX_BATCH:
            _, datagram = outbox.popleft()
            parts += (pack(len(datagram)), datagram)
            size += 2 + len(datagram)
            count += 1
            payload += len(datagram)
        self.stats.frames_out += count
        self.stats.bytes_out += payload
        return b"".join(parts)


def _raw_id(peer: str) -> bytes | None:
    try:
        raw = bytes.fromhex(peer)
    except ValueError:
        return None
    return raw if len(raw) == ID_BYTES else None


# ---------------------------------------------------------------------------- TURN


CHANNEL_DATA_HEADER: Final = struct.Struct("!HH")  # channel number, length (RFC 8656 12.4)
TURN_LIFETIME: Final = 600  # seconds an allocation lives between refreshes (aioice refreshes)
# A new allocation this long before the credentials expire (coturn then refuses its refreshes);
# the replaced one carries its peers for TURN_GRACE more seconds: a dialer's periodic offer
# (PeerManager's upgrade attempts) tells its peer the new relayed address well within that.
TURN_RENEW_MARGIN: Final = 120.0
TURN_RENEW_MIN: Final = 30.0
TURN_GRACE: Final = 90.0
TURN_RETRY_MAX: Final = 300.0


async def turn_server(urls: list[str]) -> Address | None:
    """The first ``turn:host[:port][?transport=udp]`` URL's server, resolved; None if none.

    ``turns:`` (TLS) and ``transport=tcp`` are for browsers behind stricter firewalls; the
    agent's TurnRelay speaks UDP only."""
    for url in urls:
        scheme, _, rest = url.partition(":")
        rest, _, query = rest.partition("?")
        if scheme != "turn" or query not in ("", "transport=udp"):
            continue
        if rest.startswith("["):
            host, _, port_text = rest[1:].partition("]")
            port_text = port_text.removeprefix(":")
        else:
            host, _, port_text = rest.partition(":")
        port = int(port_text) if port_text.isdigit() else 3478
        if not host or not 0 < port < 65536:
            continue
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        if infos:
            return (str(infos[0][4][0]), port)
    return None


@dataclass
class TurnStats:
    datagrams_out: int = 0
    bytes_out: int = 0
    datagrams_in: int = 0
    bytes_in: int = 0
    unknown_sources: int = 0  # datagrams from a relayed address no peer of ours announced


class TurnRelay(asyncio.DatagramProtocol):
    """Relay addresses (``relay.<device id>``) carried through a TURN allocation.

    The deployment's TURN server (coturn) does the relaying in C, so the Mesh Server carries
    none of it. Each side allocates a relayed address and tells its peers (signalling); we send
    a peer's datagrams from our allocation to its relayed address over a bound channel (4 bytes
    of ChannelData header, no STUN per packet) and hand what arrives from it to the endpoint as
    coming from ``relay.<its id>``, so QUIC sees the same pseudo address as on the WebSocket
    relay and either way may carry a connection. The packets stay end-to-end encrypted QUIC.

    aioice's TURN client does the allocation, its authentication and refresh and the channel
    binding; the per-packet path here is synchronous (a bound channel's header and a sendto).
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._client: TurnClientUdpProtocol | None = None
        self._peers: dict[str, Address] = {}  # device id -> its relayed address
        self._sources: dict[Address, Address] = {}  # relayed address -> relay pseudo address
        self._binding: dict[Address, asyncio.Task[None]] = {}  # relayed address -> its bind
        self._inbound: list[tuple[bytes, Address]] = []
        self._flush_scheduled = False
        self._socket: _TurnSocket | None = None
        self._io: DatagramIO | None = None
        self._server: Address | None = None
        self.relayed_address: Address | None = None
        self.stats = TurnStats()

    async def open(
        self, server: Address, username: str, password: str, *, timeout: float = 10.0
    ) -> Address:
        """Allocate on ``server`` (UDP) with these credentials; our relayed address.

        Raises ConnectionError (or aioice's TransactionFailed) when the server refuses or does
        not answer. The socket is ours, read and written in batches like the endpoint's (one
        system call for a flight of datagrams: on a busy machine each call to a waiting TURN
        server costs a wake-up); aioice's client only writes its STUN requests to it."""
        loop = asyncio.get_running_loop()
        server = (str(server[0]), int(server[1]))
        sock, _ = open_socket(
            "::" if ":" in server[0] else "0.0.0.0", 0, self._endpoint.settings.socket_buffer
        )
        self._socket = _TurnSocket(sock)
        try:
            sock.connect(server)
            self._io = create_io(sock)
            self._server = server
            client = TurnClientUdpProtocol(
                server,
                username=username,
                password=password,
                lifetime=TURN_LIFETIME,
                channel_refresh_time=TURN_LIFETIME // 2,
            )
            client.connection_made(self._socket)
            client.receiver = self
            self._client = client
            loop.add_reader(sock.fileno(), self._on_readable)
            self._socket.reading = True
            async with asyncio.timeout(timeout):
                relayed = await client.connect()
        except BaseException:
            self._client = None
            self._socket.close()
            raise
        self.relayed_address = (str(relayed[0]), int(relayed[1]))
        return self.relayed_address

    def add_peer(self, device_id: str, relayed: Address) -> None:
        """Route ``device_id``'s relay traffic to its relayed address; binding the channel now
        also opens the allocation's permission, so its first packet toward us gets in."""
        relayed = (str(relayed[0]), int(relayed[1]))
        old = self._peers.get(device_id)
        if old is not None:
            self._sources.pop(old, None)
        self._peers[device_id] = relayed
        self._sources[relayed] = relay_address(device_id)
        if self._client is not None and relayed not in self._client.peer_to_channel:
            self._bind(relayed)

    def remove_peer(self, device_id: str) -> None:
        relayed = self._peers.pop(device_id, None)
        if relayed is not None:
            self._sources.pop(relayed, None)

    def knows(self, device_id: str) -> bool:
        return device_id in self._peers

    def send(self, datagrams: list[bytes], addr: Address) -> bool:
        """Send to a peer we know a relayed address of; False (nothing sent) otherwise."""
        client = self._client
        peer = relay_peer(addr)
        target = self._peers.get(peer) if peer is not None else None
        if client is None or target is None or self.relayed_address is None:
            return False
        channel = client.peer_to_channel.get(target)
        if channel is None:
            self._bind(target)  # the packets are lost meanwhile: QUIC resends
            return True
        if time.time() > client.channel_refresh_at[channel]:
            # Refreshed in the background: the server keeps a binding for 10 minutes, aioice
            # refreshes it after TURN_LIFETIME // 2, so the channel still carries meanwhile.
            self._bind(target)
        pack = CHANNEL_DATA_HEADER.pack
        messages = [pack(channel, len(datagram)) + datagram for datagram in datagrams]
        assert self._io is not None and self._server is not None
        with contextlib.suppress(OSError):  # a full buffer or an error: loss, QUIC resends
            self._io.send(messages, self._server)
        self.stats.datagrams_out += len(datagrams)
        self.stats.bytes_out += sum(map(len, datagrams))
        return True

    def send_or_drop(self, datagrams: list[bytes], addr: Address) -> None:
        """The endpoint's relay sender where TURN is the only relay (datagrams for a peer we
        know no relayed address of are dropped)."""
        self.send(datagrams, addr)

    def _bind(self, target: Address) -> None:
        """Bind (or refresh) ``target``'s channel in the background; the sends meanwhile start
        no second ChannelBind (aioice marks only a first binding as under way, not a refresh)."""
        client = self._client
        if client is None or target in self._binding:
            return
        task = asyncio.get_running_loop().create_task(self._bind_channel(client, target))
        self._binding[target] = task
        task.add_done_callback(lambda _: self._binding.pop(target, None))

    async def _bind_channel(self, client: TurnClientUdpProtocol, target: Address) -> None:
        # aioice binds (or refreshes) the channel before it sends; an empty ChannelData
        # message then reaches the peer as nothing at all (it is dropped unread).
        try:
            await client.send_data(b"", (str(target[0]), int(target[1])))
        except Exception as exc:  # refused or timed out: that peer goes by the WebSocket relay
            log.info("TURN channel to %s not bound: %s", target, exc)
            source = self._sources.get(target)
            peer = relay_peer(source) if source is not None else None
            if peer is not None:
                self.remove_peer(peer)

    # ------------------------------------------------------------------ receiving

    def _on_readable(self) -> None:
        client, io = self._client, self._io
        if client is None or io is None:
            return
        unpack = CHANNEL_DATA_HEADER.unpack_from
        for data, addr in io.receive():
            if len(data) >= 4 and 0x40 <= data[0] <= 0x7F:  # ChannelData: the data path
                channel, length = unpack(data)
                peer = client.channel_to_peer.get(channel)
                source = self._sources.get(peer) if peer is not None else None
                if source is None:
                    self.stats.unknown_sources += 1
                elif length:
                    self.stats.datagrams_in += 1
                    self.stats.bytes_in += length
                    self._inbound.append((data[4 : 4 + length], source))
            else:  # STUN: aioice's transactions, and Data indications (to datagram_received)
                client.datagram_received(data, addr)
        self._flush_inbound()

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        source = self._sources.get((str(addr[0]), int(addr[1])))
        if source is None:
            self.stats.unknown_sources += 1
            return
        if not data:
            return
        self.stats.datagrams_in += 1
        self.stats.bytes_in += len(data)
        self._inbound.append((data, source))
        if not self._flush_scheduled:  # one QUIC processing pass per burst, like RelayLink
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_inbound)

    def _flush_inbound(self) -> None:
        self._flush_scheduled = False
        batch, self._inbound = self._inbound, []
        if batch:
            with contextlib.suppress(EndpointClosedError, RuntimeError):
                self._endpoint.feed_datagrams(batch)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client = None

    def close_soon(self) -> None:
        """:meth:`close` in the background (a replaced allocation, from a timer)."""
        task = asyncio.get_running_loop().create_task(self.close())
        _closing.add(task)  # held until done (the loop keeps only weak references)
        task.add_done_callback(_closing.discard)

    async def close(self) -> None:
        """Give the allocation back (a Refresh with lifetime 0) and close the socket."""
        client = self._client
        for task in list(self._binding.values()):
            task.cancel()
        if client is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await client.delete()
        self._client = None
        if self._socket is not None:
            self._socket.close()


_closing: set[asyncio.Task[None]] = set()


class _TurnSocket(asyncio.DatagramTransport):
    """The transport aioice's TURN client is given: writes go straight to our socket (its STUN
    requests are few); reading is :meth:`TurnRelay._on_readable`'s, in batches."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock
        self._closed = False
        self.reading = False

    def sendto(self, data: bytes | bytearray | memoryview, addr: Any = None) -> None:
        del addr  # the socket is connected to the TURN server
        if not self._closed:
            with contextlib.suppress(OSError):  # lost like any datagram; aioice retransmits
                self._sock.send(data)

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.reading:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()
