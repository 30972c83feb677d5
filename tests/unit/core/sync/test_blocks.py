"""Chunking, digests and segments (core/sync/blocks.py)."""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from blake3 import blake3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshagent_gui.core.protocol.sync import (
    INLINE_BLOCKS,
    MAX_BLOCK,
    MAX_SEGMENT_BLOCKS,
    MIN_BLOCK,
    Block,
    Segment,
)
from meshagent_gui.core.sync import blocks as blocks_module
from meshagent_gui.core.sync.blocks import (
    MIN_PIECE_SIZE,
    FileChangedError,
    chunk_file,
    cut,
    decode_blocks,
    digest,
    encode_blocks,
    row_layout,
    segment_digest,
    segments_of,
)

KiB = 1024
MiB = 1024 * KiB


def random_bytes(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def changed(old: list[Block], new: list[Block]) -> tuple[int, int]:
    """(blocks of ``new`` not in ``old``, blocks of ``old`` not in ``new``), by digest."""
    before = {block.digest for block in old}
    after = {block.digest for block in new}
    return len(after - before), len(before - after)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------- cut


def test_cut_of_nothing_and_of_small_data() -> None:
    assert cut(b"") == []
    assert cut(b"x") == [Block(1, blake3(b"x").digest())]
    small = random_bytes(MIN_BLOCK - 1)
    assert cut(small) == [Block(len(small), digest(small))]
    assert cut(memoryview(small)) == cut(small)


def test_cut_sizes_sum_and_stay_in_bounds() -> None:
    data = random_bytes(4 * MiB)
    blocks = cut(data)
    assert sum(block.size for block in blocks) == len(data)
    assert all(MIN_BLOCK <= block.size <= MAX_BLOCK for block in blocks[:-1])
    assert 0 < blocks[-1].size <= MAX_BLOCK
    offset = 0
    for block in blocks:
        assert block.digest == blake3(data[offset : offset + block.size]).digest()
        offset += block.size
    # Content with no cut points (zeros) is cut at the maximum.
    assert [block.size for block in cut(bytes(3 * MAX_BLOCK))] == [MAX_BLOCK] * 3


@pytest.mark.parametrize("where", [0.5, 0.1, 0.9, 0.0, 1.0])
def test_a_one_byte_insert_changes_at_most_two_blocks(where: float) -> None:
    data = random_bytes(4 * MiB, seed=7)
    at = int(len(data) * where)
    old, new = cut(data), cut(data[:at] + b"!" + data[at:])
    added, removed = changed(old, new)
    assert added <= 2
    assert removed <= 2
    assert abs(len(new) - len(old)) <= 2
    assert sum(block.size for block in new) == len(data) + 1


def test_a_one_byte_overwrite_changes_at_most_two_blocks() -> None:
    data = bytearray(random_bytes(4 * MiB, seed=8))
    old = cut(bytes(data))
    data[len(data) // 3] ^= 0xFF
    added, removed = changed(old, cut(bytes(data)))
    assert added <= 2
    assert removed <= 2


def test_the_pure_python_fallback_cuts_the_same() -> None:
    from pyfastcdc.py import FastCDC

    from meshagent_gui.core.protocol.sync import AVG_BLOCK

    data = random_bytes(700 * KiB, seed=3)
    slow = FastCDC(AVG_BLOCK, min_size=MIN_BLOCK, max_size=MAX_BLOCK)
    assert [chunk.length for chunk in slow.cut_buf(data)] == [block.size for block in cut(data)]


# ---------------------------------------------------------------------------- chunk_file


PIECE = MIN_PIECE_SIZE


@pytest.mark.parametrize(
    "size",
    [
        0,
        1,
        MIN_BLOCK - 1,
        MIN_BLOCK,
        MIN_BLOCK + 1,
        PIECE - MAX_BLOCK - 1,
        PIECE - MAX_BLOCK,
        PIECE - MAX_BLOCK + 1,
        PIECE - 1,
        PIECE,
        PIECE + 1,
        2 * PIECE - 1,
        2 * PIECE,
        2 * PIECE + 1,
        5 * PIECE + 12_345,
    ],
)
@pytest.mark.parametrize("kind", ["random", "zeros"])
def test_chunk_file_equals_cut_around_piece_boundaries(
    tmp_path: Path, size: int, kind: str
) -> None:
    data = random_bytes(size, seed=size) if kind == "random" else bytes(size)
    path = write(tmp_path / "f", data)
    assert chunk_file(path, piece_size=PIECE) == cut(data)


@st.composite
def file_contents(draw: st.DrawFn) -> bytes:
    """Random bytes, or random runs and zero runs (cut at MAX_BLOCK in the zero runs)."""
    size = draw(st.integers(0, 4 * PIECE))
    seed = draw(st.integers(0, 2**32))
    if draw(st.booleans()):
        return random_bytes(size, seed)
    rng = random.Random(seed)
    parts: list[bytes] = []
    total = 0
    while total < size:
        run = min(size - total, rng.randrange(1, 3 * MAX_BLOCK))
        parts.append(rng.randbytes(run) if rng.random() < 0.5 else bytes(run))
        total += run
    return b"".join(parts)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=file_contents(), piece=st.integers(PIECE, 3 * PIECE))
def test_chunk_file_equals_cut_for_any_content_and_piece_size(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, piece: int
) -> None:
    path = write(tmp_path_factory.mktemp("chunk") / "f", data)
    assert chunk_file(path, piece_size=piece) == cut(data)


def test_chunk_file_with_the_default_piece_size_uses_the_hashing_thread(tmp_path: Path) -> None:
    data = random_bytes(20 * MiB + 4321, seed=11)
    path = write(tmp_path / "big", data)
    assert chunk_file(path, expect=path.stat()) == cut(data)


def test_chunk_file_refuses_a_piece_smaller_than_two_blocks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="piece_size"):
        chunk_file(write(tmp_path / "f", b"x"), piece_size=MIN_PIECE_SIZE - 1)


def during_read(
    monkeypatch: pytest.MonkeyPatch, change: Callable[[], None], after_reads: int = 1
) -> None:
    """Run ``change`` once, after chunk_file's ``after_reads``-th read of the file."""
    real = blocks_module._chunk_stream

    def chunk_stream(
        readinto: Callable[[memoryview], int | None], *args: object
    ) -> tuple[list[Block], int]:
        reads = 0

        def hooked(view: memoryview) -> int | None:
            nonlocal reads
            n = readinto(view)
            reads += 1
            if reads == after_reads:
                change()
            return n

        return real(hooked, *args)  # type: ignore[arg-type]

    real_small = blocks_module._read_small

    def read_small(fd: int, limit: int) -> bytes:  # files under MIN_BLOCK: one read
        data = real_small(fd, limit)
        if after_reads == 1:
            change()
        return data

    monkeypatch.setattr(blocks_module, "_chunk_stream", chunk_stream)
    monkeypatch.setattr(blocks_module, "_read_small", read_small)


@pytest.mark.parametrize("size", [100 * KiB, 3 * PIECE])  # one buffer; the hashing thread
@pytest.mark.parametrize("with_expect", [True, False])
def test_a_file_rewritten_while_read_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, with_expect: bool
) -> None:
    path = write(tmp_path / "f", random_bytes(size))
    expect = path.stat() if with_expect else None

    def touch() -> None:
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    during_read(monkeypatch, touch)
    with pytest.raises(FileChangedError, match="changed while it was read"):
        chunk_file(path, expect=expect, piece_size=PIECE)


@pytest.mark.parametrize("size", [0, 100 * KiB, 3 * PIECE])
def test_a_file_growing_while_read_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    path = write(tmp_path / "log", random_bytes(size))

    def grow() -> None:
        with path.open("ab") as file:
            file.write(bytes(10 * PIECE))

    during_read(monkeypatch, grow)
    with pytest.raises(FileChangedError):
        chunk_file(path, piece_size=PIECE)


def test_a_file_truncated_while_read_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "f", random_bytes(3 * PIECE))
    expect = path.stat()
    during_read(monkeypatch, lambda: os.truncate(path, PIECE))
    with pytest.raises(FileChangedError):
        chunk_file(path, expect=expect, piece_size=PIECE)


def test_a_file_changed_since_its_stat_raises(tmp_path: Path) -> None:
    path = write(tmp_path / "f", b"old")
    expect = path.stat()
    path.write_bytes(b"newer")
    with pytest.raises(FileChangedError, match="before it was read"):
        chunk_file(path, expect=expect)


def test_a_file_replaced_by_another_raises(tmp_path: Path) -> None:
    path = write(tmp_path / "f", b"same")
    expect = path.stat()
    other = write(tmp_path / "g", b"same")
    os.utime(other, ns=(expect.st_atime_ns, expect.st_mtime_ns))
    os.replace(other, path)  # same size and mtime, another file
    with pytest.raises(FileChangedError):
        chunk_file(path, expect=expect)


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks and FIFOs")
def test_a_symlink_or_a_fifo_is_never_read(tmp_path: Path) -> None:
    target = write(tmp_path / "target", b"data")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(FileChangedError, match="symbolic link"):
        chunk_file(tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(FileChangedError, match="regular file"):
        chunk_file(tmp_path / "fifo")


def test_a_missing_file_raises_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        chunk_file(tmp_path / "gone")


# ---------------------------------------------------------------------------- segments


def synthetic_blocks(count: int, seed: int = 5) -> list[Block]:
    rng = random.Random(seed)
    return [Block(rng.randrange(MIN_BLOCK, MAX_BLOCK), rng.randbytes(32)) for _ in range(count)]


def test_segment_digest_is_blake3_of_the_canonical_encoding() -> None:
    blocks = [Block(1, bytes(range(32))), Block(MAX_BLOCK, bytes(32))]
    canonical = b"".join(block.size.to_bytes(4, "big") + block.digest for block in blocks)
    assert encode_blocks(blocks) == canonical
    assert segment_digest(blocks) == blake3(canonical).digest()
    assert decode_blocks(canonical) == tuple(blocks)
    assert decode_blocks(b"") == ()
    with pytest.raises(ValueError, match="truncated"):
        decode_blocks(canonical[:-1])


def test_segments_cut_after_a_zero_digest_byte() -> None:
    blocks = synthetic_blocks(5000)
    segments = segments_of(blocks)
    assert [block for _, run in segments for block in run] == blocks
    for _, run in segments[:-1]:
        assert run[-1].digest[0] == 0
        assert all(block.digest[0] != 0 for block in run[:-1])
    for segment, run in segments:
        assert segment == Segment(segment_digest(run), len(run), sum(b.size for b in run))
    assert 5 < len(segments) < 60  # ~5000 / 256


def test_a_segment_is_capped_at_max_segment_blocks() -> None:
    blocks = [
        Block(1, bytes([1]) + i.to_bytes(31, "big")) for i in range(2 * MAX_SEGMENT_BLOCKS + 5)
    ]
    assert [segment.blocks for segment, _ in segments_of(blocks)] == [
        MAX_SEGMENT_BLOCKS,
        MAX_SEGMENT_BLOCKS,
        5,
    ]
    assert segments_of([]) == []


def test_an_insert_changes_at_most_two_segments() -> None:
    blocks = synthetic_blocks(6000)
    old = {segment.digest for segment, _ in segments_of(blocks)}
    rng = random.Random(9)
    for _ in range(40):
        at = rng.randrange(len(blocks) + 1)
        inserted = blocks[:at] + synthetic_blocks(1, seed=rng.randrange(2**32)) + blocks[at:]
        new = {segment.digest for segment, _ in segments_of(inserted)}
        assert len(new - old) <= 2
        assert len(old - new) <= 2


@settings(max_examples=30, deadline=None)
@given(at=st.integers(0, 3000), first=st.integers(0, 255), seed=st.integers(0, 2**32))
def test_replacing_a_block_changes_at_most_two_segments(at: int, first: int, seed: int) -> None:
    blocks = synthetic_blocks(3001)
    replacement = Block(MIN_BLOCK, bytes([first]) + random.Random(seed).randbytes(31))
    edited = [*blocks[:at], replacement, *blocks[at + 1 :]]
    old = {segment.digest for segment, _ in segments_of(blocks)}
    new = {segment.digest for segment, _ in segments_of(edited)}
    assert len(new - old) <= 2
    assert len(old - new) <= 2


def test_row_layout_inline_up_to_the_limit_then_segments() -> None:
    assert row_layout([]) == ((), ())
    few = synthetic_blocks(INLINE_BLOCKS)
    assert row_layout(few) == (tuple(few), ())
    many = synthetic_blocks(INLINE_BLOCKS * 10)
    inline, segments = row_layout(many)
    assert inline == ()
    assert segments == tuple(segment for segment, _ in segments_of(many))
    assert sum(segment.size for segment in segments) == sum(block.size for block in many)
    assert sum(segment.blocks for segment in segments) == len(many)
