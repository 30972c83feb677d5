"""Small pieces the app's windows share: one-line messages, plain-text labels, the Accept /
Decline buttons and "where it goes" row of the offer dialogs, bringing a window to the front,
and the type of the bridge's task spawner that view models run the user's actions with."""

from __future__ import annotations

import asyncio
import unicodedata
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QWidget,
)

Spawn = Callable[[Coroutine[Any, Any, Any], str], "asyncio.Task[Any]"]

_MAX_LINE: Final = 240


def one_line(text: str) -> str:
    """A message as one short line: control characters and newlines become spaces."""
    kept = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text)
    kept = " ".join(kept.split())
    return kept if len(kept) <= _MAX_LINE else kept[: _MAX_LINE - 1] + "…"


def show_message(label: QLabel, text: str, *, error: bool) -> None:
    """``text`` as one line in a window's message label, styled by its ``error`` property."""
    label.setText(one_line(text))
    label.setProperty("error", "true" if error else "false")
    label.style().unpolish(label)  # a dynamic property restyles only when re-polished
    label.style().polish(label)
    label.show()


def plain_label(text: str = "", name: str = "") -> QLabel:
    """A wrapping label showing ``text`` as written, never as markup: names, labels and folders
    come from other devices and people. ``name`` is its accessible name."""
    label = QLabel(text)
    label.setTextFormat(Qt.TextFormat.PlainText)
    label.setWordWrap(True)
    if name:
        label.setAccessibleName(name)
    return label


def answer_buttons(dialog: QDialog) -> tuple[QDialogButtonBox, QPushButton, QPushButton]:
    """Accept and Decline buttons that accept or reject ``dialog``: (box, accept, decline)."""
    box = QDialogButtonBox()
    accept = box.addButton("Accept", QDialogButtonBox.ButtonRole.AcceptRole)
    decline = box.addButton("Decline", QDialogButtonBox.ButtonRole.RejectRole)
    box.accepted.connect(dialog.accept)
    box.rejected.connect(dialog.reject)
    return box, accept, decline


def folder_row(
    name: str, change_name: str, change: Callable[[], None]
) -> tuple[QHBoxLayout, QLabel, QPushButton]:
    """Where something lands, selectable as text, and a "Change…" button that calls ``change``:
    (row, label, button); the accessible names are ``name`` and ``change_name``."""
    row = QHBoxLayout()
    where = plain_label(name=name)
    where.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    button = QPushButton("Change…")
    button.setAccessibleName(change_name)
    button.clicked.connect(change)
    row.addWidget(where, 1)
    row.addWidget(button)
    return row, where, button


def bring_to_front(window: QWidget) -> None:
    """Show ``window``, restored if minimised, raised and active."""
    window.show()
    window.setWindowState(
        (window.windowState() & ~Qt.WindowState.WindowMinimized) | Qt.WindowState.WindowActive
    )
    window.raise_()
    window.activateWindow()


async def succeeded(call: Awaitable[None]) -> bool:
    """An API call that answers nothing: True once it succeeded (None means it failed)."""
    await call
    return True
