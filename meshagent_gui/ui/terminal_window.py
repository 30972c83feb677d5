"""The terminal viewer window: a shared terminal, who controls it, and Take control / Release.

The window drives one viewer session (:class:`TerminalViewSession`, the core's ``TerminalView``)
from an asyncio task on the app's qasync loop: it feeds the session's events to the
:class:`~meshagent_gui.ui.terminal_widget.TerminalWidget` and sends what the user does (keys,
control requests, the size while in control) through one queue, so they reach the host in the
order they happened. The task starts when the window is first shown (or at
:meth:`TerminalWindow.start`), is owned by the window, is cancelled when it closes, and leaves
the session (``aclose``) on the way out.

Size: a viewer shows the host's terminal at the host's size (scroll bars when the window is
smaller, a frame around it when larger) and never asks for another; only the controller's
window size is sent, and the host's answer (a ``SizeChanged``) is what resizes the screen.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final, Protocol

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QAction, QCloseEvent, QColor, QPalette, QShowEvent
from PySide6.QtWidgets import QFrame, QMainWindow, QScrollArea, QToolBar, QWidget

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
from meshagent_gui.ui.terminal_widget import TerminalWidget, add_session_labels

log = logging.getLogger(__name__)

CLOSE_TIMEOUT: Final = 5.0
"""Seconds to leave the session cleanly when the window closes."""
LETTERBOX_COLOR: Final = QColor("#101218")


class TerminalViewSession(Protocol):
    """What the window needs from a viewer session (the core's ``TerminalView``)."""

    @property
    def session_id(self) -> str: ...
    @property
    def device_id(self) -> str: ...
    @property
    def device_name(self) -> str: ...

    def events(self) -> AsyncIterator[ViewerEvent]:
        """The host's events; ends after SessionEnded; raises UserError if the link is lost."""
        ...

    async def send_input(self, data: bytes) -> None: ...
    async def resize(self, cols: int, rows: int) -> None: ...
    async def request_control(self) -> None:
        """The answer comes later, as ControlChanged or ControlRefused."""
        ...

    async def release_control(self) -> None: ...
    async def aclose(self) -> None: ...


# ---------------------------------------------------------------- control, as data


class ControlPhase(Enum):
    VIEWING = auto()
    REQUESTING = auto()
    CONTROLLING = auto()
    ENDED = auto()


class ControlTrigger(Enum):
    TAKE_CLICKED = auto()
    RELEASE_CLICKED = auto()
    GRANTED = auto()  # ControlChanged(you=True)
    NOT_GRANTED = auto()  # ControlChanged(you=False): revoked, demoted, or someone else's change
    REFUSED = auto()  # ControlRefused
    SESSION_CLOSED = auto()  # SessionEnded or the connection lost


_LIVE: Final = (ControlPhase.VIEWING, ControlPhase.REQUESTING, ControlPhase.CONTROLLING)

CONTROL_TRANSITIONS: Final[Mapping[tuple[ControlPhase, ControlTrigger], ControlPhase]] = {
    (ControlPhase.VIEWING, ControlTrigger.TAKE_CLICKED): ControlPhase.REQUESTING,
    (ControlPhase.VIEWING, ControlTrigger.GRANTED): ControlPhase.CONTROLLING,
    (ControlPhase.REQUESTING, ControlTrigger.GRANTED): ControlPhase.CONTROLLING,
    (ControlPhase.REQUESTING, ControlTrigger.REFUSED): ControlPhase.VIEWING,
    # Input stops at the click, not when the host confirms.
    (ControlPhase.CONTROLLING, ControlTrigger.RELEASE_CLICKED): ControlPhase.VIEWING,
    (ControlPhase.CONTROLLING, ControlTrigger.NOT_GRANTED): ControlPhase.VIEWING,
    **{(phase, ControlTrigger.SESSION_CLOSED): ControlPhase.ENDED for phase in _LIVE},
}
"""Pairs not listed leave the phase as it is (a request stays pending while control moves
between others: the host answers it with a grant or a refusal)."""


@dataclass(frozen=True, slots=True)
class _PhaseLook:
    button: str
    button_enabled: bool
    read_only: bool


_PHASE_LOOK: Final = {
    ControlPhase.VIEWING: _PhaseLook("Take control", True, True),
    ControlPhase.REQUESTING: _PhaseLook("Requesting control…", False, True),
    ControlPhase.CONTROLLING: _PhaseLook("Release control", True, False),
    ControlPhase.ENDED: _PhaseLook("Take control", False, True),
}


# ---------------------------------------------------------------- commands to the host


class _Command(Enum):
    REQUEST_CONTROL = auto()
    RELEASE_CONTROL = auto()
    SEND_SIZE = auto()  # the latest wanted size, read when sent (older ones are moot)


def ended_text(event: SessionEnded) -> str:
    """ "Session ended (exit 0)", "(signal 9)", with the host's message if any."""
    if event.signal is not None:
        detail = f"signal {event.signal}"
    elif event.exit_code is not None:
        detail = f"exit {event.exit_code}"
    else:
        detail = "closed by the host"
    text = f"Session ended ({detail})"
    return f"{text}: {event.message}" if event.message else text


class TerminalWindow(QMainWindow):
    """A viewer window for one shared terminal session."""

    phase_changed = Signal(object)
    """The control phase changed (a :class:`ControlPhase`)."""
    session_finished = Signal()
    """The session task ended (the session ended, the link was lost, or the window closed)."""

    def __init__(self, view: TerminalViewSession, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._view = view
        self._phase = ControlPhase.VIEWING
        self._commands: asyncio.Queue[bytes | _Command] = asyncio.Queue()
        self._wanted_size: tuple[int, int] | None = None
        self._sent_size: tuple[int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self._sized_to_screen = False

        self.setWindowTitle(f"{view.device_name} — terminal")
        self.terminal = TerminalWidget()
        self.terminal.read_only = True
        self.terminal.input_ready.connect(self._typed)
        self.terminal.screen_size_changed.connect(self._screen_size_changed)
        self.terminal.fitting_size_changed.connect(self._fitting_size_changed)

        self._scroll = QScrollArea()
        self._scroll.setFrameShape(QFrame.Shape.NoFrame)
        self._scroll.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self._scroll.setWidget(self.terminal)
        self._scroll.setFocusProxy(self.terminal)
        palette = self._scroll.viewport().palette()
        palette.setColor(QPalette.ColorRole.Window, LETTERBOX_COLOR)
        self._scroll.viewport().setPalette(palette)
        self._scroll.viewport().setAutoFillBackground(True)
        self.setCentralWidget(self._scroll)

        self._toolbar = toolbar = QToolBar("Control")
        toolbar.setMovable(False)
        toolbar.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextOnly)
        self.control_action = QAction("Take control", self)
        self.control_action.triggered.connect(self._control_clicked)
        toolbar.addAction(self.control_action)
        toolbar.addSeparator()
        self.controller_label, self.status_label = add_session_labels(self, toolbar)

        self._show_controller(None, you=False)
        self._set_status("Connecting…")
        self._apply_phase()
        self.fit_to_terminal()

    # ------------------------------------------------------------ public API

    @property
    def view(self) -> TerminalViewSession:
        return self._view

    @property
    def phase(self) -> ControlPhase:
        return self._phase

    @property
    def status_text(self) -> str:
        return self.status_label.text()

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    def start(self) -> asyncio.Task[None]:
        """Run the session on the running (qasync) loop; the window owns the task.

        Called by the first show; idempotent."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self.run(), name=f"terminal-window-{self._view.session_id}"
            )
            self._task.add_done_callback(self._task_done)
        return self._task

    async def run(self) -> None:
        """Show the session until it ends; then leave it (also when cancelled)."""
        try:
            async with asyncio.TaskGroup() as group:
                sender = group.create_task(self._send_commands())
                await self._consume_events()
                sender.cancel()
        except* UserError as lost:
            self._closed(f"Connection lost: {lost.exceptions[0]}")
        except* Exception as failed:
            log.error("terminal viewer failed", exc_info=failed.exceptions[0])
            self._closed(f"Connection lost: {failed.exceptions[0]}")
        finally:
            self._move(ControlTrigger.SESSION_CLOSED)
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self._view.aclose()
            except (TimeoutError, UserError) as error:
                log.info("leaving terminal session %s: %s", self._view.session_id, error)

    # ------------------------------------------------------------ Qt overrides

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        if self._task is None:
            self.start()  # shown = watching; start() before show() works as well

    def closeEvent(self, event: QCloseEvent) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        super().closeEvent(event)

    # ------------------------------------------------------------ events from the host

    async def _consume_events(self) -> None:
        async for event in self._view.events():
            self._handle(event)
            if isinstance(event, SessionEnded):
                return
            # Buffered events come without a pause: let Qt paint and take keys between them.
            await asyncio.sleep(0)

    def _handle(self, event: ViewerEvent) -> None:
        match event:
            case OutputReceived(data=data):
                self.terminal.feed(data)
            case ScreenReplaced(cols=cols, rows=rows):
                self.terminal.reset(cols, rows)
                if not self._sized_to_screen:
                    self._sized_to_screen = True
                    self.fit_to_terminal()
                if self.status_text == "Connecting…":
                    self._set_status(self._phase_status())
            case SizeChanged(cols=cols, rows=rows):
                self.terminal.resize_screen(cols, rows)
            case ControlChanged(controller=controller, you=you):
                self._show_controller(controller, you=you)
                self._move(ControlTrigger.GRANTED if you else ControlTrigger.NOT_GRANTED)
                self._set_status(self._phase_status())
            case ControlRefused(reason=reason):
                self._move(ControlTrigger.REFUSED)
                self._set_status(f"Request refused: {reason or 'no reason given'}")
            case SessionEnded():
                self._closed(ended_text(event))

    def _closed(self, status: str) -> None:
        self._move(ControlTrigger.SESSION_CLOSED)
        self._set_status(status)

    # ------------------------------------------------------------ commands to the host

    async def _send_commands(self) -> None:
        while True:
            command = await self._commands.get()
            match command:
                case bytes():
                    await self._view.send_input(command)
                case _Command.REQUEST_CONTROL:
                    await self._view.request_control()
                case _Command.RELEASE_CONTROL:
                    await self._view.release_control()
                case _Command.SEND_SIZE:
                    size = self._wanted_size
                    if size is not None and size != self._sent_size:
                        self._sent_size = size
                        await self._view.resize(*size)

    def _typed(self, data: bytes) -> None:
        if self._phase is ControlPhase.CONTROLLING:
            self._commands.put_nowait(data)

    def _control_clicked(self) -> None:
        if self._phase is ControlPhase.VIEWING:
            self._move(ControlTrigger.TAKE_CLICKED)
            self._commands.put_nowait(_Command.REQUEST_CONTROL)
        elif self._phase is ControlPhase.CONTROLLING:
            self._move(ControlTrigger.RELEASE_CLICKED)
            self._commands.put_nowait(_Command.RELEASE_CONTROL)
        self._set_status(self._phase_status())

    def _fitting_size_changed(self, cols: int, rows: int) -> None:
        if self._phase is ControlPhase.CONTROLLING:
            self._want_size(cols, rows)

    def _want_size(self, cols: int, rows: int) -> None:
        self._wanted_size = (cols, rows)
        self._commands.put_nowait(_Command.SEND_SIZE)

    # ------------------------------------------------------------ presentation

    def _move(self, trigger: ControlTrigger) -> None:
        new = CONTROL_TRANSITIONS.get((self._phase, trigger), self._phase)
        if new is self._phase:
            return
        self._phase = new
        self._apply_phase()
        if new is ControlPhase.CONTROLLING:
            self.terminal.setFocus()
            self._sent_size = None  # the host may have another size by now
            self._want_size(*self.terminal.cells_fitting(self._scroll.viewport().size()))
        self.phase_changed.emit(new)

    def _apply_phase(self) -> None:
        look = _PHASE_LOOK[self._phase]
        self.control_action.setText(look.button)
        self.control_action.setEnabled(look.button_enabled)
        self.terminal.read_only = look.read_only
        # The controller's window sizes the terminal; a viewer sees the host's size as it is.
        controlling = self._phase is ControlPhase.CONTROLLING
        self._scroll.setWidgetResizable(controlling)
        if not controlling:
            self.terminal.resize(self.terminal.sizeHint())

    def _phase_status(self) -> str:
        match self._phase:
            case ControlPhase.CONTROLLING:
                return "You are in control: your keys go to the shared terminal"
            case ControlPhase.REQUESTING:
                return "Asking the host for control…"
            case ControlPhase.VIEWING:
                return "Watching (read-only)"
        return self.status_text

    def _show_controller(self, controller: str | None, *, you: bool) -> None:
        name = "you" if you else controller or "the host"
        self.controller_label.setText(f"In control: {name}")

    def _set_status(self, text: str) -> None:
        self.status_label.setText(text)

    def _screen_size_changed(self, cols: int, rows: int) -> None:
        if not self._scroll.widgetResizable():
            self.terminal.resize(self.terminal.sizeHint())

    def fit_to_terminal(self, *, within_screen: bool = True) -> None:
        """Size the window to show the whole terminal (no larger than the screen)."""
        wanted = self.terminal.sizeHint()
        bars = self._toolbar.sizeHint().height() + self.statusBar().sizeHint().height()
        width = max(wanted.width(), self.minimumSizeHint().width())
        height = wanted.height() + bars
        if within_screen:
            available = self.screen().availableGeometry()
            width, height = min(width, available.width()), min(height, available.height())
        self.resize(width, height)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("terminal window task failed", exc_info=task.exception())
        self.session_finished.emit()
