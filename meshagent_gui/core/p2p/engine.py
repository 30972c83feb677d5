"""One small adapter over the two sans-IO QUIC engines: qh3 (default) and aioquic.

Both libraries offer the same ``QuicConnection`` shape (aioquic is the original, qh3 a fork with
its packet work in Rust); they differ in configuration fields, in how certificates are loaded
(qh3 takes PEM only, aioquic takes ``cryptography`` objects), in how the peer certificate is
read, in batched receive, in how unsent stream bytes are counted and in what happens past the
peer's stream limit. This module hides those differences behind :class:`EngineConnection` and
nothing else: no sockets, no asyncio, time is passed in as ``now``. The endpoint (endpoint.py)
owns the UDP socket and drives these objects. Where a library has no public accessor we read
its internals here, and only here (marked "no public accessor"); the tests run both engines.

What we configure on purpose, for both engines:

- ALPN ``meshagent/1``; TLS 1.3 only (both libraries).
- No session tickets and no resumption, so no 0-RTT is ever offered or accepted.
- The dialer skips CA checks (there is no CA) and pins the listener's certificate by its
  SHA-256 fingerprint. The endpoint checks it on HandshakeCompleted, before it sends anything,
  the same way on both engines (aioquic has no in-handshake hook; qh3's ``assert_fingerprint``
  would end the connection with a TLS alert instead of our PEER_ID_MISMATCH reason code).
  TLS has already checked that the peer holds the certificate's key (CertificateVerify).
- The listener cannot ask for a client certificate: qh3's server never sends a
  CertificateRequest, and aioquic only has a private "for test purposes" flag. The dialer
  proves its identity with a signed challenge instead (auth.py).
"""

from __future__ import annotations

import logging
import os
import ssl
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Final, Literal, Protocol, cast

from meshagent_gui.core.p2p.errors import StreamLimitError

ENGINE_ENV: Final = "MESHAGENT_QUIC_ENGINE"
DEFAULT_ENGINE: Final = "qh3"
ENGINES: Final = ("qh3", "aioquic")
EngineName = Literal["qh3", "aioquic"]
ALPN: Final = "meshagent/1"
# Local connection ids have this fixed length on every connection we create, so the endpoint
# can route short-header packets without per-connection state.
CONNECTION_ID_LENGTH: Final = 8

Address = tuple[Any, ...]
# Datagrams to send to one address, in order (one GSO batch for the socket).
Batch = tuple[list[bytes], Address]


class _DemoteQh3PeerClose(logging.Filter):
    """qh3 logs every ordinary peer close as a warning; that is routine for us."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and str(record.msg).startswith("Native peer close"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


class EngineError(ValueError):
    """An unknown engine name, or an engine whose library is not installed."""


@dataclass(frozen=True)
class TransportSettings:
    """QUIC transport parameters shared by both engines.

    The receive windows are sized for bandwidth x RTT: the default 8 MiB per stream keeps
    1 Gbit/s flowing over a 64 ms round trip (see :meth:`for_path`). Neither library ties them
    to what the application has read, so they set how fast data may flow, not how much memory
    a peer may make us hold: streams.py bounds that, with the same window.
    """

    idle_timeout: float = 30.0
    max_datagram_size: int = 1452
    # Paths that never leave this machine (loopback, our own addresses: the loopback device's
    # MTU is 64 KiB) carry jumbo datagrams: a sixth of the packets to build, encrypt, send, ack
    # and receive per byte, about half of QUIC's CPU per GiB (tests/benchmarks/test_bench_quic.py).
    # Other paths keep max_datagram_size, which fits any Internet path.
    local_datagram_size: int = 8952
    stream_window: int = 8 * 1024 * 1024
    connection_window: int = 32 * 1024 * 1024
    # aioquic only (qh3 has one built-in controller): "reno" or "cubic".
    congestion_control: str = "cubic"

    @staticmethod
    def for_path(bandwidth_bytes_per_s: float, rtt_s: float, **kwargs: Any) -> TransportSettings:
        """Windows that keep a path of this bandwidth and round trip full (x2 headroom)."""
        bdp = int(bandwidth_bytes_per_s * rtt_s)
        stream = max(1024 * 1024, 2 * bdp)
        return TransportSettings(stream_window=stream, connection_window=4 * stream, **kwargs)


@dataclass(frozen=True)
class TlsCredentials:
    certificate_pem: bytes
    private_key_pem: bytes


class EventSink(Protocol):
    """What an :class:`EngineConnection` reports while its events are drained.

    A callback interface rather than event objects: the data path sees one call per received
    chunk and no extra allocation.
    """

    def on_handshake_completed(self, early_data_accepted: bool) -> None: ...

    def on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None: ...

    def on_stream_reset(self, stream_id: int, error_code: int) -> None: ...

    def on_stop_sending(self, stream_id: int, error_code: int) -> None: ...

    def on_connection_id_issued(self, connection_id: bytes) -> None: ...

    def on_connection_id_retired(self, connection_id: bytes) -> None: ...

    def on_ping_acknowledged(self, uid: int) -> None: ...

    def on_terminated(self, error_code: int, frame_type: int | None, reason: str) -> None: ...


class EngineConnection(ABC):
    """One QUIC connection of either engine, sans-IO."""

    engine: EngineName

    def __init__(self, connection: Any, events_module: Any) -> None:
        self._conn = connection
        ev = events_module
        self._data_event: Any = ev.StreamDataReceived
        self._handlers: dict[type, Callable[[Any, EventSink], None]] = {
            ev.HandshakeCompleted: lambda e, s: s.on_handshake_completed(e.early_data_accepted),
            ev.StreamReset: lambda e, s: s.on_stream_reset(e.stream_id, e.error_code),
            ev.StopSendingReceived: lambda e, s: s.on_stop_sending(e.stream_id, e.error_code),
            ev.ConnectionIdIssued: lambda e, s: s.on_connection_id_issued(e.connection_id),
            ev.ConnectionIdRetired: lambda e, s: s.on_connection_id_retired(e.connection_id),
            ev.PingAcknowledged: lambda e, s: s.on_ping_acknowledged(e.uid),
            ev.ConnectionTerminated: lambda e, s: s.on_terminated(
                e.error_code, e.frame_type, e.reason_phrase
            ),
        }

    # ------------------------------------------------------------------ identity and routing

    @property
    def host_cid(self) -> bytes:
        """The connection id our peer currently puts in the packets it sends us."""
        return cast(bytes, self._conn.host_cid)

    @abstractmethod
    def peer_certificate_der(self) -> bytes | None:
        """The certificate the peer presented in the TLS handshake (only the listener sends one)."""

    # ------------------------------------------------------------------ datagrams and timers

    def connect(self, addr: Address, now: float) -> None:
        self._conn.connect(addr, now=now)

    @abstractmethod
    def receive_datagrams(self, datagrams: list[bytes], addr: Address, now: float) -> None:
        """Feed every datagram of one receive batch that came from ``addr``."""

    def datagrams_to_send(self, now: float) -> list[Batch]:
        """Datagrams to transmit now, grouped by destination, in order."""
        return _group(self._conn.datagrams_to_send(now=now))

    def get_timer(self) -> float | None:
        return cast(float | None, self._conn.get_timer())

    def handle_timer(self, now: float) -> None:
        self._conn.handle_timer(now=now)

    def drain_events(self, sink: EventSink) -> None:
        next_event = self._conn.next_event
        data_event = self._data_event
        handlers = self._handlers
        on_stream_data = sink.on_stream_data
        while (event := next_event()) is not None:
            if type(event) is data_event:
                on_stream_data(event.stream_id, event.data, event.end_stream)
                continue
            handler = handlers.get(type(event))
            if handler is not None:
                handler(event, sink)

    # ------------------------------------------------------------------ streams

    def open_stream(self, unidirectional: bool = False) -> int:
        """A new local stream; :class:`StreamLimitError` when the peer allows no more."""
        stream_id = cast(int, self._conn.get_next_available_stream_id(unidirectional))
        self._check_stream_limit(stream_id, unidirectional)
        # An empty write creates the stream, so the next call allocates the next id.
        try:
            self._conn.send_stream_data(stream_id, b"", False)
        except ValueError as exc:
            if "limit" in str(exc):  # qh3: "Bidirectional stream limit 100 exceeded"
                raise StreamLimitError(str(exc)) from exc
            raise
        return stream_id

    def _check_stream_limit(self, stream_id: int, unidirectional: bool) -> None:
        """Engines that queue streams beyond the limit instead of refusing them check here."""
        return None

    def send_stream_data(self, stream_id: int, data: bytes | memoryview, end: bool) -> None:
        self._conn.send_stream_data(stream_id, data, end)

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        self._conn.reset_stream(stream_id, error_code)

    def stop_stream(self, stream_id: int, error_code: int) -> None:
        self._conn.stop_stream(stream_id, error_code)

    @abstractmethod
    def unsent_bytes(self, stream_id: int, written: int) -> int:
        """Bytes of ``stream_id`` queued in the engine and never transmitted yet.

        ``written`` is the stream offset the caller has handed to the engine so far.
        """

    # ------------------------------------------------------------------ connection

    def send_ping(self, uid: int) -> None:
        self._conn.send_ping(uid)

    def close(self, error_code: int, reason: str) -> None:
        """Application close (CONNECTION_CLOSE of type 0x1d) with our reason code."""
        self._conn.close(error_code=error_code, frame_type=None, reason_phrase=reason)

    @abstractmethod
    def smoothed_rtt(self) -> float | None: ...

    @abstractmethod
    def closing(self) -> tuple[int, int | None, str, bool] | None:
        """``(code, frame_type, reason, by_peer)`` once the connection is closing or draining.

        Both engines report ConnectionTerminated only after the closing period (3 PTO); the
        application should learn of a peer's CONNECTION_CLOSE at once.
        """


# ---------------------------------------------------------------------------------- qh3


class _Qh3Connection(EngineConnection):
    """qh3, with a fast path for the data plane's two hot calls.

    qh3's Python facade around its Rust core re-parses every packet header for its optional
    qlog and wraps each core call, which costs about as much CPU per datagram as building and
    encrypting it. Once the handshake is complete and no qlog is attached, the facade adds
    nothing else, so we call the core directly (measured in tests/benchmarks/test_bench_quic.py).
    Anything unexpected in qh3's internals turns the fast path off for good.
    """

    engine: EngineName = "qh3"
    fast_path_available: bool = True

    def peer_certificate_der(self) -> bytes | None:
        cert = self._conn.get_peercert()
        return None if cert is None else cast(bytes, cert.public_bytes())

    def _fast_core(self) -> Any:
        conn = self._conn
        if not self.fast_path_available:
            return None
        try:
            if conn._quic_logger is not None or not conn._handshake_complete:
                return None
            return conn._core
        except AttributeError:
            type(self).fast_path_available = False
            return None

    def receive_datagrams(self, datagrams: list[bytes], addr: Address, now: float) -> None:
        core = self._fast_core()
        if core is not None and datagrams:  # one datagram too: a sender's ACKs come one by one
            try:
                core.receive_many_datagrams(datagrams, addr, now)
            except RuntimeError as exc:
                raise self._error(exc) from exc
            self._conn._drain_core()
        elif len(datagrams) == 1:
            self._conn.receive_datagram(datagrams[0], addr, now)
        else:
            self._conn.receive_many_datagrams(datagrams, addr, now)

    def datagrams_to_send(self, now: float) -> list[Batch]:
        core = self._fast_core()
        if core is None:
            return super().datagrams_to_send(now)
        poll_transmit = core.poll_transmit
        batches: list[Batch] = []
        payloads: list[bytes] = []
        destination: Address | None = None
        try:
            while (transmit := poll_transmit(now)) is not None:  # (payload, address, ...)
                if transmit[1] != destination:
                    destination = transmit[1]
                    payloads = []
                    batches.append((payloads, transmit[1]))
                payloads.append(transmit[0])
        except RuntimeError as exc:
            raise self._error(exc) from exc
        return batches

    @staticmethod
    def _error(exc: RuntimeError) -> Exception:
        from qh3.quic.connection import QuicConnectionError
        from qh3.quic.packet import QuicErrorCode

        return QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc))

    def unsent_bytes(self, stream_id: int, written: int) -> int:
        return cast(int, self._conn.get_send_buffer_size(stream_id))

    def smoothed_rtt(self) -> float | None:
        core = self._conn._core  # no public accessor; diagnostics only
        return None if core is None else cast(float, core.smoothed_rtt)

    def closing(self) -> tuple[int, int | None, str, bool] | None:
        event = self._conn._close_event  # no public accessor
        if event is None:
            return None
        core = self._conn._core
        by_peer = core is not None and core.state == "draining"
        return event.error_code, event.frame_type, event.reason_phrase, by_peer


class _AioquicConnection(EngineConnection):
    engine: EngineName = "aioquic"
    draining_state: Any = None  # QuicConnectionState.DRAINING, set by AioquicEngine

    def peer_certificate_der(self) -> bytes | None:
        from cryptography.hazmat.primitives.serialization import Encoding

        tls = getattr(self._conn, "tls", None)
        cert = None if tls is None else tls._peer_certificate  # no public accessor
        return None if cert is None else cast(bytes, cert.public_bytes(Encoding.DER))

    def receive_datagrams(self, datagrams: list[bytes], addr: Address, now: float) -> None:
        receive = self._conn.receive_datagram
        for datagram in datagrams:
            receive(datagram, addr, now)

    def _check_stream_limit(self, stream_id: int, unidirectional: bool) -> None:
        # aioquic would queue the stream until MAX_STREAMS; refuse like qh3 does instead.
        conn = self._conn
        limit = conn._remote_max_streams_uni if unidirectional else conn._remote_max_streams_bidi
        if stream_id // 4 >= limit:
            kind = "Unidirectional" if unidirectional else "Bidirectional"
            raise StreamLimitError(f"{kind} stream limit {limit} exceeded")

    def unsent_bytes(self, stream_id: int, written: int) -> int:
        stream = self._conn._streams.get(stream_id)  # no public accessor
        if stream is None:
            return 0
        return max(0, written - cast(int, stream.sender.highest_offset))

    def smoothed_rtt(self) -> float | None:
        return cast(float, self._conn._loss._rtt_smoothed) or None

    def closing(self) -> tuple[int, int | None, str, bool] | None:
        event = self._conn._close_event  # no public accessor
        if event is None:
            return None
        by_peer = self._conn._state == self.draining_state
        return event.error_code, event.frame_type, event.reason_phrase, by_peer


# ---------------------------------------------------------------------------------- engines


class QuicEngine(ABC):
    """Builds :class:`EngineConnection` objects for one device identity."""

    name: EngineName

    def __init__(self, credentials: TlsCredentials, settings: TransportSettings) -> None:
        self.credentials = credentials
        self.settings = settings

    # Set by each engine's __init__: its QuicConnection class, the two configurations, its
    # events module and the EngineConnection subclass that wraps its connections.
    _connection_class: Any
    _client: Any
    _server: Any
    _events: Any
    _wrapper: type[EngineConnection]

    def create_client(self, max_datagram_size: int | None = None) -> EngineConnection:
        """A dialer connection (the caller pins the listener's certificate, see module doc).

        ``max_datagram_size`` overrides the settings' size for this connection's path."""
        configuration = _sized(self._client, max_datagram_size)
        return self._wrapper(self._connection_class(configuration=configuration), self._events)

    def create_server(
        self, original_destination_cid: bytes, max_datagram_size: int | None = None
    ) -> EngineConnection:
        """A listener connection for the Initial packet addressed to that connection id."""
        conn = self._connection_class(
            configuration=_sized(self._server, max_datagram_size),
            original_destination_connection_id=original_destination_cid,
        )
        return self._wrapper(conn, self._events)


class Qh3Engine(QuicEngine):
    name: EngineName = "qh3"
    _wrapper = _Qh3Connection

    def __init__(self, credentials: TlsCredentials, settings: TransportSettings) -> None:
        super().__init__(credentials, settings)
        from qh3.quic import events
        from qh3.quic.configuration import QuicConfiguration
        from qh3.quic.connection import QuicConnection

        self._events = events
        self._connection_class = QuicConnection
        quic_logger = logging.getLogger("quic")
        if not any(isinstance(f, _DemoteQh3PeerClose) for f in quic_logger.filters):
            quic_logger.addFilter(_DemoteQh3PeerClose())
        base = QuicConfiguration(
            alpn_protocols=[ALPN],
            connection_id_length=CONNECTION_ID_LENGTH,
            idle_timeout=settings.idle_timeout,
            max_data=settings.connection_window,
            max_stream_data=settings.stream_window,
            max_datagram_size=settings.max_datagram_size,
            # Our peers are pinned by fingerprint; there is no CA and no host name.
            verify_mode=ssl.CERT_NONE,
            verify_hostname=False,
        )
        self._client = replace(base, is_client=True)
        self._server = replace(base, is_client=False)
        # qh3 parses PEM only (its own Rust certificate and key types).
        self._server.load_cert_chain(credentials.certificate_pem, credentials.private_key_pem)


class AioquicEngine(QuicEngine):
    name: EngineName = "aioquic"
    _wrapper = _AioquicConnection

    def __init__(self, credentials: TlsCredentials, settings: TransportSettings) -> None:
        super().__init__(credentials, settings)
        from aioquic.quic import events
        from aioquic.quic.configuration import QuicConfiguration
        from aioquic.quic.connection import QuicConnection, QuicConnectionState
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        self._events = events
        self._connection_class = QuicConnection
        _AioquicConnection.draining_state = QuicConnectionState.DRAINING
        base = QuicConfiguration(
            alpn_protocols=[ALPN],
            congestion_control_algorithm=settings.congestion_control,
            connection_id_length=CONNECTION_ID_LENGTH,
            idle_timeout=settings.idle_timeout,
            max_data=settings.connection_window,
            max_stream_data=settings.stream_window,
            max_datagram_size=settings.max_datagram_size,
            verify_mode=ssl.CERT_NONE,
        )
        self._client = replace(base, is_client=True)
        self._server = replace(base, is_client=False)
        self._server.certificate = x509.load_pem_x509_certificate(credentials.certificate_pem)
        self._server.private_key = load_pem_private_key(credentials.private_key_pem, None)


def _sized(configuration: Any, max_datagram_size: int | None) -> Any:
    """The shared configuration, or a copy with another datagram size (both libraries' are
    dataclasses; the copy keeps the loaded certificate)."""
    if max_datagram_size is None or max_datagram_size == configuration.max_datagram_size:
        return configuration
    return replace(configuration, max_datagram_size=max_datagram_size)


def _group(datagrams: list[tuple[bytes, Address]]) -> list[Batch]:
    batches: list[Batch] = []
    destination: Address | None = None
    payloads: list[bytes] = []
    for payload, address in datagrams:
        if address != destination:
            destination = address
            payloads = []
            batches.append((payloads, address))
        payloads.append(payload)
    return batches


_ENGINE_CLASSES: Final[dict[str, type[QuicEngine]]] = {
    "qh3": Qh3Engine,
    "aioquic": AioquicEngine,
}


def engine_name(name: str | None = None) -> EngineName:
    """The engine to use: ``name`` if given, else env ``MESHAGENT_QUIC_ENGINE``, else qh3."""
    chosen = (name or os.environ.get(ENGINE_ENV) or DEFAULT_ENGINE).strip().lower()
    if chosen not in _ENGINE_CLASSES:
        raise EngineError(f"unknown QUIC engine {chosen!r} (choose one of: {', '.join(ENGINES)})")
    return cast(EngineName, chosen)


def create_engine(
    credentials: TlsCredentials,
    settings: TransportSettings | None = None,
    name: str | None = None,
) -> QuicEngine:
    chosen = engine_name(name)
    try:
        return _ENGINE_CLASSES[chosen](credentials, settings or TransportSettings())
    except ImportError as exc:
        raise EngineError(f"QUIC engine {chosen!r} is not installed: {exc}") from exc
