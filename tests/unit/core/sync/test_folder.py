"""SyncFolder behaviours over the in-memory network (two services in one process): pause and
resume, waking a backed-off pull, .meshignore changes, a full disk, a copy never missing nor
partial while it is updated, and a large folder. See test_service.py for the fakes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshagent_gui.core.events import (
    PeerCameOnline,
    SyncFailed,
    SyncPeerConnected,
    SyncPeerDisconnected,
)
from meshagent_gui.core.protocol.sync import FileRow, Subscribe
from meshagent_gui.core.sync import folder as folder_module
from meshagent_gui.core.sync.index import FolderIndex
from meshagent_gui.core.sync.service import SyncService
from tests.unit.core.share.fakes import Recorder, wait_for

from .test_service import (
    ANN,
    BOB,
    SyncNetwork,
    _refused,
    _stream,
    make_sync,
    read,
    running,
    write,
)

TIMEOUT = 30.0
"""Generous: the machines running this are often loaded. Nothing waits this long when it works."""


def ann_and_bob(tmp_path: Path) -> tuple[SyncNetwork, SyncService, SyncService, Recorder]:
    """ann's and bob's services on one in-memory network, and bob's events."""
    network = SyncNetwork()
    ann, _ = make_sync(network, ANN, tmp_path / "ann")
    bob, bob_events = make_sync(network, BOB, tmp_path / "bob")
    return network, ann, bob, bob_events


def landed_at(home: Path, name: str) -> Path:
    return home / "sync" / name


def holds(path: Path, data: bytes) -> bool:
    return read(path) == data


def connected(service: SyncService, folder_id: str) -> bool:
    return all(peer.connected for peer in service.find(folder_id).info().peers)


def cut(network: SyncNetwork, device_id: str) -> None:
    """The device drops off the network (its connections cut), its services left running."""
    device = network.device(device_id)
    device.online = False
    for channel in list(device.channels):
        channel.end_both()
    device.channels.clear()


# ---------------------------------------------------------------- pause and resume


async def test_pause_cuts_open_streams_and_refuses_new_ones_resume_restarts(
    tmp_path: Path,
) -> None:
    network, ann, bob, _ = ann_and_bob(tmp_path)
    folder = tmp_path / "paused"
    write(folder / "first.txt", b"first")
    async with running(ann, bob):
        info = await ann.add(folder, BOB)
        landed = landed_at(tmp_path / "bob", "paused")
        await wait_for(lambda: read(landed / "first.txt") == b"first", "the first file", TIMEOUT)
        await wait_for(lambda: connected(ann, info.folder_id), "ann's streams", TIMEOUT)
        await wait_for(lambda: connected(bob, info.folder_id), "bob's streams", TIMEOUT)

        await ann.pause(info.folder_id)
        ann_folder = ann.find(info.folder_id)
        # At once: nothing to wait for on ann's side, its streams are cut synchronously or by
        # the cancellation of its tasks, which the next loop turns complete.
        await wait_for(lambda: not connected(ann, info.folder_id), "ann to stop", 5)
        await wait_for(
            lambda: not bob.find(info.folder_id).info().peers[0].connected, "bob to be cut", 5
        )
        assert ann_folder.info().state == "paused" and not ann_folder._serving
        # A new pull stream to the paused folder is refused.
        channel = await _stream(network, BOB, ANN, info.folder_id)
        channel.post(Subscribe(info.folder_id, "", 0))
        assert "paused" in (await _refused(channel)).message
        # Changes on both sides while paused stay where they are...
        write(folder / "from-ann.txt", b"made while paused")
        write(landed / "from-bob.txt", b"bob's, while ann is paused")
        await wait_for(
            lambda: any(r.name == "from-bob.txt" for r in _rows(bob, info.folder_id)),
            "bob to index its file",
            TIMEOUT,
        )
        assert read(landed / "from-ann.txt") is None and read(folder / "from-bob.txt") is None

        # ...and resume restarts both directions (bob's pull is woken by ann's new stream,
        # not left to its backoff).
        await ann.resume(info.folder_id)
        await wait_for(
            lambda: read(landed / "from-ann.txt") == b"made while paused", "ann's file", TIMEOUT
        )
        await wait_for(
            lambda: read(folder / "from-bob.txt") == b"bob's, while ann is paused",
            "bob's file",
            TIMEOUT,
        )
        await wait_for(lambda: connected(ann, info.folder_id), "ann's streams again", TIMEOUT)


def _rows(service: SyncService, folder_id: str) -> list[FileRow]:
    index = service.find(folder_id).index
    if index is None:
        return []
    # Read through a connection of our own: a snapshot (the folder's worker is the writer).
    with FolderIndex(index.path, device=0) as copy:
        return list(copy.all_rows())


# ---------------------------------------------------------------- reconnecting


async def test_peer_came_online_wakes_a_pull_backing_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every backoff lasts far longer than the test: only the event can bring the pull back.
    monkeypatch.setattr(folder_module, "BACKOFF_MIN", 10_000.0)
    network, ann, bob, _ = ann_and_bob(tmp_path)
    folder = tmp_path / "roaming"
    write(folder / "before.txt", b"before")
    async with running(ann, bob):
        info = await ann.add(folder, BOB)
        landed = landed_at(tmp_path / "bob", "roaming")
        await wait_for(lambda: read(landed / "before.txt") == b"before", "the file", TIMEOUT)
        bob_folder = bob.find(info.folder_id)
        await wait_for(lambda: bob_folder.peers[ANN].pulling, "bob's pull", TIMEOUT)

        cut(network, ANN)
        await wait_for(lambda: not bob_folder.peers[ANN].pulling, "bob's pull to end", TIMEOUT)
        await asyncio.sleep(0)  # bob's loop is now in its (10,000 s) backoff
        write(folder / "while-away.txt", b"written while bob could not reach ann")
        network.start(ANN)
        bob._bus.publish(PeerCameOnline(ANN, "ann-laptop"))
        await wait_for(
            lambda: read(landed / "while-away.txt") == b"written while bob could not reach ann",
            "bob to pull again once ann came online",
            TIMEOUT,
        )


async def test_a_peer_connecting_and_leaving_is_an_event_once_per_change(tmp_path: Path) -> None:
    network, ann, bob, bob_events = ann_and_bob(tmp_path)
    folder = tmp_path / "linked"
    write(folder / "a.txt", b"a")
    async with running(ann, bob):
        info = await ann.add(folder, BOB)
        await wait_for(lambda: connected(bob, info.folder_id), "bob's streams", TIMEOUT)
        # Two streams (bob pulls from ann, ann from bob): one "connected", not one per stream.
        await wait_for(lambda: bool(bob_events.of(SyncPeerConnected)), "the event", TIMEOUT)
        [up] = bob_events.of(SyncPeerConnected)
        assert (up.folder_id, up.device_id, up.peer_name) == (info.folder_id, ANN, "ann-laptop")
        assert not bob_events.of(SyncPeerDisconnected)

        cut(network, ANN)
        await wait_for(lambda: not connected(bob, info.folder_id), "bob cut off", TIMEOUT)
        await wait_for(lambda: bool(bob_events.of(SyncPeerDisconnected)), "the event", TIMEOUT)
        [down] = bob_events.of(SyncPeerDisconnected)
        assert (down.folder_id, down.device_id) == (info.folder_id, ANN)
        assert len(bob_events.of(SyncPeerConnected)) == 1


# ---------------------------------------------------------------- .meshignore


async def test_a_meshignore_change_takes_effect(tmp_path: Path) -> None:
    _, ann, bob, _ = ann_and_bob(tmp_path)
    folder = tmp_path / "project"
    write(folder / ".meshignore", b"*.log\n")
    write(folder / "notes.txt", b"v1")
    write(folder / "debug.log", b"ignored at first")
    async with running(ann, bob):
        await ann.add(folder, BOB)
        landed = landed_at(tmp_path / "bob", "project")
        await wait_for(lambda: read(landed / "notes.txt") == b"v1", "notes.txt", TIMEOUT)
        await wait_for(lambda: read(landed / ".meshignore") == b"*.log\n", "the ignores", TIMEOUT)
        assert read(landed / "debug.log") is None

        # notes.txt becomes ignored: it stays on bob as it was (not deleted), and its later
        # edits stay on ann.
        write(folder / ".meshignore", b"notes.txt\n")
        await wait_for(
            lambda: read(landed / ".meshignore") == b"notes.txt\n", "the new ignores", TIMEOUT
        )
        # debug.log is no longer ignored: it is sent.
        await wait_for(
            lambda: read(landed / "debug.log") == b"ignored at first", "the unignored", TIMEOUT
        )
        write(folder / "notes.txt", b"v2, kept on ann")
        write(folder / "later.txt", b"written after the edit")
        await wait_for(lambda: read(landed / "later.txt") is not None, "a later file", TIMEOUT)
        await ann.find(ann.folders()[0].folder_id).scan()  # the edit was seen on ann
        write(folder / "last.txt", b"after that scan")
        await wait_for(lambda: read(landed / "last.txt") is not None, "the last file", TIMEOUT)
        assert read(landed / "notes.txt") == b"v1"
        assert read(folder / "notes.txt") == b"v2, kept on ann"


# ---------------------------------------------------------------- disk full


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace')}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_a_full_disk_is_one_error_loses_nothing_and_recovers(tmp_path: Path) -> None:
    _, ann, bob, bob_events = ann_and_bob(tmp_path)
    folder = tmp_path / "media"
    contents = {f"clip{i}.bin": os.urandom(700_000) for i in range(4)}  # 2.8 MB: too much
    contents["small.txt"] = b"fits"
    for name, data in contents.items():
        write(folder / name, data)
    disk = tmp_path / "bob" / "sync"
    with small_tmpfs(disk, "2m"):
        async with running(ann, bob):
            info = await ann.add(folder, BOB)
            landed = disk / "media"
            await wait_for(lambda: bob_events.of(SyncFailed), "the disk-full error", TIMEOUT)
            failed = bob_events.of(SyncFailed)[0]
            assert failed.folder_id == info.folder_id and "disk is full" in failed.message
            assert bob.find(info.folder_id).info().state == "error"
            # Nothing partial is visible and ann lost nothing.
            for name, data in contents.items():
                here = read(landed / name)
                assert here is None or here == data, name
                assert read(folder / name) == data
            # Room again: everything arrives, and the temp files are gone.
            subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
            for name, data in contents.items():
                await wait_for(
                    functools.partial(holds, landed / name, data),
                    f"{name} after the disk got room",
                    TIMEOUT,
                )
            await wait_for(
                lambda: bob.find(info.folder_id).info().state in ("idle", "syncing", "scanning"),
                "the folder out of its error state",
                TIMEOUT,
            )
            await wait_for(
                lambda: not any((landed / ".meshsync" / "tmp").iterdir()), "no temp left", TIMEOUT
            )


# ---------------------------------------------------------------- never missing, never partial


async def test_the_peers_copy_is_never_missing_nor_partial_while_updated(tmp_path: Path) -> None:
    _, ann, bob, _ = ann_and_bob(tmp_path)
    folder = tmp_path / "live"
    # Two sizes: one block (the batched path) and several (the assembled path).
    versions: dict[str, list[bytes]] = {"small.txt": [], "large.bin": []}

    def new_version(name: str, number: int) -> bytes:
        size = 3_000 if name == "small.txt" else 300_000
        data = f"{name} version {number}\n".encode().ljust(size, b".")
        versions[name].append(data)
        return data

    def save(name: str, data: bytes) -> None:
        # Saved the way editors do (temp + rename: ann's side is never partial either).
        write(folder / f"{name}.tmp", data)
        os.replace(folder / f"{name}.tmp", folder / name)

    for name in versions:
        save(name, new_version(name, 0))
    async with running(ann, bob):
        await ann.add(folder, BOB)
        landed = landed_at(tmp_path / "bob", "live")
        for name in versions:
            await wait_for(
                functools.partial(holds, landed / name, versions[name][0]),
                f"the first {name}",
                TIMEOUT,
            )
        stop = threading.Event()
        missing: list[str] = []
        partial: list[str] = []
        reads = 0

        def poll() -> None:
            nonlocal reads
            while not stop.is_set():
                for name, known in versions.items():
                    try:
                        data = (landed / name).read_bytes()
                    except FileNotFoundError:
                        missing.append(name)
                        continue
                    reads += 1
                    if data not in known:
                        partial.append(name)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            for number in range(1, 16):
                for name in versions:
                    save(name, new_version(name, number))
                await asyncio.sleep(0.05)  # pacing the edits, not an assertion
            for name in versions:
                await wait_for(
                    functools.partial(holds, landed / name, versions[name][-1]),
                    f"the last {name}",
                    TIMEOUT,
                )
        finally:
            stop.set()
            await asyncio.to_thread(poller.join, 10)
        assert reads > 0
        assert missing == [] and partial == []


# ---------------------------------------------------------------- many files


MANY_FILES = int(os.environ.get("MESHAGENT_TEST_SYNC_FILES", "5000"))
"""The issue asks for 100,000 (set MESHAGENT_TEST_SYNC_FILES=100000: a few minutes here); the
suite's default keeps it under half a minute on a loaded machine."""


async def test_a_folder_of_many_files_syncs_whole(tmp_path: Path) -> None:
    _, ann, bob, _ = ann_and_bob(tmp_path)
    folder = tmp_path / "many"

    def make() -> None:
        for i in range(MANY_FILES):
            directory = folder / f"d{i // 1000:03d}"
            if i % 1000 == 0:
                directory.mkdir(parents=True)
            (directory / f"f{i:06d}").write_bytes(b"%d" % i)

    await asyncio.to_thread(make)
    async with running(ann, bob):
        info = await ann.add(folder, BOB)
        bob_folder_id = info.folder_id
        await wait_for(
            lambda: bob.find(bob_folder_id).info().files == MANY_FILES,
            f"{MANY_FILES} files on bob",
            timeout=max(120.0, MANY_FILES / 100),
        )
    landed = landed_at(tmp_path / "bob", "many")
    for i in range(0, MANY_FILES, 997):  # a sample: each with its own content
        assert (landed / f"d{i // 1000:03d}" / f"f{i:06d}").read_bytes() == b"%d" % i
    assert sum(1 for _ in landed.glob("d*/f*")) == MANY_FILES
