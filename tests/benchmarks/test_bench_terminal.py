"""Terminal host throughput and late-join time, against a bare PTY reader in the same run.

- **Baseline**: ``cat FILE`` on a PTY read by the bare event-loop reader (:class:`UnixPty`, no
  host, no emulator, no viewers): what the PTY itself delivers here.
- **Host, 0 / 1 / 10 viewers**: the same ``cat`` through :class:`TerminalHost` (replay log,
  screen tracker with avt, offsets), with in-process viewers whose queues are drained by tasks.
  Reported as MB/s, the slowdown against 0 viewers (the issue's target: 10 viewers <= 20%) and
  against the bare PTY, the host process' CPU per GiB, and how much the emulator skipped.
- **Late join**: attach a viewer and take its first screen (emulator catch-up + dump + parts),
  on an idle 80x24 and 200x50 screen and in the middle of a ``cat`` flood (target <= 200 ms).

Rounds are interleaved (baseline, 0, 1, 10, baseline, ...) and medians reported. The file is
100 MB of mixed text (code, coloured log lines, CJK, long wrapping lines), written to tmp_path.

Run: ``pytest -m benchmark tests/benchmarks/test_bench_terminal.py`` (the table is printed).
With ``MESHAGENT_BENCH_OUT`` set, the figures are also written there as JSON (a file path, or
an existing directory that gets ``terminal.json``).
"""

from __future__ import annotations

import asyncio
import os
import platform
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from meshagent_gui.core.protocol.terminal import Snapshot
from meshagent_gui.core.terminal.host import HostLimits, TerminalHost, Viewer
from meshagent_gui.core.terminal.pty_unix import UnixPty
from meshagent_gui.core.terminal.spawn import spawn_pty
from tests.benchmarks._measure import write_report

pytestmark = [
    pytest.mark.benchmark,
    pytest.mark.skipif(sys.platform == "win32", reason="Unix PTYs"),
]

FILE_BYTES = int(os.environ.get("MESHAGENT_BENCH_TERMINAL_MB", "100")) * 1024 * 1024
ROUNDS = 5
VIEWER_COUNTS = (0, 1, 10)
LATE_JOINS = 20
TIMEOUT = 300


def write_mixed_file(path: Path, size: int) -> None:
    """What ``cat`` of a mixed file shows: code, ls/grep/log colours, UTF-8, wrapping lines."""
    rnd = random.Random(7)
    words = ["alpha", "beta", "gamma", "delta", "return", "import", "class", "self", "None"]
    lines = []
    for i in range(4000):
        text = " ".join(rnd.choice(words) for _ in range(rnd.randint(3, 14)))
        kind = i % 10
        if kind < 5:
            lines.append("    " * rnd.randint(0, 3) + text)
        elif kind < 7:
            lines.append(f"\x1b[01;34m{text[:12]}\x1b[0m  \x1b[01;32m{text[12:30]}\x1b[0m")
        elif kind == 7:
            lines.append(f"\x1b[38;5;{i % 256}m12:00:{i % 60:02d}\x1b[m ERROR {text} 漢字 café 🙂")
        elif kind == 8:
            lines.append((text + " ") * rnd.randint(5, 12))
        else:
            lines.append(f"\x1b[38;2;{i % 256};{(i * 7) % 256};{(i * 13) % 256}m{text}\x1b[m")
    block = ("\n".join(lines) + "\n").encode()
    with path.open("wb") as out:
        written = 0
        while written < size:
            piece = block[: size - written]
            out.write(piece)
            written += len(piece)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def baseline(path: Path) -> dict[str, float]:
    """``cat`` through a PTY, read by the bare reader: no host, no emulator."""
    received = 0
    done = asyncio.Event()

    def output(data: bytes) -> None:
        nonlocal received
        received += len(data)

    cpu = cpu_seconds()
    started = time.perf_counter()
    pty = spawn_pty(["cat", str(path)], cols=80, rows=24)
    assert isinstance(pty, UnixPty)
    pty.start(output, done.set)
    async with asyncio.timeout(TIMEOUT):
        await pty.wait()
        await done.wait()
    seconds = time.perf_counter() - started
    pty.close()
    return {"seconds": seconds, "bytes": received, "cpu": cpu_seconds() - cpu}


async def drain(viewer: Viewer) -> int:
    received = 0
    async for message in viewer:
        data = getattr(message, "data", b"")
        received += len(data)
    return received


async def through_host(path: Path, viewers: int) -> dict[str, float]:
    cpu = cpu_seconds()
    started = time.perf_counter()
    host = TerminalHost(spawn_pty(["cat", str(path)], cols=80, rows=24), limits=HostLimits())
    attached = [host.attach(f"viewer-{i}") for i in range(viewers)]
    async with asyncio.timeout(TIMEOUT), asyncio.TaskGroup() as tasks:
        drains = [tasks.create_task(drain(viewer)) for viewer in attached]
        await host.run()
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "bytes": host.offset,
        "cpu": cpu_seconds() - cpu,
        "screen_skipped_bytes": host.screen.skipped_bytes,
        "viewer_resyncs": sum(viewer.resyncs for viewer in attached),
        "viewer_bytes_min": min((task.result() for task in drains), default=0),
    }


async def first_screen(host: TerminalHost) -> float:
    """Seconds from attach to the viewer holding its whole first screen."""
    started = time.perf_counter()
    viewer = host.attach("late")
    while True:
        message = await viewer.next()
        if isinstance(message, Snapshot) and message.final:
            break
    seconds = time.perf_counter() - started
    viewer.close()
    return seconds


async def late_joins(path: Path) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for cols, rows in ((80, 24), (200, 50)):
        # An idle full screen: the end of the file on screen, the command waiting.
        host = TerminalHost(
            spawn_pty(["sh", "-c", f"head -c 2000000 {path}; read x"], cols=cols, rows=rows)
        )
        run = asyncio.create_task(host.run())
        async with asyncio.timeout(TIMEOUT):
            while host.offset < 2_000_000:
                await asyncio.sleep(0.01)
        times = [await first_screen(host) for _ in range(LATE_JOINS)]
        host.console_input(b"\n")
        await asyncio.wait_for(run, TIMEOUT)
        results[f"idle {cols}x{rows}"] = _summary(times)
    # During a flood: the emulator's backlog is parsed first.
    host = TerminalHost(spawn_pty(["cat", str(path)], cols=80, rows=24))
    run = asyncio.create_task(host.run())
    times = []
    async with asyncio.timeout(TIMEOUT):
        while not run.done() and len(times) < LATE_JOINS:
            await asyncio.sleep(0.02)
            times.append(await first_screen(host))
    await asyncio.wait_for(run, TIMEOUT)
    results["during cat 80x24"] = _summary(times)
    return results


def _summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median_ms": statistics.median(ordered) * 1000,
        "max_ms": ordered[-1] * 1000,
        "samples": len(ordered),
    }


async def measure(path: Path) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, float]]] = {"bare PTY": []}
    for count in VIEWER_COUNTS:
        rounds[f"host, {count} viewers"] = []
    for _ in range(ROUNDS):
        rounds["bare PTY"].append(await baseline(path))
        for count in VIEWER_COUNTS:
            rounds[f"host, {count} viewers"].append(await through_host(path, count))
    return {"rounds": rounds, "late_join": await late_joins(path)}


def test_host_throughput_and_late_join(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mixed.txt"
    write_mixed_file(path, FILE_BYTES)
    measured = asyncio.run(measure(path))

    def median(label: str, key: str) -> float:
        return float(statistics.median(r[key] for r in measured["rounds"][label]))

    base_rate = FILE_BYTES / median("bare PTY", "seconds") / 1e6
    zero_seconds = median("host, 0 viewers", "seconds")
    results: dict[str, dict[str, float]] = {}
    for label in measured["rounds"]:
        seconds = median(label, "seconds")
        results[label] = {
            "MB_per_s": FILE_BYTES / seconds / 1e6,
            "seconds": seconds,
            "slowdown_vs_0_viewers": seconds / zero_seconds - 1 if label != "bare PTY" else 0.0,
            "ratio_to_bare_pty": (FILE_BYTES / seconds / 1e6) / base_rate,
            "cpu_s_per_GiB": median(label, "cpu") / (FILE_BYTES / 2**30),
            "screen_skipped_MB": median(label, "screen_skipped_bytes") / 1e6
            if label != "bare PTY"
            else 0.0,
            "viewer_resyncs": median(label, "viewer_resyncs") if label != "bare PTY" else 0.0,
        }
    report: dict[str, Any] = {
        "benchmark": "terminal",
        "file_MB": FILE_BYTES / 1e6,
        "rounds": ROUNDS,
        "baseline": "cat FILE on a PTY read by the bare event-loop reader, same run",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "results": results,
        "late_join": measured["late_join"],
    }

    with capsys.disabled():
        print()
        print(
            f"{'cat ' + str(FILE_BYTES // 2**20) + ' MiB':<20}{'MB/s':>8}{'slowdown':>10}"
            f"{'vs PTY':>8}{'CPU s/GiB':>11}{'skipped MB':>12}{'resyncs':>9}"
        )
        for label, row in results.items():
            print(
                f"{label:<20}{row['MB_per_s']:>8.1f}{row['slowdown_vs_0_viewers']:>+10.1%}"
                f"{row['ratio_to_bare_pty']:>8.2f}{row['cpu_s_per_GiB']:>11.1f}"
                f"{row['screen_skipped_MB']:>12.1f}{row['viewer_resyncs']:>9.0f}"
            )
        print(f"{'late join':<20}{'median ms':>10}{'max ms':>10}")
        for label, row in measured["late_join"].items():
            print(f"{label:<20}{row['median_ms']:>10.2f}{row['max_ms']:>10.2f}")

    write_report(report, "terminal.json")

    # Every byte went through the host, and fast viewers kept up (no resyncs).
    for label, rounds in measured["rounds"].items():
        assert all(r["bytes"] >= FILE_BYTES for r in rounds), label
    for row in measured["late_join"].values():
        assert row["samples"] > 0
    ten = results["host, 10 viewers"]["slowdown_vs_0_viewers"]
    assert ten <= 0.20, f"10 viewers slow cat by {ten:.0%} > 20 %"
    slow_joins = {
        label: row["median_ms"]
        for label, row in measured["late_join"].items()
        if row["median_ms"] > 200
    }
    assert not slow_joins, f"late join over 200 ms: {slow_joins}"
