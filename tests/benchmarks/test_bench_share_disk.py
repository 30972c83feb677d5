"""Disk side of a transfer: PartialFile and ChunkReader against plain file I/O, same run.

Each figure is paired with a baseline measured in the same run, interleaved round by round:

- **receive** (``PartialFile``): a 512 MiB file written chunk by chunk in order, one write in
  flight as the receiving service does (blake3 of each chunk checked, data ``pwrite``, digest
  ``pwrite`` in the state table, data+state synced every 64 MiB, the whole-file hash fed as
  chunks land), then ``finish`` (fsync, no-replace rename, folder sync). Baseline: the same
  bytes written with ``os.write`` (1 MiB and 4 MiB writes, pooled: their spread is the
  kernel's dirty-page throttling, not the size), then one fsync: the least a receiver can do.
  Variants at 1 MiB: ``finish(full_read_back=True)`` (the whole file read back and hashed at
  the end), two writes in flight, and no periodic sync. ``finish`` alone is also shown, in
  seconds per GiB.
- **send** (``ChunkReader``, read-ahead 4): every chunk read off the loop, its blake3 and the
  running whole-file blake3, from the page cache (warm) and from the disk (cold: the file's
  pages dropped with ``posix_fadvise(DONTNEED)``). Baselines: ``os.read`` of the same chunks,
  and the same reads hashed by hand in one thread (what the pipeline costs beyond the work).
- **small files**: 2,000 files of 4 KiB received through ``PartialFile`` (open, one chunk,
  finish with its fsyncs) one at a time and 32 in flight on a 32-thread executor, against the
  least a durable receiver does per file (temp file, write, fsync, rename, fsync the folder) at
  the same concurrency. Also, 32 in flight: ``PartialFile.store_whole`` (one executor trip per
  file) and ``finish(sync_folder=False)`` with one folder sync at the end. Sending: ``walk`` +
  one ``ChunkReader`` per file, one file at a time as the sender streams them, against
  ``os.walk`` + ``open().read()``.
- **blake3 threads**: hashing 1 MiB and 4 MiB buffers with ``max_threads`` 1, 2 and AUTO, to
  decide whether the chunk digests should use blake3's multithreading on this machine.

Run: ``pytest -m benchmark tests/benchmarks/test_bench_share_disk.py`` (the table is always
printed). With ``MESHAGENT_BENCH_OUT`` set, the figures are also written there as JSON (a file
path, or an existing directory that gets ``share_disk.json``).
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from blake3 import blake3

from meshagent_gui.core.share.disk import sync_directory
from meshagent_gui.core.share.partial import DEFAULT_SYNC_EVERY, PartialFile
from meshagent_gui.core.share.source import ChunkReader, SourceEntry, walk
from tests.benchmarks._measure import timed, write_report

# Several GiB go through the disk: minutes on a busy machine, beyond the suite's 120 s.
pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(900)]

T = TypeVar("T")

MiB = 1024 * 1024
FILE_SIZE = 512 * MiB
POOL_SIZE = 32 * MiB  # distinct random bytes, repeated to make up the file
CHUNK_SIZES = (1 * MiB, 4 * MiB)
ROUNDS = 3
HASH_REPEATS = 64
HASH_ROUNDS = 7
SMALL_FILES = 2000
SMALL_FILE = 4096
SENDER = "bench-sender"
KEY = b"k" * 16


def stream(pool: bytes, chunk_size: int) -> Iterator[bytes]:
    """The file's chunks: the pool over and over (every chunk the same length)."""
    for offset in range(0, FILE_SIZE, chunk_size):
        start = offset % POOL_SIZE
        yield pool[start : start + chunk_size]


def whole_digest(pool: bytes) -> bytes:
    hasher = blake3()
    for _ in range(FILE_SIZE // POOL_SIZE):
        hasher.update(pool)
    return hasher.digest()


async def each_in_flight(
    items: Iterable[T], in_flight: int, work: Callable[[T], Awaitable[None]]
) -> None:
    """``work`` on every item, at most ``in_flight`` at a time, as the service bounds its work."""
    gate = asyncio.Semaphore(in_flight)

    async def gated(item: T) -> None:
        try:
            await work(item)
        finally:
            gate.release()

    async with asyncio.TaskGroup() as group:
        for item in items:
            await gate.acquire()
            group.create_task(gated(item))


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- receive side


def plain_write(path: Path, pool: bytes, chunk_size: int) -> float:
    def work() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for data in stream(pool, chunk_size):
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    seconds = timed(work)
    path.unlink()
    return seconds


async def partial_write(
    directory: Path,
    pool: bytes,
    digests: dict[int, bytes],
    chunk_size: int,
    *,
    sync_every: int = DEFAULT_SYNC_EVERY,
    in_flight: int = 1,
    full_read_back: bool = False,
) -> tuple[float, float]:
    """(seconds writing every chunk, seconds in finish)."""
    destination = directory / "received.bin"
    started = time.perf_counter()
    partial = await PartialFile.open(
        destination,
        sender=SENDER,
        key=KEY,
        size=FILE_SIZE,
        chunk_size=chunk_size,
        sync_every=sync_every,
    )

    async def write(chunk: tuple[int, bytes]) -> None:
        number, data = chunk
        await partial.write_chunk(number, digests[(number * chunk_size) % POOL_SIZE], data)

    # at most in_flight chunks in memory, as in the service
    await each_in_flight(enumerate(stream(pool, chunk_size)), in_flight, write)
    written = time.perf_counter()
    landed = await partial.finish(whole_digest(pool), mtime_ns=0, full_read_back=full_read_back)
    finished = time.perf_counter()
    landed.unlink()
    return written - started, finished - written


# ---------------------------------------------------------------------------- send side


def plain_read(path: Path, chunk_size: int, *, hashed: bool) -> float:
    def work() -> None:
        fd = os.open(path, os.O_RDONLY)
        whole = blake3()
        try:
            while data := os.read(fd, chunk_size):
                if hashed:
                    blake3(data).digest()
                    whole.update(data)
        finally:
            os.close(fd)

    return timed(work)


async def reader_read(entry: SourceEntry, chunk_size: int) -> float:
    started = time.perf_counter()
    async with ChunkReader(entry, chunk_size, read_ahead=4) as reader:
        async for _ in reader:
            pass
    seconds = time.perf_counter() - started
    assert reader.max_held_chunks <= 4
    return seconds


def hash_seconds(data: bytes, threads: int) -> float:
    started = time.perf_counter()
    for _ in range(HASH_REPEATS):
        blake3(data, max_threads=threads).digest()
    return time.perf_counter() - started


def hash_rates() -> dict[str, float]:
    """Median MB/s over interleaved rounds (the machine is shared: single runs swing 2x)."""
    seconds: dict[str, list[float]] = {}
    for size in CHUNK_SIZES:
        data = os.urandom(size)
        for _ in range(HASH_ROUNDS):
            for label, threads in (("1", 1), ("2", 2), ("auto", blake3.AUTO)):
                name = f"{size // MiB} MiB, max_threads={label}"
                seconds.setdefault(name, []).append(hash_seconds(data, threads))
    sizes = {name: int(name.split(" ", 1)[0]) * MiB for name in seconds}
    return {
        name: sizes[name] * HASH_REPEATS / statistics.median(values) / 1e6
        for name, values in seconds.items()
    }


async def read_once(kind: str, source: Path, entry: SourceEntry, chunk_size: int) -> float:
    if kind == "read_reader":
        return await reader_read(entry, chunk_size)
    return await asyncio.to_thread(plain_read, source, chunk_size, hashed=kind == "read_hashed")


# ---------------------------------------------------------------------------- the run


def mbps(seconds: float) -> float:
    return FILE_SIZE / seconds / 1e6


async def measure(directory: Path) -> dict[str, list[float]]:
    pool = os.urandom(POOL_SIZE)
    samples: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        samples.setdefault(name, []).append(seconds)

    digests = {
        size: {
            offset: blake3(pool[offset : offset + size]).digest()
            for offset in range(0, POOL_SIZE, size)
        }
        for size in CHUNK_SIZES
    }
    source = directory / "source.bin"
    with open(source, "wb") as handle:
        for _ in range(FILE_SIZE // POOL_SIZE):
            handle.write(pool)
    [entry] = walk([source]).entries

    # (sample name, chunk size, PartialFile options or None for the plain-write baseline)
    writes: list[tuple[str, int, dict[str, Any] | None]] = [
        ("write_plain_1M", MiB, None),
        ("partial_1M", MiB, {}),
        ("write_plain_4M", 4 * MiB, None),
        ("partial_4M", 4 * MiB, {}),
        ("partial_readback_1M", MiB, {"full_read_back": True}),
        ("partial_2inflight_1M", MiB, {"in_flight": 2}),
        ("partial_nosync_1M", MiB, {"sync_every": FILE_SIZE * 2}),
    ]
    for round_number in range(ROUNDS):
        # Rotate the order each round: dirty-page writeback left by one run slows the next.
        shift = round_number * 3 % len(writes)
        for name, size, options in writes[shift:] + writes[:shift]:
            if options is None:
                plain = directory / "plain.bin"
                seconds = await asyncio.to_thread(plain_write, plain, pool, size)
                add(name, seconds)
                add("write_plain", seconds)  # one chunk size or the other: the same baseline
                continue
            write_s, finish_s = await partial_write(directory, pool, digests[size], size, **options)
            add(f"write_{name}", write_s + finish_s)
            add(f"finish_{name}", finish_s)

        for cache in ("warm", "cold"):
            for size in CHUNK_SIZES:
                tag = f"{size // MiB}M_{cache}"
                for kind in ("read_plain", "read_hashed", "read_reader"):
                    if cache == "cold":
                        drop_cache(source)
                    else:
                        plain_read(source, 4 * MiB, hashed=False)  # make sure it is cached
                    add(f"{kind}_{tag}", await read_once(kind, source, entry, size))
    source.unlink()
    return samples


# ---------------------------------------------------------------------------- small files


async def receive_small(
    directory: Path,
    in_flight: int,
    executor: ThreadPoolExecutor,
    *,
    sync_folder: bool = True,
    one_step: bool = False,
) -> float:
    data = os.urandom(SMALL_FILE)
    data_digest = blake3(data).digest()

    async def one(number: int) -> None:
        if one_step:
            await PartialFile.store_whole(
                directory / f"r{number}.txt",
                data,
                data_digest,
                sender=SENDER,
                key=KEY,
                chunk_size=MiB,
                mtime_ns=0,
                sync_folder=sync_folder,
                executor=executor,
            )
            return
        partial = await PartialFile.open(
            directory / f"r{number}.txt",
            sender=SENDER,
            key=KEY,
            size=SMALL_FILE,
            chunk_size=MiB,
            executor=executor,
        )
        await partial.write_chunk(0, data_digest, data)
        await partial.finish(data_digest, mtime_ns=0, sync_folder=sync_folder)

    started = time.perf_counter()
    await each_in_flight(range(SMALL_FILES), in_flight, one)
    if not sync_folder:
        await asyncio.get_running_loop().run_in_executor(executor, sync_directory, directory)
    return time.perf_counter() - started


def plain_durable_write(directory: Path, number: int, data: bytes) -> None:
    """The least a durable receiver does per file: temp file, fsync, rename, fsync folder."""
    temporary = directory / f"p{number}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, directory / f"p{number}.txt")
    folder = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


async def plain_small(directory: Path, in_flight: int, executor: ThreadPoolExecutor) -> float:
    data = os.urandom(SMALL_FILE)
    loop = asyncio.get_running_loop()

    async def one(number: int) -> None:
        await loop.run_in_executor(executor, plain_durable_write, directory, number, data)

    started = time.perf_counter()
    await each_in_flight(range(SMALL_FILES), in_flight, one)
    return time.perf_counter() - started


async def send_small(tree: Path) -> float:
    started = time.perf_counter()
    manifest = await asyncio.to_thread(walk, [tree])
    for entry in manifest.entries:
        if entry.kind == "file":
            async with ChunkReader(entry, MiB) as reader:
                async for _ in reader:
                    pass
    return time.perf_counter() - started


def plain_read_tree(tree: Path) -> float:
    started = time.perf_counter()
    for folder, _, names in os.walk(tree):
        for name in sorted(names):
            with open(os.path.join(folder, name), "rb") as handle:
                handle.read()
    return time.perf_counter() - started


async def measure_small(directory: Path) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {}
    with ThreadPoolExecutor(max_workers=32, thread_name_prefix="bench-disk") as executor:
        for round_number in range(ROUNDS):
            for in_flight in (1, 32):
                for kind in ("plain", "partial"):
                    target = directory / f"small-{kind}-{in_flight}-{round_number}"
                    target.mkdir()
                    work = receive_small if kind == "partial" else plain_small
                    seconds = await work(target, in_flight, executor)
                    samples.setdefault(f"receive_{kind}_{in_flight}", []).append(seconds)
            target = directory / f"small-batched-{round_number}"
            target.mkdir()
            samples.setdefault("receive_partial_32_batched", []).append(
                await receive_small(target, 32, executor, sync_folder=False)
            )
            target = directory / f"small-whole-{round_number}"
            target.mkdir()
            samples.setdefault("receive_whole_32", []).append(
                await receive_small(target, 32, executor, one_step=True)
            )
            tree = directory / f"small-partial-32-{round_number}"
            samples.setdefault("send_reader", []).append(await send_small(tree))
            samples.setdefault("send_plain", []).append(
                await asyncio.to_thread(plain_read_tree, tree)
            )
            for leftover in directory.glob("small-*"):  # thousands of files: not kept
                await asyncio.to_thread(shutil.rmtree, leftover)
    return samples


def test_share_disk_throughput_against_plain_io(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    samples = asyncio.run(measure(tmp_path))
    median = {name: statistics.median(values) for name, values in samples.items()}
    small_samples = asyncio.run(measure_small(tmp_path))
    small_median = {name: statistics.median(values) for name, values in small_samples.items()}

    # label: (ours, baseline, floor). Below the floor something is broken, not slow.
    # Plain writes vary run to run with the kernel's dirty-page throttling (the machine is
    # shared), so every receive row is compared with the median of all plain writes.
    pairs: dict[str, tuple[str, str, float]] = {}
    for suffix, label in (
        ("_1M", "1M chunks (PartialFile)"),
        ("_4M", "4M chunks (PartialFile)"),
        ("_readback_1M", "1M, finish reads all back"),
        ("_2inflight_1M", "1M, 2 writes in flight"),
        ("_nosync_1M", "1M, no periodic sync"),
    ):
        pairs[f"receive {label}"] = (f"write_partial{suffix}", "write_plain", 0.15)
    for cache in ("warm", "cold"):
        for size in CHUNK_SIZES:
            tag = f"{size // MiB}M_{cache}"
            # Against bare reads the gap is the two blake3 passes (chunk and whole file) that
            # sending needs anyway; the hand-hashed baseline is the one the pipeline must match.
            pairs[f"send {tag} (ChunkReader)"] = (f"read_reader_{tag}", f"read_plain_{tag}", 0.05)
            pairs[f"send {tag} vs hashing by hand"] = (
                f"read_reader_{tag}",
                f"read_hashed_{tag}",
                0.5,
            )

    results: dict[str, dict[str, float]] = {
        label: {
            "value": mbps(median[ours]),
            "baseline": mbps(median[base]),
            "ratio": median[base] / median[ours],
            "floor": floor,
        }
        for label, (ours, base, floor) in pairs.items()
    }
    finish = {
        name.removeprefix("finish_partial"): seconds * (1024 * MiB) / FILE_SIZE
        for name, seconds in median.items()
        if name.startswith("finish_partial")
    }
    # label: (ours, baseline, floor), in files per second
    small_pairs = {
        "receive 4 KiB files, 1 at a time": ("receive_partial_1", "receive_plain_1", 0.2),
        "receive 4 KiB files, 32 in flight": ("receive_partial_32", "receive_plain_32", 0.2),
        "receive 4 KiB, 32, store_whole": ("receive_whole_32", "receive_plain_32", 0.2),
        "receive 4 KiB, 32, one folder sync": (
            "receive_partial_32_batched",
            "receive_plain_32",
            0.2,
        ),
        "send 4 KiB files (walk + ChunkReader)": ("send_reader", "send_plain", 0.05),
    }
    small_results = {
        label: {
            "value": SMALL_FILES / small_median[ours],
            "baseline": SMALL_FILES / small_median[base],
            "ratio": small_median[base] / small_median[ours],
            "floor": floor,
        }
        for label, (ours, base, floor) in small_pairs.items()
    }
    hashing = hash_rates()
    report: dict[str, Any] = {
        "benchmark": "share_disk",
        "unit": "MB/s over a 512 MiB file, median of rounds; ratio = ours / baseline",
        "baseline": "os.write + one fsync / os.read of the same bytes in the same chunks, same run",
        "file_bytes": FILE_SIZE,
        "rounds": ROUNDS,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "results": results,
        "small_files": {"count": SMALL_FILES, "bytes": SMALL_FILE, "files_per_s": small_results},
        "finish_seconds_per_gib": finish,
        "blake3_mb_per_s": hashing,
        "samples_seconds": samples | small_samples,
    }

    with capsys.disabled():
        print()
        print(f"{'share disk':<38}{'ours MB/s':>11}{'base MB/s':>11}{'ratio':>8}")
        for label, figures in results.items():
            print(
                f"{label:<38}{figures['value']:>11,.0f}{figures['baseline']:>11,.0f}"
                f"{figures['ratio']:>8.2f}"
            )
        print(f"{'small files':<38}{'files/s':>11}{'files/s':>11}")
        for label, figures in small_results.items():
            print(
                f"{label:<38}{figures['value']:>11,.0f}{figures['baseline']:>11,.0f}"
                f"{figures['ratio']:>8.2f}"
            )
        for tag, seconds in finish.items():
            print(f"finish {tag.lstrip('_'):<31}{seconds:>11.2f} s per GiB")
        for label, rate in hashing.items():
            print(f"blake3 {label:<30}{rate:>11,.0f} MB/s")

    write_report(report, "share_disk.json")

    for label, figures in {**results, **small_results}.items():
        assert figures["ratio"] > figures["floor"], f"{label} too slow: {figures}"
