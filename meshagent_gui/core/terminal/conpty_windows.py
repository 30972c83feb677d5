"""The Windows PTY: a ConPTY pseudo console through pywinpty's ``winpty.PTY``.

A ConPTY has no descriptor an event loop can watch, so three threads do the blocking calls and
hand results to the loop with ``call_soon_threadsafe``: a reader (``PTY.read(blocking=True)``,
paused by a flag, and held back while the loop has not taken what it read), a writer (a queue:
``PTY.write`` may block while the program does not read) and an exit watcher (``isalive``
polled; ConPTY keeps its output pipe open after the command exits, so the watcher also cancels
the reader's blocked read once the last output had time to arrive).

pywinpty cannot be installed on Linux: this module imports it lazily, and the tests drive
:class:`ConPty` with a fake ``PTY`` object (:class:`WinptyPty` is the part of its API we use).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import importlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from queue import SimpleQueue
from typing import Final, Protocol

from meshagent_gui.core.protocol.terminal import check_size
from meshagent_gui.core.terminal.pty import READ_BUDGET, ExitStatus, PtyClosed

READ_SIZE: Final = 64 * 1024
POLL_INTERVAL: Final = 0.05
MAX_UNDELIVERED: Final = 4 * READ_BUDGET
"""Output the reader may hold ahead of the event loop before it stops reading."""


class WinptyPty(Protocol):
    """What we use of ``winpty.PTY`` (pywinpty >= 2)."""

    @property
    def pid(self) -> int | None: ...

    def spawn(
        self,
        appname: str,
        cmdline: str | None = None,
        cwd: str | None = None,
        env: str | None = None,
    ) -> bool: ...

    def read(self, length: int = ..., blocking: bool = ...) -> str: ...

    def write(self, to_write: str) -> int: ...

    def set_size(self, cols: int, rows: int) -> None: ...

    def isalive(self) -> bool: ...

    def get_exitstatus(self) -> int | None: ...

    def iseof(self) -> bool: ...

    def cancel_io(self) -> bool: ...


PtyFactory = Callable[[int, int], WinptyPty]
"""``(cols, rows) -> a new, not yet spawned PTY``."""


def winpty_factory() -> PtyFactory:
    winpty = importlib.import_module("winpty")
    conpty = importlib.import_module("winpty.enums").Backend.ConPTY

    def make(cols: int, rows: int) -> WinptyPty:
        pty: WinptyPty = winpty.PTY(cols, rows, backend=conpty)
        return pty

    return make


def _terminate_process(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, OSError):
        os.kill(pid, signal.SIGTERM)  # TerminateProcess on Windows


def environment_block(env: Mapping[str, str]) -> str:
    """The ``KEY=value\\0...\\0`` block CreateProcess takes."""
    return "".join(f"{key}={value}\0" for key, value in env.items()) + "\0"


class ConPty:
    """A command on a Windows pseudo console (see :class:`~meshagent_gui.core.terminal.pty.Pty`)."""

    def __init__(
        self,
        pty: WinptyPty,
        cols: int,
        rows: int,
        *,
        terminate_process: Callable[[int], None] = _terminate_process,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self._pty = pty
        self._size = (cols, rows)
        self._terminate_process = terminate_process
        self._poll = poll_interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_output: Callable[[bytes], None] | None = None
        self._on_eof: Callable[[], None] | None = None
        self._closed = threading.Event()
        self._unpaused = threading.Event()
        self._unpaused.set()
        self._flow = threading.Condition()
        self._undelivered = 0
        self._eof_sent = False
        self._writes: SimpleQueue[str | None] = SimpleQueue()
        self._write_lock = threading.Lock()
        self._write_pending = 0
        self._encoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._status: ExitStatus | None = None
        self._exited: asyncio.Future[ExitStatus] | None = None
        self.threads: list[threading.Thread] = []

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        cols: int = 80,
        rows: int = 24,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        factory: PtyFactory | None = None,
        terminate_process: Callable[[int], None] = _terminate_process,
        poll_interval: float = POLL_INTERVAL,
    ) -> ConPty:
        check_size(cols, rows)
        environment = dict(os.environ if env is None else env)
        command = shutil.which(argv[0], path=environment.get("PATH")) or argv[0]
        cmdline = subprocess.list2cmdline(argv[1:]) if len(argv) > 1 else None
        pty = (factory or winpty_factory())(cols, rows)
        spawned = pty.spawn(
            command,
            cmdline=f" {cmdline}" if cmdline else None,  # as pywinpty's PtyProcess does
            cwd=cwd or os.getcwd(),
            env=environment_block(environment),
        )
        if not spawned:
            raise OSError(f"could not start {argv[0]!r} on a pseudo console")
        return cls(
            pty, cols, rows, terminate_process=terminate_process, poll_interval=poll_interval
        )

    @property
    def pid(self) -> int:
        return int(self._pty.pid or 0)

    @property
    def size(self) -> tuple[int, int]:
        return self._size

    @property
    def write_buffer_size(self) -> int:
        with self._write_lock:
            return self._write_pending

    # ------------------------------------------------------------ reading

    def start(self, on_output: Callable[[bytes], None], on_eof: Callable[[], None]) -> None:
        if self._on_output is not None:
            raise RuntimeError("already started")
        self._loop = asyncio.get_running_loop()
        self._on_output, self._on_eof = on_output, on_eof
        for target, name in (
            (self._read_loop, "conpty-reader"),
            (self._write_loop, "conpty-writer"),
            (self._watch_loop, "conpty-exit"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            self.threads.append(thread)
            thread.start()

    def pause_reading(self) -> None:
        self._unpaused.clear()

    def resume_reading(self) -> None:
        self._unpaused.set()

    def _read_loop(self) -> None:
        while not self._closed.is_set():
            self._unpaused.wait()
            with self._flow:  # the loop has not taken enough of what we read: wait for it
                self._flow.wait_for(
                    lambda: self._undelivered < MAX_UNDELIVERED or self._closed.is_set()
                )
            if self._closed.is_set():
                break
            try:
                text = self._pty.read(READ_SIZE, blocking=True)
            except Exception:  # pywinpty raises on end of file and on a cancelled read
                break
            if not text:
                if self._pty.iseof() or not self._pty.isalive():
                    break
                time.sleep(self._poll)
                continue
            data = text.encode("utf-8", "surrogatepass")
            with self._flow:
                self._undelivered += len(data)
            self._call(self._deliver, data)
        self._call(self._deliver_eof)

    def _deliver(self, data: bytes) -> None:
        with self._flow:
            self._undelivered -= len(data)
            self._flow.notify_all()
        if self._on_output is not None and not self._closed.is_set():
            self._on_output(data)

    def _deliver_eof(self) -> None:
        if not self._eof_sent:
            self._eof_sent = True
            if self._on_eof is not None:
                self._on_eof()

    def _call(self, callback: Callable[..., None], *args: object) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                self._loop.call_soon_threadsafe(callback, *args)

    # ------------------------------------------------------------ writing

    def write(self, data: bytes) -> None:
        if self._closed.is_set():
            raise PtyClosed("the pseudo console is closed")
        text = self._encoder.decode(data)  # a character split between two writes waits
        if text:
            with self._write_lock:
                self._write_pending += len(data)
            self._writes.put(text)

    def _write_loop(self) -> None:
        while (text := self._writes.get()) is not None:
            # The command is gone: what it did not read is dropped.
            with contextlib.suppress(Exception):
                self._pty.write(text)
            with self._write_lock:
                self._write_pending = max(0, self._write_pending - len(text.encode("utf-8")))

    def resize(self, cols: int, rows: int) -> None:
        check_size(cols, rows)
        if self._closed.is_set():
            raise PtyClosed("the pseudo console is closed")
        self._pty.set_size(cols, rows)
        self._size = (cols, rows)

    # ------------------------------------------------------------ the process

    def _watch_loop(self) -> None:
        while self._pty.isalive():
            if self._closed.wait(self._poll):
                break
        status = ExitStatus(code=self._pty.get_exitstatus())
        self._call(self._exit, status)
        # ConPTY keeps the output pipe open after the command exits: give the last output a
        # moment, then unblock the reader.
        if not self._closed.wait(self._poll * 4):
            with contextlib.suppress(Exception):
                self._pty.cancel_io()

    def _exit(self, status: ExitStatus) -> None:
        if self._status is None:
            self._status = status
            if self._exited is not None and not self._exited.done():
                self._exited.set_result(status)

    async def wait(self) -> ExitStatus:
        if self._status is not None:
            return self._status
        if self._exited is None:
            self._exited = asyncio.get_running_loop().create_future()
            if self._on_output is None:  # not started: nothing watches the process yet
                self._loop = asyncio.get_running_loop()
                thread = threading.Thread(target=self._watch_loop, name="conpty-exit", daemon=True)
                self.threads.append(thread)
                thread.start()
        return await asyncio.shield(self._exited)

    def terminate(self, *, force: bool = False) -> None:
        if self._status is None and self._pty.isalive():
            self._terminate_process(self.pid)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._unpaused.set()
        with self._flow:
            self._flow.notify_all()
        self._writes.put(None)
        if self._pty.isalive():
            self._terminate_process(self.pid)
        with contextlib.suppress(Exception):
            self._pty.cancel_io()
