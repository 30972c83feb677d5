from __future__ import annotations

import asyncio
import os
import shutil
import threading
import unicodedata
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from watchdog.utils import BaseThread

from meshagent_gui.core.sync import inotify
from meshagent_gui.core.sync.watcher import FolderWatcher

# Generous: CI machines are loaded. Tests wait for conditions, never for exact timings.
TIMEOUT = 30.0

SOURCES = ["inotify", "watchdog"] if inotify.available() else ["watchdog"]


@pytest.fixture(autouse=True, params=SOURCES)
def source(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs against each event source this platform has (Linux: both)."""
    name: str = request.param
    monkeypatch.setattr(inotify, "available", lambda: name == "inotify")
    return name


async def collect(
    changes: AsyncIterator[set[str] | None],
    done: Callable[[list[set[str] | None]], bool],
    timeout: float = TIMEOUT,
) -> list[set[str] | None]:
    """Batches until ``done(batches)`` holds."""
    batches: list[set[str] | None] = []
    async with asyncio.timeout(timeout):
        while not done(batches):
            batches.append(await anext(changes))
    return batches


def seen(batches: list[set[str] | None]) -> set[str]:
    return set().union(*(batch for batch in batches if batch is not None))


async def test_a_write_is_reported(tmp_path: Path) -> None:
    async with FolderWatcher(tmp_path) as watcher:
        changes = watcher.changes()
        await asyncio.to_thread((tmp_path / "a.txt").write_bytes, b"hello")
        batches = await collect(changes, lambda b: "a.txt" in seen(b))
        assert None not in batches
        (tmp_path / "sub").mkdir()
        await asyncio.to_thread((tmp_path / "sub" / "b.txt").write_bytes, b"x")
        await collect(changes, lambda b: {"sub", "sub/b.txt"} <= seen(b))


async def test_quick_writes_are_coalesced(tmp_path: Path) -> None:
    def write_many() -> None:
        for n in range(100):
            (tmp_path / f"f{n % 10}.txt").write_bytes(str(n).encode())

    async with FolderWatcher(tmp_path, settle=0.5, max_delay=5.0) as watcher:
        changes = watcher.changes()
        await asyncio.to_thread(write_many)
        wanted = {f"f{n}.txt" for n in range(10)}
        batches = await collect(changes, lambda b: wanted <= seen(b))
    # 100 writes (several events each) arrive as a handful of batches, not hundreds.
    assert len(batches) <= 5


async def test_a_batch_is_not_held_back_past_max_delay(tmp_path: Path) -> None:
    # settle never passes while the file is written every 50 ms; max_delay still cuts batches.
    stop = threading.Event()

    def keep_writing() -> None:
        with open(tmp_path / "growing.log", "ab") as file:
            while not stop.is_set():
                file.write(b"line\n")
                file.flush()
                stop.wait(0.05)

    async with FolderWatcher(tmp_path, settle=60.0, max_delay=0.3) as watcher:
        writer = asyncio.create_task(asyncio.to_thread(keep_writing))
        try:
            batches = await collect(watcher.changes(), lambda b: len(b) >= 2)
        finally:
            stop.set()
            await writer
    assert all(batch == {"growing.log"} for batch in batches)


async def test_a_move_reports_both_names(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_bytes(b"x")
    (tmp_path / "dir").mkdir()
    async with FolderWatcher(tmp_path) as watcher:
        changes = watcher.changes()
        await asyncio.to_thread(os.rename, tmp_path / "old.txt", tmp_path / "dir" / "new.txt")
        await collect(changes, lambda b: {"old.txt", "dir/new.txt"} <= seen(b))
        await asyncio.to_thread(os.rename, tmp_path / "dir", tmp_path / "moved")
        await collect(changes, lambda b: {"dir", "moved"} <= seen(b))


async def test_deletions_and_empty_folders(tmp_path: Path) -> None:
    (tmp_path / "gone.txt").write_bytes(b"x")
    async with FolderWatcher(tmp_path) as watcher:
        changes = watcher.changes()
        await asyncio.to_thread((tmp_path / "gone.txt").unlink)
        await asyncio.to_thread((tmp_path / "empty").mkdir)
        await collect(changes, lambda b: {"gone.txt", "empty"} <= seen(b))


async def test_the_state_folder_is_not_reported(tmp_path: Path) -> None:
    state = tmp_path / ".meshsync" / "tmp"
    state.mkdir(parents=True)
    async with FolderWatcher(tmp_path) as watcher:
        changes = watcher.changes()

        def write() -> None:
            (state / "part").write_bytes(b"x" * 1000)
            os.rename(state / "part", state / "part2")
            (tmp_path / "sentinel").write_bytes(b"x")

        await asyncio.to_thread(write)
        batches = await collect(changes, lambda b: "sentinel" in seen(b))
    assert not any(name.startswith(".meshsync") for name in seen(batches))


async def test_names_are_nfc(tmp_path: Path) -> None:
    nfd = unicodedata.normalize("NFD", "Caf\u00e9.txt")
    async with FolderWatcher(tmp_path) as watcher:
        changes = watcher.changes()
        await asyncio.to_thread((tmp_path / nfd).write_bytes, b"x")
        await collect(changes, lambda b: "Caf\u00e9.txt" in seen(b))


async def test_reading_is_not_a_change(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"x")
    async with FolderWatcher(tmp_path) as watcher:
        changes = watcher.changes()

        def read_then_mark() -> None:
            for _ in range(20):
                (tmp_path / "a.txt").read_bytes()
            (tmp_path / "sentinel").write_bytes(b"x")

        await asyncio.to_thread(read_then_mark)
        batches = await collect(changes, lambda b: "sentinel" in seen(b))
    assert "a.txt" not in seen(batches)


async def test_too_many_names_become_a_full_rescan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("meshagent_gui.core.sync.watcher.MAX_PENDING", 5)

    def write_many() -> None:
        for n in range(20):
            (tmp_path / f"f{n}.txt").write_bytes(b"x")

    async with FolderWatcher(tmp_path, settle=1.0, max_delay=5.0) as watcher:
        changes = watcher.changes()
        await asyncio.to_thread(write_many)
        await collect(changes, lambda b: None in b)


async def test_the_root_deleted_asks_for_a_rescan(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.txt").write_bytes(b"x")
    async with FolderWatcher(root) as watcher:
        changes = watcher.changes()
        await asyncio.to_thread(shutil.rmtree, root)
        await collect(changes, lambda b: None in b)


async def test_clean_shutdown(tmp_path: Path, source: str) -> None:
    if source == "inotify":
        async with FolderWatcher(tmp_path) as watcher:
            changes = watcher.changes()
            fds = set(os.listdir("/proc/self/fd"))
            waiting = asyncio.create_task(anext(changes, "ended"))
            await asyncio.sleep(0.1)
        assert await asyncio.wait_for(waiting, TIMEOUT) == "ended"
        # No thread to join; the inotify descriptor (and with it every watch) is closed.
        assert set(os.listdir("/proc/self/fd")) < fds
        return

    def watchdog_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if isinstance(t, BaseThread) and t.is_alive()]

    before = watchdog_threads()
    async with FolderWatcher(tmp_path) as watcher:
        changes = watcher.changes()
        started = [t for t in watchdog_threads() if t not in before]
        assert started  # the observer and its emitter
        waiting = asyncio.create_task(anext(changes, "ended"))
        await asyncio.sleep(0.1)
    # Leaving the context ends the iteration and has joined the observer's threads.
    assert await asyncio.wait_for(waiting, TIMEOUT) == "ended"
    assert not [t for t in started if t.is_alive()]


async def test_changes_needs_the_context(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        await anext(FolderWatcher(tmp_path).changes())


async def test_a_folder_made_with_files_reports_them_all(tmp_path: Path) -> None:
    # A folder created (or moved in) whole: what it holds before its watch exists is reported.
    staging = tmp_path.parent / f"{tmp_path.name}-staging"
    (staging / "deep" / "er").mkdir(parents=True)
    (staging / "deep" / "er" / "x.txt").write_bytes(b"x")
    (staging / "top.txt").write_bytes(b"t")
    async with FolderWatcher(tmp_path) as watcher:
        changes = watcher.changes()
        await asyncio.to_thread(os.rename, staging, tmp_path / "moved-in")
        wanted = {"moved-in", "moved-in/top.txt", "moved-in/deep", "moved-in/deep/er/x.txt"}
        await collect(changes, lambda b: wanted <= seen(b))
        # Its new watches work, and a folder moved out is no longer reported.
        await asyncio.to_thread((tmp_path / "moved-in" / "deep" / "er" / "y.txt").write_bytes, b"y")
        await collect(changes, lambda b: "moved-in/deep/er/y.txt" in seen(b))
        await asyncio.to_thread(os.rename, tmp_path / "moved-in", staging)
        await collect(changes, lambda b: "moved-in" in seen(b))
        await asyncio.to_thread((staging / "after.txt").write_bytes, b"a")
        await asyncio.to_thread((tmp_path / "sentinel").write_bytes, b"s")
        batches = await collect(changes, lambda b: "sentinel" in seen(b))
    assert not any("after.txt" in name for name in seen(batches))
    shutil.rmtree(staging)


async def test_a_renamed_folder_is_watched_under_its_new_name(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    async with FolderWatcher(tmp_path) as watcher:
        changes = watcher.changes()
        await asyncio.to_thread(os.rename, tmp_path / "a", tmp_path / "c")
        await collect(changes, lambda b: {"a", "c"} <= seen(b))
        await asyncio.to_thread((tmp_path / "c" / "b" / "f.txt").write_bytes, b"f")
        await collect(changes, lambda b: "c/b/f.txt" in seen(b))


async def test_unnamed_files_being_written_are_not_reported(tmp_path: Path, source: str) -> None:
    # The applier writes into O_TMPFILE files in the target folder; the kernel reports their
    # writes under "#<inode>", a name that never exists. A real file so named still counts.
    if source != "inotify" or not hasattr(os, "O_TMPFILE"):
        pytest.skip("inotify's own filter")
    (tmp_path / "#42").write_bytes(b"")
    async with FolderWatcher(tmp_path) as watcher:
        changes = watcher.changes()

        def write() -> None:
            fd = os.open(tmp_path, os.O_TMPFILE | os.O_WRONLY, 0o644)
            try:
                os.write(fd, b"x" * 4096)
                os.utime(fd, ns=(1, 1))
            finally:
                os.close(fd)
            (tmp_path / "#42").write_bytes(b"real")
            (tmp_path / "sentinel").write_bytes(b"s")

        await asyncio.to_thread(write)
        batches = await collect(changes, lambda b: {"sentinel", "#42"} <= seen(b))
    assert seen(batches) == {"sentinel", "#42"}


async def test_a_flood_past_the_kernel_queue_asks_for_a_rescan(tmp_path: Path, source: str) -> None:
    # More events than the kernel queues while the loop is busy: it drops them and says so.
    if source != "inotify":
        pytest.skip("the loop-read inotify queue")
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 100_000:
        pytest.skip("this kernel queues too many events to flood cheaply")
    names = [tmp_path / "a", tmp_path / "b"]
    for path in names:
        path.write_bytes(b"")
    async with FolderWatcher(tmp_path) as watcher:
        changes = watcher.changes()
        for n in range(limit + 100):  # on the loop: nothing is read until it is done
            os.utime(names[n % 2], ns=(n, n))
        await collect(changes, lambda b: None in b)
