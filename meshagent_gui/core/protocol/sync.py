"""Folder sync on the wire (sans-IO): rows, version vectors, the messages, and the decisions.

docs/sync.md is the design. A SYNC stream is directional: the side that opens it *pulls* (it
subscribes to the other side's index and asks for blocks), the side that accepts *serves*.
Everything a peer sends is bounded as it is decoded (``msgspec.Meta``) and then checked by
:func:`validate_row` before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Final, Literal, TypeAlias

import msgspec

from meshagent_gui.core.protocol.framing import KiB, MiB
from meshagent_gui.core.protocol.messages import BASE_REGISTRY, MAX_REASON_LENGTH
from meshagent_gui.core.protocol.registry import control_message, struct_message

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
