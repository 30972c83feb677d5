"""Terminal share messages (type codes 0x0200-0x02ff) and the viewer's side of the stream, sans-IO.

One TERMINAL stream per viewer. After the stream handshake the viewer sends :class:`Join`; the
host answers with the screen and then the live stream, in this order:

* a fresh join: ``Snapshot`` parts (the last one ``final``), ``ControlState``, then live messages;
* a resume (``Join.from_offset`` still inside the host's replay window): ``Resize`` (the size in
  force at that offset), the missed ``Output``, ``ControlState``, then live messages. Outside the
  window the host sends a snapshot instead, so a viewer never has to know the window;
* live: ``Output``, ``Resize``, ``ControlState``, ``ControlDenied`` in stream order; a viewer
  whose queue overflowed gets a fresh ``Snapshot`` + ``ControlState`` and live output after it;
* last: ``Ended`` (the command's exit status), then the host closes its direction.

Offsets count the bytes of PTY output since the session started. ``Output.offset`` is the offset
of its first byte; ``Snapshot.offset`` is where live output continues (the snapshot shows every
byte before it); ``Join.from_offset`` is the first byte the viewer does not have yet.

Viewer to host: ``Join`` (first, once), ``Input``, ``Resize`` (the viewer's console size: drives
the PTY only while that viewer is in control), ``ControlRequest``, ``ControlRelease``. The host
drops ``Input`` from anyone but the controller.

Hot messages (``Output``, ``Snapshot``, ``Input``, ``Resize``) use the struct codec, so data is
never copied on decode; the rare ones are MessagePack maps. :class:`ViewerStream` is what a
viewer does with the host's messages: it checks the offsets and says what to write to the
console (no I/O: the caller writes, after filtering with ``core.terminal.sanitize``).

:class:`HostControl` is the host's side of control: who may control, who does, and the epoch,
with the rules as one table (:data:`CONTROL_RULES`). Rules for its caller (the PTY host): give
every attached party a seat (:meth:`HostControl.join`) with the right its stream's capability
carries, feed it what the parties and the host's user did, with the time as ``now``, and carry
out the past-tense events it returns (send ``ControlState`` to every party on
:class:`ControlPassed`, ``ControlDenied`` on :class:`RequestRefused`); let a party's ``Input``
reach the PTY only when :meth:`HostControl.typed` says so. Its own mistakes (granting control
to a party that may only watch) raise :class:`ControlNotAllowed` and change nothing. What a
party says is checked against the table before anything changes; a party that floods requests
is told no a few times, then only now and then (its refusals are withheld, not queued).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Annotated, Final, NoReturn, TypeAlias

import msgspec

from meshagent_gui.core.protocol.errors import ErrorCode, LocalProtocolError, ProtocolError
from meshagent_gui.core.protocol.framing import BytesLike, KiB, MiB
from meshagent_gui.core.protocol.messages import BASE_REGISTRY
from meshagent_gui.core.protocol.registry import control_message, struct_message

MAX_COLS: Final = 1000
MAX_ROWS: Final = 1000
MAX_OUTPUT_DATA: Final = 256 * KiB
"""Output chunk cap: big enough to batch a flood, small enough not to delay other messages."""
MAX_SNAPSHOT_PART: Final = 1 * MiB
MAX_SNAPSHOT_BYTES: Final = 16 * MiB
"""A whole snapshot (all parts). Real ones are a few KiB (a 200x50 vim screen: about 10 KiB)."""
MAX_INPUT_DATA: Final = 16 * KiB
"""One Input message; a paste is split into several."""
MAX_PARTY_LENGTH: Final = 256
MAX_REASON_LENGTH: Final = 1 * KiB
MAX_TOKEN_LENGTH: Final = 4 * KiB

JOIN: Final = 0x0201
OUTPUT: Final = 0x0202
SNAPSHOT: Final = 0x0203
INPUT: Final = 0x0204
RESIZE: Final = 0x0205
CONTROL_STATE: Final = 0x0206
CONTROL_REQUEST: Final = 0x0207
CONTROL_RELEASE: Final = 0x0208
CONTROL_DENIED: Final = 0x0209
ENDED: Final = 0x020A

HOST_TO_VIEWER: Final = frozenset({OUTPUT, SNAPSHOT, RESIZE, CONTROL_STATE, CONTROL_DENIED, ENDED})
VIEWER_TO_HOST: Final = frozenset({JOIN, INPUT, RESIZE, CONTROL_REQUEST, CONTROL_RELEASE})

_OUTPUT_HEAD: Final = 8
_SNAPSHOT_HEAD: Final = 12

Offset = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
Party = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PARTY_LENGTH)]
Reason = Annotated[str, msgspec.Meta(max_length=MAX_REASON_LENGTH)]
Dimension = Annotated[int, msgspec.Meta(ge=0, le=max(MAX_COLS, MAX_ROWS))]


def check_size(cols: int, rows: int) -> None:
    """Raise ValueError unless ``cols`` x ``rows`` is a size a terminal can have here."""
    if not (1 <= cols <= MAX_COLS and 1 <= rows <= MAX_ROWS):
        raise ValueError(f"terminal size {cols}x{rows} outside 1..{MAX_COLS} x 1..{MAX_ROWS}")


def _length(data: BytesLike) -> int:
    return len(data) if type(data) is bytes else memoryview(data).nbytes


# ---------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Join:
    """Viewer -> host, once, first: start (``from_offset=None``) or resume the stream.

    ``cols``/``rows`` are the viewer's console size (0 = unknown); it matters only once this
    viewer is in control.
    """

    from_offset: Offset | None = None
    cols: Dimension = 0
    rows: Dimension = 0


@dataclass(frozen=True, slots=True)
class Output:
    """Host -> viewer: PTY output; ``offset`` is the stream offset of ``data[0]``."""

    offset: int
    data: bytes | memoryview

    def __post_init__(self) -> None:
        if _length(self.data) > MAX_OUTPUT_DATA:
            raise ValueError(f"output chunk over {MAX_OUTPUT_DATA} bytes")

    @property
    def end(self) -> int:
        return self.offset + _length(self.data)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Host -> viewer: bytes that repaint a ``cols`` x ``rows`` terminal from scratch.

    Sent in parts of at most MAX_SNAPSHOT_PART bytes, all with the same offset and size; the
    last one has ``final`` set. Live output continues at ``offset``.
    """

    offset: int
    cols: int
    rows: int
    final: bool
    data: bytes | memoryview

    def __post_init__(self) -> None:
        check_size(self.cols, self.rows)
        if _length(self.data) > MAX_SNAPSHOT_PART:
            raise ValueError(f"snapshot part over {MAX_SNAPSHOT_PART} bytes")


@dataclass(frozen=True, slots=True)
class Input:
    """Viewer -> host: keystrokes or a piece of a paste. Dropped unless the sender controls."""

    data: bytes | memoryview

    def __post_init__(self) -> None:
        if _length(self.data) > MAX_INPUT_DATA:
            raise ValueError(f"input over {MAX_INPUT_DATA} bytes")


@dataclass(frozen=True, slots=True)
class Resize:
    """Host -> viewer: the PTY's size changed. Viewer -> host: the viewer's console size."""

    cols: int
    rows: int

    def __post_init__(self) -> None:
        check_size(self.cols, self.rows)


@dataclass(frozen=True, slots=True)
class ControlState:
    """Host -> viewer: who controls the PTY (None: the host's own console), and if it is you.

    ``epoch`` grows by one on every change, so a viewer can tell a stale state from a new one.
    """

    controller: Party | None = None
    epoch: Annotated[int, msgspec.Meta(ge=0)] = 0
    you: bool = False


@dataclass(frozen=True, slots=True)
class ControlRequest:
    """Viewer -> host: asks for control. ``token``: a ``terminal:control`` capability for this
    session, fetched from the server just now (the server's ACL says who may ask); empty when
    the stream was opened with one already."""

    token: Annotated[str, msgspec.Meta(max_length=MAX_TOKEN_LENGTH)] = ""


@dataclass(frozen=True, slots=True)
class ControlRelease:
    """Viewer -> host: the controller gives control back to the host."""


@dataclass(frozen=True, slots=True)
class ControlDenied:
    """Host -> viewer: a ControlRequest was refused (someone else won, or not allowed)."""

    reason: Reason = ""


@dataclass(frozen=True, slots=True)
class Ended:
    """Host -> viewer, last: the shared command exited (``signal`` set if a signal killed it)."""

    exit_code: int | None = None
    signal: Annotated[int, msgspec.Meta(ge=1, le=255)] | None = None
    message: Reason = ""


HostMessage = Output | Snapshot | Resize | ControlState | ControlDenied | Ended
ViewerMessage = Join | Input | Resize | ControlRequest | ControlRelease

TERMINAL_REGISTRY: Final = BASE_REGISTRY.extended(
    [
        control_message(JOIN, Join),
        struct_message(
            OUTPUT,
            Output,
            "!Q",
            ("offset",),
            data="data",
            max_payload=_OUTPUT_HEAD + MAX_OUTPUT_DATA,
        ),
        struct_message(
            SNAPSHOT,
            Snapshot,
            "!QHH",
            ("offset", "cols", "rows"),
            data="data",
            flags={"final": 0x01},
            max_payload=_SNAPSHOT_HEAD + MAX_SNAPSHOT_PART,
        ),
        struct_message(INPUT, Input, "!", (), data="data", bulk=False, max_payload=MAX_INPUT_DATA),
        struct_message(RESIZE, Resize, "!HH", ("cols", "rows")),
        control_message(CONTROL_STATE, ControlState),
        control_message(CONTROL_REQUEST, ControlRequest),
        control_message(CONTROL_RELEASE, ControlRelease),
        control_message(CONTROL_DENIED, ControlDenied),
        control_message(ENDED, Ended),
    ]
)


def snapshot_parts(
    offset: int, cols: int, rows: int, data: BytesLike, *, part_size: int = MAX_SNAPSHOT_PART
) -> list[Snapshot]:
    """``data`` cut into Snapshot messages (at least one; the last is ``final``)."""
    if _length(data) > MAX_SNAPSHOT_BYTES:
        raise ValueError(f"snapshot over {MAX_SNAPSHOT_BYTES} bytes")
    view = memoryview(data)
    size = max(1, min(part_size, MAX_SNAPSHOT_PART))
    starts = range(0, max(len(view), 1), size)
    last = starts[-1]
    return [
        Snapshot(offset, cols, rows, start == last, bytes(view[start : start + size]))
        for start in starts
    ]


def input_parts(data: BytesLike) -> list[Input]:
    """``data`` (a paste, say) cut into Input messages."""
    view = memoryview(data)
    return [Input(bytes(view[i : i + MAX_INPUT_DATA])) for i in range(0, len(view), MAX_INPUT_DATA)]


# ---------------------------------------------------------------- the viewer's side


@dataclass(frozen=True, slots=True)
class ScreenReplaced:
    """A snapshot starts: clear the console state (and the output filter), size it like this."""

    cols: int
    rows: int
    offset: int


@dataclass(frozen=True, slots=True)
class OutputReceived:
    """Bytes to write to the console, in order (snapshot bytes included)."""

    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class SizeChanged:
    cols: int
    rows: int


@dataclass(frozen=True, slots=True)
class ControlChanged:
    controller: str | None
    you: bool
    epoch: int


@dataclass(frozen=True, slots=True)
class ControlRefused:
    reason: str


@dataclass(frozen=True, slots=True)
class SessionEnded:
    exit_code: int | None
    signal: int | None
    message: str


ViewerEvent = (
    ScreenReplaced | OutputReceived | SizeChanged | ControlChanged | ControlRefused | SessionEnded
)


@dataclass(slots=True)
class ViewerStream:
    """The viewer's bookkeeping of the host's messages: offsets, snapshots, size, control.

    ``receive(message)`` returns what happened; :attr:`offset` is what to put in
    ``Join.from_offset`` when reconnecting. Output already seen (a host may replay from an older
    offset) is trimmed; a gap, an Output in the middle of a snapshot or anything after Ended is
    a ProtocolError.
    """

    offset: int | None = None
    cols: int | None = None
    rows: int | None = None
    controller: str | None = None
    you_control: bool = False
    ended: SessionEnded | None = None
    _control_epoch: int = -1
    _snapshot: tuple[int, int, int] | None = field(default=None, repr=False)
    _snapshot_bytes: int = 0

    def join(self, cols: int = 0, rows: int = 0) -> Join:
        """The Join to send: a resume when something was received before."""
        return Join(self.offset, cols, rows)

    def receive(self, message: object) -> list[ViewerEvent]:
        if self.ended is not None:
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "terminal message after Ended")
        if self._snapshot is not None and not isinstance(message, Snapshot):
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "snapshot not finished")
        match message:
            case Output():
                return self._output(message)
            case Snapshot():
                return self._snapshot_part(message)
            case Resize(cols=cols, rows=rows):
                self.cols, self.rows = cols, rows
                return [SizeChanged(cols, rows)]
            case ControlState(controller=controller, epoch=epoch, you=you):
                if epoch < self._control_epoch:
                    return []  # older than what we know
                self._control_epoch = epoch
                self.controller, self.you_control = controller, you
                return [ControlChanged(controller, you, epoch)]
            case ControlDenied(reason=reason):
                return [ControlRefused(reason)]
            case Ended(exit_code=code, signal=signal, message=text):
                self.ended = SessionEnded(code, signal, text)
                return [self.ended]
        raise ProtocolError(
            ErrorCode.UNEXPECTED_MESSAGE, f"{type(message).__name__} on a viewer's stream"
        )

    def _output(self, message: Output) -> list[ViewerEvent]:
        if self.offset is None:
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "output before the first snapshot")
        if message.offset > self.offset:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, f"output gap: expected {self.offset}, got {message.offset}"
            )
        end = message.end
        if end <= self.offset:
            return []
        data = message.data
        if message.offset < self.offset:
            data = memoryview(data)[self.offset - message.offset :]
        self.offset = end
        return [OutputReceived(data)]

    def _snapshot_part(self, message: Snapshot) -> list[ViewerEvent]:
        events: list[ViewerEvent] = []
        key = (message.offset, message.cols, message.rows)
        if self._snapshot is None:
            self._snapshot, self._snapshot_bytes = key, 0
            events.append(ScreenReplaced(message.cols, message.rows, message.offset))
        elif self._snapshot != key:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "snapshot parts disagree")
        self._snapshot_bytes += _length(message.data)
        if self._snapshot_bytes > MAX_SNAPSHOT_BYTES:
            raise ProtocolError(ErrorCode.BUFFER_LIMIT_EXCEEDED, "snapshot too large")
        if _length(message.data):
            events.append(OutputReceived(message.data))
        if message.final:
            self._snapshot = None
            self.offset, self.cols, self.rows = message.offset, message.cols, message.rows
        return events


# ---------------------------------------------------------------- the host's side: control


class Right(Enum):
    """What a party's stream allows it (from its capability)."""

    WATCH = auto()
    """``terminal:view``: it sees the screen; it never controls and its input is dropped."""
    CONTROL = auto()
    """``terminal:control``: it may ask for control and be given it."""


class Holder(Enum):
    """Who controls the PTY, seen from the party an input is about."""

    HOST = auto()
    """Nobody: the host's own console (which can always type)."""
    PARTY = auto()
    """This party."""
    OTHER = auto()
    """Another party."""


class ControlInput(Enum):
    """What happened, about one party."""

    REQUESTED = auto()
    """It sent ControlRequest and the host's policy is first come, first served."""
    GRANTED = auto()
    """The host's decision: it gets control (whoever had it is demoted)."""
    DENIED = auto()
    """The host's decision: its request is refused (the user said no, a bad token, policy)."""
    PROVED = auto()
    """It showed a valid ``terminal:control`` capability after joining (checked by the caller)."""
    RELEASED = auto()
    """It sent ControlRelease."""
    REVOKED = auto()
    """The host takes control back from it."""
    LEFT = auto()
    """Its stream ended."""
    TYPED = auto()
    """It sent Input."""


class Verdict(Enum):
    TAKE = auto()
    """The party becomes the controller, demoting any other: the epoch grows by one."""
    RETURN = auto()
    """Control goes back to the host's console: the epoch grows by one."""
    KEEP = auto()
    """Nothing changes (it already holds control, or did not hold it)."""
    REFUSE = auto()
    """Tell the party no (ControlDenied); nothing changes."""
    ALLOW = auto()
    """The party may control from now on (it does not control yet)."""
    WRITE = auto()
    """Its input goes to the PTY."""
    DROP = auto()
    """Its input is dropped (and counted by the caller)."""
    FORBID = auto()
    """The host's own call breaks the rules: :class:`ControlNotAllowed`, nothing changes."""


@dataclass(frozen=True, slots=True)
class ControlRule:
    verdict: Verdict
    reason: str = ""
    """For TAKE/RETURN, the reason reported; for REFUSE/FORBID, the text (``{controller}``,
    ``{party}`` and ``{reason}`` are filled in)."""


_W, _C = Right.WATCH, Right.CONTROL
_HOST, _PARTY, _OTHER = Holder.HOST, Holder.PARTY, Holder.OTHER
_I = ControlInput
_V = Verdict

CONTROL_POSITIONS: Final = tuple(
    (right, holder) for right in Right for holder in Holder if (right, holder) != (_W, _PARTY)
)
"""Every (right, holder) a party can be in: one that may only watch never holds control."""

WATCH_ONLY: Final = "this viewer may only watch"
IN_CONTROL: Final = "{controller} is in control"

# The rules. Every position has a rule for every input (a test checks), so the code never
# guesses: it looks up (the party's right, who holds control seen from it, what happened).
CONTROL_RULES: Final[Mapping[tuple[Right, Holder, ControlInput], ControlRule]] = {
    # Asking, when the host grants by itself: first come; a second asker is told who won.
    (_C, _HOST, _I.REQUESTED): ControlRule(_V.TAKE, "granted"),
    (_C, _PARTY, _I.REQUESTED): ControlRule(_V.KEEP),
    (_C, _OTHER, _I.REQUESTED): ControlRule(_V.REFUSE, IN_CONTROL),
    (_W, _HOST, _I.REQUESTED): ControlRule(_V.REFUSE, WATCH_ONLY),
    (_W, _OTHER, _I.REQUESTED): ControlRule(_V.REFUSE, WATCH_ONLY),
    # The host's decisions: a grant demotes whoever had control; a refusal changes nothing.
    (_C, _HOST, _I.GRANTED): ControlRule(_V.TAKE, "granted"),
    (_C, _OTHER, _I.GRANTED): ControlRule(_V.TAKE, "granted"),
    (_C, _PARTY, _I.GRANTED): ControlRule(_V.KEEP),
    (_W, _HOST, _I.GRANTED): ControlRule(_V.FORBID, "{party} may not control"),
    (_W, _OTHER, _I.GRANTED): ControlRule(_V.FORBID, "{party} may not control"),
    **{(r, h, _I.DENIED): ControlRule(_V.REFUSE, "{reason}") for r, h in CONTROL_POSITIONS},
    # A capability shown later upgrades the right; it grants nothing by itself.
    (_W, _HOST, _I.PROVED): ControlRule(_V.ALLOW),
    (_W, _OTHER, _I.PROVED): ControlRule(_V.ALLOW),
    **{(_C, h, _I.PROVED): ControlRule(_V.KEEP) for h in Holder},
    # Giving back, taking back, leaving: only the controller's change anything.
    (_C, _PARTY, _I.RELEASED): ControlRule(_V.RETURN, "released"),
    (_C, _PARTY, _I.REVOKED): ControlRule(_V.RETURN, "revoked"),
    (_C, _PARTY, _I.LEFT): ControlRule(_V.RETURN, "left"),
    **{
        (r, h, inp): ControlRule(_V.KEEP)
        for r, h in CONTROL_POSITIONS
        if h is not _PARTY
        for inp in (_I.RELEASED, _I.REVOKED, _I.LEFT)
    },
    # Input: the controller's reaches the PTY, everyone else's is dropped.
    (_C, _PARTY, _I.TYPED): ControlRule(_V.WRITE),
    **{(r, h, _I.TYPED): ControlRule(_V.DROP) for r, h in CONTROL_POSITIONS if h is not _PARTY},
}

REFUSAL_BURST: Final = 8
"""Refusals a party is told in a row; past them, one per REFUSAL_INTERVAL (the rest withheld)."""
REFUSAL_INTERVAL: Final = 0.25


@dataclass(frozen=True, slots=True)
class ControlPassed:
    """Control changed hands (``epoch`` grew by one): every party gets its ControlState.

    ``seat``/``controller``: the new controller (None: the host's console); ``previous``: who
    had it (demoted, released, revoked, left).
    """

    seat: int | None
    controller: str | None
    previous_seat: int | None
    previous: str | None
    reason: str
    epoch: int
    at: float


@dataclass(frozen=True, slots=True)
class RequestRefused:
    """Tell the party no: send it ``ControlDenied(reason)``."""

    seat: int
    reason: str


@dataclass(frozen=True, slots=True)
class RefusalWithheld:
    """A refusal not sent: the party asks faster than it is answered (or has left)."""

    seat: int


@dataclass(frozen=True, slots=True)
class ControlAllowed:
    """The party showed a ``terminal:control`` capability: it may ask for control now."""

    seat: int


ControlEvent: TypeAlias = ControlPassed | RequestRefused | RefusalWithheld | ControlAllowed


class ControlNotAllowed(LocalProtocolError):
    """The host tried to give control to a party that may only watch (or has left)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNEXPECTED_MESSAGE, message)


@dataclass(slots=True)
class _Seat:
    party: str
    right: Right
    refusals: float
    """Refusals it may still be told now (refills at one per REFUSAL_INTERVAL)."""
    refilled_at: float


class HostControl:
    """Who may control one shared PTY, who does, and the epoch (see :data:`CONTROL_RULES`).

    Seats are small integers handed out by :meth:`join`; a seat that left (or never existed)
    is a party that may only watch and holds nothing. Sans-IO: ``now`` is a monotonic time in
    seconds, used only to pace refusals.
    """

    def __init__(
        self, *, refusal_burst: int = REFUSAL_BURST, refusal_interval: float = REFUSAL_INTERVAL
    ) -> None:
        self._seats: dict[int, _Seat] = {}
        self._next_seat = 0
        self._controller: int | None = None
        self._epoch = 0
        self._burst = refusal_burst
        self._interval = refusal_interval

    # ------------------------------------------------------------ state

    @property
    def controller(self) -> int | None:
        """The controller's seat; None: the host's own console."""
        return self._controller

    @property
    def controller_name(self) -> str | None:
        return None if self._controller is None else self._seats[self._controller].party

    @property
    def epoch(self) -> int:
        """Grows by one on every change of controller."""
        return self._epoch

    @property
    def seats(self) -> int:
        return len(self._seats)

    def right(self, seat: int) -> Right:
        known = self._seats.get(seat)
        return known.right if known is not None else Right.WATCH

    def position(self, seat: int) -> tuple[Right, Holder]:
        """The party's right and who holds control, seen from it."""
        if self._controller is None:
            holder = Holder.HOST
        else:
            holder = Holder.PARTY if self._controller == seat else Holder.OTHER
        return self.right(seat), holder

    def state_for(self, seat: int) -> ControlState:
        """The ControlState to send to the party at ``seat``."""
        return ControlState(self.controller_name, self._epoch, self._controller == seat)

    # ------------------------------------------------------------ inputs

    def join(self, party: str, right: Right, now: float) -> int:
        """A party attached; its seat. Joining changes nobody's control."""
        seat = self._next_seat
        self._next_seat += 1
        self._seats[seat] = _Seat(party, right, float(self._burst), now)
        return seat

    def leave(self, seat: int, now: float) -> list[ControlEvent]:
        """The party's stream ended: if it controlled, control goes back to the host."""
        events = self._apply(seat, ControlInput.LEFT, now)
        self._seats.pop(seat, None)
        return events

    def request(self, seat: int, now: float) -> list[ControlEvent]:
        """The party asked, and the host grants by itself: first come, first served."""
        return self._apply(seat, ControlInput.REQUESTED, now)

    def grant(self, seat: int, now: float) -> list[ControlEvent]:
        """The host gives the party control (demoting any other); raises
        :class:`ControlNotAllowed` if it may only watch."""
        return self._apply(seat, ControlInput.GRANTED, now)

    def deny(self, seat: int, reason: str, now: float) -> list[ControlEvent]:
        """The host refuses the party's request (its user, its policy, a bad token)."""
        return self._apply(seat, ControlInput.DENIED, now, reason=reason)

    def prove(self, seat: int, now: float) -> list[ControlEvent]:
        """The party showed a valid ``terminal:control`` capability (the caller checked it)."""
        return self._apply(seat, ControlInput.PROVED, now)

    def release(self, seat: int, now: float) -> list[ControlEvent]:
        """The party gives control back; nothing happens if it did not hold it."""
        return self._apply(seat, ControlInput.RELEASED, now)

    def revoke(self, now: float) -> list[ControlEvent]:
        """The host takes control back to its console."""
        if self._controller is None:
            return []
        return self._apply(self._controller, ControlInput.REVOKED, now)

    def typed(self, seat: int) -> bool:
        """May the party's input reach the PTY? (Only the controller's does.)"""
        right, holder = self.position(seat)
        return CONTROL_RULES[right, holder, ControlInput.TYPED].verdict is Verdict.WRITE

    # ------------------------------------------------------------ the table, followed

    def _apply(
        self, seat: int, inp: ControlInput, now: float, *, reason: str = ""
    ) -> list[ControlEvent]:
        right, holder = self.position(seat)
        rule = CONTROL_RULES[right, holder, inp]
        known = self._seats.get(seat)
        match rule.verdict:
            case Verdict.TAKE:
                assert known is not None  # only CONTROL takes, and unknown seats only watch
                return [self._pass(seat, rule.reason, now)]
            case Verdict.RETURN:
                return [self._pass(None, rule.reason, now)]
            case Verdict.REFUSE:
                if known is None or not self._may_refuse(known, now):
                    return [RefusalWithheld(seat)]
                text = rule.reason.format(
                    controller=self.controller_name, party=known.party, reason=reason
                )
                return [RequestRefused(seat, text[:MAX_REASON_LENGTH])]
            case Verdict.ALLOW:
                if known is None:
                    return []
                known.right = Right.CONTROL
                return [ControlAllowed(seat)]
            case Verdict.FORBID:
                party = known.party if known is not None else f"seat {seat}"
                _forbid(rule.reason.format(party=party, controller=self.controller_name))
            case _:
                return []

    def _pass(self, seat: int | None, reason: str, now: float) -> ControlPassed:
        previous = self._controller
        previous_name = self.controller_name
        self._controller = seat
        self._epoch += 1
        return ControlPassed(
            seat, self.controller_name, previous, previous_name, reason, self._epoch, now
        )

    def _may_refuse(self, seat: _Seat, now: float) -> bool:
        if self._interval > 0 and now > seat.refilled_at:
            gained = (now - seat.refilled_at) / self._interval
            seat.refusals = min(float(self._burst), seat.refusals + gained)
        seat.refilled_at = max(seat.refilled_at, now)
        if seat.refusals < 1:
            return False
        seat.refusals -= 1
        return True


def _forbid(message: str) -> NoReturn:
    raise ControlNotAllowed(message)
