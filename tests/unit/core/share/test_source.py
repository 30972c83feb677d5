from __future__ import annotations

import asyncio
import errno
import os
import sys
import unicodedata
from pathlib import Path

import pytest
from blake3 import blake3

from meshagent_gui.core.share.source import (
    ChunkReader,
    Manifest,
    SourceChanged,
    SourceChunk,
    SourceEntry,
    read_one_chunk,
    read_whole_files,
    walk,
)
from meshagent_gui.errors import UserError

from .faulty_disk import FaultyDisk

MiB = 1024 * 1024


def paths_of(manifest: Manifest) -> list[str]:
    return [entry.path for entry in manifest.entries]


def by_path(manifest: Manifest) -> dict[str, SourceEntry]:
    return {entry.path: entry for entry in manifest.entries}


def skipped_of(manifest: Manifest) -> dict[str, str]:
    return {item.path: item.reason for item in manifest.skipped}


# ---------------------------------------------------------------------------- walk


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """/tmp/.../a/b/photos with nested unicode names, an empty folder and a script."""
    top = tmp_path / "a" / "b" / "photos"
    (top / "2024" / "Sommer \u2600").mkdir(parents=True)
    (top / "empty").mkdir()
    (top / unicodedata.normalize("NFD", "Caf\u00e9")).mkdir()  # as a Mac would write it
    (top / "2024" / "Sommer \u2600" / "\u65e5\u672c.jpg").write_bytes(b"jpeg")
    (top / "2024" / "beach.jpg").write_bytes(b"x" * 1000)
    (top / unicodedata.normalize("NFD", "Caf\u00e9") / "menu.txt").write_text("coffee")
    (top / "run.sh").write_text("#!/bin/sh\n")
    (top / "run.sh").chmod(0o755)
    (top / "zz.txt").write_text("last")
    return top


def test_walk_offers_paths_from_the_named_folder(photos: Path) -> None:
    manifest = walk([photos])
    assert paths_of(manifest) == [
        # folders first, parents before children, names in order, depth first
        "photos",
        "photos/2024",
        "photos/2024/Sommer \u2600",
        "photos/Caf\u00e9",  # NFC
        "photos/empty",
        # then the files, in the same walk order
        "photos/run.sh",
        "photos/zz.txt",
        "photos/2024/beach.jpg",
        "photos/2024/Sommer \u2600/\u65e5\u672c.jpg",
        "photos/Caf\u00e9/menu.txt",
    ]
    assert manifest.skipped == ()
    assert manifest.total_bytes == 4 + 1000 + 6 + 10 + 4
    assert manifest.files == 5 and manifest.has_folders


def test_entries_carry_size_mode_mtime_and_source(photos: Path) -> None:
    entries = by_path(walk([photos]))
    script, text, folder = entries["photos/run.sh"], entries["photos/zz.txt"], entries["photos"]
    assert (script.kind, script.mode, script.size) == ("file", 0o755, 10)
    assert (text.mode, folder.kind, folder.mode, folder.size) == (0o644, "dir", 0o755, 0)
    info = os.stat(photos / "zz.txt")
    assert text.mtime_ns == info.st_mtime_ns and text.source == photos / "zz.txt"
    assert (text.inode, text.device) == (info.st_ino, info.st_dev)
    assert len(text.key) == 16 and len({entry.key for entry in entries.values()}) == len(entries)


def test_walk_is_stable_and_keys_follow_versions(photos: Path) -> None:
    first, second = walk([photos]), walk([photos])
    assert first == second
    target = photos / "zz.txt"
    os.utime(target, ns=(0, os.stat(target).st_mtime_ns + 1))
    changed = by_path(walk([photos]))
    assert changed["photos/zz.txt"].key != by_path(first)["photos/zz.txt"].key
    assert changed["photos/run.sh"].key == by_path(first)["photos/run.sh"].key


def test_sending_a_file_offers_its_name(photos: Path) -> None:
    manifest = walk([photos / "run.sh", photos / "2024"])
    assert paths_of(manifest)[:3] == ["2024", "2024/Sommer \u2600", "run.sh"]


def test_links_are_skipped_and_reported_never_followed(photos: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "id_ed25519").write_text("private")
    (photos / "to-outside").symlink_to(outside, target_is_directory=True)
    (photos / "to-inside.txt").symlink_to(photos / "zz.txt")
    (photos / "dangling").symlink_to(tmp_path / "nowhere")
    manifest = walk([photos])
    skipped = skipped_of(manifest)
    for name in ("to-outside", "to-inside.txt", "dangling"):
        assert "symbolic link" in skipped[f"photos/{name}"]
    assert not any("id_ed25519" in path or "to-" in path for path in paths_of(manifest))


def test_a_named_link_is_taken_as_named(photos: Path, tmp_path: Path) -> None:
    (tmp_path / "shortcut.txt").symlink_to(photos / "zz.txt")
    [entry] = walk([tmp_path / "shortcut.txt"]).entries
    assert entry.path == "shortcut.txt" and entry.source == (photos / "zz.txt").resolve()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_special_files_are_skipped(photos: Path) -> None:
    os.mkfifo(photos / "pipe")
    manifest = walk([photos])
    assert "FIFO" in skipped_of(manifest)["photos/pipe"]
    assert "photos/pipe" not in paths_of(manifest)
    with pytest.raises(UserError, match=r"cannot send .*pipe: it is a FIFO"):
        walk([photos / "pipe"])


def test_names_the_receiver_would_refuse_are_skipped(photos: Path) -> None:
    (photos / "12:30 notes.txt").write_text("")
    (photos / "con.txt").write_text("")
    manifest = walk([photos])
    skipped = skipped_of(manifest)
    assert "':'" in skipped["photos/12:30 notes.txt"]
    assert "reserved" in skipped["photos/con.txt"]


@pytest.mark.skipif(sys.platform != "linux", reason="needs a filesystem taking any bytes")
def test_a_name_that_is_not_utf8_is_skipped(photos: Path) -> None:
    with open(os.path.join(os.fsencode(photos), b"caf\xe9.txt"), "wb") as handle:
        handle.write(b"latin-1 name")
    assert "not valid UTF-8" in next(iter(skipped_of(walk([photos])).values()))


def test_names_equal_after_normalisation_are_not_offered_twice(tmp_path: Path) -> None:
    top = tmp_path / "top"
    top.mkdir()
    (top / "Caf\u00e9").write_text("nfc")
    (top / unicodedata.normalize("NFD", "Caf\u00e9")).write_text("nfd")
    manifest = walk([top])
    assert paths_of(manifest).count("top/Caf\u00e9") == 1
    assert "normalisation" in next(iter(skipped_of(manifest).values()))


def test_missing_path_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(UserError) as caught:
        walk([tmp_path / "no-such-thing"])
    assert (
        caught.value.message == f"cannot send {tmp_path / 'no-such-thing'}: no such file or folder"
    )


def test_unreadable_path_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "locked.txt").write_text("x")
    disk = FaultyDisk(fail="open", error=errno.EACCES)
    with pytest.raises(UserError, match=r"^cannot send .*locked.txt: Permission denied$"):
        walk([tmp_path / "locked.txt"], disk=disk)
    assert disk.failures == 1


def test_two_items_with_one_name(tmp_path: Path) -> None:
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "same.txt").write_text(folder)
    with pytest.raises(UserError, match=r"both named 'same\.txt'"):
        walk([tmp_path / "x" / "same.txt", tmp_path / "y" / "same.txt"])
    twice = walk([tmp_path / "x" / "same.txt", tmp_path / "x" / ".." / "x" / "same.txt"])
    assert paths_of(twice) == ["same.txt"]


def test_the_root_has_no_name() -> None:
    with pytest.raises(UserError, match="has no name"):
        walk([Path("/")])


def test_a_tree_of_5000_files(tmp_path: Path) -> None:
    top = tmp_path / "many"
    for folder in range(50):
        sub = top / f"d{folder:02}" / "\u00fcber"
        sub.mkdir(parents=True)
        for number in range(100):
            (sub / f"f{number:03}.txt").write_bytes(b"")
    manifest = walk([top])
    assert manifest.files == 5000 and len(manifest.entries) == 5000 + 1 + 100
    assert paths_of(manifest)[101] == "many/d00/\u00fcber/f000.txt"


# ---------------------------------------------------------------------------- reading


def entry_for(path: Path) -> SourceEntry:
    [entry] = walk([path]).entries
    return entry


async def read_all(reader: ChunkReader) -> list[SourceChunk]:
    return [chunk async for chunk in reader]


async def test_reading_20_mib(tmp_path: Path) -> None:
    data = os.urandom(20 * MiB + 12345)
    (tmp_path / "big.bin").write_bytes(data)
    entry = entry_for(tmp_path / "big.bin")
    async with ChunkReader(entry, MiB, read_ahead=4) as reader:
        held: list[int] = []
        chunks = []
        async for chunk in reader:
            chunks.append(chunk)
            # A slow consumer: let the reader fill its read-ahead before taking the next one.
            for _ in range(1000):
                if reader.held_chunks >= min(4, 21 - len(chunks)) and reader._inflight is None:
                    break
                await asyncio.sleep(0.001)
            held.append(reader.held_chunks)
    assert [chunk.chunk for chunk in chunks] == list(range(21))
    for chunk in chunks:
        expected = data[chunk.chunk * MiB : (chunk.chunk + 1) * MiB]
        assert chunk.data == expected and chunk.digest == blake3(expected).digest()
    assert reader.file_digest == blake3(data).digest()
    assert reader.bytes_read == len(data)
    assert max(held) == 4  # the read-ahead filled up...
    assert reader.max_held_chunks == 4  # ...and was never exceeded


async def test_chunks_the_receiver_has_are_hashed_not_sent(tmp_path: Path) -> None:
    data = os.urandom(10 * 4096 + 7)
    (tmp_path / "f").write_bytes(data)
    have = bytes([0b1011_0111, 0b0000_0001])  # all but 3, 6 and 9..10
    reader = ChunkReader(entry_for(tmp_path / "f"), 4096, have=have, read_ahead=2)
    chunks = await read_all(reader)
    assert [chunk.chunk for chunk in chunks] == [3, 6, 9, 10]
    assert chunks[-1].data == data[10 * 4096 :]
    assert reader.file_digest == blake3(data).digest()
    assert reader.max_held_chunks <= 2


async def test_a_file_the_receiver_has_in_full(tmp_path: Path) -> None:
    data = os.urandom(3 * 4096)
    (tmp_path / "f").write_bytes(data)
    reader = ChunkReader(entry_for(tmp_path / "f"), 4096, have=b"\x07")
    assert await read_all(reader) == []
    assert reader.file_digest == blake3(data).digest()


async def test_an_empty_file_has_no_chunks(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    reader = ChunkReader(entry_for(tmp_path / "empty"), MiB)
    assert await read_all(reader) == []
    assert reader.file_digest == blake3(b"").digest()


async def test_the_digest_needs_the_whole_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 100)
    reader = ChunkReader(entry_for(tmp_path / "f"), 10)
    await anext(reader)
    with pytest.raises(RuntimeError, match="not been read to the end"):
        _ = reader.file_digest
    await reader.aclose()


async def test_a_file_changed_while_reading(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_bytes(b"a" * 10 * 4096)
    entry = entry_for(path)
    with pytest.raises(SourceChanged, match=r"log\.txt changed while it was being sent"):
        async with ChunkReader(entry, 4096, read_ahead=1) as reader:
            async for chunk in reader:
                if chunk.chunk == 2:
                    with open(path, "r+b") as handle:  # same size, new content, new mtime
                        handle.seek(9 * 4096)
                        handle.write(b"b" * 10)
                    os.utime(path, ns=(0, entry.mtime_ns + 1_000_000))


async def test_a_file_that_grew_while_reading(tmp_path: Path) -> None:
    path = tmp_path / "growing.log"
    path.write_bytes(b"a" * 4 * 4096)
    entry = entry_for(path)
    with pytest.raises(SourceChanged, match=r"(longer|size)"):
        async with ChunkReader(entry, 4096, read_ahead=1) as reader:
            async for chunk in reader:
                if chunk.chunk == 0:
                    with open(path, "ab") as handle:
                        handle.write(b"more")


async def test_a_file_that_shrank_while_reading(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"a" * 8 * 4096)
    entry = entry_for(path)
    with pytest.raises(SourceChanged, match="shorter"):
        async with ChunkReader(entry, 4096, read_ahead=1) as reader:
            async for chunk in reader:
                if chunk.chunk == 0:
                    os.truncate(path, 4096)


async def test_a_file_replaced_or_deleted_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    entry = entry_for(path)
    (tmp_path / "new").write_bytes(b"new")
    os.replace(tmp_path / "new", path)
    with pytest.raises(SourceChanged, match="replaced"):
        await read_all(ChunkReader(entry, 4096))
    path.unlink()
    with pytest.raises(SourceChanged, match="deleted"):
        await read_all(ChunkReader(entry, 4096))


async def test_read_one_chunk_for_a_resend(tmp_path: Path) -> None:
    data = os.urandom(5000)
    (tmp_path / "f").write_bytes(data)
    entry = entry_for(tmp_path / "f")
    again = await read_one_chunk(entry, 2048, 2)
    assert again == SourceChunk(2, blake3(data[4096:]).digest(), data[4096:])
    with pytest.raises(ValueError, match="no chunk 3"):
        await read_one_chunk(entry, 2048, 3)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")
async def test_closing_early_releases_the_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(os.urandom(64 * 4096))
    before = len(os.listdir("/proc/self/fd"))
    async with ChunkReader(entry_for(tmp_path / "f"), 4096) as reader:
        await anext(reader)
    assert reader._inflight is None
    assert len(os.listdir("/proc/self/fd")) == before
    with pytest.raises(RuntimeError, match="closed"):
        await anext(reader)


def test_a_folder_has_no_chunks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="folder"):
        ChunkReader(walk([tmp_path]).entries[0], MiB)


def test_small_files_read_whole_in_one_trip_checked_like_the_reader(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"alpha")
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "changes").write_bytes(b"before")
    entries = {e.path: e for e in walk([tmp_path]).entries if e.kind == "file"}
    (tmp_path / "changes").write_bytes(b"after, and longer")
    top = tmp_path.name
    pieces = read_whole_files(
        [entries[f"{top}/a"], entries[f"{top}/empty"], entries[f"{top}/changes"]]
    )
    assert isinstance(pieces[0], SourceChunk) and pieces[0].data == b"alpha"
    assert pieces[0].digest == blake3(b"alpha").digest()
    assert isinstance(pieces[1], SourceChunk) and pieces[1].data == b""
    assert pieces[1].digest == blake3(b"").digest()
    assert isinstance(pieces[2], SourceChanged)


# ---------------------------------------------------------------------------- disk faults


async def test_files_are_opened_and_read_through_the_disk(tmp_path: Path) -> None:
    data = os.urandom(3 * 4096 + 5)
    (tmp_path / "f").write_bytes(data)
    entry = entry_for(tmp_path / "f")
    disk = FaultyDisk()
    reader = ChunkReader(entry, 4096, disk=disk)
    assert b"".join(chunk.data for chunk in await read_all(reader)) == data
    assert [arguments[0] for arguments in disk.calls_of("open")] == [entry.source]
    [(_, offset, length, _)] = disk.calls_of("fadvise")  # read ahead sequentially
    assert (offset, length) == (0, 0)
    again = await read_one_chunk(entry, 4096, 3, disk=disk)
    assert again.data == data[3 * 4096 :] and len(disk.calls_of("open")) == 2


async def test_a_read_error_ends_the_reading_and_releases_the_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(os.urandom(8 * 4096))
    entry = entry_for(tmp_path / "f")
    disk = FaultyDisk(fail="pread", error=errno.EIO, after_calls=2)
    reader = ChunkReader(entry, 4096, read_ahead=1, disk=disk)
    chunks: list[SourceChunk] = []
    with pytest.raises(OSError, match="Input/output error") as caught:
        async with reader:
            async for chunk in reader:
                chunks.append(chunk)
    assert caught.value.errno == errno.EIO and disk.failures == 1
    assert [chunk.chunk for chunk in chunks] == [0, 1]  # what was read before is intact
    assert reader._file is not None and reader._file.fd == -1  # closed at the failure


async def test_a_file_that_cannot_be_opened_when_read(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"data")
    entry = entry_for(tmp_path / "f")
    with pytest.raises(UserError, match=r"^cannot read .*f: Input/output error$"):
        await read_all(ChunkReader(entry, 4096, disk=FaultyDisk(fail="open", error=errno.EIO)))
    gone = FaultyDisk(fail="open", error=errno.ENOENT)  # deleted since the walk
    with pytest.raises(SourceChanged, match="deleted"):
        await read_one_chunk(entry, 4096, 0, disk=gone)


def test_a_small_file_that_cannot_be_read_fails_that_file_only(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(name.encode() * 3)
    entries = [e for e in walk([tmp_path]).entries if e.kind == "file"]
    # Each file is read once and checked for more once: the second file's read fails.
    disk = FaultyDisk(fail="pread", error=errno.EIO, after_calls=2)
    first, second, third = read_whole_files(entries, disk=disk)
    assert isinstance(first, SourceChunk) and first.data == b"aaa"
    assert isinstance(second, UserError)
    assert second.message == f"cannot read {entries[1].source}: Input/output error"
    assert isinstance(third, UserError)  # the disk still fails
    disk.heal()
    healed = read_whole_files(entries, disk=disk)
    assert [piece.data if isinstance(piece, SourceChunk) else piece for piece in healed] == [
        b"aaa",
        b"bbb",
        b"ccc",
    ]
