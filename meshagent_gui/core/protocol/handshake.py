"""The application handshake and the per-stream state machines of one peer connection.

A :class:`Session` is sans-IO (like aioquic's ``H3Connection`` over ``QuicConnection``, but
without knowing any QUIC API): the transport feeds it what happened on the connection's
streams, with the time as ``now``, and gets back

- **events** for the application (past-tense dataclasses, returned by each call), and
- **commands** for the transport (:meth:`Session.commands_to_send`): write bytes on a stream,
  reset it, stop reading it, close the connection.

Sequence (docs/protocol.md draws it): the dialer opens the first stream with ``Hello(role=
CONTROL, tokens)``; the listener validates it with the injected validator and answers
``HandshakeAccepted(version)`` or ``HandshakeRefused(code)`` and closes the connection. Until
then no other stream is acted on: their Hellos are held (QUIC may deliver a later stream
first) within limits, then validated the same way. Every stream passes
opened -> handshaking -> active -> closing -> closed, or ends refused; the rules live in the
tables below, the code only follows them.

Rules for callers: events report what the peer or the clock did; your own calls either raise
:class:`LocalProtocolError` (and change nothing) or succeed silently.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Final, NamedTuple, TypeAlias

from meshagent_gui.core.protocol.errors import ErrorCode, LocalProtocolError, ProtocolError
from meshagent_gui.core.protocol.framing import BytesLike, FrameLimits, MiB
from meshagent_gui.core.protocol.messages import (
    BASE_REGISTRY,
    HANDSHAKE_ACCEPTED,
    HANDSHAKE_REFUSED,
    HANDSHAKE_TYPES,
    HELLO,
    MAX_REASON_LENGTH,
    SUPPORTED_VERSIONS,
    Close,
    Error,
    HandshakeAccepted,
    HandshakeRefused,
    Hello,
    StreamRole,
)
from meshagent_gui.core.protocol.registry import MessageRegistry, MessageStream

# --------------------------------------------------------------------------- sides and states


class Side(Enum):
    DIALER = "dialer"
    LISTENER = "listener"


class SessionState(Enum):
    IDLE = auto()
    """Dialer only: its Hello is not sent yet."""
    AWAITING_HANDSHAKE = auto()
    ESTABLISHED = auto()
    CLOSED = auto()


class SessionInput(Enum):
    HELLO_SENT = auto()
    ACCEPT_SENT = auto()
    ACCEPT_RECEIVED = auto()
    REFUSE_SENT = auto()
    REFUSE_RECEIVED = auto()
    TIMED_OUT = auto()
    ENDED = auto()
    """Protocol error, connection lost, local close, or the control stream ended."""


_DIALER, _LISTENER = Side.DIALER, Side.LISTENER
_IDLE, _AWAITING = SessionState.IDLE, SessionState.AWAITING_HANDSHAKE
_ESTABLISHED, _SESSION_CLOSED = SessionState.ESTABLISHED, SessionState.CLOSED

SESSION_TRANSITIONS: Final[Mapping[tuple[Side, SessionState, SessionInput], SessionState]] = {
    (_DIALER, _IDLE, SessionInput.HELLO_SENT): _AWAITING,
    (_DIALER, _AWAITING, SessionInput.ACCEPT_RECEIVED): _ESTABLISHED,
    (_DIALER, _AWAITING, SessionInput.REFUSE_RECEIVED): _SESSION_CLOSED,
    (_LISTENER, _AWAITING, SessionInput.ACCEPT_SENT): _ESTABLISHED,
    (_LISTENER, _AWAITING, SessionInput.REFUSE_SENT): _SESSION_CLOSED,
    **{(side, _AWAITING, SessionInput.TIMED_OUT): _SESSION_CLOSED for side in Side},
    **{
        (side, state, SessionInput.ENDED): _SESSION_CLOSED
        for side in Side
        for state in (_IDLE, _AWAITING, _ESTABLISHED)
    },
}

# Who may open a (non-control) stream when: the dialer may pipeline its streams behind its
# Hello (the listener holds them); the listener only once it has accepted the connection.
MAY_OPEN_STREAMS: Final[frozenset[tuple[Side, SessionState]]] = frozenset(
    {(_DIALER, _AWAITING), (_DIALER, _ESTABLISHED), (_LISTENER, _ESTABLISHED)}
)


class StreamState(Enum):
    OPENED = auto()
    """The peer opened it; its Hello has not arrived."""
    HELD = auto()
    """Its handshake message arrived before the connection handshake finished: parked."""
    HANDSHAKING = auto()
    ACTIVE = auto()
    CLOSING_LOCAL = auto()
    """We sent Close; the peer may still send until its Close."""
    CLOSING_REMOTE = auto()
    """The peer sent Close; we may still send until ours."""
    CLOSED = auto()
    REFUSED = auto()


class StreamInput(Enum):
    HELLO_SENT = auto()
    HELLO_RECEIVED = auto()
    HOLD = auto()
    ACCEPT_SENT = auto()
    ACCEPT_RECEIVED = auto()
    REFUSE_SENT = auto()
    REFUSE_RECEIVED = auto()
    MESSAGE_SENT = auto()
    MESSAGE_RECEIVED = auto()
    CLOSE_SENT = auto()
    CLOSE_RECEIVED = auto()
    ERROR_SENT = auto()
    ERROR_RECEIVED = auto()
    ABORTED = auto()
    """Reset, stop-sending, truncation, timeout or the session's end."""


_S, _I = StreamState, StreamInput
TERMINAL_STREAM_STATES: Final = frozenset({_S.CLOSED, _S.REFUSED})
_HANDSHAKE_STREAM_STATES: Final = frozenset({_S.OPENED, _S.HELD, _S.HANDSHAKING})

STREAM_TRANSITIONS: Final[Mapping[tuple[StreamState, StreamInput], StreamState]] = {
    # opener side
    (_S.OPENED, _I.HELLO_SENT): _S.HANDSHAKING,
    # The opener may pipeline messages behind its Hello; the acceptor acts on them only
    # after it accepted the stream, and discards them if it refuses.
    (_S.HANDSHAKING, _I.MESSAGE_SENT): _S.HANDSHAKING,
    (_S.HANDSHAKING, _I.ACCEPT_RECEIVED): _S.ACTIVE,
    (_S.HANDSHAKING, _I.REFUSE_RECEIVED): _S.REFUSED,
    (_S.HANDSHAKING, _I.HOLD): _S.HELD,
    (_S.HELD, _I.MESSAGE_SENT): _S.HELD,
    (_S.HELD, _I.ACCEPT_RECEIVED): _S.ACTIVE,
    (_S.HELD, _I.REFUSE_RECEIVED): _S.REFUSED,
    # acceptor side
    (_S.OPENED, _I.HELLO_RECEIVED): _S.HANDSHAKING,
    (_S.OPENED, _I.HOLD): _S.HELD,
    (_S.HELD, _I.HELLO_RECEIVED): _S.HANDSHAKING,
    (_S.HANDSHAKING, _I.ACCEPT_SENT): _S.ACTIVE,
    (_S.HANDSHAKING, _I.REFUSE_SENT): _S.REFUSED,
    # both
    (_S.ACTIVE, _I.MESSAGE_SENT): _S.ACTIVE,
    (_S.ACTIVE, _I.MESSAGE_RECEIVED): _S.ACTIVE,
    (_S.ACTIVE, _I.CLOSE_SENT): _S.CLOSING_LOCAL,
    (_S.ACTIVE, _I.CLOSE_RECEIVED): _S.CLOSING_REMOTE,
    (_S.CLOSING_LOCAL, _I.MESSAGE_RECEIVED): _S.CLOSING_LOCAL,
    (_S.CLOSING_LOCAL, _I.CLOSE_RECEIVED): _S.CLOSED,
    (_S.CLOSING_REMOTE, _I.MESSAGE_SENT): _S.CLOSING_REMOTE,
    (_S.CLOSING_REMOTE, _I.CLOSE_SENT): _S.CLOSED,
    **{
        (state, inp): _S.CLOSED
        for state in (_S.ACTIVE, _S.CLOSING_LOCAL, _S.CLOSING_REMOTE)
        for inp in (_I.ERROR_SENT, _I.ERROR_RECEIVED)
    },
    # A stream that never became active ends refused; one that did ends closed.
    (_S.OPENED, _I.ABORTED): _S.CLOSED,
    (_S.HELD, _I.ABORTED): _S.REFUSED,
    (_S.HANDSHAKING, _I.ABORTED): _S.REFUSED,
    **{
        (state, _I.ABORTED): _S.CLOSED for state in (_S.ACTIVE, _S.CLOSING_LOCAL, _S.CLOSING_REMOTE)
    },
}


class Expect(Enum):
    """Which frames a stream's state admits from the peer (checked on the frame header)."""

    HELLO = auto()
    ANSWER = auto()
    APPLICATION = auto()
    NOTHING = auto()


INCOMING_BY_STATE: Final[Mapping[StreamState, Expect]] = {
    _S.OPENED: Expect.HELLO,
    _S.HELD: Expect.NOTHING,  # never parsed while held
    _S.HANDSHAKING: Expect.ANSWER,
    _S.ACTIVE: Expect.APPLICATION,
    _S.CLOSING_LOCAL: Expect.APPLICATION,
    _S.CLOSING_REMOTE: Expect.NOTHING,
    _S.CLOSED: Expect.NOTHING,
    _S.REFUSED: Expect.NOTHING,
}


class HandshakeKind(Enum):
    CONTROL_HELLO = auto()
    STREAM_HELLO = auto()
    CONTROL_ANSWER = auto()
    STREAM_ACCEPTED = auto()
    STREAM_REFUSED = auto()


class Disposition(Enum):
    PROCESS = auto()
    HOLD = auto()
    """Park until the connection handshake is done; refused if too many are parked."""
    REFUSE = auto()
    VIOLATION = auto()
    """The peer cannot legitimately send this now: connection-level protocol error."""


class Rule(NamedTuple):
    action: Disposition
    code: ErrorCode = ErrorCode.NO_ERROR


_PROCESS, _HOLD = Rule(Disposition.PROCESS), Rule(Disposition.HOLD)
_VIOLATION = Rule(Disposition.VIOLATION, ErrorCode.UNEXPECTED_MESSAGE)
_DUPLICATE = Rule(Disposition.REFUSE, ErrorCode.DUPLICATE_CONTROL_STREAM)
_K = HandshakeKind

# What to do with a stream's handshake message given the connection's state. Missing entries
# are violations. HOLD entries exist because QUIC does not order streams against each other:
# a pipelined stream, or the listener's acceptance of one, may overtake the control stream.
# A refusal grants nothing, so it needs no session and is never held.
HANDSHAKE_DISPOSITIONS: Final[Mapping[tuple[Side, SessionState, HandshakeKind], Rule]] = {
    (_LISTENER, _AWAITING, _K.CONTROL_HELLO): _PROCESS,
    (_LISTENER, _AWAITING, _K.STREAM_HELLO): _HOLD,
    (_LISTENER, _ESTABLISHED, _K.CONTROL_HELLO): _DUPLICATE,
    (_LISTENER, _ESTABLISHED, _K.STREAM_HELLO): _PROCESS,
    (_LISTENER, _ESTABLISHED, _K.STREAM_ACCEPTED): _PROCESS,
    (_LISTENER, _ESTABLISHED, _K.STREAM_REFUSED): _PROCESS,
    (_DIALER, _AWAITING, _K.CONTROL_ANSWER): _PROCESS,
    (_DIALER, _AWAITING, _K.STREAM_ACCEPTED): _HOLD,
    (_DIALER, _AWAITING, _K.STREAM_REFUSED): _PROCESS,
    (_DIALER, _AWAITING, _K.STREAM_HELLO): _HOLD,
    (_DIALER, _AWAITING, _K.CONTROL_HELLO): _DUPLICATE,
    (_DIALER, _ESTABLISHED, _K.CONTROL_HELLO): _DUPLICATE,
    (_DIALER, _ESTABLISHED, _K.STREAM_HELLO): _PROCESS,
    (_DIALER, _ESTABLISHED, _K.STREAM_ACCEPTED): _PROCESS,
    (_DIALER, _ESTABLISHED, _K.STREAM_REFUSED): _PROCESS,
}


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class SessionEstablished:
    version: int
    control_stream_id: int
    grant: object
    """What the validator returned for the peer's Hello (listener); ``None`` on the dialer."""


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """The connection ended before its handshake completed (refused, timed out, broken)."""

    code: ErrorCode
    message: str
    by_peer: bool


@dataclass(frozen=True, slots=True)
class SessionClosed:
    """An established connection ended."""

    code: ErrorCode
    message: str
    by_peer: bool


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    stream_id: int
    role: StreamRole
    resource: str
    opened_by_peer: bool
    grant: object
    """The validator's result when the peer opened the stream; ``None`` otherwise."""


@dataclass(frozen=True, slots=True)
class StreamRefused:
    stream_id: int
    role: StreamRole
    code: ErrorCode
    message: str
    by_peer: bool


@dataclass(frozen=True, slots=True)
class MessageReceived:
    stream_id: int
    message: object


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """The peer sent Close: it will send nothing more on this stream."""

    stream_id: int
    code: ErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class StreamFailed:
    """The stream ended abnormally: Error, reset, truncation, or the session's end."""

    stream_id: int
    code: ErrorCode
    message: str
    by_peer: bool


SessionEvent: TypeAlias = (
    SessionEstablished
    | HandshakeFailed
    | SessionClosed
    | StreamAccepted
    | StreamRefused
    | MessageReceived
    | StreamClosed
    | StreamFailed
)

# --------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class WriteStream:
    """Send ``data`` on the stream (then FIN if ``end_stream``). Large data fields come as
    their own command so they are never copied into a frame."""

    stream_id: int
    data: BytesLike
    end_stream: bool = False


@dataclass(frozen=True, slots=True)
class ResetStream:
    """Abandon our sending side of the stream (QUIC RESET_STREAM)."""

    stream_id: int
    code: ErrorCode


@dataclass(frozen=True, slots=True)
class StopSending:
    """Ask the peer to abandon its sending side (QUIC STOP_SENDING)."""

    stream_id: int
    code: ErrorCode


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Close the whole connection; ``code`` is the QUIC application error code."""

    code: ErrorCode
    reason: str


SessionCommand: TypeAlias = WriteStream | ResetStream | StopSending | CloseConnection

# --------------------------------------------------------------------------- validation

Validator: TypeAlias = Callable[[Hello], object]
"""Checks a peer's Hello (its tokens above all) and returns a grant, or raises.

Raise :class:`Refusal` to choose the refusal code; any other exception refuses with
``BAD_TOKEN`` (fail closed) and its text goes only into the local event, never to the peer.
"""


class Refusal(Exception):
    """Raised by a validator to refuse a Hello with a specific code and a message for the peer."""

    def __init__(self, code: ErrorCode, message: str = "") -> None:
        super().__init__(message or code.name)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class SessionLimits:
    handshake_timeout: float = 10.0
    """Seconds for the connection handshake, and for each stream's own handshake."""
    frame: FrameLimits = field(default_factory=FrameLimits)
    max_held_streams: int = 16
    max_held_bytes: int = 1 * MiB
    """Bytes a held stream may buffer before its handshake can be processed."""


# --------------------------------------------------------------------------- the session


@dataclass(slots=True, eq=False)
class _Stream:
    stream_id: int
    opened_locally: bool
    codec: MessageStream
    state: StreamState
    deadline: float | None
    role: StreamRole = StreamRole.CONTROL
    resource: str = ""
    held: object | None = None
    fin_pending: bool = False
    """The peer's FIN arrived while the stream was held or still had messages to handle."""
    local_done: bool = False
    peer_done: bool = False
    stop_sent: bool = False
    known_to_app: bool = False
    """The application has heard of this stream (it opened it, or got StreamAccepted)."""


class Session:
    """One peer connection's handshake, streams and framing. Sans-IO; time comes as ``now``."""

    def __init__(
        self,
        side: Side,
        *,
        validate: Validator,
        now: float,
        registry: MessageRegistry = BASE_REGISTRY,
        limits: SessionLimits | None = None,
        versions: Sequence[int] = SUPPORTED_VERSIONS,
    ) -> None:
        if not registry.codes >= HANDSHAKE_TYPES:
            raise ValueError("the registry must include the session messages")
        self.side = side
        self.state = _IDLE if side is _DIALER else _AWAITING
        self.version: int | None = None
        """The negotiated protocol version, once established."""
        self.control_stream_id: int | None = None
        self._validate = validate
        self._registry = registry
        self._limits = limits or SessionLimits()
        self._versions = tuple(versions)
        self._rules = registry.frame_rules(self._limits.frame)
        self._deadline: float | None = None if side is _DIALER else now + self._timeout
        self._streams: dict[int, _Stream] = {}
        self._events: list[SessionEvent] = []
        self._commands: list[SessionCommand] = []
        self._expected: dict[Expect, Collection[int]] = {
            Expect.HELLO: frozenset({HELLO}),
            Expect.ANSWER: frozenset({HANDSHAKE_ACCEPTED, HANDSHAKE_REFUSED}),
            Expect.APPLICATION: registry.codes - HANDSHAKE_TYPES,
            Expect.NOTHING: frozenset(),
        }

    @property
    def _timeout(self) -> float:
        return self._limits.handshake_timeout

    # ----------------------------------------------------------------- queries

    def stream_state(self, stream_id: int) -> StreamState | None:
        """A stream's state; ``None`` once it is forgotten (ended and both sides finished)."""
        stream = self._streams.get(stream_id)
        return stream.state if stream is not None else None

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` must next be called (``None``: no timer needed)."""
        deadlines = [s.deadline for s in self._streams.values() if s.deadline is not None]
        if self._deadline is not None:
            deadlines.append(self._deadline)
        return min(deadlines, default=None)

    def commands_to_send(self) -> list[SessionCommand]:
        """Drain the commands for the transport, in order."""
        commands, self._commands = self._commands, []
        return commands

    # ----------------------------------------------------------------- local actions

    def start(
        self, stream_id: int, *, tokens: Sequence[str] = (), resource: str = "", now: float
    ) -> None:
        """Dialer: open the connection's control stream with our Hello."""
        if (self.side, self.state, SessionInput.HELLO_SENT) not in SESSION_TRANSITIONS:
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "only an idle dialer starts")
        hello = Hello(self._versions, StreamRole.CONTROL, tuple(tokens), resource)
        self._open(stream_id, hello, now)
        self.control_stream_id = stream_id
        self._move(SessionInput.HELLO_SENT)
        self._deadline = now + self._timeout

    def open_stream(
        self,
        stream_id: int,
        role: StreamRole,
        *,
        tokens: Sequence[str] = (),
        resource: str = "",
        now: float,
    ) -> None:
        """Open a service stream; :class:`StreamAccepted` or :class:`StreamRefused` follows.

        Messages may be sent on it at once (they are acted on only once it is accepted)."""
        if (self.side, self.state) not in MAY_OPEN_STREAMS:
            raise LocalProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE, f"the {self.side.value} cannot open streams now"
            )
        if role is StreamRole.CONTROL:
            raise LocalProtocolError(ErrorCode.DUPLICATE_CONTROL_STREAM, "one control stream")
        versions = (self.version,) if self.version is not None else self._versions
        self._open(stream_id, Hello(versions, role, tuple(tokens), resource), now)

    def send(self, stream_id: int, message: object) -> None:
        """Send an application message on one of our streams that may carry it."""
        if isinstance(message, Hello | HandshakeAccepted | HandshakeRefused | Close | Error):
            raise LocalProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE, f"{type(message).__name__} is sent by the session"
            )
        self._send(self._local_stream(stream_id), message, _I.MESSAGE_SENT)

    def close_stream(
        self, stream_id: int, code: ErrorCode = ErrorCode.NO_ERROR, message: str = ""
    ) -> None:
        """End our direction gracefully; the stream is closed once the peer's Close arrives."""
        stream = self._service_stream(stream_id)
        self._send(stream, Close(code, message[:MAX_REASON_LENGTH]), _I.CLOSE_SENT, end=True)
        self._forget_if_done(stream)

    def abort_stream(self, stream_id: int, code: ErrorCode, message: str = "") -> None:
        """Give up on a stream: an Error to the peer if we may still send, else a reset."""
        stream = self._service_stream(stream_id)
        if (stream.state, _I.ERROR_SENT) in STREAM_TRANSITIONS and not stream.local_done:
            self._send(stream, Error(code, message[:MAX_REASON_LENGTH]), _I.ERROR_SENT, end=True)
            self._stop_reading(stream, code)
        elif (stream.state, _I.ABORTED) in STREAM_TRANSITIONS:
            self._move_stream(stream, _I.ABORTED)
            self._abandon(stream, code)
        else:
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "the stream already ended")
        self._forget_if_done(stream)

    def close(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Close the connection. No events follow: the caller knows."""
        if self.state is _SESSION_CLOSED:
            return
        self._move(SessionInput.ENDED)
        self._commands.append(CloseConnection(code, reason))
        self._drop_streams(None)

    # ----------------------------------------------------------------- transport input

    def receive_data(
        self, stream_id: int, data: BytesLike, end_stream: bool, now: float
    ) -> list[SessionEvent]:
        """Bytes arrived on a stream (a new id is a stream the peer opened)."""
        self._expire(now)
        if self.state is not _SESSION_CLOSED:
            stream = self._streams.get(stream_id)
            if stream is None:
                stream = self._register(self._make_stream(stream_id, False, now))
            try:
                self._receive(stream, data, end_stream)
            except LocalProtocolError:
                raise
            except ProtocolError as error:
                self._end_session(error.code, error.message, by_peer=False)
        return self._take_events()

    def stream_reset(self, stream_id: int, code: int, now: float) -> list[SessionEvent]:
        """The peer abandoned its sending side (QUIC RESET_STREAM)."""
        self._expire(now)
        stream = self._streams.get(stream_id)
        if stream is not None and self.state is not _SESSION_CLOSED:
            stream.peer_done = True
            self._peer_aborted(stream, _wire_code(code), "reset by peer")
        return self._take_events()

    def stop_sending(self, stream_id: int, code: int, now: float) -> list[SessionEvent]:
        """The peer wants no more data on this stream (QUIC STOP_SENDING)."""
        self._expire(now)
        stream = self._streams.get(stream_id)
        if stream is not None and self.state is not _SESSION_CLOSED:
            self._peer_aborted(stream, _wire_code(code), "peer stopped reading")
        return self._take_events()

    def connection_lost(self, code: int, reason: str, now: float) -> list[SessionEvent]:
        """The connection ended under us: ``code`` is the peer's application close code, or
        ``ErrorCode.GOING_AWAY`` for a transport-level end (idle timeout, ...)."""
        self._end_session(_wire_code(code), reason, by_peer=True, close=False)
        return self._take_events()

    def handle_timer(self, now: float) -> list[SessionEvent]:
        self._expire(now)
        return self._take_events()

    # ----------------------------------------------------------------- internals: streams

    def _make_stream(self, stream_id: int, opened_locally: bool, now: float) -> _Stream:
        if stream_id in self._streams:
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"stream {stream_id} exists")
        codec = MessageStream(self._registry, self._limits.frame, rules=self._rules)
        codec.allowed = self._expected[INCOMING_BY_STATE[_S.OPENED]]
        return _Stream(
            stream_id,
            opened_locally,
            codec,
            _S.OPENED,
            deadline=now + self._timeout,
            known_to_app=opened_locally,
        )

    def _register(self, stream: _Stream) -> _Stream:
        self._streams[stream.stream_id] = stream
        return stream

    def _open(self, stream_id: int, hello: Hello, now: float) -> None:
        stream = self._make_stream(stream_id, True, now)
        stream.role, stream.resource = hello.role, hello.resource
        self._send(stream, hello, _I.HELLO_SENT)  # raises (nothing registered) if it cannot
        self._register(stream)

    def _local_stream(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None or self.state is _SESSION_CLOSED:
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"no stream {stream_id}")
        return stream

    def _service_stream(self, stream_id: int) -> _Stream:
        if stream_id == self.control_stream_id:
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "close() ends the connection")
        return self._local_stream(stream_id)

    def _move_stream(self, stream: _Stream, inp: StreamInput) -> None:
        new = STREAM_TRANSITIONS.get((stream.state, inp))
        if new is None:
            raise ProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE, f"{inp.name} in stream state {stream.state.name}"
            )
        if new is stream.state:
            return  # a message that keeps the state (the hot path) changes nothing else
        stream.state = new
        stream.codec.allowed = self._expected[INCOMING_BY_STATE[new]]
        if new not in _HANDSHAKE_STREAM_STATES:
            stream.deadline = None
        if new in TERMINAL_STREAM_STATES:
            stream.held = None
            stream.codec.discard()

    def _send(self, stream: _Stream, message: object, inp: StreamInput, end: bool = False) -> None:
        if (stream.state, inp) not in STREAM_TRANSITIONS or stream.local_done:
            raise LocalProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"cannot send {type(message).__name__} in stream state {stream.state.name}",
            )
        head, data = stream.codec.send_parts(message)  # raises before any state change
        self._move_stream(stream, inp)
        if data:
            self._commands.append(WriteStream(stream.stream_id, head))
            self._commands.append(WriteStream(stream.stream_id, data, end))
        else:
            self._commands.append(WriteStream(stream.stream_id, head, end))
        stream.local_done = stream.local_done or end

    def _finish_sending(self, stream: _Stream) -> None:
        if not stream.local_done:
            self._commands.append(WriteStream(stream.stream_id, b"", end_stream=True))
            stream.local_done = True

    def _receive(self, stream: _Stream, data: BytesLike, end_stream: bool) -> None:
        if stream.state in TERMINAL_STREAM_STATES:
            # Whatever still arrives after we ended the stream is dropped unread.
            stream.peer_done = stream.peer_done or end_stream
            self._forget_if_done(stream)
            return
        stream.codec.feed(data)
        stream.fin_pending = stream.fin_pending or end_stream
        self._pump(stream)

    def _pump(self, stream: _Stream) -> None:
        """Handle a stream's buffered messages until it needs more bytes, is held, or ends."""
        while stream.held is None and stream.state not in TERMINAL_STREAM_STATES:
            message = stream.codec.next_message()
            if message is None:
                break
            self._on_message(stream, message)
            if self.state is _SESSION_CLOSED:
                return
        if stream.held is not None:
            if stream.codec.buffered_bytes > self._limits.max_held_bytes:
                raise ProtocolError(
                    ErrorCode.BUFFER_LIMIT_EXCEEDED, f"held stream {stream.stream_id} overflowed"
                )
        elif stream.fin_pending:
            self._peer_finished(stream)

    def _on_message(self, stream: _Stream, message: object) -> None:
        if isinstance(message, Hello):
            self._on_hello(stream, message)
        elif isinstance(message, HandshakeAccepted | HandshakeRefused):
            self._on_answer(stream, message)
        elif isinstance(message, Close):
            self._move_stream(stream, _I.CLOSE_RECEIVED)
            self._ended_by_peer(stream, message.code, message.message, graceful=True)
        elif isinstance(message, Error):
            self._move_stream(stream, _I.ERROR_RECEIVED)
            self._finish_sending(stream)
            self._ended_by_peer(stream, message.code, message.message, graceful=False)
        else:
            self._move_stream(stream, _I.MESSAGE_RECEIVED)
            self._events.append(MessageReceived(stream.stream_id, message))

    def _disposition(self, kind: HandshakeKind) -> Rule:
        return HANDSHAKE_DISPOSITIONS.get((self.side, self.state, kind), _VIOLATION)

    def _on_hello(self, stream: _Stream, hello: Hello) -> None:
        stream.role, stream.resource = hello.role, hello.resource
        is_control = hello.role is StreamRole.CONTROL
        rule = self._disposition(_K.CONTROL_HELLO if is_control else _K.STREAM_HELLO)
        if rule.action is Disposition.VIOLATION:
            raise ProtocolError(rule.code, f"Hello on stream {stream.stream_id} not expected")
        if rule.action is Disposition.HOLD and self._held_count() < self._limits.max_held_streams:
            self._move_stream(stream, _I.HOLD)
            stream.held = hello
            return
        self._move_stream(stream, _I.HELLO_RECEIVED)
        if rule.action is Disposition.HOLD:
            self._refuse(stream, ErrorCode.TOO_MANY_STREAMS, "too many streams before handshake")
        elif rule.action is Disposition.REFUSE:
            self._refuse(stream, rule.code, rule.code.name.lower())
        elif is_control:
            self._accept_session(stream, hello)
        else:
            self._accept_stream(stream, hello)

    def _accept_session(self, stream: _Stream, hello: Hello) -> None:
        self.control_stream_id = stream.stream_id
        common = set(hello.versions) & set(self._versions)
        if not common:
            self._refuse(stream, ErrorCode.UNSUPPORTED_VERSION, "no common protocol version")
            return
        verdict = self._run_validator(stream, hello)
        if isinstance(verdict, _Refused):
            return
        self.version = max(common)
        self._send(stream, HandshakeAccepted(self.version), _I.ACCEPT_SENT)
        self._move(SessionInput.ACCEPT_SENT)
        self._session_established(stream, verdict)

    def _accept_stream(self, stream: _Stream, hello: Hello) -> None:
        assert self.version is not None
        if self.version not in hello.versions:
            self._refuse(stream, ErrorCode.UNSUPPORTED_VERSION, "stream version differs")
            return
        if not hello.role.known:
            self._refuse(stream, ErrorCode.UNKNOWN_ROLE, f"unknown role {int(hello.role)}")
            return
        verdict = self._run_validator(stream, hello)
        if isinstance(verdict, _Refused):
            return
        self._send(stream, HandshakeAccepted(self.version), _I.ACCEPT_SENT)
        stream.known_to_app = True
        self._events.append(
            StreamAccepted(stream.stream_id, stream.role, stream.resource, True, verdict)
        )

    def _run_validator(self, stream: _Stream, hello: Hello) -> object:
        try:
            return self._validate(hello)
        except Refusal as refusal:
            self._refuse(stream, refusal.code, refusal.message, local_detail=str(refusal))
        except Exception as exc:  # fail closed: whatever broke, the token is not accepted
            detail = f"{type(exc).__name__}: {exc}"
            self._refuse(stream, ErrorCode.BAD_TOKEN, "token rejected", local_detail=detail)
        return _REFUSED

    def _refuse(
        self, stream: _Stream, code: ErrorCode, message: str, *, local_detail: str = ""
    ) -> None:
        refusal = HandshakeRefused(code, message[:MAX_REASON_LENGTH], self._versions)
        self._send(stream, refusal, _I.REFUSE_SENT, end=True)
        detail = local_detail or message
        if stream.stream_id == self.control_stream_id:  # the connection closes: no stop needed
            self._move(SessionInput.REFUSE_SENT)
            self._commands.append(CloseConnection(code, message))
            self._events.append(HandshakeFailed(code, detail, by_peer=False))
            self._drop_streams((code, detail, False))
            return
        self._stop_reading(stream, code)  # anything pipelined behind the Hello is unwanted
        self._events.append(StreamRefused(stream.stream_id, stream.role, code, detail, False))
        self._forget_if_done(stream)

    def _on_answer(self, stream: _Stream, answer: HandshakeAccepted | HandshakeRefused) -> None:
        is_control = stream.stream_id == self.control_stream_id
        if is_control:
            kind = _K.CONTROL_ANSWER
        elif isinstance(answer, HandshakeRefused):
            kind = _K.STREAM_REFUSED
        else:
            kind = _K.STREAM_ACCEPTED
        rule = self._disposition(kind)
        if rule.action is Disposition.HOLD:
            if self._held_count() >= self._limits.max_held_streams:
                raise ProtocolError(ErrorCode.TOO_MANY_STREAMS, "too many early answers")
            self._move_stream(stream, _I.HOLD)
            stream.held = answer
            return
        if rule.action is not Disposition.PROCESS:
            raise ProtocolError(rule.code, f"answer on stream {stream.stream_id} not expected")
        if isinstance(answer, HandshakeRefused):
            self._move_stream(stream, _I.REFUSE_RECEIVED)
            self._finish_sending(stream)
            if is_control:
                self._move(SessionInput.REFUSE_RECEIVED)
                self._commands.append(CloseConnection(answer.code, "refused by peer"))
                self._events.append(HandshakeFailed(answer.code, answer.message, by_peer=True))
                self._drop_streams((answer.code, answer.message, True))
                return
            self._events.append(
                StreamRefused(stream.stream_id, stream.role, answer.code, answer.message, True)
            )
            self._forget_if_done(stream)
            return
        expected = self._versions if is_control else (self.version,)
        if answer.version not in expected:
            raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"accepted as v{answer.version}")
        self._move_stream(stream, _I.ACCEPT_RECEIVED)
        if is_control:
            self.version = answer.version
            self._move(SessionInput.ACCEPT_RECEIVED)
            self._session_established(stream, None)
            return
        self._events.append(
            StreamAccepted(stream.stream_id, stream.role, stream.resource, False, None)
        )

    def _session_established(self, control: _Stream, grant: object) -> None:
        assert self.version is not None
        self._deadline = None
        self._events.append(SessionEstablished(self.version, control.stream_id, grant))
        for stream in [s for s in self._streams.values() if s.held is not None]:
            held, stream.held = stream.held, None
            self._on_message(stream, held)
            if self.state is not _ESTABLISHED:
                return
            self._pump(stream)
            if self.state is not _ESTABLISHED:
                return

    def _ended_by_peer(
        self, stream: _Stream, code: ErrorCode, message: str, *, graceful: bool
    ) -> None:
        """The peer sent Close or Error; on the control stream that ends the connection."""
        if stream.stream_id == self.control_stream_id:
            self._end_session(code, message or "control stream closed", by_peer=True)
            return
        if stream.known_to_app:
            event: SessionEvent = (
                StreamClosed(stream.stream_id, code, message)
                if graceful
                else StreamFailed(stream.stream_id, code, message, by_peer=True)
            )
            self._events.append(event)
        self._forget_if_done(stream)

    def _peer_finished(self, stream: _Stream) -> None:
        """The peer sent FIN and every message before it was handled."""
        stream.fin_pending = False
        stream.codec.end_of_stream()  # a partial frame left: ProtocolError(TRUNCATED)
        stream.peer_done = True
        if stream.state in (_S.CLOSING_REMOTE, *TERMINAL_STREAM_STATES):
            self._forget_if_done(stream)
            return
        if stream.stream_id == self.control_stream_id:
            raise ProtocolError(ErrorCode.TRUNCATED, "control stream ended without Close")
        self._peer_aborted(stream, ErrorCode.TRUNCATED, "stream ended without Close")

    def _peer_aborted(self, stream: _Stream, code: ErrorCode, message: str) -> None:
        if stream.state in TERMINAL_STREAM_STATES:
            self._abandon(stream, code)
            self._forget_if_done(stream)
            return
        if stream.stream_id == self.control_stream_id:
            self._end_session(code, message, by_peer=True)
            return
        self._move_stream(stream, _I.ABORTED)
        if stream.known_to_app:
            self._events.append(
                StreamRefused(stream.stream_id, stream.role, code, message, True)
                if stream.state is _S.REFUSED
                else StreamFailed(stream.stream_id, code, message, by_peer=True)
            )
        self._abandon(stream, code)
        self._forget_if_done(stream)

    def _abandon(self, stream: _Stream, code: ErrorCode) -> None:
        if not stream.local_done:
            self._commands.append(ResetStream(stream.stream_id, code))
            stream.local_done = True
        self._stop_reading(stream, code)

    def _stop_reading(self, stream: _Stream, code: ErrorCode) -> None:
        if not stream.peer_done and not stream.stop_sent:
            self._commands.append(StopSending(stream.stream_id, code))
            stream.stop_sent = True

    def _forget_if_done(self, stream: _Stream) -> None:
        """Forget an ended stream once both directions are finished: QUIC delivers no more."""
        if stream.state in TERMINAL_STREAM_STATES and stream.local_done and stream.peer_done:
            self._streams.pop(stream.stream_id, None)

    def _held_count(self) -> int:
        return sum(1 for s in self._streams.values() if s.held is not None)

    # ----------------------------------------------------------------- internals: session

    def _move(self, inp: SessionInput) -> None:
        new = SESSION_TRANSITIONS.get((self.side, self.state, inp))
        if new is None:
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"{inp.name} in {self.state.name}")
        self.state = new

    def _expire(self, now: float) -> None:
        if self.state is _AWAITING and self._deadline is not None and now >= self._deadline:
            self._end_session(ErrorCode.HANDSHAKE_TIMEOUT, "handshake timed out", by_peer=False)
        if self.state is not _ESTABLISHED:
            return
        for stream in [s for s in self._streams.values() if s.deadline is not None]:
            if stream.deadline is not None and now >= stream.deadline:
                self._stream_timed_out(stream)

    def _stream_timed_out(self, stream: _Stream) -> None:
        code = ErrorCode.HANDSHAKE_TIMEOUT
        self._move_stream(stream, _I.ABORTED)
        if stream.known_to_app:
            self._events.append(
                StreamRefused(stream.stream_id, stream.role, code, "no answer", by_peer=False)
            )
        self._abandon(stream, code)
        self._forget_if_done(stream)

    def _end_session(
        self, code: ErrorCode, message: str, *, by_peer: bool, close: bool = True
    ) -> None:
        if self.state is _SESSION_CLOSED:
            return
        was = self.state
        timed_out = code is ErrorCode.HANDSHAKE_TIMEOUT and was is _AWAITING
        self._move(SessionInput.TIMED_OUT if timed_out else SessionInput.ENDED)
        if close:
            self._commands.append(CloseConnection(code, message))
        if was is _ESTABLISHED:
            self._events.append(SessionClosed(code, message, by_peer))
        else:
            self._events.append(HandshakeFailed(code, message, by_peer))
        self._drop_streams((code, message, by_peer))

    def _drop_streams(self, reason: tuple[ErrorCode, str, bool] | None) -> None:
        """The connection is gone: each stream the application still had fails with ``reason``
        (``None``: we closed it ourselves, no events)."""
        if reason is not None:
            code, message, by_peer = reason
            for stream in self._streams.values():
                if (
                    stream.stream_id != self.control_stream_id
                    and stream.known_to_app
                    and stream.state not in TERMINAL_STREAM_STATES
                ):
                    self._events.append(StreamFailed(stream.stream_id, code, message, by_peer))
        for stream in self._streams.values():
            stream.codec.discard()
        self._streams.clear()
        self._deadline = None

    def _take_events(self) -> list[SessionEvent]:
        events, self._events = self._events, []
        return events


def _wire_code(code: int) -> ErrorCode:
    try:
        return ErrorCode(code)
    except ValueError:
        return ErrorCode.PROTOCOL_ERROR


class _Refused:
    """Marker: the validator refused (the refusal is already sent)."""


_REFUSED: Final = _Refused()
