"""The agent's one UDP socket, driving sans-IO QUIC connections (our own endpoint).

Why not the libraries' asyncio glue: it reads one datagram per wakeup and transmits after each,
leaves the socket buffers at the system default, does not bound what a stream buffers, and owns
the socket, so STUN and relayed datagrams could not share it. Here:

- **Batched receive.** On each wakeup the socket is drained (recvmmsg + GRO through quinn-udp
  where available, udp.py), every datagram is fed to its connection, and then each touched
  connection transmits once (sendmsg + GSO).
- **Routing.** Short-header packets by destination connection id (ours are always 8 bytes),
  long-header packets by their DCID; a new Initial creates a listener connection. The id table
  follows the engines' ConnectionIdIssued/Retired events. Connections are also kept by address.
- **Demultiplexing.** A datagram whose first two bits are 00 and that carries the STUN magic
  cookie at offset 4 goes to the injectable STUN handler (RFC 7983); QUIC always sets bit 0x40.
- **Timers.** One loop timer per connection, at the engine's ``get_timer()`` or our keepalive.
- **Authentication.** The dialer pins the listener's certificate fingerprint; the listener
  verifies the dialer's signed proof (auth.py), then an optional ``authorize`` hook sees the
  first stream (the application handshake with capability tokens) before the connection and
  its other streams are handed to the application.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

from meshagent_gui.core.p2p import auth, udp
from meshagent_gui.core.p2p.connection import PeerConnection
from meshagent_gui.core.p2p.engine import (
    CONNECTION_ID_LENGTH,
    Address,
    Batch,
    EngineName,
    QuicEngine,
    TlsCredentials,
    TransportSettings,
    create_engine,
)
from meshagent_gui.core.p2p.errors import (
    CloseCode,
    ConnectionClosedError,
    EndpointClosedError,
    Unauthorized,
)
from meshagent_gui.core.p2p.streams import PeerStream

log = logging.getLogger(__name__)

STUN_MAGIC_COOKIE: Final = b"\x21\x12\xa4\x42"
_QUIC_V1: Final = b"\x00\x00\x00\x01"
_MIN_INITIAL_SIZE: Final = 1200
_CID_END: Final = 1 + CONNECTION_ID_LENGTH  # a short header: flags, then our DCID

Authorizer = Callable[[PeerConnection, PeerStream], Awaitable[bool]]
"""Validates the first stream of a verified dialer (the application handshake); True admits it.

It may raise :class:`~meshagent_gui.core.p2p.errors.Unauthorized` to refuse with a specific
code. It keeps the stream: the application sees the connection's other streams only.
"""

StunHandler = Callable[[bytes, Address], None]
RelaySender = Callable[[list[bytes], Address], None]

# Peers reached through the server's relay get a pseudo address: QUIC runs over it like over
# UDP (same packets, still end-to-end encrypted), only the carrier differs. The engines insist on
# a syntactically valid IP, so it is an IPv6 address in a ULA prefix of our own ("mesh") whose
# host part is derived from the peer's id; the map back is filled as addresses are made.
RELAY_NETWORK: Final = ipaddress.IPv6Network("fdfe:6d65:7368::/64")
RELAY_PORT: Final = 9
_RELAY_TEXT: Final = "fdfe:6d65:7368:"
_relay_peers: dict[ipaddress.IPv6Address, str] = {}


def relay_address(peer_id: str) -> Address:
    host_part = int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:8], "big")
    ip = RELAY_NETWORK[host_part]
    _relay_peers[ip] = peer_id
    return (str(ip), RELAY_PORT)


def relay_peer(addr: Address) -> str | None:
    """The peer behind a relay pseudo address (any textual form), or None for a real one."""
    if not str(addr[0]).lower().startswith(_RELAY_TEXT):  # cheap: this runs per transmit
        return None
    try:
        ip = ipaddress.ip_address(str(addr[0]))
    except ValueError:
        return None
    return _relay_peers.get(ip) if isinstance(ip, ipaddress.IPv6Address) else None


@dataclass(frozen=True)
class EndpointSettings:
    transport: TransportSettings = field(default_factory=TransportSettings)
    # Bytes that may wait untransmitted in QUIC's send buffer, per stream (our backpressure).
    max_unsent: int = 1024 * 1024
    # Asked of the kernel for SO_RCVBUF and SO_SNDBUF; the granted sizes are reported.
    socket_buffer: int = 8 * 1024 * 1024
    keepalive_interval: float | None = 10.0
    # Listener: TLS handshake plus the dialer's proof; dialer: the whole of connect().
    handshake_timeout: float = 10.0
    authorize_timeout: float = 10.0
    accept_backlog: int = 64
    max_connections: int = 256
    # Incoming connections still authenticating or authorizing (bounds unauthenticated load).
    max_pending: int = 32
    udp_io: str | None = None  # "quinn" or "python"; default: env MESHAGENT_UDP_IO, else quinn


def stays_on_this_host(host: str) -> bool:
    """Whether datagrams to ``host`` never leave this machine: a loopback address, or one of our
    own (the kernel then picks that very address as the source, as for loopback)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return True
    if ip.is_unspecified or ip.is_multicast:
        return False
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((str(ip), 9))  # no packet is sent: this only picks a route
            return ipaddress.ip_address(probe.getsockname()[0].split("%", 1)[0]) == ip
    except (OSError, ValueError):
        return False


def is_stun(datagram: bytes) -> bool:
    """A STUN message (RFC 8489): type starting 0b00 (first byte 0x00/0x01), magic cookie."""
    return len(datagram) >= 20 and datagram[0] < 0x02 and datagram[4:8] == STUN_MAGIC_COOKIE


class Endpoint:
    """One UDP socket carrying every QUIC connection of this agent, dialed or accepted.

    Use as ``async with Endpoint(identity) as endpoint`` (binds 0.0.0.0 on an ephemeral
    port) or call :meth:`start` and :meth:`close` yourself.
    """

    def __init__(
        self,
        credentials: auth.DeviceCredentials,
        *,
        settings: EndpointSettings | None = None,
        engine: str | None = None,
        authorize: Authorizer | None = None,
        stun_handler: StunHandler | None = None,
        accept_incoming: bool = True,
    ) -> None:
        self.settings = settings or EndpointSettings()
        self._credentials = credentials
        self._engine: QuicEngine = create_engine(
            TlsCredentials(credentials.certificate_pem, credentials.private_key_pem),
            self.settings.transport,
            engine,
        )
        self._authorize = authorize
        self._stun_handler = stun_handler
        self._relay_sender: RelaySender | None = None
        self._accept_incoming = accept_incoming
        self._sock: socket.socket | None = None
        self._io: udp.DatagramIO | None = None
        self._buffers: udp.SocketBuffers | None = None
        self._v6 = False
        self._by_cid: dict[bytes, PeerConnection] = {}
        self._by_address: dict[Address, PeerConnection] = {}
        self._connections: set[PeerConnection] = set()
        self._pending: set[PeerConnection] = set()
        self._tx_queue: deque[tuple[list[bytes], Address]] = deque()
        self._accepted: asyncio.Queue[PeerConnection | None] = asyncio.Queue()
        self._task_group: asyncio.TaskGroup | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.dropped_datagrams = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str = "0.0.0.0", port: int = 0) -> None:
        if self._sock is not None or self._closing:
            raise RuntimeError("an endpoint starts once")
        self._loop = asyncio.get_running_loop()
        sock, self._buffers = udp.open_socket(host, port, self.settings.socket_buffer)
        self._sock = sock
        self._v6 = sock.family == socket.AF_INET6
        self._io = udp.create_io(sock, self.settings.udp_io)
        ready: asyncio.Future[None] = self._loop.create_future()
        self._supervisor = self._loop.create_task(self._supervise(ready), name="p2p-endpoint")
        await ready
        self._loop.add_reader(sock.fileno(), self._on_readable)
        log.info(
            "QUIC endpoint on %s (engine %s, UDP I/O %s, buffers rcv %d snd %d)",
            self.local_address,
            self.engine_name,
            self._io.name,
            self._buffers.receive,
            self._buffers.send,
        )

    async def __aenter__(self) -> Endpoint:
        if self._sock is None:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every connection (CONNECTION_CLOSE is sent), stop all tasks, close the socket."""
        if self._closing:
            return
        self._closing = True
        loop = self._loop
        sock = self._sock
        if loop is not None and sock is not None:
            loop.remove_reader(sock.fileno())
        for conn in tuple(self._connections):
            conn.close(CloseCode.SHUTDOWN, "endpoint closing")
            conn.process(loop.time() if loop is not None else 0.0)
            conn.abandon()
        supervisor = self._supervisor
        if supervisor is not None:
            supervisor.cancel()
            await asyncio.wait([supervisor])
        self._accepted.put_nowait(None)
        if loop is not None and sock is not None:
            loop.remove_writer(sock.fileno())
        self._tx_queue.clear()
        if sock is not None:
            sock.close()

    async def _supervise(self, ready: asyncio.Future[None]) -> None:
        """Owns every task the endpoint starts; cancelling it cancels them all."""
        async with asyncio.TaskGroup() as group:
            self._task_group = group
            ready.set_result(None)
            await asyncio.Event().wait()

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        if self._task_group is None or self._closing:
            coroutine.close()
            return
        self._task_group.create_task(self._guarded(coroutine, name), name=name)

    @staticmethod
    async def _guarded(coroutine: Coroutine[Any, Any, None], name: str) -> None:
        # One failing connection must not bring down the task group (and so the endpoint).
        try:
            await coroutine
        except Exception:
            log.exception("%s failed", name)

    # ------------------------------------------------------------------ properties

    @property
    def local_address(self) -> Address:
        if self._sock is None:
            raise RuntimeError("the endpoint is not started")
        return tuple(self._sock.getsockname())

    @property
    def socket_buffers(self) -> udp.SocketBuffers:
        if self._buffers is None:
            raise RuntimeError("the endpoint is not started")
        return self._buffers

    @property
    def engine_name(self) -> EngineName:
        return self._engine.name

    @property
    def io_name(self) -> str:
        return "-" if self._io is None else self._io.name

    @property
    def device_id(self) -> str:
        return self._credentials.device_id

    @property
    def credentials(self) -> auth.DeviceCredentials:
        """The device identity (the WebRTC path presents the same certificate in DTLS)."""
        return self._credentials

    @property
    def connections(self) -> list[PeerConnection]:
        return list(self._connections)

    def connection_for_address(self, addr: Address) -> PeerConnection | None:
        return self._by_address.get(self._normalize(addr))

    def set_stun_handler(self, handler: StunHandler | None) -> None:
        self._stun_handler = handler

    # ------------------------------------------------------------------ dialing and accepting

    async def connect(
        self, addr: Address, expected_peer_id: str, *, timeout: float | None = None
    ) -> PeerConnection:
        """Dial ``addr`` and return once both ends are authenticated.

        Raises :class:`~meshagent_gui.core.p2p.errors.PeerAuthenticationError` when the
        listener is not ``expected_peer_id`` or refuses us, ``TimeoutError`` after ``timeout``.
        """
        loop, _ = self._running()
        addr = self._normalize(addr)
        engine_connection = self._engine.create_client(self.datagram_size(addr))
        conn = PeerConnection(
            self,
            engine_connection,
            is_dialer=True,
            remote_address=addr,
            settings=self.settings,
            credentials=self._credentials,
            expected_peer_id=expected_peer_id.lower(),
        )
        self._register(conn, addr, [engine_connection.host_cid])
        now = loop.time()
        engine_connection.connect(addr, now)
        conn.process(now)
        try:
            async with asyncio.timeout(timeout or self.settings.handshake_timeout):
                await conn.wait_established()
        except TimeoutError:
            conn.close(CloseCode.AUTH_TIMEOUT, "connection setup timed out")
            raise
        except asyncio.CancelledError:
            conn.close(CloseCode.SHUTDOWN, "dial cancelled")
            raise
        return conn

    async def accept(self) -> PeerConnection:
        """The next authenticated (and authorized) incoming connection."""
        self._running()
        conn = await self._accepted.get()
        if conn is None:
            self._accepted.put_nowait(None)  # wake other acceptors too
            raise EndpointClosedError("the endpoint is closed")
        return conn

    async def incoming(self) -> AsyncIterator[PeerConnection]:
        while True:
            try:
                yield await self.accept()
            except EndpointClosedError:
                return

    async def _admit(self, conn: PeerConnection) -> None:
        try:
            await self._authenticate_and_authorize(conn)
        finally:
            self._pending.discard(conn)

    async def _authenticate_and_authorize(self, conn: PeerConnection) -> None:
        try:
            async with asyncio.timeout(self.settings.handshake_timeout):
                await conn.wait_authenticated()
            if conn.is_closed:
                return  # e.g. the dialer raced several paths and kept another one
            if self._authorize is not None:
                conn.begin_authorization()
                async with asyncio.timeout(self.settings.authorize_timeout):
                    first = await conn.wait_first_stream()
                    conn.hand_first_stream(first)
                    allowed = await self._authorize(conn, first)
                if not allowed:
                    conn.close(CloseCode.UNAUTHORIZED, "refused by the application")
                    return
            conn.establish()
        except TimeoutError:
            conn.close(CloseCode.AUTH_TIMEOUT, "peer did not authenticate in time")
            return
        except Unauthorized as exc:
            conn.close(exc.code, exc.reason)
            return
        except ConnectionClosedError:
            return
        except Exception:
            conn.close(CloseCode.INTERNAL_ERROR, "authorization failed")
            raise
        if self._accepted.qsize() >= self.settings.accept_backlog:
            conn.close(CloseCode.BUSY, "too many connections waiting")
            return
        self._accepted.put_nowait(conn)

    # ------------------------------------------------------------------ raw datagrams

    def send_datagram(self, data: bytes, addr: Address) -> None:
        """Send one raw datagram (STUN, hole punching) from the endpoint's socket."""
        self._running()
        self._send_batch([data], self._normalize(addr))

    def feed_datagrams(self, datagrams: list[tuple[bytes, Address]]) -> None:
        """Handle datagrams that arrived another way (e.g. relayed) as if the socket read them."""
        self._running()
        self._handle([(data, self._normalize(addr)) for data, addr in datagrams])

    # ------------------------------------------------------------------ receiving

    def _on_readable(self) -> None:
        assert self._io is not None
        received = self._io.receive()
        if received:
            self._handle(received)

    def _handle(self, received: list[tuple[bytes, Address]]) -> None:
        assert self._loop is not None
        now = self._loop.time()
        by_cid = self._by_cid
        touched: dict[PeerConnection, None] = {}
        fresh: list[PeerConnection] = []
        batch: list[bytes] = []
        batch_conn: PeerConnection | None = None
        batch_addr: Address | None = None
        # The short-header DCID of the current batch: the common case (a burst from one
        # peer on one connection) costs one slice and two comparisons per datagram.
        batch_cid: bytes | None = None
        for data, addr in received:
            if data[1:_CID_END] == batch_cid and addr == batch_addr:
                batch.append(data)
                continue
            if not data:
                continue
            first = data[0]
            if first & 0x40 == 0:
                self._on_other(data, addr)
                continue
            if first & 0x80:
                dcid = data[6 : 6 + data[5]] if len(data) > 6 else b""
                cid: bytes | None = None
                conn = by_cid.get(dcid)
                if conn is None:
                    conn = self._maybe_accept(data, dcid, addr)
                    if conn is None:
                        self.dropped_datagrams += 1
                        continue
                    fresh.append(conn)
            else:
                cid = data[1:_CID_END]
                conn = by_cid.get(cid)
                if conn is None:
                    self.dropped_datagrams += 1
                    continue
            if conn is batch_conn and addr == batch_addr:
                batch.append(data)
                batch_cid = cid
                continue
            if batch_conn is not None:
                self._feed(batch_conn, batch, batch_addr, now)
                touched[batch_conn] = None
            batch_conn, batch_addr, batch, batch_cid = conn, addr, [data], cid
        if batch_conn is not None:
            self._feed(batch_conn, batch, batch_addr, now)
            touched[batch_conn] = None
        for conn in fresh:
            conn.start()
        for conn in touched:
            try:
                conn.process(now)
            except Exception:
                log.exception("QUIC processing failed for %r", conn)
                conn.close(CloseCode.INTERNAL_ERROR, "internal error")

    def _feed(
        self, conn: PeerConnection, batch: list[bytes], addr: Address | None, now: float
    ) -> None:
        try:
            conn.receive(batch, addr if addr is not None else conn.remote_address, now)
        except Exception:
            log.exception("QUIC receive failed for %r", conn)
            conn.close(CloseCode.INTERNAL_ERROR, "internal error")

    def _on_other(self, data: bytes, addr: Address) -> None:
        handler = self._stun_handler
        if handler is None or not is_stun(data):
            self.dropped_datagrams += 1
            return
        try:
            handler(data, addr)
        except Exception:
            log.exception("STUN handler failed")

    def _maybe_accept(self, data: bytes, dcid: bytes, addr: Address) -> PeerConnection | None:
        is_initial_v1 = data[1:5] == _QUIC_V1 and (data[0] & 0x30) == 0
        if (
            not is_initial_v1
            or not self._accept_incoming
            or self._closing
            or len(data) < _MIN_INITIAL_SIZE
            or len(dcid) < 8
            or len(self._connections) >= self.settings.max_connections
            or len(self._pending) >= self.settings.max_pending
        ):
            return None
        engine_connection = self._engine.create_server(dcid, self.datagram_size(addr))
        conn = PeerConnection(
            self,
            engine_connection,
            is_dialer=False,
            remote_address=addr,
            settings=self.settings,
            credentials=self._credentials,
        )
        self._register(conn, addr, [dcid, engine_connection.host_cid])
        self._pending.add(conn)
        self._spawn(self._admit(conn), name=f"p2p-admit-{addr}")
        return conn

    def datagram_size(self, addr: Address) -> int:
        """The largest datagram to send to ``addr``: jumbo on paths that stay on this machine."""
        transport = self.settings.transport
        if relay_peer(addr) is None and stays_on_this_host(str(addr[0])):
            return max(transport.max_datagram_size, transport.local_datagram_size)
        return transport.max_datagram_size

    # ------------------------------------------------------------------ transmitting

    def transmit(self, batches: list[Batch]) -> int:
        """Send what a connection produced (datagrams grouped by address); bytes sent."""
        sent = 0
        for payloads, addr in batches:
            self._send_batch(payloads, addr)
            sent += sum(map(len, payloads))
        return sent

    def set_relay(self, sender: RelaySender | None) -> None:
        """Route datagrams for relay addresses (:func:`relay_address`) to ``sender``."""
        self._relay_sender = sender

    def _send_batch(self, datagrams: list[bytes], addr: Address) -> None:
        if relay_peer(addr) is not None:
            if self._relay_sender is not None:
                self._relay_sender(datagrams, addr)
            return
        if self._tx_queue:
            self._tx_queue.append((datagrams, addr))
            return
        assert self._io is not None
        sent = self._io.send(datagrams, addr)
        if sent < len(datagrams):
            self._tx_queue.append((datagrams[sent:], addr))
            assert self._loop is not None and self._sock is not None
            self._loop.add_writer(self._sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        assert self._io is not None and self._loop is not None and self._sock is not None
        queue = self._tx_queue
        while queue:
            datagrams, addr = queue[0]
            sent = self._io.send(datagrams, addr)
            if sent < len(datagrams):
                queue[0] = (datagrams[sent:], addr)
                return
            queue.popleft()
        self._loop.remove_writer(self._sock.fileno())

    # ------------------------------------------------------------------ used by connections

    def add_connection_id(self, conn: PeerConnection, connection_id: bytes) -> None:
        if conn in self._connections:
            self._by_cid[connection_id] = conn

    def remove_connection_id(self, conn: PeerConnection, connection_id: bytes) -> None:
        if self._by_cid.get(connection_id) is conn:
            del self._by_cid[connection_id]

    def connection_moved(self, conn: PeerConnection, addr: Address) -> None:
        if self._by_address.get(conn.remote_address) is conn:
            del self._by_address[conn.remote_address]
        self._by_address[addr] = conn

    def forget(self, conn: PeerConnection) -> None:
        self._connections.discard(conn)
        for cid in [cid for cid, owner in self._by_cid.items() if owner is conn]:
            del self._by_cid[cid]
        if self._by_address.get(conn.remote_address) is conn:
            del self._by_address[conn.remote_address]

    # ------------------------------------------------------------------ helpers

    def _register(self, conn: PeerConnection, addr: Address, cids: list[bytes]) -> None:
        self._connections.add(conn)
        for cid in cids:
            self._by_cid[cid] = conn
        self._by_address[addr] = conn

    def _running(self) -> tuple[asyncio.AbstractEventLoop, socket.socket]:
        if self._closing:
            raise EndpointClosedError("the endpoint is closed")
        if self._loop is None or self._sock is None:
            raise RuntimeError("the endpoint is not started")
        return self._loop, self._sock

    def _normalize(self, addr: Address) -> Address:
        """Addresses as the socket reports them (IPv4 on a dual-stack socket is v4-mapped)."""
        host, port = addr[0], int(addr[1])
        if self._v6:
            with contextlib.suppress(ValueError):
                ip = ipaddress.ip_address(host)
                if ip.version == 4:
                    return (f"::ffff:{ip}", port, 0, 0)
            return (host, port, *addr[2:4]) if len(addr) == 4 else (host, port, 0, 0)
        return (host, port)
