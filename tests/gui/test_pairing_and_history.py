"""Issue 17 in the app: local meshes found on the network in the first-run dialog (and joined
with the code alone), "Save to" in the accept dialog, the transfer history window, and the tray's
offline reason. Real agents and a real local mesh where the feature crosses processes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from html import escape
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel

from meshagent_gui.compose.local_mesh import owner_name
from meshagent_gui.context import Context
from meshagent_gui.core.events import TransferOffered
from meshagent_gui.core.ipc_types import TransferInfo
from meshagent_gui.core.mesh.discovery import FoundMesh, discover
from meshagent_gui.core.mesh.enroll import load_enrollment
from meshagent_gui.ui.app import GuiApp
from meshagent_gui.ui.bridge import AgentBridge
from meshagent_gui.ui.first_run import Choice, FirstRunDialog
from meshagent_gui.ui.offers import OfferDialog
from meshagent_gui.ui.resources import TrayState
from meshagent_gui.ui.transfers import HistoryColumn, HistoryWindow
from meshagent_gui.ui.tray import Tray
from tests.integration.harness import (
    AgentHome,
    Process,
    free_port,
)

from .support import offer_dialog, run, send_from

OFFER = TransferOffered("t1", "peer", "bobs-laptop", ("photos", "notes.txt"), 3, 12_345, False)


# ------------------------------------------------------------ Save to


def test_save_to_defaults_to_downloads_and_carries_the_chosen_folder(
    qtbot: Any, tmp_path: Path
) -> None:
    dialog = OfferDialog(OFFER, downloads=tmp_path / "Downloads")
    qtbot.addWidget(dialog)
    assert dialog.where.text() == f"Save to: {tmp_path / 'Downloads'}"
    chosen = tmp_path / "<b>elsewhere</b>"
    dialog.choose_folder = lambda start: chosen  # type: ignore[method-assign]
    qtbot.mouseClick(dialog.change_button, Qt.MouseButton.LeftButton)
    assert dialog.where.text() == f"Save to: {chosen}"  # plain text, never markup
    assert dialog.where.textFormat() is Qt.TextFormat.PlainText
    with qtbot.waitSignal(dialog.answered) as answered:
        qtbot.mouseClick(dialog.accept_button, Qt.MouseButton.LeftButton)
    assert answered.args == ["t1", True, False, chosen]


def test_a_declined_offer_carries_no_folder_and_a_cancelled_choice_keeps_the_default(
    qtbot: Any, tmp_path: Path
) -> None:
    dialog = OfferDialog(OFFER, downloads=tmp_path)
    qtbot.addWidget(dialog)
    dialog.choose_folder = lambda start: None  # type: ignore[method-assign]
    qtbot.mouseClick(dialog.change_button, Qt.MouseButton.LeftButton)
    assert dialog.chosen is None and dialog.where.text() == f"Save to: {tmp_path}"
    dialog.set_destination(tmp_path / "x")
    with qtbot.waitSignal(dialog.answered) as answered:
        qtbot.mouseClick(dialog.decline_button, Qt.MouseButton.LeftButton)
    assert answered.args == ["t1", False, False, None]


def test_peer_names_in_the_offer_are_text(qtbot: Any) -> None:
    evil = "<img src=x>"
    dialog = OfferDialog(TransferOffered("t", "p", evil, (evil,), 1, 1, False))
    qtbot.addWidget(dialog)
    shown = "".join(label.text() for label in dialog.findChildren(QLabel))
    assert escape(evil) in shown and "<img" not in shown


def test_a_real_offer_lands_where_the_receiver_chose_and_shows_in_history(
    qtbot: Any,
    qloop: asyncio.AbstractEventLoop,
    gui_home: Context,
    bob_and_desk: AgentHome,
    tmp_path: Path,
) -> None:
    bob = bob_and_desk
    ctx = Context.open(gui_home.paths.home)
    ctx.config.set("downloads.dir", str(tmp_path / "downloads"))
    gui = GuiApp(ctx, use_tray=False)
    task = asyncio.ensure_future(gui.run())
    try:
        qtbot.waitUntil(lambda: gui.agent_ready.is_set() or task.done(), timeout=20_000)
        assert not task.done(), task.result()
        qtbot.waitUntil(lambda: bool(gui.bridge.online_devices()), timeout=10_000)
        report = tmp_path / "report.txt"
        report.write_text("quarterly")
        sending = send_from(bob, report)
        qtbot.waitUntil(lambda: offer_dialog() is not None, timeout=20_000)
        dialog = offer_dialog()
        assert dialog is not None
        assert dialog.where.text() == f"Save to: {tmp_path / 'downloads'}"
        elsewhere = tmp_path / "chosen" / "folder"  # made if need be, as `accept --to` does
        dialog.choose_folder = lambda start: elsewhere  # type: ignore[method-assign]
        qtbot.mouseClick(dialog.change_button, Qt.MouseButton.LeftButton)
        qtbot.mouseClick(dialog.accept_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: sending.poll() is not None, timeout=30_000)
        _, errors = sending.communicate()
        assert sending.returncode == 0, errors
        assert (elsewhere / "report.txt").read_text() == "quarterly"
        assert not (tmp_path / "downloads" / "report.txt").exists()

        history = gui.window.open_history()
        qtbot.waitUntil(lambda: history.model.rowCount() >= 1, timeout=10_000)
        record = history.model.record_at(0)
        assert (record.direction, record.state, record.peer_name) == (
            "receive",
            "completed",
            "bobs-laptop",
        )
        name = history.model.index(0, HistoryColumn.NAME).data()
        assert name == "↓ report.txt"
        history.table.selectRow(0)
        assert history.open_button.isEnabled() and "bobs-laptop" in history.detail.text()
    finally:
        gui.quit()
        qtbot.waitUntil(task.done, timeout=15_000)


# ------------------------------------------------------------ history


def _info(n: int, **fields: Any) -> TransferInfo:
    base: dict[str, Any] = {
        "transfer_id": f"id{n}",
        "direction": "send",
        "peer": "ab" * 32,
        "name": f"file{n}",
        "total": 1000 * n,
        "state": "completed",
        "peer_name": "laptop",
        "names": [f"file{n}"],
        "started": 1_000_000.0 + n,
        "ended": 1_000_010.0 + n,
    }
    return TransferInfo(**{**base, **fields})


def test_history_lists_newest_first_with_reasons_whole(
    qtbot: Any, qloop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    records = [
        _info(1),
        _info(2, state="failed", reason="laptop did not answer within 90 s"),
        _info(3, direction="receive", where=str(tmp_path), names=["a", "b", "c"]),
        _info(4, direction="receive", state="declined", where=""),
    ]

    async def load() -> list[TransferInfo]:
        return records

    window = HistoryWindow(load, lambda coro, name: coro.close())
    qtbot.addWidget(window)
    assert window.size().width() >= 900  # every column readable at the default size
    run(qtbot, window.reload())
    model = window.model
    assert [model.record_at(r).transfer_id for r in range(4)] == ["id4", "id3", "id2", "id1"]
    assert model.index(1, HistoryColumn.NAME).data() == "↓ a and 2 more"
    failed = model.index(2, HistoryColumn.RESULT)
    assert failed.data() == "failed"
    assert failed.data(Qt.ItemDataRole.ToolTipRole) == "failed: laptop did not answer within 90 s"
    assert not window.empty.isVisible()
    window.table.selectRow(1)  # a completed receive whose folder exists: open it
    assert window.open_button.isEnabled()
    window.table.selectRow(0)  # declined: nothing landed
    assert not window.open_button.isEnabled()
    window.table.selectRow(2)
    assert "did not answer within 90 s" in window.detail.text()


def test_an_empty_history_says_so(qtbot: Any, qloop: asyncio.AbstractEventLoop) -> None:
    async def load() -> list[TransferInfo]:
        return []

    window = HistoryWindow(load, lambda coro, name: coro.close())
    qtbot.addWidget(window)
    window.show()
    run(qtbot, window.reload())
    assert window.empty.isVisible() and "No finished transfers" in window.empty.text()


# ------------------------------------------------------------ tray


def test_the_tray_tooltip_says_why_it_is_offline(qtbot: Any, gui_home: Context) -> None:
    bridge = AgentBridge(gui_home)
    tray = Tray(
        bridge,
        gui_home.paths,
        open_window=lambda: None,
        quit_app=lambda: None,
        choose_paths=lambda folder: [],
    )
    assert bridge.tray_state is TrayState.OFFLINE
    bridge._set_link("offline", "[Errno 111] Connection refused", retry_in=5)
    assert tray.icon.toolTip() == "Mesh Agent: offline: server unreachable"
    bridge._set_link("online")
    assert tray.icon.toolTip() == "Mesh Agent: online"


# ------------------------------------------------------------ first run: found on this network


def test_found_meshes_are_listed_and_a_click_fills_the_address(
    qtbot: Any, gui_home: Context
) -> None:
    dialog = FirstRunDialog(gui_home)
    qtbot.addWidget(dialog)
    assert not dialog.on_network.isChecked()  # the default: this computer only
    dialog.show_found(
        [FoundMesh("ann's mesh on desk", "http://192.0.2.7:8765", "ann", "desk", "s1")]
    )
    assert dialog.found_list.count() == 1 and not dialog.found_list.isHidden()
    item = dialog.found_list.item(0)
    assert item.text() == "ann on desk (192.0.2.7:8765)"
    dialog._use_found(item)
    assert dialog.url.text() == "http://192.0.2.7:8765"
    dialog.show_found([])
    assert dialog.found_list.isHidden() and "No local mesh" in dialog.found_hint.text()


def test_a_pasted_long_code_fills_address_and_code(qtbot: Any, gui_home: Context) -> None:
    dialog = FirstRunDialog(gui_home)
    qtbot.addWidget(dialog)
    dialog.join_code.setText("mesh://192.0.2.7:8765/ABCD-EFGH-IJKL-MNOP")
    assert dialog.url.text() == "http://192.0.2.7:8765"
    assert dialog.join_code.text() == "ABCD-EFGH-IJKL-MNOP"
    dialog.join_code.setText("mesh://not a code")  # garbage stays for Connect to refuse
    assert dialog.join_code.text() == "mesh://not a code"


def test_the_network_is_opted_into_by_ticking(qtbot: Any, gui_home: Context) -> None:
    dialog = FirstRunDialog(gui_home)
    qtbot.addWidget(dialog)
    dialog.on_network.setChecked(True)
    dialog.choose_local()
    assert dialog.choice is Choice.LOCAL and gui_home.config["local.listen"] == "0.0.0.0"


@pytest.fixture
def local_mesh(tmp_path: Path) -> Iterator[tuple[AgentHome, str]]:
    """A real `meshagent up --local` on this machine's network address, advertised by mDNS."""
    owner = AgentHome(tmp_path / "owner", tmp_path, "owner")
    owner_config = {
        "device.name": "owner",
        "local.port": str(free_port()),
        "local.listen": "0.0.0.0",
    }
    for key, value in owner_config.items():
        owner.ok("config", "set", key, value)
    owner.process = Process(
        ["--home", str(owner.home), "--json", "up", "--local"], tmp_path / "owner.log"
    )
    started = json.loads(owner.process.read_line(r'^\{"event": "up".*').group(0))
    try:
        yield owner, started["server"]
    finally:
        owner.stop()


def test_the_first_run_dialog_finds_a_real_local_mesh_and_joins_with_the_code_alone(
    qtbot: Any,
    qloop: asyncio.AbstractEventLoop,
    gui_home: Context,
    local_mesh: tuple[AgentHome, str],
) -> None:
    owner, url = local_mesh
    found = run(qtbot, discover(3.0))
    if not any(m.url == url for m in found):
        pytest.skip("mDNS: this machine's multicast does not loop back to its own interfaces")
    dialog = FirstRunDialog(gui_home)
    qtbot.addWidget(dialog)
    dialog.show()

    def urls() -> set[str]:
        items = (dialog.found_list.item(n) for n in range(dialog.found_list.count()))
        return {str(item.data(Qt.ItemDataRole.UserRole)) for item in items}

    qtbot.waitUntil(lambda: url in urls(), timeout=10_000)
    code = owner.ok(
        "server",
        "join-code",
        "--user",
        owner_name(),
        "--data-dir",
        str(owner.home / "data" / "server"),
    ).strip()
    dialog.join_code.setText(code)  # the code alone: the address is left empty
    assert dialog.url.text() == ""
    qtbot.mouseClick(dialog.connect_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: dialog.choice is not None or dialog.error.isVisible(), timeout=20_000)
    assert dialog.choice is Choice.CONNECTED, dialog.error.text()
    enrollment = load_enrollment(gui_home)
    assert enrollment is not None and enrollment.url == url


def test_the_history_button_keeps_the_main_window_at_its_default_size(
    qtbot: Any, gui_home: Context
) -> None:
    from meshagent_gui.ui.main_window import MainWindow

    window = MainWindow(AgentBridge(gui_home), keep_running_on_close=False)
    qtbot.addWidget(window)
    window.show()
    assert window.minimumSizeHint().width() <= window.width()
    assert window.history_button.isVisible()
    assert window.device_list.viewport().width() >= 220  # a device row, whole
    assert not window.device_list.horizontalScrollBar().isVisible()


def test_the_local_mesh_card_gives_the_pairing_code(qtbot: Any, gui_home: Context) -> None:
    from PySide6.QtGui import QGuiApplication

    from meshagent_gui.compose.onboarding import JoinCodeWithUrl
    from meshagent_gui.ui.main_window import MainWindow

    bridge = AgentBridge(gui_home)
    window = MainWindow(bridge, keep_running_on_close=False)
    qtbot.addWidget(window)
    bridge.join_code = JoinCodeWithUrl("http://192.0.2.7:8765", "ABCD-EFGH-IJKL-MNOP", 0.0)
    window.show_join_code(bridge.join_code)
    detail = window.card_detail.text()
    assert "code alone" in detail
    assert "meshagent join mesh://192.0.2.7:8765/ABCD-EFGH-IJKL-MNOP" in detail
    qtbot.mouseClick(window.copy_button, Qt.MouseButton.LeftButton)
    clipboard = QGuiApplication.clipboard()
    assert clipboard.text() == "meshagent join mesh://192.0.2.7:8765/ABCD-EFGH-IJKL-MNOP"
    window.show_join_code(JoinCodeWithUrl("http://127.0.0.1:8765", "ABCD-EFGH-IJKL-MNOP", 0.0))
    assert "this computer" in window.card_detail.text()


def test_a_garbage_code_alone_is_refused_in_the_dialog(
    qtbot: Any, qloop: asyncio.AbstractEventLoop, gui_home: Context
) -> None:
    dialog = FirstRunDialog(gui_home)
    qtbot.addWidget(dialog)
    dialog.join_code.setText("<b>not a code</b>")
    qtbot.mouseClick(dialog.connect_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not dialog.error.isHidden(), timeout=5000)
    assert "is not a join code" in dialog.error.text() and dialog.choice is None
    assert dialog.error.textFormat() is Qt.TextFormat.PlainText  # input is never markup
    assert load_enrollment(gui_home) is None
