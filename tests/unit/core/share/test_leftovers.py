"""Issue 17, "Silent states": partials of abandoned receives are not shown at full size, and
those untouched for long are removed (by the agent at start), never one in use or not ours."""

from __future__ import annotations

import os
import time
from pathlib import Path

from blake3 import blake3

from meshagent_gui.core.share.partial import PartialFile, remove_stale_partials

CHUNK = 64 * 1024
SENDER = "device-a" * 8
KEY = bytes(range(16))
DAY = 86400.0


async def _abandoned(destination: Path, chunks: int, of: int) -> PartialFile:
    partial = await PartialFile.open(
        destination, sender=SENDER, key=KEY, size=of * CHUNK, chunk_size=CHUNK
    )
    for chunk in range(chunks):
        data = os.urandom(CHUNK)
        await partial.write_chunk(chunk, blake3(data).digest(), data)
    return partial


def _age(partial: PartialFile, days: float) -> None:
    then = time.time() - days * DAY
    for path in (partial.data_path, partial.state_path):
        os.utime(path, (then, then))


async def test_a_partial_left_behind_shows_what_arrived_not_the_whole_size(
    tmp_path: Path,
) -> None:
    partial = await _abandoned(tmp_path / "movie.mkv", chunks=2, of=100)
    await partial.abandon()
    assert partial.data_path.stat().st_size == 2 * CHUNK  # not 100 chunks' worth
    resumed = await PartialFile.open(
        tmp_path / "movie.mkv", sender=SENDER, key=KEY, size=100 * CHUNK, chunk_size=CHUNK
    )
    assert resumed.verified_bytes == 2 * CHUNK  # and it still resumes
    await resumed.abandon()


async def test_old_partials_are_removed_and_young_busy_or_foreign_ones_kept(
    tmp_path: Path,
) -> None:
    inner = tmp_path / "photos" / "2024"
    inner.mkdir(parents=True)
    old = await _abandoned(inner / "old.jpg", chunks=1, of=3)
    await old.abandon()
    _age(old, 8)
    young = await _abandoned(tmp_path / "young.bin", chunks=1, of=3)
    await young.abandon()
    _age(young, 6)
    busy = await _abandoned(tmp_path / "busy.bin", chunks=1, of=3)  # a live receive holds it
    _age(busy, 30)
    foreign = tmp_path / "notes.meshpart.state"  # a file of the user's that looks like ours
    foreign.write_bytes(b"not ours at all")
    os.utime(foreign, (time.time() - 30 * DAY,) * 2)

    removed = remove_stale_partials(tmp_path, 7 * DAY)

    assert removed == [old.data_path]
    assert not old.data_path.exists() and not old.state_path.exists()
    assert young.data_path.exists() and young.state_path.exists()
    assert busy.data_path.exists() and busy.state_path.exists()
    assert foreign.exists()
    await busy.abandon()
