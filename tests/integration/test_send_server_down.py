"""Issue 17 item 14: `send` with the Mesh Server down says so in one line, quickly (as
`devices` does); `send --wait` says what it waits for; SIGTERM during a send is one line, not
a traceback. Real processes."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import BASE_ENV, AgentHome, Server, Tmux, cleanup, meshagent_cmd


@pytest.fixture
def enrolled(tmp_path: Path) -> Iterator[tuple[AgentHome, Path]]:
    """An enrolled device whose server has gone away, and a file to send."""
    logs = tmp_path / "logs"
    logs.mkdir()
    server = Server(tmp_path / "server", logs).start()
    desk = AgentHome(tmp_path / "desk", logs, "desk")
    with cleanup(server, desk):
        server.add_user("ann")
        desk.login(server, server.join_code("ann"))
        server.stop()
        payload = tmp_path / "report.txt"
        payload.write_text("quarterly numbers\n")
        yield desk, payload


def test_send_with_the_server_down_is_one_clear_line(
    enrolled: tuple[AgentHome, Path],
) -> None:
    """The line `devices` gives, from the same early check (how fast is a benchmark's business:
    a wall-clock bound here would flake on a loaded machine)."""
    desk, payload = enrolled
    done = desk.cli("send", str(payload), "--to", "laptop")
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0
    assert len(lines) == 1, done.stderr
    assert "Mesh Server" in lines[0] and "Errno" not in lines[0], lines[0]


def _spawn(desk: AgentHome, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        meshagent_cmd("--home", str(desk.home), *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=BASE_ENV,
    )


def test_sigterm_during_send_is_one_line(enrolled: tuple[AgentHome, Path]) -> None:
    desk, payload = enrolled
    sending = _spawn(desk, "send", str(payload), "--to", "laptop", "--wait")
    time.sleep(2.5)  # connecting, or waiting for the server
    assert sending.poll() is None, sending.communicate()
    sending.send_signal(signal.SIGTERM)
    _, err = sending.communicate(timeout=15)
    assert sending.returncode != 0
    said = [line for line in err.splitlines() if "waiting for the Mesh Server" not in line]
    assert said == ["meshagent: stopped (SIGTERM)"], err


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_send_wait_says_what_it_waits_for(tmp_path: Path, enrolled: tuple[AgentHome, Path]) -> None:
    desk, payload = enrolled
    consoles = Tmux(tmp_path / "tmux.sock")
    try:
        send = meshagent_cmd("--home", str(desk.home), "send", str(payload), "--to", "laptop")
        consoles.start("send", [*send, "--wait"])
        screen = consoles.wait_for("send", "waiting for the Mesh Server", timeout=20)
        assert "0/? bytes" not in screen
    finally:
        consoles.kill()
