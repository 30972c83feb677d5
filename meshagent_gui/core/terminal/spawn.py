"""Starting a command on a PTY: this platform's implementation, the user's shell, a TERM.

Above the interface (``pty.py``) and its implementations (``pty_unix.py``, ``conpty_windows.py``),
which import only the interface; the implementation is imported on use, so ConPTY's module is
never loaded on Unix.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Final

from meshagent_gui.core.protocol.terminal import check_size
from meshagent_gui.core.terminal.pty import Pty

DEFAULT_TERM: Final = "xterm-256color"


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
