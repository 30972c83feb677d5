"""The OS facilities the installers rely on, for real, on the OS that has them.

The unit tests drive ConPTY, the Run key and the LaunchAgent through fakes because this machine
is Linux; these run the real thing on Windows and macOS (the release workflow's runners, through
installers/run_platform_tests.sh) and are skipped elsewhere. Each uses a home of its own, so the
autostart entry it writes has a name of its own (home_suffix) and never touches the user's.
"""

from __future__ import annotations

import asyncio
import plistlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshagent_gui.config import Paths
from meshagent_gui.core.autostart import (
    RUN_KEY,
    autostart_status,
    disable_autostart,
    enable_autostart,
    format_windows_command,
    launch_command,
)

windows_only = pytest.mark.skipif(sys.platform != "win32", reason="Windows only")
macos_only = pytest.mark.skipif(sys.platform != "darwin", reason="macOS only")


@pytest.fixture
def own_home(tmp_path: Path) -> Iterator[Paths]:
    """A home whose autostart entry carries a unique suffix; switched off again afterwards."""
    paths = Paths.resolve(tmp_path / f"home-{uuid.uuid4().hex[:8]}")
    yield paths
    if sys.platform in ("win32", "darwin"):
        disable_autostart(paths)


# ---------------------------------------------------------------- Windows: ConPTY


@windows_only
async def test_conpty_runs_a_command_and_reports_its_exit() -> None:
    pytest.importorskip("winpty")
    from meshagent_gui.core.terminal.conpty_windows import ConPty

    pty = ConPty.spawn(["cmd.exe", "/d", "/c", "echo mesh-%USERNAME%& exit 3"], cols=100, rows=30)
    output = bytearray()
    ended = asyncio.Event()
    pty.start(output.extend, ended.set)
    try:
        status = await asyncio.wait_for(pty.wait(), 60)
        await asyncio.wait_for(ended.wait(), 60)
    finally:
        pty.close()
    assert status.returncode == 3
    assert b"mesh-" in output
    assert pty.size == (100, 30)


@windows_only
async def test_conpty_takes_input_and_resizes() -> None:
    pytest.importorskip("winpty")
    from meshagent_gui.core.terminal.conpty_windows import ConPty

    pty = ConPty.spawn(["cmd.exe", "/d", "/q"], cols=80, rows=24)
    output = bytearray()
    pty.start(output.extend, lambda: None)
    try:
        pty.resize(120, 40)
        pty.write(b"echo typed-%COMPUTERNAME%\r\nexit 0\r\n")
        status = await asyncio.wait_for(pty.wait(), 60)
    finally:
        pty.close()
    assert status.returncode == 0
    assert b"typed-" in output
    assert pty.size == (120, 40)


# ---------------------------------------------------------------- Windows: the Run key


@windows_only
def test_run_key_autostart_writes_and_removes_the_real_value(own_home: Paths) -> None:
    import winreg

    status = enable_autostart(own_home)
    assert status.enabled
    value_name = status.location.rsplit("\\", 1)[1]
    with winreg.OpenKey(winreg.HKEY_CURRENT_USER, RUN_KEY) as key:
        value, kind = winreg.QueryValueEx(key, value_name)
    assert kind == winreg.REG_SZ
    assert value == format_windows_command(launch_command(own_home))
    assert autostart_status(own_home).enabled

    assert not disable_autostart(own_home).enabled
    with winreg.OpenKey(winreg.HKEY_CURRENT_USER, RUN_KEY) as key, pytest.raises(FileNotFoundError):
        winreg.QueryValueEx(key, value_name)


# ---------------------------------------------------------------- macOS: the LaunchAgent


@macos_only
def test_launch_agent_is_a_valid_plist_in_the_users_launch_agents(own_home: Paths) -> None:
    status = enable_autostart(own_home)
    plist = Path(status.location)
    assert status.enabled
    assert plist.parent == Path.home() / "Library" / "LaunchAgents"
    subprocess.run(["plutil", "-lint", str(plist)], check=True, capture_output=True)
    with plist.open("rb") as stream:
        job = plistlib.load(stream)
    assert job["ProgramArguments"] == launch_command(own_home)
    assert job["RunAtLoad"] is True
    assert job["Label"].startswith("org.meshagent.autostart.")  # its own, not the user's

    assert not disable_autostart(own_home).enabled
    assert not plist.exists()
