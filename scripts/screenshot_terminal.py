"""Screenshot of the terminal viewer: a real program recorded in a real PTY, replayed into a
TerminalWindow, saved to docs/screenshots/terminal-viewer.png.

    python scripts/screenshot_terminal.py [--command "htop -d 10"] [--seconds 1.5] [--output PATH]

Always on Qt's offscreen platform, even under Xvfb (scripts/screenshots.py calls this): the
window is grabbed, so a display adds nothing, and the xcb plugin needs libxcb-cursor0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from collections.abc import AsyncIterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "docs" / "screenshots" / "terminal-viewer.png"
COLS, ROWS = 100, 30
# vim on one of our own files: syntax colours in truecolor, line numbers, a cursor line, the
# status line; no vimrc or viminfo, so the picture does not depend on who runs it.
DEFAULT_COMMAND = (
    "vim -N -u NONE -i NONE -n -c 'syntax on' -c 'set termguicolors background=dark'"
    " -c 'colorscheme habamax' -c 'set number cursorline laststatus=2 ruler noshowmode'"
    " '+/^class Screen:' meshagent_gui/core/terminal/screen.py"
)

os.environ["QT_QPA_PLATFORM"] = "offscreen"
sys.path.insert(0, str(ROOT))

from meshagent_gui.core.protocol.terminal import (  # noqa: E402 (after the platform choice)
    ControlChanged,
    OutputReceived,
    ScreenReplaced,
    SessionEnded,
    ViewerEvent,
)
from meshagent_gui.core.terminal.sanitize import OutputSanitizer  # noqa: E402
from meshagent_gui.core.terminal.spawn import spawn_pty  # noqa: E402


async def record(argv: list[str], seconds: float) -> bytes:
    """What ``argv`` writes to a COLS x ROWS terminal in its first ``seconds``."""
    output = bytearray()
    ended = asyncio.Event()
    env = dict(os.environ, TERM="xterm-256color", COLORTERM="truecolor", LANG="C.UTF-8")
    env.pop("HTOPRC", None)
    pty = spawn_pty(argv, cols=COLS, rows=ROWS, env=env, cwd=str(ROOT))
    recording = True

    def on_output(data: bytes) -> None:
        if recording:  # not what the program prints while it is being stopped
            output.extend(data)

    pty.start(on_output, ended.set)
    try:
        try:
            async with asyncio.timeout(seconds):
                await ended.wait()
        except TimeoutError:
            pass
        recording = False
        pty.terminate()
        async with asyncio.timeout(5):
            await pty.wait()
    finally:
        pty.close()
    return bytes(output)


class ReplayedView:
    """A viewer session that replays a recording (what the core's TerminalView would yield)."""

    session_id = "screenshot"
    device_id = "build-box"
    device_name = "build-box"

    def __init__(self, recording: bytes) -> None:
        self._recording = recording
        self.replayed = asyncio.Event()

    async def events(self) -> AsyncIterator[ViewerEvent]:
        yield ScreenReplaced(COLS, ROWS, 0)
        yield ControlChanged("alice@laptop", you=False, epoch=3)
        sanitizer = OutputSanitizer()  # as the core does: no queries answered, no clipboard
        for start in range(0, len(self._recording), 4096):
            yield OutputReceived(sanitizer.feed(self._recording[start : start + 4096]))
        self.replayed.set()
        await asyncio.Event().wait()  # the session goes on until the window closes
        yield SessionEnded(0, None, "")  # pragma: no cover

    async def send_input(self, data: bytes) -> None:
        pass

    async def resize(self, cols: int, rows: int) -> None:
        pass

    async def request_control(self) -> None:
        pass

    async def release_control(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def shoot(argv: list[str], seconds: float, output: Path) -> None:
    from PySide6.QtWidgets import QApplication

    from meshagent_gui.ui.terminal_window import TerminalWindow

    recording = await record(argv, seconds)
    view = ReplayedView(recording)
    window = TerminalWindow(view)
    window.show()  # starts the session
    async with asyncio.timeout(10):
        await view.replayed.wait()
    window.fit_to_terminal(within_screen=False)  # offscreen "screens" are small
    await asyncio.sleep(0.3)  # a frame or two
    QApplication.processEvents()
    output.parent.mkdir(parents=True, exist_ok=True)
    if not window.grab().save(str(output)):
        raise SystemExit(f"could not write {output}")
    print(f"{output}: {len(recording)} bytes of {argv[0]} output")
    window.close()
    await asyncio.sleep(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--command", default=DEFAULT_COMMAND)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()

    import qasync  # type: ignore[import-untyped]
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(sys.argv)
    loop = qasync.QEventLoop(app)
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(shoot(shlex.split(args.command), args.seconds, args.output))
    finally:
        loop.close()


if __name__ == "__main__":
    main()
