"""WebRTC DataChannels as a second transport for the one session protocol (aiortc).

A :class:`DataChannelConnection` gives a :class:`~.session.MeshSession` what a QUIC
:class:`~.connection.PeerConnection` gives it (:class:`~.transport.Transport`): streams that are
:class:`~.streams.PeerStream` objects, with the same receive credit and send backpressure, so
framing, handshake, tokens, transfers and terminals run unchanged. Only the carriage differs:

- **One ordered, reliable DataChannel per stream**, label ``mesh-stream/<id>``, subprotocol
  ``meshagent/1``. Ids follow QUIC's numbering (the dialer's streams are 0, 4, 8, ..., the
  listener's 1, 5, 9, ...), so neither side waits for the other to pick one.
- **Binary messages are stream bytes** (any split; the session's frames are re-assembled from
  them). **Text messages are the stream's transport records**, in order with the bytes:
  ``fin`` (end of our direction: QUIC's FIN), ``reset <code>`` (RESET_STREAM), ``stop <code>``
  (STOP_SENDING) and ``credit <limit>`` (our control stream's CREDIT record). DataChannels have
  no half-close and no flow control tied to reading (neither aiortc nor browsers stop the peer
  when the page stops reading), hence these records. A channel is closed once both directions
  ended; a channel that closes earlier ends both directions (``GOING_AWAY``).
- **Backpressure**: a write waits while ``bufferedAmount`` (plus what waits for the channel to
  open) exceeds ``max_unsent``, and is woken by the ``bufferedamountlow`` event
  (``bufferedAmountLowThreshold`` = half of it): SCTP's congestion window drains the buffer.
- **One control channel** ``mesh-control``, made by the dialer before its offer (so the SDP
  has its data section): ``ping <n>`` / ``pong <n>`` and ``close <code> <reason>`` (QUIC's
  CONNECTION_CLOSE with its application code).

Identity: each side's DTLS certificate *is* its identity. An agent presents its device
certificate (so its DTLS fingerprint is its device id); a browser session enrols with the
SHA-256 fingerprint of its ``RTCCertificate`` as its device id. After DTLS, the fingerprint of
the certificate the peer actually presented (not what its SDP claims) is its peer id: the
dialer requires the device it meant to reach (``PEER_ID_MISMATCH``), the listener hands it to
the token validator, which requires ``sub`` = that id and ``cnf`` = its fingerprint, exactly as
for a QUIC peer. DTLS has already proved the peer holds the certificate's key.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import re
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Final

from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceCandidate,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
)
from aiortc.exceptions import InvalidStateError
from aiortc.rtcdtlstransport import RTCCertificate
from aiortc.sdp import candidate_from_sdp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshagent_gui.core.mesh.types import TurnCredentials

from . import auth
from .candidates import MAX_PEER_CANDIDATES, canonical_ip, same_host
from .candidates import Candidate as WireCandidate
from .engine import Address
from .errors import (
    CloseCode,
    CloseInfo,
    P2PError,
    StreamLimitError,
)
from .streams import FlowControlViolation, PeerStream
from .transport import PeerStreamIds, TransportBase, consume_exception

log = logging.getLogger(__name__)

PROTOCOL: Final = "meshagent/1"  # the DataChannel subprotocol, like QUIC's ALPN
CONTROL_LABEL: Final = "mesh-control"
STREAM_LABEL: Final = "mesh-stream/"
MAX_RECORD_CHARS: Final = 1100  # a close record's reason is at most 1024 characters
MAX_REASON: Final = 1024
GOING_AWAY: Final = 0x04  # the protocol's ErrorCode.GOING_AWAY (stream ended under us)
_MAX_ID: Final = 2**62 - 1
_RECORD: Final = re.compile(r"(fin|reset|stop|credit|ping|pong|close)(?: (\d{1,19}))?(?: (.*))?")
_STREAM_ID: Final = re.compile(r"\d{1,19}")
_FINGERPRINT: Final = re.compile(r"^a=fingerprint:sha-256 ([0-9A-Fa-f:]{95})\s*$", re.M)


class WebRTCState(enum.Enum):
    CONNECTING = "connecting"  # ICE, DTLS, SCTP, the control channel
    AUTHORIZING = "authorizing"  # listener: the peer is verified, the session handshake runs
    ESTABLISHED = "established"
    CLOSED = "closed"


@dataclass(frozen=True)
class WebRTCSettings:
    stream_window: int = 4 * 1024 * 1024
    """Unread bytes a peer may send on one stream (past the initial credit)."""
    max_unsent: int = 1024 * 1024
    """Bytes one stream may queue in its DataChannel (``bufferedAmount``) before writes wait."""
    max_message: int = 64 * 1024
    """Largest binary message we send: every WebRTC stack accepts 64 KiB (RFC 8841 6)."""
    max_streams: int = 128
    """Streams the peer may have open at once (more closes the connection, as QUIC's limit)."""
    close_linger: float = 1.0
    """How long a close waits for its ``close`` record to leave before tearing down."""


@dataclass(frozen=True)
class WebRTCStats:
    remote_address: Address
    bytes_received: int  # DTLS datagrams' bytes, as QUIC counts UDP's
    bytes_sent: int
    datagrams_received: int
    datagrams_sent: int
    smoothed_rtt: float | None  # of our pings


class _Pipe:
    """One stream's DataChannel and what the connection tracks of it."""

    __slots__ = (
        "channel",
        "finished",
        "pending",
        "pending_bytes",
        "received_end",
        "sent_end",
        "stream",
    )

    def __init__(self, channel: RTCDataChannel, stream: PeerStream) -> None:
        self.channel = channel
        self.stream = stream
        self.pending: deque[bytes | str] = deque()  # written before the channel opened
        self.pending_bytes = 0
        self.received_end = False  # the peer's fin or reset arrived
        self.sent_end = False  # our fin or reset went out
        self.finished = False

    def send(self, message: bytes | str) -> None:
        if self.pending or self.channel.readyState == "connecting":
            self.pending.append(message)
            if isinstance(message, bytes):
                self.pending_bytes += len(message)
            return
        with contextlib.suppress(InvalidStateError):  # closing: its close event ends the stream
            self.channel.send(message)

    def flush(self) -> None:
        while self.pending:
            self.channel.send(self.pending.popleft())
        self.pending_bytes = 0

    @property
    def unsent(self) -> int:
        return self.channel.bufferedAmount + self.pending_bytes


class DataChannelConnection(TransportBase):
    """A WebRTC peer connection whose far end is a verified device; a :class:`Transport`.

    Made around an :class:`RTCPeerConnection` before the offer/answer exchange (the dialer's
    control channel must be in its offer); :meth:`wait_connected` then verifies the peer's DTLS
    certificate. The listener runs the session handshake on the first stream
    (:meth:`wait_first_stream`, :meth:`hand_first_stream`) and calls :meth:`establish` when it
    admits the peer: until then the peer's other streams are held with the initial credit only.
    """

    def __init__(
        self,
        pc: RTCPeerConnection,
        *,
        is_dialer: bool,
        expected_peer_id: str | None = None,
        settings: WebRTCSettings | None = None,
    ) -> None:
        super().__init__()
        self.pc = pc
        self.is_dialer = is_dialer
        self._expected_peer_id = expected_peer_id
        self._settings = settings or WebRTCSettings()
        self._loop = asyncio.get_running_loop()
        self._state = WebRTCState.CONNECTING
        self._pipes: dict[int, _Pipe] = {}
        self._next_stream = 0 if is_dialer else 1
        self._peer_parity = 1 if is_dialer else 0
        # Channels announce themselves on their own SCTP streams, so two may arrive in either
        # order; a jump past what max_streams could explain is refused (as QUIC's stream limit).
        self._peer_streams = PeerStreamIds(max_gap=4 * self._settings.max_streams)
        self._first_stream: asyncio.Future[PeerStream] = self._loop.create_future()
        self._authorize_stream: PeerStream | None = None
        self._control: RTCDataChannel | None = None
        self._control_open: asyncio.Future[None] = self._loop.create_future()
        self._rtt: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.bytes_received = 0
        self.bytes_sent = 0
        for future in (self._first_stream, self._control_open):
            future.add_done_callback(consume_exception)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_connection_state)
        if is_dialer:
            self._adopt_control(
                pc.createDataChannel(CONTROL_LABEL, ordered=True, protocol=PROTOCOL)
            )

    def __repr__(self) -> str:
        role = "dialer" if self.is_dialer else "listener"
        return f"<DataChannelConnection {role} {self._state.value}>"

    # ------------------------------------------------------------------ Transport

    @property
    def state(self) -> WebRTCState:
        return self._state

    @property
    def remote_address(self) -> Address:
        """The remote ICE candidate in use (diagnostics only)."""
        try:
            # aiortc has no public "selected pair"; aioice's nominated pair is the one in use.
            ice = self.pc.sctp.transport.transport  # type: ignore[union-attr]
            pair = next(iter(ice._connection._nominated.values()))
            return (str(pair.remote_candidate.host), int(pair.remote_candidate.port))
        except (AttributeError, StopIteration, TypeError, ValueError):
            return ("0.0.0.0", 0)

    async def open_stream(self) -> PeerStream:
        """A new stream: its DataChannel opens at once; what is written before it is open waits
        (counted as unsent, so backpressure holds meanwhile)."""
        self._raise_if_not_usable()
        local = sum(1 for sid in self._pipes if sid % 4 == self._next_stream % 4)
        if local >= self._settings.max_streams:
            raise StreamLimitError("the peer allows no more concurrent streams")
        stream_id = self._next_stream
        self._next_stream += 4
        channel = self.pc.createDataChannel(
            f"{STREAM_LABEL}{stream_id}", ordered=True, protocol=PROTOCOL
        )
        stream = self._new_stream(stream_id, local=True)
        self._adopt(channel, stream)
        return stream

    async def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time of one ``ping`` record on the control channel, in seconds."""
        self._raise_if_not_usable()
        rtt = await self._pings.measure(lambda uid: self._send_control(f"ping {uid}"), timeout)
        self._rtt = rtt if self._rtt is None else 0.875 * self._rtt + 0.125 * rtt
        return rtt

    def close(self, code: int = CloseCode.NO_ERROR, reason: str = "") -> None:
        """Close the connection (a ``close`` record, then ICE/DTLS/SCTP); returns at once."""
        if self._close_info is not None:
            return
        self._send_control(f"close {int(code)} {reason[:MAX_REASON]}")
        self._mark_closed(CloseInfo(int(code), reason, by_peer=False, application=True))
        self._spawn(self._teardown(linger=self._settings.close_linger))

    async def aclose(self) -> None:
        """Close, and wait until the peer connection and every task of ours has ended."""
        self.close()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def stats(self) -> WebRTCStats:
        counters = (0, 0, 0, 0)
        with contextlib.suppress(AttributeError, StopIteration, TypeError):
            dtls = self.pc.sctp.transport  # type: ignore[union-attr]
            report = next(iter(dtls._get_stats().values()))  # its one RTCTransportStats
            counters = (
                report.bytesReceived,
                report.bytesSent,
                report.packetsReceived,
                report.packetsSent,
            )
        return WebRTCStats(self.remote_address, *counters, smoothed_rtt=self._rtt)

    # ------------------------------------------------------------------ connection setup

    async def wait_connected(self, timeout: float) -> str:
        """Wait for the control channel (ICE, DTLS and SCTP are up), then verify the peer's
        DTLS certificate; its SHA-256 fingerprint (hex) is the peer id, returned.

        A dialer requires the device it meant to reach (else ``PEER_ID_MISMATCH``)."""
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._control_open)
        except TimeoutError:
            self.close(CloseCode.AUTH_TIMEOUT, "no WebRTC connection in time")
            raise
        try:
            presented = remote_fingerprint(self.pc)
        except P2PError as exc:
            self.close(CloseCode.AUTH_FAILED, str(exc))
            raise self._closed_error or exc from None
        expected = self._expected_peer_id
        if expected is not None and presented != expected:
            self.close(CloseCode.PEER_ID_MISMATCH, "DTLS certificate is not the expected device")
            assert self._closed_error is not None
            raise self._closed_error
        self._peer_id = presented
        if self.is_dialer:
            # The listener's verdict is the session handshake that follows (MeshSession.dial).
            self._establish()
        elif self._state is WebRTCState.CONNECTING:
            self._state = WebRTCState.AUTHORIZING
        return presented

    async def wait_first_stream(self) -> PeerStream:
        """Listener: the dialer's first stream (id 0), which carries the session handshake."""
        return await asyncio.shield(self._first_stream)

    def hand_first_stream(self, stream: PeerStream) -> None:
        """The session handshake takes the first stream: accepted, never delivered."""
        self._authorize_stream = stream
        stream.on_accepted()

    def establish(self) -> None:
        """Listener: the peer is admitted; its held streams become visible."""
        if self._closed_error is not None:
            raise self._closed_error
        if self._peer_id is None:
            raise P2PError("establish() before the peer was verified")
        self._establish()

    def _establish(self) -> None:
        self._state = WebRTCState.ESTABLISHED
        self._incoming.release_held(keep_back=self._authorize_stream)

    # ------------------------------------------------------------------ StreamOwner

    def stream_send(self, stream_id: int, data: bytes | memoryview, end: bool) -> None:
        pipe = self._pipes.get(stream_id)
        if pipe is None or self._close_info is not None:
            return
        size = len(data)
        step = self._settings.max_message
        if size:
            self.bytes_sent += size
            if size <= step and isinstance(data, bytes):
                pipe.send(data)
            else:
                view = memoryview(data)
                for offset in range(0, size, step):
                    pipe.send(bytes(view[offset : offset + step]))  # aiortc takes bytes only
        if end:
            pipe.sent_end = True
            pipe.send("fin")

    def stream_unsent(self, stream_id: int, written: int) -> int:
        pipe = self._pipes.get(stream_id)
        if pipe is None or self._close_info is not None:
            return 0
        return pipe.unsent

    def stream_grant(self, stream_id: int, limit: int) -> None:
        pipe = self._pipes.get(stream_id)
        if pipe is not None and self._close_info is None:
            pipe.send(f"credit {limit}")

    def stream_reset(self, stream_id: int, error_code: int) -> None:
        pipe = self._pipes.get(stream_id)
        if pipe is not None and self._close_info is None and not pipe.sent_end:
            pipe.sent_end = True
            pipe.send(f"reset {_code(error_code)}")

    def stream_stop(self, stream_id: int, error_code: int) -> None:
        pipe = self._pipes.get(stream_id)
        if pipe is not None and self._close_info is None:
            pipe.send(f"stop {_code(error_code)}")

    def stream_blocked(self, stream: PeerStream, blocked: bool) -> None:
        pipe = self._pipes.get(stream.stream_id)
        if pipe is None:
            return
        half = self._settings.max_unsent // 2
        # A writer waits for the buffer to fall to half; a drain (or a wait for credit, which
        # on_credit wakes) for it to empty: the low event fires only when its threshold is
        # crossed, so the threshold follows what the blocked writer waits for.
        low = 0 if blocked and pipe.unsent <= half else half
        pipe.channel.bufferedAmountLowThreshold = low

    def stream_finished(self, stream_id: int) -> None:
        pipe = self._pipes.get(stream_id)
        if pipe is not None and not pipe.finished:
            pipe.finished = True
            # Both directions ended: free the SCTP stream. Data queued before the close still
            # reaches the peer first (the stream reset follows the last TSN, RFC 8831 6.7).
            pipe.channel.close()

    # ------------------------------------------------------------------ channels

    def _new_stream(self, stream_id: int, *, local: bool) -> PeerStream:
        return PeerStream(
            self,
            stream_id,
            window=self._settings.stream_window,
            max_unsent=self._settings.max_unsent,
            local=local,
        )

    def _adopt(self, channel: RTCDataChannel, stream: PeerStream) -> _Pipe:
        pipe = _Pipe(channel, stream)
        self._pipes[stream.stream_id] = pipe
        channel.bufferedAmountLowThreshold = self._settings.max_unsent // 2
        channel.on("message", lambda message: self._on_stream_message(pipe, stream, message))
        channel.on("open", lambda: self._on_stream_open(pipe, stream))
        channel.on("close", lambda: self._on_stream_close(pipe, stream))
        channel.on("bufferedamountlow", stream.on_send_progress)
        return pipe

    def _adopt_control(self, channel: RTCDataChannel) -> None:
        self._control = channel
        channel.on("message", self._on_control_message)
        channel.on("close", self._on_control_close)
        if channel.readyState == "open":
            self._on_control_open()
        else:
            channel.on("open", self._on_control_open)

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if self._close_info is not None:
            channel.close()
            return
        if channel.protocol != PROTOCOL or not channel.ordered or _unreliable(channel):
            self._protocol_error(f"a data channel that is not {PROTOCOL}, ordered and reliable")
            return
        if channel.label == CONTROL_LABEL:
            if self.is_dialer or self._control is not None:
                self._protocol_error("a second control channel")
                return
            self._adopt_control(channel)
            return
        stream_id = _stream_id(channel.label)
        if stream_id is None or stream_id % 4 != self._peer_parity:
            self._protocol_error(f"a data channel with a bad label {channel.label[:40]!r}")
            return
        if self._control is None:
            self._protocol_error("a stream before the control channel")
            return
        if not self._peer_streams.is_new(stream_id):
            self._protocol_error(f"stream {stream_id} opened twice")
            return
        peer_open = sum(1 for sid in self._pipes if sid % 4 == self._peer_parity)
        if peer_open >= self._settings.max_streams:
            self._protocol_error("too many concurrent streams")
            return
        stream = self._new_stream(stream_id, local=False)
        self._adopt(channel, stream)
        if self._state is WebRTCState.ESTABLISHED:
            self._incoming.deliver(stream)
        else:
            self._incoming.hold(stream)
            if stream_id == 0 and not self.is_dialer and not self._first_stream.done():
                self._first_stream.set_result(stream)

    def _on_stream_open(self, pipe: _Pipe, stream: PeerStream) -> None:
        try:
            pipe.flush()
        except InvalidStateError:
            return  # it closed right away; its close event ends the stream
        stream.on_send_progress()

    def _on_stream_message(self, pipe: _Pipe, stream: PeerStream, message: bytes | str) -> None:
        if self._close_info is not None:
            return
        if isinstance(message, bytes):
            if pipe.received_end:
                self._protocol_error(f"stream {stream.stream_id}: data after its end")
                return
            self.bytes_received += len(message)
            try:
                stream.on_data(message, False)
            except FlowControlViolation as exc:
                self.close(CloseCode.FLOW_CONTROL_ERROR, str(exc))
            return
        record = _parse_record(message)
        if record is None:
            self._protocol_error(f"stream {stream.stream_id}: a malformed record")
            return
        verb, number, _ = record
        if verb in ("fin", "reset") and pipe.received_end:
            self._protocol_error(f"stream {stream.stream_id}: {verb} after its end")
        elif verb == "fin" and number is None:
            pipe.received_end = True
            stream.on_data(b"", True)
        elif verb == "reset" and number is not None:
            pipe.received_end = True
            stream.on_reset(number)
        elif verb == "stop" and number is not None:
            stream.on_stop_sending(number)
        elif verb == "credit" and number is not None:
            stream.on_credit(number)
        else:
            self._protocol_error(f"stream {stream.stream_id}: unexpected {verb!r}")

    def _on_stream_close(self, pipe: _Pipe, stream: PeerStream) -> None:
        self._pipes.pop(stream.stream_id, None)
        if self._close_info is not None or pipe.finished:
            return
        # The peer closed the channel before both directions ended: a reset both ways.
        if not pipe.received_end:
            pipe.received_end = True
            stream.on_reset(GOING_AWAY)
        if not pipe.sent_end:
            pipe.sent_end = True
            stream.on_stop_sending(GOING_AWAY)

    # ------------------------------------------------------------------ control channel

    def _on_control_open(self) -> None:
        if not self._control_open.done():
            self._control_open.set_result(None)

    def _on_control_message(self, message: bytes | str) -> None:
        if self._close_info is not None:
            return
        record = _parse_record(message) if isinstance(message, str) else None
        if record is None:
            self._protocol_error("a malformed control record")
            return
        verb, number, rest = record
        if verb == "ping" and number is not None:
            self._send_control(f"pong {number}")
        elif verb == "pong" and number is not None:
            self._pings.answered(number)
        elif verb == "close" and number is not None:
            self._mark_closed(CloseInfo(number, rest or "", by_peer=True, application=True))
            self._spawn(self._teardown(linger=0.0))
        else:
            self._protocol_error(f"unexpected control record {verb!r}")

    def _on_control_close(self) -> None:
        if self._close_info is None:
            self._mark_closed(
                CloseInfo(0, "control channel closed", by_peer=True, application=False)
            )
            self._spawn(self._teardown(linger=0.0))

    def _send_control(self, text: str) -> None:
        control = self._control
        if control is not None and control.readyState == "open":
            with contextlib.suppress(InvalidStateError):
                control.send(text)

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        if state in ("failed", "closed") and self._close_info is None:
            self._mark_closed(
                CloseInfo(0, f"WebRTC connection {state}", by_peer=True, application=False)
            )
            self._spawn(self._teardown(linger=0.0))

    # ------------------------------------------------------------------ closing

    def _protocol_error(self, reason: str) -> None:
        log.info("closing WebRTC connection: %s", reason)
        self.close(CloseCode.PROTOCOL_ERROR, reason)

    def _raise_if_not_usable(self) -> None:
        if self._closed_error is not None:
            raise self._closed_error
        if self._state is not WebRTCState.ESTABLISHED and not (
            self._state is WebRTCState.AUTHORIZING and not self.is_dialer
        ):
            raise RuntimeError(f"connection is {self._state.value}, not established")

    def _mark_closed(self, info: CloseInfo) -> None:
        error = self._begin_close(info, admitted=self._state is WebRTCState.ESTABLISHED)
        if error is None:
            return
        self._state = WebRTCState.CLOSED
        for future in (self._first_stream, self._control_open):
            if not future.done():
                future.set_exception(error)
        for pipe in list(self._pipes.values()):
            pipe.pending.clear()
            pipe.pending_bytes = 0
            pipe.stream.on_connection_closed(error)
        self._end_close(error)

    async def _teardown(self, *, linger: float) -> None:
        control = self._control
        if linger and control is not None and control.readyState == "open":
            # Give the close record a moment to leave: pc.close() aborts SCTP at once.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(linger):
                    if control.bufferedAmount:
                        drained = asyncio.Event()
                        control.bufferedAmountLowThreshold = 0
                        control.on("bufferedamountlow", drained.set)
                        await drained.wait()
                    await asyncio.sleep(0.05)  # handed to SCTP; let the packet leave
        await self.pc.close()

    def _spawn(self, coroutine: Any) -> None:
        task: asyncio.Task[None] = self._loop.create_task(coroutine, name="webrtc-teardown")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


# ---------------------------------------------------------------------- identity


def rtc_certificate(credentials: auth.DeviceCredentials) -> RTCCertificate:
    """The device certificate and key as aiortc's DTLS certificate: our DTLS fingerprint is
    then our device id."""
    cert = x509.load_pem_x509_certificate(credentials.certificate_pem)
    key = serialization.load_pem_private_key(credentials.private_key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the device key is not an EC key")
    return RTCCertificate(key=key, cert=cert)


def new_peer_connection(
    certificate: RTCCertificate,
    *,
    stun: tuple[str, int] | None = None,
    turn: TurnCredentials | None = None,
    relay_only: bool = False,
) -> RTCPeerConnection:
    """An RTCPeerConnection that presents ``certificate`` in DTLS and asks only ``stun``
    (the Mesh Server's STUN) for its reflexive address: never aiortc's default public STUN.
    ``turn``: the deployment's TURN servers with credentials the Mesh Server minted (a relayed
    candidate for peers that reach each other no other way). ``relay_only``: that candidate
    alone (ICE policy ``relay``), when direct paths are blocked."""
    servers = [RTCIceServer(urls=f"stun:{_host_for_url(stun[0])}:{stun[1]}")] if stun else []
    if turn is not None:
        servers.append(
            RTCIceServer(urls=list(turn.urls), username=turn.username, credential=turn.password)
        )
    policy = RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL
    pc = RTCPeerConnection(RTCConfiguration(iceServers=servers, iceTransportPolicy=policy))
    # aiortc has no API to choose the certificate (browsers take one in the configuration);
    # it makes one at construction and uses it for every transport made later.
    pc._RTCPeerConnection__certificates = [certificate]  # type: ignore[attr-defined]
    return pc


def certificate_fingerprint(certificate: RTCCertificate) -> str:
    """The SHA-256 fingerprint of a DTLS certificate as a device id (lowercase hex)."""
    for fingerprint in certificate.getFingerprints():
        if fingerprint.algorithm == "sha-256":
            return fingerprint.value.replace(":", "").lower()
    raise ValueError("no sha-256 fingerprint")  # pragma: no cover - aiortc always has one


def remote_fingerprint(pc: RTCPeerConnection) -> str:
    """The SHA-256 fingerprint (hex) of the certificate the peer presented in the DTLS
    handshake: what DTLS proved, not what the SDP claims (aiortc checks those match too)."""
    sctp = pc.sctp
    dtls = sctp.transport if sctp is not None else None
    ssl = getattr(dtls, "_ssl", None)  # aiortc keeps the pyOpenSSL connection private
    if dtls is None or dtls.state != "connected" or ssl is None:
        raise P2PError("the DTLS handshake is not complete")
    certificate = ssl.get_peer_certificate(as_cryptography=True)
    if certificate is None:
        raise P2PError("the peer presented no DTLS certificate")
    digest: bytes = certificate.fingerprint(hashes.SHA256())
    return digest.hex()


def sdp_fingerprints(sdp: str) -> set[str]:
    """The sha-256 fingerprints an SDP claims, as device ids (lowercase hex)."""
    return {m.group(1).replace(":", "").lower() for m in _FINGERPRINT.finditer(sdp)}


# ---------------------------------------------------------------------- candidates


class CandidateBudget:
    """Which of a peer's ICE candidates we let aiortc check (send STUN packets to).

    The same rules as the QUIC path's offers (candidates.py): at most
    :data:`MAX_PEER_CANDIDATES` per attempt (in the SDP and trickled together), UDP only, no
    link-local, multicast or unspecified address, loopback only when the peer is on this
    machine; mDNS names (``<uuid>.local``, what browsers put for host addresses) are kept for
    aioice to resolve. Read only once the offer's token checked out.
    """

    def __init__(self, own: Collection[str]) -> None:
        self._own = own
        self._used = 0
        self._hosts: list[WireCandidate] = []

    def admit(self, candidate: RTCIceCandidate) -> bool:
        if self._used >= MAX_PEER_CANDIDATES or candidate.protocol.lower() != "udp":
            return False
        address = candidate.ip
        if _MDNS.fullmatch(address or ""):
            self._used += 1
            return True
        try:
            kind = "host" if candidate.type == "host" else "srflx"
            wire = WireCandidate.from_wire(
                {"kind": kind, "address": address, "port": candidate.port}
            )
        except ValueError:
            return False
        self._used += 1
        if ipaddress.ip_address(canonical_ip(wire.address)).is_loopback:
            return same_host(self._hosts, self._own)
        if kind == "host":
            self._hosts.append(wire)
        return True

    def filter_sdp(self, sdp: str) -> str:
        """``sdp`` with the candidates we refuse left out (host ones first decide same-host)."""
        lines = sdp.splitlines()
        parsed: dict[int, RTCIceCandidate | None] = {}
        for index, line in enumerate(lines):
            if line.startswith("a=candidate:"):
                parsed[index] = parse_candidate(line[2:])
        # Non-loopback host candidates first, so the same-host rule sees all of them.
        order = sorted(parsed, key=lambda i: _loopback(parsed[i]))
        keep = {i for i in order if (c := parsed[i]) is not None and self.admit(c)}
        return (
            "\r\n".join(line for i, line in enumerate(lines) if i not in parsed or i in keep)
            + "\r\n"
        )


_MDNS: Final = re.compile(r"[0-9a-fA-F-]{1,64}\.local")


def parse_candidate(text: str) -> RTCIceCandidate | None:
    """An ICE candidate line (``candidate:...``, as in SDP or a trickled candidate), or None."""
    body = text.removeprefix("candidate:")
    if len(body) > 512:
        return None
    try:
        return candidate_from_sdp(body)
    except (AssertionError, ValueError, IndexError):
        return None


def _loopback(candidate: RTCIceCandidate | None) -> bool:
    if candidate is None:
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(candidate.ip).is_loopback
    return False


# ---------------------------------------------------------------------- records


def _parse_record(text: str) -> tuple[str, int | None, str | None] | None:
    if len(text) > MAX_RECORD_CHARS:
        return None
    match = _RECORD.fullmatch(text)
    if match is None:
        return None
    verb, number, rest = match.groups()
    value = int(number) if number is not None else None
    if value is not None and value > _MAX_ID:
        return None
    if rest is not None and verb != "close":
        return None
    return verb, value, rest


def _stream_id(label: str) -> int | None:
    if not label.startswith(STREAM_LABEL):
        return None
    digits = label[len(STREAM_LABEL) :]
    if not _STREAM_ID.fullmatch(digits) or (digits != "0" and digits.startswith("0")):
        return None
    value = int(digits)
    return value if value <= _MAX_ID else None


def _unreliable(channel: RTCDataChannel) -> bool:
    return channel.maxRetransmits is not None or channel.maxPacketLifeTime is not None


def _code(error_code: int) -> int:
    return error_code if 0 <= error_code <= _MAX_ID else int(CloseCode.INTERNAL_ERROR)


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
