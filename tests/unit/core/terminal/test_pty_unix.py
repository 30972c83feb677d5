"""The Unix PTY against real commands: output, input, resize, exit status, hang-up."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator

import pytest

from meshagent_gui.core.terminal.pty import ExitStatus, PtyClosed
from meshagent_gui.core.terminal.pty_unix import UnixPty
from meshagent_gui.core.terminal.spawn import child_environment, default_command, spawn_pty

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="Unix PTYs")

TIMEOUT = 10


class Collected:
    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = asyncio.Event()
        self.changed = asyncio.Event()

    def output(self, data: bytes) -> None:
        self.data += data
        self.changed.set()

    async def until(self, needle: bytes) -> None:
        async with asyncio.timeout(TIMEOUT):
            while needle not in self.data:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def started() -> AsyncIterator[tuple[list[UnixPty], Collected]]:
    ptys: list[UnixPty] = []
    collected = Collected()
    yield ptys, collected
    for pty in ptys:
        pty.terminate(force=True)
        pty.close()
        async with asyncio.timeout(TIMEOUT):
            await pty.wait()


def start(
    ptys: list[UnixPty], collected: Collected, argv: list[str], cols: int = 80, rows: int = 24
) -> UnixPty:
    pty = spawn_pty(argv, cols=cols, rows=rows)
    assert isinstance(pty, UnixPty)
    ptys.append(pty)
    pty.start(collected.output, collected.eof.set)
    return pty


async def test_output_input_and_exit_code(started: tuple[list[UnixPty], Collected]) -> None:
    ptys, out = started
    pty = start(ptys, out, ["sh", "-c", "echo hi; read x; echo got $x; exit 7"])
    await out.until(b"hi")
    pty.write(b"there\n")
    await out.until(b"got there")
    async with asyncio.timeout(TIMEOUT):
        assert await pty.wait() == ExitStatus(code=7)
        await out.eof.wait()
    assert ExitStatus(code=7).returncode == 7


async def test_resize_reaches_the_program(started: tuple[list[UnixPty], Collected]) -> None:
    ptys, out = started
    pty = start(ptys, out, ["sh", "-c", "stty size; read x; stty size"], cols=100, rows=30)
    await out.until(b"30 100")
    pty.resize(120, 40)
    assert pty.size == (120, 40)
    pty.write(b"\n")
    await out.until(b"40 120")


async def test_a_signal_death_is_reported_as_the_signal(
    started: tuple[list[UnixPty], Collected],
) -> None:
    ptys, out = started
    pty = start(ptys, out, ["sh", "-c", "echo ready; sleep 30"])
    await out.until(b"ready")
    pty.terminate()  # SIGHUP, as a closing terminal
    async with asyncio.timeout(TIMEOUT):
        status = await pty.wait()
    assert status == ExitStatus(signal=signal.SIGHUP)
    assert status.returncode == 128 + signal.SIGHUP


async def test_close_hangs_up_and_refuses_more_writes(
    started: tuple[list[UnixPty], Collected],
) -> None:
    ptys, out = started
    pty = start(ptys, out, ["sh", "-c", "echo ready; sleep 30"])
    await out.until(b"ready")
    pty.close()
    async with asyncio.timeout(TIMEOUT):
        status = await pty.wait()
    assert status.signal == signal.SIGHUP  # the kernel hung up the session
    with pytest.raises(PtyClosed):
        pty.write(b"x")
    with pytest.raises(PtyClosed):
        pty.resize(80, 24)


async def test_paused_reading_holds_output_until_resumed(
    started: tuple[list[UnixPty], Collected],
) -> None:
    ptys, out = started
    pty = start(ptys, out, ["sh", "-c", "read x; echo after-$x"])
    pty.pause_reading()
    pty.write(b"go\n")
    async with asyncio.timeout(TIMEOUT):
        await pty.wait()
    assert b"after-go" not in out.data
    pty.resume_reading()
    await out.until(b"after-go")


async def test_writes_the_program_does_not_read_are_buffered(
    started: tuple[list[UnixPty], Collected],
) -> None:
    ptys, out = started
    pty = start(ptys, out, ["sh", "-c", "echo ready; sleep 0.5; wc -c"])
    await out.until(b"ready")
    blob = b"y" * 200_000 + b"\n\x04"
    pty.write(blob)  # more than the PTY's input queue: the rest waits for the writer
    assert pty.write_buffer_size > 0
    pty.write(b"\x04")
    async with asyncio.timeout(TIMEOUT):
        await pty.wait()
    assert pty.write_buffer_size == 0


async def test_a_missing_command_fails_to_spawn() -> None:
    with pytest.raises(FileNotFoundError):
        spawn_pty(["/nonexistent/command"])


def test_default_command_and_environment() -> None:
    assert default_command({"SHELL": "/bin/zsh"}) == ["/bin/zsh"]
    assert default_command({})[0].startswith("/")
    env = child_environment({"PATH": os.defpath})
    assert env["TERM"] == "xterm-256color" and env["PATH"] == os.defpath
    assert child_environment({"TERM": "vt100"})["TERM"] == "vt100"
