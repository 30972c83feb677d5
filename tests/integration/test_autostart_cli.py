"""`meshagent autostart on|off|status` for real: the XDG entry appears, runs the app, goes."""

from __future__ import annotations

import configparser
import json
import shlex
from pathlib import Path

from .harness import run


def test_autostart_writes_and_removes_the_xdg_entry(tmp_path: Path) -> None:
    home = tmp_path / "home with space"
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}

    def autostart(state: str) -> dict[str, object]:
        done = run("--home", str(home), "--json", "autostart", state, env=env)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    assert autostart("status")["enabled"] is False
    status = autostart("on")
    entry = Path(str(status["location"]))
    assert entry.parent == tmp_path / "xdg" / "autostart" and entry.exists()
    desktop = configparser.ConfigParser(interpolation=None)
    desktop.read(entry)
    command = shlex.split(desktop["Desktop Entry"]["Exec"])
    assert command[-3:] == ["gui", "--home", str(home)]
    assert autostart("status")["enabled"] is True
    assert autostart("off")["enabled"] is False
    assert not entry.exists()
