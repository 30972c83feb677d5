"""Synced folders: the window, adding a folder, a peer's offer, a folder's conflicts (docs/sync.md).

This module stays thin (DESIGN §2), like the Rooms view:

- :class:`SyncApi` is what the view needs of the core's ``SyncService`` (``agent.sync``); the
  tests use a fake. :class:`SyncModel` keeps the folder list the service gave last, reloads it
  when a ``Sync*`` event arrives (bursts coalesced: a busy folder sends many), and runs the user's
  actions as tasks the bridge owns. A failed action is one line in the window, never a traceback.
- :class:`SyncWindow` shows the model; :class:`SyncOfferDialog` answers a peer's offer;
  :class:`ConflictsDialog` lists a folder's ``*.sync-conflict-*`` copies.
- :class:`SyncUi` wires them to the app: the bridge's events, the tray's and the main window's
  entry points. Toasts for conflicts and failures come from the core's notification router
  (its rules), through the app's toast sink, like every other notification: not from here.

Labels, device names and file names come from other devices: shown as plain text.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

from PySide6.QtCore import QModelIndex, QObject, QPersistentModelIndex, Qt, QTimer, QUrl, Signal
from PySide6.QtGui import QCloseEvent, QColor, QDesktopServices, QHideEvent, QShowEvent
from PySide6.QtWidgets import (
    QAbstractItemView,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QInputDialog,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QStackedWidget,
    QStyledItemDelegate,
    QStyleOptionViewItem,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from meshagent_gui.core.events import (
    PeerCameOnline,
    PeerWentOffline,
    SyncConflict,
    SyncFailed,
    SyncFileChanged,
    SyncFolderAdded,
    SyncFolderOffered,
    SyncFolderRemoved,
    SyncPeerConnected,
    SyncPeerDisconnected,
    SyncStateChanged,
)
from meshagent_gui.core.ipc_types import FolderInfo, SyncOfferInfo
from meshagent_gui.errors import UserError
from meshagent_gui.units import human_size

from .devices import DeviceEntry
from .resources import app_icon
from .rooms import confirm
from .widgets import (
    Spawn,
    answer_buttons,
    bring_to_front,
    folder_row,
    one_line,
    plain_label,
    show_message,
    succeeded,
)

if TYPE_CHECKING:
    from .bridge import AgentBridge

log = logging.getLogger(__name__)

T = TypeVar("T")

SYNC_EVENTS: Final = (
    SyncFolderOffered,
    SyncFolderAdded,
    SyncFolderRemoved,
    SyncStateChanged,
    SyncConflict,
    SyncFailed,
    SyncFileChanged,
    SyncPeerConnected,
    SyncPeerDisconnected,
)
COALESCE_MS: Final = 250  # a burst of events (a folder pulling 1,000 files) costs one reload
# "2 min ago" moves on while the window shows; the list is read again too (a local edit
# changes a folder's size and last change without an event). Every other change comes as an
# event: states, pulled files, conflicts, and a device's sync streams (SyncPeerConnected).
TICK_MS: Final = 30_000
CONFLICT_PATTERN: Final = "*.sync-conflict-*"
CONFLICTS_SHOWN: Final = 1000
_CONFLICT_NAME: Final = re.compile(
    r"^(?P<stem>.*)\.sync-conflict-(?P<day>\d{8})-(?P<time>\d{6})-(?P<device>[^.]*)(?P<ext>.*)$"
)
_INTERNAL_DIR: Final = ".meshsync"
NOT_CONNECTED: Final = "Not connected yet: the agent is still starting."
# On top of the main window's style sheet (this window is its child).
STYLE: Final = """
#banner[error="true"] { background: #fde8e8; color: #7a1f1f; border: 1px solid #f2b8b8; }
#syncDetail { color: #3c4650; padding: 2px 2px; }
#syncEmpty { color: #5d7180; font-size: 11pt; }
"""
_STATE_COLOURS: Final = {
    "ok": QColor("#2e7d32"),
    "busy": QColor("#1d4e89"),
    "attention": QColor("#8a5a00"),
    "error": QColor("#b3261e"),
}


class SyncApi(Protocol):
    """The core's folder sync (``meshagent_gui.core.sync.service.SyncService``).

    Every failure the user can act on raises a ``UserError`` with one message. ``folder`` is a
    folder id (what this view passes), an id prefix or a label.
    """

    async def add(self, path: Path, peer_id: str, *, remote_name: str = "") -> FolderInfo: ...

    def folders(self) -> list[FolderInfo]: ...

    def offers(self) -> list[SyncOfferInfo]: ...

    async def pause(self, folder: str) -> FolderInfo: ...

    async def resume(self, folder: str) -> FolderInfo: ...

    async def remove(self, folder: str) -> None: ...

    async def answer_offer(
        self, offer_id: str, accept: bool, *, path: Path | None = None
    ) -> None: ...


# ---------------------------------------------------------------- words


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def state_text(folder: FolderInfo) -> str:
    """The State column: what the folder is doing, in words."""
    if folder.state == "error":
        return f"Error: {one_line(folder.error)}" if folder.error else "Error"
    if folder.paused or folder.state == "paused":
        text = "Paused"
    elif folder.state == "starting":
        text = "Starting…"
    elif folder.state == "scanning":
        text = "Scanning…"
    elif folder.state == "syncing":
        needed = sum(p.needed_files for p in folder.peers)
        text = f"Syncing {plural(needed, 'file')}" if needed else "Syncing…"
    elif folder.peers and not any(p.connected for p in folder.peers):
        text = "Up to date here (devices offline)"
    else:
        text = "Up to date"
    if folder.conflicts:
        conflicts = plural(folder.conflicts, "conflict")
        text = conflicts if text == "Up to date" else f"{text} · {conflicts}"
    return text


def state_tone(folder: FolderInfo) -> str:
    if folder.state == "error":
        return "error"
    if folder.paused or folder.state == "paused" or folder.conflicts:
        return "attention"
    if folder.state in ("starting", "scanning", "syncing"):
        return "busy"
    return "ok"


def peers_text(folder: FolderInfo) -> str:
    if not folder.peers:
        return "No device"
    return ", ".join(
        f"{one_line(p.name)} ({'online' if p.connected else 'offline'})" for p in folder.peers
    )


def relative_time(at: float | None, now: float) -> str:
    """A past moment as people say it: just now, 5 min ago, 3 h ago, yesterday, 2024-05-01."""
    if at is None:
        return "No change yet"
    ago = max(0.0, now - at)
    if ago < 45:
        return "just now"
    if ago < 3600:
        return f"{max(1, round(ago / 60))} min ago"
    if ago < 86_400:
        return f"{int(ago // 3600)} h ago"
    days = int(ago // 86_400)
    if days == 1:
        return "yesterday"
    if days < 7:
        return f"{days} days ago"
    return time.strftime("%Y-%m-%d", time.localtime(at))


def detail_text(folder: FolderInfo, *extra: str) -> str:
    """The line under the table: where the folder is, how big, each device's state."""
    parts = [f"{folder.path}", f"{plural(folder.files, 'file')}, {human_size(folder.bytes)}"]
    for peer in folder.peers:
        name = one_line(peer.name)
        if not peer.connected:
            parts.append(f"{name}: offline")
        elif peer.needed_files:
            wanted = f"{plural(peer.needed_files, 'file')} ({human_size(peer.needed_bytes)})"
            parts.append(f"{name}: online, {wanted} to go")
        else:
            parts.append(f"{name}: online, in sync")
    if folder.state == "error" and folder.error:
        parts.append(f"Error: {one_line(folder.error)}")
    parts.extend(one_line(text) for text in extra if text)
    return " · ".join(parts)


@dataclass(frozen=True)
class ConflictCopy:
    """One ``*.sync-conflict-*`` file: the losing side of a concurrent edit, kept beside it."""

    path: Path  # absolute
    relative: str  # as shown, POSIX
    original: str  # the file it is a copy of (relative), "" when the name does not say
    device: str
    saved: str  # "2024-05-01 12:30:05", "" when the name does not say

    @property
    def description(self) -> str:
        if not self.original:
            return "A conflicting copy"
        text = f"Conflicting copy of {self.original}"
        if self.device:
            text += f", from {self.device}"
        if self.saved:
            text += f", saved {self.saved}"
        return text


def conflict_copy(root: Path, path: Path) -> ConflictCopy:
    relative = path.relative_to(root).as_posix()
    match = _CONFLICT_NAME.match(path.name)
    if match is None:
        return ConflictCopy(path, relative, "", "", "")
    original = match["stem"] + match["ext"]
    parent = path.parent.relative_to(root).as_posix()
    if parent != ".":
        original = f"{parent}/{original}"
    day, at = match["day"], match["time"]
    saved = f"{day[:4]}-{day[4:6]}-{day[6:]} {at[:2]}:{at[2:4]}:{at[4:]}"
    return ConflictCopy(path, relative, original, match["device"], saved)


def find_conflicts(root: Path, limit: int = CONFLICTS_SHOWN) -> list[ConflictCopy]:
    """The conflict copies under ``root`` (blocking: run it in a thread), sorted by name."""
    found: list[ConflictCopy] = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != _INTERNAL_DIR)
        for name in sorted(files):
            if fnmatch.fnmatchcase(name, CONFLICT_PATTERN):
                found.append(conflict_copy(root, Path(directory) / name))
                if len(found) >= limit:
                    return found
    return found


def open_in_desktop(path: Path) -> None:
    """Open a file or folder with the desktop's default application."""
    if os.environ.get("MESHAGENT_NO_OPEN"):  # tests: never launch a file manager
        log.info("would open %s", path)
        return
    QDesktopServices.openUrl(QUrl.fromLocalFile(str(path)))


# ---------------------------------------------------------------- the model


class SyncModel(QObject):
    """The folder list as the service gave it last, and the user's actions on it.

    Actions return the task that runs them (tests await it); its result is the API's answer
    (True for those that answer nothing), or None when it failed: the failure was emitted as
    ``error`` and nothing changed.
    """

    changed = Signal()  # the folder list was reloaded
    error = Signal(str)  # one line: an action failed
    notice = Signal(str)  # one line: an action succeeded (or is waiting for the peer)

    def __init__(
        self,
        api: Callable[[], SyncApi | None],
        spawn: Spawn,
        *,
        coalesce_ms: int = COALESCE_MS,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self._api = api
        self._spawn = spawn
        self.folders: list[FolderInfo] = []
        self.loaded = False
        self.details: dict[str, str] = {}  # folder id -> why it is in its state (may be "")
        self.news: dict[str, str] = {}  # folder id -> the newest file news (change, conflict)
        self.reloads = 0  # how often the list was read (tests check the coalescing)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(coalesce_ms)
        self._timer.timeout.connect(self.refresh)

    def folder(self, folder_id: str) -> FolderInfo | None:
        return next((f for f in self.folders if f.folder_id == folder_id), None)

    # ------------------------------------------------------------ reading

    def refresh(self) -> bool:
        """Read the list now (the service keeps it in memory: no I/O); False if it could not."""
        self._timer.stop()
        api = self._api()
        if api is None:
            self.folders = []
            self.changed.emit()
            return False
        try:
            folders = api.folders()
        except UserError as exc:
            self.error.emit(one_line(exc.message))
            return False
        self.reloads += 1
        self.folders = sorted(folders, key=lambda f: (f.label.casefold(), f.folder_id))
        self.loaded = True
        self.changed.emit()
        return True

    def offer(self, offer_id: str) -> SyncOfferInfo | None:
        """The offer if it still waits for this device's answer (None: answered, expired, or
        declined by ``sync.auto_accept = none`` without asking)."""
        api = self._api()
        if api is None:
            return None
        return next((o for o in api.offers() if o.offer_id == offer_id), None)

    def refresh_soon(self) -> None:
        """Reload within ``coalesce_ms``; more events meanwhile cost nothing more. Not restarted
        by each event, so a folder busy for minutes still shows its progress."""
        if not self._timer.isActive():
            self._timer.start()

    def handle(self, event: object) -> None:
        """A core event: a Sync* event (or a peer coming and going) reloads the list soon, once
        something showed it."""
        if isinstance(event, PeerCameOnline | PeerWentOffline) and self.loaded:
            self.refresh_soon()  # a folder's devices: online / offline
        if not isinstance(event, SYNC_EVENTS):
            return
        if isinstance(event, SyncStateChanged):
            self.details[event.folder_id] = event.detail
        elif isinstance(event, SyncFileChanged):
            what = "deleted" if event.deleted else "changed"
            by = f" by {event.peer_name}" if event.peer_name else ""
            self.news[event.folder_id] = f"{event.name} {what}{by}"
        elif isinstance(event, SyncConflict):
            self.news[event.folder_id] = (
                f"Conflict: {event.name} changed here and on {event.peer_name};"
                f" this device's version is kept as {event.conflict_name}"
            )
        elif isinstance(event, SyncFailed):
            self.details[event.folder_id] = event.message
        elif isinstance(event, SyncFolderRemoved):
            self.details.pop(event.folder_id, None)
            self.news.pop(event.folder_id, None)
        if self.loaded:
            self.refresh_soon()

    # ------------------------------------------------------------ actions

    def add(self, path: Path, peer_id: str, peer_name: str) -> asyncio.Task[FolderInfo | None]:
        async def add(api: SyncApi) -> FolderInfo:
            waiting = (
                f"Offering “{path.name}” to {peer_name}… It is added once {peer_name} accepts."
            )
            self.notice.emit(one_line(waiting))
            folder = await api.add(path, peer_id)
            self.notice.emit(one_line(f"“{folder.label}” is now synced with {peer_name}."))
            return folder

        return self._start("add", add, None)

    def pause(self, folder_id: str) -> asyncio.Task[FolderInfo | None]:
        return self._start("pause", lambda api: api.pause(folder_id), None)

    def resume(self, folder_id: str) -> asyncio.Task[FolderInfo | None]:
        return self._start("resume", lambda api: api.resume(folder_id), None)

    def remove(self, folder_id: str, label: str) -> asyncio.Task[bool | None]:
        done = f"Stopped syncing “{label}”. Its files are still on this device."
        return self._start("remove", lambda api: succeeded(api.remove(folder_id)), done)

    def answer_offer(
        self, offer_id: str, accept: bool, path: Path | None = None
    ) -> asyncio.Task[bool | None]:
        return self._start(
            "answer-offer",
            lambda api: succeeded(api.answer_offer(offer_id, accept, path=path)),
            None,
        )

    # ------------------------------------------------------------ plumbing

    def _start(
        self, name: str, call: Callable[[SyncApi], Awaitable[T]], done: str | None
    ) -> asyncio.Task[T | None]:
        return self._spawn(self._act(call, done), f"ui-sync-{name}")

    async def _act(self, call: Callable[[SyncApi], Awaitable[T]], done: str | None) -> T | None:
        api = self._api()
        if api is None:
            self.error.emit(NOT_CONNECTED)
            return None
        try:
            result = await call(api)
        except UserError as exc:
            self.error.emit(one_line(exc.message))
            return None
        except OSError as exc:  # the disk said no (a read-only folder): still one line
            log.warning("folder sync action failed", exc_info=True)
            where = f" ({exc.filename})" if exc.filename else ""
            self.error.emit(one_line(f"{exc.strerror or exc}{where}"))
            return None
        if done is not None:
            self.notice.emit(one_line(done))
        self.refresh()
        return result


# ---------------------------------------------------------------- dialogs


class SyncOfferDialog(QDialog):
    """Accept (here, or in a folder of one's choice) or decline a peer's folder; not modal.

    Closing it declines, as for an offer of files: the peer is waiting for an answer.
    """

    answered = Signal(str, bool, object)  # offer id, accept, the chosen Path or None (default)

    def __init__(
        self,
        offer: SyncOfferInfo,
        default_path: Path | None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.offer = offer
        self.default_path = default_path
        self.chosen: Path | None = None
        self.setObjectName("sync-offer-dialog")
        self.setWindowTitle("Folder sync offered")
        self.setWindowIcon(app_icon())
        self.setMinimumWidth(480)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(20, 18, 20, 16)
        layout.setSpacing(10)
        peer, label = one_line(offer.peer_name), one_line(offer.label)
        self.text = plain_label(f"{peer} wants to sync the folder “{label}” with this device.")
        self.text.setObjectName("offerTitle")
        self.text.setAccessibleName("Offer")
        self.explain = plain_label(
            "If you accept, the folder is kept the same on both devices, in both directions:"
            " a change made on either one reaches the other."
        )
        where, self.where, self.change_button = folder_row(
            "Where the folder is kept", "Change where the folder is kept", self._change
        )
        self.warning = plain_label(name="Warning")
        self.warning.setObjectName("subtitle")
        self.warning.hide()
        buttons, self.accept_button, self.decline_button = answer_buttons(self)
        self.accept_button.setDefault(True)
        layout.addWidget(self.text)
        layout.addWidget(self.explain)
        layout.addLayout(where)
        layout.addWidget(self.warning)
        layout.addWidget(buttons)
        self.setWindowModality(Qt.WindowModality.NonModal)
        self.finished.connect(self._finished)
        self._show_where()

    @property
    def path(self) -> Path | None:
        """Where the folder goes: the chosen folder, else the service's default (None)."""
        return self.chosen

    def _show_where(self) -> None:
        target = self.chosen or self.default_path
        if target is None:
            self.where.setText("Kept in: a new folder in your sync folder (sync.dir)")
        elif self.chosen is None:
            self.where.setText(one_line(f"Kept in: {target} (a new folder)"))
        else:
            self.where.setText(one_line(f"Kept in: {target}"))
        self.where.setToolTip(str(target) if target is not None else "")
        busy = self.chosen is not None and _has_files(self.chosen)
        if busy:
            self.warning.setText(
                "This folder already has files: they are kept, and synced to"
                f" {one_line(self.offer.peer_name)} too."
            )
        self.warning.setVisible(busy)

    def _change(self) -> None:
        start = self.chosen or self.default_path or Path.home()
        chosen = QFileDialog.getExistingDirectory(
            self, f"Where to keep “{one_line(self.offer.label)}”", str(start)
        )
        if chosen:
            self.chosen = Path(chosen)
            self._show_where()

    def closeEvent(self, event: QCloseEvent) -> None:
        event.accept()
        self.reject()

    def _finished(self, result: int) -> None:
        accepted = result == QDialog.DialogCode.Accepted
        self.answered.emit(self.offer.offer_id, accepted, self.path if accepted else None)


def _has_files(path: Path) -> bool:
    try:
        with os.scandir(path) as entries:
            return any(True for _ in entries)
    except OSError:
        return False


class ConflictsDialog(QDialog):
    """A folder's conflict copies; each opens with the desktop's application."""

    def __init__(
        self,
        label: str,
        root: Path,
        spawn: Spawn,
        opener: Callable[[Path], None],
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.root = root
        self.opener = opener
        self.copies: list[ConflictCopy] = []
        self.setObjectName("sync-conflicts-dialog")
        self.setWindowTitle(f"Conflicts in {one_line(label)}")
        self.setWindowIcon(app_icon())
        self.resize(620, 380)
        layout = QVBoxLayout(self)
        explain = plain_label(
            "When a file changed on two devices at the same time, both versions are kept: the"
            " other one is saved beside it, with “sync-conflict”, the date and the device in its"
            " name. Open both, keep what you need, then delete the conflict copy (the deletion"
            " syncs too)."
        )
        self.list = QListWidget()
        self.list.setAccessibleName("Conflict copies")
        self.list.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.list.itemActivated.connect(self._open_item)
        self.list.currentItemChanged.connect(self._update_buttons)
        self.status = plain_label("Looking for conflict copies…", "Status")
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        self.open_button = buttons.addButton("Open", QDialogButtonBox.ButtonRole.ActionRole)
        self.open_button.setAccessibleName("Open the selected conflict copy")
        self.open_button.clicked.connect(self._open_selected)
        self.folder_button = buttons.addButton(
            "Show in folder", QDialogButtonBox.ButtonRole.ActionRole
        )
        self.folder_button.setAccessibleName("Open the folder holding the selected copy")
        self.folder_button.clicked.connect(self._open_folder)
        buttons.rejected.connect(self.close)
        layout.addWidget(explain)
        layout.addWidget(self.list, 1)
        layout.addWidget(self.status)
        layout.addWidget(buttons)
        self.setWindowModality(Qt.WindowModality.NonModal)
        self._update_buttons()
        self.loading = spawn(self._load(), "ui-sync-conflicts")
        self.finished.connect(lambda _=0: self.loading.cancel())  # closed before it was done

    async def _load(self) -> None:
        try:
            copies = await asyncio.to_thread(find_conflicts, self.root)
        except OSError as exc:
            self.status.setText(one_line(f"Could not read {self.root}: {exc.strerror or exc}"))
            return
        self.show_copies(copies)

    def show_copies(self, copies: list[ConflictCopy]) -> None:
        self.copies = copies
        self.list.clear()
        for copy in copies:
            item = QListWidgetItem(copy.relative)
            item.setToolTip(copy.description)
            item.setData(Qt.ItemDataRole.UserRole, str(copy.path))
            self.list.addItem(item)
        if copies:
            self.list.setCurrentRow(0)
            more = " (the first ones)" if len(copies) >= CONFLICTS_SHOWN else ""
            copies_text = (
                "1 conflict copy" if len(copies) == 1 else f"{len(copies)} conflict copies"
            )
            self.status.setText(f"{copies_text}{more}.")
        else:
            self.status.setText("No conflict copies: nothing to sort out.")
        self._update_buttons()

    def selected(self) -> Path | None:
        item = self.list.currentItem()
        return Path(str(item.data(Qt.ItemDataRole.UserRole))) if item is not None else None

    def _update_buttons(self, *_: Any) -> None:
        has = self.list.currentItem() is not None
        self.open_button.setEnabled(has)
        self.folder_button.setEnabled(has)

    def _open_item(self, item: QListWidgetItem) -> None:
        self.opener(Path(str(item.data(Qt.ItemDataRole.UserRole))))

    def _open_selected(self) -> None:
        if (path := self.selected()) is not None:
            self.opener(path)

    def _open_folder(self) -> None:
        if (path := self.selected()) is not None:
            self.opener(path.parent)


# ---------------------------------------------------------------- the window


class _ElideRight(QStyledItemDelegate):
    """Text cut at its end (the table cuts in the middle, for paths): "Error: the disk is…"."""

    def initStyleOption(
        self, option: QStyleOptionViewItem, index: QModelIndex | QPersistentModelIndex
    ) -> None:
        super().initStyleOption(option, index)
        option.textElideMode = Qt.TextElideMode.ElideRight


class Column:
    FOLDER = 0
    LOCATION = 1
    DEVICES = 2
    STATE = 3
    CHANGED = 4


HEADERS: Final = ("Folder", "Location", "Devices", "State", "Last change")


class SyncWindow(QWidget):
    """The synced folders, their state, and what can be done with one."""

    def __init__(
        self,
        model: SyncModel,
        spawn: Spawn,
        devices: Callable[[], list[DeviceEntry]],
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent, Qt.WindowType.Window)
        self.model = model
        self._spawn = spawn
        self.devices = devices
        # Replaceable (tests): asking yes/no, choosing a device, opening a path.
        self.confirm: Callable[[str, str], Awaitable[bool]] = lambda title, text: confirm(
            self, title, text
        )
        self.choose_device: Callable[[list[DeviceEntry], str], DeviceEntry | None] = (
            self._ask_device
        )
        self.opener: Callable[[Path], None] = open_in_desktop
        self.conflict_dialogs: dict[str, ConflictsDialog] = {}
        self.now: Callable[[], float] = time.time
        self.setObjectName("sync-window")
        self.setWindowTitle("Mesh Agent: synced folders")
        self.setWindowIcon(app_icon())
        self.resize(980, 520)
        self.setStyleSheet(STYLE)
        self._build()
        self._tick = QTimer(self)
        self._tick.setInterval(TICK_MS)
        self._tick.timeout.connect(self._on_tick)
        model.changed.connect(self._show_model)
        model.error.connect(self.show_error)
        model.notice.connect(self.show_notice)
        self._show_model()

    # ------------------------------------------------------------ layout

    def _build(self) -> None:
        outer = QVBoxLayout(self)
        outer.setContentsMargins(16, 12, 16, 12)
        outer.setSpacing(10)

        header = QHBoxLayout()
        title = QLabel("Synced folders")
        title.setObjectName("title")
        self.add_button = QPushButton("Add folder…")
        self.add_button.setAccessibleName("Add a folder to sync")
        self.add_button.setToolTip("Choose a folder, then the device to keep it in sync with")
        self.add_button.clicked.connect(self.add_folder)
        header.addWidget(title)
        header.addStretch(1)
        header.addWidget(self.add_button)
        outer.addLayout(header)
        explain = plain_label(
            "Each folder here is kept the same on this device and on the devices listed, live,"
            " in both directions, directly between the devices (never through the server)."
        )
        explain.setObjectName("subtitle")
        outer.addWidget(explain)

        self.message = plain_label(name="Message")
        self.message.setObjectName("banner")
        self.message.hide()
        outer.addWidget(self.message)

        self.stack = QStackedWidget()
        self.table = QTableWidget(0, len(HEADERS))
        self.table.setAccessibleName("Synced folders")
        self.table.setHorizontalHeaderLabels(list(HEADERS))
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setShowGrid(False)
        self.table.setWordWrap(False)
        self.table.setTextElideMode(Qt.TextElideMode.ElideMiddle)  # paths keep both ends
        self.table.verticalHeader().hide()
        self.table.verticalHeader().setDefaultSectionSize(34)
        header_view = self.table.horizontalHeader()
        header_view.setHighlightSections(False)
        header_view.setDefaultAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
        header_view.setMinimumSectionSize(80)
        header_view.setSectionResizeMode(Column.LOCATION, QHeaderView.ResizeMode.Stretch)
        for column, width in (
            (Column.FOLDER, 150),
            (Column.DEVICES, 190),
            (Column.STATE, 210),
            (Column.CHANGED, 110),
        ):
            header_view.setSectionResizeMode(column, QHeaderView.ResizeMode.Interactive)
            self.table.setColumnWidth(column, width)
        self._elide_right = _ElideRight(self.table)
        for column in (Column.FOLDER, Column.DEVICES, Column.STATE, Column.CHANGED):
            self.table.setItemDelegateForColumn(column, self._elide_right)
        self.table.itemSelectionChanged.connect(self._show_selected)
        self.table.itemActivated.connect(lambda _: self._open_selected())
        self.empty = plain_label(
            "No synced folders yet.\n\nAdd folder… keeps a folder of this device the same on"
            " another of your devices (or a room member's), in both directions.",
            "No synced folders",
        )
        self.empty.setObjectName("syncEmpty")
        self.empty.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.stack.addWidget(self.table)
        self.stack.addWidget(self.empty)
        outer.addWidget(self.stack, 1)

        self.detail = plain_label(name="Selected folder")
        self.detail.setObjectName("syncDetail")
        self.detail.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        outer.addWidget(self.detail)

        buttons = QHBoxLayout()
        self.pause_button = QPushButton("Pause")
        self.pause_button.setAccessibleName("Pause or resume syncing the selected folder")
        self.pause_button.clicked.connect(self._toggle_pause)
        self.add_device_button = QPushButton("Add device…")
        self.add_device_button.setAccessibleName("Sync the selected folder with another device")
        self.add_device_button.clicked.connect(self._add_device)
        self.conflicts_button = QPushButton("Show conflicts…")
        self.conflicts_button.setAccessibleName("Show the selected folder's conflict copies")
        self.conflicts_button.clicked.connect(self._show_conflicts)
        self.open_button = QPushButton("Open folder")
        self.open_button.setAccessibleName("Open the selected folder")
        self.open_button.clicked.connect(self._open_selected)
        self.remove_button = QPushButton("Remove…")
        self.remove_button.setAccessibleName("Stop syncing the selected folder")
        self.remove_button.setToolTip("Stop syncing this folder; its files stay on disk")
        self.remove_button.clicked.connect(self._remove)
        for button in (
            self.pause_button,
            self.add_device_button,
            self.conflicts_button,
            self.open_button,
        ):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(self.remove_button)
        outer.addLayout(buttons)

    # ------------------------------------------------------------ showing the model

    def show_error(self, text: str) -> None:
        self._say(text, error=True)

    def show_notice(self, text: str) -> None:
        self._say(text, error=False)

    def _say(self, text: str, *, error: bool) -> None:
        show_message(self.message, text, error=error)

    def selected_folder(self) -> FolderInfo | None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return None
        item = self.table.item(rows[0].row(), Column.FOLDER)
        if item is None:
            return None
        return self.model.folder(str(item.data(Qt.ItemDataRole.UserRole)))

    def select_folder(self, folder_id: str) -> None:
        for row in range(self.table.rowCount()):
            item = self.table.item(row, Column.FOLDER)
            if item is not None and item.data(Qt.ItemDataRole.UserRole) == folder_id:
                self.table.selectRow(row)
                return

    def _show_model(self) -> None:
        keep = self.selected_folder()
        folders = self.model.folders
        now = self.now()
        self.table.blockSignals(True)
        self.table.setRowCount(len(folders))
        for row, folder in enumerate(folders):
            label = QTableWidgetItem(one_line(folder.label))
            label.setData(Qt.ItemDataRole.UserRole, folder.folder_id)
            label.setToolTip(f"Folder id {folder.folder_id}")
            location = QTableWidgetItem(str(folder.path))
            location.setToolTip(str(folder.path))
            devices = QTableWidgetItem(peers_text(folder))
            devices.setToolTip(peers_text(folder))
            state = QTableWidgetItem(state_text(folder))
            state.setToolTip(state_text(folder))
            state.setForeground(_STATE_COLOURS[state_tone(folder)])
            changed = QTableWidgetItem(relative_time(folder.last_change, now))
            if folder.last_change is not None:
                changed.setToolTip(
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(folder.last_change))
                )
            for column, item in enumerate((label, location, devices, state, changed)):
                self.table.setItem(row, column, item)
        self.table.blockSignals(False)
        self.stack.setCurrentWidget(self.table if folders else self.empty)
        if keep is not None and self.model.folder(keep.folder_id) is not None:
            self.select_folder(keep.folder_id)
        elif folders and not self.table.selectionModel().selectedRows():
            self.table.selectRow(0)
        self._show_selected()

    def _on_tick(self) -> None:
        self._show_times()
        self.model.refresh_soon()

    def _show_times(self) -> None:
        now = self.now()
        for row, folder in enumerate(self.model.folders):
            item = self.table.item(row, Column.CHANGED)
            if item is not None:
                item.setText(relative_time(folder.last_change, now))

    def _show_selected(self) -> None:
        folder = self.selected_folder()
        if folder is None:
            self.detail.setText("")
        else:
            why = self.model.details.get(folder.folder_id, "")
            if why == folder.error:
                why = ""  # said already
            news = self.model.news.get(folder.folder_id, "")
            self.detail.setText(detail_text(folder, why, news))
        self._update_buttons()

    def _update_buttons(self) -> None:
        folder = self.selected_folder()
        has = folder is not None
        self.pause_button.setText(_pause_label(folder))
        for button in (
            self.pause_button,
            self.add_device_button,
            self.conflicts_button,
            self.open_button,
            self.remove_button,
        ):
            button.setEnabled(has)
        if folder is not None and folder.conflicts:
            self.conflicts_button.setText(f"Show conflicts ({folder.conflicts})…")
        else:
            self.conflicts_button.setText("Show conflicts…")

    # ------------------------------------------------------------ actions

    def add_folder(self) -> None:
        """Add folder…: a directory, then the device to sync it with, then the offer."""
        chosen = QFileDialog.getExistingDirectory(self, "Choose a folder to sync", str(Path.home()))
        if not chosen:
            return
        path = Path(chosen)
        device = self.choose_device(self._online(), path.name or str(path))
        if device is not None:
            self.model.add(path, device.id, device.name)

    def _add_device(self) -> None:
        folder = self.selected_folder()
        if folder is None:
            return
        already = {p.device_id for p in folder.peers}
        candidates = [d for d in self._online() if d.id not in already]
        device = self.choose_device(candidates, folder.label)
        if device is not None:
            self.model.add(Path(folder.path), device.id, device.name)

    def _online(self) -> list[DeviceEntry]:
        return [d for d in self.devices() if d.online]

    def _ask_device(self, devices: list[DeviceEntry], label: str) -> DeviceEntry | None:
        if not devices:
            offline = [one_line(d.name) for d in self.devices() if not d.online]
            text = "No other device is online: the device must be online to accept the folder."
            if offline:
                text += f" Offline now: {', '.join(offline)}."
            self.show_error(text)
            return None
        names = [f"{one_line(d.name)} ({one_line(d.user)})" for d in devices]
        name, ok = QInputDialog.getItem(
            self, "Sync with", f"Keep “{one_line(label)}” in sync with:", names, 0, editable=False
        )
        return devices[names.index(name)] if ok and name in names else None

    def _toggle_pause(self) -> None:
        folder = self.selected_folder()
        if folder is None:
            return
        if _pause_label(folder) == "Resume":
            self.model.resume(folder.folder_id)
        else:
            self.model.pause(folder.folder_id)

    def _remove(self) -> None:
        folder = self.selected_folder()
        if folder is not None:
            self._spawn(self._confirmed_remove(folder), "ui-sync-remove-ask")

    async def _confirmed_remove(self, folder: FolderInfo) -> None:
        label = one_line(folder.label)
        text = (
            f"Stop syncing “{label}”? Its files stay on disk in {folder.path}; the other"
            " devices keep their copies too. Changes are no longer sent or received."
        )
        if await self.confirm("Stop syncing", text):
            await self.model.remove(folder.folder_id, label)

    def _open_selected(self) -> None:
        folder = self.selected_folder()
        if folder is None:
            return
        path = Path(folder.path)
        if not path.is_dir():
            self.show_error(f"{path} is not there (moved, deleted, or a disk not mounted).")
            return
        self.opener(path)

    def _show_conflicts(self) -> None:
        folder = self.selected_folder()
        if folder is None:
            return
        dialog = self.conflict_dialogs.get(folder.folder_id)
        if dialog is None:
            dialog = ConflictsDialog(
                folder.label, Path(folder.path), self._spawn, self._open_path, self
            )
            dialog.finished.connect(lambda _=0, f=folder.folder_id: self._forget_conflicts(f))
            self.conflict_dialogs[folder.folder_id] = dialog
        dialog.show()
        dialog.raise_()

    def _open_path(self, path: Path) -> None:
        self.opener(path)

    def _forget_conflicts(self, folder_id: str) -> None:
        dialog = self.conflict_dialogs.pop(folder_id, None)
        if dialog is not None:
            dialog.deleteLater()

    # ------------------------------------------------------------ window

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        self._tick.start()
        self._show_times()

    def hideEvent(self, event: QHideEvent) -> None:
        super().hideEvent(event)
        self._tick.stop()

    def bring_to_front(self) -> None:
        bring_to_front(self)


def _pause_label(folder: FolderInfo | None) -> str:
    # A folder in error is retried by the service on its own: it can still be paused.
    if folder is not None and (folder.paused or folder.state == "paused"):
        return "Resume"
    return "Pause"


# ---------------------------------------------------------------- the app's part


class SyncUi(QObject):
    """Folder sync in the app: the model on ``agent.sync``, the window (made when first opened),
    a peer's offer as a dialog."""

    def __init__(
        self,
        bridge: AgentBridge,
        *,
        api: Callable[[], SyncApi | None] | None = None,
        default_path: Callable[[str], Path | None] | None = None,
        parent_widget: QWidget | None = None,
    ) -> None:
        super().__init__()
        self.bridge = bridge
        self._parent_widget = parent_widget
        # An offered folder's name -> where it lands if accepted as it is (None: not known).
        self.default_path = default_path or (lambda _name: None)
        self.model = SyncModel(api or self._service, bridge.spawn, parent=self)
        self.window: SyncWindow | None = None
        self.offer_dialogs: dict[str, SyncOfferDialog] = {}
        self.model.error.connect(self._error)
        bridge.event_received.connect(self.handle)

    def _service(self) -> SyncApi | None:
        agent = self.bridge.agent
        return agent.sync if agent is not None else None

    def _error(self, text: str) -> None:
        # The window shows its own line; without it, the main window's line says it.
        if self.window is None or not self.window.isVisible():
            self.bridge.error.emit(text)

    def open(self) -> None:
        """Show the window (made the first time) with the newest list."""
        self._opened()

    def _opened(self) -> SyncWindow:
        if self.window is None:
            self.window = SyncWindow(
                self.model, self.bridge.spawn, self.bridge.devices.devices, self._parent_widget
            )
        self.model.refresh()
        self.window.bring_to_front()
        return self.window

    def add_folder(self) -> None:
        """The tray's "Sync a folder…": the window (where the outcome shows), then the add flow."""
        self._opened().add_folder()

    def sync_with(self, device: DeviceEntry) -> None:
        """A device's "Sync a folder…" (main window): a directory, then the offer to it."""
        window = self._opened()
        chosen = QFileDialog.getExistingDirectory(
            window, f"Choose a folder to sync with {device.name}", str(Path.home())
        )
        if chosen:
            self.model.add(Path(chosen), device.id, device.name)

    def handle(self, event: object) -> None:
        self.model.handle(event)
        if isinstance(event, SyncFolderOffered) and not event.auto_accepted:
            offer = self.model.offer(event.offer_id)
            if offer is None:  # answered already (the CLI), or declined by policy: no question
                log.info("sync offer %s from %s: not waiting", event.offer_id, event.peer_name)
                return
            self.offered(offer)
        elif isinstance(event, SyncFolderAdded):
            self._close_answered(event.folder_id)

    def offered(self, offer: SyncOfferInfo) -> SyncOfferDialog:
        dialog = self.offer_dialogs.get(offer.offer_id)
        if dialog is None:
            default = self.default_path(offer.name or offer.label)
            dialog = SyncOfferDialog(offer, default, self._parent_widget)
            dialog.answered.connect(self._answered)
            self.offer_dialogs[offer.offer_id] = dialog
            # The peer stops waiting at expires_at: the dialog goes then, rather than answer late.
            left = offer.expires_at - time.time()
            QTimer.singleShot(
                max(0, round(left * 1000)), dialog, lambda o=offer.offer_id: self._expired(o)
            )
        dialog.show()
        dialog.raise_()
        return dialog

    def _expired(self, offer_id: str) -> None:
        dialog = self._drop_offer(offer_id)
        if dialog is not None:
            offer = dialog.offer
            self.model.error.emit(
                one_line(
                    f"{offer.peer_name}'s offer to sync “{offer.label}” expired: nobody answered"
                    " in time. They can offer it again."
                )
            )

    def _drop_offer(self, offer_id: str) -> SyncOfferDialog | None:
        """Close an offer's dialog without answering it."""
        dialog = self.offer_dialogs.pop(offer_id, None)
        if dialog is not None:
            dialog.answered.disconnect(self._answered)
            dialog.hide()  # not done(): that would answer (decline) it
            dialog.deleteLater()
        return dialog

    def _answered(self, offer_id: str, accept: bool, path: object) -> None:
        dialog = self.offer_dialogs.pop(offer_id, None)
        if dialog is not None:
            dialog.deleteLater()
        self.model.answer_offer(offer_id, accept, path if isinstance(path, Path) else None)

    def _close_answered(self, folder_id: str) -> None:
        """A folder added some other way (the CLI's `sync accept`): its offer is moot."""
        for offer_id, dialog in list(self.offer_dialogs.items()):
            if dialog.offer.folder_id == folder_id:
                self._drop_offer(offer_id)
