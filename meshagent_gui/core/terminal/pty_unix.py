"""The Unix PTY: ptyprocess spawns, the event loop reads and writes the master fd.

Reads are greedy (everything readable, up to READ_BUDGET, becomes one output batch): Linux hands
out at most about 4 KiB per read of a PTY, and one callback per read would cost more than the
bytes. The exit status comes from a pidfd on Linux (no thread, cancellable), else from a
``waitpid`` in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import ptyprocess

from meshagent_gui.core.protocol.terminal import check_size
from meshagent_gui.core.terminal.pty import READ_BUDGET, ExitStatus, PtyClosed

READ_SIZE: Final = 64 * 1024


def _decode_status(status: int) -> ExitStatus:
    if os.WIFEXITED(status):
        return ExitStatus(code=os.WEXITSTATUS(status))
    if os.WIFSIGNALED(status):
        return ExitStatus(signal=os.WTERMSIG(status))
    return ExitStatus()


class UnixPty:
    """A command on a Unix pseudo-terminal (see :class:`~meshagent_gui.core.terminal.pty.Pty`)."""

    def __init__(self, process: Any, cols: int, rows: int) -> None:
        self._process = process
        self._fd: int = process.fd
        self._size = (cols, rows)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_output: Callable[[bytes], None] | None = None
        self._on_eof: Callable[[], None] | None = None
        self._reading = False
        self._paused = False
        self._eof = False
        self._closed = False
        self._write_buffer = bytearray()
        self._status: ExitStatus | None = None
        self._exited: asyncio.Future[ExitStatus] | None = None
        self._pidfd: int | None = None
        self._pidfd_loop: asyncio.AbstractEventLoop | None = None
        os.set_blocking(self._fd, False)

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        cols: int = 80,
        rows: int = 24,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> UnixPty:
        check_size(cols, rows)
        process = ptyprocess.PtyProcess.spawn(
            list(argv), cwd=cwd, env=dict(env) if env is not None else None, dimensions=(rows, cols)
        )
        return cls(process, cols, rows)

    @property
    def pid(self) -> int:
        return int(self._process.pid)

    @property
    def size(self) -> tuple[int, int]:
        return self._size

    @property
    def write_buffer_size(self) -> int:
        return len(self._write_buffer)

    # ------------------------------------------------------------ reading

    def start(self, on_output: Callable[[bytes], None], on_eof: Callable[[], None]) -> None:
        if self._on_output is not None:
            raise RuntimeError("already started")
        self._loop = asyncio.get_running_loop()
        self._on_output, self._on_eof = on_output, on_eof
        self._add_reader()

    def pause_reading(self) -> None:
        self._paused = True
        self._remove_reader()

    def resume_reading(self) -> None:
        self._paused = False
        self._add_reader()

    def _add_reader(self) -> None:
        idle = not (self._reading or self._paused or self._eof or self._closed)
        if self._loop is not None and idle:
            self._loop.add_reader(self._fd, self._readable)
            self._reading = True

    def _remove_reader(self) -> None:
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _readable(self) -> None:
        chunks: list[bytes] = []
        total = 0
        eof = False
        while total < READ_BUDGET:
            try:
                data = os.read(self._fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError:  # EIO: every slave descriptor is closed (Linux)
                eof = True
                break
            if not data:  # end of file (BSD, macOS)
                eof = True
                break
            chunks.append(data)
            total += len(data)
        if chunks and self._on_output is not None:
            self._on_output(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if eof and not self._eof:
            self._eof = True
            self._remove_reader()
            if self._on_eof is not None:
                self._on_eof()

    # ------------------------------------------------------------ writing

    def write(self, data: bytes) -> None:
        if self._closed:
            raise PtyClosed("the PTY is closed")
        if not data:
            return
        if self._write_buffer:
            self._write_buffer += data
            return
        try:
            written = os.write(self._fd, data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            raise PtyClosed(f"the PTY is gone: {exc}") from exc
        if written < len(data):
            self._write_buffer += data[written:]
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        try:
            written = os.write(self._fd, self._write_buffer)
        except BlockingIOError:
            return
        except OSError:
            written = len(self._write_buffer)  # the program is gone: drop what it never read
        del self._write_buffer[:written]
        if not self._write_buffer and self._loop is not None:
            self._loop.remove_writer(self._fd)

    def resize(self, cols: int, rows: int) -> None:
        check_size(cols, rows)
        if self._closed:
            raise PtyClosed("the PTY is closed")
        self._process.setwinsize(rows, cols)  # TIOCSWINSZ; the kernel sends SIGWINCH
        self._size = (cols, rows)

    # ------------------------------------------------------------ the process

    async def wait(self) -> ExitStatus:
        if self._status is not None:
            return self._status
        loop = asyncio.get_running_loop()
        if self._exited is None:
            self._exited = loop.create_future()
            self._watch_exit(loop)
        return await asyncio.shield(self._exited)

    def _watch_exit(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # not Linux >= 5.3: a thread waits instead
            waiting = loop.run_in_executor(None, os.waitpid, self.pid, 0)
            waiting.add_done_callback(self._waited)
            return
        self._pidfd_loop = loop
        loop.add_reader(self._pidfd, self._reap)
        self._reap()  # it may be gone already

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by someone else: the status is lost
            self._exit(ExitStatus())
            return
        if pid != 0:
            self._exit(_decode_status(status))

    def _waited(self, waiting: asyncio.Future[tuple[int, int]]) -> None:
        try:
            _, status = waiting.result()
        except ChildProcessError:
            self._exit(ExitStatus())
            return
        self._exit(_decode_status(status))

    def _exit(self, status: ExitStatus) -> None:
        if self._status is not None:
            return
        self._status = status
        self._process.terminated = True  # ptyprocess must not wait for it again
        self._process.exitstatus, self._process.signalstatus = status.code, status.signal
        if self._pidfd is not None:
            if self._pidfd_loop is not None:
                self._pidfd_loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(status)

    def terminate(self, *, force: bool = False) -> None:
        if self._status is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL if force else signal.SIGHUP)

    def close(self) -> None:
        """Stop reading and writing, close the master (the kernel hangs up the session).

        Await :meth:`wait` afterwards to reap the command.
        """
        if self._closed:
            return
        self._remove_reader()
        if self._write_buffer and self._loop is not None:
            self._loop.remove_writer(self._fd)
        self._write_buffer.clear()
        self._closed = True
        self._eof = True
        # ptyprocess' own close() sleeps and waits: close the descriptor ourselves.
        self._process.fileobj.close()
        self._process.closed = True
