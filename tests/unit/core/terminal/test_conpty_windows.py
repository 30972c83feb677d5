"""The ConPTY path, driven against a fake ``winpty.PTY`` (pywinpty cannot install here)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest

from meshagent_gui.core.terminal.conpty_windows import ConPty, environment_block
from meshagent_gui.core.terminal.pty import ExitStatus, PtyClosed

TIMEOUT = 10


class FakeWinpty:
    """Behaves like pywinpty's PTY: blocking str reads, str writes, polled liveness."""

    def __init__(self, cols: int, rows: int) -> None:
        self.size = (cols, rows)
        self.spawned: dict[str, object] = {}
        self.written: list[str] = []
        self._output: list[str] = []
        self._lock = threading.Condition()
        self._alive = True
        self._exit_code: int | None = None
        self._cancelled = False
        self.pid = 4242

    # the program's side
    def emit(self, text: str) -> None:
        with self._lock:
            self._output.append(text)
            self._lock.notify_all()

    def exit(self, code: int) -> None:
        with self._lock:
            self._alive, self._exit_code = False, code
            self._lock.notify_all()

    # winpty.PTY's API
    def spawn(
        self,
        appname: str,
        cmdline: str | None = None,
        cwd: str | None = None,
        env: str | None = None,
    ) -> bool:
        self.spawned = {"appname": appname, "cmdline": cmdline, "cwd": cwd, "env": env}
        return True

    def read(self, length: int = 1000, blocking: bool = False) -> str:
        with self._lock:
            # Like ConPTY, the pipe stays open after the exit until the read is cancelled.
            self._lock.wait_for(lambda: self._output or self._cancelled)
            if self._output:
                return self._output.pop(0)
            raise OSError("read cancelled")

    def write(self, to_write: str) -> int:
        if "\x1a" in to_write:  # Ctrl+Z: the fake program quits
            self.exit(0)
        self.written.append(to_write)
        return len(to_write)

    def set_size(self, cols: int, rows: int) -> None:
        self.size = (cols, rows)

    def isalive(self) -> bool:
        return self._alive

    def get_exitstatus(self) -> int | None:
        return self._exit_code

    def iseof(self) -> bool:
        return not self._alive and not self._output

    def cancel_io(self) -> bool:
        with self._lock:
            self._cancelled = True
            self._lock.notify_all()
        return True


class Harness:
    def __init__(self) -> None:
        self.fakes: list[FakeWinpty] = []
        self.killed: list[int] = []
        self.output = bytearray()
        self.eof = asyncio.Event()
        self.changed = asyncio.Event()

    def factory(self, cols: int, rows: int) -> FakeWinpty:
        fake = FakeWinpty(cols, rows)
        self.fakes.append(fake)
        return fake

    def kill(self, pid: int) -> None:
        self.killed.append(pid)
        self.fakes[-1].exit(1)

    def on_output(self, data: bytes) -> None:
        self.output += data
        self.changed.set()

    async def until(self, needle: bytes) -> None:
        async with asyncio.timeout(TIMEOUT):
            while needle not in self.output:
                self.changed.clear()
                await self.changed.wait()

    def spawn(self, argv: list[str]) -> ConPty:
        pty = ConPty.spawn(
            argv,
            cols=100,
            rows=30,
            cwd="C:\\work",
            env={"PATH": "", "TERM": "xterm-256color"},
            factory=self.factory,
            terminate_process=self.kill,
            poll_interval=0.01,
        )
        self.ptys.append(pty)
        return pty

    ptys: list[ConPty]


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    h.ptys = []
    yield h
    for pty in h.ptys:
        pty.close()
        for thread in pty.threads:
            await asyncio.to_thread(thread.join, TIMEOUT)
            assert not thread.is_alive(), f"{thread.name} did not end"


async def test_spawn_passes_command_line_directory_and_environment(harness: Harness) -> None:
    harness.spawn(["cmd.exe", "/c", "echo", "two words"])
    fake = harness.fakes[0]
    assert fake.size == (100, 30)
    assert fake.spawned["appname"] == "cmd.exe"
    assert fake.spawned["cmdline"] == ' /c echo "two words"'
    assert fake.spawned["cwd"] == "C:\\work"
    assert fake.spawned["env"] == "PATH=\0TERM=xterm-256color\0\0"
    assert environment_block({}) == "\0"


async def test_output_input_resize_and_exit(harness: Harness) -> None:
    pty = harness.spawn(["cmd.exe"])
    fake = harness.fakes[0]
    pty.start(harness.on_output, harness.eof.set)
    fake.emit("Microsoft Windows 漢字\r\n")
    await harness.until("漢字".encode())
    pty.write(b"dir\r")
    pty.write(b"\xe6\xbc")  # a character split between two writes is sent whole
    pty.write(b"\xa2\r")
    async with asyncio.timeout(TIMEOUT):
        while "".join(fake.written) != "dir\r漢\r":
            await asyncio.sleep(0.01)
    pty.resize(120, 40)
    assert fake.size == (120, 40) and pty.size == (120, 40)
    fake.emit("bye\r\n")
    fake.exit(3)
    async with asyncio.timeout(TIMEOUT):
        assert await pty.wait() == ExitStatus(code=3)
        await harness.eof.wait()  # the watcher cancelled the reader's blocked read
    assert b"bye" in harness.output
    assert pty.write_buffer_size == 0


async def test_reading_pauses_and_resumes(harness: Harness) -> None:
    pty = harness.spawn(["cmd.exe"])
    fake = harness.fakes[0]
    pty.pause_reading()
    pty.start(harness.on_output, harness.eof.set)
    fake.emit("held")
    await asyncio.sleep(0.1)
    assert harness.output == b""
    pty.resume_reading()
    await harness.until(b"held")


async def test_terminate_and_close(harness: Harness) -> None:
    pty = harness.spawn(["cmd.exe"])
    pty.start(harness.on_output, harness.eof.set)
    pty.terminate()
    assert harness.killed == [4242]
    async with asyncio.timeout(TIMEOUT):
        assert await pty.wait() == ExitStatus(code=1)
    pty.close()
    with pytest.raises(PtyClosed):
        pty.write(b"x")
    with pytest.raises(PtyClosed):
        pty.resize(80, 24)


async def test_wait_works_before_start(harness: Harness) -> None:
    pty = harness.spawn(["cmd.exe"])
    waiting = asyncio.create_task(pty.wait())
    await asyncio.sleep(0.05)
    harness.fakes[0].exit(0)
    async with asyncio.timeout(TIMEOUT):
        assert await waiting == ExitStatus(code=0)


async def test_a_failed_spawn_is_an_error() -> None:
    class Refusing(FakeWinpty):
        def spawn(self, *args: object, **kwargs: object) -> bool:
            return False

    with pytest.raises(OSError, match="could not start"):
        ConPty.spawn(["nope.exe"], factory=Refusing)
