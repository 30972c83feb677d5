"""The sharing side's window: the shared terminal itself, who watches, who controls, and Take
control back / Stop sharing.

The window is the host's own console for a :class:`~meshagent_gui.core.terminal.service.
SharedTerminal`: PTY output is painted by the same :class:`TerminalWidget` viewers use, keys go
straight to the PTY (the host's console can always type), and the window's size drives the PTY
while nobody else controls it. It owns the session's task: closing the window stops sharing.
Control requests from other users' devices are answered through :func:`ask_control`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from PySide6.QtCore import Signal
from PySide6.QtGui import QAction, QCloseEvent, QShowEvent
from PySide6.QtWidgets import QMainWindow, QToolBar, QWidget

from meshagent_gui.core.terminal import host as h
from meshagent_gui.core.terminal.pty import ExitStatus
from meshagent_gui.core.terminal.service import ControlAsk, SharedTerminal
from meshagent_gui.ui.control_prompt import ask_control
from meshagent_gui.ui.terminal_widget import TerminalWidget, add_session_labels

log = logging.getLogger(__name__)

CONSENT_TIMEOUT: Final = 30.0


class HostTerminalWindow(QMainWindow):
    """One shared terminal, as its host sees and drives it."""

    session_finished = Signal()

    def __init__(self, shared: SharedTerminal, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.shared = shared
        self._task: asyncio.Task[ExitStatus] | None = None
        self.setWindowTitle(f"{shared.title} — shared")
        cols, rows = shared.host.size
        self.terminal = TerminalWidget(cols, rows)
        self.terminal.input_ready.connect(self._typed)
        self.terminal.fitting_size_changed.connect(self._fitting)
        self.setCentralWidget(self.terminal)

        toolbar = QToolBar("Sharing")
        toolbar.setMovable(False)
        self.revoke_action = QAction("Take control back", self)
        self.revoke_action.triggered.connect(shared.revoke_control)
        self.stop_action = QAction("Stop sharing", self)
        self.stop_action.triggered.connect(shared.stop)
        toolbar.addAction(self.revoke_action)
        toolbar.addAction(self.stop_action)
        toolbar.addSeparator()
        self.control_label, self.status_label = add_session_labels(self, toolbar)

        shared.console_output = self.terminal.feed
        shared.on_event = self._event
        shared.consent = self._consent
        self._show_state()
        self.resize(self.terminal.pixel_size(cols, rows))

    @property
    def task(self) -> asyncio.Task[ExitStatus] | None:
        return self._task

    def start(self) -> asyncio.Task[ExitStatus]:
        """Share until the command exits (the window owns the task; idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self.shared.run(), name=f"terminal-share-{self.shared.session_id}"
            )
            self._task.add_done_callback(self._finished)
        return self._task

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        self.start()
        self.terminal.setFocus()

    def closeEvent(self, event: QCloseEvent) -> None:
        if self._task is not None and not self._task.done():
            self.shared.stop()  # hang up the command; run() tells the viewers
        super().closeEvent(event)

    # ------------------------------------------------------------ the session

    def _typed(self, data: bytes) -> None:
        self.shared.host.console_input(data)

    def _fitting(self, cols: int, rows: int) -> None:
        self.shared.host.set_console_size(cols, rows)
        self.terminal.resize_screen(*self.shared.host.size)

    async def _consent(self, ask: ControlAsk) -> bool:
        return await ask_control(self, ask.device_name, self.shared.title, CONSENT_TIMEOUT)

    def _event(self, event: h.HostEvent) -> None:
        if isinstance(event, h.HostControlChanged):
            self.terminal.resize_screen(*self.shared.host.size)  # the controller's size rules
        if isinstance(event, h.ViewerJoined | h.ViewerLeft | h.HostControlChanged):
            self._show_state()

    def _show_state(self) -> None:
        if self._task is not None and self._task.done():
            return  # the last word is how the session ended
        host = self.shared.host
        controller = host.controller
        self.control_label.setText(f"In control: {controller or 'you'}")
        self.revoke_action.setEnabled(controller is not None)
        watching = ", ".join(v.party for v in host.viewers) or "nobody yet"
        self.status_label.setText(f"Shared as {self.shared.session_id} · watching: {watching}")

    def _finished(self, task: asyncio.Task[ExitStatus]) -> None:
        if task.cancelled():
            text = "Sharing stopped"
        elif (error := task.exception()) is not None:
            log.error("terminal share failed", exc_info=error)
            text = f"Sharing failed: {error}"
        else:
            status = task.result()
            text = f"Session ended (exit {status.returncode})"
        self.status_label.setText(text)
        self.terminal.read_only = True
        self.revoke_action.setEnabled(False)
        self.stop_action.setEnabled(False)
        self.session_finished.emit()
