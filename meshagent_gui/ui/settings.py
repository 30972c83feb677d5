"""Settings: server, device name, downloads, rate limit, Gotify (token to the keychain),
notification priorities and start at login. The same keys as `meshagent config`."""

from __future__ import annotations

import logging
from typing import Final

from PySide6.QtWidgets import (
    QCheckBox,
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

from meshagent_gui.config import KEYS
from meshagent_gui.context import Context
from meshagent_gui.core.autostart import autostart_enabled, set_autostart
from meshagent_gui.core.share.ratelimit import parse_rate
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


class SettingsDialog(QDialog):
    """Writes the config file and the secret store on Save; a bad value keeps the dialog open."""

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
        self.server.setReadOnly(True)  # changing servers means enrolling again
        self.server.setToolTip("Enrol with another server with `meshagent login`")
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
        self.autostart = QCheckBox("Start Mesh Agent when I log in")
        form.addRow("Server", self.server)
        form.addRow("Device name", self.device_name)
        form.addRow("Downloads", downloads_row)
        form.addRow("Send rate limit", self.rate)
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
            box.setRange(-1, 10)
            box.setSpecialValueText("off")
            box.setValue(int(config[key]) if key in KEYS else -1)
            self.priorities[key] = box
            notify_form.addRow(label, box)
        layout.addWidget(notify)

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
        """Validate everything first, then write: a bad field changes nothing."""
        rate = self.rate.text().strip()
        parse_rate(rate)
        gotify_url = self.gotify_url.text().strip()
        if gotify_url and not gotify_url.startswith(("http://", "https://")):
            raise UserError("the Gotify URL must start with http:// or https://", code="bad_value")
        config = self.ctx.config
        config.set("device.name", self.device_name.text().strip())
        config.set("downloads.dir", self.downloads.text().strip())
        config.set("transfer.rate_limit", rate)
        config.set("gotify.url", gotify_url)
        for key, box in self.priorities.items():
            config.set(key, box.value())
        config.save()
        token = self.gotify_token.text().strip()
        if token:
            self.ctx.secrets.set("gotify.token", token)
        wanted = self.autostart.isChecked()
        if self._autostart_was is not None and wanted != self._autostart_was:
            set_autostart(self.ctx.paths, wanted)
