"""The main window: devices, transfers, a drop zone, the local mesh's join code, offers."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from html import escape
from pathlib import Path
from typing import Any, TypeVar

from PySide6.QtCore import QPoint, Qt, QTimer, QUrl, Signal
from PySide6.QtGui import (
    QCloseEvent,
    QDesktopServices,
    QDragEnterEvent,
    QDragLeaveEvent,
    QDragMoveEvent,
    QDropEvent,
    QGuiApplication,
)
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QMenu,
    QPushButton,
    QSizePolicy,
    QSplitter,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from meshagent_gui.compose.onboarding import JoinCodeWithUrl
from meshagent_gui.core.events import TransferOffered
from meshagent_gui.core.ipc_types import TransferInfo
from meshagent_gui.core.mesh.pairing import is_loopback_url, pairing_code
from meshagent_gui.core.notify.router import Notification

from .bridge import AgentBridge
from .devices import DeviceEntry, DeviceListView, local_paths
from .offers import OfferDialog
from .resources import app_icon
from .share_link import ShareLinkWindow, open_share_link
from .transfers import (
    Column,
    HistoryWindow,
    ProgressDelegate,
    TransferRow,
    fit_transfer_columns,
)
from .tunnels import TunnelsWindow
from .widgets import bring_to_front

log = logging.getLogger(__name__)


W = TypeVar("W", bound=QWidget)


def named(widget: W, name: str) -> W:
    """Give a widget the object name the style sheet addresses."""
    widget.setObjectName(name)
    return widget


STYLE = """
QMainWindow, #central { background: palette(window); }
#title { font-size: 17pt; font-weight: 600; }
#subtitle { color: palette(mid); }
#sectionTitle { font-size: 11pt; font-weight: 600; padding: 2px 2px 4px 2px; }
#pill { border-radius: 10px; padding: 3px 10px; color: white; font-weight: 600; }
#pill[state="online"] { background: #2e9d6a; }
#pill[state="connecting"] { background: #d08a1d; }
#pill[state="offline"] { background: #8b95a1; }
#banner { background: #fff4d6; color: #5c4400; border: 1px solid #f0d58a; border-radius: 8px;
          padding: 8px 12px; }
#card { background: #eef6f5; border: 1px solid #bfdcd8; border-radius: 10px; }
#joinCode { font-family: monospace; font-size: 14pt; font-weight: 600; color: #1d4e89; }
#dropZone { border: 2px dashed #9fb8c8; border-radius: 12px; color: #5d7180; background: #f7fafc; }
#dropZone[active="true"] { border-color: #2a9d8f; background: #e6f4f1; color: #1f6f65; }
QTableView { border: 1px solid #d6dde3; border-radius: 8px; gridline-color: transparent;
             selection-background-color: #d7ebf7; selection-color: black; }
QListView { border: 1px solid #d6dde3; border-radius: 8px; padding: 4px; }
QHeaderView::section { background: transparent; border: none; border-bottom: 1px solid #d6dde3;
                       padding: 6px 4px; font-weight: 600; color: #4a5560; }
QPushButton { padding: 5px 14px; }
"""


class DropZone(QLabel):
    """The visible target; the whole window takes drops, this says so."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("dropZone")
        self.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.setMinimumHeight(72)
        self.setWordWrap(True)
        self.set_target(None)

    def set_target(self, device: DeviceEntry | None) -> None:
        # Device names come from peers: escaped, or a name could inject markup into the label.
        where = "a device (select one, or drop on it)"
        if device is not None:
            where = f"<b>{escape(device.label)}</b>"
        self.setText(f"Drop files or folders here to send them to {where}")

    def set_active(self, active: bool) -> None:
        self.setProperty("active", "true" if active else "false")
        self.style().unpolish(self)
        self.style().polish(self)


class MainWindow(QMainWindow):
    """Everything the tray does, in a window; also the drop target."""

    settings_requested = Signal()
    share_terminal_requested = Signal()
    closed = Signal()  # closed for good (no tray to keep the app): the app quits
    rooms_requested = Signal()
    sync_requested = Signal()  # "Synced folders"

    def __init__(self, bridge: AgentBridge, *, keep_running_on_close: bool = True) -> None:
        super().__init__()
        self.bridge = bridge
        self.keep_running_on_close = keep_running_on_close
        self.offers: dict[str, OfferDialog] = {}
        self.drop_zone = DropZone()
        self.open_terminal: Callable[[DeviceEntry], None] | None = None
        self.sync_folder_with: Callable[[DeviceEntry], None] | None = None
        self.choose_paths: Callable[[bool], list[str]] = self._choose_paths
        self.setWindowTitle("Mesh Agent")
        self.setWindowIcon(app_icon())
        self.setAcceptDrops(True)
        self.setStyleSheet(STYLE)
        # The transfer list's Name column readable (≥ 180 px) beside a device list that needs
        # no sideways scrolling (its rows are 220 px).
        self.resize(1100, 660)
        self._link_timer = QTimer(self)  # counts down "retrying in N s" while offline
        self._link_timer.setInterval(1000)
        self._link_timer.timeout.connect(lambda: self._show_link(self.bridge.link_state))
        self._build()
        bridge.link_changed.connect(self._show_link)
        bridge.join_code_changed.connect(self.show_join_code)
        bridge.offer_received.connect(self.ask_offer)
        bridge.error.connect(self.show_notice)
        bridge.ready.connect(self._ready)
        bridge.devices.modelReset.connect(self._devices_changed)
        bridge.devices.dataChanged.connect(self._devices_changed)
        self._show_link(bridge.link_state)

    # ------------------------------------------------------------ layout

    def _build(self) -> None:
        central = named(QWidget(), "central")
        outer = QVBoxLayout(central)
        outer.setContentsMargins(18, 14, 18, 14)
        outer.setSpacing(12)

        header = QHBoxLayout()
        logo = QLabel()
        logo.setPixmap(app_icon().pixmap(40, 40))
        titles = QVBoxLayout()
        titles.setSpacing(0)
        title = named(QLabel("Mesh Agent"), "title")
        self.subtitle = named(QLabel(), "subtitle")
        titles.addWidget(title)
        titles.addWidget(self.subtitle)
        self.pill = named(QLabel(), "pill")
        self.settings_button = QPushButton("Settings")
        self.settings_button.clicked.connect(self.settings_requested.emit)
        self.rooms_button = QPushButton("Rooms")
        self.rooms_button.clicked.connect(self.rooms_requested.emit)
        self.sync_button = QPushButton("Synced folders")
        self.sync_button.clicked.connect(self.sync_requested.emit)
        # Beside the list's own buttons it would widen the window past its default size.
        self.history_button = QPushButton("History")
        self.history_button.setToolTip("Finished transfers, kept across restarts")
        self.history_button.clicked.connect(self.open_history)
        self.history: HistoryWindow | None = None
        self.tunnels_button = QPushButton("Tunnels")
        self.tunnels_button.setToolTip("Exposed ports, forwards and shells opened here")
        self.tunnels_button.clicked.connect(self.open_tunnels)
        self.tunnels: TunnelsWindow | None = None
        header.addWidget(logo)
        header.addSpacing(6)
        header.addLayout(titles)
        header.addStretch(1)
        header.addWidget(self.pill, 0, Qt.AlignmentFlag.AlignVCenter)
        header.addSpacing(8)
        header.addWidget(self.history_button)
        header.addWidget(self.tunnels_button)
        header.addWidget(self.sync_button)
        header.addWidget(self.rooms_button)
        header.addWidget(self.settings_button)
        outer.addLayout(header)

        self.banner = named(QLabel(), "banner")
        self.banner.setWordWrap(True)
        self.banner.hide()
        outer.addWidget(self.banner)

        self.card = named(QFrame(), "card")
        card_layout = QHBoxLayout(self.card)
        card_layout.setContentsMargins(14, 10, 14, 10)
        card_text = QVBoxLayout()
        card_text.setSpacing(2)
        self.card_heading = QLabel("<b>Local mesh on this computer</b>")
        self.card_detail = QLabel()
        self.card_detail.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        card_text.addWidget(self.card_heading)
        card_text.addWidget(self.card_detail)
        self.join_code_label = named(QLabel(), "joinCode")
        self.join_code_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.copy_button = QPushButton("Copy")
        self.copy_button.clicked.connect(self._copy_join)
        self.new_code_button = QPushButton("New code")
        self.new_code_button.clicked.connect(
            lambda: self.bridge.spawn(self.bridge.new_join_code(), "ui-join-code")
        )
        card_layout.addLayout(card_text, 1)
        card_layout.addWidget(self.join_code_label)
        card_layout.addWidget(self.copy_button)
        card_layout.addWidget(self.new_code_button)
        self.card.hide()
        outer.addWidget(self.card)

        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.setChildrenCollapsible(False)
        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(0, 0, 6, 0)
        left_layout.addWidget(named(QLabel("Devices"), "sectionTitle"))
        self.device_list = DeviceListView()
        self.device_list.setModel(self.bridge.devices)
        self.device_list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.device_list.files_dropped.connect(self.send_to)
        self.device_list.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.device_list.customContextMenuRequested.connect(self._device_menu)
        self.device_list.selectionModel().currentChanged.connect(self._devices_changed)
        self.no_devices = QLabel(
            "No other device yet.\nAdd one with a join code\n(meshagent join CODE)."
        )
        self.no_devices.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.no_devices.setWordWrap(True)
        self.no_devices.setObjectName("subtitle")
        left_layout.addWidget(self.device_list, 1)
        left_layout.addWidget(self.no_devices)
        # For someone with no device here; under the list, where it widens nothing.
        self.share_link_button = QPushButton("Share by link…")
        self.share_link_button.setToolTip("A one-time link for someone with no account")
        self.share_link_button.clicked.connect(self.share_by_link)
        left_layout.addWidget(self.share_link_button)
        left.setMinimumWidth(220)

        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.setContentsMargins(6, 0, 0, 0)
        right_layout.addWidget(named(QLabel("Transfers"), "sectionTitle"))
        self.table = QTableView()
        self.table.setModel(self.bridge.transfers)
        self.table.setItemDelegateForColumn(Column.PROGRESS, ProgressDelegate(self.table))
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setShowGrid(False)
        self.table.setAlternatingRowColors(False)
        self.table.verticalHeader().hide()
        self.table.verticalHeader().setDefaultSectionSize(34)
        self.table.setWordWrap(False)
        fit_transfer_columns(self.table)
        self.table.selectionModel().selectionChanged.connect(self._update_buttons)
        self.bridge.transfers.dataChanged.connect(self._update_buttons)
        self.bridge.transfers.rowsInserted.connect(self._update_buttons)
        right_layout.addWidget(self.table, 1)
        # The selected transfer's whole state, wrapped: the State column elides long reasons.
        self.transfer_detail = named(QLabel(), "subtitle")
        self.transfer_detail.setWordWrap(True)
        self.transfer_detail.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.transfer_detail.hide()
        right_layout.addWidget(self.transfer_detail)

        buttons = QHBoxLayout()
        self.send_button = QPushButton("Send files…")
        self.send_button.clicked.connect(lambda: self.pick_and_send(folder=False))
        self.send_folder_button = QPushButton("Send folder…")
        self.send_folder_button.clicked.connect(lambda: self.pick_and_send(folder=True))
        # The tray's "Share terminal…", here too: a desktop without a tray has only this window.
        self.share_terminal_button = QPushButton("Share terminal…")
        self.share_terminal_button.clicked.connect(self.share_terminal_requested.emit)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self._cancel_selected)
        self.resume_button = QPushButton("Resume")
        self.resume_button.clicked.connect(self._resume_selected)
        self.open_button = QPushButton("Open folder")
        self.open_button.clicked.connect(self._open_selected)
        self.clear_button = QPushButton("Clear finished")
        self.clear_button.clicked.connect(self.bridge.transfers.clear_finished)
        for button in (self.send_button, self.send_folder_button, self.share_terminal_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        for button in (self.cancel_button, self.resume_button, self.open_button, self.clear_button):
            buttons.addWidget(button)
        right_layout.addLayout(buttons)
        self.drop_zone.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        right_layout.addWidget(self.drop_zone)

        splitter.addWidget(left)
        splitter.addWidget(right)
        splitter.setStretchFactor(1, 1)
        splitter.setStretchFactor(0, 0)
        splitter.setSizes([250, 850])
        outer.addWidget(splitter, 1)
        self.setCentralWidget(central)
        self.statusBar().setSizeGripEnabled(False)
        self._update_buttons()
        self._devices_changed()

    # ------------------------------------------------------------ state shown

    def _ready(self) -> None:
        agent = self.bridge.agent
        if agent is not None:
            self.subtitle.setText(
                f"{agent.ctx.device_name} · {agent.enrollment.user} on {agent.enrollment.url}"
            )

    def _show_link(self, state: str) -> None:
        self.pill.setText(self.bridge.link_text())  # offline says why: the link's last error
        if state == "offline" and self.bridge.link_retry_at is not None:
            if not self._link_timer.isActive():
                self._link_timer.start()
        else:
            self._link_timer.stop()
        self.pill.setProperty("state", state if state in ("online", "connecting") else "offline")
        self.pill.style().unpolish(self.pill)
        self.pill.style().polish(self.pill)

    def show_notice(self, text: str) -> None:
        """A one-line message in the banner (no tray, an error); stays until the next one."""
        self.banner.setText(text)
        self.banner.show()

    def show_toast(self, notification: Notification) -> None:
        """A desktop notification where no tray can show it: the status line, for a while."""
        self.statusBar().showMessage(f"{notification.title}: {notification.message}", 10_000)

    def show_join_code(self, join: JoinCodeWithUrl) -> None:
        long_code = escape(pairing_code(join.url, join.code))
        if is_loopback_url(join.url):
            where = "Another agent on this computer joins with"
        else:  # found on the network by the code alone (mDNS); the long code from anywhere
            where = "Computers on this network join with the code alone; from anywhere:"
        self.card_detail.setText(
            f"{where} <code>meshagent join {long_code}</code><br>"
            "<span style='color:#66727d'>One-time code, valid for 10 minutes.</span>"
        )
        self.join_code_label.setText(join.code)
        self.card.show()

    def _copy_join(self) -> None:
        join = self.bridge.join_code
        clipboard = QGuiApplication.clipboard()
        if join is not None and clipboard is not None:
            clipboard.setText(f"meshagent join {pairing_code(join.url, join.code)}")
            self.statusBar().showMessage("Copied the join command", 3000)

    def _devices_changed(self, *_: Any) -> None:
        has_devices = self.bridge.devices.rowCount() > 0
        self.no_devices.setVisible(not has_devices)
        self.drop_zone.set_target(self.target_device())

    # ------------------------------------------------------------ sending

    def target_device(self) -> DeviceEntry | None:
        """Where a drop on the window goes: the selected device, else the only online one."""
        selected = self.device_list.selected_device()
        if selected is not None:
            return selected
        online = self.bridge.online_devices()
        return online[0] if len(online) == 1 else None

    def send_to(self, paths: list[str], device_id: str) -> TransferRow | None:
        if not paths:
            return None
        row = self.bridge.send(paths, device_id)
        self.statusBar().showMessage(f"Sending {row.name} to {row.peer_name}", 4000)
        return row

    def pick_and_send(self, folder: bool, device: DeviceEntry | None = None) -> None:
        target = device or self.target_device()
        if target is None:
            self.show_notice("Choose a device first: select it in the list, then send.")
            return
        paths = self.choose_paths(folder)
        if paths:
            self.send_to(paths, target.id)

    def share_by_link(self) -> ShareLinkWindow:
        return open_share_link(self.bridge, self)

    def _choose_paths(self, folder: bool) -> list[str]:
        if folder:
            chosen = QFileDialog.getExistingDirectory(self, "Send folder")
            return [chosen] if chosen else []
        files, _ = QFileDialog.getOpenFileNames(self, "Send files")
        return list(files)

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if local_paths(event):
            event.acceptProposedAction()
            self.drop_zone.set_active(True)
        else:
            event.ignore()

    def dragMoveEvent(self, event: QDragMoveEvent) -> None:
        if local_paths(event):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dragLeaveEvent(self, event: QDragLeaveEvent) -> None:
        self.drop_zone.set_active(False)
        super().dragLeaveEvent(event)

    def dropEvent(self, event: QDropEvent) -> None:
        self.drop_zone.set_active(False)
        paths = local_paths(event)
        if not paths:
            event.ignore()
            return
        target = self.target_device()
        if target is None:
            self.show_notice("Drop onto a device in the list, or select one first.")
            event.ignore()
            return
        event.acceptProposedAction()
        self.send_to(paths, target.id)

    def _device_menu(self, position: QPoint) -> None:
        device = self.device_list.device_at(position)
        if device is None:
            return
        menu = QMenu(self)
        menu.addAction("Send files…", lambda: self.pick_and_send(False, device))
        menu.addAction("Send folder…", lambda: self.pick_and_send(True, device))
        terminal = menu.addAction("View terminal…")
        # A browser takes files; it hosts no terminal and syncs no folder.
        terminal.setEnabled(
            device.online and not device.is_browser and self.open_terminal is not None
        )
        if self.open_terminal is not None:
            opener = self.open_terminal
            terminal.triggered.connect(lambda: opener(device))
        sync = menu.addAction("Sync a folder…")
        sync.setEnabled(
            device.online and not device.is_browser and self.sync_folder_with is not None
        )
        if self.sync_folder_with is not None:
            syncer = self.sync_folder_with
            sync.triggered.connect(lambda: syncer(device))
        menu.exec(self.device_list.viewport().mapToGlobal(position))

    # ------------------------------------------------------------ transfer buttons

    def selected_row(self) -> TransferRow | None:
        rows = self.table.selectionModel().selectedRows()
        return self.bridge.transfers.row_at(rows[0].row()) if rows else None

    def _update_buttons(self, *_: Any) -> None:
        row = self.selected_row()
        if row is not None:
            self.transfer_detail.setText(f"{row.name}: {self.bridge.transfers.state_text(row)}")
        self.transfer_detail.setVisible(row is not None)
        self.cancel_button.setEnabled(row is not None and row.can_cancel)
        self.resume_button.setEnabled(row is not None and row.can_resume)
        self.open_button.setEnabled(row is not None)

    def _cancel_selected(self) -> None:
        if (row := self.selected_row()) is not None:
            self.bridge.cancel(row)

    def _resume_selected(self) -> None:
        if (row := self.selected_row()) is not None:
            self.bridge.resume(row)

    def folder_of(self, row: TransferRow) -> Path | None:
        if row.direction == "send" and row.paths:
            first = Path(row.paths[0])
            return first if first.is_dir() else first.parent
        agent = self.bridge.agent
        return agent.downloads_dir() if agent is not None else None

    def _open_selected(self) -> None:
        row = self.selected_row()
        folder = self.folder_of(row) if row is not None else None
        if folder is not None and not os.environ.get("MESHAGENT_NO_OPEN"):
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder)))

    def open_tunnels(self) -> TunnelsWindow:
        if self.tunnels is None:
            self.tunnels = TunnelsWindow(self.bridge, self)
        self.tunnels.show()
        self.tunnels.raise_()
        return self.tunnels

    def open_history(self) -> HistoryWindow:
        """The history of finished transfers (core/share/history.py), read afresh."""
        if self.history is None:
            self.history = HistoryWindow(self._load_history, self.bridge.spawn, self)
        bring_to_front(self.history)
        self.history.refresh()
        return self.history

    async def _load_history(self) -> list[TransferInfo]:
        agent = self.bridge.agent
        if agent is None:
            return []
        return await asyncio.to_thread(agent.transfers.history.records)

    # ------------------------------------------------------------ offers

    def ask_offer(self, offer: TransferOffered) -> OfferDialog:
        agent = self.bridge.agent
        dialog = OfferDialog(offer, self, downloads=agent.downloads_dir() if agent else None)
        dialog.answered.connect(self._answered)
        self.offers[offer.transfer_id] = dialog
        dialog.show()
        dialog.raise_()
        return dialog

    def _answered(
        self, transfer_id: str, accept: bool, always: bool, destination: Path | None
    ) -> None:
        dialog = self.offers.pop(transfer_id, None)
        if dialog is not None:
            dialog.deleteLater()
        self.bridge.spawn(
            self.bridge.answer_offer(transfer_id, accept, always=always, destination=destination),
            "ui-answer-offer",
        )

    # ------------------------------------------------------------ window

    def bring_to_front(self) -> None:
        bring_to_front(self)

    def closeEvent(self, event: QCloseEvent) -> None:
        if self.keep_running_on_close:
            event.ignore()  # the tray keeps the agent running
            self.hide()
        else:
            event.accept()
            self.closed.emit()
