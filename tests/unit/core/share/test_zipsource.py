"""A folder as one zip made on the fly: read back with the stdlib, same bytes at every offset."""

from __future__ import annotations

import io
import os
import random
import stat
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from meshagent_gui.core.share.disk import DISK
from meshagent_gui.core.share.source import (
    ChunkReader,
    SourceChanged,
    SourceEntry,
    read_one_chunk,
    read_whole_files,
    walk,
)
from meshagent_gui.core.share.zipsource import ZipArchive, zip_entry, zip_folders

KiB = 1024


def tree(root: Path) -> Path:
    folder = root / "photos"
    (folder / "2024" / "beach").mkdir(parents=True)
    (folder / "empty").mkdir()
    (folder / "a.txt").write_bytes(b"hello\n")
    (folder / "blank").write_bytes(b"")
    (folder / "2024" / "big.bin").write_bytes(os.urandom(300 * KiB + 17))
    (folder / "2024" / "beach" / "café.jpg").write_bytes(os.urandom(5000))
    script = folder / "run.sh"
    script.write_bytes(b"#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    os.utime(folder / "a.txt", ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    return folder


def whole(entry: SourceEntry, chunk_size: int) -> bytes:
    assert entry.made is not None
    reader = entry.made.open(DISK)
    try:
        count = max(1, -(-entry.size // chunk_size))
        return b"".join(reader.read(chunk, chunk_size) for chunk in range(count))
    finally:
        reader.close()


def folder_zip(root: Path) -> SourceEntry:
    [entry] = zip_folders(walk([tree(root)])).entries
    return entry


def test_the_zip_unpacks_identical_with_modes_and_times(tmp_path: Path) -> None:
    entry = folder_zip(tmp_path)
    assert entry.path == "photos.zip" and entry.kind == "file"
    data = whole(entry, 64 * KiB)
    assert len(data) == entry.size  # the size in the offer is the size sent
    archive = zipfile.ZipFile(io.BytesIO(data))
    assert archive.testzip() is None  # every CRC checks out
    out = tmp_path / "out"
    archive.extractall(out)
    source = tmp_path / "photos"
    for path in source.rglob("*"):
        copy = out / path.relative_to(tmp_path)
        assert copy.is_dir() if path.is_dir() else copy.read_bytes() == path.read_bytes(), path
    names = {info.filename: info for info in archive.infolist()}
    assert "photos/empty/" in names and names["photos/empty/"].is_dir()
    assert "photos/2024/beach/café.jpg" in names  # UTF-8 names
    assert stat.S_IMODE(names["photos/run.sh"].external_attr >> 16) == 0o755
    assert stat.S_IMODE(names["photos/a.txt"].external_attr >> 16) == 0o644
    assert names["photos/a.txt"].date_time == (2023, 11, 14, 22, 13, 20)
    assert all(info.compress_type == zipfile.ZIP_STORED for info in names.values())


def test_same_bytes_at_the_same_offsets(tmp_path: Path) -> None:
    """A resume reads from the middle with a fresh reader (no CRC known yet): same bytes."""
    entry = folder_zip(tmp_path)
    data = whole(entry, 16 * KiB)
    again = zip_folders(walk([tmp_path / "photos"])).entries[0]
    assert again.key == entry.key and again.size == entry.size
    assert again.made is not entry.made
    assert whole(again, 7 * KiB) == data
    rng = random.Random(1)
    for _ in range(200):
        offset = rng.randrange(entry.size)
        length = rng.randrange(1, 40 * KiB)
        fresh = replace(entry, made=ZipArchive(walk([tmp_path / "photos"]).entries))
        assert fresh.made is not None
        reader = fresh.made.open(DISK)
        try:
            got = reader.read_at(offset, min(length, entry.size - offset))
        finally:
            reader.close()
        assert got == data[offset : offset + length], offset


async def test_sent_through_the_sender_readers(tmp_path: Path) -> None:
    """ChunkReader (the stream), read_one_chunk (a resend), read_whole_files (small files)."""
    entry = folder_zip(tmp_path)
    data = whole(entry, 32 * KiB)
    chunks = []
    async with ChunkReader(entry, 32 * KiB) as reader:
        async for piece in reader:
            chunks.append(piece.data)
    assert b"".join(chunks) == data
    resent = await read_one_chunk(entry, 32 * KiB, 3)
    assert resent.data == data[3 * 32 * KiB : 4 * 32 * KiB]
    small = tmp_path / "small"
    (small / "inner").mkdir(parents=True)
    [tiny] = zip_folders(walk([small])).entries
    [piece] = read_whole_files([tiny])
    assert not isinstance(piece, BaseException)
    assert zipfile.ZipFile(io.BytesIO(piece.data)).namelist() == ["small/", "small/inner/"]


def test_files_beside_folders_stay_files(tmp_path: Path) -> None:
    tree(tmp_path)
    loose = tmp_path / "notes.txt"
    loose.write_text("x")
    manifest = zip_folders(walk([tmp_path / "photos", loose]))
    assert [entry.path for entry in manifest.entries] == ["photos.zip", "notes.txt"]
    assert manifest.entries[1].made is None and not manifest.has_folders


def test_a_member_changed_while_zipped_is_refused(tmp_path: Path) -> None:
    entry = folder_zip(tmp_path)
    (tmp_path / "photos" / "2024" / "big.bin").write_bytes(b"changed")
    with pytest.raises(SourceChanged):
        whole(entry, 64 * KiB)


def test_zip64_past_four_gib(tmp_path: Path) -> None:
    """A member over 4 GiB and one past the 4 GiB offset: ZIP64 sizes and offsets, which the
    stdlib reads back (the big member is never read: its CRC is taken as known)."""
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "z.txt").write_bytes(b"after the big one")
    top, small = walk([folder]).entries
    huge = replace(small, path="big/huge.bin", size=5 * 1024**3)
    members = [top, huge, small]
    archive = ZipArchive(members)
    archive.learned_crc(1, 0x1234ABCD)
    reader = archive.open(DISK)

    class Lazy(io.RawIOBase):
        """The archive as a seekable file whose huge member's bytes are never asked for."""

        position = 0

        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return True

        def seek(self, offset: int, whence: int = 0) -> int:
            base = {0: 0, 1: self.position, 2: archive.size}[whence]
            self.position = base + offset
            return self.position

        def tell(self) -> int:
            return self.position

        def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
            length = min(len(buffer), archive.size - self.position)
            data = reader.read_at(self.position, length)
            buffer[: len(data)] = data
            self.position += len(data)
            return len(data)

    with zipfile.ZipFile(Lazy()) as unzipped:
        infos = {info.filename: info for info in unzipped.infolist()}
        assert infos["big/huge.bin"].file_size == 5 * 1024**3
        assert infos["big/huge.bin"].CRC == 0x1234ABCD
        assert infos["big/z.txt"].header_offset > 5 * 1024**3
        assert unzipped.read("big/z.txt") == b"after the big one"
    reader.close()


def test_the_key_changes_with_any_member(tmp_path: Path) -> None:
    entry = folder_zip(tmp_path)
    os.utime(tmp_path / "photos" / "a.txt", ns=(1, 1))
    members = walk([tmp_path / "photos"]).entries
    assert zip_entry("photos", members).key != entry.key


def test_a_zip_never_takes_the_name_of_a_file_sent_beside_it(tmp_path: Path) -> None:
    tree(tmp_path)
    beside = tmp_path / "photos.zip"
    beside.write_bytes(b"a real zip file, sent as it is")
    manifest = zip_folders(walk([tmp_path / "photos", beside]))
    assert [entry.path for entry in manifest.entries] == ["photos-2.zip", "photos.zip"]
