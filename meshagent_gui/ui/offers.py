"""The accept dialog of an incoming offer of files: who, what, and where it lands ("Save to"),
as `meshagent transfers accept ID --to DIR` does for a headless agent."""

from __future__ import annotations

from html import escape
from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QDialog,
    QFileDialog,
    QLabel,
    QVBoxLayout,
    QWidget,
)

from meshagent_gui.core.events import TransferOffered
from meshagent_gui.units import human_size

from .resources import app_icon
from .widgets import answer_buttons, folder_row


class OfferDialog(QDialog):
    """Accept or decline an incoming offer; not modal, so offers never block the window.

    ``downloads`` is where the files land unless the user picks another folder ("Change…");
    ``answered`` carries that folder (None: the downloads folder)."""

    answered = Signal(str, bool, bool, object)  # transfer id, accept, always, Path | None

    def __init__(
        self,
        offer: TransferOffered,
        parent: QWidget | None = None,
        *,
        downloads: Path | None = None,
    ) -> None:
        super().__init__(parent)
        self.offer = offer
        self.downloads = downloads
        self.chosen: Path | None = None
        self.setWindowTitle("Incoming files")
        self.setWindowIcon(app_icon())
        self.setMinimumWidth(440)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(20, 18, 20, 16)
        layout.setSpacing(10)
        title = QLabel(f"<b>{escape(offer.peer_name)}</b> wants to send you")
        title.setObjectName("offerTitle")
        names = ", ".join(offer.names[:3]) + (" …" if len(offer.names) > 3 else "")
        what = QLabel(
            f"{escape(names)}<br><span style='color:#66727d'>{offer.files} file"
            f"{'s' if offer.files != 1 else ''}, {human_size(offer.total)}</span>"
        )
        what.setWordWrap(True)
        where, self.where, self.change_button = folder_row(
            "Save to", "Choose where the files are saved", self._change
        )
        self.always = QCheckBox("Always accept from this device")
        buttons, self.accept_button, self.decline_button = answer_buttons(self)
        self.accept_button.setDefault(True)
        layout.addWidget(title)
        layout.addWidget(what)
        layout.addLayout(where)
        layout.addWidget(self.always)
        layout.addWidget(buttons)
        self.finished.connect(self._finished)
        self._show_where()

    def choose_folder(self, start: Path) -> Path | None:
        """Ask for a folder (a test replaces this)."""
        chosen = QFileDialog.getExistingDirectory(self, "Save the files in", str(start))
        return Path(chosen) if chosen else None

    def set_destination(self, folder: Path | None) -> None:
        self.chosen = folder
        self._show_where()

    def _change(self) -> None:
        chosen = self.choose_folder(self.chosen or self.downloads or Path.home())
        if chosen is not None:
            self.set_destination(chosen)

    def _show_where(self) -> None:
        target = self.chosen or self.downloads
        self.where.setText(f"Save to: {target}" if target else "Save to: your downloads folder")
        self.where.setToolTip(str(target or ""))

    def _finished(self, result: int) -> None:
        accepted = result == QDialog.DialogCode.Accepted
        self.answered.emit(
            self.offer.transfer_id,
            accepted,
            accepted and self.always.isChecked(),
            self.chosen if accepted else None,
        )
