"""Small files stored whole through unnamed files (whole.py): never visible before complete."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from meshagent_gui.core.share import whole
from meshagent_gui.core.share.partial import DiskFull
from meshagent_gui.core.share.whole import (
    NOT_HERE,
    WholeFile,
    link_unique,
    store_whole_files,
    write_unnamed,
)

from .faulty_disk import FaultyDisk

MTIME_NS = 1_600_000_000_123_456_789

pytestmark = pytest.mark.skipif(not whole.available(), reason="needs O_TMPFILE and linkat")


def unnamed_supported(folder: Path) -> bool:
    try:
        os.close(os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o600))
    except OSError:
        return False
    return True


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    if not unnamed_supported(tmp_path):
        pytest.skip("this filesystem cannot make unnamed files")
    return tmp_path


def test_a_batch_lands_under_its_names_with_content_times_and_exec_bit(folder: Path) -> None:
    (folder / "sub").mkdir()
    files = [
        WholeFile(folder / "a.txt", b"alpha", 0o644, MTIME_NS),
        WholeFile(folder / "sub" / "run.sh", b"#!/bin/sh\n", 0o755, MTIME_NS),
        WholeFile(folder / "empty", b"", 0o644, MTIME_NS),
    ]
    outcomes = store_whole_files(files)
    assert outcomes == [folder / "a.txt", folder / "sub" / "run.sh", folder / "empty"]
    assert (folder / "a.txt").read_bytes() == b"alpha"
    assert (folder / "empty").read_bytes() == b""
    assert (folder / "a.txt").stat().st_mtime_ns == MTIME_NS
    assert os.access(folder / "sub" / "run.sh", os.X_OK)
    assert not os.access(folder / "a.txt", os.X_OK)
    assert stat.S_ISREG((folder / "a.txt").lstat().st_mode)


def test_nothing_is_ever_replaced_a_clash_gets_the_next_name(folder: Path) -> None:
    (folder / "photo.jpg").write_bytes(b"theirs")
    (folder / "photo (1).jpg").write_bytes(b"theirs too")
    [outcome] = store_whole_files([WholeFile(folder / "photo.jpg", b"ours", 0o644, MTIME_NS)])
    assert outcome == folder / "photo (2).jpg"
    assert (folder / "photo.jpg").read_bytes() == b"theirs"
    assert (folder / "photo (1).jpg").read_bytes() == b"theirs too"
    assert (folder / "photo (2).jpg").read_bytes() == b"ours"


def test_a_crash_between_write_and_link_leaves_no_file_at_all(folder: Path) -> None:
    # A real process writes the unnamed file and dies by SIGKILL before linking it.
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from meshagent_gui.core.share.whole import WholeFile, make_durable, write_unnamed
        fd = write_unnamed(WholeFile(Path({str(folder / "doc.txt")!r}), b"x" * 4096, 0o644, 1))
        make_durable([fd])
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], check=False, timeout=60)
    assert done.returncode == -9
    assert list(folder.iterdir()) == []  # nothing under the final name, nothing to clean up


def test_an_unlinked_unnamed_file_is_invisible_until_it_is_linked(folder: Path) -> None:
    fd = write_unnamed(WholeFile(folder / "late.bin", b"data", 0o644, MTIME_NS))
    try:
        assert list(folder.iterdir()) == []
        assert link_unique(fd, folder / "late.bin") == folder / "late.bin"
    finally:
        os.close(fd)
    assert (folder / "late.bin").read_bytes() == b"data"


def test_a_missing_folder_fails_that_file_only(folder: Path) -> None:
    outcomes = store_whole_files(
        [
            WholeFile(folder / "gone" / "x", b"1", 0o644, MTIME_NS),
            WholeFile(folder / "ok", b"2", 0o644, MTIME_NS),
        ]
    )
    assert isinstance(outcomes[0], OSError)
    assert outcomes[1] == folder / "ok"


@pytest.mark.parametrize("after_bytes", [0, 5], ids=["at-once", "midway"])
def test_a_full_disk_is_reported_as_disk_full(folder: Path, after_bytes: int) -> None:
    disk = FaultyDisk(fail="pwrite", error=errno.ENOSPC, after_bytes=after_bytes)
    files = [WholeFile(folder / "big", b"x" * 10, 0o644, MTIME_NS)]
    [outcome] = store_whole_files(files, disk=disk)
    assert isinstance(outcome, DiskFull) and disk.failures == 1
    assert list(folder.iterdir()) == []  # the unnamed file vanished with its descriptor


def test_a_full_disk_fails_that_file_only(folder: Path) -> None:
    disk = FaultyDisk(fail="pwrite", after_calls=1)  # the second file finds no room
    files = [WholeFile(folder / name, b"data", 0o644, MTIME_NS) for name in ("a", "b", "c")]
    first, second, third = store_whole_files(files, disk=disk)
    assert first == folder / "a" and isinstance(second, DiskFull)
    assert isinstance(third, DiskFull)  # still full
    assert sorted(path.name for path in folder.iterdir()) == ["a"]


def test_without_unnamed_files_every_file_goes_to_the_partial_path(folder: Path) -> None:
    disk = FaultyDisk(unnamed_files=False)
    files = [WholeFile(folder / "x", b"1", 0o644, MTIME_NS)]
    assert store_whole_files(files, disk=disk) == [NOT_HERE]
    assert list(folder.iterdir()) == []


def test_a_failing_syncfs_falls_back_to_syncing_each_file(folder: Path) -> None:
    disk = FaultyDisk(fail="syncfs", error=errno.EIO)
    files = [WholeFile(folder / name, b"data", 0o644, MTIME_NS) for name in ("a", "b")]
    assert store_whole_files(files, disk=disk) == [folder / "a", folder / "b"]
    assert disk.failures == 1 and len(disk.calls_of("fsync")) == 2
    assert (folder / "b").read_bytes() == b"data"


def test_a_batch_that_cannot_be_made_durable_is_one_error_and_names_nothing(folder: Path) -> None:
    (folder / "a.txt").write_bytes(b"theirs")
    disk = FaultyDisk(syncfs=False, fail="fsync", error=errno.EIO)
    files = [WholeFile(folder / name, b"ours", 0o644, MTIME_NS) for name in ("a.txt", "b.txt")]
    with pytest.raises(OSError, match="Input/output error") as caught:
        store_whole_files(files, disk=disk)
    assert caught.value.errno == errno.EIO and disk.failures == 1
    assert disk.calls_of("link_at") == []  # nothing named before it is durable
    assert sorted(path.name for path in folder.iterdir()) == ["a.txt"]
    assert (folder / "a.txt").read_bytes() == b"theirs"
    disk.heal()  # the batch can come again
    assert store_whole_files(files, disk=disk) == [folder / "a (1).txt", folder / "b.txt"]


@pytest.mark.parametrize(
    ("error", "expected"),
    [(errno.EIO, OSError), (errno.ENOSPC, DiskFull), (errno.EXDEV, type(NOT_HERE))],
    ids=["io-error", "disk-full", "cannot-link"],
)
def test_a_failing_link_fails_that_file_only_and_replaces_nothing(
    folder: Path, error: int, expected: type
) -> None:
    (folder / "b").write_bytes(b"theirs")
    disk = FaultyDisk(fail="link_at", error=error, after_calls=1)  # the second file on
    files = [WholeFile(folder / name, b"ours", 0o644, MTIME_NS) for name in ("a", "b", "c")]
    first, second, third = store_whole_files(files, disk=disk)
    assert first == folder / "a"
    assert isinstance(second, expected) and isinstance(third, expected)
    if error == errno.EIO:
        assert isinstance(second, OSError) and second.errno == errno.EIO
        assert second.filename == str(folder / "b")  # names the file, one line
    assert sorted(path.name for path in folder.iterdir()) == ["a", "b"]
    assert (folder / "b").read_bytes() == b"theirs"
