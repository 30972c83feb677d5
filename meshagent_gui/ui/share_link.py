"""'Share by link…': a file or folder for someone with no account (issue 13).

The window picks what to share, asks the bridge for a one-time link (the agent's ``send`` with
``link``, core/share/links.py) and shows the URL to hand out, with a Copy button and the
expiry. The send is a row in the transfer list like any other; this window follows that row:
waiting for someone to open the link, then the transfer, then its end. Cancel withdraws the link
(the agent stops waiting for a claim and sends nothing).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QFontDatabase, QGuiApplication
from PySide6.QtWidgets import (
    QDialog,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from meshagent_gui.units import human_size

from .bridge import AgentBridge
from .transfers import FINISHED, State, TransferRow
from .widgets import bring_to_front

INTRO = (
    "Anyone who opens the link receives it once, straight from this computer, in their browser. "
    "They need no account."
)

WIDTH = 600


def expiry_text(expires_at: float, now: float) -> str:
    """'Expires at 14:32 (in 15 min)'; the link's expiry in the words of a clock and a countdown."""
    left = max(0, round(expires_at - now))
    clock = time.strftime("%H:%M", time.localtime(expires_at))
    if left < 60:
        return f"Expires at {clock} (in {left} s)"
    return f"Expires at {clock} (in {round(left / 60)} min)"


class ShareLinkWindow(QDialog):
    """One link: choose, share, follow. ``choose_path`` is an attribute so tests can pick."""

    def __init__(self, bridge: AgentBridge, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.row: TransferRow | None = None
        self.url = ""
        self.expires_at = 0.0
        self.choose_path: Callable[[bool], str] = self._choose_path
        self.setWindowTitle("Share by link")
        self.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(18, 16, 18, 14)
        layout.setSpacing(10)
        title = QLabel("<b>Share a file or folder by link</b>")
        intro = QLabel(INTRO)
        intro.setWordWrap(True)
        layout.addWidget(title)
        layout.addWidget(intro)

        pick = QHBoxLayout()
        self.file_button = QPushButton("Choose a file…")
        self.file_button.clicked.connect(lambda: self.pick(folder=False))
        self.folder_button = QPushButton("Choose a folder…")
        self.folder_button.clicked.connect(lambda: self.pick(folder=True))
        pick.addWidget(self.file_button)
        pick.addWidget(self.folder_button)
        pick.addStretch(1)
        layout.addLayout(pick)

        self.item_label = QLabel()
        self.item_label.setTextFormat(Qt.TextFormat.PlainText)  # a file name is not markup
        self.item_label.hide()
        layout.addWidget(self.item_label)

        link = QHBoxLayout()
        self.url_field = QLineEdit()
        self.url_field.setReadOnly(True)
        self.url_field.setPlaceholderText("The link appears here")
        self.url_field.setAccessibleName("Share link")
        self.url_field.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.copy_button = QPushButton("Copy")
        self.copy_button.setEnabled(False)
        self.copy_button.clicked.connect(self.copy)
        link.addWidget(self.url_field, 1)
        link.addWidget(self.copy_button)
        layout.addLayout(link)

        self.expiry_label = QLabel()
        self.status_label = QLabel("Choose a file or a folder to share.")
        self.status_label.setWordWrap(True)
        self.status_label.setTextFormat(Qt.TextFormat.PlainText)  # errors quote names
        layout.addWidget(self.expiry_label)
        layout.addWidget(self.status_label)

        buttons = QHBoxLayout()
        buttons.addStretch(1)
        self.cancel_button = QPushButton("Cancel link")
        self.cancel_button.setToolTip("Withdraw the link: nothing is sent to whoever opens it")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.withdraw)
        self.close_button = QPushButton("Close")
        self.close_button.setToolTip("The link stays open; the transfer list follows it")
        self.close_button.clicked.connect(self.close)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.close_button)
        layout.addLayout(buttons)

        self.resize(WIDTH, 0)
        self._fit()
        bridge.link_shared.connect(self._link_shared)
        bridge.transfers.dataChanged.connect(self._row_changed)

    # ------------------------------------------------------------ actions

    def pick(self, folder: bool) -> None:
        path = self.choose_path(folder)
        if path:
            self.share(path)

    def share(self, path: str) -> TransferRow:
        """Ask for a link to ``path``; the URL comes with the bridge's ``link_shared``."""
        self.row = self.bridge.share_by_link(path)
        self.file_button.setEnabled(False)
        self.folder_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        what = Path(path)
        try:
            size = "" if what.is_dir() else f" ({human_size(what.stat().st_size)})"
        except OSError:
            size = ""  # gone since it was picked: the send itself says so, in its row
        kind = "Folder (sent as one .zip)" if what.is_dir() else "File"
        self.item_label.setText(f"{kind}: {what.name}{size}")
        self.item_label.show()
        self.status_label.setText("Creating the link…")
        self._row_changed()
        return self.row

    def copy(self) -> None:
        clipboard = QGuiApplication.clipboard()
        if self.url and clipboard is not None:
            clipboard.setText(self.url)
            self.copy_button.setText("Copied")

    def withdraw(self) -> None:
        if self.row is not None:
            self.bridge.cancel(self.row)

    def _fit(self) -> None:
        """Tall enough for what shows now: a top-level window is not sized to its wrapped text,
        nor grown for a label shown later, by itself."""
        layout = self.layout()
        needed = layout.totalHeightForWidth(self.width()) if layout is not None else 0
        if needed > self.height():
            self.resize(self.width(), needed)

    def _choose_path(self, folder: bool) -> str:
        if folder:
            return QFileDialog.getExistingDirectory(self, "Share a folder by link")
        chosen, _ = QFileDialog.getOpenFileName(self, "Share a file by link")
        return chosen

    # ------------------------------------------------------------ following the send

    def _link_shared(self, row: TransferRow, url: str, expires_at: float) -> None:
        if row is not self.row:
            return
        self.url, self.expires_at = url, expires_at
        self.url_field.setText(url)
        self.url_field.setCursorPosition(0)
        self.copy_button.setEnabled(True)
        self._row_changed()

    def _row_changed(self, *_: Any) -> None:
        row = self.row
        if row is None:
            return
        waiting = row.state not in FINISHED and not row.peer_id
        if self.expires_at and waiting:
            self.expiry_label.setText(expiry_text(self.expires_at, time.time()))
        self.expiry_label.setVisible(bool(self.expires_at) and waiting)
        self._fit()
        self.cancel_button.setEnabled(row.state not in FINISHED)
        self.status_label.setText(self._state_text())

    def _state_text(self) -> str:
        row = self.row
        if row is None:
            return ""
        if row.state is State.DONE:
            return "Sent. The link is spent: nobody else can open it."
        if row.state is State.CANCELLED:
            return "Cancelled: the link is withdrawn."
        if row.state in FINISHED:
            return self.bridge.transfers.state_text(row)
        if not self.url:
            return "Creating the link…"
        if not row.peer_id:
            return "Waiting for someone to open it."
        if row.state is State.RUNNING:
            return f"Opened: sending, {row.fraction * 100:.0f} % (see the transfer list)."
        return "Opened: connecting to their browser…"


def open_share_link(bridge: AgentBridge, parent: QWidget | None = None) -> ShareLinkWindow:
    """The 'Share by link…' action of the tray and the main window."""
    window = ShareLinkWindow(bridge, parent)
    bring_to_front(window)
    return window
