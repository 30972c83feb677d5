"""The console end of ``meshagent terminal share|view``: raw mode, keys, output, status lines.

The agent holds the PTY or the viewer's stream; this process is only the user's terminal,
attached to it over local IPC (see ``core.terminal.bridge``). ``Ctrl-]`` is the escape key, as
in telnet: the key after it is a command (``q`` leave, ``c`` take control, ``r`` release or
revoke, ``Ctrl-]`` a literal one, anything else shows the help).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Final, Literal, Protocol

from meshagent_gui.core.ipc import IpcStream, IpcStreamClosed
from meshagent_gui.core.ipc_types import (
    ControlFrame,
    ControlRequestClosedFrame,
    ControlRequestFrame,
    EndedFrame,
    ErrorFrame,
    RefusedFrame,
    ShareOpened,
    ViewerJoinedFrame,
    ViewerLeftFrame,
    agent_event,
)

ESCAPE: Final = 0x1D  # Ctrl-]
Role = Literal["host", "viewer"]

HELP: Final = {
    "host": "Ctrl-] then: q stop sharing, r take control back, Ctrl-] send Ctrl-]",
    "viewer": "Ctrl-] then: q leave, c take control, r release control, Ctrl-] send Ctrl-]",
}


def share_banner(device: str, opened: ShareOpened, *, allow_control: bool) -> str:
    """What `terminal share` says before the shared program starts: who can watch, how they
    watch, who may take control, and the keys. ``opened``: the agent's answer (session id,
    title) and the rooms the user chose (none: their own devices only)."""
    rooms: Sequence[str] = opened.rooms or ()
    who = (
        f"sharing with {_listed('room', rooms)}"
        if rooms
        else "sharing with your own devices only (--room R shares with a room)"
    )
    control = (
        "your own devices take it without asking; others ask you here [y/n]"
        if allow_control
        else "a viewer asks, you answer here [y/n]"
    )
    title = opened.title or f"this terminal on {device}"  # "bash on desk"
    session = opened.session_id[:8]
    lines = [
        f"[meshagent] Sharing {title}" + (f" (session {session})" if session else ""),
        f"  Who:       {who}",
        f"  To watch:  meshagent terminal view {shlex.quote(device)}  (add --control to type)",
        f"  Control:   {control}",
        "  Keys:      Ctrl-] q stop sharing, Ctrl-] r take control back",
    ]
    return "\r\n".join(lines) + "\r\n"


def _listed(noun: str, names: Sequence[str]) -> str:
    if len(names) == 1:
        return f"{noun} {names[0]}"
    return f"{noun}s {', '.join(names[:-1])} and {names[-1]}"


# Windows console modes (wincon.h): what raw mode turns off on input, and on for both sides.
ENABLE_PROCESSED_INPUT: Final = 0x0001
ENABLE_LINE_INPUT: Final = 0x0002
ENABLE_ECHO_INPUT: Final = 0x0004
ENABLE_VIRTUAL_TERMINAL_INPUT: Final = 0x0200
ENABLE_VIRTUAL_TERMINAL_PROCESSING: Final = 0x0004
STD_INPUT_HANDLE: Final = -10
STD_OUTPUT_HANDLE: Final = -11

# xterm's title stack (CSI 22/23 t): the user's own title comes back when the session ends.
TITLE_PUSH: Final = b"\x1b[22;2t"
TITLE_POP: Final = b"\x1b[23;2t"


class ConsoleApi(Protocol):
    """The three kernel32 calls raw mode needs (a fake in tests)."""

    def GetStdHandle(self, which: int) -> Any: ...
    def GetConsoleMode(self, handle: Any, mode: Any) -> int: ...
    def SetConsoleMode(self, handle: Any, mode: int) -> int: ...


def windows_raw_modes(input_mode: int, output_mode: int) -> tuple[int, int]:
    """Console modes for raw mode: keys as typed (Ctrl-C included) arrive as VT sequences, and
    VT output is interpreted."""
    raw_in = input_mode & ~(ENABLE_PROCESSED_INPUT | ENABLE_LINE_INPUT | ENABLE_ECHO_INPUT)
    return raw_in | ENABLE_VIRTUAL_TERMINAL_INPUT, output_mode | ENABLE_VIRTUAL_TERMINAL_PROCESSING


@contextlib.contextmanager
def windows_raw_mode(api: ConsoleApi) -> Iterator[None]:
    import ctypes

    handles = api.GetStdHandle(STD_INPUT_HANDLE), api.GetStdHandle(STD_OUTPUT_HANDLE)
    saved: list[int] = []
    for handle in handles:
        current = ctypes.c_uint32()
        if not api.GetConsoleMode(handle, ctypes.byref(current)):
            yield  # not a console (redirected): nothing to change
            return
        saved.append(current.value)
    for handle, raw in zip(handles, windows_raw_modes(saved[0], saved[1]), strict=True):
        api.SetConsoleMode(handle, raw)
    try:
        yield
    finally:
        for handle, original in zip(handles, saved, strict=True):
            api.SetConsoleMode(handle, original)


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """The console in raw mode (keys as typed, no echo), restored however we leave."""
    if not os.isatty(fd):
        yield
        return
    if sys.platform == "win32":
        import ctypes

        with windows_raw_mode(ctypes.windll.kernel32):
            yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def console_size() -> tuple[int, int]:
    size = shutil.get_terminal_size((80, 24))
    return max(1, min(size.columns, 1000)), max(1, min(size.lines, 1000))


class Console:
    """Pumps keys to the agent and the agent's frames to the screen until the session ends."""

    def __init__(
        self,
        stream: IpcStream,
        role: Role,
        *,
        keys: int | None = None,
        screen: int | None = None,
        banner: str = "",
    ) -> None:
        self.stream = stream
        self.role = role
        self.banner = banner
        self.exit_code = 0
        self._stopping = False  # the host asked to stop: the hang-up that follows is no failure
        self._escaped = False
        self._asking: int | None = None  # a control request waiting for y/n (host)
        self._asker = ""  # who asked
        self._in = sys.stdin.fileno() if keys is None else keys
        self._out = sys.stdout.fileno() if screen is None else screen
        self._leaving = False
        self._live = False  # the shared program owns the screen: status goes to the title

    def say(self, text: str, *, bell: bool = False) -> None:
        """A status line, set apart from the shared screen. While the session is live the
        screen is the program's (vim, a prompt): as tmate does, the status goes where the
        program never draws, the console's title (OSC 2); before and after, on a line."""
        if self._live:
            title = "".join(c for c in f"[meshagent] {text}" if c.isprintable())
            self._write(f"\x1b]2;{title}\x07".encode() + (b"\x07" if bell else b""))
        else:
            self._write(f"\r\n\x1b[7m[meshagent] {text}\x1b[0m\r\n".encode())

    def _ended(self) -> None:
        """The session is over: the screen is the user's again, and so is the title."""
        if self._live:
            self._live = False
            self._write(TITLE_POP)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._out, view)
            except BlockingIOError:
                continue
            view = view[written:]

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        with raw_mode(self._in):
            if self.banner:
                self._write(self.banner.encode())
            self._write(TITLE_PUSH)  # restored when the session ends
            self._live = True
            reading = self._watch_keys(loop)
            if sys.platform != "win32":
                loop.add_signal_handler(signal.SIGWINCH, self._resized)
            try:
                await self._show()
            finally:
                self._ended()
                if reading:
                    loop.remove_reader(self._in)
                if sys.platform != "win32":
                    loop.remove_signal_handler(signal.SIGWINCH)
        return self.exit_code

    def _watch_keys(self, loop: asyncio.AbstractEventLoop) -> bool:
        if sys.platform == "win32":
            # The proactor loop cannot watch a console handle: a daemon thread reads it.
            def read_keys() -> None:
                while data := os.read(self._in, 4096):
                    loop.call_soon_threadsafe(self._on_keys, data)

            threading.Thread(target=read_keys, name="console-keys", daemon=True).start()
            return False
        try:
            loop.add_reader(self._in, self._keys)
        except (OSError, ValueError, NotImplementedError):
            return False  # stdin is a regular file or closed: nothing to type
        return True

    def _resized(self) -> None:
        self.stream.write_json({"resize": list(console_size())})

    async def _show(self) -> None:
        while True:
            try:
                frame = await self.stream.receive()
            except IpcStreamClosed:
                self._ended()
                if self.role == "viewer" and not self._leaving:
                    self.say("the agent closed the session")
                    self.exit_code = 1
                return
            if isinstance(frame, bytes):
                self._write(frame)
            elif self._event(frame):
                return

    def _event(self, frame: object) -> bool:
        """Show an agent event (a JSON frame, typed here); True when the session is over."""
        event = agent_event(frame)
        if isinstance(event, ErrorFrame | EndedFrame):
            self._ended()
        match event:
            case ControlRequestFrame(id=number, name=name):
                self._asking, self._asker = number, name
                self.say(f"{name} asks to take control. Allow? [y/n]", bell=True)
            case ControlRequestClosedFrame(id=number) if self._asking == number:
                self._asking = None
            case ViewerJoinedFrame(name=name):
                self.say(f"{name} is watching")
            case ViewerLeftFrame(name=name):
                self.say(f"{name} left")
            case ControlFrame(controller=controller, you=you):
                if you:
                    self.say("you are in control")
                elif controller:
                    self.say(f"{controller} is in control")
                else:
                    self.say("the host is in control")
            case RefusedFrame(reason=reason):
                self.say(f"control refused: {reason}")
            case ErrorFrame(message=message):
                self.say(message)
                self.exit_code = 1
                return True
            case EndedFrame() if self.role == "host" and self._stopping:
                # Our own Ctrl-] q hung the command up: not "signal 1", not exit status 129.
                self.say("you stopped sharing")
                self.exit_code = 0
                return True
            case EndedFrame(exit_code=code, signal=sig, message=message):
                message = message or (f"exit code {code}" if code is not None else f"signal {sig}")
                if self.role == "viewer":
                    self.say(f"session ended: {message}")
                self.exit_code = code if code is not None else 128 + (sig or 0)
                return True
        return False

    def _keys(self) -> None:
        try:
            data = os.read(self._in, 4096)
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self._in)
            return
        self._on_keys(data)

    def _on_keys(self, data: bytes) -> None:
        forward = bytearray()
        for byte in data:
            if self._asking is not None and byte in b"yYnN":
                self.stream.write_json({"consent": self._asking, "allow": byte in b"yY"})
                self._asking = None
                self.say(f"you {'allowed' if byte in b'yY' else 'declined'} {self._asker}")
            elif self._escaped:
                self._escaped = False
                if byte == ESCAPE:
                    forward.append(byte)
                else:
                    self._command(chr(byte))
            elif byte == ESCAPE:
                self._escaped = True
            else:
                forward.append(byte)
        if forward:
            self.stream.write_data(bytes(forward))

    def _command(self, key: str) -> None:
        match key, self.role:
            case (("q" | "Q" | "."), "host"):
                self._stopping = True
                self.stream.write_json({"stop": True})
            case (("q" | "Q" | "."), "viewer"):
                self._leaving = True
                self.stream.close()  # _show sees the end of the stream and returns
            case (("c" | "C"), "viewer"):
                self.stream.write_json({"control": "request"})
                self.say("asking for control...")
            case (("r" | "R"), "viewer"):
                self.stream.write_json({"control": "release"})
            case (("r" | "R"), "host"):
                self.stream.write_json({"revoke": True})
            case _:
                self.say(HELP[self.role])
