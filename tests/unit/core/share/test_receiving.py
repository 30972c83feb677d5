"""The receiver's batch of small files where unnamed files cannot be made (macOS, Windows,
vfat): the partial-file path, in the same trip to the disk thread, each folder synced once."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from blake3 import blake3

from meshagent_gui.core.share import receiving
from meshagent_gui.core.share.partial import state_files_in
from meshagent_gui.core.share.whole import WholeFile

from .faulty_disk import FaultyDisk

MTIME_NS = 1_600_000_000_123_456_789


def test_small_files_without_unnamed_files_land_whole_and_each_folder_syncs_once(
    tmp_path: Path,
) -> None:
    disk = FaultyDisk(unnamed_files=False)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    wanted = {
        tmp_path / "a" / "one.txt": (b"one", 0o644),
        tmp_path / "a" / "run.sh": (b"#!/bin/sh\n", 0o755),
        tmp_path / "b" / "empty": (b"", 0o644),
    }
    files = [
        (WholeFile(path, data, mode, MTIME_NS), blake3(data).digest(), os.urandom(16))
        for path, (data, mode) in wanted.items()
    ]
    outcomes = receiving.store_small_files(files, "sender-id", 1024 * 1024, disk)
    assert outcomes == list(wanted)
    for path, (data, mode) in wanted.items():
        assert path.read_bytes() == data
        assert bool(stat.S_IMODE(path.stat().st_mode) & 0o100) == bool(mode & 0o100)
        assert path.stat().st_mtime_ns == MTIME_NS
    assert sorted(disk.calls_of("sync_directory")) == [(tmp_path / "a",), (tmp_path / "b",)]
    assert not state_files_in(tmp_path / "a") and not state_files_in(tmp_path / "b")


def test_a_clash_gets_a_new_name_and_a_wrong_digest_is_that_files_error(tmp_path: Path) -> None:
    (tmp_path / "taken.txt").write_bytes(b"mine")
    files = [
        (
            WholeFile(tmp_path / "taken.txt", b"theirs", 0o644, MTIME_NS),
            blake3(b"theirs").digest(),
            os.urandom(16),
        ),
        (WholeFile(tmp_path / "bad.txt", b"data", 0o644, MTIME_NS), bytes(32), os.urandom(16)),
    ]
    clash, bad = receiving.store_small_files(
        files, "sender-id", 1024 * 1024, FaultyDisk(unnamed_files=False)
    )
    assert clash == tmp_path / "taken (1).txt" and clash.read_bytes() == b"theirs"
    assert (tmp_path / "taken.txt").read_bytes() == b"mine"
    assert isinstance(bad, Exception) and not (tmp_path / "bad.txt").exists()
