"""Synced folders: the window (list, states, actions, one-line errors), the add flow, a peer's
offer, a folder's conflicts; against a fake SyncService."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication, QFileDialog, QInputDialog

from meshagent_gui.context import Context
from meshagent_gui.core.events import (
    SyncConflict,
    SyncFailed,
    SyncFileChanged,
    SyncFolderAdded,
    SyncFolderOffered,
    SyncPeerConnected,
    SyncPeerDisconnected,
    SyncStateChanged,
)
from meshagent_gui.core.ipc_types import FolderInfo, FolderPeerInfo, SyncOfferInfo
from meshagent_gui.core.notify.router import NotificationRouter
from meshagent_gui.errors import UserError
from meshagent_gui.ui.app import GuiApp
from meshagent_gui.ui.bridge import AgentBridge
from meshagent_gui.ui.devices import DeviceEntry
from meshagent_gui.ui.sync import (
    ConflictsDialog,
    SyncOfferDialog,
    SyncUi,
    SyncWindow,
    find_conflicts,
    relative_time,
)
from tests.integration.harness import AgentHome, Server

NOW = 1_750_000_000.0
LAPTOP = DeviceEntry("id-laptop", "laptop", "ann", "linux", True, "direct")
PHONE = DeviceEntry("id-phone", "phone", "ann", "android", True, "relay")
OLD = DeviceEntry("id-old", "old", "ann", "linux", False, "")


def peer(name: str, connected: bool = True, needed: int = 0) -> FolderPeerInfo:
    return FolderPeerInfo(
        device_id=f"id-{name}",
        name=name,
        connected=connected,
        needed_files=needed,
        needed_bytes=needed * 1000,
    )


def folder(folder_id: str, label: str, path: Path, **fields: Any) -> FolderInfo:
    values: dict[str, Any] = {
        "state": "idle",
        "paused": False,
        "error": "",
        "files": 12,
        "bytes": 3_400_000,
        "conflicts": 0,
        "last_change": NOW - 120,
        "peers": [peer("laptop")],
        **fields,
    }
    return FolderInfo(folder_id=folder_id, label=label, path=str(path), **values)


class FakeSync:
    """agent.sync as the API says: folders in memory; records every call. ``fail`` makes the
    next call raise it (and change nothing), as the service does."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.items: dict[str, FolderInfo] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.fail: Exception | None = None
        self.reads = 0
        self.answer: asyncio.Future[None] | None = None  # add waits on it when set
        self.waiting: dict[str, SyncOfferInfo] = {}  # offers waiting for an answer

    def put(self, info: FolderInfo) -> None:
        self.items[info.folder_id] = info

    def _call(self, *call: Any) -> None:
        self.calls.append(call)
        if self.fail is not None:
            fail, self.fail = self.fail, None
            raise fail

    def _find(self, key: str) -> FolderInfo:
        for info in self.items.values():
            if key in (info.folder_id, info.label) or info.folder_id.startswith(key):
                return info
        raise UserError(f"no synced folder {key}", code="unknown_folder")

    def folders(self) -> list[FolderInfo]:
        self.reads += 1
        return list(self.items.values())

    def offers(self) -> list[SyncOfferInfo]:
        return list(self.waiting.values())

    async def add(self, path: Path, peer_id: str, *, remote_name: str = "") -> FolderInfo:
        self._call("add", path, peer_id)
        if self.answer is not None:
            await self.answer
        folder_id = f"{len(self.items) + 1:032x}"
        info = folder(folder_id, path.name, path, peers=[peer(peer_id.removeprefix("id-"))])
        self.put(info)
        return info

    async def pause(self, folder: str) -> FolderInfo:
        self._call("pause", folder)
        info = self._find(folder)
        self.put(info := _with(info, paused=True, state="paused"))
        return info

    async def resume(self, folder: str) -> FolderInfo:
        self._call("resume", folder)
        info = self._find(folder)
        self.put(info := _with(info, paused=False, state="scanning", error=""))
        return info

    async def remove(self, folder: str) -> None:
        self._call("remove", folder)
        del self.items[self._find(folder).folder_id]

    async def answer_offer(self, offer_id: str, accept: bool, *, path: Path | None = None) -> None:
        self._call("answer_offer", offer_id, accept, path)
        if self.waiting.pop(offer_id, None) is None:
            raise UserError(f"no sync offer {offer_id!r} is waiting", code="unknown_offer")


def _with(info: FolderInfo, **fields: Any) -> FolderInfo:
    import msgspec

    return msgspec.structs.replace(info, **fields)


@pytest.fixture
def fake(tmp_path: Path) -> FakeSync:
    fake = FakeSync(tmp_path)
    for name in ("Photos", "Notes", "Work", "Music"):
        (tmp_path / name).mkdir()
    fake.put(folder("a" * 32, "Photos", tmp_path / "Photos"))
    fake.put(
        folder(
            "b" * 32,
            "Notes",
            tmp_path / "Notes",
            state="syncing",
            peers=[peer("laptop", needed=3), peer("phone", connected=False)],
        )
    )
    fake.put(folder("c" * 32, "Work", tmp_path / "Work", paused=True, state="paused"))
    fake.put(
        folder(
            "d" * 32,
            "Music",
            tmp_path / "Music",
            state="error",
            error="the folder is gone (disk not mounted?)",
            last_change=None,
        )
    )
    return fake


@pytest.fixture
def bridge(qloop: asyncio.AbstractEventLoop, gui_home: Context) -> AgentBridge:
    made = AgentBridge(gui_home)
    made.devices.set_devices([LAPTOP, PHONE, OLD])
    return made


@pytest.fixture
def sync(qtbot: Any, bridge: AgentBridge, fake: FakeSync, tmp_path: Path) -> SyncUi:
    return SyncUi(
        bridge, api=lambda: fake, default_path=lambda label: tmp_path / "sync-root" / label
    )


def open_window(qtbot: Any, sync: SyncUi) -> SyncWindow:
    sync.open()
    window = sync.window
    assert window is not None
    qtbot.addWidget(window)
    window.now = lambda: NOW
    window._show_model()
    return window


def table(window: SyncWindow) -> list[list[str]]:
    widget = window.table
    cells = [
        [widget.item(r, c) for c in range(widget.columnCount())] for r in range(widget.rowCount())
    ]
    return [[item.text() if item is not None else "" for item in row] for row in cells]


def column(window: SyncWindow, index: int) -> list[str]:
    return [row[index] for row in table(window)]


def click(qtbot: Any, button: Any) -> None:
    assert button.isEnabled(), button.text()
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def said(window: SyncWindow) -> str:
    return window.message.text() if window.message.isVisible() else ""


def select(window: SyncWindow, label: str) -> None:
    for info in window.model.folders:
        if info.label == label:
            window.select_folder(info.folder_id)
            return
    raise AssertionError(label)


def test_the_window_lists_folders_their_devices_and_states(
    qtbot: Any, sync: SyncUi, tmp_path: Path
) -> None:
    window = open_window(qtbot, sync)
    assert window.isVisible() and window.windowTitle() == "Mesh Agent: synced folders"
    assert table(window) == [
        [
            "Music",
            str(tmp_path / "Music"),
            "laptop (online)",
            "Error: the folder is gone (disk not mounted?)",
            "No change yet",
        ],
        [
            "Notes",
            str(tmp_path / "Notes"),
            "laptop (online), phone (offline)",
            "Syncing 3 files",
            "2 min ago",
        ],
        ["Photos", str(tmp_path / "Photos"), "laptop (online)", "Up to date", "2 min ago"],
        ["Work", str(tmp_path / "Work"), "laptop (online)", "Paused", "2 min ago"],
    ]
    assert window.table.accessibleName() == "Synced folders"
    select(window, "Notes")
    assert window.detail.text() == (
        f"{tmp_path / 'Notes'} · 12 files, 3.4 MB · laptop: online, 3 files (3.0 kB) to go"
        " · phone: offline"
    )
    assert window.pause_button.text() == "Pause"
    select(window, "Work")
    assert window.pause_button.text() == "Resume"
    select(window, "Music")
    assert window.pause_button.text() == "Pause"  # the service retries on its own
    assert "Error: the folder is gone" in window.detail.text()


def test_an_empty_list_says_how_to_start(qtbot: Any, sync: SyncUi, fake: FakeSync) -> None:
    fake.items.clear()
    window = open_window(qtbot, sync)
    assert window.stack.currentWidget() is window.empty
    assert "No synced folders yet" in window.empty.text()
    assert not window.pause_button.isEnabled() and not window.remove_button.isEnabled()
    assert window.add_button.isEnabled()


def test_sync_events_refresh_the_list_once_per_burst(
    qtbot: Any, sync: SyncUi, fake: FakeSync, bridge: AgentBridge
) -> None:
    window = open_window(qtbot, sync)
    window._tick.stop()  # only the events reload here
    select(window, "Photos")
    reads = fake.reads
    info = fake.items["a" * 32]
    fake.put(_with(info, state="syncing", peers=[peer("laptop", needed=40)]))
    for index in range(40):
        bridge.handle(
            SyncFileChanged(
                folder_id="a" * 32,
                label="Photos",
                name=f"img-{index}.jpg",
                peer_name="laptop",
                deleted=False,
            )
        )
    qtbot.waitUntil(lambda: "Syncing 40 files" in column(window, 3), timeout=3000)
    assert fake.reads == reads + 1  # 40 events, one reload
    assert window.detail.text().endswith("img-39.jpg changed by laptop")
    assert window.model.folder("a" * 32) is not None
    assert window.selected_folder() is not None
    assert window.selected_folder().label == "Photos"  # type: ignore[union-attr]

    fake.put(_with(info, conflicts=2))
    bridge.handle(
        SyncConflict(
            folder_id="a" * 32,
            label="Photos",
            name="a.txt",
            conflict_name="a.sync-conflict-20250101-120000-laptop.txt",
            peer_name="laptop",
        )
    )
    qtbot.waitUntil(lambda: "2 conflicts" in column(window, 3), timeout=3000)
    assert window.conflicts_button.text() == "Show conflicts (2)…"
    bridge.handle(
        SyncStateChanged(folder_id="a" * 32, label="Photos", state="idle", detail="scan done")
    )
    qtbot.waitUntil(lambda: "· scan done ·" in window.detail.text(), timeout=3000)
    assert window.detail.text().endswith("kept as a.sync-conflict-20250101-120000-laptop.txt")

    (fake.root / "New").mkdir()
    fake.put(folder("e" * 32, "New", fake.root / "New"))
    bridge.handle(SyncFolderAdded(folder_id="e" * 32, label="New", path=str(fake.root / "New")))
    qtbot.waitUntil(lambda: "New" in column(window, 0), timeout=3000)


def test_a_device_connecting_or_leaving_shows_without_polling(
    qtbot: Any, sync: SyncUi, fake: FakeSync, bridge: AgentBridge
) -> None:
    window = open_window(qtbot, sync)
    window._tick.stop()  # nothing reads the list on a timer: only the events do
    select(window, "Photos")
    info = fake.items["a" * 32]
    fake.put(_with(info, peers=[peer("laptop", connected=False)]))
    reads = fake.reads
    bridge.handle(SyncPeerDisconnected("a" * 32, "Photos", "laptop-id", "laptop"))
    qtbot.waitUntil(lambda: "laptop: offline" in window.detail.text(), timeout=3000)
    assert fake.reads == reads + 1

    fake.put(_with(info, peers=[peer("laptop", connected=True)]))
    bridge.handle(SyncPeerConnected("a" * 32, "Photos", "laptop-id", "laptop"))
    qtbot.waitUntil(lambda: "laptop: online, in sync" in window.detail.text(), timeout=3000)
    assert fake.reads == reads + 2


def test_pause_resume_and_remove_call_the_api(
    qtbot: Any, sync: SyncUi, fake: FakeSync, tmp_path: Path
) -> None:
    window = open_window(qtbot, sync)
    select(window, "Photos")
    click(qtbot, window.pause_button)
    qtbot.waitUntil(lambda: window.pause_button.text() == "Resume", timeout=3000)
    assert fake.calls[-1] == ("pause", "a" * 32)
    assert table(window)[2][3] == "Paused"
    click(qtbot, window.pause_button)
    qtbot.waitUntil(lambda: window.pause_button.text() == "Pause", timeout=3000)
    assert fake.calls[-1] == ("resume", "a" * 32)

    asked: list[tuple[str, str]] = []
    answers = [False, True]

    async def confirm(title: str, text: str) -> bool:
        asked.append((title, text))
        return answers.pop(0)

    window.confirm = confirm
    click(qtbot, window.remove_button)
    qtbot.waitUntil(lambda: len(asked) == 1, timeout=3000)
    assert ("remove", "a" * 32) not in fake.calls  # cancelled: nothing removed
    title, text = asked[0]
    assert title == "Stop syncing"
    assert f"Its files stay on disk in {tmp_path / 'Photos'}" in text
    click(qtbot, window.remove_button)
    qtbot.waitUntil(lambda: "Photos" not in column(window, 0), timeout=3000)
    assert fake.calls[-1] == ("remove", "a" * 32)
    assert said(window) == "Stopped syncing “Photos”. Its files are still on this device."
    assert (tmp_path / "Photos").is_dir()


def test_an_api_error_is_one_line_in_the_window(qtbot: Any, sync: SyncUi, fake: FakeSync) -> None:
    window = open_window(qtbot, sync)
    select(window, "Music")
    fake.fail = UserError("the folder is still not there:\n/media/usb is not mounted")
    click(qtbot, window.pause_button)
    qtbot.waitUntil(lambda: bool(said(window)), timeout=3000)
    assert said(window) == "the folder is still not there: /media/usb is not mounted"
    assert window.message.property("error") == "true"
    assert fake.calls[-1] == ("pause", "d" * 32)
    assert "Error: the folder is gone" in column(window, 3)[0]  # nothing changed
    fake.fail = PermissionError(13, "Permission denied", "/media/usb/Music/.meshsync")
    click(qtbot, window.pause_button)
    qtbot.waitUntil(lambda: "Permission denied" in said(window), timeout=3000)
    assert said(window) == "Permission denied (/media/usb/Music/.meshsync)"


def test_actions_before_the_agent_runs_say_so(
    qtbot: Any, qloop: asyncio.AbstractEventLoop, gui_home: Context
) -> None:
    bridge = AgentBridge(gui_home)
    errors: list[str] = []
    bridge.error.connect(errors.append)
    sync = SyncUi(bridge)  # agent.sync: no agent yet
    window = open_window(qtbot, sync)
    assert window.stack.currentWidget() is window.empty
    assert sync.model.offer("offer-1") is None
    task = sync.model.answer_offer("offer-1", True)
    qtbot.waitUntil(task.done, timeout=3000)
    assert task.result() is None
    assert said(window) == "Not connected yet: the agent is still starting."
    window.close()
    task = sync.model.answer_offer("offer-1", True)
    qtbot.waitUntil(task.done, timeout=3000)
    assert errors == ["Not connected yet: the agent is still starting."]  # the main window's


def test_add_folder_asks_a_folder_then_a_device_and_offers_it(
    qtbot: Any,
    sync: SyncUi,
    fake: FakeSync,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "Projects").mkdir()
    dialogs: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(
        QFileDialog, "getExistingDirectory", lambda *args, **kw: str(tmp_path / "Projects")
    )

    def get_item(parent: Any, title: str, label: str, items: list[str], *args: Any, **kw: Any):  # type: ignore[no-untyped-def]
        dialogs.append((label, list(items)))
        return items[1], True

    monkeypatch.setattr(QInputDialog, "getItem", get_item)
    window = open_window(qtbot, sync)
    fake.answer = asyncio.get_running_loop().create_future()
    click(qtbot, window.add_button)
    # Only online devices; the offer waits for the peer's answer, and says so.
    assert dialogs == [("Keep “Projects” in sync with:", ["laptop (ann)", "phone (ann)"])]
    qtbot.waitUntil(lambda: bool(fake.calls), timeout=3000)
    assert fake.calls[-1] == ("add", tmp_path / "Projects", "id-phone")
    assert said(window) == "Offering “Projects” to phone… It is added once phone accepts."
    fake.answer.set_result(None)
    qtbot.waitUntil(lambda: "Projects" in column(window, 0), timeout=3000)
    assert said(window) == "“Projects” is now synced with phone."

    # The peer declines: the service's one line, nothing added.
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(tmp_path))
    fake.answer = None
    fake.fail = UserError("phone declined the folder")
    click(qtbot, window.add_button)
    qtbot.waitUntil(lambda: said(window) == "phone declined the folder", timeout=3000)
    assert len(fake.items) == 5

    # Cancelled folder dialog: nothing asked, nothing offered.
    calls = len(fake.calls)
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: "")
    click(qtbot, window.add_button)
    assert len(fake.calls) == calls and len(dialogs) == 2


def test_add_folder_with_no_device_online_says_so(
    qtbot: Any,
    sync: SyncUi,
    fake: FakeSync,
    bridge: AgentBridge,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bridge.devices.set_devices([OLD])
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(tmp_path))
    window = open_window(qtbot, sync)
    click(qtbot, window.add_button)
    assert said(window) == (
        "No other device is online: the device must be online to accept the folder."
        " Offline now: old."
    )
    assert fake.calls == []


def test_add_device_to_a_folder_offers_only_devices_not_in_it(
    qtbot: Any, sync: SyncUi, fake: FakeSync, tmp_path: Path
) -> None:
    window = open_window(qtbot, sync)
    offered: list[list[str]] = []

    def choose(devices: list[DeviceEntry], label: str) -> DeviceEntry | None:
        offered.append([d.name for d in devices])
        return devices[0]

    window.choose_device = choose
    select(window, "Photos")
    click(qtbot, window.add_device_button)
    qtbot.waitUntil(lambda: bool(fake.calls), timeout=3000)
    assert offered == [["phone"]]  # laptop syncs it already; old is offline
    assert fake.calls[0] == ("add", tmp_path / "Photos", "id-phone")


def test_open_folder_and_the_conflicts_list(
    qtbot: Any, sync: SyncUi, fake: FakeSync, tmp_path: Path
) -> None:
    root = tmp_path / "Photos"
    (root / "trip").mkdir()
    (root / "trip" / "a.jpg").write_bytes(b"1")
    (root / "trip" / "a.sync-conflict-20250102-030405-laptop.jpg").write_bytes(b"2")
    (root / "notes.sync-conflict-20250101-120000-phone.txt").write_bytes(b"3")
    (root / ".meshsync" / "versions").mkdir(parents=True)
    (root / ".meshsync" / "versions" / "x.sync-conflict-20250101-120000-phone.txt").touch()
    window = open_window(qtbot, sync)
    opened: list[Path] = []
    window.opener = opened.append
    select(window, "Photos")
    click(qtbot, window.open_button)
    assert opened == [root]

    click(qtbot, window.conflicts_button)
    dialog = window.conflict_dialogs["a" * 32]
    assert isinstance(dialog, ConflictsDialog) and dialog.isVisible()
    qtbot.waitUntil(lambda: dialog.list.count() == 2, timeout=3000)
    items = [dialog.list.item(i) for i in range(2)]
    assert [i.text() for i in items] == [
        "notes.sync-conflict-20250101-120000-phone.txt",
        "trip/a.sync-conflict-20250102-030405-laptop.jpg",
    ]
    assert items[1].toolTip() == (
        "Conflicting copy of trip/a.jpg, from laptop, saved 2025-01-02 03:04:05"
    )
    assert dialog.status.text() == "2 conflict copies."
    dialog.list.setCurrentRow(1)
    click(qtbot, dialog.open_button)
    click(qtbot, dialog.folder_button)
    dialog.list.itemActivated.emit(dialog.list.item(0))
    assert opened[1:] == [
        root / "trip" / "a.sync-conflict-20250102-030405-laptop.jpg",
        root / "trip",
        root / "notes.sync-conflict-20250101-120000-phone.txt",
    ]
    dialog.close()
    qtbot.waitUntil(lambda: not window.conflict_dialogs, timeout=3000)

    # A folder whose root is gone: one line, no file manager.
    select(window, "Music")
    (tmp_path / "Music").rmdir()
    click(qtbot, window.open_button)
    assert "is not there" in said(window) and len(opened) == 4


def test_find_conflicts_skips_the_internal_folder(tmp_path: Path) -> None:
    (tmp_path / ".meshsync").mkdir()
    (tmp_path / ".meshsync" / "b.sync-conflict-20250101-000000-x").touch()
    (tmp_path / "odd.sync-conflict-name").touch()
    [found] = find_conflicts(tmp_path)
    assert found.relative == "odd.sync-conflict-name"
    assert found.description == "A conflicting copy"


def offer_event(offer_id: str = "offer-1", auto: bool = False) -> SyncFolderOffered:
    return SyncFolderOffered(
        offer_id=offer_id,
        folder_id="f" * 32,
        peer="id-laptop",
        peer_name="laptop",
        label="Holiday\nphotos",
        auto_accepted=auto,
    )


def waiting(fake: FakeSync, offer_id: str = "offer-1", expires_in: float = 90) -> SyncOfferInfo:
    info = SyncOfferInfo(
        offer_id=offer_id,
        folder_id="f" * 32,
        peer="id-laptop",
        peer_name="laptop",
        label="Holiday\nphotos",
        name="Holiday photos",
        expires_at=time.time() + expires_in,
    )
    fake.waiting[offer_id] = info
    return info


def offer_dialogs() -> list[SyncOfferDialog]:
    return [
        w
        for w in QApplication.topLevelWidgets()
        if isinstance(w, SyncOfferDialog) and w.isVisible()
    ]


def test_an_offer_asks_and_accepting_answers_with_the_default_place(
    qtbot: Any, sync: SyncUi, fake: FakeSync, bridge: AgentBridge, tmp_path: Path
) -> None:
    bridge.handle(offer_event(auto=True))  # auto-accepted: nothing to ask
    bridge.handle(offer_event())  # not waiting (declined by policy, answered by the CLI)
    assert not sync.offer_dialogs and not offer_dialogs()
    waiting(fake)
    bridge.handle(offer_event())
    [dialog] = offer_dialogs()
    assert (
        dialog.text.text() == "laptop wants to sync the folder “Holiday photos” with this device."
    )
    where = tmp_path / "sync-root" / "Holiday photos"
    assert dialog.where.text() == f"Kept in: {where} (a new folder)"
    bridge.handle(offer_event())  # the same offer again: the same dialog
    assert len(offer_dialogs()) == 1
    click(qtbot, dialog.accept_button)
    qtbot.waitUntil(lambda: bool(fake.calls), timeout=3000)
    assert fake.calls == [("answer_offer", "offer-1", True, None)]  # the service's default
    assert not sync.offer_dialogs and not offer_dialogs()


def test_an_offer_accepted_into_a_chosen_folder(
    qtbot: Any,
    sync: SyncUi,
    fake: FakeSync,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chosen = tmp_path / "Photos"  # has files: the dialog says they sync too
    (chosen / "old.jpg").write_bytes(b"x")
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(chosen))
    dialog = sync.offered(waiting(fake))
    assert not dialog.warning.isVisibleTo(dialog)
    click(qtbot, dialog.change_button)
    assert dialog.where.text() == f"Kept in: {chosen}"
    assert dialog.warning.isVisibleTo(dialog)
    assert "already has files" in dialog.warning.text()
    click(qtbot, dialog.accept_button)
    qtbot.waitUntil(lambda: bool(fake.calls), timeout=3000)
    assert fake.calls == [("answer_offer", "offer-1", True, chosen)]


def test_an_offer_declined_or_closed_declines(qtbot: Any, sync: SyncUi, fake: FakeSync) -> None:
    dialog = sync.offered(waiting(fake, "offer-1"))
    click(qtbot, dialog.decline_button)
    other = sync.offered(waiting(fake, "offer-2"))
    other.close()
    qtbot.waitUntil(lambda: len(fake.calls) == 2, timeout=3000)
    assert fake.calls == [
        ("answer_offer", "offer-1", False, None),
        ("answer_offer", "offer-2", False, None),
    ]


def test_an_offer_answered_elsewhere_or_expired_closes_its_dialog(
    qtbot: Any, sync: SyncUi, fake: FakeSync, bridge: AgentBridge
) -> None:
    errors: list[str] = []
    bridge.error.connect(errors.append)
    dialog = sync.offered(waiting(fake))
    bridge.handle(SyncFolderAdded(folder_id="f" * 32, label="Holiday photos", path="/x"))
    assert not sync.offer_dialogs and not dialog.isVisible()
    late = sync.offered(waiting(fake, "offer-2", expires_in=0.2))
    assert late.isVisible()
    qtbot.waitUntil(lambda: not sync.offer_dialogs, timeout=3000)  # closed, then deleted
    assert errors == [
        "laptop's offer to sync “Holiday photos” expired: nobody answered in time."
        " They can offer it again."
    ]
    assert fake.calls == []  # the CLI answered, or nobody did: the dialogs do not answer


def test_relative_times() -> None:
    assert relative_time(None, NOW) == "No change yet"
    assert relative_time(NOW - 5, NOW) == "just now"
    assert relative_time(NOW + 30, NOW) == "just now"  # a peer's clock a little ahead
    assert relative_time(NOW - 60, NOW) == "1 min ago"
    assert relative_time(NOW - 3 * 3600, NOW) == "3 h ago"
    assert relative_time(NOW - 86_400 - 60, NOW) == "yesterday"
    assert relative_time(NOW - 3 * 86_400, NOW) == "3 days ago"
    assert relative_time(NOW - 30 * 86_400, NOW) == time.strftime(
        "%Y-%m-%d", time.localtime(NOW - 30 * 86_400)
    )


def test_the_tray_and_the_main_window_open_it(
    qtbot: Any,
    qloop: asyncio.AbstractEventLoop,
    gui_home: Context,
    fake: FakeSync,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gui = GuiApp(gui_home, use_tray=False)
    gui.sync.model._api = lambda: fake
    assert gui.tray.sync_folder_action.text() == "Sync a folder…"
    assert gui.tray.synced_folders_action.text() == "Synced folders"
    gui.tray.synced_folders_action.trigger()
    window = gui.sync.window
    assert window is not None and window.isVisible()
    assert len(column(window, 0)) == 4
    window.close()
    gui.window.sync_button.click()
    assert window.isVisible()
    window.close()
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: "")
    gui.tray.sync_folder_action.trigger()  # the window, then the folder dialog (cancelled)
    assert window.isVisible() and fake.calls == []
    # A device's "Sync a folder…" (the main window's device menu): no device question.
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(tmp_path))
    assert gui.window.sync_folder_with is not None
    gui.window.sync_folder_with(PHONE)
    qtbot.waitUntil(lambda: bool(fake.calls), timeout=3000)
    assert fake.calls == [("add", tmp_path, "id-phone")]
    window.close()
    gui.window.close()


# ---------------------------------------------------------------- with a real peer


def test_adding_a_folder_in_the_app_syncs_it_with_a_real_agent(
    qtbot: Any,
    qloop: asyncio.AbstractEventLoop,
    gui_home: Context,
    mesh: tuple[Server, AgentHome],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The app offers a folder to ann's laptop (a `meshagent up`; her own device accepts by
    itself): the file appears there, and the laptop's change appears here and in the window."""
    _, laptop = mesh
    folder_path = tmp_path / "Shared"
    folder_path.mkdir()
    (folder_path / "hello.txt").write_text("hello from desk\n")
    gui = GuiApp(Context.open(gui_home.paths.home), use_tray=False)
    task = asyncio.ensure_future(gui.run())
    qtbot.waitUntil(lambda: gui.agent_ready.is_set() or task.done(), timeout=20_000)
    assert not task.done(), task.result()
    qtbot.waitUntil(lambda: bool(gui.bridge.online_devices()), timeout=10_000)

    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(folder_path))
    asked: list[list[str]] = []

    def get_item(parent: Any, title: str, label: str, items: list[str], *a: Any, **k: Any):  # type: ignore[no-untyped-def]
        asked.append(list(items))
        return items[0], True

    monkeypatch.setattr(QInputDialog, "getItem", get_item)
    gui.tray.sync_folder_action.trigger()  # the window, the folder dialog, the device question
    assert asked == [["laptop (ann)"]]
    window = gui.sync.window
    assert window is not None
    qtbot.waitUntil(lambda: "Shared" in column(window, 0), timeout=30_000)
    copy = laptop.home / "sync" / "Shared" / "hello.txt"
    qtbot.waitUntil(copy.exists, timeout=30_000)
    qtbot.waitUntil(lambda: copy.read_text() == "hello from desk\n", timeout=30_000)
    assert said(window) == "“Shared” is now synced with laptop."
    qtbot.waitUntil(lambda: column(window, 2) == ["laptop (online)"], timeout=30_000)

    (copy.parent / "reply.txt").write_text("hello from laptop\n")
    qtbot.waitUntil((folder_path / "reply.txt").exists, timeout=30_000)
    qtbot.waitUntil(lambda: "reply.txt changed by laptop" in window.detail.text(), timeout=30_000)
    qtbot.waitUntil(lambda: column(window, 3) == ["Up to date"], timeout=30_000)

    gui.quit()
    qtbot.waitUntil(task.done, timeout=15_000)
    assert task.result() == 0


def test_conflicts_and_failures_reach_the_apps_toasts(
    qtbot: Any, qloop: asyncio.AbstractEventLoop, gui_home: Context
) -> None:
    """The core's router words them (its rules); the app's toast sink shows them, once."""
    gui = GuiApp(gui_home, use_tray=False)
    router = NotificationRouter(gui_home.config, [gui.toasts])
    conflict = SyncConflict(
        folder_id="a" * 32,
        label="Photos",
        name="a.txt",
        conflict_name="a.sync-conflict-20250101-120000-desk.txt",
        peer_name="laptop",
    )
    task = asyncio.ensure_future(router.handle(conflict))
    qtbot.waitUntil(task.done, timeout=3000)
    task = asyncio.ensure_future(
        router.handle(SyncFailed(folder_id="a" * 32, label="Photos", message="disk full"))
    )
    qtbot.waitUntil(task.done, timeout=3000)
    assert [(n.kind, n.title) for n in gui.toasts.shown] == [
        ("sync_conflict", "Sync conflict in Photos"),
        ("sync_failed", "Sync of Photos stopped"),
    ]
    assert gui.window.statusBar().currentMessage() == "Sync of Photos stopped: disk full"
    gui.window.close()
