"""One PTY interface for the terminal host: ptyprocess on Unix, ConPTY (pywinpty) on Windows.

A :class:`Pty` is driven by callbacks, like an asyncio protocol, because the host's hot path
is "bytes arrived": ``start(on_output, on_eof)`` hands every batch of output (all that was
readable, up to a budget) to ``on_output`` on the event loop's thread, then calls ``on_eof``
once. ``write`` never blocks (it buffers); ``wait`` returns the exit status.

This module is the interface only; the implementations (``pty_unix``, ``conpty_windows``) build
on it, and ``spawn.spawn_pty`` picks the one for this platform.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

READ_BUDGET: Final = 256 * 1024
"""Bytes read per readiness callback before the loop gets a turn (one output batch)."""


class PtyClosed(Exception):
    """The PTY was closed: no more writes or resizes."""


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How the command ended: ``code`` if it exited, ``signal`` if a signal killed it."""

    code: int | None = None
    signal: int | None = None

    @property
    def returncode(self) -> int:
        """The shell's convention: the code, or 128 + the signal."""
        if self.code is not None:
            return self.code
        return 128 + (self.signal or 0)


class Pty(Protocol):
    """A command running on a pseudo-terminal."""

    @property
    def pid(self) -> int: ...

    @property
    def size(self) -> tuple[int, int]:
        """``(cols, rows)``."""
        ...

    @property
    def write_buffer_size(self) -> int:
        """Bytes written but not yet taken by the PTY (the program is not reading)."""
        ...

    def start(self, on_output: Callable[[bytes], None], on_eof: Callable[[], None]) -> None:
        """Begin reading; must be called from the event loop's thread."""
        ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def write(self, data: bytes) -> None:
        """Queue input for the program; raises :class:`PtyClosed` after close."""
        ...

    def resize(self, cols: int, rows: int) -> None: ...

    async def wait(self) -> ExitStatus: ...

    def terminate(self, *, force: bool = False) -> None:
        """Ask the command to stop (SIGHUP, as a closing terminal does), or kill it."""
        ...

    def close(self) -> None:
        """Stop reading and writing and release the PTY; kills the command if still alive."""
        ...
