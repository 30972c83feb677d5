"""'Share by link…' and browsers in the device list, against a real server and the app's real
agent; the browser is the Python stand-in page of tests/integration/test_browser_peers.py."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QApplication

from meshagent_gui.context import Context
from meshagent_gui.ui.app import GuiApp
from meshagent_gui.ui.bridge import LINK_RECIPIENT, AgentBridge
from meshagent_gui.ui.devices import DeviceEntry
from meshagent_gui.ui.share_link import ShareLinkWindow, expiry_text
from meshagent_gui.ui.transfers import State
from tests.integration.harness import AgentHome, Server
from tests.integration.test_browser_peers import Page

from .support import run


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module: each test enrols a fresh desk (and page) in it."""
    root = tmp_path_factory.mktemp("share-link")
    logs = root / "logs"
    logs.mkdir()
    server = Server(root / "server", logs).start()
    try:
        server.add_user("ann")
        yield server
    finally:
        server.stop()


@pytest.fixture
def gui(
    qtbot: Any,
    qloop: asyncio.AbstractEventLoop,
    gui_home: Context,
    shared_server: Server,
    tmp_path: Path,
) -> Iterator[GuiApp]:
    """The app (desk, ann's) running its agent against the module's server."""
    assert gui_home.paths.home is not None
    logs = tmp_path / "logs"
    logs.mkdir()
    home = AgentHome(gui_home.paths.home, logs, "desk")
    home.ok("login", shared_server.url, "--join-code", shared_server.join_code("ann"))
    app = GuiApp(Context.open(gui_home.paths.home), use_tray=False)
    task = asyncio.ensure_future(app.run())
    qtbot.waitUntil(lambda: app.agent_ready.is_set() or task.done(), timeout=20_000)
    assert not task.done(), task.result()
    yield app
    for window in QApplication.topLevelWidgets():
        if isinstance(window, ShareLinkWindow):
            window.close()
    app.quit()
    qtbot.waitUntil(task.done, timeout=15_000)
    assert task.result() == 0


@pytest.fixture
def page(qtbot: Any, shared_server: Server, tmp_path: Path) -> Iterator[Page]:
    running = Page(shared_server, tmp_path / "page")
    yield running
    if running.task is not None:
        running.task.cancel()
        qtbot.waitUntil(running.task.done, timeout=10_000)
    run(qtbot, running.aclose())


async def _start(page: Page) -> None:
    page.receiver()
    page.task = asyncio.ensure_future(page.run())
    await page.link.wait_connected(10)


def open_window(gui: GuiApp) -> ShareLinkWindow:
    gui.tray.share_link_action.trigger()
    [window] = [w for w in QApplication.topLevelWidgets() if isinstance(w, ShareLinkWindow)]
    assert window.isVisible()
    return window


def test_a_share_link_is_shown_copied_withdrawn_and_then_claimed_by_a_page(
    qtbot: Any, gui: GuiApp, page: Page, shared_server: Server, tmp_path: Path
) -> None:
    source = tmp_path / "for-you.bin"
    source.write_bytes(payload := os.urandom(400_000))

    # The first link: shown with its expiry, copied, then withdrawn.
    first = open_window(gui)
    first.choose_path = lambda folder: "" if folder else str(source)
    qtbot.mouseClick(first.folder_button, Qt.MouseButton.LeftButton)  # the picker cancelled
    assert first.row is None
    qtbot.mouseClick(first.file_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: first.url_field.text().startswith(shared_server.url + "/s/"))
    url = first.url_field.text()
    assert "#" in url and first.url_field.isReadOnly()
    assert first.expiry_label.text().startswith("Expires at") and first.expiry_label.isVisible()
    assert first.status_label.text() == "Waiting for someone to open it."
    assert first.item_label.text() == "File: for-you.bin (400.0 kB)"
    row = first.row
    assert row is not None and row.peer_name == LINK_RECIPIENT
    assert gui.bridge.transfers.rows() == [row]  # in the transfer list like any send
    qtbot.mouseClick(first.copy_button, Qt.MouseButton.LeftButton)
    clipboard = QGuiApplication.clipboard()
    assert clipboard is not None and clipboard.text() == url
    qtbot.mouseClick(first.cancel_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: row.state is State.CANCELLED)
    assert first.status_label.text() == "Cancelled: the link is withdrawn."
    assert not first.cancel_button.isEnabled() and not first.expiry_label.isVisible()
    agent = gui.bridge.agent
    assert agent is not None and not agent.transfers.active
    # A link is for one person: Resume does not hand the same file out again.
    with qtbot.waitSignal(gui.bridge.error) as said:
        gui.bridge.resume(row)
    assert said.args == ["A share link is for one person: share the file again for a new link."]
    first.close()

    # From the main window: a new link, opened by a page, which receives the file.
    second = gui.window.share_by_link()
    second.share(str(source))
    qtbot.waitUntil(lambda: second.url_field.text().startswith(shared_server.url + "/s/"))
    assert second.url_field.text() != url
    claimed = run(qtbot, page.claim(second.url_field.text()))
    assert (claimed.name, claimed.size) == ("for-you.bin", len(payload))
    run(qtbot, _start(page))
    sent = second.row
    assert sent is not None
    qtbot.waitUntil(lambda: sent.state is State.DONE, timeout=60_000)
    assert (page.downloads / "for-you.bin").read_bytes() == payload
    assert sent.peer_id == page.id and sent.fraction == 1.0
    assert len(gui.bridge.transfers.rows()) == 2  # the bus's events followed the same row
    assert second.status_label.text() == "Sent. The link is spent: nobody else can open it."


def test_a_browser_is_marked_in_the_device_list_and_receives_from_the_app(
    qtbot: Any, gui: GuiApp, page: Page, shared_server: Server, tmp_path: Path
) -> None:
    run(qtbot, page.enrol(shared_server.join_code("ann"), "Chromium on desk"))
    run(qtbot, _start(page))
    gui.bridge.refresh_devices()

    def browser() -> DeviceEntry | None:
        return next((d for d in gui.bridge.online_devices() if d.id == page.id), None)

    qtbot.waitUntil(lambda: browser() is not None, timeout=15_000)
    model = gui.bridge.devices
    [position] = [n for n, d in enumerate(model.devices()) if d.id == page.id]
    assert model.data(model.index(position)) == "Chromium on desk (browser)"
    labels = [a.text() for a in gui.tray.devices_menu.actions()]
    assert "Chromium on desk (browser) — online" in labels

    source = tmp_path / "notes.txt"
    source.write_text("for the page\n")
    row = gui.bridge.send([str(source)], page.id)
    qtbot.waitUntil(lambda: row.state is State.DONE, timeout=60_000)
    assert (page.downloads / "notes.txt").read_text() == "for the page\n"


def test_without_a_running_agent_the_window_says_why_and_shows_only_its_own_link(
    qtbot: Any, qloop: asyncio.AbstractEventLoop, gui_home: Context, tmp_path: Path
) -> None:
    source = tmp_path / "<img src=x>.txt"  # a name is text, never markup
    source.write_text("a")
    bridge = AgentBridge(gui_home)
    window = ShareLinkWindow(bridge)
    qtbot.addWidget(window)
    row = window.share(str(source))
    assert window.item_label.textFormat() is Qt.TextFormat.PlainText
    assert window.item_label.text() == "File: <img src=x>.txt (1 B)"
    # Another window's link (a second share running at once) is not this one's.
    other = bridge.transfers.add_send([str(source)], "", LINK_RECIPIENT)
    bridge.link_shared.emit(other, "http://elsewhere/s/x#y", 1.0)
    assert window.url_field.text() == "" and not window.copy_button.isEnabled()
    qtbot.waitUntil(lambda: row.state is State.FAILED)
    assert window.status_label.text() == "Failed: the agent is not running"
    assert not window.cancel_button.isEnabled()
    assert expiry_text(1000.0 + 900, 1000.0).endswith("(in 15 min)")
    assert expiry_text(1000.0 + 20, 1000.0).endswith("(in 20 s)")


def test_a_file_gone_since_it_was_picked_is_no_traceback(
    qtbot: Any, qloop: asyncio.AbstractEventLoop, gui_home: Context, tmp_path: Path
) -> None:
    window = ShareLinkWindow(AgentBridge(gui_home))
    qtbot.addWidget(window)
    row = window.share(str(tmp_path / "deleted meanwhile.txt"))
    assert window.item_label.text() == "File: deleted meanwhile.txt"
    qtbot.waitUntil(lambda: row.state is State.FAILED)
    assert window.status_label.text().startswith("Failed: ")
