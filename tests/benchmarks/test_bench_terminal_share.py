"""Terminal share through real agents: a reference server and three ``meshagent up``
processes on loopback (``host``, ``v1``, ``v2``, one user), consoles driven over the agents'
IPC exactly as ``meshagent terminal share|view`` drives them (without a terminal in between).

1. **Keystroke to echo.** The host shares ``stty raw -echo; exec cat``; a viewer in control
   sends one byte and waits for it to come back (viewer agent -> P2P -> host agent -> PTY ->
   cat -> back), ``ECHO_BLOCKS`` x ``ECHO_PER_BLOCK`` times, interleaved block by block with the
   same round trips through ``ssh -tt`` to a throwaway sshd on loopback running the same
   program. p50 / p99 and the ratios (asserted: p99 <= 5 ms; the ratio to ssh is reported).
   Rows that split the cost: the host's own console (IPC and the host agent, with the viewer
   still attached); the same program on a PTY read by this process; and the Python floor, one
   and two plain
   asyncio processes that only forward bytes (``_relay_floor.py``: the shapes of the host's
   console and of the viewer's path with nothing else an agent does).
2. **Late joiner.** The host shares ``vim`` on a file (80x24 and 200x50); a new viewer attaches:
   the time from the attach call to the ``screen`` event and to the snapshot's last byte (the
   control state follows it). Target <= 200 ms.
3. **Host slowdown.** ``cat`` of a 100 MiB mixed file in a shared shell with 0, 1 and 10 viewers
   attached over P2P (the viewers' streams alternate between ``v1`` and ``v2``): time from
   typing the command until the host's console sees the end marker, and the host agent's own
   CPU (psutil, not its children) until every viewer has seen the marker too. Reference: the
   same in an interactive ``ssh -tt`` shell. Target: 10 viewers slow the host by <= 20%.

Rounds are interleaved (ssh, 0, 1, 10 viewers, ssh, ...) and medians reported. Everything,
the driving process included, shares this machine's cores: read the figures with its load.

Run: ``pytest -m benchmark tests/benchmarks/test_bench_terminal_share.py -s``. With
``MESHAGENT_BENCH_OUT`` set, the figures are also written there as JSON (a file path, or an
existing directory that gets ``terminal_share.json``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from meshagent_gui.core.ipc import IpcStream
from tests.benchmarks._measure import print_uncaptured, write_report
from tests.benchmarks._support import percentile
from tests.benchmarks._terminal_support import (
    RAW_ECHO,
    WAIT,
    BarePty,
    MarkerWatch,
    RelayFloor,
    SshSession,
    absorb,
    attach_viewer,
    cancel,
    child_env,
    drain_forever,
    frame,
    joined,
    own_cpu_seconds,
    shared,
    until_event,
    until_output,
)
from tests.benchmarks._transfer_support import Sshd
from tests.benchmarks.test_bench_terminal import write_mixed_file
from tests.integration.harness import AgentHome, Server, wait_until

pytestmark = [
    pytest.mark.benchmark,
    pytest.mark.timeout(600),
    pytest.mark.skipif(sys.platform == "win32", reason="Unix PTYs and sshd"),
]

FILE_BYTES = int(os.environ.get("MESHAGENT_BENCH_TERMINAL_MB", "100")) * 1024 * 1024
ECHO_BLOCKS = 20
ECHO_PER_BLOCK = 100
ECHO_WARMUP = 20
LATE_JOINS = 12
LATE_JOIN_SIZES = ((80, 24), (200, 50))
CAT_ROUNDS = 3
VIEWER_COUNTS = (0, 1, 10)
SETTLE = 0.5
"""Pause after a round so that detaching viewers do not overlap the next one."""

Figures = dict[str, Any]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("bench-terminal-share")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def mesh(workdir: Path) -> Iterator[dict[str, AgentHome]]:
    """The reference server and the agents ``host``, ``v1`` and ``v2`` of one user, all up."""
    logs = workdir / "logs"
    logs.mkdir()
    server = Server(workdir / "server", logs).start()
    agents = {
        name: AgentHome(
            workdir / name,
            logs,
            name,
            config={"server.reconnect_max": "1", "device.name": name},
        )
        for name in ("host", "v1", "v2")
    }
    try:
        server.add_user("ann")
        codes = {name: server.join_code("ann") for name in agents}

        def start(name: str) -> None:
            agents[name].login(server, codes[name])
            agents[name].up()

        with ThreadPoolExecutor(len(agents)) as pool:  # Python start-ups: overlap them
            list(pool.map(start, agents))
        wait_until(lambda: agents["host"].online() >= {"v1", "v2"}, 15, "viewers online")
        yield agents
    finally:
        for agent in agents.values():
            agent.stop()
        server.stop()


@pytest.fixture(scope="module")
def sshd(workdir: Path) -> Iterator[Sshd | None]:
    if not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists()) or not shutil.which("ssh"):
        yield None
        return
    with Sshd.run(workdir / "sshd") as running:
        yield running


@pytest.fixture(scope="module")
def report(pytestconfig: pytest.Config) -> Iterator[Figures]:
    figures: Figures = {
        "benchmark": "terminal_share",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
    }
    yield figures
    figures["load_average_at_end"] = os.getloadavg()
    print_uncaptured(pytestconfig, "\n" + table(figures))
    write_report(figures, "terminal_share.json")


def table(figures: Figures) -> str:
    lines = [
        "Terminal share through real agents (loopback, same run); load average"
        f" {figures['load_average_at_start'][0]:.2f} -> {figures['load_average_at_end'][0]:.2f}"
        f" on {figures['cpus']} CPUs"
    ]
    if echo := figures.get("echo"):
        lines.append(f"{'keystroke -> echo':<28}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'n':>6}")
        for label, row in echo["rows"].items():
            lines.append(
                f"{label:<28}{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}"
                f"{row['max_ms']:>9.3f}{row['samples']:>6}"
            )
        if "p99_ratio_vs_ssh" in echo:
            p50, p99 = echo["p50_ratio_vs_ssh"], echo["p99_ratio_vs_ssh"]
            lines.append(f"{'viewer / ssh':<28}{p50:>9.2f}{p99:>9.2f}")
            p50, p99 = echo["floor_p50_ratio_vs_ssh"], echo["floor_p99_ratio_vs_ssh"]
            lines.append(f"{'2-relay floor / ssh':<28}{p50:>9.2f}{p99:>9.2f}")
    if late := figures.get("late_join"):
        lines.append(
            f"{'late join (vim)':<28}{'to screen':>11}{'to last byte':>14}{'max':>9}"
            f"{'bytes':>8}  (median ms)"
        )
        for label, row in late.items():
            lines.append(
                f"{label:<28}{row['to_screen_ms']:>11.1f}{row['to_last_byte_ms']:>14.1f}"
                f"{row['to_last_byte_max_ms']:>9.1f}{row['snapshot_bytes']:>8.0f}"
            )
    if cat := figures.get("cat"):
        lines.append(
            f"{'cat ' + str(cat['file_MiB']) + ' MiB':<28}{'MB/s':>8}{'slowdown':>10}"
            f"{'host CPU s/GiB':>16}{'viewers done s':>16}{'screens':>9}"
        )
        for label, row in cat["rows"].items():
            cpu = f"{row['host_cpu_s_per_GiB']:.2f}" if label.startswith("host") else "-"
            lines.append(
                f"{label:<28}{row['MB_per_s']:>8.1f}{row['slowdown_vs_0_viewers']:>+10.1%}"
                f"{cpu:>16}{row['viewers_done_s']:>16.2f}{row['screens_per_viewer']:>9.1f}"
            )
    return "\n".join(lines)


def _summary_ms(samples: list[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(samples, 50) * 1000,
        "p99_ms": percentile(samples, 99) * 1000,
        "max_ms": max(samples) * 1000,
        "mean_ms": statistics.fmean(samples) * 1000,
        "samples": len(samples),
    }


# ---------------------------------------------------------------------------- 1. echo


Echoer = IpcStream | SshSession | BarePty | RelayFloor
VIEWER_ROW = "meshagent: viewer in control"
HOST_ROW = "meshagent: host's own console"
SSH_ROW = "ssh -tt localhost"
PTY_ROW = "bare PTY (in-process reader)"
FLOOR_ONE_ROW = "floor: 1 bare Python relay"
FLOOR_TWO_ROW = "floor: 2 bare relays, UDP"
"""What Python processes that only forward bytes cost (no QUIC, no framing, no tasks): one
like the host's own console, two like the viewer's path. Both are in the same shape as the
rows above them, so they show how much of each is Python itself and how much is the agent."""


async def _echoes(echoer: Echoer, count: int, first: int) -> list[float]:
    """``count`` one-byte round trips: send a key, wait until it comes back."""
    times: list[float] = []
    for i in range(first, first + count):
        key = bytes([ord("a") + i % 26])
        started = time.perf_counter()
        if isinstance(echoer, IpcStream):
            echoer.write_data(key)
            while not isinstance(got := await frame(echoer), bytes):
                pass  # JSON frames (events) are not the echo
        else:
            echoer.write(key)
            got = await echoer.read()
        times.append(time.perf_counter() - started)
        assert got == key, f"sent {key!r}, the echo was {got!r}"
    return times


async def _echo_block(
    echoer: Echoer, count: int, first: int, *, also_sees: IpcStream | None = None
) -> list[float]:
    """Echoes through one party while the other console of the session (which sees the same
    output) is read alongside, so that it holds nothing stale for its own turn."""
    if also_sees is None:
        return await _echoes(echoer, count, first)
    seeing = asyncio.create_task(absorb(also_sees, count))
    try:
        return await _echoes(echoer, count, first)
    finally:
        async with asyncio.timeout(WAIT):
            await seeing


async def measure_echo(
    host: Path, viewer: Path, sshd: Sshd | None, workdir: Path
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {
        VIEWER_ROW: [],
        HOST_ROW: [],
        PTY_ROW: [],
        FLOOR_ONE_ROW: [],
        FLOOR_TWO_ROW: [],
    }
    if sshd is not None:
        samples[SSH_ROW] = []
    async with (
        shared(host, ["sh", "-c", RAW_ECHO], size=(80, 24), env=child_env()) as (console, sid),
        contextlib.AsyncExitStack() as stack,
    ):
        await until_output(console, b"READY")
        stream = await attach_viewer(viewer, sid, control=True)
        stack.push_async_callback(stream.aclose)
        await until_event(stream, "control", you=True)
        bare = BarePty(["sh", "-c", RAW_ECHO])
        stack.push_async_callback(bare.aclose)
        await bare.until_output(b"READY")
        one = await stack.enter_async_context(RelayFloor.open(workdir, relays=1))
        two = await stack.enter_async_context(RelayFloor.open(workdir, relays=2))
        echoers: dict[str, tuple[Echoer, IpcStream | None]] = {
            PTY_ROW: (bare, None),
            FLOOR_ONE_ROW: (one, None),
            FLOOR_TWO_ROW: (two, None),
            HOST_ROW: (console, stream),
            VIEWER_ROW: (stream, console),
        }
        if sshd is not None:
            ssh = await stack.enter_async_context(SshSession.open(sshd, RAW_ECHO))
            await ssh.until_output(b"READY")
            echoers[SSH_ROW] = (ssh, None)
        for echoer, other in echoers.values():
            await _echo_block(echoer, ECHO_WARMUP, 0, also_sees=other)
        for block in range(ECHO_BLOCKS):
            first = block * ECHO_PER_BLOCK
            for label, (echoer, other) in echoers.items():
                samples[label] += await _echo_block(echoer, ECHO_PER_BLOCK, first, also_sees=other)
    return samples


def test_keystroke_echo_latency_against_ssh(
    mesh: dict[str, AgentHome], sshd: Sshd | None, report: Figures, workdir: Path
) -> None:
    samples = asyncio.run(measure_echo(mesh["host"].home, mesh["v1"].home, sshd, workdir))
    rows = {label: _summary_ms(values) for label, values in samples.items()}
    echo: Figures = {"rows": rows}
    ours = rows[VIEWER_ROW]
    if (ssh := rows.get(SSH_ROW)) is not None:
        echo["p50_ratio_vs_ssh"] = ours["p50_ms"] / ssh["p50_ms"]
        echo["p99_ratio_vs_ssh"] = ours["p99_ms"] / ssh["p99_ms"]
        floor = rows[FLOOR_TWO_ROW]
        echo["floor_p50_ratio_vs_ssh"] = floor["p50_ms"] / ssh["p50_ms"]
        echo["floor_p99_ratio_vs_ssh"] = floor["p99_ms"] / ssh["p99_ms"]
    else:
        echo["note"] = "ssh baseline skipped: openssh-server/openssh-client not installed"
    report["echo"] = echo
    assert ours["samples"] >= 500
    # The ratio to ssh is reported: two Python processes cannot reach 1.0x (README, "Why the
    # echo cannot reach 1.0x ssh"); the bound a typist feels is asserted.
    assert ours["p99_ms"] <= 5.0, f"echo p99 {ours['p99_ms']:.2f} ms > 5 ms"


# ---------------------------------------------------------------------------- 2. late join


def write_notes(path: Path) -> None:
    path.write_text("".join(f"line {i} of the notes, for a late joiner\n" for i in range(1, 400)))


async def _late_join(viewer: Path, sid: str, size: tuple[int, int]) -> dict[str, float]:
    started = time.perf_counter()
    stream = await attach_viewer(viewer, sid, control=False, size=size)
    try:
        attached = time.perf_counter()
        await until_event(stream, "screen")
        screen_at = time.perf_counter()
        last_byte = screen_at
        snapshot = bytearray()
        while True:  # the snapshot's bytes, then the control state
            got = await frame(stream)
            if isinstance(got, bytes):
                snapshot += got
                last_byte = time.perf_counter()
            elif got.get("event") == "control":
                break
    finally:
        await stream.aclose()
    assert b"line 1 of the notes" in snapshot and b"notes.txt" in snapshot, bytes(snapshot[:400])
    return {
        "attach_s": attached - started,
        "screen_s": screen_at - started,
        "last_byte_s": last_byte - started,
        "bytes": len(snapshot),
    }


async def measure_late_join(host: Path, viewer: Path, notes: Path) -> dict[str, list[Figures]]:
    joins: dict[str, list[Figures]] = {}
    for cols, rows in LATE_JOIN_SIZES:
        command = ["vim", "-u", "NONE", "-N", "-c", "set number", str(notes)]
        async with shared(host, command, size=(cols, rows), env=child_env()) as (console, sid):
            await until_output(console, b"notes.txt")
            watching = [MarkerWatch(b"\x00never")]
            draining = asyncio.create_task(drain_forever(console, watching))
            try:
                await asyncio.sleep(SETTLE)  # vim has drawn its screen
                await _late_join(viewer, sid, (cols, rows))  # warm: P2P session and paths
                joins[f"vim {cols}x{rows}"] = [
                    await _late_join(viewer, sid, (cols, rows)) for _ in range(LATE_JOINS)
                ]
            finally:
                await cancel(draining)
    return joins


def test_late_joiner_gets_the_screen(
    mesh: dict[str, AgentHome], workdir: Path, report: Figures
) -> None:
    if shutil.which("vim") is None:
        pytest.skip("needs vim")
    notes = workdir / "notes.txt"
    write_notes(notes)
    joins = asyncio.run(measure_late_join(mesh["host"].home, mesh["v2"].home, notes))
    late: Figures = {}
    for label, samples in joins.items():
        last = sorted(s["last_byte_s"] for s in samples)
        late[label] = {
            "attach_ms": statistics.median(s["attach_s"] for s in samples) * 1000,
            "to_screen_ms": statistics.median(s["screen_s"] for s in samples) * 1000,
            "to_last_byte_ms": statistics.median(last) * 1000,
            "to_last_byte_max_ms": last[-1] * 1000,
            "snapshot_bytes": statistics.median(s["bytes"] for s in samples),
            "samples": len(samples),
        }
    report["late_join"] = late
    assert all(row["samples"] == LATE_JOINS for row in late.values())
    slow = {k: row["to_last_byte_ms"] for k, row in late.items() if row["to_last_byte_ms"] > 200}
    assert not slow, f"late join to the last snapshot byte over 200 ms (median): {slow}"


# ---------------------------------------------------------------------------- 3. cat


async def _watch_viewer(stream: IpcStream, watch: MarkerWatch) -> int:
    """Read a viewer's console until the marker shows; returns the screens it was sent."""
    screens = 0
    while watch.seen_at is None:
        got = await frame(stream)
        if isinstance(got, bytes):
            watch.feed(got)
        elif got.get("event") == "screen":
            screens += 1
            watch.feed(b"\r\n")  # a snapshot is not a continuation of the output before it
    return screens


async def _cat_round(
    console: IpcStream,
    host_watch: list[MarkerWatch],
    host_pid: int,
    viewer_homes: list[Path],
    viewer_pids: list[int],
    sid: str,
    path: Path,
    count: int,
    number: int,
) -> Figures:
    streams = [
        await attach_viewer(viewer_homes[i % len(viewer_homes)], sid, control=False)
        for i in range(count)
    ]
    try:
        await asyncio.gather(*(joined(s) for s in streams))
        marker = f"END-{number + 1}-MARK".encode()
        host_watch[:] = [MarkerWatch(marker)]
        watches = [MarkerWatch(marker) for _ in streams]
        readers = [
            asyncio.create_task(_watch_viewer(s, w)) for s, w in zip(streams, watches, strict=True)
        ]
        host_cpu = own_cpu_seconds(host_pid)
        viewers_cpu = sum(own_cpu_seconds(pid) for pid in viewer_pids)
        driver_cpu = _driver_cpu()
        started = time.perf_counter()
        console.write_data(f"cat {path}; echo END-$(({number} + 1))-MARK\n".encode())
        async with asyncio.timeout(300):
            await host_watch[0].found.wait()
            screens = await asyncio.gather(*readers)
        done = time.perf_counter()
        host_seen = host_watch[0].seen_at
        assert host_seen is not None
        return {
            "seconds": host_seen - started,
            "viewers_done_s": done - started,
            "host_cpu": own_cpu_seconds(host_pid) - host_cpu,
            "viewer_agents_cpu": sum(own_cpu_seconds(pid) for pid in viewer_pids) - viewers_cpu,
            "driver_cpu": _driver_cpu() - driver_cpu,
            "screens_per_viewer": statistics.fmean(screens) if screens else 0.0,
        }
    finally:
        for stream in streams:
            await stream.aclose()
        await asyncio.sleep(SETTLE)


def _driver_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _ssh_cat(sshd: Sshd, path: Path, number: int) -> Figures:
    async with SshSession.open(sshd, "env PS1='$ ' sh -i") as ssh:
        await ssh.until_output(b"$ ")
        marker = MarkerWatch(f"END-{number + 1}-MARK".encode())
        driver_cpu = _driver_cpu()
        started = time.perf_counter()
        ssh.write(f"cat {path}; echo END-$(({number} + 1))-MARK\n".encode())
        while marker.seen_at is None:
            marker.feed(await ssh.read())
        return {
            "seconds": marker.seen_at - started,
            "viewers_done_s": marker.seen_at - started,
            "host_cpu": 0.0,  # no agent: shown as "-"
            "viewer_agents_cpu": 0.0,
            "driver_cpu": _driver_cpu() - driver_cpu,
            "screens_per_viewer": 0.0,
        }


async def measure_cat(
    mesh: dict[str, AgentHome], sshd: Sshd | None, path: Path
) -> dict[str, list[Figures]]:
    host = mesh["host"]
    assert host.process is not None
    viewer_homes = [mesh["v1"].home, mesh["v2"].home]
    viewer_pids = [a.process.proc.pid for a in (mesh["v1"], mesh["v2"]) if a.process]
    rounds: dict[str, list[Figures]] = {}
    if sshd is not None:
        rounds["ssh -tt localhost (ref.)"] = []
    for count in VIEWER_COUNTS:
        rounds[f"host, {count} viewers"] = []
    async with shared(host.home, ["sh"], size=(80, 24), env=child_env()) as (console, sid):
        await until_output(console, b"$ ")
        host_watch: list[MarkerWatch] = []
        draining = asyncio.create_task(drain_forever(console, host_watch))
        try:
            number = 0
            for _ in range(CAT_ROUNDS):
                if sshd is not None:
                    rounds["ssh -tt localhost (ref.)"].append(await _ssh_cat(sshd, path, number))
                    number += 1
                for count in VIEWER_COUNTS:
                    rounds[f"host, {count} viewers"].append(
                        await _cat_round(
                            console,
                            host_watch,
                            host.process.proc.pid,
                            viewer_homes,
                            viewer_pids,
                            sid,
                            path,
                            count,
                            number,
                        )
                    )
                    number += 1
        finally:
            await cancel(draining)
    return rounds


def test_host_slowdown_with_real_viewers(
    mesh: dict[str, AgentHome], sshd: Sshd | None, workdir: Path, report: Figures
) -> None:
    path = workdir / "mixed.txt"
    write_mixed_file(path, FILE_BYTES)
    rounds = asyncio.run(measure_cat(mesh, sshd, path))
    path.unlink()

    def median(label: str, key: str) -> float:
        return float(statistics.median(r[key] for r in rounds[label]))

    zero = median("host, 0 viewers", "seconds")
    gib = FILE_BYTES / 2**30
    rows: dict[str, Figures] = {}
    for label in rounds:
        seconds = median(label, "seconds")
        rows[label] = {
            "MB_per_s": FILE_BYTES / seconds / 1e6,
            "seconds": seconds,
            "seconds_each_round": [r["seconds"] for r in rounds[label]],
            "slowdown_vs_0_viewers": seconds / zero - 1,
            "host_cpu_s_per_GiB": median(label, "host_cpu") / gib,
            "viewer_agents_cpu_s_per_GiB": median(label, "viewer_agents_cpu") / gib,
            "driver_cpu_s_per_GiB": median(label, "driver_cpu") / gib,
            "viewers_done_s": median(label, "viewers_done_s"),
            "screens_per_viewer": median(label, "screens_per_viewer"),
        }
    report["cat"] = {"file_MiB": FILE_BYTES // 2**20, "rounds": CAT_ROUNDS, "rows": rows}
    host_process = mesh["host"].process
    assert host_process is not None
    report["host_agent_rss_MB"] = psutil.Process(host_process.proc.pid).memory_info().rss / 1e6
    assert all(len(r) == CAT_ROUNDS for r in rounds.values())
    ten = rows["host, 10 viewers"]["slowdown_vs_0_viewers"]
    assert ten <= 0.20, f"10 viewers slow cat by {ten:.0%} > 20 %"
