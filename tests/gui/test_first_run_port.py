"""Issue 17 item 13: the local mesh's port is taken at first run (another program, another
mesh). The dialog offers a free port, in the dialog; the app starts on it and stays."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from PySide6.QtCore import Qt

from meshagent_gui.context import Context
from meshagent_gui.ui.app import GuiApp
from meshagent_gui.ui.first_run import FirstRunDialog

from .test_app import first_run_dialog, start, stop


@pytest.fixture
def taken_port(gui_home: Context) -> Iterator[int]:
    """Another program listens on the local mesh's port."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", int(gui_home.config["local.port"])))
        squatter.listen()
        yield squatter.getsockname()[1]


def test_a_taken_port_is_replaced_by_a_free_one_in_the_dialog(
    qtbot: Any, gui_home: Context, taken_port: int
) -> None:
    dialog = FirstRunDialog(gui_home)
    qtbot.addWidget(dialog)
    dialog.show()
    qtbot.mouseClick(dialog.local_button, Qt.MouseButton.LeftButton)
    assert dialog.isVisible() and dialog.choice is None  # no quitting, no CLI command
    note = dialog.port_note.text()
    assert dialog.port_note.isVisible() and f"Port {taken_port} is in use" in note
    assert "meshagent config" not in note
    offered = dialog.port.value()
    assert dialog.port_row.isVisible() and offered != taken_port
    assert dialog.local_button.text() == f"Start on port {offered}"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", offered))  # free indeed
    qtbot.mouseClick(dialog.local_button, Qt.MouseButton.LeftButton)
    assert dialog.choice is not None and not dialog.isVisible()
    assert gui_home.paths.home is not None
    assert Context.open(gui_home.paths.home).config["local.port"] == offered  # saved


def test_the_app_starts_its_local_mesh_on_the_offered_port(
    qtbot: Any, qloop: asyncio.AbstractEventLoop, gui_home: Context, taken_port: int
) -> None:
    gui = GuiApp(gui_home, use_tray=False)
    task = start(gui)
    qtbot.waitUntil(lambda: first_run_dialog() is not None, timeout=5000)
    dialog = first_run_dialog()
    assert dialog is not None
    qtbot.mouseClick(dialog.local_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(dialog.port_row.isVisible, timeout=2000)
    offered = dialog.port.value()
    qtbot.mouseClick(dialog.local_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(gui.agent_ready.is_set, timeout=20_000)
    assert not task.done()  # the app stays
    assert gui.ctx.config["server.url"].endswith(f":{offered}")
    stop(qtbot, gui, task)
