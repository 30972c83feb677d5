"""Settings: server, device name, downloads, rate limit, Gotify (token to the keychain),
notification priorities and start at login. The same keys as `meshagent config`."""

from __future__ import annotations

import logging
from typing import Final

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from meshagent_gui.config import AUTO_ACCEPT, KEYS, parse_value
from meshagent_gui.context import Context
from meshagent_gui.core.autostart import autostart_enabled, set_autostart
from meshagent_gui.errors import UserError

from .resources import app_icon

log = logging.getLogger(__name__)

NOTIFICATION_LABELS: Final = {
    "notify.transfer_completed": "Transfer done",
    "notify.transfer_failed": "Transfer failed",
    "notify.control_requested": "Terminal control requested",
    "notify.peer_offline": "Device went offline",
    "notify.peer_online": "Device came online",
}
AUTO_ACCEPT_LABELS: Final = dict(
    zip(
        AUTO_ACCEPT,
        (
            "From my own devices; ask for others",
            "From every device (never ask)",
            "Always ask",
        ),
        strict=True,
    )
)


class SettingsDialog(QDialog):
    """Writes the config file and the secret store on Save; a bad value keeps the dialog open.

    The server is not a field to edit: another server means enrolling there (a join code or a
    password), which "Connect to another server…" does (``connect_requested``; ui.app)."""

    connect_requested = Signal()

    def __init__(self, ctx: Context, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.ctx = ctx
        self.setWindowTitle("Mesh Agent settings")
        self.setWindowIcon(app_icon())
        self.setMinimumWidth(520)
        config = ctx.config
        layout = QVBoxLayout(self)
        layout.setContentsMargins(18, 16, 18, 14)
        layout.setSpacing(12)

        general = QGroupBox("This device")
        form = QFormLayout(general)
        self.server = QLineEdit(str(config["server.url"]))
        self.server.setReadOnly(True)  # changing servers means enrolling again: the button
        self.server.setToolTip("Connect to another server… enrols this device there")
        self.connect_button = QPushButton("Connect to another server…")
        self.connect_button.clicked.connect(self.connect_requested.emit)
        server_row = QHBoxLayout()
        server_row.addWidget(self.server, 1)
        server_row.addWidget(self.connect_button)
        self.device_name = QLineEdit(str(config["device.name"]))
        self.device_name.setPlaceholderText(ctx.device_name)
        self.downloads = QLineEdit(str(config["downloads.dir"]))
        self.downloads.setPlaceholderText("default downloads folder")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        downloads_row = QHBoxLayout()
        downloads_row.addWidget(self.downloads, 1)
        downloads_row.addWidget(browse)
        self.rate = QLineEdit(str(config["transfer.rate_limit"]))
        self.rate.setPlaceholderText("unlimited (e.g. 20M = 20 MB/s)")
        self.auto_accept = QComboBox()
        for choice, label in AUTO_ACCEPT_LABELS.items():
            self.auto_accept.addItem(label, choice)
        self.auto_accept.setCurrentIndex(
            max(0, self.auto_accept.findData(str(config["transfer.auto_accept"])))
        )
        self.autostart = QCheckBox("Start Mesh Agent when I log in")
        form.addRow("Server", server_row)
        form.addRow("Device name", self.device_name)
        form.addRow("Downloads", downloads_row)
        form.addRow("Send rate limit", self.rate)
        form.addRow("Accept files", self.auto_accept)
        form.addRow("", self.autostart)
        layout.addWidget(general)

        gotify = QGroupBox("Gotify notifications")
        gotify_form = QFormLayout(gotify)
        self.gotify_url = QLineEdit(str(config["gotify.url"]))
        self.gotify_url.setPlaceholderText("https://gotify.example.org")
        self.gotify_token = QLineEdit()
        self.gotify_token.setEchoMode(QLineEdit.EchoMode.Password)
        self._had_token = bool(ctx.secrets.get("gotify.token"))
        self.gotify_token.setPlaceholderText(
            "stored in the keychain" if self._had_token else "application token"
        )
        gotify_form.addRow("Server URL", self.gotify_url)
        gotify_form.addRow("App token", self.gotify_token)
        layout.addWidget(gotify)

        notify = QGroupBox("Notify me (Gotify priority; off = no desktop toast either)")
        notify_form = QFormLayout(notify)
        self.priorities: dict[str, QSpinBox] = {}
        for key, label in NOTIFICATION_LABELS.items():
            box = QSpinBox()
            box.setRange(int(KEYS[key].minimum or 0), int(KEYS[key].maximum or 0))
            box.setSpecialValueText("off")
            box.setValue(int(config[key]) if key in KEYS else -1)
            self.priorities[key] = box
            notify_form.addRow(label, box)
        layout.addWidget(notify)
        # Each text field and the setting it edits; saved through the setting's own rules.
        self.fields: dict[str, QLineEdit] = {
            "device.name": self.device_name,
            "downloads.dir": self.downloads,
            "transfer.rate_limit": self.rate,
            "gotify.url": self.gotify_url,
        }

        self.error = QLabel()
        self.error.setStyleSheet("color: #c62828")
        self.error.setWordWrap(True)
        self.error.hide()
        layout.addWidget(self.error)
        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel
        )
        buttons.accepted.connect(self.save)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)
        self._autostart_was = autostart_enabled(self.ctx.paths)
        self.autostart.setChecked(bool(self._autostart_was))
        self.autostart.setEnabled(self._autostart_was is not None)

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Downloads folder", self.downloads.text())
        if folder:
            self.downloads.setText(folder)

    def save(self) -> None:
        try:
            self.apply()
        except UserError as exc:
            self.error.setText(exc.message)
            self.error.show()
            return
        self.accept()

    def apply(self) -> None:
        """Check every field with the rules `meshagent config set` uses (config.KEYS), then
        write: a bad field changes nothing."""
        values = {
            name: parse_value(KEYS[name], field.text()) for name, field in self.fields.items()
        }
        values["transfer.auto_accept"] = parse_value(
            KEYS["transfer.auto_accept"], self.auto_accept.currentData()
        )
        for name, box in self.priorities.items():
            values[name] = parse_value(KEYS[name], box.value())
        config = self.ctx.config
        for name, value in values.items():
            config.set(name, value)
        config.save()
        token = self.gotify_token.text().strip()
        if token:
            self.ctx.secrets.set("gotify.token", token)
        wanted = self.autostart.isChecked()
        if self._autostart_was is not None and wanted != self._autostart_was:
            set_autostart(self.ctx.paths, wanted)
