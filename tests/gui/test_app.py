"""The app against a real core: first run into a local mesh, a real transfer by drag and drop,
the tray menu, autostart, single instance, error reporting."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import QMimeData, QPoint, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDragMoveEvent, QDropEvent
from PySide6.QtWidgets import QApplication, QMessageBox

from meshagent_gui.compose.local_mesh import lan_address
from meshagent_gui.context import Context
from meshagent_gui.core.events import TransferCompleted
from meshagent_gui.core.mesh.enroll import load_enrollment
from meshagent_gui.core.notify.router import NotificationRouter
from meshagent_gui.errors import UserError
from meshagent_gui.ui.app import ErrorReporter, GuiApp, _bring_forward_running, run_gui
from meshagent_gui.ui.first_run import Choice, FirstRunDialog
from meshagent_gui.ui.resources import TrayState
from meshagent_gui.ui.transfers import State
from tests.integration.harness import BASE_ENV, AgentHome, Server, meshagent_cmd, wait_until
from tests.integration.harness import run as run_cli

from .support import run


def start(gui: GuiApp) -> asyncio.Task[int]:
    return asyncio.ensure_future(gui.run())


def stop(qtbot: Any, gui: GuiApp, task: asyncio.Task[int]) -> None:
    gui.quit()
    qtbot.waitUntil(task.done, timeout=15_000)
    assert task.result() == 0


def first_run_dialog() -> FirstRunDialog | None:
    for widget in QApplication.topLevelWidgets():
        if isinstance(widget, FirstRunDialog) and widget.isVisible():
            return widget
    return None


def test_first_run_starts_a_local_mesh_and_shows_a_join_code(
    qtbot: Any, qloop: asyncio.AbstractEventLoop, gui_home: Context
) -> None:
    gui = GuiApp(gui_home, use_tray=False)
    task = start(gui)
    qtbot.waitUntil(lambda: first_run_dialog() is not None, timeout=5000)
    # A second launch meanwhile finds this one and brings it forward.
    assert run(qtbot, _bring_forward_running(Context.open(gui_home.paths.home)))
    dialog = first_run_dialog()
    assert dialog is not None
    dialog.on_network.setChecked(True)  # other computers on this network may join
    qtbot.mouseClick(dialog.local_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(gui.agent_ready.is_set, timeout=20_000)
    window = gui.window
    qtbot.waitUntil(window.card.isVisible, timeout=5000)
    code = window.join_code_label.text()
    assert len(code) >= 8 and gui.bridge.join_code is not None
    assert gui.bridge.join_code.url.startswith(f"http://{lan_address()}:")
    assert gui_home.paths.home is not None
    assert load_enrollment(Context.open(gui_home.paths.home)) is not None  # enrolled as the owner
    qtbot.waitUntil(lambda: window.pill.text() == "Online", timeout=10_000)
    assert gui.bridge.tray_state is TrayState.ONLINE
    # No tray here: the window stands in, and says so once.
    assert window.isVisible() and "no system tray" in window.banner.text()
    stop(qtbot, gui, task)
    assert not gui.ctx.paths.ipc_path.exists()  # the agent shut down cleanly


def drop(widget: Any, paths: list[Path], at: QPoint) -> None:
    """What a file manager's drag does: enter, move, drop (Qt delivers no drop without them)."""
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    args = (
        Qt.DropAction.CopyAction,
        mime,
        Qt.MouseButton.LeftButton,
        Qt.KeyboardModifier.NoModifier,
    )
    assert QApplication.sendEvent(widget, QDragEnterEvent(at, *args))
    assert QApplication.sendEvent(widget, QDragMoveEvent(at, *args))
    assert QApplication.sendEvent(widget, QDropEvent(QPointF(at), *args))


def test_dropping_files_on_the_window_sends_them_for_real(
    qtbot: Any,
    qloop: asyncio.AbstractEventLoop,
    gui_home: Context,
    mesh: tuple[Server, AgentHome],
    tmp_path: Path,
) -> None:
    _, receiver = mesh
    source = tmp_path / "outbox"
    source.mkdir()
    payload = source / "video.bin"
    payload.write_bytes(os.urandom(24 * 1024 * 1024))
    (source / "notes").mkdir()
    (source / "notes" / "a.txt").write_text("hello")
    ctx = Context.open(gui_home.paths.home)
    ctx.config.set("transfer.rate_limit", "12M")  # ~2 s: the row is seen mid-way, every time
    gui = GuiApp(ctx, use_tray=False)
    task = start(gui)
    qtbot.waitUntil(lambda: gui.agent_ready.is_set() or task.done(), timeout=20_000)
    assert not task.done(), task.result()
    window = gui.window
    qtbot.waitUntil(lambda: bool(gui.bridge.online_devices()), timeout=10_000)
    assert [d.name for d in gui.bridge.online_devices()] == ["laptop"]

    seen: set[State] = set()
    fractions: list[float] = []

    def watch(*_: Any) -> None:
        for row in gui.bridge.transfers.rows():
            seen.add(row.state)
            fractions.append(row.fraction)

    gui.bridge.transfers.dataChanged.connect(watch)
    # Drop on the window (not on a device): the only online device is the target.
    drop(window, [payload, source / "notes"], QPoint(20, 20))
    qtbot.waitUntil(lambda: gui.bridge.transfers.rowCount() == 1, timeout=5000)
    row = gui.bridge.transfers.row_at(0)
    qtbot.waitUntil(lambda: row.state is State.DONE, timeout=30_000)
    assert row.peer_name == "laptop" and row.transfer_id is not None
    assert row.total == payload.stat().st_size + 5 and row.fraction == 1.0
    assert State.RUNNING in seen and any(0 < f < 1 for f in fractions)
    assert window.table.model().data(window.table.model().index(0, 6)) == "Done"
    received = receiver.home / "downloads"
    assert (received / "video.bin").read_bytes() == payload.read_bytes()
    assert (received / "notes" / "a.txt").read_text() == "hello"

    # Dropping onto the device row sends to that device too.
    second = tmp_path / "second.txt"
    second.write_text("again")
    rect = window.device_list.visualRect(gui.bridge.devices.index(0))
    drop(window.device_list.viewport(), [second], rect.center())
    qtbot.waitUntil(lambda: gui.bridge.transfers.rowCount() == 2, timeout=5000)
    qtbot.waitUntil(lambda: gui.bridge.transfers.row_at(1).state is State.DONE, timeout=20_000)
    wait_until((received / "second.txt").exists, 5, "second file")
    stop(qtbot, gui, task)


def test_tray_menu_actions(
    qtbot: Any,
    qloop: asyncio.AbstractEventLoop,
    gui_home: Context,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    shared: list[str] = []

    async def share_terminal() -> None:
        shared.append("shared")

    gui = GuiApp(gui_home, use_tray=False, share_terminal=share_terminal)
    tray = gui.tray
    sent: list[tuple[list[str], str]] = []
    monkeypatch.setattr(gui.bridge, "send", lambda paths, device: sent.append((paths, device)))
    from meshagent_gui.ui.devices import DeviceEntry

    laptop = DeviceEntry("id-laptop", "laptop", "ann", "linux", True, "direct")
    gui.bridge.devices.set_devices(
        [laptop, DeviceEntry("id-old", "old", "ann", "linux", False, "")]
    )
    labels = [a.text() for a in tray.devices_menu.actions()]
    assert labels == ["laptop — online (direct)", "old — offline"]
    assert not tray.devices_menu.actions()[1].isEnabled()

    tray.choose_paths = lambda folder: [str(tmp_path / ("dir" if folder else "file.txt"))]
    tray.send_file_action.trigger()  # the only online device needs no question
    tray.send_folder_action.trigger()
    tray.devices_menu.actions()[0].trigger()
    assert sent == [
        ([str(tmp_path / "file.txt")], "id-laptop"),
        ([str(tmp_path / "dir")], "id-laptop"),
        ([str(tmp_path / "file.txt")], "id-laptop"),
    ]

    tray.share_terminal_action.trigger()
    qtbot.waitUntil(lambda: shared == ["shared"], timeout=2000)

    tray.open_action.trigger()
    assert gui.window.isVisible()

    entry = tmp_path / "xdg" / "autostart"
    assert tray.autostart_action.isEnabled() and not tray.autostart_action.isChecked()
    tray.autostart_action.trigger()
    files = list(entry.glob("meshagent*.desktop"))
    assert len(files) == 1 and "--home" in files[0].read_text()
    assert tray.autostart_action.isChecked()
    tray.autostart_action.trigger()
    assert list(entry.glob("meshagent*.desktop")) == []
    assert not tray.autostart_action.isChecked()

    tray.set_state(TrayState.TRANSFERRING)
    assert tray.icon.toolTip() == "Mesh Agent: transferring" and not tray.icon.icon().isNull()

    quit_seen: list[bool] = []
    gui._quit = asyncio.Event()
    tray.quit_action.trigger()
    quit_seen.append(gui._quit.is_set())
    assert quit_seen == [True]
    gui.window.close()


def test_toasts_follow_the_notification_router(
    qtbot: Any, qloop: asyncio.AbstractEventLoop, gui_home: Context
) -> None:
    gui = GuiApp(gui_home, use_tray=False)
    gui_home.config.set("notify.transfer_failed", -1)
    router = NotificationRouter(gui_home.config, [gui.toasts])
    run(qtbot, router.handle(TransferCompleted("t", "a.txt", "laptop", 2000, 1.0)))
    assert [n.title for n in gui.toasts.shown] == ["Transfer complete"]
    from meshagent_gui.core.events import TransferFailed

    run(qtbot, router.handle(TransferFailed("t", "a.txt", "laptop", "disk full")))
    assert len(gui.toasts.shown) == 1  # switched off for Gotify, so for toasts too
    gui.window.close()


def test_errors_are_reported_but_cancellation_is_not(
    qtbot: Any, qloop: asyncio.AbstractEventLoop
) -> None:
    reporter = ErrorReporter()
    reporter.loop_handler(qloop, {"message": "x", "exception": asyncio.CancelledError()})
    reporter.excepthook(asyncio.CancelledError, asyncio.CancelledError(), None)
    assert reporter.reported == [] and reporter.dialogs == []
    try:
        raise ValueError("boom")
    except ValueError as exc:
        reporter.loop_handler(qloop, {"message": "task failed", "exception": exc})
    assert len(reporter.reported) == 1
    box = reporter.dialogs[0]
    assert isinstance(box, QMessageBox) and box.isVisible()
    assert "ValueError: boom" in box.informativeText()
    box.close()
    qtbot.waitUntil(lambda: reporter.dialogs == [], timeout=2000)


def test_the_icons_are_found() -> None:
    from meshagent_gui.ui.resources import app_icon, icons_dir, tray_icon

    assert (icons_dir() / "meshagent.svg").is_file()
    assert not app_icon().isNull()
    for state in TrayState:
        assert not tray_icon(state).isNull()


def test_quit_while_the_first_run_dialog_is_open_closes_it(
    qtbot: Any, qloop: asyncio.AbstractEventLoop, gui_home: Context
) -> None:
    gui = GuiApp(Context.open(gui_home.paths.home), use_tray=False)
    task = start(gui)
    qtbot.waitUntil(lambda: first_run_dialog() is not None, timeout=5000)
    gui.quit()  # what SIGTERM and the tray's Quit do
    qtbot.waitUntil(task.done, timeout=10_000)
    assert task.result() == 0
    assert first_run_dialog() is None
    # Its mDNS browse ended with it, not left to be torn down after the loop stopped.
    assert not [t for t in asyncio.all_tasks(qloop) if t.get_name() == "ui-first-run-browse"]
    assert not gui_home.paths.ipc_path.exists()


def test_quitting_mid_transfer_leaves_it_resumable(
    qtbot: Any,
    qloop: asyncio.AbstractEventLoop,
    gui_home: Context,
    mesh: tuple[Server, AgentHome],
    tmp_path: Path,
) -> None:
    _, receiver = mesh
    payload = tmp_path / "big.bin"
    payload.write_bytes(os.urandom(16 * 1024 * 1024))
    ctx = Context.open(gui_home.paths.home)
    ctx.config.set("transfer.rate_limit", "2M")  # 8 s: quit lands in the middle
    gui = GuiApp(ctx, use_tray=False)
    task = start(gui)
    qtbot.waitUntil(lambda: gui.agent_ready.is_set() or task.done(), timeout=20_000)
    qtbot.waitUntil(lambda: bool(gui.bridge.online_devices()), timeout=10_000)
    row = gui.bridge.send([str(payload)], gui.bridge.online_devices()[0].id)
    qtbot.waitUntil(lambda: 0.1 < row.fraction < 0.6, timeout=20_000)
    stop(qtbot, gui, task)  # Quit: the agent's tasks are cancelled, nothing hangs
    downloads = receiver.home / "downloads"
    # What the receiver verified stays, and the same send later resumes from it.
    wait_until(lambda: list(downloads.glob("big.bin*.meshpart")), 10, "the partial file")
    assert not (downloads / "big.bin").exists()
    desk = AgentHome(gui_home.paths.home, receiver.logs, "desk")
    desk.ok("config", "unset", "transfer.rate_limit")
    [item] = [
        json.loads(line)
        for line in desk.ok("send", str(payload), "--to", "laptop", "--json").splitlines()
    ]
    assert item["resumed_from"] > 0
    assert (downloads / "big.bin").read_bytes() == payload.read_bytes()


def test_first_run_connects_to_a_server_and_says_why_when_it_cannot(  # type: ignore[no-untyped-def]
    qtbot: Any, qloop: asyncio.AbstractEventLoop, gui_home: Context, server
) -> None:
    """The other first-run choice, against the real reference server: a wrong join code is
    one line in the dialog, which stays open; the right one enrols this device."""
    server.add_user("ann")
    dialog = FirstRunDialog(gui_home)
    qtbot.addWidget(dialog)
    dialog.url.setText(server.url)
    dialog.join_code.setText("AAAA-BBBB-CCCC-DDDD")
    assert not run(qtbot, dialog.connect_to_server())
    assert dialog.error.isVisibleTo(dialog) and dialog.error.text()
    assert "Traceback" not in dialog.error.text()
    assert dialog.choice is not Choice.CONNECTED
    assert load_enrollment(Context.open(gui_home.paths.home)) is None
    dialog.join_code.setText(server.join_code("ann"))
    assert run(qtbot, dialog.connect_to_server())
    assert dialog.choice is Choice.CONNECTED
    enrolled = load_enrollment(Context.open(gui_home.paths.home))
    assert enrolled is not None and enrolled.user == "ann"


def test_cancel_and_resume_buttons_stop_a_send_keeping_the_partial_then_finish_it(
    qtbot: Any,
    qloop: asyncio.AbstractEventLoop,
    gui_home: Context,
    mesh: tuple[Server, AgentHome],
    tmp_path: Path,
) -> None:
    _, receiver = mesh
    payload = tmp_path / "big.bin"
    payload.write_bytes(os.urandom(16 * 1024 * 1024))
    ctx = Context.open(gui_home.paths.home)
    ctx.config.set("transfer.rate_limit", "2M")  # 8 s: the click lands in the middle
    gui = GuiApp(ctx, use_tray=False)
    task = start(gui)
    qtbot.waitUntil(lambda: gui.agent_ready.is_set() or task.done(), timeout=20_000)
    assert not task.done(), task.result()
    qtbot.waitUntil(lambda: bool(gui.bridge.online_devices()), timeout=10_000)
    window = gui.window
    row = gui.bridge.send([str(payload)], gui.bridge.online_devices()[0].id)
    qtbot.waitUntil(lambda: 0.1 < row.fraction < 0.6, timeout=20_000)
    window.table.selectRow(0)
    assert window.cancel_button.isEnabled() and not window.resume_button.isEnabled()
    qtbot.mouseClick(window.cancel_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: row.state is State.CANCELLED, timeout=10_000)
    downloads = receiver.home / "downloads"
    wait_until(lambda: list(downloads.glob("big.bin*.meshpart")), 10, "the partial file")
    assert not (downloads / "big.bin").exists()

    ctx.config.set("transfer.rate_limit", "")  # read at each send: the rest at full speed
    qtbot.waitUntil(window.resume_button.isEnabled, timeout=5000)
    qtbot.mouseClick(window.resume_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: row.state is State.DONE, timeout=30_000)
    assert gui.bridge.transfers.rowCount() == 1  # the same row, resumed
    assert (downloads / "big.bin").read_bytes() == payload.read_bytes()
    assert not list(downloads.glob("*.meshpart"))
    stop(qtbot, gui, task)


def test_without_a_tray_the_app_stays_through_first_run(gui_home: Context, tmp_path: Path) -> None:
    """A desktop with no tray (stock GNOME, bare Xvfb): "Start a local mesh" closes the dialog,
    the last window until the main one shows; the app must not take that for quitting."""
    assert gui_home.paths.home is not None
    log = tmp_path / "app.log"
    with open(log, "wb") as output:
        app = subprocess.Popen(
            [sys.executable, "-m", "tests.gui.first_run_driver", str(gui_home.paths.home)],
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**BASE_ENV, "QT_QPA_PLATFORM": "offscreen"},
            cwd=Path(__file__).parents[2],
        )
    try:
        wait_until(
            lambda: app.poll() is not None or load_enrollment(Context.open(gui_home.paths.home)),
            30,
            "the local mesh to enrol this device",
        )
        assert app.poll() is None, f"the app quit during first run: {log.read_text()}"
        # The running app answers other commands: it is the agent of this home.
        done = run_cli("--home", str(gui_home.paths.home), "devices", timeout=30)
        assert done.returncode == 0, done.stderr
        assert "no other devices" in done.stdout
        assert app.poll() is None
    finally:
        app.terminate()
        app.wait(15)
    assert app.returncode == 0, log.read_text()


def test_without_a_tray_every_tray_action_is_in_the_window(
    qtbot: Any,
    qloop: asyncio.AbstractEventLoop,
    gui_home: Context,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("meshagent_gui.ui.app.tray_available", lambda: False)
    shared: list[str] = []

    async def share_terminal() -> None:
        shared.append("shared")

    gui = GuiApp(gui_home, share_terminal=share_terminal)
    assert not gui.has_tray
    window = gui.window
    # The tray menu's actions and where the window has each.
    in_window = {
        gui.tray.send_file_action: window.send_button,
        gui.tray.send_folder_action: window.send_folder_button,
        gui.tray.share_link_action: window.share_link_button,
        gui.tray.share_terminal_action: window.share_terminal_button,
        gui.tray.open_action: window,  # it is the window
        gui.tray.autostart_action: window.settings_button,  # Settings: "Start … when I log in"
        gui.tray.quit_action: window,  # closing it quits
    }
    extra = getattr(gui.tray, "rooms_action", None)
    if extra is not None:
        in_window[extra] = window.rooms_button  # type: ignore[attr-defined]
    # Folder sync: "Synced folders" in the window, with its "Add folder…".
    in_window[gui.tray.sync_folder_action] = window.sync_button
    in_window[gui.tray.synced_folders_action] = window.sync_button
    menu = [a for a in gui.tray.menu.actions() if not a.isSeparator() and a.menu() is None]
    assert set(menu) == set(in_window)
    window.bring_to_front()
    qtbot.mouseClick(window.share_terminal_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: shared == ["shared"], timeout=2000)
    # Closing the window quits the app (and nothing else does: see the test above).
    gui._quit = asyncio.Event()
    window.close()
    assert gui._quit.is_set()


def test_toasts_name_the_sending_device(
    qtbot: Any,
    qloop: asyncio.AbstractEventLoop,
    gui_home: Context,
    mesh: tuple[Server, AgentHome],
    tmp_path: Path,
) -> None:
    """A real file from laptop: the toast says "laptop", not its 64-hex device id."""
    _, laptop = mesh
    gui = GuiApp(Context.open(gui_home.paths.home), use_tray=False)
    task = start(gui)
    qtbot.waitUntil(lambda: gui.agent_ready.is_set() or task.done(), timeout=20_000)
    assert not task.done(), task.result()
    qtbot.waitUntil(lambda: bool(gui.bridge.online_devices()), timeout=10_000)
    note = tmp_path / "note.txt"
    note.write_text("hello desk")
    sending = subprocess.Popen(
        meshagent_cmd("--home", str(laptop.home), "send", str(note), "--to", "desk"),
        env={**BASE_ENV, **laptop.env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    qtbot.waitUntil(lambda: sending.poll() is not None, timeout=30_000)  # the loop keeps spinning
    assert sending.returncode == 0, sending.stderr.read() if sending.stderr else ""
    if sending.stderr:
        sending.stderr.close()
    qtbot.waitUntil(lambda: bool(gui.toasts.shown), timeout=10_000)
    toast = gui.toasts.shown[-1]
    assert toast.title == "Transfer complete"
    assert toast.message.startswith("note.txt with laptop: "), toast.message
    # No tray here: the window's status line shows it.
    assert gui.window.statusBar().currentMessage().startswith("Transfer complete: note.txt")
    stop(qtbot, gui, task)


def test_the_app_says_so_when_its_config_has_a_bad_value(
    gui_home: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hand-edited value the rules refuse: a dialog for the desktop user (and the CLI's one
    line on stderr), instead of an agent quietly running with it."""
    gui_home.config.set("transfer.auto_accept", "maybe")
    gui_home.config.save()
    shown: list[str] = []
    monkeypatch.setattr(QMessageBox, "critical", lambda _parent, _title, text: shown.append(text))
    with pytest.raises(UserError) as raised:
        run_gui(str(gui_home.paths.home))
    assert "transfer.auto_accept takes own, all or none, not 'maybe'" in raised.value.message
    assert shown == [raised.value.message]
