"""An offer from another user's device asks first; "always accept from this device" is kept and
later offers from it land without asking."""

from __future__ import annotations

import asyncio
from html import escape
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel

from meshagent_gui.context import Context
from meshagent_gui.core.events import TransferOffered
from meshagent_gui.ui.app import GuiApp
from meshagent_gui.ui.devices import DeviceEntry
from meshagent_gui.ui.main_window import DropZone, OfferDialog
from tests.integration.harness import AgentHome, free_port

from .support import offer_dialog, send_from


def test_another_users_offer_asks_and_always_accept_sticks(
    qtbot: Any,
    qloop: asyncio.AbstractEventLoop,
    gui_home: Context,
    bob_and_desk: AgentHome,
    tmp_path: Path,
) -> None:
    bob = bob_and_desk
    ctx = Context.open(gui_home.paths.home)
    ctx.config.set("local.port", free_port())
    downloads = tmp_path / "desk-downloads"
    ctx.config.set("downloads.dir", str(downloads))
    gui = GuiApp(ctx, use_tray=False)
    task = asyncio.ensure_future(gui.run())
    qtbot.waitUntil(lambda: gui.agent_ready.is_set() or task.done(), timeout=20_000)
    assert not task.done(), task.result()
    qtbot.waitUntil(lambda: bool(gui.bridge.online_devices()), timeout=10_000)

    first = tmp_path / "first.txt"
    first.write_text("one")
    sending = send_from(bob, first)
    qtbot.waitUntil(lambda: offer_dialog() is not None, timeout=20_000)
    dialog = offer_dialog()
    assert dialog is not None and dialog.offer.peer_name == "bobs-laptop"
    dialog.always.setChecked(True)
    qtbot.mouseClick(dialog.accept_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: sending.poll() is not None, timeout=30_000)
    _, errors = sending.communicate()
    assert sending.returncode == 0, errors
    assert (downloads / "first.txt").read_text() == "one"
    [bob_id] = [d.id for d in gui.bridge.online_devices() if d.name == "bobs-laptop"]
    assert bob_id in str(Context.open(gui_home.paths.home).config["transfer.always_accept"])

    second = tmp_path / "second.txt"
    second.write_text("two")
    sending = send_from(bob, second)
    qtbot.waitUntil(lambda: sending.poll() is not None, timeout=30_000)
    _, errors = sending.communicate()
    assert sending.returncode == 0, errors
    assert offer_dialog() is None  # accepted without asking
    assert (downloads / "second.txt").read_text() == "two"

    gui.quit()
    qtbot.waitUntil(task.done, timeout=15_000)


def test_names_from_peers_are_shown_as_text_not_markup(qtbot: Any) -> None:
    """A device or its user names itself; the drop zone and the offer dialog show the name as
    written, never as markup."""
    evil = "<img src=x><b>x</b>"
    zone = DropZone()
    qtbot.addWidget(zone)
    zone.set_target(DeviceEntry("id", evil, "bob", "linux", True, "direct"))
    assert escape(evil) in zone.text() and "<img" not in zone.text()
    offer = TransferOffered("t", "peer", evil, ("a.txt",), 1, 5, False)
    dialog = OfferDialog(offer)
    qtbot.addWidget(dialog)
    shown = "".join(label.text() for label in dialog.findChildren(QLabel))
    assert escape(evil) in shown and "<img" not in shown
