from __future__ import annotations

import dataclasses
import os
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshagent_gui.core.protocol.sync import INLINE_BLOCKS, MAX_BLOCK, Block, FileRow
from meshagent_gui.core.sync import blocks
from meshagent_gui.core.sync.ignore import Ignores
from meshagent_gui.core.sync.index import FolderIndex
from meshagent_gui.core.sync.scanner import (
    MARKER,
    RootMissing,
    ScanResult,
    Skipped,
    check_marker,
    ensure_marker,
    scan,
    scan_batches,
)
from meshagent_gui.errors import UserError

DEVICE = 0x1234
FOLDER = "ab" * 16


class Folder:
    """A synced folder on disk, its index, and a scan that stores what it finds."""

    def __init__(self, base: Path) -> None:
        self.root = base / "root"
        self.root.mkdir()
        ensure_marker(self.root, FOLDER)
        self.index = FolderIndex(base / "index.sqlite", device=DEVICE)

    def scan(self, only: list[str] | None = None) -> ScanResult:
        result = scan(self.root, self.index, Ignores(self.root), only=only, folder_id=FOLDER)
        self.index.put(result.rows)
        return result

    def write(self, name: str, data: bytes = b"data") -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def rows(self) -> dict[str, FileRow]:
        return {row.name: row for row in self.index.all_rows()}


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Folder]:
    made = Folder(tmp_path)
    try:
        yield made
    finally:
        made.index.close()


def by_name(result: ScanResult) -> dict[str, FileRow]:
    return {row.name: row for row in result.rows}


def reasons(result: ScanResult) -> dict[str, str]:
    return {skip.name: skip.reason for skip in result.skipped}


def test_new_files_and_folders_become_rows(folder: Folder) -> None:
    folder.write("a.txt", b"hello")
    folder.write("sub/b.bin", os.urandom(100_000))
    folder.write("empty.txt", b"")
    (folder.root / "sub" / "empty").mkdir()
    os.chmod(folder.root / "a.txt", 0o755)
    result = folder.scan()
    rows = by_name(result)
    assert set(rows) == {"a.txt", "sub", "sub/b.bin", "sub/empty", "empty.txt"}
    assert result.skipped == []
    a = rows["a.txt"]
    assert (a.kind, a.deleted, a.size, a.permissions) == ("file", False, 5, 0o755)
    assert a.blocks == tuple(blocks.cut(b"hello"))
    assert a.version == ((DEVICE, 1),) and a.modified_by == DEVICE and a.sequence == 0
    assert a.mtime_ns == (folder.root / "a.txt").stat().st_mtime_ns
    assert rows["sub/b.bin"].blocks == tuple(blocks.chunk_file(folder.root / "sub" / "b.bin"))
    assert rows["empty.txt"].blocks == () and rows["empty.txt"].size == 0
    assert rows["sub/empty"].kind == "dir" and rows["sub/empty"].size == 0
    # A folder comes before its contents.
    names = [row.name for row in result.rows]
    assert names.index("sub") < names.index("sub/b.bin")
    # Nothing changed: nothing to do (and nothing read).
    assert folder.scan().rows == []


def test_a_modified_file_is_hashed_again_with_a_bumped_version(folder: Folder) -> None:
    path = folder.write("a.txt", b"one")
    folder.scan()
    path.write_bytes(b"two, longer")
    (row,) = folder.scan().rows
    assert row.name == "a.txt" and row.version == ((DEVICE, 2),)
    assert row.blocks == tuple(blocks.cut(b"two, longer"))
    # Same size, different mtime: hashed too.
    path.write_bytes(b"TWO, LONGER")
    os.utime(path, ns=(1, 1_000_000_000))
    (row,) = folder.scan().rows
    assert row.blocks == tuple(blocks.cut(b"TWO, LONGER")) and row.version == ((DEVICE, 3),)


def test_a_version_bump_keeps_other_devices_entries(folder: Folder) -> None:
    path = folder.write("a.txt", b"one")
    folder.scan()
    old = folder.index.get("a.txt")
    assert old is not None
    peer_version = ((7, 5), (DEVICE, 1))
    folder.index.put([dataclasses.replace(old, version=peer_version)])
    path.write_bytes(b"changed")
    (row,) = folder.scan().rows
    assert row.version == ((7, 5), (DEVICE, 6))


def test_a_permission_change_reuses_the_blocks(
    folder: Folder, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = folder.write("run.sh", b"#!/bin/sh\n")
    os.chmod(path, 0o644)
    (first,) = folder.scan().rows
    os.chmod(path, 0o755)

    def no_read(*args: Any, **kwargs: Any) -> list[Block]:
        raise AssertionError("a permission change needs no read")

    monkeypatch.setattr(blocks, "chunk_file", no_read)
    (row,) = folder.scan().rows
    assert row.permissions == 0o755 and row.blocks == first.blocks
    assert row.version == ((DEVICE, 2),)


def test_deleted_files_and_folders_become_tombstones(folder: Folder) -> None:
    folder.write("keep.txt")
    folder.write("gone.txt", b"bytes")
    folder.write("dir/a/b.txt")
    (folder.root / "dir" / "empty").mkdir()
    folder.scan()
    (folder.root / "gone.txt").unlink()
    for path in sorted((folder.root / "dir").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (folder.root / "dir").rmdir()
    result = folder.scan()
    rows = by_name(result)
    assert set(rows) == {"gone.txt", "dir", "dir/a", "dir/a/b.txt", "dir/empty"}
    gone = rows["gone.txt"]
    assert gone.deleted and gone.size == 0 and gone.blocks == () and gone.segments == ()
    assert gone.version == ((DEVICE, 2),) and gone.modified_by == DEVICE
    assert rows["dir"].kind == "dir" and rows["dir"].deleted
    # Contents before their folder.
    names = [row.name for row in result.rows]
    assert names.index("dir/a/b.txt") < names.index("dir/a") < names.index("dir")
    # A tombstone stays a tombstone.
    assert folder.scan().rows == []
    # Made again: a new version after the tombstone's.
    folder.write("gone.txt", b"back")
    (back,) = folder.scan().rows
    assert not back.deleted and back.version == ((DEVICE, 3),)


def test_a_rename_is_a_new_row_and_a_tombstone(folder: Folder) -> None:
    folder.write("old.txt", b"content")
    folder.scan()
    os.rename(folder.root / "old.txt", folder.root / "new.txt")
    rows = by_name(folder.scan())
    assert rows["old.txt"].deleted
    assert not rows["new.txt"].deleted and rows["new.txt"].blocks == tuple(blocks.cut(b"content"))


def test_a_file_that_becomes_a_folder(folder: Folder) -> None:
    path = folder.write("thing", b"file")
    folder.scan()
    path.unlink()
    folder.write("thing/inside.txt")
    rows = by_name(folder.scan())
    assert rows["thing"].kind == "dir" and rows["thing"].version == ((DEVICE, 2),)
    assert "thing/inside.txt" in rows


def test_symlinks_are_skipped_and_never_deleted(folder: Folder, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("no")
    os.symlink(outside, folder.root / "link-dir")
    os.symlink("missing", folder.root / "dangling")
    path = folder.write("was-a-file.txt")
    folder.scan()
    path.unlink()
    os.symlink(outside / "secret", path)
    result = folder.scan()
    assert result.rows == []  # the file's row stays: a link is not a deletion
    assert set(reasons(result)) == {"link-dir", "dangling", "was-a-file.txt"}
    assert all("symbolic link" in reason for reason in reasons(result).values())
    assert not folder.rows()["was-a-file.txt"].deleted


def test_special_files_are_skipped(folder: Folder) -> None:
    os.mkfifo(folder.root / "pipe")
    result = folder.scan()
    assert result.rows == [] and "regular" in reasons(result)["pipe"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_skipped_not_deleted(folder: Folder) -> None:
    path = folder.write("private.txt", b"one")
    folder.scan()
    path.write_bytes(b"two, changed")
    os.chmod(path, 0)
    try:
        result = folder.scan()
    finally:
        os.chmod(path, 0o644)
    assert result.rows == [] and "unreadable" in reasons(result)["private.txt"]


def test_an_unreadable_file_is_skipped_not_deleted_injected(
    folder: Folder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same as above where the tests run as root (chmod 000 does not stop root): the read
    # fails the way it would for anyone else.
    path = folder.write("private.txt", b"one")
    folder.write("fine.txt", b"fine")
    folder.scan()
    path.write_bytes(b"two, changed")
    folder.write("fine.txt", b"fine, changed")
    real = blocks.chunk_file

    def refuse(path: str | Path, **kwargs: Any) -> list[Block]:
        if Path(path).name == "private.txt":
            raise PermissionError(13, "Permission denied")
        return real(path, **kwargs)

    monkeypatch.setattr(blocks, "chunk_file", refuse)
    result = folder.scan()
    assert [row.name for row in result.rows] == ["fine.txt"]
    assert reasons(result) == {"private.txt": "unreadable: Permission denied"}
    monkeypatch.undo()
    (row,) = folder.scan().rows  # readable again: picked up
    assert row.name == "private.txt" and row.size == len(b"two, changed")


def test_an_unreadable_folder_keeps_its_rows(
    folder: Folder, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder.write("locked/a.txt")
    folder.write("locked/deep/b.txt")
    folder.scan()
    real = os.scandir

    def scandir(path: str) -> object:
        if os.path.basename(path) == "locked":
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = folder.scan()
    assert result.rows == []  # no tombstones for what could not be looked at
    assert "unreadable folder" in reasons(result)["locked"]


def test_a_file_changing_while_read_waits_for_the_next_scan(
    folder: Folder, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder.write("busy.log", b"first")

    def changing(path: Path, **kwargs: Any) -> list[Block]:
        raise blocks.FileChangedError(str(path))

    monkeypatch.setattr(blocks, "chunk_file", changing)
    result = folder.scan()
    assert result.rows == [] and "changed while read" in reasons(result)["busy.log"]
    monkeypatch.undo()
    (row,) = folder.scan().rows
    assert row.name == "busy.log"


def test_nfd_names_are_synced_as_nfc(folder: Folder) -> None:
    nfd = unicodedata.normalize("NFD", "Caf\u00e9")
    folder.write(f"{nfd}/{nfd}.txt", b"x")
    rows = by_name(folder.scan())
    assert set(rows) == {"Caf\u00e9", "Caf\u00e9/Caf\u00e9.txt"}
    assert folder.scan().rows == []
    # only= finds the NFD file by its NFC name.
    (folder.root / nfd / f"{nfd}.txt").write_bytes(b"changed")
    (row,) = folder.scan(only=["Caf\u00e9/Caf\u00e9.txt"]).rows
    assert row.name == "Caf\u00e9/Caf\u00e9.txt" and row.size == 7


def test_two_names_equal_after_normalisation(folder: Folder) -> None:
    nfc = "\u00e9.txt"
    folder.write(nfc, b"nfc")
    folder.write(unicodedata.normalize("NFD", nfc), b"nfd")
    result = folder.scan()
    (row,) = result.rows
    assert row.name == nfc and row.size == 3
    assert "normalisation" in reasons(result)[nfc]


def test_names_a_peer_would_refuse_are_skipped(folder: Folder) -> None:
    folder.write("a:b.txt")
    folder.write("bad\x01name")
    folder.write("ok.txt")
    os.close(os.open(os.path.join(os.fsencode(folder.root), b"\xff.bin"), os.O_CREAT, 0o644))
    result = folder.scan()
    assert [row.name for row in result.rows] == ["ok.txt"]
    assert set(reasons(result)) == {"a:b.txt", "bad\x01name", "\\xff.bin"}


def test_ignored_folders_are_not_entered_and_their_rows_left_alone(
    folder: Folder, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder.write("build/out.o")
    folder.write("src/main.c")
    folder.write("notes.swp")
    folder.scan()
    folder.write(".meshignore", b"build/\n")
    listed: list[str] = []
    real = os.scandir

    def scandir(path: str) -> object:
        listed.append(os.path.relpath(path, folder.root))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    rows = by_name(folder.scan())
    assert set(rows) == {".meshignore"}  # build/ newly ignored: not deleted on peers
    assert "build" not in listed and ".meshsync" not in listed and "src" in listed
    assert "notes.swp" not in folder.rows()
    assert not folder.rows()["build/out.o"].deleted


def test_meshignore_negation(folder: Folder) -> None:
    folder.write(".meshignore", b"*.log\n!keep.log\n")
    folder.write("a.log")
    folder.write("keep.log")
    folder.write("logs/b.log")
    assert set(by_name(folder.scan())) == {".meshignore", "keep.log", "logs"}


def test_newly_unignored_files_are_found(folder: Folder) -> None:
    folder.write(".meshignore", b"*.log\n")
    folder.write("a.log")
    folder.scan()
    folder.write(".meshignore", b"")
    assert set(by_name(folder.scan())) == {".meshignore", "a.log"}


def test_the_state_folder_is_never_a_row(folder: Folder) -> None:
    (folder.root / ".meshsync" / "tmp").mkdir()
    (folder.root / ".meshsync" / "tmp" / "part").write_bytes(b"x")
    assert folder.scan().rows == []


# ------------------------------------------------------------------------------ the root


def test_a_missing_root_is_never_everything_deleted(folder: Folder) -> None:
    folder.write("a.txt")
    folder.write("dir/b.txt")
    folder.scan()
    hidden = folder.root.with_name("elsewhere")
    folder.root.rename(hidden)
    with pytest.raises(RootMissing):
        folder.scan()
    folder.root.mkdir()  # an empty mount point
    with pytest.raises(RootMissing):
        folder.scan()
    with pytest.raises(RootMissing):
        folder.scan(only=["a.txt"])
    assert all(not row.deleted for row in folder.rows().values())


def test_a_marker_for_another_folder_is_refused(folder: Folder) -> None:
    (folder.root / MARKER).write_text("cd" * 16)
    with pytest.raises(RootMissing, match="another"):
        folder.scan()
    with pytest.raises(UserError):
        ensure_marker(folder.root, FOLDER)


def test_the_root_vanishing_during_the_scan(
    folder: Folder, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder.write("a/1.txt")
    folder.write("b/2.txt")
    folder.scan()
    real = os.scandir

    def unmount(path: str) -> object:
        if os.path.basename(path) == "b":
            os.remove(folder.root / MARKER)  # the disk goes away mid-walk
            raise FileNotFoundError(2, "No such file or directory")
        return real(path)

    monkeypatch.setattr(os, "scandir", unmount)
    with pytest.raises(RootMissing):
        folder.scan()


def test_markers(tmp_path: Path) -> None:
    with pytest.raises(RootMissing):
        ensure_marker(tmp_path / "missing", FOLDER)
    assert not (tmp_path / "missing").exists()
    ensure_marker(tmp_path, FOLDER)
    ensure_marker(tmp_path, FOLDER)  # again: fine
    check_marker(tmp_path, FOLDER)
    check_marker(tmp_path)
    assert (tmp_path / MARKER).read_text().strip() == FOLDER


# ------------------------------------------------------------------------------ only=


def test_only_looks_at_the_names_given(folder: Folder) -> None:
    folder.write("a.txt", b"a")
    folder.write("b.txt", b"b")
    folder.scan()
    folder.write("a.txt", b"a2")
    folder.write("b.txt", b"b2")
    (row,) = folder.scan(only=["a.txt"]).rows
    assert row.name == "a.txt"
    (row,) = folder.scan().rows
    assert row.name == "b.txt"


def test_only_a_new_file_in_new_folders_adds_the_folders(folder: Folder) -> None:
    folder.write("x/y/z.txt")
    result = folder.scan(only=["x/y/z.txt"])
    assert [row.name for row in result.rows] == ["x", "x/y", "x/y/z.txt"]
    assert folder.scan().rows == []


def test_only_a_folder_covers_its_subtree(folder: Folder) -> None:
    folder.write("d/1.txt")
    folder.write("other.txt")
    result = folder.scan(only=["d", "d/1.txt", "d/missing"])
    assert [row.name for row in result.rows] == ["d", "d/1.txt"]


def test_only_a_vanished_folder_deletes_what_was_under_it(folder: Folder) -> None:
    folder.write("d/1.txt")
    folder.write("d/e/2.txt")
    folder.write("dd.txt")
    folder.scan()
    for name in ["d/e/2.txt", "d/1.txt"]:
        (folder.root / name).unlink()
    (folder.root / "d" / "e").rmdir()
    (folder.root / "d").rmdir()
    rows = by_name(folder.scan(only=["d"]))
    assert set(rows) == {"d", "d/1.txt", "d/e", "d/e/2.txt"}
    assert all(row.deleted for row in rows.values())


def test_only_keeps_parents_it_did_not_see_missing(folder: Folder) -> None:
    folder.write("p/q/file.txt")
    folder.scan()
    (folder.root / "p" / "q" / "file.txt").unlink()
    (row,) = folder.scan(only=["p/q/file.txt", "p/ignored.swp"]).rows
    assert row.name == "p/q/file.txt" and row.deleted


def test_only_skips_ignored_and_invalid_names(folder: Folder) -> None:
    folder.write("x.swp")
    folder.write(".meshsync/tmp/abc")
    result = folder.scan(only=["x.swp", ".meshsync/tmp/abc", "../escape", "ok/../.."])
    assert result.rows == []
    assert set(reasons(result)) == {"../escape", "ok/../.."}


def test_only_under_a_link_is_kept(folder: Folder, tmp_path: Path) -> None:
    folder.write("d/f.txt")
    folder.scan()
    (folder.root / "d" / "f.txt").unlink()
    (folder.root / "d").rmdir()
    target = tmp_path / "t"
    target.mkdir()
    (target / "f.txt").write_text("elsewhere")
    os.symlink(target, folder.root / "d")
    result = folder.scan(only=["d/f.txt"])
    assert result.rows == [] and "symbolic link" in reasons(result)["d"]


# ------------------------------------------------------------------------------ size


def test_batches_stream_the_rows(folder: Folder) -> None:
    for n in range(35):
        folder.write(f"d{n % 3}/f{n:02}.txt", str(n).encode())
    batches = list(
        scan_batches(
            folder.root, folder.index, Ignores(folder.root), folder_id=FOLDER, batch_rows=10
        )
    )
    assert len(batches) >= 4
    assert all(len(batch.rows) <= 10 for batch in batches)
    rows = [row for batch in batches for row in batch.rows]
    assert len(rows) == 38 and len({row.name for row in rows}) == 38


def test_batches_can_be_stored_as_they_come(folder: Folder) -> None:
    for n in range(25):
        folder.write(f"f{n:02}.txt")
    folder.scan()
    for n in range(25):
        (folder.root / f"f{n:02}.txt").unlink()
    ignores = Ignores(folder.root)
    for batch in scan_batches(folder.root, folder.index, ignores, folder_id=FOLDER, batch_rows=7):
        folder.index.put(batch.rows)
    assert all(row.deleted for row in folder.rows().values())
    assert len(folder.rows()) == 25


def test_a_large_file_lists_segments(folder: Folder) -> None:
    # More than INLINE_BLOCKS even if every cut falls at the largest block size: random data
    # cut around 64 KiB could otherwise land just under the limit now and then.
    size = (INLINE_BLOCKS + 16) * MAX_BLOCK
    folder.write("big.bin", os.urandom(size))
    (row,) = folder.scan().rows
    assert row.blocks == () and row.segments and row.size == size
    assert sum(segment.size for segment in row.segments) == size
    expanded = folder.index.blocks_of(row)
    assert expanded is not None and sum(block.size for block in expanded) == size


def test_skipped_is_a_value() -> None:
    assert Skipped("a", "why") == Skipped("a", "why")
