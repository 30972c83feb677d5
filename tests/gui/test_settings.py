"""The settings dialog writes the same config as `meshagent config`, the token to the secret
store (never the file), start at login to the XDG entry; a bad value changes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshagent_gui.context import Context
from meshagent_gui.ui.settings import SettingsDialog


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
