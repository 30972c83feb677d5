"""One authenticated QUIC connection to a peer device, driven by the endpoint.

The connection is the glue between an :class:`~meshagent_gui.core.p2p.engine.EngineConnection`
(sans-IO QUIC) and the application: it turns engine events into stream data, runs the identity
exchange on the control streams (auth.py, control.py), keeps one loop timer for the engine's
timer and our keepalive, and transmits through the endpoint's socket.

Life of a connection (the transition table is :data:`TRANSITIONS`)::

    dialer:   HANDSHAKING -> AUTHENTICATING -> ESTABLISHED
              (pinned cert ok)  (proof sent, ACCEPTED received)
    listener: HANDSHAKING -> AUTHENTICATING -> AUTHORIZING -> ESTABLISHED
              (TLS done)       (proof verified)  (``authorize`` hook accepted the first stream)
    any state -> CLOSED

Nothing the peer sends is acted on before ESTABLISHED: its streams are held (with only the
initial credit) until then, and the peer id is not exposed until it is verified.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final, Protocol

from meshagent_gui.core.p2p import auth, control
from meshagent_gui.core.p2p.engine import (
    Address,
    Batch,
    EngineConnection,
    EngineName,
    TransportSettings,
)
from meshagent_gui.core.p2p.errors import (
    CloseCode,
    CloseInfo,
    ConnectionClosedError,
    StreamLimitError,
)
from meshagent_gui.core.p2p.streams import FlowControlViolation, PeerStream
from meshagent_gui.core.p2p.transport import (
    PeerStreamIds,
    TransportBase,
    consume_exception,
)
from meshagent_gui.identity import fingerprint


class ConnectionHost(Protocol):
    """What a connection needs of the endpoint that drives it (the endpoint is one; injected so
    this module does not import the endpoint, which imports it)."""

    def transmit(self, batches: list[Batch]) -> int: ...
    def add_connection_id(self, conn: PeerConnection, connection_id: bytes) -> None: ...
    def remove_connection_id(self, conn: PeerConnection, connection_id: bytes) -> None: ...
    def connection_moved(self, conn: PeerConnection, addr: Address) -> None: ...
    def forget(self, conn: PeerConnection) -> None: ...


class ConnectionSettings(Protocol):
    """The endpoint settings a connection reads (EndpointSettings has them)."""

    @property
    def transport(self) -> TransportSettings: ...
    @property
    def max_unsent(self) -> int: ...
    @property
    def keepalive_interval(self) -> float | None: ...


log = logging.getLogger(__name__)

# Stream ids (RFC 9000 2.1): the low bit is the initiator, the next one the direction.
DIALER_CONTROL_STREAM: Final = 2
LISTENER_CONTROL_STREAM: Final = 3
FIRST_STREAM: Final = 0  # the dialer's first bidirectional stream: the application handshake
_SMALL_WRITE: Final = 1200  # at most one packet's worth


class ConnectionState(enum.Enum):
    HANDSHAKING = "handshaking"
    AUTHENTICATING = "authenticating"
    AUTHORIZING = "authorizing"
    ESTABLISHED = "established"
    CLOSED = "closed"


TRANSITIONS: Final[dict[ConnectionState, frozenset[ConnectionState]]] = {
    ConnectionState.HANDSHAKING: frozenset(
        {ConnectionState.AUTHENTICATING, ConnectionState.CLOSED}
    ),
    ConnectionState.AUTHENTICATING: frozenset(
        {ConnectionState.AUTHORIZING, ConnectionState.ESTABLISHED, ConnectionState.CLOSED}
    ),
    ConnectionState.AUTHORIZING: frozenset({ConnectionState.ESTABLISHED, ConnectionState.CLOSED}),
    ConnectionState.ESTABLISHED: frozenset({ConnectionState.CLOSED}),
    ConnectionState.CLOSED: frozenset(),
}


@dataclass(frozen=True)
class ConnectionStats:
    engine: EngineName
    remote_address: Address
    datagrams_received: int
    datagrams_sent: int
    bytes_received: int
    bytes_sent: int
    smoothed_rtt: float | None


class PeerConnection(TransportBase):
    """A QUIC connection whose far end is a verified device. Created by the endpoint."""

    def __init__(
        self,
        endpoint: ConnectionHost,
        engine_connection: EngineConnection,
        *,
        is_dialer: bool,
        remote_address: Address,
        settings: ConnectionSettings,
        credentials: auth.DeviceCredentials,
        expected_peer_id: str | None = None,
    ) -> None:
        super().__init__()
        self._endpoint = endpoint
        self._engine = engine_connection
        self._loop = asyncio.get_running_loop()
        self.is_dialer = is_dialer
        self.remote_address: Address = remote_address
        self._settings = settings
        self._credentials = credentials
        self._local_id = credentials.device_id
        self._expected_peer_id = expected_peer_id
        self._state = ConnectionState.HANDSHAKING
        self._handshake_done = False
        # control streams and the identity exchange
        self._control_stream: int | None = None
        self._peer_control_stream = LISTENER_CONTROL_STREAM if is_dialer else DIALER_CONTROL_STREAM
        self._decoder = control.RecordDecoder()
        self._nonce: bytes | None = None  # listener: ours; dialer: the listener's
        self._pending_proof: control.Proof | None = None
        self._proof_sent = False
        self._authenticated: asyncio.Future[str] = self._loop.create_future()
        self._established: asyncio.Future[None] = self._loop.create_future()
        # streams
        self._streams: dict[int, PeerStream] = {}
        self._peer_streams = PeerStreamIds()
        self._first_stream: asyncio.Future[PeerStream] = self._loop.create_future()
        self._authorize_stream: PeerStream | None = None
        self._blocked_writers: set[PeerStream] = set()
        # lifetime
        self._terminated = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._flush_scheduled = False
        self._processing = False
        self._keepalive = settings.keepalive_interval
        self._last_activity = self._loop.time()
        # counters
        self.datagrams_received = 0
        self.datagrams_sent = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        for future in (self._authenticated, self._established, self._first_stream):
            # Nobody may be waiting when the connection fails; do not log "never retrieved".
            future.add_done_callback(consume_exception)

    def __repr__(self) -> str:
        role = "dialer" if self.is_dialer else "listener"
        return f"<PeerConnection {role} {self.remote_address} {self._state.value}>"

    # ------------------------------------------------------------------ public API

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def engine(self) -> EngineName:
        return self._engine.engine

    async def open_stream(self) -> PeerStream:
        """A new bidirectional stream (the peer sees it once we write on it).

        Raises :class:`StreamLimitError` while the peer's limit of concurrent streams is used up.
        """
        self._raise_if_not_usable()
        try:
            stream_id = self._engine.open_stream()
        except StreamLimitError:
            raise
        except Exception as exc:
            raise self._engine_failed(exc) from exc
        return self._new_stream(stream_id, local=True)

    async def streams(self) -> AsyncIterator[PeerStream]:
        """Every stream the peer opens, until the connection closes."""
        while True:
            try:
                yield await self.accept_stream()
            except ConnectionClosedError:
                return

    async def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time of one QUIC PING, in seconds."""
        self._raise_if_not_usable()
        return await self._pings.measure(self._send_ping, timeout)

    def _send_ping(self, uid: int) -> None:
        try:
            self._engine.send_ping(uid)
        except Exception as exc:
            raise self._engine_failed(exc) from exc
        self._schedule_flush()

    def close(self, code: int = CloseCode.NO_ERROR, reason: str = "") -> None:
        """Close the connection (CONNECTION_CLOSE with ``code``); returns at once."""
        if self._close_info is not None:
            return
        self._engine.close(int(code), reason)
        self._mark_closed(CloseInfo(int(code), reason, by_peer=False, application=True))
        self._schedule_flush()

    def stats(self) -> ConnectionStats:
        return ConnectionStats(
            engine=self.engine,
            remote_address=self.remote_address,
            datagrams_received=self.datagrams_received,
            datagrams_sent=self.datagrams_sent,
            bytes_received=self.bytes_received,
            bytes_sent=self.bytes_sent,
            smoothed_rtt=self._engine.smoothed_rtt(),
        )

    # ------------------------------------------------------------------ used by the endpoint

    def start(self) -> None:
        """The first datagrams were fed: a listener sends its challenge right away (0.5-RTT)."""
        if not self.is_dialer and self._control_stream is None and self._close_info is None:
            self._nonce = auth.new_nonce()
            self._open_control_stream()
            self._send_record(control.Challenge(self._nonce))

    async def wait_authenticated(self) -> str:
        return await asyncio.shield(self._authenticated)

    async def wait_established(self) -> None:
        await asyncio.shield(self._established)

    async def wait_first_stream(self) -> PeerStream:
        return await asyncio.shield(self._first_stream)

    def begin_authorization(self) -> None:
        self._set_state(ConnectionState.AUTHORIZING)

    def establish(self) -> None:
        """The listener admits the peer: held streams become visible to the application."""
        if self._state is ConnectionState.CLOSED:
            raise self._closed_error or ConnectionClosedError(
                CloseInfo(0, "closed", by_peer=False, application=True)
            )
        self._set_state(ConnectionState.ESTABLISHED)
        if not self._established.done():
            self._established.set_result(None)
        self._incoming.release_held(keep_back=self._authorize_stream)

    def receive(self, datagrams: list[bytes], addr: Address, now: float) -> None:
        self.datagrams_received += len(datagrams)
        self.bytes_received += sum(map(len, datagrams))
        self._last_activity = now
        if addr != self.remote_address:
            self._endpoint.connection_moved(self, addr)
            self.remote_address = addr
        self._engine.receive_datagrams(datagrams, addr, now)

    def process(self, now: float) -> None:
        """Handle engine events, transmit once, re-arm the timer."""
        if self._terminated or self._processing:
            return
        self._processing = True
        try:
            self._process(now)
        finally:
            self._processing = False

    def _process(self, now: float) -> None:
        self._engine.drain_events(self)
        if self._terminated:
            return
        if self._close_info is None:
            closing = self._engine.closing()
            if closing is not None:
                code, frame_type, reason, by_peer = closing
                self._mark_closed(CloseInfo(code, reason, by_peer, application=frame_type is None))
        batches = self._engine.datagrams_to_send(now)
        if batches:
            for payloads, _ in batches:
                self.datagrams_sent += len(payloads)
            self.bytes_sent += self._endpoint.transmit(batches)
        if self._blocked_writers:
            for stream in tuple(self._blocked_writers):
                stream.on_send_progress()
        self._arm_timer()

    def abandon(self) -> None:
        """The endpoint is going away: stop timers and forget the engine state."""
        self._on_engine_terminated(
            CloseInfo(CloseCode.SHUTDOWN, "endpoint closed", by_peer=False, application=True)
        )

    # ------------------------------------------------------------------ timers and flushing

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and not self._terminated:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self.process(self._loop.time())

    def _arm_timer(self) -> None:
        deadline = self._engine.get_timer()
        if self._keepalive is not None and self._close_info is None:
            keepalive_at = self._last_activity + self._keepalive
            if deadline is None or keepalive_at < deadline:
                deadline = keepalive_at
        if deadline is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        if self._timer is not None:
            if self._timer_at <= deadline:
                return  # an early wake-up is harmless: we re-arm then
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._terminated:
            return
        now = self._loop.time()
        try:
            if (
                self._keepalive is not None
                and self._close_info is None
                and now >= self._last_activity + self._keepalive
            ):
                # Hold NAT mappings and detect a dead path; the uid is never awaited.
                self._engine.send_ping(0)
                self._last_activity = now
            self._engine.handle_timer(now)
            self.process(now)
        except Exception:
            log.exception("QUIC timer failed for %r", self)
            self._on_engine_terminated(
                CloseInfo(CloseCode.INTERNAL_ERROR, "internal error", False, application=True)
            )

    # ------------------------------------------------------------------ EventSink

    def on_handshake_completed(self, early_data_accepted: bool) -> None:
        self._handshake_done = True
        if early_data_accepted:
            self.close(CloseCode.EARLY_DATA_REFUSED, "0-RTT is not accepted")
            return
        if self.is_dialer:
            presented = self._engine.peer_certificate_der()
            if presented is None or fingerprint(presented) != self._expected_peer_id:
                self.close(CloseCode.PEER_ID_MISMATCH, "certificate is not the expected device")
                return
            self._peer_id = self._expected_peer_id
            self._set_state(ConnectionState.AUTHENTICATING)
            self._open_control_stream()
            self._maybe_send_proof()
        else:
            self._set_state(ConnectionState.AUTHENTICATING)
            if self._pending_proof is not None:
                proof, self._pending_proof = self._pending_proof, None
                self._check_proof(proof)

    def on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or self._close_info is not None:
            stream = self._unknown_stream(stream_id, data, end_stream)
            if stream is None:
                return
        try:
            stream.on_data(data, end_stream)
        except FlowControlViolation as exc:
            self.close(CloseCode.FLOW_CONTROL_ERROR, str(exc))

    def on_stream_reset(self, stream_id: int, error_code: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.on_reset(error_code)

    def on_stop_sending(self, stream_id: int, error_code: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.on_stop_sending(error_code)

    def on_connection_id_issued(self, connection_id: bytes) -> None:
        self._endpoint.add_connection_id(self, connection_id)

    def on_connection_id_retired(self, connection_id: bytes) -> None:
        self._endpoint.remove_connection_id(self, connection_id)

    def on_ping_acknowledged(self, uid: int) -> None:
        self._pings.answered(uid)

    def on_terminated(self, error_code: int, frame_type: int | None, reason: str) -> None:
        info = CloseInfo(
            code=error_code,
            reason=reason,
            by_peer=self._close_info is None and "idle" not in reason.lower(),
            application=frame_type is None,
        )
        self._on_engine_terminated(info)

    # ------------------------------------------------------------------ StreamOwner

    def stream_send(self, stream_id: int, data: bytes | memoryview, end: bool) -> None:
        try:
            self._engine.send_stream_data(stream_id, data, end)
        except Exception as exc:
            raise self._engine_failed(exc) from exc
        if len(data) <= _SMALL_WRITE and not self._processing:
            # Interactive traffic (keystrokes, echoes) goes out now: about a third off the
            # round trip. Bulk writes wait for the loop to come round and share packets.
            self.process(self._loop.time())
        else:
            self._schedule_flush()

    def stream_unsent(self, stream_id: int, written: int) -> int:
        if self._terminated:
            return 0
        return self._engine.unsent_bytes(stream_id, written)

    def stream_grant(self, stream_id: int, limit: int) -> None:
        if self._close_info is None and self._control_stream is not None:
            self._send_record(control.Credit(stream_id, limit))

    def stream_reset(self, stream_id: int, error_code: int) -> None:
        if self._close_info is None:
            try:
                self._engine.reset_stream(stream_id, error_code)
            except Exception as exc:
                raise self._engine_failed(exc) from exc
            self._schedule_flush()

    def stream_stop(self, stream_id: int, error_code: int) -> None:
        if self._close_info is None:
            try:
                self._engine.stop_stream(stream_id, error_code)
            except Exception as exc:
                raise self._engine_failed(exc) from exc
            self._schedule_flush()

    def stream_blocked(self, stream: PeerStream, blocked: bool) -> None:
        if blocked:
            self._blocked_writers.add(stream)
        else:
            self._blocked_writers.discard(stream)

    def stream_finished(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    # ------------------------------------------------------------------ internals

    def _engine_failed(self, exc: Exception) -> Exception:
        """An engine call raised: if the engine is closing, that is why; otherwise a bug."""
        closing = self._engine.closing()
        if self._close_info is None and closing is not None:
            code, frame_type, reason, by_peer = closing
            self._mark_closed(CloseInfo(code, reason, by_peer, application=frame_type is None))
        if self._closed_error is not None:
            return self._closed_error
        return exc

    def _set_state(self, state: ConnectionState) -> None:
        if state is self._state:
            return
        if state not in TRANSITIONS[self._state]:
            raise RuntimeError(f"connection cannot go from {self._state.value} to {state.value}")
        self._state = state

    def _raise_if_not_usable(self) -> None:
        if self._closed_error is not None:
            raise self._closed_error
        if self._state is not ConnectionState.ESTABLISHED and not (
            self._state is ConnectionState.AUTHORIZING and not self.is_dialer
        ):
            raise RuntimeError(f"connection is {self._state.value}, not established")

    def _new_stream(self, stream_id: int, *, local: bool) -> PeerStream:
        stream = PeerStream(
            self,
            stream_id,
            window=self._settings.transport.stream_window,
            max_unsent=self._settings.max_unsent,
            local=local,
        )
        self._streams[stream_id] = stream
        return stream

    def _unknown_stream(self, stream_id: int, data: bytes, end: bool) -> PeerStream | None:
        if stream_id == self._peer_control_stream:
            self._on_control_data(data, end)
            return None
        if self._close_info is not None:
            return None
        initiated_by_peer = (stream_id & 1) == (0 if not self.is_dialer else 1)
        if not initiated_by_peer:
            return None  # one of ours that is finished: late data, ignore
        if stream_id & 2:
            # Unidirectional streams other than the control stream are not part of the protocol.
            self._engine.stop_stream(stream_id, CloseCode.PROTOCOL_ERROR)
            return None
        if not self._peer_streams.is_new(stream_id):
            return None  # finished already; late data
        if not self.is_dialer and self._peer_id is None:
            # A genuine dialer opens streams only after connect() returned, i.e. after our
            # ACCEPTED. (A listener's stream may overtake its ACCEPTED: the dialer holds it.)
            self.close(CloseCode.PROTOCOL_ERROR, "stream opened before authentication")
            return None
        stream = self._new_stream(stream_id, local=False)
        if self._state is ConnectionState.ESTABLISHED:
            self._incoming.deliver(stream)
        else:
            self._incoming.hold(stream)
            if stream_id == FIRST_STREAM and not self.is_dialer and not self._first_stream.done():
                self._first_stream.set_result(stream)
        return stream

    def hand_first_stream(self, stream: PeerStream) -> None:
        """The authorize hook takes the first stream: accepted (full credit), never delivered."""
        self._authorize_stream = stream
        stream.on_accepted()

    def _open_control_stream(self) -> None:
        if self._control_stream is None:
            self._control_stream = self._engine.open_stream(unidirectional=True)

    def _send_record(self, record: control.Record) -> None:
        assert self._control_stream is not None
        try:
            self._engine.send_stream_data(self._control_stream, control.encode(record), False)
        except Exception as exc:
            error = self._engine_failed(exc)
            if error is exc:
                raise
            return  # the connection is closing; the record no longer matters
        self._schedule_flush()

    def _on_control_data(self, data: bytes, end: bool) -> None:
        if self._close_info is not None:
            return
        try:
            records = self._decoder.feed(data)
            if end:
                raise control.ControlProtocolError("the peer closed its control stream")
        except control.ControlProtocolError as exc:
            self.close(CloseCode.PROTOCOL_ERROR, str(exc))
            return
        for record in records:
            if self._close_info is not None:
                return
            self._on_record(record)

    def _on_record(self, record: control.Record) -> None:
        match record:
            case control.Credit(stream_id, limit):
                stream = self._streams.get(stream_id)
                if stream is not None:
                    stream.on_credit(limit)
            case control.Challenge(nonce) if self.is_dialer and self._nonce is None:
                self._nonce = nonce
                self._maybe_send_proof()
            case control.Accepted() if self.is_dialer and self._proof_sent:
                if not self._authenticated.done():
                    self._authenticated.set_result(self.peer_id)
                self.establish()
            case control.Proof() if not self.is_dialer and self._peer_id is None:
                if self._handshake_done:
                    self._check_proof(record)
                elif self._pending_proof is None:
                    self._pending_proof = record
                else:
                    self.close(CloseCode.PROTOCOL_ERROR, "more than one PROOF")
            case _:
                self.close(CloseCode.PROTOCOL_ERROR, f"unexpected {type(record).__name__}")

    def _maybe_send_proof(self) -> None:
        if (
            self._proof_sent
            or self._nonce is None
            or self._state is not ConnectionState.AUTHENTICATING
        ):
            return
        assert self._expected_peer_id is not None
        self._proof_sent = True
        proof = auth.make_proof(self._credentials, self._expected_peer_id, self._nonce)
        self._send_record(proof)

    def _check_proof(self, proof: control.Proof) -> None:
        assert self._nonce is not None
        try:
            peer_id = auth.verify_proof(proof, self._local_id, self._nonce)
        except auth.AuthenticationError as exc:
            self.close(CloseCode.AUTH_FAILED, str(exc))
            return
        self._peer_id = peer_id
        self._send_record(control.Accepted())
        if not self._authenticated.done():
            self._authenticated.set_result(peer_id)

    def _mark_closed(self, info: CloseInfo) -> None:
        error = self._begin_close(info, admitted=self._state is ConnectionState.ESTABLISHED)
        if error is None:
            return
        self._state = ConnectionState.CLOSED
        for future in (self._authenticated, self._established, self._first_stream):
            if not future.done():
                future.set_exception(error)
        for stream in tuple(self._streams.values()):
            stream.on_connection_closed(error)
        self._end_close(error)

    def _on_engine_terminated(self, info: CloseInfo) -> None:
        self._mark_closed(info)
        if self._terminated:
            return
        self._terminated = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._endpoint.forget(self)
