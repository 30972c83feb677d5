"""Drivers for the terminal-share benchmark through real agents (test_bench_terminal_share.py).

Consoles are driven the way ``meshagent terminal share|view`` drives them: an attached IPC
stream to the agent (raw byte frames are keystrokes and output, JSON frames events), only with
no terminal in between. ssh baselines run ``ssh -tt`` through pipes against the throwaway sshd
of ``_transfer_support``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psutil

from meshagent_gui.config import Paths
from meshagent_gui.core import ipc
from meshagent_gui.core.ipc import IpcStream, IpcStreamClosed
from meshagent_gui.core.terminal.spawn import spawn_pty
from tests.benchmarks._transfer_support import LOOPBACK, Sshd

WAIT: Final = 60.0
"""Bound on any single wait for a frame, a prompt or a marker."""
SHELL_ENV: Final = {"PS1": "$ ", "HISTFILE": "/dev/null", "TERM": "xterm-256color"}
RAW_ECHO: Final = "stty raw -echo; printf READY; exec cat"
"""The shared program of the echo test: the PTY in raw mode, every byte straight back."""


def ipc_path(home: Path) -> Path:
    return Paths.resolve(home).ipc_path


def own_cpu_seconds(pid: int) -> float:
    """User + system CPU of one process, not of its children (the PTY's command, say)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, **SHELL_ENV, **extra}


@dataclass
class MarkerWatch:
    """Finds ``marker`` in a byte stream fed in pieces (it may straddle two pieces)."""

    marker: bytes
    seen_at: float | None = None
    _tail: bytes = b""
    found: asyncio.Event = field(default_factory=asyncio.Event)

    def feed(self, data: bytes) -> None:
        if self.seen_at is not None:
            return
        keep = len(self.marker) - 1
        if self.marker in data or self.marker in self._tail + data[:keep]:
            self.seen_at = time.perf_counter()
            self.found.set()
            return
        self._tail = (self._tail + data[-keep:])[-keep:]


async def frame(stream: IpcStream, timeout: float = WAIT) -> bytes | dict[str, Any]:
    async with asyncio.timeout(timeout):
        return await stream.receive()


async def until_event(stream: IpcStream, event: str, **match: Any) -> dict[str, Any]:
    """Read frames until a JSON event ``event`` whose fields include ``match``."""
    while True:
        got = await frame(stream)
        if (
            isinstance(got, dict)
            and got.get("event") == event
            and all(got.get(k) == v for k, v in match.items())
        ):
            return got


async def until_output(stream: IpcStream, text: bytes) -> bytes:
    """Read frames until ``text`` has been output; returns everything read."""
    seen = bytearray()
    while text not in seen:
        got = await frame(stream)
        if isinstance(got, bytes):
            seen += got
    return bytes(seen)


@contextlib.asynccontextmanager
async def shared(
    host_home: Path, command: Sequence[str], *, size: tuple[int, int], env: dict[str, str]
) -> AsyncIterator[tuple[IpcStream, str]]:
    """A session shared by the host agent: its console stream and the session id. Leaving
    stops the session and waits for its end.

    The same request as ``ipc.attach("terminal.share", ...)``, opened by hand because the
    session id is in the agent's first frame, which ``attach`` keeps to itself.
    """
    request = {
        "id": 1,
        "method": "terminal.share",
        "params": {"command": list(command), "allow_control": True, "size": list(size), "env": env},
    }
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_unix_connection(str(ipc_path(host_home)))
    stream = IpcStream(reader, writer)
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        first = await frame(stream)
        if not isinstance(first, dict) or "ok" not in first:
            raise AssertionError(f"the host agent refused to share: {first!r}")
        yield stream, str(first["ok"]["session_id"])
    finally:
        stream.write_json({"stop": True})
        with contextlib.suppress(IpcStreamClosed, TimeoutError):
            async with asyncio.timeout(10):
                while True:
                    got = await stream.receive()
                    if isinstance(got, dict) and got.get("event") == "ended":
                        break
        await stream.aclose()


async def attach_viewer(
    viewer_home: Path,
    session_id: str,
    *,
    control: bool,
    size: tuple[int, int] = (80, 24),
) -> IpcStream:
    return await ipc.attach(
        ipc_path(viewer_home),
        "terminal.view",
        {"device": "host", "session": session_id, "control": control, "size": list(size)},
    )


async def joined(stream: IpcStream) -> None:
    """Until the first screen and the control state after it have arrived."""
    await until_event(stream, "screen")
    await until_event(stream, "control")


async def drain_forever(stream: IpcStream, watch: list[MarkerWatch]) -> None:
    """Read a console's frames until it closes, feeding output to the current marker watch."""
    with contextlib.suppress(IpcStreamClosed):
        while True:
            got = await stream.receive()
            if isinstance(got, bytes) and watch:
                watch[0].feed(got)


async def cancel(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it is gone (a stream may have one reader at a time)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def absorb(stream: IpcStream, count: int) -> None:
    """Read until ``count`` bytes of output have arrived (echoes another party caused)."""
    received = 0
    while received < count:
        got = await frame(stream)
        if isinstance(got, bytes):
            received += len(got)


class BarePty:
    """``command`` on a PTY read by the bare event-loop reader in this process: the floor under
    every echo (no agent, no IPC, no network)."""

    def __init__(self, command: Sequence[str]) -> None:
        self._pty = spawn_pty(list(command), cols=80, rows=24, env=child_env())
        self._output: asyncio.Queue[bytes] = asyncio.Queue()
        self._pty.start(self._output.put_nowait, lambda: None)

    def write(self, data: bytes) -> None:
        self._pty.write(data)

    async def read(self) -> bytes:
        async with asyncio.timeout(WAIT):
            return await self._output.get()

    async def until_output(self, text: bytes) -> None:
        seen = bytearray()
        while text not in seen:
            seen += await self.read()

    async def aclose(self) -> None:
        self._pty.terminate(force=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await self._pty.wait()
        self._pty.close()


# ---------------------------------------------------------------------------- ssh


@dataclass
class SshSession:
    """``ssh -tt`` to the throwaway sshd running ``command``, driven through pipes."""

    process: asyncio.subprocess.Process

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, sshd: Sshd, command: str) -> AsyncIterator[SshSession]:
        user = os.environ.get("USER") or "root"
        process = await asyncio.create_subprocess_exec(
            "ssh",
            "-tt",
            *sshd.ssh_options(),
            "-o",
            "SendEnv=no",
            "-p",
            str(sshd.port),
            f"{user}@{LOOPBACK}",
            command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=child_env(),
        )
        try:
            yield cls(process)
        finally:
            if process.returncode is None:
                process.kill()
            assert process.stdin is not None
            process.stdin.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await process.wait()

    def write(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)

    async def read(self) -> bytes:
        assert self.process.stdout is not None
        async with asyncio.timeout(WAIT):
            data = await self.process.stdout.read(1 << 20)
        if not data:
            raise IpcStreamClosed("ssh exited")
        return data

    async def until_output(self, text: bytes) -> None:
        seen = bytearray()
        while text not in seen:
            seen += await self.read()


# ---------------------------------------------------------------------------- the Python floor


@dataclass
class RelayFloor:
    """One or two plain asyncio relays (``_relay_floor.py``) between this process and a raw
    ``cat`` on a PTY: what Python processes that only forward bytes cost an echo, with no
    encryption, framing, tasks or anything else an agent does."""

    processes: list[asyncio.subprocess.Process]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, workdir: Path, *, relays: int) -> AsyncIterator[RelayFloor]:
        script = str(Path(__file__).with_name("_relay_floor.py"))
        socket = str(workdir / f"floor-{relays}.sock")
        processes: list[asyncio.subprocess.Process] = []

        async def start(*args: str) -> list[str]:
            process = await asyncio.create_subprocess_exec(
                sys.executable, script, *args, stdout=asyncio.subprocess.PIPE, env=child_env()
            )
            processes.append(process)
            assert process.stdout is not None
            async with asyncio.timeout(WAIT):
                words = (await process.stdout.readline()).decode().split()
            if words[:1] != ["READY"]:
                raise RuntimeError(f"_relay_floor.py {' '.join(args)} did not start")
            return words[1:]

        try:
            if relays == 1:
                await start("pty", socket)
            else:
                [port] = await start("udp-pty")
                await start("socket-udp", socket, port)
            reader, writer = await asyncio.open_unix_connection(socket)
            yield cls(processes, reader, writer)
            writer.close()
        finally:
            for process in processes:
                if process.returncode is None:
                    process.kill()
                await process.wait()

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def read(self) -> bytes:
        async with asyncio.timeout(WAIT):
            data = await self.reader.read(1 << 16)
        if not data:
            raise IpcStreamClosed("the relay closed")
        return data
