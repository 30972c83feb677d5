"""The host's consent prompt: another device asks to control a shared terminal.

The dialog is not modal and does not run a nested event loop (``exec``): the agent keeps
running while it is open, and the caller awaits the answer. No answer in time is a no, and the
dialog says how long is left.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Final

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QAbstractButton, QMessageBox, QWidget

DEFAULT_TIMEOUT: Final = 30.0


async def ask_control(
    parent: QWidget | None, device_name: str, session_title: str, timeout: float = DEFAULT_TIMEOUT
) -> bool:
    """Ask the user whether ``device_name`` may control the terminal ``session_title``.

    True only if the user clicks Allow within ``timeout`` seconds; closing the dialog, Deny,
    Escape or the timeout all mean no. Cancelling the caller closes the dialog.
    """
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[bool] = loop.create_future()
    deadline = time.monotonic() + timeout

    box = QMessageBox(parent)
    box.setObjectName("control-prompt")
    box.setWindowTitle("Control requested")
    box.setIcon(QMessageBox.Icon.Question)
    box.setTextFormat(Qt.TextFormat.PlainText)  # the names come from other devices
    box.setText(f"{device_name} asks to control your shared terminal “{session_title}”.")
    allow = box.addButton("Allow control", QMessageBox.ButtonRole.AcceptRole)
    deny = box.addButton("Deny", QMessageBox.ButtonRole.RejectRole)
    box.setDefaultButton(deny)
    box.setEscapeButton(deny)
    box.setWindowModality(Qt.WindowModality.NonModal)

    def show_time_left() -> None:
        left = max(0, math.ceil(deadline - time.monotonic()))
        box.setInformativeText(
            "They will be able to type in it until you or they take control back."
            f"\nDenied automatically in {left} s."
        )

    def clicked(button: QAbstractButton) -> None:
        if not answer.done():
            answer.set_result(button is allow)

    def finished(_result: int) -> None:
        if not answer.done():
            answer.set_result(False)  # closed with the window's close button

    countdown = QTimer(box)
    countdown.setInterval(1000)
    countdown.timeout.connect(show_time_left)
    box.buttonClicked.connect(clicked)
    box.finished.connect(finished)
    show_time_left()
    countdown.start()
    box.show()
    box.raise_()
    box.activateWindow()
    try:
        async with asyncio.timeout(timeout):
            return await answer
    except TimeoutError:
        return False
    finally:
        countdown.stop()
        box.buttonClicked.disconnect(clicked)
        box.finished.disconnect(finished)
        box.close()
        box.deleteLater()
