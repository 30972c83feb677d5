"""Terminal share end to end: real agents, real PTYs, consoles driven through tmux."""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from .harness import AgentHome, Server, Tmux, meshagent_cmd, wait_until

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")

SHELL = ["bash", "--norc", "--noprofile"]
SHELL_ENV = {"PS1": "prompt> ", "HISTFILE": "/dev/null"}


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    consoles = Tmux(tmp_path / "tmux.sock")
    try:
        yield consoles
    finally:
        consoles.kill()


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, AgentHome]]:
    """ann's host and two of her viewers, and bob's laptop, all in room `team`, all up; shared by
    the module's tests (each test's consoles and sessions end with its tmux server)."""
    root = tmp_path_factory.mktemp("terminal")
    logs = root / "logs"
    logs.mkdir()
    server = Server(root / "server", logs).start()
    users = {"host": "ann", "v1": "ann", "v2": "ann", "bob": "bob"}
    agents = {
        name: AgentHome(
            root / name,
            logs,
            name,
            config={"server.reconnect_max": "1", "device.name": name},
        )
        for name in users
    }
    try:
        server.add_user("ann")
        server.add_user("bob")
        codes = {name: server.join_code(user, room="team") for name, user in users.items()}

        def start(name: str) -> None:
            agents[name].login(server, codes[name])
            agents[name].up()

        with ThreadPoolExecutor(len(agents)) as pool:  # each is a Python start-up: overlap them
            list(pool.map(start, agents))
        wait_until(lambda: agents["host"].online() >= {"v1", "v2", "bob"}, 10, "everyone online")
        yield agents
    finally:
        for agent in agents.values():
            agent.stop()
        server.stop()


def share(tmux: Tmux, host: AgentHome, *args: str, command: list[str] = SHELL) -> None:
    argv = meshagent_cmd("--home", str(host.home), "terminal", "share", *args, "--", *command)
    tmux.start("host", argv, env=SHELL_ENV)
    tmux.wait_for("host", "prompt>")


def view(tmux: Tmux, viewer: AgentHome, *args: str, console: str | None = None) -> str:
    name = console or viewer.name
    tmux.start(name, meshagent_cmd("--home", str(viewer.home), "terminal", "view", "host", *args))
    return name


def wait_said(tmux: Tmux, console: str, text: str, timeout: float = 15) -> None:
    """Until the console's latest status line says ``text``: in its title (a status line
    never goes on the shared screen)."""
    wait_until(lambda: text in tmux.title(console), timeout, f"{console}: {text!r}")


def wait_banner(tmux: Tmux, console: str, text: str) -> None:
    """Until ``text`` is on the screen, lines joined (a long banner line wraps)."""
    wait_until(lambda: text in tmux.screen(console).replace("\n", ""), 15, f"{text!r}")


def escape(tmux: Tmux, console: str, key: str) -> None:
    tmux.keys(console, "C-]")
    tmux.keys(console, key)


def test_controller_types_view_only_cannot_and_control_moves(
    tmux: Tmux, team: dict[str, AgentHome]
) -> None:
    share(tmux, team["host"], "--allow-control")
    view(tmux, team["v1"], "--control")
    view(tmux, team["v2"])
    wait_said(tmux, "v1", "you are in control")
    wait_said(tmux, "v2", "v1 is in control")

    word = f"hi-{secrets.token_hex(4)}"
    tmux.type("v1", f"echo {word}", enter=True)
    for console in ("host", "v1", "v2"):
        screen = tmux.wait_for(console, f"\n{word}")  # the command's output, on its own line
        assert screen.count(word) == 2  # the typed line and what it printed

    # A view-only party types: the host drops it. The controller's next line proves the PTY
    # had every chance to receive it first.
    ignored = f"no-{secrets.token_hex(4)}"
    tmux.type("v2", f"echo {ignored}", enter=True)
    mark = f"mark-{secrets.token_hex(4)}"
    tmux.type("v1", f"echo {mark}", enter=True)
    tmux.wait_for("host", f"\n{mark}")
    assert ignored not in tmux.screen("host")

    # v2 asks while v1 holds control: told who has it.
    escape(tmux, "v2", "c")
    wait_said(tmux, "v2", "control refused: v1 is in control")
    # v1 gives it back; now v2 gets it, and v1 sees who has it.
    escape(tmux, "v1", "r")
    wait_said(tmux, "v2", "the host is in control")
    escape(tmux, "v2", "c")
    wait_said(tmux, "v2", "you are in control")
    wait_said(tmux, "v1", "v2 is in control")
    word2 = f"v2-{secrets.token_hex(4)}"
    tmux.type("v2", f"echo {word2}", enter=True)
    tmux.wait_for("host", f"\n{word2}")

    # The host takes control back at any moment; its own console always types.
    escape(tmux, "host", "r")
    wait_said(tmux, "v2", "the host is in control")
    blocked = f"blocked-{secrets.token_hex(4)}"
    tmux.type("v2", f"echo {blocked}", enter=True)
    word3 = f"host-{secrets.token_hex(4)}"
    tmux.type("host", f"echo {word3}", enter=True)
    tmux.wait_for("v1", f"\n{word3}")
    assert blocked not in tmux.screen("host")

    # Two requests at the same moment: exactly one wins, the other is told.
    tmux.keys("v1", "C-]")
    tmux.keys("v2", "C-]")
    tmux.keys("v1", "c")
    tmux.keys("v2", "c")
    wait_until(
        lambda: (
            sum("you are in control" in tmux.title(v) for v in ("v1", "v2")) == 1
            and sum("control refused" in tmux.title(v) for v in ("v1", "v2")) == 1
        ),
        15,
        "one winner and one refusal",
    )

    # The command exits: every viewer is told, and the session is gone.
    tmux.type("host", "exit 3", enter=True)
    for console in ("v1", "v2"):
        tmux.wait_for(console, "session ended: exit code 3")
    tmux.wait_for("host", "[exited 3 ]")


def test_another_users_device_needs_the_hosts_consent(
    tmux: Tmux, team: dict[str, AgentHome]
) -> None:
    share(tmux, team["host"], "--allow-control", "--room", "team")  # automatic for ann's only
    wait_banner(tmux, "host", "sharing with room team")
    view(tmux, team["bob"], "--control")
    wait_said(tmux, "host", "bob asks to take control. Allow? [y/n]")
    tmux.type("host", "n")
    wait_said(tmux, "bob", "control refused: the host declined")
    wait_said(tmux, "host", "you declined bob")
    escape(tmux, "bob", "c")
    wait_said(tmux, "host", "bob asks to take control")  # a second ask
    tmux.type("host", "y")
    wait_said(tmux, "bob", "you are in control")
    word = f"bob-{secrets.token_hex(4)}"
    tmux.type("bob", f"echo {word}", enter=True)
    tmux.wait_for("host", f"\n{word}")
    escape(tmux, "bob", "q")  # leaving: the console is restored and the host is told
    tmux.wait_for("bob", "[exited 0 ]")
    wait_said(tmux, "host", "bob left")


@pytest.mark.skipif(shutil.which("vim") is None, reason="needs vim")
def test_late_joiner_sees_vim_at_once_and_a_recording_is_written(
    tmux: Tmux, team: dict[str, AgentHome], tmp_path: Path
) -> None:
    cast = tmp_path / "session.cast"
    text = tmp_path / "notes.txt"
    text.write_text("".join(f"line {i} of the notes\n" for i in range(1, 11)))
    share(tmux, team["host"], "--record", str(cast))
    tmux.type("host", f"vim -u NONE -N {text}", enter=True)
    tmux.wait_for("host", "line 10 of the notes")
    view(tmux, team["v1"])
    screen = tmux.wait_for("v1", "line 10 of the notes")
    assert "line 1 of the notes" in screen
    assert '"notes.txt"' in screen or "notes.txt" in screen  # vim's status line came too
    tmux.keys("host", "Escape")
    tmux.type("host", ":q!", enter=True)
    tmux.wait_for("v1", "prompt>")
    # vim left the alternate screen: its text is gone from the viewer's screen as well.
    wait_until(lambda: "line 10 of the notes" not in tmux.screen("v1"), 10, "vim gone")
    escape(tmux, "host", "q")
    tmux.wait_for("v1", "session ended")
    lines = cast.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["version"] == 2 and header["width"] == 100 and header["height"] == 30
    output = "".join(json.loads(line)[2] for line in lines[1:] if json.loads(line)[1] == "o")
    assert "line 10 of the notes" in output


def test_a_stalled_viewer_does_not_slow_the_others(tmux: Tmux, team: dict[str, AgentHome]) -> None:
    share(tmux, team["host"], "--allow-control")
    view(tmux, team["v1"], "--control")
    view(tmux, team["v2"])
    wait_said(tmux, "v1", "you are in control")
    wait_said(tmux, "v2", "v1 is in control")
    stalled = _console_process(tmux, "v2")
    stalled.send_signal(signal.SIGSTOP)
    try:
        # ~20 MB of output while v2 reads nothing: v1 keeps up and sees the end of it.
        tmux.type("v1", "seq 1 3000000 | tail -c 20000000 >/dev/tty; echo flood-done", enter=True)
        tmux.wait_for("v1", "flood-done", timeout=60)
        tmux.wait_for("host", "flood-done", timeout=10)
    finally:
        stalled.send_signal(signal.SIGCONT)
    # v2 catches up with the present (a fresh snapshot, not the whole backlog).
    tmux.wait_for("v2", "flood-done", timeout=30)


def _console_process(tmux: Tmux, console: str) -> psutil.Process:
    pane = int(tmux._tmux("display", "-p", "-t", console, "#{pane_pid}").stdout.strip())
    for child in psutil.Process(pane).children(recursive=True):
        if "terminal" in child.cmdline():
            return child
    raise AssertionError(f"no meshagent process under {console}'s pane")


def test_host_agent_restart_tells_the_viewer_and_nothing_hangs(
    tmux: Tmux, team: dict[str, AgentHome]
) -> None:
    host = team["host"]
    share(tmux, host)
    view(tmux, team["v1"])
    tmux.wait_for("v1", "prompt>")
    started = time.monotonic()
    host.stop(signal.SIGKILL)
    tmux.wait_for("host", "[exited", timeout=10)  # the sharing console sees its agent go
    host.up()
    tmux.wait_for("v1", "session ended: the host stopped sharing", timeout=60)
    tmux.wait_for("v1", "[exited", timeout=10)
    print(f"viewer told after {time.monotonic() - started:.1f} s")


def test_bad_input_is_one_clear_line(
    tmux: Tmux, team: dict[str, AgentHome], tmp_path: Path
) -> None:
    share(tmux, team["host"])  # one real session, so that a wrong --session is about the id
    cases = [
        (team["v1"], ("terminal", "view", "v2"), "v2 is not sharing a terminal"),
        (team["v1"], ("terminal", "view", "nobody"), "no device 'nobody'"),
        (
            team["v1"],
            ("terminal", "view", "host", "--session", "nope"),
            "no terminal session 'nope'",
        ),
        (
            team["host"],
            ("terminal", "share", "--", "no-such-program-here"),
            "cannot start no-such-program-here",
        ),
        (
            team["host"],
            ("terminal", "share", "--room", "nowhere", "--", "true"),
            "not a member of room 'nowhere'",
        ),
        (
            team["host"],
            ("terminal", "share", "--record", str(tmp_path / "no" / "dir" / "x.cast")),
            "cannot record to",
        ),
    ]
    for agent, args, message in cases:
        done = agent.cli(*args)
        assert done.returncode != 0
        assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


# ---------------------------------------------------------------- rooms: no forced access


@pytest.fixture(scope="module")
def rooms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, AgentHome]]:
    """ann's `host` owns room `team`, where bob is a member and eve a viewer; eve owns room
    `trap`, and ann accepted eve's invitation to it. Everyone is up."""
    root = tmp_path_factory.mktemp("rooms")
    logs = root / "logs"
    logs.mkdir()
    server = Server(root / "server", logs).start()
    users = {"host": "ann", "bob": "bob", "eve": "eve"}
    agents = {
        name: AgentHome(
            root / name, logs, name, config={"server.reconnect_max": "1", "device.name": name}
        )
        for name in users
    }
    try:
        for user in users.values():
            server.add_user(user)
        with ThreadPoolExecutor(len(agents)) as pool:
            list(pool.map(lambda n: agents[n].login(server, server.join_code(users[n])), agents))
        host, bob, eve = agents["host"], agents["bob"], agents["eve"]
        host.ok("rooms", "create", "team")
        host.ok("rooms", "invite", "team", "bob")
        host.ok("rooms", "invite", "team", "eve", "--role", "viewer")
        bob.ok("rooms", "accept", "team")
        eve.ok("rooms", "accept", "team")
        eve.ok("rooms", "create", "trap")
        eve.ok("rooms", "invite", "trap", "ann", "--role", "member")
        host.ok("rooms", "accept", "trap")
        with ThreadPoolExecutor(len(agents)) as pool:
            list(pool.map(lambda agent: agent.up(), agents.values()))
        wait_until(lambda: host.online() >= {"bob", "eve"}, 10, "everyone online")
        yield agents
    finally:
        for agent in agents.values():
            agent.stop()
        server.stop()


# The `rooms` world takes a dozen CLI processes to build: whichever test runs first pays for it.
@pytest.mark.timeout(300)
def test_a_terminal_shared_with_ones_own_devices_reaches_nobody_else(
    tmux: Tmux, rooms: dict[str, AgentHome]
) -> None:
    """eve shares two rooms with ann (one of them her own, which ann even accepted) and forces
    nothing: a terminal ann shares without --room is not hers to watch."""
    share(tmux, rooms["host"])
    wait_banner(tmux, "host", "sharing with your own devices only")
    done = rooms["eve"].cli("terminal", "view", "host")
    assert done.returncode != 0
    assert done.stderr.strip() == "meshagent: host is not sharing a terminal", done.stderr


@pytest.mark.timeout(300)
def test_a_viewer_in_the_shared_room_cannot_take_control_with_a_role_from_another(
    tmux: Tmux, rooms: dict[str, AgentHome]
) -> None:
    """eve is a viewer in `team`, where ann shares; that she owns `trap`, which ann is in,
    gives her no control of it. bob, a member, gets it with ann's consent; the audit of
    `team` shows the grants and every change of control."""
    host = rooms["host"]
    share(tmux, host, "--room", "team")
    done = rooms["eve"].cli("terminal", "view", "host", "--control")
    assert done.returncode != 0
    assert "may not control terminals on host" in done.stderr, done.stderr
    view(tmux, rooms["eve"])
    tmux.wait_for("eve", "prompt>")  # watching is what a viewer may do
    escape(tmux, "eve", "c")
    wait_said(tmux, "eve", "control refused: your role in the room allows watching only")

    view(tmux, rooms["bob"], "--control")
    wait_said(tmux, "host", "bob asks to take control. Allow? [y/n]")
    assert "eve asks" not in tmux.title("host")  # eve's asks never reached ann
    tmux.type("host", "y")
    wait_said(tmux, "bob", "you are in control")
    escape(tmux, "bob", "r")
    wait_said(tmux, "bob", "the host is in control")

    bob_id = next(d["id"] for d in host.devices() if d["name"] == "bob")
    eve_id = next(d["id"] for d in host.devices() if d["name"] == "eve")

    def audit() -> list[dict[str, object]]:
        out = host.ok("rooms", "audit", "team", "--json")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def controls() -> list[dict[str, object]]:
        return [e for e in audit() if e["kind"] == "terminal.control"]

    wait_until(lambda: len(controls()) >= 2, 15, "two control changes in the audit")
    assert bob_id in json.dumps(controls()) and eve_id not in json.dumps(controls())
    granted = json.dumps([e for e in audit() if e["kind"] == "capability.granted"])
    assert bob_id in granted and eve_id in granted and "terminal:control" in granted
    # eve's control tokens were refused: the audit records no terminal:control for her.
    for entry in audit():
        if entry["kind"] == "capability.granted" and eve_id in json.dumps(entry):
            assert "terminal:control" not in json.dumps(entry), entry
