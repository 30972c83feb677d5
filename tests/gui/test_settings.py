"""The settings dialog writes the same config as `meshagent config`, the token to the secret
store (never the file), start at login to the XDG entry; a bad value changes nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import Qt

from meshagent_gui.config import KEYS, parse_value
from meshagent_gui.context import Context
from meshagent_gui.errors import UserError
from meshagent_gui.ui.app import GuiApp
from meshagent_gui.ui.settings import SettingsDialog
from tests.integration.harness import Server


@pytest.fixture
def ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Context:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return Context.open(tmp_path / "home")


def test_save_writes_config_secret_and_autostart(qtbot: Any, ctx: Context, tmp_path: Path) -> None:
    dialog = SettingsDialog(ctx)
    qtbot.addWidget(dialog)
    dialog.device_name.setText("studio")
    dialog.downloads.setText(str(tmp_path / "in"))
    dialog.rate.setText("20M")
    dialog.gotify_url.setText("https://gotify.example.org")
    dialog.gotify_token.setText("A1b2C3d4-token")
    dialog.priorities["notify.peer_offline"].setValue(-1)  # off
    dialog.priorities["notify.transfer_failed"].setValue(8)
    dialog.autostart.setChecked(True)
    dialog.save()
    assert dialog.result() == SettingsDialog.DialogCode.Accepted

    saved = Context.open(tmp_path / "home")  # what a new process (the CLI) reads
    assert saved.config["device.name"] == "studio"
    assert saved.config["downloads.dir"] == str(tmp_path / "in")
    assert saved.config["transfer.rate_limit"] == "20M"
    assert saved.config["gotify.url"] == "https://gotify.example.org"
    assert saved.config["notify.peer_offline"] == -1
    assert saved.config["notify.transfer_failed"] == 8
    assert saved.secrets.get("gotify.token") == "A1b2C3d4-token"
    assert "A1b2C3d4-token" not in saved.paths.config_file.read_text()
    entries = list((tmp_path / "xdg" / "autostart").glob("meshagent*.desktop"))
    assert len(entries) == 1 and "gui" in entries[0].read_text()

    again = SettingsDialog(saved)  # reopened: shows what is stored, token masked
    qtbot.addWidget(again)
    assert again.autostart.isChecked() and again.gotify_token.text() == ""
    again.autostart.setChecked(False)
    again.save()
    assert not list((tmp_path / "xdg" / "autostart").glob("meshagent*.desktop"))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("rate", "fast", "rate"), ("gotify_url", "gotify.example.org", "http")],
)
def test_a_bad_value_is_one_message_and_changes_nothing(
    qtbot: Any, ctx: Context, field: str, value: str, message: str
) -> None:
    dialog = SettingsDialog(ctx)
    qtbot.addWidget(dialog)
    dialog.device_name.setText("renamed")
    getattr(dialog, field).setText(value)
    dialog.save()
    assert dialog.result() != SettingsDialog.DialogCode.Accepted
    assert not dialog.error.isHidden() and message in dialog.error.text().lower()
    assert Context.open(ctx.paths.home).config["device.name"] != "renamed"


@pytest.mark.parametrize(
    ("field", "key", "value"),
    [
        ("rate", "transfer.rate_limit", "5X"),
        ("gotify_url", "gotify.url", "not-a-url"),
        ("gotify_url", "gotify.url", "https://"),
    ],
)
def test_the_dialog_and_config_set_follow_one_rule(
    qtbot: Any, ctx: Context, field: str, key: str, value: str
) -> None:
    """The same value is refused with the same words by `meshagent config set` (config.KEYS)."""
    with pytest.raises(UserError) as cli:
        parse_value(KEYS[key], value)
    dialog = SettingsDialog(ctx)
    qtbot.addWidget(dialog)
    getattr(dialog, field).setText(value)
    dialog.save()
    assert dialog.error.text() == cli.value.message


def test_auto_accept_is_a_setting_with_the_configs_choices(qtbot: Any, ctx: Context) -> None:
    dialog = SettingsDialog(ctx)
    qtbot.addWidget(dialog)
    choices = [dialog.auto_accept.itemData(i) for i in range(dialog.auto_accept.count())]
    assert choices == list(KEYS["transfer.auto_accept"].choices)
    assert dialog.auto_accept.currentData() == "own"  # the default
    dialog.auto_accept.setCurrentIndex(choices.index("none"))
    dialog.save()
    assert Context.open(ctx.paths.home).config["transfer.auto_accept"] == "none"


def test_the_server_is_changed_by_enrolling_not_by_editing(  # type: ignore[no-untyped-def]
    qtbot: Any, qloop: asyncio.AbstractEventLoop, gui_home: Context, mesh, tmp_path: Path
) -> None:
    """The URL field cannot take an edit it would drop; "Connect to another server…" enrols
    this device there and the running app moves to it."""
    first, _ = mesh
    other = Server(tmp_path / "other-server", tmp_path / "logs").start()
    try:
        other.add_user("ann")
        gui = GuiApp(Context.open(gui_home.paths.home), use_tray=False)
        task = asyncio.ensure_future(gui.run())
        qtbot.waitUntil(lambda: gui.agent_ready.is_set() or task.done(), timeout=20_000)
        assert not task.done(), task.result()
        gui.open_settings()
        settings = gui._settings
        assert settings is not None and settings.server.text() == first.url
        assert settings.server.isReadOnly()
        qtbot.keyClicks(settings.server, "http://typed.example")
        assert settings.server.text() == first.url  # nothing typed, so nothing dropped

        qtbot.mouseClick(settings.connect_button, Qt.MouseButton.LeftButton)
        dialog = gui._connecting
        assert dialog is not None and dialog.isVisible()
        assert not dialog.local_button.isVisibleTo(dialog)  # connecting only, no local mesh
        dialog.url.setText(other.url)
        dialog.join_code.setText(other.join_code("ann"))
        qtbot.mouseClick(dialog.connect_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(
            lambda: gui.bridge.agent is not None and gui.bridge.agent.client.url == other.url,
            timeout=20_000,
        )
        qtbot.waitUntil(lambda: gui.window.pill.text() == "Online", timeout=10_000)
        assert settings.server.text() == other.url
        assert Context.open(gui_home.paths.home).config["server.url"] == other.url
        settings.reject()
        gui.quit()
        qtbot.waitUntil(task.done, timeout=15_000)
        assert task.result() == 0
    finally:
        other.stop()
