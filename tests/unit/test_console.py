"""The terminal console's key handling and Windows raw mode (against a fake kernel32)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from meshagent_gui import console
from meshagent_gui.console import ESCAPE, Console, share_banner
from meshagent_gui.core.ipc_types import ShareOpened


class FakeStream:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.json: list[dict[str, Any]] = []
        self.closed = False

    def write_data(self, data: bytes) -> None:
        self.data.append(data)

    def write_json(self, message: dict[str, Any]) -> None:
        self.json.append(message)

    def close(self) -> None:
        self.closed = True


def make(role: console.Role) -> tuple[Console, FakeStream, list[bytes]]:
    stream = FakeStream()
    said: list[bytes] = []
    made = Console(stream, role, keys=-1, screen=-1)  # type: ignore[arg-type]
    made._write = said.append  # type: ignore[method-assign]
    return made, stream, said


def test_keys_pass_through_and_the_escape_key_is_a_command_prefix() -> None:
    viewer, stream, said = make("viewer")
    viewer._on_keys(b"ls\r")
    viewer._on_keys(bytes([ESCAPE]) + b"c")  # take control
    viewer._on_keys(bytes([ESCAPE, ESCAPE]))  # a literal Ctrl-]
    viewer._on_keys(bytes([ESCAPE]))  # split across reads: still a prefix
    viewer._on_keys(b"r")
    viewer._on_keys(bytes([ESCAPE]) + b"?")
    assert stream.data == [b"ls\r", bytes([ESCAPE])]
    assert stream.json == [{"control": "request"}, {"control": "release"}]
    assert b"Ctrl-] then: q leave" in said[-1]
    viewer._on_keys(bytes([ESCAPE]) + b"q")
    assert stream.closed and viewer._leaving


def test_the_host_answers_a_control_request_with_one_key() -> None:
    host, stream, said = make("host")
    assert not host._event({"event": "control_request", "id": 7, "name": "bob"})
    assert b"bob asks to take control" in said[-1]
    host._on_keys(b"xy")  # x goes to the shell; y answers
    assert stream.data == [b"x"]
    assert stream.json == [{"consent": 7, "allow": True}]
    host._on_keys(b"y")  # no question pending: an ordinary key
    assert stream.data == [b"x", b"y"]
    host._on_keys(bytes([ESCAPE]) + b"r" + bytes([ESCAPE]) + b"q")
    assert stream.json[-2:] == [{"revoke": True}, {"stop": True}]


def test_the_session_end_sets_the_exit_code() -> None:
    viewer, _, said = make("viewer")
    assert viewer._event({"event": "ended", "exit_code": 3, "signal": None, "message": ""})
    assert viewer.exit_code == 3 and b"exit code 3" in said[-1]
    killed, _, _ = make("viewer")
    assert killed._event({"event": "ended", "exit_code": None, "signal": 9, "message": ""})
    assert killed.exit_code == 137


class FakeKernel32:
    """Console handles 1 (input) and 2 (output) with modes; records every change."""

    def __init__(self, modes: dict[int, int] | None) -> None:
        self.modes = modes
        self.set: list[tuple[int, int]] = []

    def GetStdHandle(self, which: int) -> int:
        return {console.STD_INPUT_HANDLE: 1, console.STD_OUTPUT_HANDLE: 2}[which]

    def GetConsoleMode(self, handle: int, mode: Any) -> int:
        if self.modes is None:
            return 0  # redirected: not a console
        mode._obj.value = self.modes[handle]
        return 1

    def SetConsoleMode(self, handle: int, mode: int) -> int:
        self.set.append((handle, mode))
        return 1


def test_windows_raw_mode_sets_vt_modes_and_restores_them() -> None:
    cooked_in = (
        console.ENABLE_PROCESSED_INPUT | console.ENABLE_LINE_INPUT | console.ENABLE_ECHO_INPUT
    ) | 0x0080  # and a flag raw mode leaves alone
    api = FakeKernel32({1: cooked_in, 2: 0x0003})
    with console.windows_raw_mode(api):
        assert api.set == [(1, 0x0080 | console.ENABLE_VIRTUAL_TERMINAL_INPUT), (2, 0x0007)]
    assert api.set[2:] == [(1, cooked_in), (2, 0x0003)]


def test_windows_raw_mode_restores_even_after_an_error_and_skips_a_redirected_console() -> None:
    api = FakeKernel32({1: 0x0007, 2: 0x0001})
    with pytest.raises(RuntimeError), console.windows_raw_mode(api):
        raise RuntimeError("boom")
    assert api.set[-2:] == [(1, 0x0007), (2, 0x0001)]
    redirected = FakeKernel32(None)
    with console.windows_raw_mode(redirected):
        pass
    assert redirected.set == []


def test_the_share_banner_says_who_can_watch_how_and_the_keys() -> None:
    opened = ShareOpened(session_id="3f2a9c1b77e0", title="bash on my desk")
    own = share_banner("my desk", opened, allow_control=False)
    lines = own.split("\r\n")
    assert lines[0] == "[meshagent] Sharing bash on my desk (session 3f2a9c1b)"
    assert "sharing with your own devices only" in lines[1]
    assert all(len(line) <= 80 for line in lines)  # no line wraps in a plain console
    assert "meshagent terminal view 'my desk'" in own  # a command that runs as shown
    assert "Ctrl-] q stop sharing" in own and "Ctrl-] r take control back" in own
    assert "you answer here [y/n]" in own
    rooms = share_banner(
        "desk", msgspec.structs.replace(opened, rooms=("team", "ops")), allow_control=True
    )
    assert "sharing with rooms team and ops" in rooms
    assert "your own devices take it without asking" in rooms
    assert "\n" not in own.replace("\r\n", "")  # raw mode: every line ends in CR LF


def test_the_host_stopping_is_not_a_signal() -> None:
    host, stream, said = make("host")
    host._on_keys(bytes([ESCAPE]) + b"q")
    assert stream.json == [{"stop": True}]
    # The hang-up the agent sends the command: exit status 129 (SIGHUP) by the book.
    assert host._event({"event": "ended", "exit_code": None, "signal": 1, "message": ""})
    assert host.exit_code == 0 and b"you stopped sharing" in said[-1]
    assert not any(b"signal" in line for line in said)
    viewer, _, seen = make("viewer")
    ended = {"event": "ended", "exit_code": None, "signal": 1}
    assert viewer._event({**ended, "message": "the host stopped sharing"})
    assert b"session ended: the host stopped sharing" in seen[-1]


def test_status_during_a_session_goes_to_the_title_not_the_screen() -> None:
    """Issue 17 item 10: a status line over vim splits its screen; the title is outside it."""
    host, _, said = make("host")
    host._live = True  # as run() sets it once the shared program owns the screen
    host._event({"event": "viewer_joined", "name": "laptop"})
    assert said[-1] == b"\x1b]2;[meshagent] laptop is watching\x07"
    host._event({"event": "control_request", "id": 1, "name": "bob\x1b[2J"})
    assert said[-1].startswith(b"\x1b]2;[meshagent] bob[2J asks") and said[-1].endswith(b"\x07\x07")
    host._event({"event": "ended", "exit_code": 0, "signal": None, "message": ""})
    assert said[-1] == console.TITLE_POP  # the user's own title back; the screen is theirs
    host.say("after")
    assert said[-1].startswith(b"\r\n") and b"after" in said[-1]
