"""One PTY interface for the terminal host: ptyprocess on Unix, ConPTY (pywinpty) on Windows.

A :class:`Pty` is driven by callbacks, like an asyncio protocol, because the host's hot path
is "bytes arrived": ``start(on_output, on_eof)`` hands every batch of output (all that was
readable, up to a budget) to ``on_output`` on the event loop's thread, then calls ``on_eof``
once. ``write`` never blocks (it buffers); ``wait`` returns the exit status.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from meshagent_gui.core.protocol.terminal import check_size

READ_BUDGET: Final = 256 * 1024
"""Bytes read per readiness callback before the loop gets a turn (one output batch)."""
DEFAULT_TERM: Final = "xterm-256color"


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


def default_command(env: Mapping[str, str] | None = None) -> list[str]:
    """The user's shell: ``$SHELL``, else the login shell, else ``/bin/sh`` (``COMSPEC`` or
    ``cmd.exe`` on Windows)."""
    env = os.environ if env is None else env
    if sys.platform == "win32":
        return [env.get("COMSPEC", "cmd.exe")]
    shell = env.get("SHELL")
    if not shell:
        try:
            import pwd

            shell = pwd.getpwuid(os.getuid()).pw_shell
        except (ImportError, KeyError):
            shell = None
    return [shell or "/bin/sh"]


def child_environment(env: Mapping[str, str] | None) -> dict[str, str]:
    """The environment for the command: ours (or ``env``), with a TERM the emulator speaks."""
    result = dict(os.environ if env is None else env)
    result.setdefault("TERM", DEFAULT_TERM)
    return result


def spawn_pty(
    argv: Sequence[str] | None = None,
    *,
    cols: int = 80,
    rows: int = 24,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Pty:
    """Start ``argv`` (default: the user's shell) on a new PTY of ``cols`` x ``rows``."""
    check_size(cols, rows)
    command = list(argv) if argv else default_command(env)
    environment = child_environment(env)
    if sys.platform == "win32":
        from meshagent_gui.core.terminal.conpty_windows import ConPty

        return ConPty.spawn(command, cols=cols, rows=rows, cwd=cwd, env=environment)
    from meshagent_gui.core.terminal.pty_unix import UnixPty

    return UnixPty.spawn(command, cols=cols, rows=rows, cwd=cwd, env=environment)
