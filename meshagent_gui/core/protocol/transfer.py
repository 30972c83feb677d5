"""File and folder transfer: messages, and the sender's and receiver's state machines.

One transfer runs on one stream (role TRANSFER, ``Hello.resource`` = the transfer id). Files
and folders go **file by file in one pipelined stream**: the sender offers the entries, the
receiver answers with what it already holds (per-file bitmaps of verified chunks, for resume),
then the sender streams every missing chunk and each file's whole-file digest without waiting
for anything; the receiver answers asynchronously (resend requests, progress, per-file
verdicts, and ``Complete``). docs/protocol.md ("Transfers") draws the exchange.

Sans-IO like :mod:`~meshagent_gui.core.protocol.handshake`: no clock (``now`` is passed in), no
disk, no hashing. The service feeds :class:`TransferSender` / :class:`TransferReceiver` the
peer's decoded messages and gets back past-tense **events**; its own calls return the
**messages** to send. The rules live in the tables below (``*_TRANSITIONS``, ``*_ADMITS``);
the code only follows them.

Hostile input: everything a peer says is checked against the offer before it is acted on
(index is a file, chunk number in range, exact data length, nothing beyond the offered bytes,
no FileEnd before its chunks...). A violation raises :class:`TransferProtocolError` (a
:class:`ProtocolError`) with a :class:`TransferErrorCode`, before any state changes and before
anything is allocated per a claimed size: per-file accounting grows only with chunks that
actually arrived. Our own mistakes raise :class:`LocalProtocolError` and change nothing.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Annotated, Final, Literal, NoReturn, TypeAlias

import msgspec

from meshagent_gui.core.protocol.errors import (
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    WireIntEnum,
)
from meshagent_gui.core.protocol.framing import KiB, MiB
from meshagent_gui.core.protocol.messages import (
    BASE_REGISTRY,
    MAX_REASON_LENGTH,
    MAX_RESOURCE_LENGTH,
)
from meshagent_gui.core.protocol.registry import control_message, struct_message

# --------------------------------------------------------------------------- limits

MAX_CHUNK_SIZE: Final = 4 * MiB
"""The largest chunk a sender may use: a Chunk frame (40-byte head + data) fits the bulk cap."""
DEFAULT_CHUNK_SIZE: Final = 1 * MiB
MAX_OFFER_ENTRIES: Final = 1_000_000
MAX_PATH_LENGTH: Final = 4096
"""Bytes of UTF-8 in an entry's path (the wire bound counts characters; the receiver, bytes)."""
MAX_OFFER_PAYLOAD: Final = 16 * MiB
"""Offer and Answer: 10,000 entries with 200-byte paths take about 2.6 MiB."""
MAX_CHUNKS_PER_FILE: Final = 1 << 32
"""Chunk numbers are u32."""
DIGEST_SIZE: Final = 32
KEY_SIZE: Final = 16
MAX_FILE_SIZE: Final = (1 << 63) - 1
DEFAULT_MAX_RESENDS: Final = 3
DEFAULT_PROGRESS_INTERVAL: Final = 0.1


@dataclass(frozen=True, slots=True)
class TransferLimits:
    """What a receiver accepts in an offer; anything beyond is a :class:`TransferProtocolError`."""

    max_entries: int = MAX_OFFER_ENTRIES
    max_total_bytes: int = 1 << 50
    max_file_size: int = 1 << 50
    max_path_length: int = MAX_PATH_LENGTH
    min_chunk_size: int = 16 * KiB
    """Tiny chunks cost a frame each: a floor keeps a sender from multiplying our work."""
    max_chunk_size: int = MAX_CHUNK_SIZE


# --------------------------------------------------------------------------- error codes


class TransferErrorCode(WireIntEnum):
    """Why a transfer (or a part of it) failed: the transfer range 0x100-0x1ff of the one code
    space of :class:`ErrorCode`, plus the generic codes a transfer uses, with the same numbers."""

    NO_ERROR = 0x00
    PROTOCOL_ERROR = 0x01
    INTERNAL_ERROR = 0x02
    CANCELLED = 0x03
    UNEXPECTED_MESSAGE = 0x16
    # The offer, checked by the receiver.
    BAD_OFFER = 0x100
    """Inconsistent: total differs from the sizes, a folder with a size, a duplicate path, the
    wrong transfer id."""
    TOO_MANY_ENTRIES = 0x101
    TOO_LARGE = 0x102
    """The total, a file, or a file's chunk count is over the receiver's limit."""
    BAD_PATH = 0x103
    """Empty, an empty component (leading, trailing or double '/'), NUL, or too long."""
    BAD_CHUNK_SIZE = 0x104
    # Data from the sender, checked by the receiver against the offer.
    NO_SUCH_ENTRY = 0x110
    NOT_A_FILE = 0x111
    CHUNK_OUT_OF_RANGE = 0x112
    BAD_CHUNK_LENGTH = 0x113
    EARLY_FILE_END = 0x114
    DUPLICATE_FILE_END = 0x115
    EXCESS_DATA = 0x116
    """More chunk bytes than offered (plus the resends asked for)."""
    # Reports from the receiver, checked by the sender.
    BAD_ANSWER = 0x120
    BAD_RESEND = 0x121
    BAD_REPORT = 0x122
    """A Progress, FileDone or Complete that contradicts what was sent or confirmed."""
    # Reasons to give up (sent in Cancel, or as the stream's error code).
    TOO_MANY_RESENDS = 0x130
    DISK_FULL = 0x131
    SOURCE_CHANGED = 0x132
    SOURCE_UNREADABLE = 0x133
    OFFER_TIMEOUT = 0x134


class TransferProtocolError(ProtocolError):
    """The peer broke the transfer protocol. ``code`` is the :class:`ErrorCode` to send (same
    number as ``transfer_code``); ``transfer_code`` names it."""

    def __init__(self, transfer_code: TransferErrorCode, message: str) -> None:
        super().__init__(ErrorCode(transfer_code.value), message)
        self.args = (f"{transfer_code.name}: {message}",)
        self.transfer_code = transfer_code


def _violation(code: TransferErrorCode, message: str) -> NoReturn:
    raise TransferProtocolError(code, message)


def _misuse(message: str) -> NoReturn:
    raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, message)


# --------------------------------------------------------------------------- messages

U32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF_FFFF)]
ByteCount = Annotated[int, msgspec.Meta(ge=0, le=MAX_FILE_SIZE)]  # msgspec bounds are int64
Reason = Annotated[str, msgspec.Meta(max_length=MAX_REASON_LENGTH)]
EntryKind: TypeAlias = Literal["file", "dir"]


@dataclass(frozen=True, slots=True)
class Entry:
    """One offered file or folder. ``path`` is relative, '/'-separated, checked for syntax here
    and sanitised by the receiving service (core/share/paths.py)."""

    path: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PATH_LENGTH)]
    kind: EntryKind
    size: ByteCount
    mode: Annotated[int, msgspec.Meta(ge=0, le=0o7777)]
    """Only the executable bit is honoured (0o755 / 0o644)."""
    mtime_ns: Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)]
    key: Annotated[bytes, msgspec.Meta(min_length=KEY_SIZE, max_length=KEY_SIZE)]
    """Identifies this version of this file (the sender hashes path, size, mtime, inode):
    the same key means a partial file on the receiver can be resumed."""


@dataclass(frozen=True, slots=True)
class Offer:
    transfer_id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_RESOURCE_LENGTH)]
    entries: Annotated[tuple[Entry, ...], msgspec.Meta(max_length=MAX_OFFER_ENTRIES)]
    total_bytes: ByteCount
    """The sum of the files' sizes."""
    chunk_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_CHUNK_SIZE)]


@dataclass(frozen=True, slots=True)
class Have:
    """Chunks of entry ``index`` the receiver already holds, verified: bit ``i`` of byte
    ``i // 8``, least significant bit first; exactly ``ceil(chunks / 8)`` bytes."""

    index: U32
    chunks: bytes


@dataclass(frozen=True, slots=True)
class Answer:
    accepted: bool
    reason: Reason = ""
    have: Annotated[tuple[Have, ...], msgspec.Meta(max_length=MAX_OFFER_ENTRIES)] = ()


@dataclass(frozen=True, slots=True)
class Chunk:
    """Chunk ``chunk`` of file ``index``: bytes ``[chunk * chunk_size, ...)``, exactly
    ``chunk_size`` long except the file's last chunk. ``digest`` is blake3 of ``data``."""

    index: int
    chunk: int
    digest: bytes
    data: bytes | memoryview = field(repr=False)


@dataclass(frozen=True, slots=True)
class FileEnd:
    """After the file's last chunk: blake3 of the whole file."""

    index: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class Resend:
    """Receiver -> sender: that chunk failed its digest; send it again."""

    index: int
    chunk: int


@dataclass(frozen=True, slots=True)
class Progress:
    """Receiver -> sender: bytes held verified (resumed ones included), files finished."""

    bytes_verified: int
    files_done: int


@dataclass(frozen=True, slots=True)
class FileDone:
    """Receiver -> sender: the file is verified and in place (``ok``), or it failed."""

    index: U32
    ok: bool
    reason: Reason = ""


@dataclass(frozen=True, slots=True)
class Cancel:
    """Either side gives up on the whole transfer; it sends nothing after this."""

    reason: Reason = ""
    code: TransferErrorCode = TransferErrorCode.CANCELLED


@dataclass(frozen=True, slots=True)
class Complete:
    """Receiver -> sender: every file is done; ``files`` arrived whole, ``bytes`` in total."""

    files: int
    bytes: int


OFFER: Final = 0x0100
ANSWER: Final = 0x0101
CHUNK: Final = 0x0102
FILE_END: Final = 0x0103
RESEND: Final = 0x0104
PROGRESS: Final = 0x0105
FILE_DONE: Final = 0x0106
CANCEL: Final = 0x0107
COMPLETE: Final = 0x0108

CHUNK_HEAD_SIZE: Final = 4 + 4 + DIGEST_SIZE

TRANSFER_MESSAGES: Final = (
    control_message(OFFER, Offer, max_payload=MAX_OFFER_PAYLOAD),
    control_message(ANSWER, Answer, max_payload=MAX_OFFER_PAYLOAD),
    struct_message(CHUNK, Chunk, "!II32s", ("index", "chunk", "digest"), data="data"),
    struct_message(FILE_END, FileEnd, "!I32s", ("index", "digest")),
    struct_message(RESEND, Resend, "!II", ("index", "chunk")),
    struct_message(PROGRESS, Progress, "!QI", ("bytes_verified", "files_done")),
    control_message(FILE_DONE, FileDone),
    control_message(CANCEL, Cancel),
    struct_message(COMPLETE, Complete, "!IQ", ("files", "bytes")),
)
TRANSFER_REGISTRY: Final = BASE_REGISTRY.extended(TRANSFER_MESSAGES)

SenderMessage: TypeAlias = Offer | Chunk | FileEnd | Cancel
ReceiverMessage: TypeAlias = Answer | Resend | Progress | FileDone | Cancel | Complete

# --------------------------------------------------------------------------- chunk arithmetic


def chunk_count(size: int, chunk_size: int) -> int:
    """How many chunks a file of ``size`` bytes has (an empty file has none)."""
    return -(-size // chunk_size)


def chunk_length(size: int, chunk_size: int, chunk: int) -> int:
    """Length of chunk ``chunk`` of a file of ``size`` bytes (the last one holds the rest)."""
    return min(chunk_size, size - chunk * chunk_size)


def bitmap_size(chunks: int) -> int:
    return (chunks + 7) // 8


def make_bitmap(chunks: Iterable[int], count: int) -> bytes:
    """The ``Have`` bitmap of ``chunks`` (each below ``count``)."""
    bitmap = bytearray(bitmap_size(count))
    for chunk in chunks:
        if not 0 <= chunk < count:
            raise ValueError(f"chunk {chunk} outside 0..{count - 1}")
        bitmap[chunk >> 3] |= 1 << (chunk & 7)
    return bytes(bitmap)


def full_bitmap(count: int) -> bytes:
    return make_bitmap(range(count), count)


def bitmap_chunks(bitmap: bytes) -> Iterator[int]:
    """The chunk numbers whose bits are set, in increasing order."""
    for byte_index, byte in enumerate(bitmap):
        bits = byte
        while bits:
            low = bits & -bits
            yield byte_index * 8 + low.bit_length() - 1
            bits ^= low


def is_valid_bitmap(bitmap: bytes, count: int) -> bool:
    """Exactly ``ceil(count / 8)`` bytes and no bit at or beyond ``count``."""
    if len(bitmap) != bitmap_size(count):
        return False
    spare = count & 7
    return not (spare and bitmap[-1] >> spare)


def bitmap_bytes(bitmap: bytes, size: int, chunk_size: int) -> int:
    """How many of the file's bytes the set chunks cover."""
    count = chunk_count(size, chunk_size)
    if not count:
        return 0
    chunks = int.from_bytes(bitmap, "little").bit_count()
    last = count - 1
    if bitmap[last >> 3] >> (last & 7) & 1:
        return (chunks - 1) * chunk_size + chunk_length(size, chunk_size, last)
    return chunks * chunk_size


def path_syntax_error(path: str, max_length: int = MAX_PATH_LENGTH) -> str | None:
    """Why ``path`` cannot be an offered path, or ``None``. Syntax only: the receiving service
    sanitises it (``..``, drive letters, reserved names, ...) with core/share/paths.py."""
    if not path:
        return "empty path"
    # A str of n characters has at most 4n bytes of UTF-8: encode only the long ones.
    if len(path) * 4 > max_length and len(path.encode("utf-8", "surrogatepass")) > max_length:
        return f"path longer than {max_length} bytes"
    if path[0] == "/" or path[-1] == "/" or "//" in path:
        return "empty path component"
    if "\x00" in path:
        return "NUL in path"
    return None


# --------------------------------------------------------------------------- plan (sender)


@dataclass(frozen=True, slots=True)
class SendChunk:
    """Read chunk ``chunk`` of entry ``index`` (``length`` bytes at ``offset``), send it as a
    :class:`Chunk`, then call :meth:`TransferSender.chunk_sent`."""

    index: int
    chunk: int
    offset: int
    length: int
    resend: bool = False


@dataclass(frozen=True, slots=True)
class EndFile:
    """Every chunk of entry ``index`` went out: call :meth:`TransferSender.file_sent` with the
    whole-file blake3 (over every chunk, including those the receiver already had)."""

    index: int


Work: TypeAlias = SendChunk | EndFile

# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class AnswerReceived:
    accepted: bool
    reason: str
    have: tuple[Have, ...]


@dataclass(frozen=True, slots=True)
class ResendRequested:
    """A chunk failed its digest at the receiver; it is queued ahead of new chunks."""

    index: int
    chunk: int


@dataclass(frozen=True, slots=True)
class ProgressReported:
    bytes_verified: int
    files_done: int


@dataclass(frozen=True, slots=True)
class FileConfirmed:
    index: int
    ok: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Completed:
    files: int
    bytes: int


@dataclass(frozen=True, slots=True)
class CancelledByPeer:
    reason: str
    code: TransferErrorCode


@dataclass(frozen=True, slots=True)
class TransferGaveUp:
    """We give up (e.g. a chunk failed too often): send ``cancel`` to the peer."""

    code: TransferErrorCode
    reason: str
    cancel: Cancel


@dataclass(frozen=True, slots=True)
class OfferReceived:
    """Decide: :meth:`TransferReceiver.accept` or :meth:`TransferReceiver.decline`."""

    transfer_id: str
    entries: tuple[Entry, ...]
    total_bytes: int
    chunk_size: int


@dataclass(frozen=True, slots=True)
class ChunkReceived:
    """A chunk we need, checked against the offer (not its digest: verify it, then call
    :meth:`TransferReceiver.chunk_verified` or :meth:`TransferReceiver.chunk_failed`)."""

    index: int
    chunk: int
    offset: int
    digest: bytes
    data: bytes | memoryview = field(repr=False)


@dataclass(frozen=True, slots=True)
class FileEnded:
    """The file's FileEnd arrived and every chunk is verified: check ``digest`` over the
    whole file, put it in place, then call :meth:`TransferReceiver.file_done`."""

    index: int
    digest: bytes


SenderEvent: TypeAlias = (
    AnswerReceived
    | ResendRequested
    | ProgressReported
    | FileConfirmed
    | Completed
    | CancelledByPeer
    | TransferGaveUp
)
ReceiverEvent: TypeAlias = OfferReceived | ChunkReceived | FileEnded | CancelledByPeer

# --------------------------------------------------------------------------- tables


class Admit(Enum):
    HANDLE = auto()
    IGNORE = auto()
    """Dropped unread: it was in flight when the transfer ended on our side."""


def _admission(admits: Mapping[type, Admit], state: Enum, message: object) -> Admit:
    """How ``state`` (whose row of an ADMITS table is ``admits``) takes ``message``: a message
    the row does not list is a violation."""
    admit = admits.get(type(message))
    if admit is None:
        _violation(
            TransferErrorCode.UNEXPECTED_MESSAGE, f"{type(message).__name__} while {state.name}"
        )
    return admit


class SenderState(Enum):
    IDLE = auto()
    OFFERING = auto()
    """Offer sent, waiting for the Answer."""
    STREAMING = auto()
    """Work to hand out: chunks, FileEnds, queued resends."""
    FINISHING = auto()
    """Everything sent; waiting for the receiver's verdicts (a Resend brings work back)."""
    DONE = auto()
    DECLINED = auto()
    CANCELLED = auto()
    FAILED = auto()


class SenderInput(Enum):
    OFFER_SENT = auto()
    ACCEPTED = auto()
    DECLINED = auto()
    WORK_ADDED = auto()
    WORK_EXHAUSTED = auto()
    COMPLETED = auto()
    CANCEL_SENT = auto()
    CANCEL_RECEIVED = auto()
    GAVE_UP = auto()
    VIOLATED = auto()
    """The receiver broke the protocol."""


_SS, _SI = SenderState, SenderInput
_SENDER_LIVE: Final = (_SS.OFFERING, _SS.STREAMING, _SS.FINISHING)
SENDER_TERMINAL_STATES: Final = frozenset({_SS.DONE, _SS.DECLINED, _SS.CANCELLED, _SS.FAILED})

SENDER_TRANSITIONS: Final[Mapping[tuple[SenderState, SenderInput], SenderState]] = {
    (_SS.IDLE, _SI.OFFER_SENT): _SS.OFFERING,
    (_SS.OFFERING, _SI.ACCEPTED): _SS.STREAMING,
    (_SS.OFFERING, _SI.DECLINED): _SS.DECLINED,
    (_SS.STREAMING, _SI.WORK_ADDED): _SS.STREAMING,
    (_SS.FINISHING, _SI.WORK_ADDED): _SS.STREAMING,
    (_SS.STREAMING, _SI.WORK_EXHAUSTED): _SS.FINISHING,
    (_SS.FINISHING, _SI.COMPLETED): _SS.DONE,
    (_SS.STREAMING, _SI.GAVE_UP): _SS.FAILED,
    (_SS.FINISHING, _SI.GAVE_UP): _SS.FAILED,
    **{(state, _SI.CANCEL_SENT): _SS.CANCELLED for state in _SENDER_LIVE},
    **{(state, _SI.CANCEL_RECEIVED): _SS.CANCELLED for state in _SENDER_LIVE},
    **{(state, _SI.VIOLATED): _SS.FAILED for state in _SENDER_LIVE},
}

_FROM_RECEIVER: Final = (Answer, Resend, Progress, FileDone, Cancel, Complete)
_REPORTS: Final[dict[type, Admit]] = {
    kind: Admit.HANDLE for kind in (Resend, Progress, FileDone, Complete, Cancel)
}

# Which receiver messages each sender state admits; anything else is UNEXPECTED_MESSAGE.
SENDER_ADMITS: Final[Mapping[SenderState, Mapping[type, Admit]]] = {
    _SS.IDLE: {},
    _SS.OFFERING: {Answer: Admit.HANDLE, Cancel: Admit.HANDLE},
    _SS.STREAMING: _REPORTS,
    _SS.FINISHING: _REPORTS,
    _SS.DONE: {},
    _SS.DECLINED: {},
    _SS.CANCELLED: {kind: Admit.IGNORE for kind in _FROM_RECEIVER},
    _SS.FAILED: {kind: Admit.IGNORE for kind in _FROM_RECEIVER},
}


class OutgoingFile(Enum):
    """A file's life at the sender."""

    PENDING = auto()
    ENDED = auto()
    """FileEnd sent; waiting for FileDone."""
    DONE = auto()
    FAILED = auto()


class OutgoingInput(Enum):
    END_SENT = auto()
    CONFIRMED_OK = auto()
    CONFIRMED_FAILED = auto()


_OF, _OI = OutgoingFile, OutgoingInput
_CONFIRMED: Final = (_OF.DONE, _OF.FAILED)

# A receiver may fail a file at any time (a refused name, a full disk) but can only confirm
# it whole after its FileEnd; anything else from the receiver is BAD_REPORT.
OUTGOING_FILE_TRANSITIONS: Final[Mapping[tuple[OutgoingFile, OutgoingInput], OutgoingFile]] = {
    (_OF.PENDING, _OI.END_SENT): _OF.ENDED,
    (_OF.ENDED, _OI.CONFIRMED_OK): _OF.DONE,
    (_OF.PENDING, _OI.CONFIRMED_FAILED): _OF.FAILED,
    (_OF.ENDED, _OI.CONFIRMED_FAILED): _OF.FAILED,
}


class ReceiverState(Enum):
    AWAITING_OFFER = auto()
    DECIDING = auto()
    """Offer received; the service accepts or declines."""
    RECEIVING = auto()
    DONE = auto()
    """Complete sent."""
    DECLINED = auto()
    CANCELLED = auto()
    BROKEN = auto()
    """The sender broke the protocol; every later call raises the same error."""


class ReceiverInput(Enum):
    OFFER_RECEIVED = auto()
    ACCEPT_SENT = auto()
    DECLINE_SENT = auto()
    ALL_FILES_DONE = auto()
    CANCEL_SENT = auto()
    CANCEL_RECEIVED = auto()
    VIOLATED = auto()


_RS, _RI = ReceiverState, ReceiverInput
_RECEIVER_LIVE: Final = (_RS.AWAITING_OFFER, _RS.DECIDING, _RS.RECEIVING)

RECEIVER_TRANSITIONS: Final[Mapping[tuple[ReceiverState, ReceiverInput], ReceiverState]] = {
    (_RS.AWAITING_OFFER, _RI.OFFER_RECEIVED): _RS.DECIDING,
    (_RS.DECIDING, _RI.ACCEPT_SENT): _RS.RECEIVING,
    (_RS.DECIDING, _RI.DECLINE_SENT): _RS.DECLINED,
    (_RS.RECEIVING, _RI.ALL_FILES_DONE): _RS.DONE,
    **{(state, _RI.CANCEL_SENT): _RS.CANCELLED for state in _RECEIVER_LIVE},
    **{(state, _RI.CANCEL_RECEIVED): _RS.CANCELLED for state in _RECEIVER_LIVE},
    **{(state, _RI.VIOLATED): _RS.BROKEN for state in _RECEIVER_LIVE},
}

_FROM_SENDER: Final = (Offer, Chunk, FileEnd, Cancel)

# The sender streams only after our Answer, so data before it is a violation. A Cancel may
# cross our Complete or our decline: dropped.
RECEIVER_ADMITS: Final[Mapping[ReceiverState, Mapping[type, Admit]]] = {
    _RS.AWAITING_OFFER: {Offer: Admit.HANDLE, Cancel: Admit.HANDLE},
    _RS.DECIDING: {Cancel: Admit.HANDLE},
    _RS.RECEIVING: {Chunk: Admit.HANDLE, FileEnd: Admit.HANDLE, Cancel: Admit.HANDLE},
    _RS.DONE: {Cancel: Admit.IGNORE},
    _RS.DECLINED: {Cancel: Admit.IGNORE},
    _RS.CANCELLED: {kind: Admit.IGNORE for kind in _FROM_SENDER},
    _RS.BROKEN: {},
}


class IncomingFile(Enum):
    """A file's life at the receiver."""

    RECEIVING = auto()
    ENDED = auto()
    """FileEnd arrived; some chunks are still being verified (or resent)."""
    READY = auto()
    """FileEnded reported: the service checks the whole file and puts it in place."""
    DONE = auto()
    FAILED = auto()


class IncomingInput(Enum):
    END_RECEIVED = auto()
    ALL_VERIFIED = auto()
    FINISHED_OK = auto()
    FINISHED_FAILED = auto()


_IF, _II = IncomingFile, IncomingInput

INCOMING_FILE_TRANSITIONS: Final[Mapping[tuple[IncomingFile, IncomingInput], IncomingFile]] = {
    (_IF.RECEIVING, _II.END_RECEIVED): _IF.ENDED,
    (_IF.ENDED, _II.ALL_VERIFIED): _IF.READY,
    (_IF.READY, _II.FINISHED_OK): _IF.DONE,
    **{(phase, _II.FINISHED_FAILED): _IF.FAILED for phase in (_IF.RECEIVING, _IF.ENDED, _IF.READY)},
}


class ChunkState(Enum):
    """A chunk at the receiver beyond its file's verified prefix; absent = never arrived."""

    RECEIVED = auto()
    """Handed to the service, digest not checked yet."""
    VERIFIED = auto()
    RESEND = auto()
    """Failed its digest; a Resend went out and the chunk is expected again."""


# --------------------------------------------------------------------------- the sender


class TransferSender:
    """The sending side of one transfer.

    ``start()`` gives the Offer; after the Answer, :meth:`next_work` says what to read and send
    next (queued resends first, then the missing chunks file by file, each file closed by a
    FileEnd); the service reports each send with :meth:`chunk_sent` / :meth:`file_sent`.
    """

    def __init__(
        self,
        offer_entries: Sequence[Entry],
        chunk_size: int,
        transfer_id: str,
        *,
        max_resends: int = DEFAULT_MAX_RESENDS,
    ) -> None:
        entries = tuple(offer_entries)
        if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
            raise LocalProtocolError(ErrorCode.BAD_MESSAGE, f"chunk size {chunk_size}")
        if len(entries) > MAX_OFFER_ENTRIES:
            raise LocalProtocolError(ErrorCode.BAD_MESSAGE, f"{len(entries)} entries")
        if not 1 <= len(transfer_id) <= MAX_RESOURCE_LENGTH:
            raise LocalProtocolError(ErrorCode.BAD_MESSAGE, "transfer id length")
        for entry in entries:
            problem = path_syntax_error(entry.path)
            if problem is None and entry.kind == "dir" and entry.size:
                problem = "a folder with a size"
            if problem is None and chunk_count(entry.size, chunk_size) > MAX_CHUNKS_PER_FILE:
                problem = "too many chunks"
            if problem is not None:
                raise LocalProtocolError(ErrorCode.BAD_MESSAGE, f"{entry.path!r}: {problem}")
        if len({entry.path for entry in entries}) != len(entries):
            raise LocalProtocolError(ErrorCode.BAD_MESSAGE, "a path is listed twice")
        self.transfer_id = transfer_id
        self.entries = entries
        self.chunk_size = chunk_size
        self.max_resends = max_resends
        self.state = SenderState.IDLE
        self.files: tuple[int, ...] = tuple(i for i, e in enumerate(entries) if e.kind == "file")
        """Indexes of the file entries, in offer (and sending) order."""
        self.total_bytes = sum(entries[i].size for i in self.files)
        self.bytes_sent = 0
        """Chunk bytes handed to the wire in this run, resends included."""
        self.bytes_resent = 0
        self.bytes_skipped = 0
        """Bytes the receiver already held (Answer.have): resumed, not sent."""
        self.bytes_verified = 0
        """As last reported by the receiver."""
        self.files_confirmed = 0
        self._phase: dict[int, OutgoingFile] = {}
        self._have: dict[int, bytes] = {}
        self._resends: deque[tuple[int, int]] = deque()
        self._resend_counts: dict[tuple[int, int], int] = {}
        self._ok_files = 0
        self._ok_bytes = 0
        # The plan's cursor: position in ``files`` and the next chunk of that file to send.
        self._cursor = 0
        self._cursor_chunk = 0
        self._error: ProtocolError | None = None

    @property
    def finished(self) -> bool:
        return self.state in SENDER_TERMINAL_STATES

    # ------------------------------------------------------------ our actions

    def start(self) -> list[Offer]:
        self._move(_SI.OFFER_SENT, local=True)
        return [Offer(self.transfer_id, self.entries, self.total_bytes, self.chunk_size)]

    def next_work(self) -> Work | None:
        """The next step, without taking it (ask again after each step); ``None``: nothing to
        send now (waiting for the receiver, or finished)."""
        if self.state is not SenderState.STREAMING:
            return None
        if self._resends:
            index, chunk = self._resends[0]
            return self._send_chunk(index, chunk, resend=True)
        if self._cursor < len(self.files):
            index = self.files[self._cursor]
            if self._cursor_chunk < self._chunk_count(index):
                return self._send_chunk(index, self._cursor_chunk, resend=False)
            return EndFile(index)
        return None

    def receiver_has(self, index: int, chunk: int) -> bool:
        """Whether the receiver said it holds that chunk (it is read for the digest, not sent)."""
        bitmap = self._have.get(index)
        return bitmap is not None and bool(bitmap[chunk >> 3] >> (chunk & 7) & 1)

    def receiver_bitmap(self, index: int) -> bytes:
        """The Answer's bitmap for that file (``b""``: nothing held), e.g. for the reader that
        hashes every chunk but sends only the missing ones."""
        return self._have.get(index, b"")

    def chunk_sent(self, index: int, chunk: int) -> None:
        """The Chunk went out: a queued resend of it, or the plan's next chunk."""
        if self._gone_meanwhile(index):
            return
        if self.state is not SenderState.STREAMING:
            _misuse(f"chunk sent in {self.state.name}")
        length = chunk_length(self.entries[index].size, self.chunk_size, chunk)
        if (index, chunk) in self._resends:
            self._resends.remove((index, chunk))
            self.bytes_resent += length
        elif (
            self._cursor < len(self.files)
            and self.files[self._cursor] == index
            and self._cursor_chunk == chunk
            and chunk < self._chunk_count(index)
        ):
            self._cursor_chunk += 1
            self._skip_had_chunks()
        else:
            _misuse(f"chunk {index}/{chunk} is not due")
        self.bytes_sent += length
        self._check_exhausted()

    def file_sent(self, index: int, digest: bytes) -> FileEnd | None:
        """Every chunk of the file went out: the FileEnd to send (``None``: the receiver failed
        the file meanwhile, send nothing)."""
        if self._gone_meanwhile(index):
            return None
        if len(digest) != DIGEST_SIZE:
            raise LocalProtocolError(ErrorCode.BAD_MESSAGE, "digest is not 32 bytes")
        if not (
            self.state is SenderState.STREAMING
            and self._cursor < len(self.files)
            and self.files[self._cursor] == index
            and self._cursor_chunk >= self._chunk_count(index)
        ):
            _misuse(f"file {index} is not due to end")
        self._move_file(index, _OI.END_SENT, local=True)
        self._cursor += 1
        self._cursor_chunk = 0
        self._skip_done_files()
        self._check_exhausted()
        return FileEnd(index, bytes(digest))

    def cancel(
        self, reason: str = "", code: TransferErrorCode = TransferErrorCode.CANCELLED
    ) -> Cancel:
        self._move(_SI.CANCEL_SENT, local=True)
        return Cancel(reason[:MAX_REASON_LENGTH], code)

    # ------------------------------------------------------------ the receiver's messages

    def receive(self, message: object) -> list[SenderEvent]:
        if self._error is not None:
            raise self._error
        try:
            return self._receive(message)
        except ProtocolError as error:
            self._error = error
            if (self.state, _SI.VIOLATED) in SENDER_TRANSITIONS:
                self.state = SENDER_TRANSITIONS[self.state, _SI.VIOLATED]
            raise

    def _receive(self, message: object) -> list[SenderEvent]:
        admit = _admission(SENDER_ADMITS[self.state], self.state, message)
        if admit is Admit.IGNORE:
            return []
        if isinstance(message, Answer):
            return self._on_answer(message)
        if isinstance(message, Resend):
            return self._on_resend(message)
        if isinstance(message, Progress):
            return self._on_progress(message)
        if isinstance(message, FileDone):
            return self._on_file_done(message)
        if isinstance(message, Complete):
            return self._on_complete(message)
        assert isinstance(message, Cancel)
        self._move(_SI.CANCEL_RECEIVED)
        return [CancelledByPeer(message.reason, message.code)]

    def _on_answer(self, answer: Answer) -> list[SenderEvent]:
        if not answer.accepted:
            if answer.have:
                _violation(TransferErrorCode.BAD_ANSWER, "a declining answer lists chunks")
            self._move(_SI.DECLINED)
            return [AnswerReceived(False, answer.reason, ())]
        have: dict[int, bytes] = {}
        for item in answer.have:
            entry = self._file_entry(item.index, TransferErrorCode.BAD_ANSWER)
            count = chunk_count(entry.size, self.chunk_size)
            if item.index in have or not is_valid_bitmap(item.chunks, count):
                _violation(TransferErrorCode.BAD_ANSWER, f"bad bitmap for entry {item.index}")
            have[item.index] = item.chunks
        self._move(_SI.ACCEPTED)
        self._have = have
        self.bytes_skipped = sum(
            bitmap_bytes(bitmap, self.entries[i].size, self.chunk_size)
            for i, bitmap in have.items()
        )
        self._skip_had_chunks()
        self._check_exhausted()
        return [AnswerReceived(True, answer.reason, answer.have)]

    def _on_resend(self, resend: Resend) -> list[SenderEvent]:
        index, chunk = resend.index, resend.chunk
        entry = self._file_entry(index, TransferErrorCode.BAD_RESEND)
        key = (index, chunk)
        if (
            not 0 <= chunk < chunk_count(entry.size, self.chunk_size)
            or self._phase.get(index, _OF.PENDING) not in (_OF.PENDING, _OF.ENDED)
            or not self._was_sent(index, chunk)
            or key in self._resends
        ):
            _violation(TransferErrorCode.BAD_RESEND, f"resend of chunk {index}/{chunk}")
        count = self._resend_counts.get(key, 0) + 1
        if count > self.max_resends:
            self._move(_SI.GAVE_UP)
            code = TransferErrorCode.TOO_MANY_RESENDS
            reason = f"{entry.path}: chunk {chunk} failed its digest {count} times"
            return [TransferGaveUp(code, reason, Cancel(reason[:MAX_REASON_LENGTH], code))]
        self._resend_counts[key] = count
        self._resends.append(key)
        self._move(_SI.WORK_ADDED)
        return [ResendRequested(index, chunk)]

    def _on_progress(self, progress: Progress) -> list[SenderEvent]:
        if progress.bytes_verified > self.total_bytes or progress.files_done > len(self.files):
            _violation(TransferErrorCode.BAD_REPORT, f"progress beyond the offer: {progress}")
        self.bytes_verified = progress.bytes_verified
        return [ProgressReported(progress.bytes_verified, progress.files_done)]

    def _on_file_done(self, done: FileDone) -> list[SenderEvent]:
        entry = self._file_entry(done.index, TransferErrorCode.BAD_REPORT)
        self._move_file(done.index, _OI.CONFIRMED_OK if done.ok else _OI.CONFIRMED_FAILED)
        self.files_confirmed += 1
        if done.ok:
            self._ok_files += 1
            self._ok_bytes += entry.size
        # Nothing more of it is wanted: drop its queued resends and skip what is left.
        if self._resends:
            self._resends = deque(key for key in self._resends if key[0] != done.index)
        self._skip_done_files()
        self._check_exhausted()
        return [FileConfirmed(done.index, done.ok, done.reason)]

    def _on_complete(self, complete: Complete) -> list[SenderEvent]:
        if (
            self.state is not SenderState.FINISHING
            or self.files_confirmed != len(self.files)
            or (complete.files, complete.bytes) != (self._ok_files, self._ok_bytes)
        ):
            _violation(TransferErrorCode.BAD_REPORT, f"{complete} does not match the verdicts")
        self._move(_SI.COMPLETED)
        return [Completed(complete.files, complete.bytes)]

    # ------------------------------------------------------------ internals

    def _send_chunk(self, index: int, chunk: int, *, resend: bool) -> SendChunk:
        size = self.entries[index].size
        length = chunk_length(size, self.chunk_size, chunk)
        return SendChunk(index, chunk, chunk * self.chunk_size, length, resend)

    def _chunk_count(self, index: int) -> int:
        return chunk_count(self.entries[index].size, self.chunk_size)

    def _file_entry(self, index: int, code: TransferErrorCode) -> Entry:
        if not 0 <= index < len(self.entries) or self.entries[index].kind != "file":
            _violation(code, f"entry {index} is not an offered file")
        return self.entries[index]

    def _was_sent(self, index: int, chunk: int) -> bool:
        if self.receiver_has(index, chunk):
            return False
        position = bisect.bisect_left(self.files, index)
        return position < self._cursor or (position == self._cursor and chunk < self._cursor_chunk)

    def _gone_meanwhile(self, index: int) -> bool:
        """The transfer ended, or the receiver failed this file, while the service was busy
        sending: its report is moot."""
        if self.state in (SenderState.CANCELLED, SenderState.FAILED):
            return True
        return 0 <= index < len(self.entries) and self._phase.get(index) is _OF.FAILED

    def _skip_had_chunks(self) -> None:
        if self._cursor >= len(self.files):
            return
        index = self.files[self._cursor]
        bitmap = self._have.get(index)
        if bitmap is None:
            return
        count = self._chunk_count(index)
        chunk = self._cursor_chunk
        while chunk < count:
            byte = bitmap[chunk >> 3]
            if byte == 0xFF and not chunk & 7:
                chunk += 8
            elif byte >> (chunk & 7) & 1:
                chunk += 1
            else:
                break
        self._cursor_chunk = min(chunk, count)

    def _skip_done_files(self) -> None:
        """Move the cursor past files the receiver already failed; skip had chunks."""
        files, phase = self.files, self._phase
        while self._cursor < len(files) and phase.get(files[self._cursor]) in _CONFIRMED:
            self._cursor += 1
            self._cursor_chunk = 0
        self._skip_had_chunks()

    def _check_exhausted(self) -> None:
        if (
            self.state is SenderState.STREAMING
            and not self._resends
            and self._cursor >= len(self.files)
        ):
            self._move(_SI.WORK_EXHAUSTED)

    def _move(self, inp: SenderInput, *, local: bool = False) -> None:
        new = SENDER_TRANSITIONS.get((self.state, inp))
        if new is None:
            if local:
                _misuse(f"{inp.name} while {self.state.name}")
            _violation(TransferErrorCode.UNEXPECTED_MESSAGE, f"{inp.name} in {self.state.name}")
        self.state = new

    def _move_file(self, index: int, inp: OutgoingInput, *, local: bool = False) -> None:
        phase = self._phase.get(index, _OF.PENDING)
        new = OUTGOING_FILE_TRANSITIONS.get((phase, inp))
        if new is None:
            if local:
                _misuse(f"file {index}: {inp.name} while {phase.name}")
            _violation(TransferErrorCode.BAD_REPORT, f"file {index}: {inp.name} while {phase.name}")
        self._phase[index] = new


# --------------------------------------------------------------------------- the receiver


@dataclass(slots=True)
class _Incoming:
    """Accounting for one file, created when something about it happens. Memory grows with the
    chunks that arrived out of order, never with the size the offer claims."""

    size: int
    chunks: int
    phase: IncomingFile = IncomingFile.RECEIVING
    verified_prefix: int = 0
    """Chunks below this are all verified (and not kept in ``states``)."""
    states: dict[int, ChunkState] = field(default_factory=dict)
    verified: int = 0
    end_digest: bytes = b""

    def state(self, chunk: int) -> ChunkState | None:
        if chunk < self.verified_prefix:
            return ChunkState.VERIFIED
        return self.states.get(chunk)

    def verify(self, chunk: int) -> None:
        self.states[chunk] = ChunkState.VERIFIED
        self.verified += 1
        states = self.states
        while states.get(self.verified_prefix) is ChunkState.VERIFIED:
            del states[self.verified_prefix]
            self.verified_prefix += 1

    @property
    def none_missing(self) -> bool:
        """Every chunk arrived at least once (a resend may still be due)."""
        return self.verified_prefix + len(self.states) == self.chunks

    @property
    def all_verified(self) -> bool:
        return self.verified == self.chunks


class TransferReceiver:
    """The receiving side of one transfer.

    Feed it the sender's messages with :meth:`receive`; answer the offer with :meth:`accept`
    or :meth:`decline`; report each chunk's digest check (:meth:`chunk_verified` /
    :meth:`chunk_failed`) and each file's end (:meth:`file_done`); send :meth:`progress`
    whenever it returns a message (and at :meth:`next_progress_at`).
    """

    def __init__(
        self,
        limits: TransferLimits | None = None,
        *,
        transfer_id: str | None = None,
        progress_interval: float = DEFAULT_PROGRESS_INTERVAL,
    ) -> None:
        self.limits = limits or TransferLimits()
        self.expected_transfer_id = transfer_id
        """The stream's Hello.resource: the offer must carry the same id."""
        self.progress_interval = progress_interval
        self.state = ReceiverState.AWAITING_OFFER
        self.offer: Offer | None = None
        self.file_count = 0
        self.files_done = 0
        self.files_ok = 0
        self.bytes_ok = 0
        self.bytes_verified = 0
        """Bytes held verified, resumed ones included."""
        self.bytes_received = 0
        """Chunk bytes that arrived in this run, duplicates included."""
        self.duplicate_chunks = 0
        self._budget = 0
        self._files: dict[int, _Incoming] = {}
        self._error: ProtocolError | None = None
        self._last_progress: tuple[int, int] = (0, 0)
        self._last_progress_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.state in (_RS.DONE, _RS.DECLINED, _RS.CANCELLED, _RS.BROKEN)

    # ------------------------------------------------------------ the sender's messages

    def receive(self, message: object) -> list[ReceiverEvent]:
        if self._error is not None:
            raise self._error
        try:
            return self._receive(message)
        except ProtocolError as error:
            self._error = error
            self._move(_RI.VIOLATED)
            raise

    def _receive(self, message: object) -> list[ReceiverEvent]:
        admit = _admission(RECEIVER_ADMITS[self.state], self.state, message)
        if admit is Admit.IGNORE:
            return []
        if isinstance(message, Chunk):
            return self._on_chunk(message)
        if isinstance(message, FileEnd):
            return self._on_file_end(message)
        if isinstance(message, Offer):
            self._check_offer(message)
            self._move(_RI.OFFER_RECEIVED)
            self.offer = message
            self._budget = message.total_bytes
            return [
                OfferReceived(
                    message.transfer_id, message.entries, message.total_bytes, message.chunk_size
                )
            ]
        assert isinstance(message, Cancel)
        self._move(_RI.CANCEL_RECEIVED)
        return [CancelledByPeer(message.reason, message.code)]

    def _check_offer(self, offer: Offer) -> None:
        limits = self.limits
        expected = self.expected_transfer_id
        if expected is not None and offer.transfer_id != expected:
            _violation(TransferErrorCode.BAD_OFFER, "the offer names another transfer")
        if len(offer.entries) > limits.max_entries:
            _violation(
                TransferErrorCode.TOO_MANY_ENTRIES,
                f"{len(offer.entries)} entries (limit {limits.max_entries})",
            )
        if not limits.min_chunk_size <= offer.chunk_size <= limits.max_chunk_size:
            _violation(TransferErrorCode.BAD_CHUNK_SIZE, f"chunk size {offer.chunk_size}")
        if offer.total_bytes > limits.max_total_bytes:
            _violation(
                TransferErrorCode.TOO_LARGE,
                f"{offer.total_bytes} bytes offered (limit {limits.max_total_bytes})",
            )
        max_file = min(limits.max_file_size, offer.chunk_size * MAX_CHUNKS_PER_FILE)
        paths: set[str] = set()
        total = files = 0
        for entry in offer.entries:
            problem = path_syntax_error(entry.path, limits.max_path_length)
            if problem is not None:
                _violation(TransferErrorCode.BAD_PATH, f"{entry.path[:64]!r}: {problem}")
            if entry.kind == "dir":
                if entry.size:
                    _violation(TransferErrorCode.BAD_OFFER, f"{entry.path!r}: a folder with a size")
            else:
                if entry.size > max_file:
                    _violation(TransferErrorCode.TOO_LARGE, f"{entry.path!r}: {entry.size} bytes")
                total += entry.size
                files += 1
            paths.add(entry.path)
        if len(paths) != len(offer.entries):
            _violation(TransferErrorCode.BAD_OFFER, "a path is offered twice")
        if total != offer.total_bytes:
            _violation(
                TransferErrorCode.BAD_OFFER,
                f"total of {offer.total_bytes} bytes, files add up to {total}",
            )
        self.file_count = files

    def _on_chunk(self, message: Chunk) -> list[ReceiverEvent]:
        index, chunk = message.index, message.chunk
        entry = self._file_entry(index)
        chunk_size = self._chunk_size
        if not 0 <= chunk < chunk_count(entry.size, chunk_size):
            _violation(
                TransferErrorCode.CHUNK_OUT_OF_RANGE,
                f"chunk {chunk} of a {entry.size}-byte file (entry {index})",
            )
        length = len(message.data)
        expected = chunk_length(entry.size, chunk_size, chunk)
        if length != expected:
            _violation(
                TransferErrorCode.BAD_CHUNK_LENGTH,
                f"chunk {index}/{chunk} of {length} bytes, expected {expected}",
            )
        if self.bytes_received + length > self._budget:
            _violation(TransferErrorCode.EXCESS_DATA, "more data than offered")
        self.bytes_received += length
        incoming = self._incoming(index)
        if incoming.phase is not IncomingFile.RECEIVING and incoming.phase is not _IF.ENDED:
            self.duplicate_chunks += 1
            return []
        if incoming.state(chunk) not in (None, ChunkState.RESEND):
            self.duplicate_chunks += 1
            return []
        incoming.states[chunk] = ChunkState.RECEIVED
        return [ChunkReceived(index, chunk, chunk * chunk_size, message.digest, message.data)]

    def _on_file_end(self, message: FileEnd) -> list[ReceiverEvent]:
        index = message.index
        self._file_entry(index)
        incoming = self._incoming(index)
        if incoming.phase is IncomingFile.FAILED:
            return []  # we gave up on it; the sender did not know yet
        if incoming.phase is not IncomingFile.RECEIVING:
            _violation(TransferErrorCode.DUPLICATE_FILE_END, f"second FileEnd for entry {index}")
        if not incoming.none_missing:
            _violation(TransferErrorCode.EARLY_FILE_END, f"FileEnd before the chunks of {index}")
        self._move_file(incoming, _II.END_RECEIVED)
        incoming.end_digest = bytes(message.digest)
        return self._ready_events(index, incoming)

    # ------------------------------------------------------------ our actions

    def accept(self, have: Mapping[int, bytes] | None = None) -> list[Answer | Complete]:
        """Accept the offer. ``have``: per file entry, the bitmap of chunks already held
        verified (from a partial file); a file held whole still gets its FileEnd, for the
        whole-file check. Returns the Answer, plus Complete if nothing is left to receive."""
        offer = self._offer_in(ReceiverState.DECIDING)
        items: list[Have] = []
        for index, bitmap in sorted((have or {}).items()):
            entry = offer.entries[index] if 0 <= index < len(offer.entries) else None
            if entry is None or entry.kind != "file":
                raise LocalProtocolError(ErrorCode.BAD_MESSAGE, f"have for entry {index}")
            if not is_valid_bitmap(bitmap, chunk_count(entry.size, offer.chunk_size)):
                raise LocalProtocolError(ErrorCode.BAD_MESSAGE, f"bad bitmap for entry {index}")
            items.append(Have(index, bytes(bitmap)))
        self._move(_RI.ACCEPT_SENT, local=True)
        for item in items:
            self._hold(item.index, item.chunks)
        answer = Answer(True, "", tuple(items))
        return [answer, *self._complete_if_all_done()]

    def decline(self, reason: str = "") -> Answer:
        self._offer_in(ReceiverState.DECIDING)
        self._move(_RI.DECLINE_SENT, local=True)
        return Answer(False, reason[:MAX_REASON_LENGTH])

    def chunk_verified(self, index: int, chunk: int) -> list[ReceiverEvent]:
        """The chunk matched its digest and is stored. May report the file's end."""
        incoming = self._received_chunk(index, chunk)
        if incoming is None:
            return []
        incoming.verify(chunk)
        self.bytes_verified += chunk_length(incoming.size, self._chunk_size, chunk)
        return self._ready_events(index, incoming)

    def chunk_failed(self, index: int, chunk: int) -> Resend | None:
        """The chunk did not match its digest: the Resend to send (``None``: the file or the
        transfer ended meanwhile)."""
        incoming = self._received_chunk(index, chunk)
        if incoming is None:
            return None
        incoming.states[chunk] = ChunkState.RESEND
        self._budget += chunk_length(incoming.size, self._chunk_size, chunk)
        return Resend(index, chunk)

    def file_done(self, index: int, ok: bool, reason: str = "") -> list[FileDone | Complete]:
        """The file is in place (``ok``: only after its FileEnded) or failed (any time after
        the answer). Returns FileDone, plus Complete once every file is done (nothing if the
        transfer was cancelled meanwhile)."""
        if self.state is ReceiverState.CANCELLED:
            return []
        offer = self._offer_in(ReceiverState.RECEIVING)
        if not 0 <= index < len(offer.entries) or offer.entries[index].kind != "file":
            raise LocalProtocolError(ErrorCode.BAD_MESSAGE, f"entry {index} is not a file")
        incoming = self._incoming(index)
        self._move_file(incoming, _II.FINISHED_OK if ok else _II.FINISHED_FAILED, local=True)
        incoming.states.clear()
        self.files_done += 1
        if ok:
            self.files_ok += 1
            self.bytes_ok += incoming.size
        return [FileDone(index, ok, reason[:MAX_REASON_LENGTH]), *self._complete_if_all_done()]

    def cancel(
        self, reason: str = "", code: TransferErrorCode = TransferErrorCode.CANCELLED
    ) -> Cancel:
        self._move(_RI.CANCEL_SENT, local=True)
        return Cancel(reason[:MAX_REASON_LENGTH], code)

    def progress(self, now: float) -> Progress | None:
        """A Progress to send if something changed and the last one is ``progress_interval``
        old (``now``: a monotonic clock in seconds)."""
        due = self.next_progress_at()
        if due is None or now < due:
            return None
        self._last_progress = (self.bytes_verified, self.files_done)
        self._last_progress_at = now
        return Progress(self.bytes_verified, self.files_done)

    def next_progress_at(self) -> float | None:
        """When :meth:`progress` will have something to send; ``None``: nothing new."""
        if self.state is not ReceiverState.RECEIVING:
            return None
        if (self.bytes_verified, self.files_done) == self._last_progress:
            return None
        if self._last_progress_at is None:
            return float("-inf")
        return self._last_progress_at + self.progress_interval

    # ------------------------------------------------------------ internals

    @property
    def _chunk_size(self) -> int:
        assert self.offer is not None
        return self.offer.chunk_size

    def _offer_in(self, state: ReceiverState) -> Offer:
        if self._error is not None:
            raise self._error
        if self.state is not state or self.offer is None:
            _misuse(f"not possible while {self.state.name}")
        return self.offer

    def _file_entry(self, index: int) -> Entry:
        assert self.offer is not None
        entries = self.offer.entries
        if not 0 <= index < len(entries):
            _violation(TransferErrorCode.NO_SUCH_ENTRY, f"entry {index} of {len(entries)}")
        entry = entries[index]
        if entry.kind != "file":
            _violation(TransferErrorCode.NOT_A_FILE, f"entry {index} is a {entry.kind}")
        return entry

    def _incoming(self, index: int) -> _Incoming:
        incoming = self._files.get(index)
        if incoming is None:
            assert self.offer is not None
            size = self.offer.entries[index].size
            incoming = _Incoming(size, chunk_count(size, self.offer.chunk_size))
            self._files[index] = incoming
        return incoming

    def _hold(self, index: int, bitmap: bytes) -> None:
        incoming = self._incoming(index)
        # Whole leading bytes become the verified prefix at once (the usual resume: a prefix).
        full = min((len(bitmap) - len(bitmap.lstrip(b"\xff"))) * 8, incoming.chunks)
        incoming.verified_prefix = incoming.verified = full
        for chunk in bitmap_chunks(bitmap[full // 8 :]):
            incoming.verify(full + chunk)
        self.bytes_verified += bitmap_bytes(bitmap, incoming.size, self._chunk_size)

    def _received_chunk(self, index: int, chunk: int) -> _Incoming | None:
        """The file of a chunk handed out in ChunkReceived and not reported yet; ``None`` if
        the file or the transfer ended meanwhile."""
        if self._error is not None:
            raise self._error
        if self.state is ReceiverState.CANCELLED:
            return None
        incoming = self._files.get(index)
        if incoming is not None and incoming.phase is IncomingFile.FAILED:
            return None
        if (
            self.state is not ReceiverState.RECEIVING
            or incoming is None
            or incoming.state(chunk) is not ChunkState.RECEIVED
        ):
            _misuse(f"chunk {index}/{chunk} is not awaiting verification")
        return incoming

    def _ready_events(self, index: int, incoming: _Incoming) -> list[ReceiverEvent]:
        if incoming.phase is IncomingFile.ENDED and incoming.all_verified:
            self._move_file(incoming, _II.ALL_VERIFIED)
            incoming.states.clear()
            return [FileEnded(index, incoming.end_digest)]
        return []

    def _complete_if_all_done(self) -> list[Complete]:
        if self.files_done < self.file_count:
            return []
        self._move(_RI.ALL_FILES_DONE, local=True)
        return [Complete(self.files_ok, self.bytes_ok)]

    def _move(self, inp: ReceiverInput, *, local: bool = False) -> None:
        new = RECEIVER_TRANSITIONS.get((self.state, inp))
        if new is None:
            if local:
                _misuse(f"{inp.name} while {self.state.name}")
            if inp is _RI.VIOLATED:
                return  # already ended: the error is raised all the same
            _violation(TransferErrorCode.UNEXPECTED_MESSAGE, f"{inp.name} in {self.state.name}")
        self.state = new

    @staticmethod
    def _move_file(incoming: _Incoming, inp: IncomingInput, *, local: bool = False) -> None:
        new = INCOMING_FILE_TRANSITIONS.get((incoming.phase, inp))
        if new is None:
            if local:
                _misuse(f"{inp.name} while the file is {incoming.phase.name}")
            _violation(
                TransferErrorCode.UNEXPECTED_MESSAGE, f"{inp.name} while {incoming.phase.name}"
            )
        incoming.phase = new
