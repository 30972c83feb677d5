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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Final

import msgspec

from meshagent_gui.core.protocol.errors import ErrorCode, ProtocolError
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
