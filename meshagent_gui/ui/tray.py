"""The tray icon: state at a glance (offline / online / transferring) and the app's menu."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from PySide6.QtCore import QObject
from PySide6.QtGui import QAction
from PySide6.QtWidgets import QInputDialog, QMenu, QMessageBox, QSystemTrayIcon, QWidget

from meshagent_gui.config import Paths
from meshagent_gui.core.autostart import autostart_enabled, set_autostart
from meshagent_gui.errors import UserError

from .bridge import AgentBridge
from .devices import DeviceEntry
from .resources import TrayState, tray_icon
from .share_link import ShareLinkWindow, open_share_link

log = logging.getLogger(__name__)

ShareTerminal = Callable[[], Awaitable[None] | None]
_TOOLTIPS = {
    TrayState.OFFLINE: "Mesh Agent: offline",
    TrayState.ONLINE: "Mesh Agent: online",
    TrayState.TRANSFERRING: "Mesh Agent: transferring",
}


def tray_available() -> bool:
    return QSystemTrayIcon.isSystemTrayAvailable()


class Tray(QObject):
    """Menu actions are attributes, so tests (and the screenshot script) can trigger them."""

    def __init__(
        self,
        bridge: AgentBridge,
        paths: Paths,
        *,
        open_window: Callable[[], None],
        quit_app: Callable[[], None],
        choose_paths: Callable[[bool], list[str]],
        share_terminal: ShareTerminal | None = None,
        parent_widget: QWidget | None = None,
        open_rooms: Callable[[], None] | None = None,
        open_sync: Callable[[], None] | None = None,
        sync_folder: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.bridge = bridge
        self.paths = paths
        self.choose_paths = choose_paths
        self.choose_device: Callable[[list[DeviceEntry]], DeviceEntry | None] = self._ask_device
        self.share_terminal = share_terminal
        self._parent_widget = parent_widget
        self.icon = QSystemTrayIcon(tray_icon(bridge.tray_state))
        self.icon.setToolTip(self.tooltip(bridge.tray_state))
        self.menu = QMenu()
        self.send_file_action = self.menu.addAction("Send file…")
        self.send_file_action.triggered.connect(lambda: self.send(folder=False))
        self.send_folder_action = self.menu.addAction("Send folder…")
        self.send_folder_action.triggered.connect(lambda: self.send(folder=True))
        self.share_link_action = self.menu.addAction("Share by link…")
        self.share_link_action.setToolTip("A one-time link for someone with no account")
        self.share_link_action.triggered.connect(self.share_by_link)
        self.sync_folder_action = self.menu.addAction("Sync a folder…")
        self.sync_folder_action.setEnabled(sync_folder is not None)
        if sync_folder is not None:
            self.sync_folder_action.triggered.connect(sync_folder)
        self.share_terminal_action = self.menu.addAction("Share terminal…")
        self.share_terminal_action.setEnabled(share_terminal is not None)
        self.share_terminal_action.triggered.connect(self._share_terminal)
        self.menu.addSeparator()
        self.open_action = self.menu.addAction("Open Mesh Agent")
        self.open_action.triggered.connect(open_window)
        self.rooms_action = self.menu.addAction("Rooms…")
        self.rooms_action.setEnabled(open_rooms is not None)
        if open_rooms is not None:
            self.rooms_action.triggered.connect(open_rooms)
        self.synced_folders_action = self.menu.addAction("Synced folders")
        self.synced_folders_action.setEnabled(open_sync is not None)
        if open_sync is not None:
            self.synced_folders_action.triggered.connect(open_sync)
        self.devices_menu = self.menu.addMenu("Devices")
        self.menu.addSeparator()
        self.autostart_action = self.menu.addAction("Start at login")
        self.autostart_action.setCheckable(True)
        self.autostart_action.toggled.connect(self._toggle_autostart)
        self.menu.addSeparator()
        self.quit_action = self.menu.addAction("Quit")
        self.quit_action.triggered.connect(quit_app)
        self.icon.setContextMenu(self.menu)
        self.icon.activated.connect(self._activated)
        self._open_window = open_window
        self.menu.aboutToShow.connect(self.refresh_autostart)
        bridge.tray_state_changed.connect(self.set_state)
        bridge.link_changed.connect(lambda _: self.icon.setToolTip(self.tooltip(bridge.tray_state)))
        bridge.devices.modelReset.connect(self.rebuild_devices)
        bridge.devices.dataChanged.connect(self.rebuild_devices)
        self.rebuild_devices()
        self.refresh_autostart()

    def show(self) -> None:
        self.icon.show()

    def hide(self) -> None:
        self.icon.hide()

    def set_state(self, state: TrayState) -> None:
        self.icon.setIcon(tray_icon(state))
        self.icon.setToolTip(self.tooltip(state))

    def tooltip(self, state: TrayState) -> str:
        """The state in words; offline, why (the main window's words, without the countdown
        that a tooltip would freeze)."""
        if state is TrayState.OFFLINE and self.bridge.link_state == "offline":
            return f"Mesh Agent: offline: {self.bridge.link_reason}"
        return _TOOLTIPS[state]

    def _activated(self, reason: QSystemTrayIcon.ActivationReason) -> None:
        if reason in (
            QSystemTrayIcon.ActivationReason.Trigger,
            QSystemTrayIcon.ActivationReason.DoubleClick,
        ):
            self._open_window()

    # ------------------------------------------------------------ devices

    def rebuild_devices(self, *_: Any) -> None:
        self.devices_menu.clear()
        devices = self.bridge.devices.devices()
        if not devices:
            empty = self.devices_menu.addAction("No other devices yet")
            empty.setEnabled(False)
            return
        for device in devices:
            label = f"{device.label} — {'online' if device.online else 'offline'}"
            if device.online and device.path:
                label += f" ({device.path})"
            action: QAction = self.devices_menu.addAction(label)
            action.setEnabled(device.online)
            action.setToolTip(f"Send files to {device.name}")
            action.triggered.connect(lambda _=False, d=device: self.send(False, d))

    # ------------------------------------------------------------ actions

    def send(self, folder: bool, device: DeviceEntry | None = None) -> None:
        paths = self.choose_paths(folder)
        if not paths:
            return
        target = device or self.choose_device(self.bridge.online_devices())
        if target is not None:
            self.bridge.send(paths, target.id)

    def share_by_link(self) -> ShareLinkWindow:
        return open_share_link(self.bridge, self._parent_widget)

    def _ask_device(self, devices: list[DeviceEntry]) -> DeviceEntry | None:
        if not devices:
            self.message("No device is online to send to.")
            return None
        if len(devices) == 1:
            return devices[0]
        names = [d.label for d in devices]
        name, ok = QInputDialog.getItem(
            self._parent_widget, "Send to", "Device:", names, 0, editable=False
        )
        return devices[names.index(name)] if ok and name in names else None

    def _share_terminal(self) -> None:
        if self.share_terminal is None:
            return
        result = self.share_terminal()
        if result is not None:
            self.bridge.spawn(_awaited(result), "ui-share-terminal")

    def message(self, text: str) -> None:
        if self.icon.isVisible() and QSystemTrayIcon.supportsMessages():
            self.icon.showMessage("Mesh Agent", text)
        else:
            QMessageBox.information(self._parent_widget, "Mesh Agent", text)

    # ------------------------------------------------------------ autostart

    def refresh_autostart(self) -> None:
        enabled = autostart_enabled(self.paths)
        if enabled is None:
            self.autostart_action.setEnabled(False)
            return
        self.autostart_action.setEnabled(True)
        self.autostart_action.blockSignals(True)
        self.autostart_action.setChecked(enabled)
        self.autostart_action.blockSignals(False)

    def _toggle_autostart(self, enabled: bool) -> None:
        try:
            set_autostart(self.paths, enabled)
        except UserError as exc:
            self.message(f"Start at login: {exc.message}")
        self.refresh_autostart()


async def _awaited(awaitable: Awaitable[None]) -> None:
    await awaitable
