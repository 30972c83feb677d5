"""Frames: the length-prefixed unit that every P2P stream is cut into.

Layout (docs/protocol.md has the full table)::

    0        1        2                 4                                  8
    +--------+--------+-----------------+----------------------------------+---------------+
    |version | flags  |   type (u16)    |        payload length (u32)      | payload ...   |
    +--------+--------+-----------------+----------------------------------+---------------+

All integers are big-endian. The decoder is sans-IO and accepts the byte stream split anywhere.
It checks the header (version, type, flags, length against that type's cap) *before* it keeps
a single payload byte, so a hostile length costs nothing, and it grows a frame's buffer only as
bytes arrive, so a peer cannot make it reserve memory it has not sent.

Zero-copy: a payload that lies inside one chunk given to :meth:`FrameDecoder.receive_data` is
returned as a read-only ``memoryview`` slice of that chunk (which it keeps alive); a payload
spread over several chunks is gathered once into a fresh buffer that the decoder then forgets.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Collection, Mapping
from typing import Final, NamedTuple, NoReturn, TypeAlias

from meshagent_gui.core.protocol.errors import ErrorCode, LocalProtocolError, ProtocolError

BytesLike: TypeAlias = bytes | bytearray | memoryview

FRAME_VERSION: Final = 1
HEADER: Final = struct.Struct("!BBHI")
HEADER_SIZE: Final = HEADER.size
MAX_TYPE_CODE: Final = 0xFFFF
MAX_LENGTH_FIELD: Final = 0xFFFF_FFFF

# Generic flag: a receiver that does not know the frame's type skips the frame instead of
# failing, so a newer peer can add optional messages without a version bump.
FLAG_IGNORABLE: Final = 0x80
TYPE_FLAGS: Final = 0x7F

KiB: Final = 1024
MiB: Final = 1024 * KiB
DEFAULT_MAX_CONTROL_PAYLOAD: Final = 64 * KiB
DEFAULT_MAX_BULK_PAYLOAD: Final = 4 * MiB + 4 * KiB

_EMPTY: Final = memoryview(b"")
_unpack_header: Final = HEADER.unpack_from


class FrameLimits(NamedTuple):
    """Payload caps. Senders keep to the defaults; a receiver may only raise its own caps."""

    max_control_payload: int = DEFAULT_MAX_CONTROL_PAYLOAD
    max_bulk_payload: int = DEFAULT_MAX_BULK_PAYLOAD


class FrameRule(NamedTuple):
    """What a receiver accepts for one frame type."""

    max_payload: int
    flags_mask: int = 0


class Frame(NamedTuple):
    type_code: int
    flags: int
    """The type-specific flags (``FLAG_IGNORABLE`` removed)."""
    payload: memoryview


def encode_header(type_code: int, flags: int, length: int) -> bytes:
    if not 0 < type_code <= MAX_TYPE_CODE:
        raise LocalProtocolError(ErrorCode.UNKNOWN_MESSAGE_TYPE, f"type {type_code} out of range")
    if not 0 <= flags <= 0xFF:
        raise LocalProtocolError(ErrorCode.BAD_FLAGS, f"flags {flags} out of range")
    if not 0 <= length <= MAX_LENGTH_FIELD:
        raise LocalProtocolError(ErrorCode.FRAME_TOO_LARGE, f"payload of {length} bytes")
    return HEADER.pack(FRAME_VERSION, flags, type_code, length)


class FrameDecoder:
    """Turns a stream's bytes into :class:`Frame` objects, one at a time.

    ``receive_data`` only queues; ``next_frame`` parses one frame or returns ``None`` when it
    needs more bytes. Parsing one frame at a time lets the caller change :attr:`allowed`
    between frames (a stream's state decides which types may come next), and the check happens
    on the header, before the payload is buffered.

    After a :class:`ProtocolError` the decoder drops its buffers and raises that error again on
    every call: a desynchronised stream has no next frame.
    """

    def __init__(
        self,
        rules: Mapping[int, FrameRule],
        *,
        max_ignorable_payload: int = DEFAULT_MAX_CONTROL_PAYLOAD,
        allowed: Collection[int] | None = None,
    ) -> None:
        self._rules = rules
        self._max_ignorable_payload = max_ignorable_payload
        self.allowed: Collection[int] | None = allowed
        """Type codes accepted now; ``None`` accepts every type in ``rules``."""
        # Input not parsed yet: whole chunks, the first one read from ``_offset`` on.
        self._pending: deque[memoryview] = deque()
        self._offset = 0
        self._pending_size = 0
        self._assembly = bytearray()
        self._in_body = False
        self._body_type = 0
        self._body_flags = 0
        self._body_length = 0
        self._skip = 0
        self._error: ProtocolError | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet returned as frames (queued input plus a partial frame)."""
        return self._pending_size + len(self._assembly)

    @property
    def at_boundary(self) -> bool:
        """No partial frame is buffered."""
        return not (self._pending_size or self._assembly or self._in_body or self._skip)

    def receive_data(self, data: BytesLike) -> None:
        if self._error is not None:
            raise self._error
        if not data:
            return
        # Only immutable bytes may be kept as zero-copy slices: a caller may reuse a bytearray.
        chunk = memoryview(data if isinstance(data, bytes) else bytes(data))
        self._pending.append(chunk)
        self._pending_size += len(chunk)

    def next_frame(self) -> Frame | None:
        if self._error is not None:
            raise self._error
        pending = self._pending
        if pending and not (self._in_body or self._skip or self._assembly):
            # Fast path: a whole, valid frame inside the current chunk. Anything else (a split
            # frame, or a header to refuse) takes the general path below, which reports it.
            chunk, offset = pending[0], self._offset
            available = len(chunk) - offset
            if available >= HEADER_SIZE:
                version, flags, type_code, length = _unpack_header(chunk, offset)
                rule = self._rules.get(type_code)
                allowed = self.allowed
                if (
                    rule is not None
                    and version == FRAME_VERSION
                    and HEADER_SIZE + length <= available
                    and length <= rule.max_payload
                    and not flags & TYPE_FLAGS & ~rule.flags_mask
                    and (allowed is None or type_code in allowed)
                ):
                    start = offset + HEADER_SIZE
                    end = start + length
                    self._advance(chunk, end, HEADER_SIZE + length)
                    return Frame(type_code, flags & TYPE_FLAGS, chunk[start:end])
        while True:
            if self._skip:
                self._discard()
                if self._skip:
                    return None
            if not self._in_body:
                if not pending:
                    return None
                chunk, offset = pending[0], self._offset
                if len(chunk) - offset >= HEADER_SIZE and not self._assembly:
                    # The common case: the header lies in one chunk; read it in place.
                    self._start_frame(*_unpack_header(chunk, offset))
                    self._advance(chunk, offset + HEADER_SIZE, HEADER_SIZE)
                else:
                    header = self._take(HEADER_SIZE)
                    if header is None:
                        return None
                    self._start_frame(*_unpack_header(header, 0))
                continue
            payload = self._take(self._body_length)
            if payload is None:
                return None
            self._in_body = False
            return Frame(self._body_type, self._body_flags, payload)

    def end_of_stream(self) -> None:
        """The peer finished the stream; a partial frame left over means it was cut short."""
        if self._error is not None:
            raise self._error
        if not self.at_boundary:
            self._fail(ErrorCode.TRUNCATED, "stream ended inside a frame")

    def fail(self, error: ProtocolError) -> None:
        """Break the decoder with an error found above it (e.g. an undecodable payload)."""
        self.discard()
        self._error = error

    def discard(self) -> None:
        """Drop everything buffered (the stream ended; its remaining bytes are not wanted)."""
        self._pending.clear()
        self._offset = 0
        self._pending_size = 0
        self._assembly = bytearray()
        self._in_body = False
        self._skip = 0

    def _fail(self, code: ErrorCode, message: str) -> NoReturn:
        error = ProtocolError(code, message)
        self.fail(error)
        raise error

    def _start_frame(self, version: int, flags: int, type_code: int, length: int) -> None:
        if version != FRAME_VERSION:
            self._fail(ErrorCode.UNSUPPORTED_FRAME_VERSION, f"frame version {version}")
        rule = self._rules.get(type_code)
        if rule is None:
            if flags & FLAG_IGNORABLE and length <= self._max_ignorable_payload:
                self._skip = length
                return
            if flags & FLAG_IGNORABLE:
                self._fail(ErrorCode.FRAME_TOO_LARGE, f"ignorable frame of {length} bytes")
            self._fail(ErrorCode.UNKNOWN_MESSAGE_TYPE, f"unknown frame type {type_code:#06x}")
        if self.allowed is not None and type_code not in self.allowed:
            self._fail(ErrorCode.UNEXPECTED_MESSAGE, f"frame type {type_code:#06x} not expected")
        type_flags = flags & TYPE_FLAGS
        if type_flags & ~rule.flags_mask:
            self._fail(ErrorCode.BAD_FLAGS, f"flags {flags:#04x} on type {type_code:#06x}")
        if length > rule.max_payload:
            self._fail(
                ErrorCode.FRAME_TOO_LARGE,
                f"{length} bytes for type {type_code:#06x} (cap {rule.max_payload})",
            )
        self._in_body = True
        self._body_type = type_code
        self._body_flags = type_flags
        self._body_length = length

    def _advance(self, chunk: memoryview, end: int, size: int) -> None:
        """Consume ``size`` bytes of the first chunk, up to ``end``."""
        if end == len(chunk):
            self._pending.popleft()
            self._offset = 0
        else:
            self._offset = end
        self._pending_size -= size

    def _take(self, size: int) -> memoryview | None:
        """Exactly ``size`` bytes from the input, or ``None`` (input absorbed) if not there yet."""
        if size == 0:
            return _EMPTY
        pending = self._pending
        assembly = self._assembly
        if not assembly and pending:
            chunk, start = pending[0], self._offset
            end = start + size
            if end <= len(chunk):
                self._advance(chunk, end, size)
                return chunk[start:end]
        while pending and len(assembly) < size:
            chunk, start = pending[0], self._offset
            end = min(len(chunk), start + size - len(assembly))
            assembly += chunk[start:end]
            self._advance(chunk, end, end - start)
        if len(assembly) < size:
            return None
        self._assembly = bytearray()
        return memoryview(assembly).toreadonly()

    def _discard(self) -> None:
        pending = self._pending
        while pending and self._skip:
            chunk, start = pending[0], self._offset
            end = min(len(chunk), start + self._skip)
            self._skip -= end - start
            self._advance(chunk, end, end - start)
