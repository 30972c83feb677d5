"""Blocks: content-defined chunks of a file, named by their blake3 digest (docs/sync.md).

A file is cut with FastCDC 2020 (min 16 KiB, average 64 KiB, max 256 KiB): a cut depends only
on the bytes near it, so a 1-byte insert renames at most the one or two blocks around it. A
large file's block list is itself cut into *segments*, after every block whose digest starts
with a zero byte (~256 blocks each), so the list is content-defined too.

Everything here blocks (disk reads, hashing): the caller runs it in an executor. The functions
are safe to call from several threads at once.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Final

from blake3 import blake3

from meshagent_gui.core.protocol.sync import (
    AVG_BLOCK,
    INLINE_BLOCKS,
    MAX_BLOCK,
    MAX_SEGMENT_BLOCKS,
    MIN_BLOCK,
    Block,
    Segment,
)

try:
    from pyfastcdc.cy import FastCDC
except ImportError:  # pragma: no cover - no wheel for this platform: same cuts, ~100x slower
    from pyfastcdc.py import FastCDC

if TYPE_CHECKING:  # the Cython module has no stubs; the package's .pyi describes both
    from pyfastcdc import FastCDC as TypedFastCDC

PIECE_SIZE: Final = 8 * 1024 * 1024
"""How much of a file :func:`chunk_file` reads at a time (two pieces are in memory at once)."""
MIN_PIECE_SIZE: Final = 2 * MAX_BLOCK
"""A piece must hold the carried tail (< MAX_BLOCK) and still a whole block of new data."""

_ENCODED_BLOCK: Final = struct.Struct(">I32s")
# The FastCDC object is only read-only configuration; each cut_buf() iterator keeps its own
# position, so one instance serves every thread.
_CDC: Final[TypedFastCDC] = FastCDC(AVG_BLOCK, min_size=MIN_BLOCK, max_size=MAX_BLOCK)
_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK: Final = getattr(os, "O_NONBLOCK", 0)  # a FIFO put there since the scan: no hang
_BINARY: Final = getattr(os, "O_BINARY", 0)
_SEQUENTIAL: Final = getattr(os, "POSIX_FADV_SEQUENTIAL", None)


class FileChangedError(Exception):
    """The file changed (size, mtime, identity or kind) while it was read: hash it again later."""


def digest(data: bytes | memoryview) -> bytes:
    """blake3 of ``data``, 32 bytes: the name of a block."""
    return blake3(data).digest()


def cut(data: bytes | memoryview) -> list[Block]:
    """The blocks of ``data``: one block under MIN_BLOCK bytes, none for ``b""``."""
    return [Block(chunk.length, blake3(chunk.data).digest()) for chunk in _CDC.cut_buf(data)]


def chunk_file(
    path: str | os.PathLike[str],
    *,
    expect: os.stat_result | None = None,
    piece_size: int = PIECE_SIZE,
) -> list[Block]:
    """The blocks of the file at ``path``, equal to ``cut()`` of its whole content.

    A file up to ``piece_size`` is read at once into a buffer of its own size. A bigger one is
    read ``piece_size`` bytes at a time (never whole): the bytes after the last cut that is
    certain (less than MAX_BLOCK from the end of a piece, where more data could move it) are
    carried to the next piece, and each piece is hashed in a helper thread while the next one
    is read and cut (FastCDC and blake3 both release the GIL).

    :class:`FileChangedError` if the file's size, mtime or identity differ from ``expect``
    (or, without ``expect``, from what they were when it was opened) once it has been read,
    if more or fewer bytes were read than its size, or if ``path`` is no longer a regular file
    (a symlink is never followed). Other OS errors (unreadable, gone) propagate.
    """
    if piece_size < MIN_PIECE_SIZE:
        raise ValueError(f"piece_size must be at least {MIN_PIECE_SIZE}")
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _BINARY)
    except OSError as e:
        if e.errno == errno.ELOOP:  # replaced by a symlink since it was scanned
            raise FileChangedError(f"{path} is now a symbolic link") from e
        raise
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise FileChangedError(f"{path} is no longer a regular file")
        reference = before if expect is None else expect
        if _differs(before, reference):
            raise FileChangedError(f"{path} changed before it was read")
        if reference.st_size < MIN_BLOCK:
            # One block, whatever FastCDC would say: one read (a byte more than expected, so
            # a file that grew is seen), no buffer, no cutting, no file object.
            data = _read_small(fd, reference.st_size + 1)
            total = len(data)
            blocks = [Block(total, blake3(data).digest())] if data else []
            after = os.fstat(fd)
            return _checked(path, blocks, total, after, reference)
        if _SEQUENTIAL is not None and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, _SEQUENTIAL)
        with open(fd, "rb", buffering=0, closefd=False) as file:
            # One byte more than expected: a file that grew is seen at once, not followed.
            limit = reference.st_size + 1
            if limit <= piece_size:  # most files: one buffer of their size, one read
                blocks, total = _chunk_stream(file.readinto, limit, limit, None)
            else:
                with ThreadPoolExecutor(1, thread_name_prefix="meshagent-hash") as hasher:
                    blocks, total = _chunk_stream(file.readinto, piece_size, limit, hasher)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    return _checked(path, blocks, total, after, reference)


def _read_small(fd: int, limit: int) -> bytes:
    return os.read(fd, limit)


def _checked(
    path: str | os.PathLike[str],
    blocks: list[Block],
    total: int,
    after: os.stat_result,
    reference: os.stat_result,
) -> list[Block]:
    if total != reference.st_size or _differs(after, reference):
        raise FileChangedError(f"{path} changed while it was read")
    return blocks


def _differs(now: os.stat_result, then: os.stat_result) -> bool:
    if now.st_size != then.st_size or now.st_mtime_ns != then.st_mtime_ns:
        return True
    # DirEntry.stat() on Windows has no inode: compare identity only when both know it.
    return bool(now.st_ino and then.st_ino) and (now.st_ino, now.st_dev) != (
        then.st_ino,
        then.st_dev,
    )


def _chunk_stream(
    readinto: Callable[[memoryview], int | None],
    buffer_size: int,
    limit: int,
    hasher: ThreadPoolExecutor | None,
) -> tuple[list[Block], int]:
    """Cut and hash what ``readinto`` gives: (blocks, bytes read). Stops early, with the blocks
    so far, once ``limit`` bytes were read (the file grew: the caller discards the result).

    ``buffer_size`` is either at least ``limit`` (all in one buffer) or at least
    MIN_PIECE_SIZE (room for the carried tail and a block more). With a ``hasher``, two buffers
    alternate: piece N is hashed in the helper thread while piece N+1 is read and cut here; the
    helper is waited for before its buffer is reused.
    """
    views = [memoryview(bytearray(buffer_size))]
    if hasher is not None:
        views.append(memoryview(bytearray(buffer_size)))
    blocks: list[Block] = []
    pending: Future[list[Block]] | None = None
    previous: memoryview | None = None
    carry_from = carried = total = 0
    eof = False
    turn = 0
    while not eof:
        view = views[turn % len(views)]
        turn += 1
        if carried:
            assert previous is not None
            view[:carried] = previous[carry_from : carry_from + carried]
        filled = carried
        while filled < buffer_size:
            n = readinto(view[filled:])
            if not n:
                eof = True
                break
            filled += n
            total += n
            if total >= limit:
                break
        if total >= limit:
            break
        spans, used = _spans(view[:filled], final=eof)
        if hasher is None:
            blocks.extend(_hash_spans(view, spans))
        else:
            if pending is not None:
                blocks.extend(pending.result())
            pending = hasher.submit(_hash_spans, view, spans)
        previous, carry_from, carried = view, used, filled - used
    if pending is not None:
        blocks.extend(pending.result())
    return blocks, total


def _spans(view: memoryview, *, final: bool) -> tuple[list[tuple[int, int]], int]:
    """The (offset, length) of the cuts in ``view`` that more data could not move, and where
    the uncertain tail starts (``len(view)`` when ``final``).

    FastCDC looks at most MAX_BLOCK bytes past a block's start, so a block starting at least
    MAX_BLOCK before the end of the data read so far is cut exactly as in the whole file.
    """
    end = len(view)
    spans: list[tuple[int, int]] = []
    for chunk in _CDC.cut_buf(view):
        if not final and chunk.offset + MAX_BLOCK > end:
            return spans, chunk.offset
        spans.append((chunk.offset, chunk.length))
    return spans, end


def _hash_spans(view: memoryview, spans: list[tuple[int, int]]) -> list[Block]:
    return [
        Block(length, blake3(view[offset : offset + length]).digest()) for offset, length in spans
    ]


# ---------------------------------------------------------------------------- segments


def encode_blocks(blocks: Sequence[Block]) -> bytes:
    """The canonical encoding of a block list: per block, its size (u32 big-endian) and its
    digest. Segment digests are taken over it; the index stores segments in it."""
    pack = _ENCODED_BLOCK.pack
    return b"".join([pack(block.size, block.digest) for block in blocks])


def decode_blocks(data: bytes) -> tuple[Block, ...]:
    """The inverse of :func:`encode_blocks` (:class:`ValueError` on a truncated encoding)."""
    if len(data) % _ENCODED_BLOCK.size:
        raise ValueError("truncated block list")
    return tuple(Block(size, block) for size, block in _ENCODED_BLOCK.iter_unpack(data))


def segment_digest(blocks: Sequence[Block]) -> bytes:
    """A segment's name: blake3 of its blocks' canonical encoding (:func:`encode_blocks`)."""
    return blake3(encode_blocks(blocks)).digest()


def segments_of(blocks: Sequence[Block]) -> list[tuple[Segment, tuple[Block, ...]]]:
    """``blocks`` in content-defined runs: a run ends after a block whose digest starts with a
    zero byte (1 in 256), or at MAX_SEGMENT_BLOCKS; each with its :class:`Segment`."""
    segments: list[tuple[Segment, tuple[Block, ...]]] = []
    start = 0
    for i, block in enumerate(blocks):
        if block.digest[0] == 0 or i + 1 - start == MAX_SEGMENT_BLOCKS:
            segments.append(_segment(blocks[start : i + 1]))
            start = i + 1
    if start < len(blocks):
        segments.append(_segment(blocks[start:]))
    return segments


def _segment(run: Sequence[Block]) -> tuple[Segment, tuple[Block, ...]]:
    run = tuple(run)
    return Segment(segment_digest(run), len(run), sum(block.size for block in run)), run


def row_layout(blocks: Sequence[Block]) -> tuple[tuple[Block, ...], tuple[Segment, ...]]:
    """What a row carries: its blocks inline (at most INLINE_BLOCKS), else ``((), segments)``;
    the segments' block lists go to the index (``FolderIndex.store_segment``)."""
    if len(blocks) <= INLINE_BLOCKS:
        return tuple(blocks), ()
    return (), tuple(segment for segment, _ in segments_of(blocks))
