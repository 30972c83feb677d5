"""`meshagent terminal share` as a new user meets it: the banner (who can watch, the command to
view, the keys) and a host's own stop reported as such, not "signal 1" / exit 129. Real agents,
real PTYs, consoles driven through tmux."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import AgentHome, Server, Tmux, cleanup, meshagent_cmd, wait_until

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")

SHELL = ["bash", "--norc", "--noprofile"]


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[AgentHome, AgentHome]]:
    """ann's desk (the host) and her laptop, both up."""
    logs = tmp_path / "logs"
    logs.mkdir()
    server = Server(tmp_path / "server", logs).start()
    desk, laptop = (
        AgentHome(tmp_path / name, logs, name, config={"server.reconnect_max": "1"})
        for name in ("desk", "laptop")
    )
    with cleanup(server, desk, laptop):
        server.add_user("ann")
        for agent in (desk, laptop):
            agent.login(server, server.join_code("ann"))
            agent.up()
        wait_until(lambda: "laptop" in desk.online(), 10, "laptop online")
        yield desk, laptop


def test_share_says_who_can_watch_and_a_host_stop_is_no_signal(
    tmp_path: Path, pair: tuple[AgentHome, AgentHome]
) -> None:
    desk, laptop = pair
    consoles = Tmux(tmp_path / "tmux.sock")
    try:
        share = meshagent_cmd("--home", str(desk.home), "terminal", "share", "--", *SHELL)
        consoles.start("host", share, env={"PS1": "prompt> ", "HISTFILE": "/dev/null"})
        screen = consoles.wait_for("host", "prompt>")
        assert "sharing with your own devices only" in screen
        assert "To watch:  meshagent terminal view desk" in screen
        assert "Ctrl-] q stop sharing" in screen
        # The banner's command, as shown, on the other device.
        consoles.start(
            "viewer", meshagent_cmd("--home", str(laptop.home), "terminal", "view", "desk")
        )
        consoles.wait_for("viewer", "prompt>")
        consoles.keys("host", "C-]")
        consoles.keys("host", "q")
        consoles.wait_for("viewer", "session ended: the host stopped sharing")
        host = consoles.wait_for("host", "[exited 0 ]")
        assert "you stopped sharing" in host
        assert "signal" not in host and "129" not in host
        assert "signal" not in consoles.screen("viewer")
    finally:
        consoles.kill()


def test_status_lines_go_to_the_title_never_into_the_shared_screen(
    tmp_path: Path, pair: tuple[AgentHome, AgentHome]
) -> None:
    """Issue 17 item 10: "laptop is watching" over vim splits its screen. As tmate does, the
    status goes where the program never draws: the console's title (OSC 2)."""
    desk, laptop = pair
    text = tmp_path / "notes.txt"
    text.write_text("".join(f"line {n} of the notes\n" for n in range(1, 11)))
    consoles = Tmux(tmp_path / "tmux.sock")
    try:
        vim = ["vim", "-u", "NONE", "-i", "NONE", "-N", "-n", str(text)]
        share = meshagent_cmd("--home", str(desk.home), "terminal", "share", "--", *vim)
        consoles.start("host", share, size=(80, 24))
        consoles.wait_for("host", "line 10 of the notes")
        before = consoles.screen("host")
        consoles.start(
            "viewer", meshagent_cmd("--home", str(laptop.home), "terminal", "view", "desk")
        )
        consoles.wait_for("viewer", "line 10 of the notes")
        wait_until(
            lambda: "laptop is watching" in consoles.title("host"), 15, "the status in the title"
        )
        assert consoles.screen("host") == before  # vim's screen, untouched
        assert "[meshagent]" not in consoles.screen("viewer")
        consoles.type("host", ":q!", enter=True)
        consoles.wait_for("host", "[exited 0 ]")
    finally:
        consoles.kill()
