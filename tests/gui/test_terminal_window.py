"""The terminal viewer window against a fake session: control, input, size, endings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from PySide6.QtCore import Qt

from meshagent_gui.core.protocol.terminal import (
    ControlChanged,
    ControlRefused,
    OutputReceived,
    ScreenReplaced,
    SessionEnded,
    SizeChanged,
    ViewerEvent,
)
from meshagent_gui.errors import UserError
from meshagent_gui.ui.terminal_window import (
    CONTROL_TRANSITIONS,
    ControlPhase,
    ControlTrigger,
    TerminalViewSession,
    TerminalWindow,
)


class FakeView:
    """A viewer session whose host is the test: push events, read what the window sent."""

    session_id = "session-1"
    device_id = "device-1"
    device_name = "build-box"

    def __init__(self) -> None:
        self._events: asyncio.Queue[ViewerEvent | Exception] = asyncio.Queue()
        self.sent: list[bytes] = []
        self.sizes: list[tuple[int, int]] = []
        self.requests = 0
        self.releases = 0
        self.closed = False

    def push(self, *events: ViewerEvent | Exception) -> None:
        for event in events:
            self._events.put_nowait(event)

    async def events(self) -> AsyncIterator[ViewerEvent]:
        while True:
            event = await self._events.get()
            if isinstance(event, Exception):
                raise event
            yield event
            if isinstance(event, SessionEnded):
                return

    async def send_input(self, data: bytes) -> None:
        self.sent.append(data)

    async def resize(self, cols: int, rows: int) -> None:
        self.sizes.append((cols, rows))

    async def request_control(self) -> None:
        self.requests += 1

    async def release_control(self) -> None:
        self.releases += 1

    async def aclose(self) -> None:
        self.closed = True


def _conforms(view: FakeView) -> TerminalViewSession:
    return view  # mypy checks the fake against the window's protocol


@pytest.fixture
def view() -> FakeView:
    return FakeView()


@pytest.fixture
def window(qtbot: Any, qloop: asyncio.AbstractEventLoop, view: FakeView) -> TerminalWindow:
    terminal_window = TerminalWindow(_conforms(view))
    qtbot.addWidget(terminal_window)
    terminal_window.show()  # starts the session
    view.push(ScreenReplaced(40, 10, 0), OutputReceived(b"\x1b[1;31mhost$\x1b[m "))
    qtbot.waitUntil(lambda: terminal_window.terminal.text()[0].startswith("host$"))
    return terminal_window


def typed(view: FakeView) -> bytes:
    return b"".join(view.sent)


def test_a_viewer_sees_the_host_screen_read_only(window: TerminalWindow, view: FakeView) -> None:
    assert window.windowTitle() == "build-box — terminal"
    assert window.terminal.screen_size == (40, 10)
    assert window.terminal.read_only
    assert window.control_action.text() == "Take control"
    assert window.control_action.isEnabled()
    assert window.controller_label.text() == "In control: the host"
    assert window.status_text == "Watching (read-only)"


def test_the_session_task_starts_once(window: TerminalWindow) -> None:
    task = window.task
    assert task is not None and not task.done()
    window.hide()
    window.show()
    assert window.start() is task


def test_typing_while_viewing_reaches_nobody(
    window: TerminalWindow, view: FakeView, qtbot: Any
) -> None:
    qtbot.keyClicks(window.terminal, "whoami")
    qtbot.keyClick(window.terminal, Qt.Key.Key_Return)
    window.resize(window.width() + 200, window.height() + 100)
    qtbot.wait(50)

    assert view.sent == []
    assert view.sizes == []  # a viewer never resizes the host


def test_take_control_then_type_then_release(
    window: TerminalWindow, view: FakeView, qtbot: Any
) -> None:
    window.control_action.trigger()

    qtbot.waitUntil(lambda: view.requests == 1)
    assert window.phase.name == "REQUESTING"
    assert not window.control_action.isEnabled()
    assert window.terminal.read_only

    view.push(ControlChanged("me@laptop", you=True, epoch=1))
    qtbot.waitUntil(lambda: window.phase is ControlPhase.CONTROLLING)
    assert window.control_action.text() == "Release control"
    assert window.control_action.isEnabled()
    assert not window.terminal.read_only
    assert window.controller_label.text() == "In control: you"
    # The controller's window size goes to the host.
    fitting = window.terminal.cells_fitting(window.terminal.size())
    qtbot.waitUntil(lambda: view.sizes[-1:] == [fitting])

    qtbot.keyClicks(window.terminal, "ls -l")
    qtbot.keyClick(window.terminal, Qt.Key.Key_Return)
    qtbot.keyClick(window.terminal, Qt.Key.Key_C, Qt.KeyboardModifier.ControlModifier)
    qtbot.waitUntil(lambda: typed(view) == b"ls -l\r\x03")

    window.control_action.trigger()
    qtbot.waitUntil(lambda: view.releases == 1)
    assert window.terminal.read_only
    assert window.control_action.text() == "Take control"
    qtbot.keyClicks(window.terminal, "x")
    qtbot.wait(50)
    assert typed(view) == b"ls -l\r\x03"


def test_the_controller_window_size_follows_the_window(
    window: TerminalWindow, view: FakeView, qtbot: Any
) -> None:
    view.push(ControlChanged("me", you=True, epoch=1))
    qtbot.waitUntil(lambda: len(view.sizes) == 1)
    cols, rows = view.sizes[0]

    cell = window.terminal.cell_size
    window.resize(window.width() + 10 * cell.width(), window.height() + 3 * cell.height())

    qtbot.waitUntil(lambda: view.sizes[-1] == (cols + 10, rows + 3))
    view.push(SizeChanged(cols + 10, rows + 3))  # the host's answer resizes the screen
    qtbot.waitUntil(lambda: window.terminal.screen_size == (cols + 10, rows + 3))


def test_the_host_size_is_shown_as_is_when_viewing(
    window: TerminalWindow, view: FakeView, qtbot: Any
) -> None:
    view.push(SizeChanged(160, 50))
    qtbot.waitUntil(lambda: window.terminal.screen_size == (160, 50))

    # Bigger than the window: shown whole, with scroll bars, not squeezed.
    assert window.terminal.size() == window.terminal.pixel_size(160, 50)
    qtbot.waitUntil(lambda: window._scroll.horizontalScrollBar().maximum() > 0)

    view.push(SizeChanged(20, 5))
    qtbot.waitUntil(lambda: window.terminal.size() == window.terminal.pixel_size(20, 5))
    assert view.sizes == []


def test_control_taken_away_makes_the_window_read_only(
    window: TerminalWindow, view: FakeView, qtbot: Any
) -> None:
    view.push(ControlChanged("me", you=True, epoch=1))
    qtbot.waitUntil(lambda: not window.terminal.read_only)

    view.push(ControlChanged("alice@desk", you=False, epoch=2))

    qtbot.waitUntil(lambda: window.terminal.read_only)
    assert window.controller_label.text() == "In control: alice@desk"
    assert window.control_action.text() == "Take control"


def test_a_refused_request_shows_the_reason(
    window: TerminalWindow, view: FakeView, qtbot: Any
) -> None:
    window.control_action.trigger()
    qtbot.waitUntil(lambda: view.requests == 1)

    view.push(ControlRefused("the host said no"))

    qtbot.waitUntil(lambda: window.status_text == "Request refused: the host said no")
    assert window.phase is ControlPhase.VIEWING
    assert window.control_action.isEnabled()
    assert window.terminal.read_only


def test_session_end_shows_the_exit_status_and_leaves(
    window: TerminalWindow, view: FakeView, qtbot: Any
) -> None:
    view.push(ControlChanged("me", you=True, epoch=1))
    qtbot.waitUntil(lambda: not window.terminal.read_only)

    with qtbot.waitSignal(window.session_finished):
        view.push(OutputReceived(b"logout\r\n"), SessionEnded(0, None, ""))

    assert window.status_text == "Session ended (exit 0)"
    assert window.phase is ControlPhase.ENDED
    assert window.terminal.read_only
    assert not window.control_action.isEnabled()
    assert view.closed
    assert window.terminal.text()[0].startswith("host$ logout")


def test_a_signal_ending_is_reported(window: TerminalWindow, view: FakeView, qtbot: Any) -> None:
    with qtbot.waitSignal(window.session_finished):
        view.push(SessionEnded(None, 9, "killed"))

    assert window.status_text == "Session ended (signal 9): killed"


def test_a_lost_connection_is_reported(window: TerminalWindow, view: FakeView, qtbot: Any) -> None:
    with qtbot.waitSignal(window.session_finished):
        view.push(UserError("cannot reach build-box: timeout"))

    assert window.status_text == "Connection lost: cannot reach build-box: timeout"
    assert window.phase is ControlPhase.ENDED
    assert view.closed


def test_closing_the_window_cancels_its_task_and_leaves_the_session(
    window: TerminalWindow, view: FakeView, qtbot: Any
) -> None:
    task = window.task
    assert task is not None

    window.close()

    qtbot.waitUntil(task.done)
    assert task.cancelled()
    assert view.closed


def test_the_controller_name_is_plain_text(
    window: TerminalWindow, view: FakeView, qtbot: Any
) -> None:
    view.push(ControlChanged("<b>mallory</b>", you=False, epoch=1))

    qtbot.waitUntil(lambda: "mallory" in window.controller_label.text())
    assert window.controller_label.textFormat() == Qt.TextFormat.PlainText


def test_every_live_phase_ends_on_close() -> None:
    for phase in (ControlPhase.VIEWING, ControlPhase.REQUESTING, ControlPhase.CONTROLLING):
        assert CONTROL_TRANSITIONS[(phase, ControlTrigger.SESSION_CLOSED)] is ControlPhase.ENDED
    assert not any(phase is ControlPhase.ENDED for phase, _ in CONTROL_TRANSITIONS)
