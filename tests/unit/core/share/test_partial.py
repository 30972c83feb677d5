from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from blake3 import blake3

from meshagent_gui.core.protocol.transfer import chunk_count
from meshagent_gui.core.share.disk import DISK, Disk
from meshagent_gui.core.share.partial import (
    DEFAULT_SYNC_EVERY,
    DIGEST_SIZE,
    MAGIC,
    STATE_SUFFIX,
    TABLE_OFFSET,
    DiskFull,
    HashMismatch,
    PartialCorrupt,
    PartialFile,
    StateHeader,
    partial_exists,
    slot_names,
)

from .faulty_disk import FaultyDisk

CHUNK = 64 * 1024
SENDER = "device-a" * 8
KEY = bytes(range(16))
MTIME_NS = 1_600_000_000_123_456_789


def chunks_of(data: bytes, size: int = CHUNK) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def digest(data: bytes) -> bytes:
    return blake3(data).digest()


@pytest.fixture
def payload() -> bytes:
    return os.urandom(5 * CHUNK + 1234)  # six chunks, the last one short


async def open_partial(
    destination: Path,
    size: int,
    *,
    sender: str = SENDER,
    key: bytes = KEY,
    sync_every: int = DEFAULT_SYNC_EVERY,
    disk: Disk = DISK,
) -> PartialFile:
    return await PartialFile.open(
        destination,
        sender=sender,
        key=key,
        size=size,
        chunk_size=CHUNK,
        sync_every=sync_every,
        disk=disk,
    )


def crash(partial: PartialFile) -> None:
    """What a killed process leaves: the descriptors closed by the kernel, nothing else."""
    partial._close()


async def test_chunks_out_of_order_then_finish(tmp_path: Path, payload: bytes) -> None:
    destination = tmp_path / "movie.mkv"
    partial = await open_partial(destination, len(payload))
    assert partial.chunk_count == 6 and partial.verified_bytes == 0
    assert partial.data_path.name == "movie.mkv.meshpart"
    assert partial.state_path.name == "movie.mkv.meshpart.state"
    pieces = chunks_of(payload)
    for number in (5, 0, 3, 1, 4, 2):
        await partial.write_chunk(number, digest(pieces[number]), pieces[number])
    assert partial.complete and partial.have == b"\x3f"
    landed = await partial.finish(digest(payload), mtime_ns=MTIME_NS)
    assert landed == destination
    assert destination.read_bytes() == payload
    assert sorted(p.name for p in tmp_path.iterdir()) == ["movie.mkv"]


async def test_bitmap_reports_what_landed(tmp_path: Path) -> None:
    data = os.urandom(10 * CHUNK)
    partial = await open_partial(tmp_path / "f", len(data))
    pieces = chunks_of(data)
    for number in (0, 2, 9):
        await partial.write_chunk(number, digest(pieces[number]), pieces[number])
    assert partial.have == bytes([0b0000_0101, 0b0000_0010])  # bit i of byte i//8, LSB first
    assert list(partial.missing()) == [1, 3, 4, 5, 6, 7, 8]
    assert partial.verified_bytes == 3 * CHUNK
    await partial.abandon()


async def test_state_file_layout(tmp_path: Path, payload: bytes) -> None:
    partial = await open_partial(tmp_path / "f.bin", len(payload))
    pieces = chunks_of(payload)
    await partial.write_chunk(2, digest(pieces[2]), pieces[2])
    raw = partial.state_path.read_bytes()
    assert raw[:8] == MAGIC
    assert len(raw) == TABLE_OFFSET + 6 * DIGEST_SIZE
    header = StateHeader.decode(raw[:TABLE_OFFSET])
    assert (header.size, header.chunk_size, header.key) == (len(payload), CHUNK, KEY)
    assert header.sender == blake3(SENDER.encode()).digest()
    table = raw[TABLE_OFFSET:]
    assert table[2 * DIGEST_SIZE : 3 * DIGEST_SIZE] == digest(pieces[2])
    assert table[: 2 * DIGEST_SIZE] == bytes(2 * DIGEST_SIZE)
    await partial.abandon()


async def test_resume_after_a_crash(tmp_path: Path, payload: bytes) -> None:
    destination = tmp_path / "a.iso"
    pieces = chunks_of(payload)
    first = await open_partial(destination, len(payload))
    for number in (0, 1, 4):
        await first.write_chunk(number, digest(pieces[number]), pieces[number])
    crash(first)

    second = await open_partial(destination, len(payload))
    assert second.data_path == first.data_path  # the same slot, resumed
    assert second.discarded is None
    assert second.have == bytes([0b0001_0011])
    assert second.resumed_bytes == 3 * CHUNK
    for number in second.missing():
        await second.write_chunk(number, digest(pieces[number]), pieces[number])
    assert await second.finish(digest(payload), mtime_ns=MTIME_NS) == destination
    assert destination.read_bytes() == payload


async def test_a_chunk_whose_data_was_lost_is_missing_again(tmp_path: Path, payload: bytes) -> None:
    destination = tmp_path / "a.iso"
    pieces = chunks_of(payload)
    first = await open_partial(destination, len(payload))
    for number in range(6):
        await first.write_chunk(number, digest(pieces[number]), pieces[number])
    crash(first)
    with open(first.data_path, "r+b") as damaged:  # the table claims it, the data disagrees
        damaged.seek(3 * CHUNK + 100)
        damaged.write(b"\xff" * 8)

    second = await open_partial(destination, len(payload))
    assert list(second.missing()) == [3]
    assert second.verified_bytes == len(payload) - CHUNK
    table = second.state_path.read_bytes()[TABLE_OFFSET:]
    assert table[3 * DIGEST_SIZE : 4 * DIGEST_SIZE] == bytes(DIGEST_SIZE)  # claim withdrawn
    await second.write_chunk(3, digest(pieces[3]), pieces[3])
    await second.finish(digest(payload), mtime_ns=MTIME_NS)
    assert destination.read_bytes() == payload


async def test_a_digest_that_landed_without_its_data(tmp_path: Path, payload: bytes) -> None:
    # The kernel may write the state before the data: the data region is still a hole.
    destination = tmp_path / "a.iso"
    first = await open_partial(destination, len(payload))
    crash(first)
    with open(first.state_path, "r+b") as state:
        state.seek(TABLE_OFFSET + DIGEST_SIZE)
        state.write(digest(chunks_of(payload)[1]))
    second = await open_partial(destination, len(payload))
    assert second.verified_bytes == 0
    await second.abandon()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda raw: b"garbage!" + raw[8:], "not ours"),
        (lambda raw: raw[:8] + b"\x00\x09" + raw[10:], "version"),
        (lambda raw: raw[:30] + bytes(4) + raw[34:], "damaged"),
        (lambda raw: raw[:40], "truncated"),
        (lambda raw: raw[: TABLE_OFFSET + 10], "truncated"),
    ],
)
async def test_a_bad_state_file_starts_over(
    tmp_path: Path, payload: bytes, damage: object, reason: str
) -> None:
    destination = tmp_path / "f.bin"
    pieces = chunks_of(payload)
    first = await open_partial(destination, len(payload))
    await first.write_chunk(0, digest(pieces[0]), pieces[0])
    crash(first)
    assert callable(damage)
    first.state_path.write_bytes(damage(first.state_path.read_bytes()))

    second = await open_partial(destination, len(payload))
    assert second.discarded is not None and reason in second.discarded
    assert second.verified_bytes == 0 and second.data_path == first.data_path
    assert StateHeader.decode(second.state_path.read_bytes()[:TABLE_OFFSET]).key == KEY
    await second.abandon()


def test_header_decode_raises_partial_corrupt() -> None:
    with pytest.raises(PartialCorrupt):
        StateHeader.decode(b"short")


async def test_state_without_data_starts_over(tmp_path: Path, payload: bytes) -> None:
    first = await open_partial(tmp_path / "f", len(payload))
    pieces = chunks_of(payload)
    await first.write_chunk(0, digest(pieces[0]), pieces[0])
    crash(first)
    first.data_path.unlink()
    second = await open_partial(tmp_path / "f", len(payload))
    assert second.discarded == "the partial data is missing" and second.verified_bytes == 0
    await second.abandon()


async def test_a_new_version_from_the_same_sender_replaces_the_old(
    tmp_path: Path, payload: bytes
) -> None:
    pieces = chunks_of(payload)
    old = await open_partial(tmp_path / "f", len(payload), key=b"o" * 16)
    await old.write_chunk(0, digest(pieces[0]), pieces[0])
    await old.abandon()
    new = await open_partial(tmp_path / "f", len(payload), key=b"n" * 16)
    assert new.data_path == old.data_path and new.verified_bytes == 0
    assert new.discarded is not None and "older version" in new.discarded
    await new.abandon()


async def test_another_senders_partial_is_left_alone(tmp_path: Path, payload: bytes) -> None:
    pieces = chunks_of(payload)
    theirs = await open_partial(tmp_path / "f", len(payload), sender="device-b")
    await theirs.write_chunk(0, digest(pieces[0]), pieces[0])
    await theirs.abandon()
    ours = await open_partial(tmp_path / "f", len(payload))
    assert ours.data_path.name == "f.1.meshpart" and ours.verified_bytes == 0
    await ours.abandon()
    again = await open_partial(tmp_path / "f", len(payload), sender="device-b")
    assert again.data_path == theirs.data_path and again.verified_bytes == CHUNK
    await again.abandon()


async def test_a_live_writer_keeps_its_slot(tmp_path: Path, payload: bytes) -> None:
    first = await open_partial(tmp_path / "f", len(payload))
    second = await open_partial(tmp_path / "f", len(payload))  # same version, still locked
    assert first.data_path != second.data_path
    await first.abandon()
    await second.discard()
    assert not second.data_path.exists() and not second.state_path.exists()
    assert first.data_path.exists()


async def test_a_hard_linked_partial_is_never_written_through(
    tmp_path: Path, payload: bytes
) -> None:
    first = await open_partial(tmp_path / "f", len(payload))
    crash(first)
    precious = tmp_path / "precious"
    precious.write_bytes(b"keep me")
    first.data_path.unlink()
    os.link(precious, first.data_path)  # someone swapped in a link to another file
    second = await open_partial(tmp_path / "f", len(payload))
    pieces = chunks_of(payload)
    await second.write_chunk(0, digest(pieces[0]), pieces[0])
    assert precious.read_bytes() == b"keep me"
    assert os.stat(second.data_path).st_nlink == 1
    await second.abandon()


async def test_a_symlinked_partial_is_never_followed(tmp_path: Path, payload: bytes) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    data_path, _ = slot_names(tmp_path / "f", 0)
    data_path.symlink_to(victim)
    partial = await open_partial(tmp_path / "f", len(payload))
    pieces = chunks_of(payload)
    await partial.write_chunk(0, digest(pieces[0]), pieces[0])
    assert victim.read_bytes() == b"keep me"
    assert not partial.data_path.is_symlink()
    await partial.abandon()


async def test_a_damaged_chunk_is_refused_and_not_written(tmp_path: Path, payload: bytes) -> None:
    partial = await open_partial(tmp_path / "f", len(payload))
    pieces = chunks_of(payload)
    bad = b"\x00" + pieces[1][1:]
    with pytest.raises(HashMismatch) as caught:
        await partial.write_chunk(1, digest(pieces[1]), bad)
    assert caught.value.chunk == 1 and caught.value.code == "hash_mismatch"
    assert not partial.has(1)
    assert partial.state_path.read_bytes()[TABLE_OFFSET:] == bytes(6 * DIGEST_SIZE)
    await partial.abandon()


async def test_chunks_the_offer_does_not_allow(tmp_path: Path, payload: bytes) -> None:
    partial = await open_partial(tmp_path / "f", len(payload))
    with pytest.raises(ValueError, match="beyond"):
        await partial.write_chunk(6, digest(b"x"), b"x")
    with pytest.raises(ValueError, match="not 65536"):
        await partial.write_chunk(0, digest(b"x" * (CHUNK + 1)), b"x" * (CHUNK + 1))
    with pytest.raises(ValueError, match="not 1234"):
        await partial.write_chunk(5, digest(b"x" * CHUNK), b"x" * CHUNK)
    with pytest.raises(ValueError, match="misses 6 chunks"):
        await partial.finish(digest(payload), mtime_ns=MTIME_NS)
    await partial.abandon()


async def test_whole_file_mismatch_forgets_every_chunk(tmp_path: Path, payload: bytes) -> None:
    destination = tmp_path / "f"
    partial = await open_partial(destination, len(payload))
    for number, piece in enumerate(chunks_of(payload)):
        await partial.write_chunk(number, digest(piece), piece)
    with pytest.raises(HashMismatch) as caught:
        await partial.finish(digest(b"something else"), mtime_ns=MTIME_NS)
    assert caught.value.chunk is None
    assert partial.verified_bytes == 0 and not destination.exists()
    assert partial.state_path.read_bytes()[TABLE_OFFSET:] == bytes(6 * DIGEST_SIZE)
    await partial.abandon()


async def test_a_name_clash_lands_beside(tmp_path: Path) -> None:
    destination = tmp_path / "report.pdf"
    destination.write_bytes(b"the user's own file")
    (tmp_path / "report (1).pdf").write_bytes(b"another")
    data = b"incoming"
    partial = await open_partial(destination, len(data))
    await partial.write_chunk(0, digest(data), data)
    landed = await partial.finish(digest(data), mtime_ns=MTIME_NS)
    assert landed == tmp_path / "report (2).pdf" and landed.read_bytes() == data
    assert destination.read_bytes() == b"the user's own file"
    assert not partial.data_path.exists() and not partial.state_path.exists()


@pytest.mark.parametrize(("mode", "executable"), [(0o755, True), (0o644, False)])
async def test_exec_bit_and_mtime_are_applied(tmp_path: Path, mode: int, executable: bool) -> None:
    data = b"#!/bin/sh\necho hi\n"
    partial = await open_partial(tmp_path / "run.sh", len(data))
    await partial.write_chunk(0, digest(data), data)
    landed = await partial.finish(digest(data), mode=mode, mtime_ns=MTIME_NS)
    info = os.stat(landed)
    assert info.st_mtime_ns == MTIME_NS
    assert bool(info.st_mode & stat.S_IXUSR) is executable
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(info.st_mode) & umask == 0  # never more than the umask allows


async def test_an_empty_file(tmp_path: Path) -> None:
    partial = await open_partial(tmp_path / "empty", 0)
    assert partial.chunk_count == 0 and partial.complete and partial.have == b""
    landed = await partial.finish(digest(b""), mtime_ns=MTIME_NS)
    assert landed.read_bytes() == b""


async def test_periodic_sync_is_data_then_state(tmp_path: Path, payload: bytes) -> None:
    disk = FaultyDisk()
    partial = await open_partial(tmp_path / "f", len(payload), sync_every=2 * CHUNK, disk=disk)
    pieces = chunks_of(payload)
    for number in range(4):
        await partial.write_chunk(number, digest(pieces[number]), pieces[number])
    synced = [fd for (fd,) in disk.calls_of("sync_data")]
    assert synced == [partial._fds.data, partial._fds.state] * 2  # after 2 and 4 chunks
    await partial.discard()


async def test_synced_data_the_hash_has_seen_leaves_the_page_cache(
    tmp_path: Path, payload: bytes
) -> None:
    disk = FaultyDisk()
    partial = await open_partial(tmp_path / "f", len(payload), sync_every=2 * CHUNK, disk=disk)
    pieces = chunks_of(payload)
    for number in (0, 2, 1, 4, 5, 3):  # syncs after chunks 2 and 4 (2 chunks' bytes each)
        await partial.write_chunk(number, digest(pieces[number]), pieces[number])
    # At the first sync only chunk 0 is hashed (2 waits for 1); at the second, chunks 0-2;
    # chunk 3 is missing then, so 4 stays cached, and so does the tail (never synced).
    dropped = [(offset, length) for _, offset, length, _ in disk.calls_of("fadvise")]
    assert dropped == [(0, CHUNK), (CHUNK, 2 * CHUNK)]
    assert await partial.finish(digest(payload), mtime_ns=MTIME_NS) == tmp_path / "f"
    assert (tmp_path / "f").read_bytes() == payload


@pytest.mark.parametrize(
    "error", [errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)], ids=["no-space", "quota"]
)
async def test_disk_full_keeps_the_partial(tmp_path: Path, payload: bytes, error: int) -> None:
    destination = tmp_path / "big.bin"
    pieces = chunks_of(payload)
    disk = FaultyDisk()
    partial = await open_partial(destination, len(payload), disk=disk)
    await partial.write_chunk(0, digest(pieces[0]), pieces[0])
    disk.fault("pwrite", error=error, after_bytes=CHUNK // 2)  # fills up halfway through 1
    with pytest.raises(DiskFull, match=r"the disk is full: cannot store big\.bin") as caught:
        await partial.write_chunk(1, digest(pieces[1]), pieces[1])
    assert caught.value.code == "disk_full"
    assert disk.failures == 1 and disk.calls_of("pwrite")[-1][1] == CHUNK // 2  # a short write
    assert not partial.has(1)
    await partial.abandon()

    assert partial.data_path.exists() and partial.state_path.exists()
    resumed = await open_partial(destination, len(payload))
    assert list(resumed.missing()) == [1, 2, 3, 4, 5]
    await resumed.abandon()


async def test_too_little_free_space_is_reported_up_front(tmp_path: Path, payload: bytes) -> None:
    with pytest.raises(DiskFull, match=r"more needed"):
        await open_partial(tmp_path / "f", len(payload), disk=FaultyDisk(free=10))
    assert slot_names(tmp_path / "f", 0)[1].exists()  # kept: space may be freed and resumed


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    """A 2 MiB tmpfs (needs root and mount); unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root: the ENOSPC path is covered by a fake")
    where = Path(tempfile.mkdtemp(prefix="meshagent-full-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)
        with contextlib.suppress(OSError):
            where.rmdir()


async def test_a_real_full_disk(small_tmpfs: Path) -> None:
    size = 1536 * 1024  # fits the 2 MiB filesystem at open...
    data = os.urandom(size)
    destination = small_tmpfs / "big.bin"
    partial = await open_partial(destination, size)
    pieces = chunks_of(data)
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"\0" * (1024 * 1024))  # ...until something else takes the space
    written = 0
    with pytest.raises(DiskFull):
        for number, piece in enumerate(pieces):
            await partial.write_chunk(number, digest(piece), piece)
            written += 1
    assert 0 < written < len(pieces)
    await partial.abandon()
    filler.unlink()

    resumed = await open_partial(destination, size)
    assert resumed.resumed_bytes == written * CHUNK
    for number in list(resumed.missing()):
        await resumed.write_chunk(number, digest(pieces[number]), pieces[number])
    assert (await resumed.finish(digest(data), mtime_ns=MTIME_NS)).read_bytes() == data


def test_slot_names_fit_long_names(tmp_path: Path) -> None:
    long = "\u00e9" * 127 + ".txt"  # 258 bytes
    data, state = slot_names(tmp_path / long, 3)
    assert len(state.name.encode()) <= 255 and state.name.endswith(".3" + STATE_SUFFIX)
    other, _ = slot_names(tmp_path / ("\u00e9" * 127 + ".bin"), 3)
    assert data != other
    assert chunk_count(0, CHUNK) == 0 and chunk_count(CHUNK + 1, CHUNK) == 2


async def test_closed_partial_refuses_work(tmp_path: Path) -> None:
    partial = await open_partial(tmp_path / "f", 10)
    await partial.abandon()
    await partial.abandon()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        await partial.write_chunk(0, digest(b"0" * 10), b"0" * 10)


@pytest.fixture
def disk() -> FaultyDisk:
    return FaultyDisk()  # no fault: it only logs


def read_backs(disk: FaultyDisk) -> list[int]:
    """Bytes that finish() read back from the data file, per read."""
    return [got for _, _, got in disk.calls_of("preadv")]


@pytest.mark.parametrize("order", [(0, 1, 2, 3, 4, 5), (5, 0, 3, 1, 4, 2)])
async def test_chunks_are_hashed_as_they_land(
    tmp_path: Path, payload: bytes, disk: FaultyDisk, order: tuple[int, ...]
) -> None:
    partial = await open_partial(tmp_path / "f", len(payload), disk=disk)
    pieces = chunks_of(payload)
    for number in order:
        await partial.write_chunk(number, digest(pieces[number]), pieces[number])
    await partial.finish(digest(payload), mtime_ns=MTIME_NS)
    assert read_backs(disk) == []  # nothing left to read back


async def test_a_resumed_prefix_is_hashed_at_open(
    tmp_path: Path, payload: bytes, disk: FaultyDisk
) -> None:
    pieces = chunks_of(payload)
    first = await open_partial(tmp_path / "f", len(payload), disk=disk)
    for number in (0, 1, 4):
        await first.write_chunk(number, digest(pieces[number]), pieces[number])
    crash(first)
    second = await open_partial(tmp_path / "f", len(payload), disk=disk)
    await second.write_chunk(3, digest(pieces[3]), pieces[3])  # out of order: not hashed yet
    await second.write_chunk(5, digest(pieces[5]), pieces[5])
    await second.write_chunk(2, digest(pieces[2]), pieces[2])  # the chain catches up
    await second.finish(digest(payload), mtime_ns=MTIME_NS)
    assert read_backs(disk) == []


async def test_full_read_back_sees_damage_after_the_write(
    tmp_path: Path, payload: bytes, disk: FaultyDisk
) -> None:
    partial = await open_partial(tmp_path / "f", len(payload), disk=disk)
    for number, piece in enumerate(chunks_of(payload)):
        await partial.write_chunk(number, digest(piece), piece)
    with open(partial.data_path, "r+b") as handle:
        handle.seek(10)
        handle.write(b"rot")
    with pytest.raises(HashMismatch):
        await partial.finish(digest(payload), mtime_ns=MTIME_NS, full_read_back=True)
    assert sum(read_backs(disk)) == len(payload)
    await partial.discard()


async def test_a_replaced_chunk_restarts_the_running_hash(tmp_path: Path, payload: bytes) -> None:
    # The sender's file changed under the same key: chunk 0 arrives again with other bytes.
    partial = await open_partial(tmp_path / "f", len(payload))
    pieces = chunks_of(payload)
    stale = os.urandom(CHUNK)
    await partial.write_chunk(0, digest(stale), stale)
    for number, piece in enumerate(pieces):
        await partial.write_chunk(number, digest(piece), piece)
    landed = await partial.finish(digest(payload), mtime_ns=MTIME_NS)
    assert landed.read_bytes() == payload


async def test_overlapping_writes(tmp_path: Path) -> None:
    data = os.urandom(40 * CHUNK + 5)
    partial = await open_partial(tmp_path / "f", len(data))
    pieces = chunks_of(data)
    gate = asyncio.Semaphore(3)

    async def write(number: int) -> None:
        async with gate:
            await partial.write_chunk(number, digest(pieces[number]), pieces[number])

    async with asyncio.TaskGroup() as group:
        for number in range(len(pieces)):
            group.create_task(write(number))
    assert (await partial.finish(digest(data), mtime_ns=MTIME_NS)).read_bytes() == data


async def test_a_dropped_partial_resumes(tmp_path: Path, payload: bytes) -> None:
    pieces = chunks_of(payload)
    first = await open_partial(tmp_path / "f", len(payload))
    await first.write_chunk(0, digest(pieces[0]), pieces[0])
    data_path = first.data_path
    del first  # no finish, no abandon
    gc.collect()
    second = await open_partial(tmp_path / "f", len(payload))
    assert second.data_path == data_path and second.have == b"\x01"
    await second.abandon()


async def test_partial_exists_looks_at_every_slot(tmp_path: Path) -> None:
    assert not partial_exists(tmp_path / "f")
    theirs = await open_partial(tmp_path / "f", 10, sender="device-b")
    ours = await open_partial(tmp_path / "f", 10)
    await theirs.discard()
    assert ours.data_path.name == "f.1.meshpart"
    assert partial_exists(tmp_path / "f")  # only slot 1 is left
    await ours.discard()
    assert not partial_exists(tmp_path / "f")


async def test_the_folder_sync_can_be_left_to_the_caller(tmp_path: Path, disk: FaultyDisk) -> None:
    data = b"small"
    for name, sync_folder in (("a", True), ("b", False)):
        partial = await open_partial(tmp_path / name, len(data), disk=disk)
        await partial.write_chunk(0, digest(data), data)
        await partial.finish(digest(data), mtime_ns=MTIME_NS, sync_folder=sync_folder)
    assert disk.calls_of("sync_directory") == [(tmp_path,)]  # once, for "a"
    assert (tmp_path / "b").read_bytes() == data


async def test_store_whole_in_one_step(tmp_path: Path) -> None:
    data = b"#!/bin/sh\n"
    (tmp_path / "run.sh").write_bytes(b"already here")
    landed = await PartialFile.store_whole(
        tmp_path / "run.sh",
        data,
        digest(data),
        sender=SENDER,
        key=KEY,
        chunk_size=CHUNK,
        mode=0o755,
        mtime_ns=MTIME_NS,
    )
    assert landed == tmp_path / "run (1).sh" and landed.read_bytes() == data
    assert os.stat(landed).st_mtime_ns == MTIME_NS and os.access(landed, os.X_OK)
    empty = await PartialFile.store_whole(
        tmp_path / "empty",
        b"",
        digest(b""),
        sender=SENDER,
        key=KEY,
        chunk_size=CHUNK,
        mtime_ns=MTIME_NS,
    )
    assert empty.read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "run (1).sh", "run.sh"]


async def test_store_whole_refuses_damage_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(HashMismatch):
        await PartialFile.store_whole(
            tmp_path / "f",
            b"data",
            digest(b"other"),
            sender=SENDER,
            key=KEY,
            chunk_size=CHUNK,
            mtime_ns=MTIME_NS,
        )
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="more than one chunk"):
        await PartialFile.store_whole(
            tmp_path / "f",
            b"x" * (CHUNK + 1),
            digest(b""),
            sender=SENDER,
            key=KEY,
            chunk_size=CHUNK,
            mtime_ns=MTIME_NS,
        )
