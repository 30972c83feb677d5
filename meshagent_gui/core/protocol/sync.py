"""Folder sync on the wire (sans-IO): rows, version vectors, the messages, and the decisions.

docs/sync.md is the design. A SYNC stream is directional: the side that opens it *pulls* (it
subscribes to the other side's index and asks for blocks), the side that accepts *serves*.
Everything a peer sends is bounded as it is decoded (``msgspec.Meta``) and then checked by
:func:`validate_row` before anything is written.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum, StrEnum, auto
from typing import Annotated, Final, Literal, TypeAlias

import msgspec

from meshagent_gui.core.protocol.errors import ErrorCode, LocalProtocolError
from meshagent_gui.core.protocol.framing import KiB, MiB
from meshagent_gui.core.protocol.messages import BASE_REGISTRY, MAX_REASON_LENGTH
from meshagent_gui.core.protocol.registry import control_message, struct_message
from meshagent_gui.core.protocol.transfer import path_syntax_error

# --------------------------------------------------------------------------- limits

DIGEST_SIZE: Final = 32
"""blake3, of a block or of a segment's block list."""
MIN_BLOCK: Final = 16 * KiB
AVG_BLOCK: Final = 64 * KiB
MAX_BLOCK: Final = 256 * KiB
INLINE_BLOCKS: Final = 256
"""A row lists its blocks inline up to this many; a bigger file lists segments instead."""
MAX_SEGMENTS: Final = 65_536
MAX_SEGMENT_BLOCKS: Final = 4096
"""Segments are cut where a digest's low 8 bits are zero (~256 blocks); this caps a run."""
MAX_FILE_SIZE: Final = 16 * 1024 * 1024 * MiB  # 16 TiB
MAX_NAME_LENGTH: Final = 4096
MAX_VERSION_ENTRIES: Final = 1024
"""Devices that ever changed one file; more is a hostile row."""
MAX_BATCH_ROWS: Final = 1000
MAX_BATCH_PAYLOAD: Final = 8 * MiB
MAX_LABEL_LENGTH: Final = 255
FOLDER_ID_LENGTH: Final = 32
INDEX_ID_LENGTH: Final = 32

ShortId = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
"""A device in a version vector: the first 8 bytes of its id, top bit cleared (msgpack ints
are checked as int64)."""
Counter = Annotated[int, msgspec.Meta(ge=1, le=(1 << 63) - 1)]
Sequence_ = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
ByteCount = Annotated[int, msgspec.Meta(ge=0, le=MAX_FILE_SIZE)]
Digest = Annotated[bytes, msgspec.Meta(min_length=DIGEST_SIZE, max_length=DIGEST_SIZE)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_LENGTH)]
FolderId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")]
IndexId = Annotated[str, msgspec.Meta(pattern=r"^([0-9a-f]{32})?$")]
Reason = Annotated[str, msgspec.Meta(max_length=MAX_REASON_LENGTH)]
RowKind: TypeAlias = Literal["file", "dir"]

VersionEntry: TypeAlias = tuple[ShortId, Counter]
Version: TypeAlias = tuple[VersionEntry, ...]
"""``(device_short_id, counter)`` pairs, sorted by device, each device once, counters >= 1."""

# --------------------------------------------------------------------------- rows


@dataclass(frozen=True, slots=True)
class Block:
    size: Annotated[int, msgspec.Meta(ge=1, le=MAX_BLOCK)]
    digest: Digest


@dataclass(frozen=True, slots=True)
class Segment:
    """A content-defined run of a large file's blocks; ``digest`` is blake3 of the run's
    encoded block list (:func:`meshagent_gui.core.sync.blocks.segment_digest`)."""

    digest: Digest
    blocks: Annotated[int, msgspec.Meta(ge=1, le=MAX_SEGMENT_BLOCKS)]
    size: ByteCount


@dataclass(frozen=True, slots=True)
class FileRow:
    """One path of a folder's index, as peers exchange it."""

    name: Name
    """Relative, '/'-separated, NFC."""
    kind: RowKind
    deleted: bool
    size: ByteCount
    mtime_ns: Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)]
    permissions: Annotated[int, msgspec.Meta(ge=0, le=0o777)]
    version: Annotated[Version, msgspec.Meta(max_length=MAX_VERSION_ENTRIES)]
    sequence: Sequence_
    """The sender's local sequence of this change (orders its index)."""
    modified_by: ShortId
    """Short id of the device that made this content (names conflict copies, breaks ties)."""
    blocks: Annotated[tuple[Block, ...], msgspec.Meta(max_length=INLINE_BLOCKS)] = ()
    segments: Annotated[tuple[Segment, ...], msgspec.Meta(max_length=MAX_SEGMENTS)] = ()


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class SyncOffer:
    """Setup: "sync this folder with me". ``name`` is the folder name suggested for the peer."""

    folder_id: FolderId
    label: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_LABEL_LENGTH)]
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_LABEL_LENGTH)]


@dataclass(frozen=True, slots=True)
class SyncOfferAnswer:
    accepted: bool
    reason: Reason = ""


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Puller -> server: rows of index ``index_id`` after sequence ``since`` (an empty or
    unknown index id: from the start), then live changes."""

    folder_id: FolderId
    index_id: IndexId
    since: Sequence_


@dataclass(frozen=True, slots=True)
class IndexBatch:
    """Server -> puller: rows in sequence order; ``done`` ends the backlog (live ones follow)."""

    index_id: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")]
    rows: Annotated[tuple[FileRow, ...], msgspec.Meta(max_length=MAX_BATCH_ROWS)]
    done: bool = False


@dataclass(frozen=True, slots=True)
class BlockRequest:
    """Puller -> server: one block's bytes; ``name`` and ``offset`` say where the server's
    index has it (the server re-hashes what it reads)."""

    request_id: Annotated[int, msgspec.Meta(ge=0, le=0xFFFF_FFFF)]
    digest: Digest
    name: Name
    offset: ByteCount
    size: Annotated[int, msgspec.Meta(ge=1, le=MAX_BLOCK)]


@dataclass(frozen=True, slots=True)
class BlockReply:
    request_id: int
    data: bytes | memoryview = field(repr=False)


@dataclass(frozen=True, slots=True)
class BlockMissing:
    """Server -> puller: that block is not there any more (the file changed since)."""

    request_id: Annotated[int, msgspec.Meta(ge=0, le=0xFFFF_FFFF)]
    reason: Reason = ""


@dataclass(frozen=True, slots=True)
class SegmentRequest:
    request_id: Annotated[int, msgspec.Meta(ge=0, le=0xFFFF_FFFF)]
    digest: Digest


@dataclass(frozen=True, slots=True)
class SegmentReply:
    request_id: Annotated[int, msgspec.Meta(ge=0, le=0xFFFF_FFFF)]
    blocks: Annotated[tuple[Block, ...], msgspec.Meta(min_length=1, max_length=MAX_SEGMENT_BLOCKS)]


SYNC_OFFER: Final = 0x0300
SYNC_OFFER_ANSWER: Final = 0x0301
SUBSCRIBE: Final = 0x0302
INDEX_BATCH: Final = 0x0303
BLOCK_REQUEST: Final = 0x0304
BLOCK_REPLY: Final = 0x0305
BLOCK_MISSING: Final = 0x0306
SEGMENT_REQUEST: Final = 0x0307
SEGMENT_REPLY: Final = 0x0308

SYNC_MESSAGES: Final = (
    control_message(SYNC_OFFER, SyncOffer),
    control_message(SYNC_OFFER_ANSWER, SyncOfferAnswer),
    control_message(SUBSCRIBE, Subscribe),
    control_message(INDEX_BATCH, IndexBatch, max_payload=MAX_BATCH_PAYLOAD),
    control_message(BLOCK_REQUEST, BlockRequest),
    struct_message(BLOCK_REPLY, BlockReply, "!I", ("request_id",), data="data"),
    control_message(BLOCK_MISSING, BlockMissing),
    control_message(SEGMENT_REQUEST, SegmentRequest),
    control_message(SEGMENT_REPLY, SegmentReply, max_payload=1 * MiB),
)
SYNC_REGISTRY: Final = BASE_REGISTRY.extended(SYNC_MESSAGES)

PullerMessage: TypeAlias = SyncOffer | Subscribe | BlockRequest | SegmentRequest
ServerMessage: TypeAlias = SyncOfferAnswer | IndexBatch | BlockReply | BlockMissing | SegmentReply

# --------------------------------------------------------------------------- version vectors

SHORT_ID_MASK: Final = (1 << 63) - 1
MAX_COUNTER: Final = 1 << 62
"""Rows with a bigger counter are refused: honest devices add one per change and never get
near it, while a peer's 2**63-1 would leave us no counter to bump past it."""
_HEX_PREFIX: Final = re.compile(r"[0-9a-fA-F]{16}")


def short_id(device_id: str) -> int:
    """A device's id in version vectors: the first 8 bytes of its (hex) id, top bit cleared."""
    if not _HEX_PREFIX.match(device_id):
        raise ValueError(f"not a hex device id: {device_id[:32]!r}")
    return int(device_id[:16], 16) & SHORT_ID_MASK


class Order(Enum):
    """How version ``a`` relates to version ``b``."""

    EQUAL = auto()
    NEWER = auto()
    """``a`` dominates ``b``: it has seen every change ``b`` has, and more."""
    OLDER = auto()
    CONCURRENT = auto()
    """Each has a change the other has not seen."""


_ORDER_OF: Final[Mapping[tuple[bool, bool], Order]] = {
    # (a has a change b lacks, b has a change a lacks)
    (False, False): Order.EQUAL,
    (True, False): Order.NEWER,
    (False, True): Order.OLDER,
    (True, True): Order.CONCURRENT,
}


def compare(a: Version, b: Version) -> Order:
    """Compare two valid versions (a device missing from one counts as 0 there)."""
    da, db = dict(a), dict(b)
    a_ahead = any(counter > db.get(device, 0) for device, counter in a)
    b_ahead = any(counter > da.get(device, 0) for device, counter in b)
    return _ORDER_OF[a_ahead, b_ahead]


def merge(a: Version, b: Version) -> Version:
    """The least version that dominates or equals both: each device's larger counter."""
    merged = dict(a)
    for device, counter in b:
        merged[device] = max(merged.get(device, 0), counter)
    return tuple(sorted(merged.items()))


def bump(v: Version, device: int) -> Version:
    """``v`` after a change made on ``device``: its counter becomes max(all counters) + 1, so
    counters also order changes in time across devices (Syncthing's Lamport-ish bump)."""
    counter = max((c for _, c in v), default=0) + 1
    if counter > SHORT_ID_MASK:
        raise OverflowError("version counter overflow")
    bumped = dict(v)
    bumped[device] = counter
    return tuple(sorted(bumped.items()))


# --------------------------------------------------------------------------- decisions


class Action(Enum):
    """What to do with a peer's row (see :func:`decide`)."""

    NOTHING = auto()
    """Equal, or ours is newer (the peer will pull ours), or ours wins a conflict."""
    TAKE = auto()
    """Take the remote row: pull its content, apply its deletion, or make its directory."""
    ADOPT_VERSION = auto()
    """Concurrent with the same content: store our row with the merged version, no I/O."""
    KEEP_LOCAL = auto()
    """Concurrent, remote deleted, ours modified: store ours with the (bumped) version given,
    so the edit wins everywhere (a deletion never beats an edit)."""
    CONFLICT = auto()
    """Concurrent, both modified, ours loses: rename ours to :func:`conflict_name` (a new row,
    synced like any file), then take the remote row."""


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    version: Version
    """The version our row for this name ends with."""


class RowState(Enum):
    LIVE = auto()
    DELETED = auto()
    """A tombstone, or no row at all."""


class Content(Enum):
    """The content relation of our row and the peer's; the tie-break only matters (and is only
    computed) between concurrent rows."""

    SAME = auto()
    OURS_WINS = auto()
    """Different, and ours is newer by (mtime_ns, modified_by, content)."""
    THEIRS_WINS = auto()


class VersionFrom(Enum):
    LOCAL = auto()
    REMOTE = auto()
    MERGED = auto()
    MERGED_BUMPED = auto()
    """merge(local, remote) bumped for this device: dominates both rows everywhere."""


@dataclass(frozen=True, slots=True)
class DecisionRule:
    action: Action
    version: VersionFrom


_O, _C, _A, _VF = Order, Content, Action, VersionFrom
_LIVE, _DEAD = RowState.LIVE, RowState.DELETED
_ANY_ROWS: Final = tuple(itertools.product(RowState, RowState, Content))

# The table of docs/sync.md, complete over every key (a test checks), so decide() never
# guesses: (local vs remote version, our row, theirs, content relation) -> what to do.
DECISIONS: Final[Mapping[tuple[Order, RowState, RowState, Content], DecisionRule]] = {
    **{(_O.EQUAL, *rest): DecisionRule(_A.NOTHING, _VF.LOCAL) for rest in _ANY_ROWS},
    # Ours dominates: the peer pulls ours from its own stream.
    **{(_O.NEWER, *rest): DecisionRule(_A.NOTHING, _VF.LOCAL) for rest in _ANY_ROWS},
    **{(_O.OLDER, *rest): DecisionRule(_A.TAKE, _VF.REMOTE) for rest in _ANY_ROWS},
    # Concurrent, nothing to move: both tombstones, or the same bytes made twice.
    **{(_O.CONCURRENT, _DEAD, _DEAD, c): DecisionRule(_A.ADOPT_VERSION, _VF.MERGED) for c in _C},
    (_O.CONCURRENT, _LIVE, _LIVE, _C.SAME): DecisionRule(_A.ADOPT_VERSION, _VF.MERGED),
    # A deletion never beats an edit, whichever side made which.
    **{
        (_O.CONCURRENT, _LIVE, _DEAD, c): DecisionRule(_A.KEEP_LOCAL, _VF.MERGED_BUMPED) for c in _C
    },
    **{(_O.CONCURRENT, _DEAD, _LIVE, c): DecisionRule(_A.TAKE, _VF.MERGED) for c in _C},
    # Both edited: the loser's device keeps its copy under a conflict name and takes the
    # winner's content under a fresh version (merged, then bumped). Merged alone is not enough:
    # two different pairs of rows can merge to one version with different winners (Hypothesis
    # found it), and equal versions are never compared again. The winner does nothing now
    # and takes that row (its own content) when it comes back.
    (_O.CONCURRENT, _LIVE, _LIVE, _C.OURS_WINS): DecisionRule(_A.NOTHING, _VF.LOCAL),
    (_O.CONCURRENT, _LIVE, _LIVE, _C.THEIRS_WINS): DecisionRule(_A.CONFLICT, _VF.MERGED_BUMPED),
}


def same_content(a: FileRow, b: FileRow) -> bool:
    """Both deleted, or the same kind with the same bytes (blocks or segments) and exec bits.

    The exec bits count because they sync: two concurrent chmods that differ would otherwise
    adopt one version and stay different forever.
    """
    if a.deleted or b.deleted:
        return a.deleted and b.deleted
    if a.kind != b.kind:
        return False
    if a.kind == "dir":
        return True
    return (
        a.size == b.size
        and a.permissions & 0o111 == b.permissions & 0o111
        and a.blocks == b.blocks
        and a.segments == b.segments
    )


def _tie_break_key(row: FileRow) -> tuple[int, int, str, int, int, tuple[bytes, ...]]:
    # Newer mtime wins, then the larger modified_by; the content itself breaks what is left
    # (one device's two edits with one mtime), so every device picks the same winner.
    digests = tuple(b.digest for b in row.blocks) + tuple(s.digest for s in row.segments)
    return (row.mtime_ns, row.modified_by, row.kind, row.size, row.permissions & 0o111, digests)


def decide(local: FileRow | None, remote: FileRow, *, me: int) -> Decision:
    """What to do with a peer's ``remote`` row for a name we hold as ``local`` (``None``:
    never seen), on device ``me``. Every device decides the same from the same two rows."""
    local_version: Version = local.version if local is not None else ()
    order = compare(local_version, remote.version)
    relation = Content.SAME
    if local is not None and order is Order.CONCURRENT and not same_content(local, remote):
        ours_wins = _tie_break_key(local) > _tie_break_key(remote)
        relation = Content.OURS_WINS if ours_wins else Content.THEIRS_WINS
    local_state = _LIVE if local is not None and not local.deleted else _DEAD
    remote_state = _DEAD if remote.deleted else _LIVE
    rule = DECISIONS[order, local_state, remote_state, relation]
    version: Version
    if rule.version is VersionFrom.LOCAL:
        version = local_version
    elif rule.version is VersionFrom.REMOTE:
        version = remote.version
    elif rule.version is VersionFrom.MERGED:
        version = merge(local_version, remote.version)
    else:
        version = bump(merge(local_version, remote.version), me)
    return Decision(rule.action, version)


# --------------------------------------------------------------------------- names

MAX_COMPONENT_LENGTH: Final = 255
"""Bytes of UTF-8 in one path component (every common filesystem's limit)."""
META_DIR: Final = ".meshsync"
CONFLICT_MARKER: Final = ".sync-conflict-"
MAX_CONFLICT_DEVICE: Final = 32
_DEVICE_UNSAFE: Final = re.compile(r"[^A-Za-z0-9_-]+")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def conflict_name(name: str, *, when_ns: int, device: str) -> str:
    """``a/b.txt`` -> ``a/b.sync-conflict-20261207-203000-laptop.txt`` (time in UTC).

    Pass the losing row's ``mtime_ns`` and its maker's name: devices that resolve the same
    conflict independently then name the copy alike, and their copies merge instead of piling
    up. The stem is shortened to keep the component and the whole name within bounds.
    """
    folder, slash, base = name.rpartition("/")
    dot = base.rfind(".")
    stem, ext = (base[:dot], base[dot:]) if 0 < dot < len(base) - 1 else (base, "")
    # Arithmetic, not fromtimestamp: exact for any int64 of nanoseconds, on every OS.
    when = _EPOCH + timedelta(microseconds=when_ns // 1000)
    tag = _DEVICE_UNSAFE.sub("-", device).strip("-")[:MAX_CONFLICT_DEVICE] or "device"
    suffix = f"{CONFLICT_MARKER}{when:%Y%m%d-%H%M%S}-{tag}"
    head = len(f"{folder}{slash}".encode())
    room = min(MAX_COMPONENT_LENGTH, MAX_NAME_LENGTH - head) - len(suffix)
    if len(ext.encode()) >= room:  # an absurd extension: part of the stem, then
        stem, ext = base, ""
    room -= len(ext.encode())
    if room < 1:
        raise ValueError("no room for a conflict name")
    stem = stem.encode()[:room].decode("utf-8", "ignore")  # cut on a character boundary
    return f"{folder}{slash}{stem}{suffix}{ext}"


def _name_error(name: str) -> str | None:
    if name.startswith("/"):
        return "an absolute path"
    problem = path_syntax_error(name, MAX_NAME_LENGTH)
    if problem is not None:
        return problem
    if not unicodedata.is_normalized("NFC", name):
        return "not in Unicode NFC"
    parts = name.split("/")
    for part in parts:
        if part in (".", ".."):
            return "a '.' or '..' component"
        if len(part) * 4 > MAX_COMPONENT_LENGTH and len(part.encode()) > MAX_COMPONENT_LENGTH:
            return f"a component longer than {MAX_COMPONENT_LENGTH} bytes"
    # Case-insensitive, trailing dots/spaces stripped: ".MeshSync." is our folder on Windows.
    if parts[0].rstrip(". ").casefold() == META_DIR:
        return f"inside {META_DIR}/ (the sync's own files)"
    return None


def validate_row(row: FileRow) -> str | None:
    """Why a peer's row cannot be taken (``None``: it can). Checks what decoding cannot:
    a platform-neutral safe name (the applier still checks it against this OS), a consistent
    shape, sizes that add up, and a well-formed version."""
    problem = _name_error(row.name)
    if problem is not None:
        return f"{row.name[:64]!r}: {problem}"
    if row.kind == "dir" and (row.size or row.blocks or row.segments):
        return "a directory with a size or blocks"
    if row.deleted and (row.blocks or row.segments):
        return "a deleted row with blocks"
    if row.blocks and row.segments:
        return "both blocks and segments"
    if row.kind == "file" and not row.deleted:
        if row.segments:
            for segment in row.segments:
                if not segment.blocks <= segment.size <= segment.blocks * MAX_BLOCK:
                    return f"a segment of {segment.blocks} blocks and {segment.size} bytes"
            total = sum(segment.size for segment in row.segments)
        else:
            total = sum(block.size for block in row.blocks)
        if total != row.size:
            return f"blocks add up to {total} bytes, the row says {row.size}"
    if not row.version and not row.deleted:
        return "no version"
    previous = -1
    for device, counter in row.version:
        if device <= previous:
            return "version not sorted by device, or a device twice"
        if counter > MAX_COUNTER:
            return "a version counter out of range"
        previous = device
    return None


# --------------------------------------------------------------------------- folder states


class FolderState(StrEnum):
    STARTING = "starting"
    SCANNING = "scanning"
    IDLE = "idle"
    SYNCING = "syncing"
    """Pulling peers' changes."""
    PAUSED = "paused"
    ERROR = "error"
    """Root gone, disk full, ...: nothing runs until a retry."""


class FolderInput(StrEnum):
    SCAN_STARTED = "scan_started"
    SCAN_DONE = "scan_done"
    WORK_FOUND = "work_found"
    """Peers' rows to pull (more may come while syncing)."""
    WORK_DONE = "work_done"
    PAUSED = "paused"
    RESUMED = "resumed"
    FAILED = "failed"
    RETRIED = "retried"


_FS, _FI = FolderState, FolderInput
_RUNNING: Final = (_FS.STARTING, _FS.SCANNING, _FS.IDLE, _FS.SYNCING)

FOLDER_TRANSITIONS: Final[Mapping[tuple[FolderState, FolderInput], FolderState]] = {
    (_FS.STARTING, _FI.SCAN_STARTED): _FS.SCANNING,
    # Rescans: periodic, a watcher overflow, or a file that changed under a pull.
    (_FS.IDLE, _FI.SCAN_STARTED): _FS.SCANNING,
    (_FS.SYNCING, _FI.SCAN_STARTED): _FS.SCANNING,
    (_FS.SCANNING, _FI.SCAN_DONE): _FS.IDLE,
    (_FS.IDLE, _FI.WORK_FOUND): _FS.SYNCING,
    (_FS.SYNCING, _FI.WORK_FOUND): _FS.SYNCING,
    (_FS.SYNCING, _FI.WORK_DONE): _FS.IDLE,
    # The user pauses anything, a broken folder too; resuming starts with a scan.
    **{(state, _FI.PAUSED): _FS.PAUSED for state in (*_RUNNING, _FS.ERROR)},
    (_FS.PAUSED, _FI.RESUMED): _FS.SCANNING,
    # A paused folder runs nothing, so nothing of it can fail.
    **{(state, _FI.FAILED): _FS.ERROR for state in _RUNNING},
    (_FS.ERROR, _FI.RETRIED): _FS.SCANNING,
}


def next_state(state: FolderState, event: FolderInput) -> FolderState:
    """The state after ``event``; an illegal pair is the caller's bug."""
    new = FOLDER_TRANSITIONS.get((state, event))
    if new is None:
        raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"{event} while {state}")
    return new
