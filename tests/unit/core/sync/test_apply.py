"""The Applier on real files: pulls, dedup, verification, versions, conflicts, deletions,
deferral, a full disk, and readers that never see a missing or partial file."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from meshagent_gui.core.protocol.sync import Action, Block, Decision, FileRow, Version
from meshagent_gui.core.share.disk import Disk
from meshagent_gui.core.share.partial import DiskFull, HashMismatch
from meshagent_gui.core.sync.apply import Applied, Applier, BlockUnavailable
from meshagent_gui.core.sync.blocks import cut, row_layout, segments_of
from meshagent_gui.core.sync.index import FolderIndex
from tests.unit.core.share.faulty_disk import FaultyDisk

ME = 1
PEER = 2
MTIME = 1_700_000_000_123_456_789
V_OURS: Version = ((ME, 1),)
V_THEIRS: Version = ((ME, 1), (PEER, 2))


def data_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


class FakeSource:
    """The peer: serves blocks of the contents it was given; counts what was asked."""

    def __init__(self, *contents: bytes, corrupt: bytes | None = None) -> None:
        self.blocks: dict[bytes, bytes] = {}
        self.segments: dict[bytes, tuple[Block, ...]] = {}
        self.corrupt = corrupt
        self.fetched: list[bytes] = []
        self.segment_requests: list[bytes] = []
        self.missing = False
        for content in contents:
            self.add(content)

    def add(self, content: bytes) -> None:
        offset = 0
        for block in cut(content):
            self.blocks[block.digest] = content[offset : offset + block.size]
            offset += block.size
        for segment, blocks in segments_of(cut(content)):
            self.segments[segment.digest] = blocks

    async def block(self, digest: bytes, name: str, offset: int, size: int) -> bytes:
        await asyncio.sleep(0)
        self.fetched.append(digest)
        if self.missing:
            raise BlockUnavailable("changed")
        if digest == self.corrupt:
            return bytes(size)
        return self.blocks[digest]

    async def segment(self, digest: bytes) -> tuple[Block, ...]:
        self.segment_requests.append(digest)
        return self.segments[digest]


def file_row(
    name: str,
    content: bytes,
    *,
    version: Version = V_THEIRS,
    mtime_ns: int = MTIME,
    permissions: int = 0o644,
    index: FolderIndex | None = None,
) -> FileRow:
    blocks = cut(content)
    inline, segments = row_layout(blocks)
    if index is not None and segments:
        for segment, run in segments_of(blocks):
            index.store_segment(segment.digest, run)
    return FileRow(
        name=name,
        kind="file",
        deleted=False,
        size=len(content),
        mtime_ns=mtime_ns,
        permissions=permissions,
        version=version,
        sequence=1,
        modified_by=PEER,
        blocks=inline,
        segments=segments,
    )


def dir_row(name: str, *, deleted: bool = False, version: Version = V_THEIRS) -> FileRow:
    return FileRow(name, "dir", deleted, 0, MTIME, 0o755, version, 1, PEER)


def tombstone(row: FileRow, version: Version = V_THEIRS) -> FileRow:
    return replace(row, deleted=True, size=0, blocks=(), segments=(), version=version)


def take(version: Version = V_THEIRS) -> Decision:
    return Decision(Action.TAKE, version)


def put_local(root: Path, index: FolderIndex, name: str, content: bytes) -> FileRow:
    """A file of ours, on disk and indexed as the scanner would."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    info = path.stat()
    row = replace(
        file_row(name, content, version=V_OURS, index=index),
        mtime_ns=info.st_mtime_ns,
        modified_by=ME,
    )
    index.put([row])
    return row


def leftovers(root: Path) -> list[str]:
    tmp = root / ".meshsync" / "tmp"
    return sorted(os.listdir(tmp)) if tmp.exists() else []


def versions(root: Path) -> list[Path]:
    base = root / ".meshsync" / "versions"
    return sorted(p for p in base.rglob("*") if p.is_file()) if base.exists() else []


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "folder"
    (folder / ".meshsync").mkdir(parents=True)
    return folder


@pytest.fixture
def index(tmp_path: Path) -> Iterator[FolderIndex]:
    opened = FolderIndex(tmp_path / "index.sqlite", device=ME)
    yield opened
    opened.close()


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    # One worker: the index is used from one thread, as in the folder's worker.
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


@pytest.fixture
async def applier(
    root: Path, index: FolderIndex, executor: ThreadPoolExecutor
) -> AsyncIterator[Applier]:
    made = Applier(root, index, executor=executor, device_name="laptop")
    await made.clean_tmp()
    yield made


async def run_sync(executor: ThreadPoolExecutor, function: object, *args: object) -> object:
    """Index calls from the test go through the same single thread."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, lambda: function(*args))  # type: ignore[operator]


# ---------------------------------------------------------------------------- files


async def test_take_new_file(
    root: Path, index: FolderIndex, applier: Applier, executor: ThreadPoolExecutor
) -> None:
    content = data_of(300_000, 1)
    row = file_row("docs/new.bin", content, permissions=0o755)
    source = FakeSource(content)

    applied = await applier.apply(row, take(), source)

    assert applied == Applied("docs/new.bin", "done")
    target = root / "docs" / "new.bin"
    assert target.read_bytes() == content
    assert target.stat().st_mtime_ns == MTIME
    if os.name != "nt":
        assert target.stat().st_mode & 0o777 == 0o755
    stored = await run_sync(executor, index.get, "docs/new.bin")
    assert isinstance(stored, FileRow)
    assert stored.version == V_THEIRS
    assert stored.blocks == row.blocks
    assert leftovers(root) == []
    assert versions(root) == []


async def test_empty_file(root: Path, applier: Applier) -> None:
    applied = await applier.apply(file_row("empty", b""), take(), FakeSource())
    assert applied.outcome == "done"
    assert (root / "empty").read_bytes() == b""


async def test_update_fetches_only_changed_blocks(
    root: Path, index: FolderIndex, applier: Applier, executor: ThreadPoolExecutor
) -> None:
    old = data_of(2_000_000, 2)
    await run_sync(executor, put_local, root, index, "big.bin", old)
    new = old[:1_000_000] + b"inserted!" + old[1_000_000:]
    row = file_row("big.bin", new)
    source = FakeSource(new)

    applied = await applier.apply(row, take(), source)

    assert applied.outcome == "done"
    assert (root / "big.bin").read_bytes() == new
    old_digests = {block.digest for block in cut(old)}
    changed = {block.digest for block in cut(new)} - old_digests
    assert 0 < len(changed) <= 3
    assert set(source.fetched) == changed
    assert len(source.fetched) == len(changed)
    # The old content is kept as a version, by name and time.
    kept = versions(root)
    assert len(kept) == 1
    assert kept[0].name.startswith("big.bin~")
    assert kept[0].read_bytes() == old


async def test_rename_fetches_nothing(
    root: Path, index: FolderIndex, applier: Applier, executor: ThreadPoolExecutor
) -> None:
    content = data_of(700_000, 3)
    await run_sync(executor, put_local, root, index, "old/name.bin", content)
    source = FakeSource(content)

    applied = await applier.apply(file_row("new/name.bin", content), take(), source)

    assert applied.outcome == "done"
    assert source.fetched == []
    assert (root / "new" / "name.bin").read_bytes() == content


async def test_repeated_blocks_fetched_once(root: Path, applier: Applier) -> None:
    content = bytes(1_500_000)  # zeros: the same max-size block again and again
    source = FakeSource(content)
    applied = await applier.apply(file_row("zeros", content), take(), source)
    assert applied.outcome == "done"
    assert (root / "zeros").read_bytes() == content
    assert len(source.fetched) == len(set(source.fetched))


async def test_local_copy_changed_falls_back_to_source(
    root: Path, index: FolderIndex, applier: Applier, executor: ThreadPoolExecutor
) -> None:
    content = data_of(200_000, 4)
    await run_sync(executor, put_local, root, index, "a.bin", content)
    # a.bin changes after it was indexed: its blocks must not be trusted.
    (root / "a.bin").write_bytes(data_of(200_000, 5))
    source = FakeSource(content)

    applied = await applier.apply(file_row("b.bin", content), take(), source)

    assert applied.outcome == "done"
    assert (root / "b.bin").read_bytes() == content
    assert set(source.fetched) == {block.digest for block in cut(content)}


async def test_large_file_with_segments(
    root: Path, index: FolderIndex, applier: Applier, executor: ThreadPoolExecutor
) -> None:
    content = data_of(24 * 1024 * 1024, 6)
    row = file_row("large.bin", content)
    assert row.segments and not row.blocks
    source = FakeSource(content)

    applied = await applier.apply(row, take(), source)

    assert applied.outcome == "done"
    assert (root / "large.bin").read_bytes() == content
    assert sorted(source.segment_requests) == sorted(s.digest for s in row.segments)
    assert await run_sync(executor, index.blocks_of, row) == tuple(cut(content))


async def test_corrupt_segment_refused(root: Path, applier: Applier) -> None:
    content = data_of(24 * 1024 * 1024, 7)
    row = file_row("large.bin", content)
    source = FakeSource(content)
    first = row.segments[0].digest
    source.segments[first] = source.segments[first][1:]  # a block list that is not the named one

    with pytest.raises(HashMismatch):
        await applier.apply(row, take(), source)

    assert not (root / "large.bin").exists()
    assert leftovers(root) == []


async def test_corrupt_block_refused(root: Path, applier: Applier) -> None:
    content = data_of(400_000, 8)
    blocks = cut(content)
    source = FakeSource(content, corrupt=blocks[2].digest)

    with pytest.raises(HashMismatch) as caught:
        await applier.apply(file_row("x.bin", content), take(), source)

    assert caught.value.code == "hash_mismatch"
    assert not (root / "x.bin").exists()
    assert leftovers(root) == []


async def test_corrupt_block_leaves_old_file(
    root: Path, index: FolderIndex, applier: Applier, executor: ThreadPoolExecutor
) -> None:
    old = data_of(100_000, 9)
    await run_sync(executor, put_local, root, index, "x.bin", old)
    new = data_of(100_000, 10)
    source = FakeSource(new, corrupt=cut(new)[0].digest)

    with pytest.raises(HashMismatch):
        await applier.apply(file_row("x.bin", new), take(), source)

    assert (root / "x.bin").read_bytes() == old
    assert versions(root) == []
    stored = await run_sync(executor, index.get, "x.bin")
    assert isinstance(stored, FileRow)
    assert stored.version == V_OURS


async def test_block_unavailable_leaves_nothing(root: Path, applier: Applier) -> None:
    content = data_of(50_000, 11)
    source = FakeSource(content)
    source.missing = True
    with pytest.raises(BlockUnavailable):
        await applier.apply(file_row("gone.bin", content), take(), source)
    assert not (root / "gone.bin").exists()
    assert leftovers(root) == []


async def test_exec_bit_only(
    root: Path, index: FolderIndex, applier: Applier, executor: ThreadPoolExecutor
) -> None:
    if os.name == "nt":
        pytest.skip("no exec bits on Windows")
    content = b"#!/bin/sh\n"
    row = file_row("run.sh", content, permissions=0o4777)  # setuid must never be applied
    await applier.apply(replace(row, permissions=0o777), take(), FakeSource(content))
    mode = (root / "run.sh").stat().st_mode & 0o7777
    assert mode & 0o111 == 0o111
    assert not mode & 0o7000
    assert mode & 0o022 == 0  # only the exec bits come from the peer


# ---------------------------------------------------------------------------- local changes win


async def test_deferred_when_local_file_changed(
    root: Path, index: FolderIndex, applier: Applier, executor: ThreadPoolExecutor
) -> None:
    await run_sync(executor, put_local, root, index, "doc.txt", b"indexed")
    (root / "doc.txt").write_bytes(b"edited since the scan")
    new = b"theirs"
    source = FakeSource(new)

    applied = await applier.apply(file_row("doc.txt", new), take(), source)

    assert applied.outcome == "deferred"
    assert (root / "doc.txt").read_bytes() == b"edited since the scan"
    assert source.fetched == []
    assert leftovers(root) == []


async def test_deferred_when_unindexed_file_in_the_way(root: Path, applier: Applier) -> None:
    (root / "new.txt").write_bytes(b"mine, not scanned yet")
    applied = await applier.apply(file_row("new.txt", b"theirs"), take(), FakeSource(b"theirs"))
    assert applied.outcome == "deferred"
    assert (root / "new.txt").read_bytes() == b"mine, not scanned yet"


async def test_deferred_when_changed_during_assembly(
    root: Path, index: FolderIndex, applier: Applier, executor: ThreadPoolExecutor
) -> None:
    await run_sync(executor, put_local, root, index, "doc.txt", b"indexed")
    new = data_of(100_000, 12)

    class EditingSource(FakeSource):
        async def block(self, digest: bytes, name: str, offset: int, size: int) -> bytes:
            (root / "doc.txt").write_bytes(b"edited while pulling")
            return await super().block(digest, name, offset, size)

    applied = await applier.apply(file_row("doc.txt", new), take(), EditingSource(new))

    assert applied.outcome == "deferred"
    assert (root / "doc.txt").read_bytes() == b"edited while pulling"
    assert leftovers(root) == []


async def test_conflict_renames_ours_and_takes_theirs(
    root: Path, index: FolderIndex, applier: Applier, executor: ThreadPoolExecutor
) -> None:
    ours = await run_sync(executor, put_local, root, index, "notes/plan.txt", b"our edit")
    assert isinstance(ours, FileRow)
    theirs = b"their edit"

    applied = await applier.apply(
        file_row("notes/plan.txt", theirs), Decision(Action.CONFLICT, V_THEIRS), FakeSource(theirs)
    )

    assert applied.outcome == "conflict"
    assert applied.conflict_name.startswith("notes/plan.sync-conflict-")
    assert applied.conflict_name.endswith("-laptop.txt")
    assert (root / applied.conflict_name).read_bytes() == b"our edit"
    assert (root / "notes" / "plan.txt").read_bytes() == theirs
    assert versions(root) == []  # the conflict copy is what keeps ours


async def test_keep_local_and_adopt_only_restamp(
    root: Path, index: FolderIndex, applier: Applier, executor: ThreadPoolExecutor
) -> None:
    await run_sync(executor, put_local, root, index, "k.txt", b"ours")
    before = (root / "k.txt").stat()
    merged: Version = ((ME, 3), (PEER, 2))
    for action in (Action.KEEP_LOCAL, Action.ADOPT_VERSION):
        applied = await applier.apply(
            tombstone(file_row("k.txt", b"")), Decision(action, merged), FakeSource()
        )
        assert applied.outcome == "done"
        stored = await run_sync(executor, index.get, "k.txt")
        assert isinstance(stored, FileRow)
        assert stored.version == merged
        assert not stored.deleted
    assert (root / "k.txt").read_bytes() == b"ours"
    assert (root / "k.txt").stat().st_mtime_ns == before.st_mtime_ns


async def test_nothing_does_nothing(root: Path, applier: Applier) -> None:
    row = file_row("n.txt", b"x")
    assert (await applier.apply(row, Decision(Action.NOTHING, V_OURS), FakeSource())).outcome == (
        "done"
    )
    assert not (root / "n.txt").exists()


# ---------------------------------------------------------------------------- deletions, dirs


async def test_deletion_goes_to_versions(
    root: Path, index: FolderIndex, applier: Applier, executor: ThreadPoolExecutor
) -> None:
    row = await run_sync(executor, put_local, root, index, "d/old.txt", b"bye")
    assert isinstance(row, FileRow)

    applied = await applier.apply(tombstone(row), take(), FakeSource())

    assert applied.outcome == "done"
    assert not (root / "d" / "old.txt").exists()
    kept = versions(root)
    assert [p.read_bytes() for p in kept] == [b"bye"]
    assert kept[0].parent.name == "d"
    stored = await run_sync(executor, index.get, "d/old.txt")
    assert isinstance(stored, FileRow)
    assert stored.deleted
    assert stored.version == V_THEIRS


async def test_deletion_of_changed_file_deferred(
    root: Path, index: FolderIndex, applier: Applier, executor: ThreadPoolExecutor
) -> None:
    row = await run_sync(executor, put_local, root, index, "keep.txt", b"v1")
    assert isinstance(row, FileRow)
    (root / "keep.txt").write_bytes(b"v2, edited here")
    applied = await applier.apply(tombstone(row), take(), FakeSource())
    assert applied.outcome == "deferred"
    assert (root / "keep.txt").read_bytes() == b"v2, edited here"


async def test_deletion_of_unknown_path_records_tombstone(
    index: FolderIndex, applier: Applier, executor: ThreadPoolExecutor
) -> None:
    applied = await applier.apply(tombstone(file_row("never.txt", b"")), take(), FakeSource())
    assert applied.outcome == "done"
    stored = await run_sync(executor, index.get, "never.txt")
    assert isinstance(stored, FileRow)
    assert stored.deleted


async def test_directory_create_and_remove(
    root: Path, index: FolderIndex, applier: Applier, executor: ThreadPoolExecutor
) -> None:
    applied = await applier.apply(dir_row("a/b/c"), take(), FakeSource())
    assert applied.outcome == "done"
    assert (root / "a" / "b" / "c").is_dir()

    applied = await applier.apply(dir_row("a/b/c", deleted=True), take(), FakeSource())
    assert applied.outcome == "done"
    assert not (root / "a" / "b" / "c").exists()
    stored = await run_sync(executor, index.get, "a/b/c")
    assert isinstance(stored, FileRow)
    assert stored.deleted


async def test_non_empty_directory_kept(
    root: Path, index: FolderIndex, applier: Applier, executor: ThreadPoolExecutor
) -> None:
    await applier.apply(dir_row("photos"), take(), FakeSource())
    (root / "photos" / ".DS_Store").write_bytes(b"ignored junk")

    applied = await applier.apply(dir_row("photos", deleted=True), take(), FakeSource())

    assert applied.outcome == "skipped"
    assert ".DS_Store" in applied.detail
    assert (root / "photos" / ".DS_Store").exists()
    stored = await run_sync(executor, index.get, "photos")
    assert isinstance(stored, FileRow)
    assert not stored.deleted  # no tombstone: nothing resurrects it on the peers


async def test_file_replaces_empty_folder_not_full_one(
    root: Path, index: FolderIndex, applier: Applier
) -> None:
    await applier.apply(dir_row("x"), take(), FakeSource())
    await applier.apply(dir_row("y"), take(), FakeSource())
    (root / "y" / "kept.txt").write_bytes(b"not synced")
    for name in ("x", "y"):
        row = file_row(name, b"now a file", version=((ME, 1), (PEER, 5)))
        applied = await applier.apply(row, take(row.version), FakeSource(b"now a file"))
        assert applied.outcome == ("done" if name == "x" else "skipped")
    assert (root / "x").read_bytes() == b"now a file"
    assert (root / "y" / "kept.txt").read_bytes() == b"not synced"
    assert leftovers(root) == []


async def test_parent_that_is_a_file_skips(
    root: Path, index: FolderIndex, applier: Applier, executor: ThreadPoolExecutor
) -> None:
    await run_sync(executor, put_local, root, index, "report", b"a file")
    applied = await applier.apply(file_row("report/page.txt", b"x"), take(), FakeSource(b"x"))
    assert applied.outcome == "skipped"
    assert "not a folder" in applied.detail
    assert (root / "report").read_bytes() == b"a file"


async def test_symlink_in_the_way_skips(root: Path, tmp_path: Path, applier: Applier) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    try:
        (root / "link").symlink_to(outside, target_is_directory=True)
    except OSError:
        pytest.skip("no symlinks here")
    applied = await applier.apply(file_row("link/x.txt", b"x"), take(), FakeSource(b"x"))
    assert applied.outcome == "skipped"
    assert "symbolic link" in applied.detail
    assert list(outside.iterdir()) == []


async def test_names_invalid_on_windows_skipped(root: Path, applier: Applier) -> None:
    applier._windows = True  # what os.name == "nt" sets
    for name in ("a:b.txt", "dir/CON.txt", "trailing."):
        applied = await applier.apply(file_row(name, b"x"), take(), FakeSource(b"x"))
        assert applied.outcome == "skipped", name
        assert "not a valid name on this system" in applied.detail
    assert not any(p.name != ".meshsync" for p in root.iterdir())


# ---------------------------------------------------------------------------- faults


async def test_disk_full_keeps_old_file(
    root: Path, index: FolderIndex, executor: ThreadPoolExecutor
) -> None:
    disk = FaultyDisk(fail="pwrite", error=errno.ENOSPC, after_bytes=100_000)
    applier = Applier(root, index, executor=executor, device_name="laptop", disk=disk)
    old = data_of(150_000, 13)
    await run_sync(executor, put_local, root, index, "f.bin", old)
    new = data_of(400_000, 14)

    with pytest.raises(DiskFull) as caught:
        await applier.apply(file_row("f.bin", new), take(), FakeSource(new))

    assert caught.value.code == "disk_full"
    assert (root / "f.bin").read_bytes() == old
    assert leftovers(root) == []
    assert versions(root) == []
    stored = await run_sync(executor, index.get, "f.bin")
    assert isinstance(stored, FileRow)
    assert stored.version == V_OURS

    disk.heal()  # space freed: the same row applies
    assert (await applier.apply(file_row("f.bin", new), take(), FakeSource(new))).outcome == "done"
    assert (root / "f.bin").read_bytes() == new


def linking_disk(link_at: Callable[[Callable[[int, Path], None], int, Path], None]) -> Disk:
    """The real disk whose ``link_at`` goes through ``link_at(real, fd, target)``."""
    disk = Disk()
    if not disk.unnamed_files():
        pytest.skip("no unnamed files here")
    real = disk.link_at
    disk.link_at = lambda fd, target: link_at(real, fd, target)
    return disk


async def test_a_small_new_file_never_replaces_a_name_made_here_meanwhile(
    root: Path, index: FolderIndex, executor: ThreadPoolExecutor
) -> None:
    def made_here_first(real: Callable[[int, Path], None], fd: int, target: Path) -> None:
        target.write_bytes(b"ours")  # after the last check, just before the link
        real(fd, target)

    applier = Applier(
        root, index, executor=executor, device_name="laptop", disk=linking_disk(made_here_first)
    )
    [outcome] = await applier.apply_small(
        [(file_row("new.txt", b"theirs"), take())], FakeSource(b"theirs")
    )
    assert isinstance(outcome, Applied) and outcome.outcome == "deferred"
    assert (root / "new.txt").read_bytes() == b"ours"
    assert await run_sync(executor, index.get, "new.txt") is None


async def test_a_link_that_fails_stops_that_file_and_later_batches_use_temp_files(
    root: Path, index: FolderIndex, executor: ThreadPoolExecutor
) -> None:
    links: list[Path] = []

    def no_proc(real: Callable[[int, Path], None], fd: int, target: Path) -> None:
        links.append(target)
        raise OSError(errno.ENOENT, "no /proc", str(target))

    applier = Applier(
        root, index, executor=executor, device_name="laptop", disk=linking_disk(no_proc)
    )
    source = FakeSource(b"first", b"second")
    [failed] = await applier.apply_small([(file_row("a.txt", b"first"), take())], source)
    assert isinstance(failed, OSError) and not (root / "a.txt").exists()
    [done] = await applier.apply_small([(file_row("b.txt", b"second"), take())], source)
    assert done == Applied("b.txt", "done")
    assert (root / "b.txt").read_bytes() == b"second"
    assert links == [root / "a.txt"]  # the second batch went through a temp file
    assert leftovers(root) == []


async def test_cancelled_apply_leaves_nothing(
    root: Path, index: FolderIndex, applier: Applier, executor: ThreadPoolExecutor
) -> None:
    old = b"old content"
    await run_sync(executor, put_local, root, index, "c.bin", old)
    new = data_of(300_000, 15)
    started = asyncio.Event()

    class SlowSource(FakeSource):
        async def block(self, digest: bytes, name: str, offset: int, size: int) -> bytes:
            started.set()
            await asyncio.Event().wait()  # forever: the apply is cancelled meanwhile
            return b""

    task = asyncio.create_task(applier.apply(file_row("c.bin", new), take(), SlowSource(new)))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (root / "c.bin").read_bytes() == old
    assert leftovers(root) == []


async def test_clean_tmp_and_versions(root: Path, applier: Applier) -> None:
    tmp = root / ".meshsync" / "tmp"
    (tmp / "stale.tmp").write_bytes(b"killed mid-apply")
    assert await applier.clean_tmp() == 1
    assert leftovers(root) == []

    base = root / ".meshsync" / "versions" / "sub"
    base.mkdir(parents=True)
    now = time.time()
    old_stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now - 40 * 86400))
    new_stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now - 86400))
    (base / f"a.txt~{old_stamp}").write_bytes(b"old")
    (base / f"a.txt~{old_stamp}-1").write_bytes(b"old too")
    (base / f"a.txt~{new_stamp}").write_bytes(b"recent")
    assert await applier.clean_versions(now=now) == 2
    assert [p.name for p in versions(root)] == [f"a.txt~{new_stamp}"]


# ---------------------------------------------------------------------------- readers


async def test_reader_never_sees_missing_or_partial(
    root: Path, index: FolderIndex, applier: Applier, executor: ThreadPoolExecutor
) -> None:
    contents = [data_of(600_000 + i * 10_000, 100 + i) for i in range(8)]
    await run_sync(executor, put_local, root, index, "live.bin", contents[0])
    allowed = set(contents)
    target = root / "live.bin"
    stop = threading.Event()
    seen: list[str] = []

    def poll() -> None:
        reads = 0
        while not stop.is_set() or reads < 10:
            try:
                data = target.read_bytes()
            except FileNotFoundError:
                seen.append("missing")
                continue
            reads += 1
            if data not in allowed:
                seen.append(f"partial ({len(data)} bytes)")

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for number, content in enumerate(contents[1:], start=2):
            version: Version = ((ME, 1), (PEER, number))
            row = file_row("live.bin", content, version=version, mtime_ns=MTIME + number)
            applied = await applier.apply(row, take(version), FakeSource(content))
            assert applied.outcome == "done"
    finally:
        stop.set()
        await asyncio.to_thread(reader.join)
    assert seen == []
    assert target.read_bytes() == contents[-1]
    assert len(versions(root)) == len(contents) - 1


async def test_case_insensitive_checks_keep_exact_names_working(
    root: Path, index: FolderIndex, applier: Applier, executor: ThreadPoolExecutor
) -> None:
    applier._case_insensitive = True  # the listing checks run; the names here are exact
    row = await run_sync(executor, put_local, root, index, "Readme.md", b"hello")
    assert isinstance(row, FileRow)
    applied = await applier.apply(file_row("new.md", b"x"), take(), FakeSource(b"x"))
    assert applied.outcome == "done"
    applied = await applier.apply(tombstone(row), take(), FakeSource())
    assert applied.outcome == "done"
    assert not (root / "Readme.md").exists()
