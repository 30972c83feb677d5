"""Two :class:`Session` endpoints wired back to back in memory (h11's ``ConnectionPair`` idea).

No sockets, no clock: ``pair.now`` is the time, moved by :meth:`SessionPair.advance`. Commands
one side emits are *in flight* until delivered; a test may deliver them in order (:meth:`run`),
selectively and out of order (:meth:`deliver` with a filter, as QUIC may order streams), cut
into arbitrary pieces (``split``), or drop them. A ``CloseConnection`` ends the connection:
whatever is in flight after it is lost, as with QUIC.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from meshagent_gui.core.protocol.handshake import (
    CloseConnection,
    ResetStream,
    Session,
    SessionCommand,
    SessionEvent,
    SessionLimits,
    Side,
    StopSending,
    Validator,
    WriteStream,
)
from meshagent_gui.core.protocol.messages import (
    BASE_REGISTRY,
    SUPPORTED_VERSIONS,
    Hello,
    StreamRole,
)
from meshagent_gui.core.protocol.registry import (
    MessageRegistry,
    control_message,
    struct_message,
)

Splitter = Callable[[bytes], Sequence[bytes]]


# Application messages of a pretend service, registered the way later modules will register
# theirs: in their own type range, without touching the framer.
@dataclass(frozen=True, slots=True)
class Chunk:
    """A bulk message: fixed metadata, a flag, and a zero-copy data field."""

    offset: int
    digest: bytes
    last: bool
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class Note:
    """A rare control message."""

    text: str
    numbers: tuple[int, ...] = ()


TEST_REGISTRY = BASE_REGISTRY.extended(
    [
        struct_message(
            0x0110, Chunk, "!Q4s", ("offset", "digest"), data="data", flags={"last": 0x01}
        ),
        control_message(0x0111, Note),
    ]
)


@dataclass
class RecordingValidator:
    """Grants ``"grant:<first token>"`` for tokens in ``good``; raises for anything else."""

    good: frozenset[str] = frozenset({"good"})
    seen: list[Hello] = field(default_factory=list)

    def __call__(self, hello: Hello) -> object:
        self.seen.append(hello)
        if not hello.tokens or hello.tokens[0] not in self.good:
            raise ValueError("signature does not verify")
        return f"grant:{hello.tokens[0]}"


@dataclass(frozen=True)
class InFlight:
    sender: Side
    command: SessionCommand


class SessionPair:
    def __init__(
        self,
        *,
        now: float = 0.0,
        dialer_validate: Validator | None = None,
        listener_validate: Validator | None = None,
        registry: MessageRegistry = TEST_REGISTRY,
        limits: SessionLimits | None = None,
        dialer_versions: Sequence[int] = SUPPORTED_VERSIONS,
        listener_versions: Sequence[int] = SUPPORTED_VERSIONS,
    ) -> None:
        self.now = now
        self.validators = {
            Side.DIALER: dialer_validate or RecordingValidator(),
            Side.LISTENER: listener_validate or RecordingValidator(),
        }
        self.sessions = {
            Side.DIALER: Session(
                Side.DIALER,
                validate=self.validators[Side.DIALER],
                now=now,
                registry=registry,
                limits=limits,
                versions=dialer_versions,
            ),
            Side.LISTENER: Session(
                Side.LISTENER,
                validate=self.validators[Side.LISTENER],
                now=now,
                registry=registry,
                limits=limits,
                versions=listener_versions,
            ),
        }
        self.in_flight: list[InFlight] = []
        self.events: dict[Side, list[SessionEvent]] = {Side.DIALER: [], Side.LISTENER: []}
        self.closed_by: Side | None = None
        # QUIC numbering of bidirectional streams: client 0, 4, 8...; server 1, 5, 9...
        self._next_stream_id = {Side.DIALER: 0, Side.LISTENER: 1}

    @property
    def dialer(self) -> Session:
        return self.sessions[Side.DIALER]

    @property
    def listener(self) -> Session:
        return self.sessions[Side.LISTENER]

    def next_stream_id(self, side: Side) -> int:
        stream_id = self._next_stream_id[side]
        self._next_stream_id[side] += 4
        return stream_id

    # ---------------------------------------------------------------- local actions

    def start(self, *tokens: str) -> int:
        stream_id = self.next_stream_id(Side.DIALER)
        self.dialer.start(stream_id, tokens=tokens, now=self.now)
        self.collect()
        return stream_id

    def open(self, side: Side, role: StreamRole, *tokens: str, resource: str = "") -> int:
        stream_id = self.next_stream_id(side)
        self.sessions[side].open_stream(
            stream_id, role, tokens=tokens, resource=resource, now=self.now
        )
        self.collect()
        return stream_id

    def inject(self, sender: Side, command: SessionCommand) -> None:
        """Put a raw command in flight, as if ``sender``'s session had emitted it."""
        self.in_flight.append(InFlight(sender, command))

    # ---------------------------------------------------------------- the wire

    def collect(self) -> None:
        for side, session in self.sessions.items():
            self.in_flight.extend(InFlight(side, c) for c in session.commands_to_send())

    def deliver(
        self,
        keep: Callable[[InFlight], bool] | None = None,
        *,
        split: Splitter | None = None,
    ) -> None:
        """Deliver the in-flight commands that ``keep`` selects (all by default), in order."""
        chosen: list[InFlight] = []
        rest: list[InFlight] = []
        for item in self.in_flight:
            (chosen if keep is None or keep(item) else rest).append(item)
        self.in_flight = rest
        for item in chosen:
            if self.closed_by is not None:
                break
            self._deliver(item, split)
        if self.closed_by is not None:
            self.in_flight.clear()

    def drop(self, keep: Callable[[InFlight], bool]) -> list[InFlight]:
        """Lose the selected in-flight commands."""
        lost: list[InFlight] = []
        rest: list[InFlight] = []
        for item in self.in_flight:
            (lost if keep(item) else rest).append(item)
        self.in_flight = rest
        return lost

    def run(
        self, *, split: Splitter | None = None, rounds: int = 100
    ) -> dict[Side, list[SessionEvent]]:
        """Deliver everything until nothing is in flight; return (and clear) the events."""
        for _ in range(rounds):
            self.collect()
            if not self.in_flight:
                break
            self.deliver(split=split)
        else:
            raise AssertionError("the sessions kept talking")
        return self.take_events()

    def advance(self, seconds: float) -> dict[Side, list[SessionEvent]]:
        """Move time on, fire both sessions' timers, then deliver what they sent."""
        self.now += seconds
        for side, session in self.sessions.items():
            self.events[side].extend(session.handle_timer(self.now))
        return self.run()

    def take_events(self) -> dict[Side, list[SessionEvent]]:
        events = self.events
        self.events = {Side.DIALER: [], Side.LISTENER: []}
        return events

    def _deliver(self, item: InFlight, split: Splitter | None) -> None:
        receiver = Side.LISTENER if item.sender is Side.DIALER else Side.DIALER
        session = self.sessions[receiver]
        command = item.command
        events = self.events[receiver]
        if isinstance(command, WriteStream):
            data = bytes(command.data)
            pieces = list(split(data)) if split is not None and data else [data]
            for index, piece in enumerate(pieces):
                last = index == len(pieces) - 1
                end = command.end_stream and last
                events.extend(session.receive_data(command.stream_id, piece, end, self.now))
        elif isinstance(command, ResetStream):
            events.extend(session.stream_reset(command.stream_id, command.code, self.now))
        elif isinstance(command, StopSending):
            events.extend(session.stop_sending(command.stream_id, command.code, self.now))
        elif isinstance(command, CloseConnection):
            events.extend(session.connection_lost(command.code, command.reason, self.now))
            self.closed_by = item.sender


def writes(item: InFlight, stream_id: int) -> bool:
    return isinstance(item.command, WriteStream) and item.command.stream_id == stream_id


def sent_by(side: Side) -> Callable[[InFlight], bool]:
    return lambda item: item.sender is side
