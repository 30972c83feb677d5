"""Settings: server, device name, downloads, rate limit, Gotify (token to the keychain),
notification priorities and start at login. The same keys as `meshagent config`."""

from __future__ import annotations

import logging
from typing import Final

from PySide6.QtCore import Qt, Signal
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
    QVBoxLayout,
    QWidget,
)

from meshagent_gui.config import AUTO_ACCEPT, KEYS, parse_value
from meshagent_gui.context import Context
from meshagent_gui.core.autostart import autostart_enabled, set_autostart
from meshagent_gui.core.notify.router import OFF
from meshagent_gui.errors import UserError

from .resources import app_icon

log = logging.getLogger(__name__)

# What each notify.<kind> key (config.KEYS; the router's RULES) is about, in the user's words.
# The keys themselves come from KEYS: a kind without a label here still gets a row.
NOTIFICATION_LABELS: Final = {
    "transfer_completed": "Transfer finished",
    "transfer_failed": "Transfer failed",
    "control_requested": "Terminal control requested",
    "sync_conflict": "Sync conflict",
    "sync_failed": "Sync stopped",
    "update_available": "A newer Mesh Agent is available",
    "peer_offline": "Device went offline",
    "peer_online": "Device came online",
}
# The one table of priorities in words, on Gotify's scale: each level's lowest priority, its
# name, what it does, and the value choosing it writes. Below 0 is off: no desktop toast either.
PRIORITY_LEVELS: Final = (
    (-(10**9), "Off", "no notification, not even on this desktop", OFF),
    (0, "Silent", "kept in Gotify's list, no alert", 0),
    (1, "Low", "an icon in the phone's status bar", 2),
    (4, "Normal", "a notification with sound", 4),
    (7, "High", "a notification with sound, for what needs a look", 7),
    (8, "Urgent", "pops up on the phone, with sound and vibration", 8),
)


def priority_level(priority: int) -> int:
    """The index in PRIORITY_LEVELS of the level ``priority`` belongs to."""
    return max(n for n, level in enumerate(PRIORITY_LEVELS) if priority >= level[0])


def priority_label(priority: int) -> str:
    """A priority in words: "Off", "Normal", "Urgent" (PRIORITY_LEVELS)."""
    return PRIORITY_LEVELS[priority_level(priority)][1]


def notification_keys() -> list[str]:
    """The notify.* settings, in the order config.KEYS defines them (one definition)."""
    return [name for name in KEYS if name.startswith("notify.")]


def notification_label(key: str) -> str:
    kind = key.removeprefix("notify.")
    return NOTIFICATION_LABELS.get(kind, kind.replace("_", " ").capitalize())


class PriorityBox(QComboBox):
    """A notification's priority as a level in words. A number set elsewhere (`meshagent config
    set notify.sync_conflict 6`) shows as its level and is written back unchanged unless
    another level is chosen."""

    def __init__(self, value: int, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        for n, (_, name, meaning, written) in enumerate(PRIORITY_LEVELS):
            self.addItem(name, written)
            self.setItemData(n, meaning, Qt.ItemDataRole.ToolTipRole)
        self.setToolTip("Gotify priority: 0 silent, 1-3 low, 4-6 normal, 7 high, 8-10 urgent")
        self._kept = (-1, OFF)
        self.setValue(value)

    def value(self) -> int:
        index, kept = self._kept
        return kept if self.currentIndex() == index else int(self.currentData())

    def setValue(self, value: int) -> None:  # QSpinBox's name, for callers
        index = priority_level(value)
        self._kept = (index, value if value >= 0 else OFF)
        self.setCurrentIndex(index)


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
        self.setMinimumWidth(560)
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

        notify = QGroupBox("Notify me (on this desktop and through Gotify)")
        notify_form = QFormLayout(notify)
        self.priorities: dict[str, PriorityBox] = {}
        for key in notification_keys():
            box = PriorityBox(_priority(config[key]))
            self.priorities[key] = box
            notify_form.addRow(notification_label(key), box)
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

    def summary(self) -> list[str]:
        """The notification settings as shown: "Transfer finished: normal (with sound)", ..."""
        return [
            f"{notification_label(key)}: {box.currentText().lower()}"
            for key, box in self.priorities.items()
        ]

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


def _priority(raw: object) -> int:
    # A hand-edited file may hold "5"; anything unreadable shows as off, as the router treats it.
    try:
        return int(str(raw))
    except ValueError:
        return OFF
