"""Issue 17, "Confusing", in the app: what a new user reads in the first hour, at the windows'
default sizes. The transfer list's Name column stays readable and its progress bar has a
groove; a long state is whole somewhere; "Offline" says why; notification settings are levels
in words, not Gotify numbers."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from PySide6.QtCore import QRect, Qt
from PySide6.QtGui import QColor, QImage, QPainter
from PySide6.QtWidgets import QApplication, QStyleOptionViewItem

from meshagent_gui.config import KEYS
from meshagent_gui.context import Context
from meshagent_gui.ui.bridge import AgentBridge, link_reason
from meshagent_gui.ui.main_window import MainWindow
from meshagent_gui.ui.settings import SettingsDialog
from meshagent_gui.ui.transfers import (
    Column,
    ProgressDelegate,
    State,
    TransferRow,
    TransferTableModel,
)
from tests.integration.harness import AgentHome, Server

from .support import run

PEER = "ab" * 32
CANCELLED = "Cancelled: cancelled by the receiver"


def _window(qtbot: Any, ctx: Context) -> tuple[AgentBridge, MainWindow]:
    bridge = AgentBridge(ctx)
    window = MainWindow(bridge, keep_running_on_close=False)
    qtbot.addWidget(window)
    return bridge, window


def _rows(model: TransferTableModel) -> None:
    model.add(
        TransferRow(
            "a", "receive", "big-holiday-video-2024.mkv", PEER, "laptop", 419_430_400, 10**8
        )
    )
    model.add(
        TransferRow(
            "b",
            "send",
            "notes.txt",
            PEER,
            "laptop",
            state=State.CANCELLED,
            error="cancelled by the receiver",
        )
    )


def test_the_name_column_is_readable_at_the_default_size(qtbot: Any, gui_home: Context) -> None:
    bridge, window = _window(qtbot, gui_home)
    _rows(bridge.transfers)
    window.show()
    qtbot.waitExposed(window)
    QApplication.processEvents()
    table = window.table
    assert table.columnWidth(Column.NAME) >= 180, [table.columnWidth(c) for c in Column]
    # Every column is on screen: nothing scrolls sideways at the default size.
    assert sum(table.columnWidth(c) for c in Column) <= table.viewport().width()
    for column in Column:
        assert table.columnWidth(column) >= 48, column


def test_a_long_state_is_available_whole(qtbot: Any, gui_home: Context) -> None:
    bridge, window = _window(qtbot, gui_home)
    _rows(bridge.transfers)
    window.show()
    qtbot.waitExposed(window)
    model = bridge.transfers
    state = model.index(1, Column.STATE)
    assert model.data(state, Qt.ItemDataRole.ToolTipRole) == CANCELLED
    assert window.table.textElideMode() == Qt.TextElideMode.ElideMiddle
    window.table.selectRow(1)
    assert window.transfer_detail.isVisible()
    assert window.transfer_detail.text() == f"notes.txt: {CANCELLED}"
    assert window.transfer_detail.wordWrap()


def _groove_pixel(fraction_done: int) -> QColor:
    model = TransferTableModel()
    model.add(TransferRow("a", "send", "x", PEER, "laptop", total=100, done=fraction_done))
    image = QImage(200, 34, QImage.Format.Format_RGB32)
    image.fill(QColor("white"))  # a white row
    option = QStyleOptionViewItem()
    option.rect = QRect(0, 0, 200, 34)
    option.palette = QApplication.palette()
    painter = QPainter(image)
    ProgressDelegate().paint(painter, option, model.index(0, Column.PROGRESS))
    painter.end()
    return image.pixelColor(170, 17)  # right of the centred percentage, in the unfilled part


def test_the_progress_groove_shows_on_a_white_row(qtbot: Any) -> None:
    groove = _groove_pixel(10)
    distance = max(255 - groove.red(), 255 - groove.green(), 255 - groove.blue())
    assert distance >= 20, groove.name()


def test_offline_says_why_with_a_closed_server(
    qtbot: Any, qloop: asyncio.AbstractEventLoop, gui_home: Context, server: Server
) -> None:
    server.add_user("ann")
    assert gui_home.paths.home is not None
    desk = AgentHome(gui_home.paths.home, server.logs, "desk")
    desk.ok("login", server.url, "--join-code", server.join_code("ann"), "--name", "desk")
    server.stop()  # enrolled, then the server went away: nothing listens there now
    gui_home = Context.open(gui_home.paths.home)
    bridge, window = _window(qtbot, gui_home)
    agent = bridge.make_agent(gui_home)
    link = bridge.spawn(agent.link.run(), "test-link")
    try:
        bridge.attach(agent, None)
        assert window.pill.text() == "Offline: not connected yet"
        expected = re.compile(r"Offline: server unreachable \(retrying (in \d+ s|now)\)")
        qtbot.waitUntil(lambda: expected.fullmatch(window.pill.text()) is not None, timeout=10_000)
        link.cancel()
    finally:
        run(qtbot, bridge.aclose())
        agent.transfers.close()
        run(qtbot, agent.client.aclose())


def test_link_reasons_in_words() -> None:
    assert link_reason("[Errno 111] Connect call failed ('127.0.0.1', 9)") == "server unreachable"
    assert link_reason("[Errno -2] Name or service not known") == "server name not found"
    assert link_reason("timed out during opening handshake") == "server not answering"
    assert link_reason("server answered HTTP 502") == "server answered HTTP 502"
    assert link_reason(None) == "not connected yet"


def test_notification_settings_read_as_levels(qtbot: Any, gui_home: Context) -> None:
    dialog = SettingsDialog(gui_home)
    qtbot.addWidget(dialog)
    summary = dialog.summary()
    assert "Transfer finished: normal" in summary
    assert "Transfer failed: high" in summary
    assert "Terminal control requested: urgent" in summary
    assert "Device came online: off" in summary
    # One definition of the keys: every notify.* setting, none invented here.
    assert list(dialog.priorities) == [k for k in KEYS if k.startswith("notify.")]
    assert not any(re.search(r"\d", line) for line in summary), summary


def test_a_priority_set_elsewhere_is_kept(qtbot: Any, gui_home: Context) -> None:
    gui_home.config.set("notify.sync_conflict", 5)  # `meshagent config set`, between levels
    dialog = SettingsDialog(gui_home)
    qtbot.addWidget(dialog)
    box = dialog.priorities["notify.sync_conflict"]
    assert box.currentText() == "Normal"
    dialog.apply()
    assert Context.open(gui_home.paths.home).config["notify.sync_conflict"] == 5
    box.setCurrentIndex(box.findText("Urgent"))
    dialog.apply()
    assert Context.open(gui_home.paths.home).config["notify.sync_conflict"] == 8
