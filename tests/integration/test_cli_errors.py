"""Bad input: one clear line on stderr, a non-zero exit, no traceback, nothing lost."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshagent_gui.ui.system_libraries import XCB_LIBRARIES
from tests.fakes.gotify import FakeGotify

from .harness import BASE_ENV, AgentHome, Process, Server, free_port, meshagent_cmd, run


def assert_one_clear_line(done, fragment: str) -> None:  # type: ignore[no-untyped-def]
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if not line.startswith("meshagent: WARNING")]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("meshagent: ")
    assert fragment in lines[0], lines[0]


def test_wrong_password(server: Server, make_agent) -> None:  # type: ignore[no-untyped-def]
    server.add_user("alice", password="right password")
    agent: AgentHome = make_agent("a")
    done = agent.cli("login", server.url, "--user", "alice", "--password-stdin", stdin="wrong\n")
    assert_one_clear_line(done, "wrong user name or password")
    done = agent.cli(
        "login", server.url, "--user", "alice", "--password-stdin", stdin="right password\n"
    )
    assert done.returncode == 0, done.stderr


def test_expired_and_reused_join_codes(server: Server, make_agent) -> None:  # type: ignore[no-untyped-def]
    server.add_user("bob")
    short = server.join_code("bob", ttl=1)
    used = server.join_code("bob")
    first: AgentHome = make_agent("first")
    second: AgentHome = make_agent("second")
    first.login(server, used)
    time.sleep(1.5)
    assert_one_clear_line(second.cli("login", server.url, "--join-code", short), "expired")
    assert_one_clear_line(second.cli("login", server.url, "--join-code", used), "already used")
    assert_one_clear_line(second.cli("login", server.url, "--join-code", "NOPE-NOPE"), "not valid")
    # nothing lost: the first device is still enrolled and works
    assert first.devices() == []


def test_server_down_and_malformed_url(tmp_path: Path) -> None:
    home = ["--home", str(tmp_path / "h")]
    assert_one_clear_line(
        run(*home, "login", "http://127.0.0.1:9", "--join-code", "X"),
        "cannot reach the Mesh Server",
    )
    assert_one_clear_line(
        run(*home, "login", "ftp:/nowhere", "--join-code", "X"), "malformed server URL"
    )
    assert_one_clear_line(run(*home, "devices"), "not enrolled")


def test_unwritable_home(tmp_path: Path) -> None:
    blocker = tmp_path / "home"
    blocker.write_text("a file, not a folder")
    assert_one_clear_line(run("--home", str(blocker), "devices"), "cannot use")
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert_one_clear_line(run("--home", str(locked / "x"), "devices"), "cannot use")


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    done = run("--home", str(tmp_path), "config", "get", "no.such.key")
    assert_one_clear_line(done, "unknown setting")
    done = run("frobnicate")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("token_kind", ["unknown", "client"])
def test_gotify_refusals(tmp_path: Path, token_kind: str) -> None:
    home = ["--home", str(tmp_path / "h")]
    with FakeGotify() as gotify:
        token = gotify.client_token if token_kind == "client" else "not-a-real-token"
        assert run(*home, "config", "set", "gotify.url", gotify.url).returncode == 0
        assert run(*home, "config", "set", "gotify.token", token).returncode == 0
        done = run(*home, "notify", "Title", "Body")
        assert_one_clear_line(done, "401")  # Gotify answers 401 to a client token too
        assert token not in done.stderr
        assert gotify.messages == []


def test_notify_reaches_gotify(tmp_path: Path) -> None:
    home = ["--home", str(tmp_path / "h")]
    with FakeGotify() as gotify:
        run(*home, "config", "set", "gotify.url", gotify.url)
        run(*home, "config", "set", "gotify.token", gotify.app_token)
        done = run(*home, "--json", "notify", "Backup", "done", "--priority", "6")
        assert done.returncode == 0, done.stderr
        assert gotify.messages[-1]["title"] == "Backup"
        assert gotify.messages[-1]["priority"] == 6
        log = (tmp_path / "h" / "state" / "meshagent.log").read_text()
        assert gotify.app_token not in log


HEADLESS = {"DISPLAY": "", "WAYLAND_DISPLAY": "", "QT_QPA_PLATFORM": ""}


def test_the_app_without_a_display_is_one_line(tmp_path: Path) -> None:
    done = run("--home", str(tmp_path), "gui", env=HEADLESS)
    assert_one_clear_line(done, "no display for the desktop app")


def test_meshagent_alone_without_a_display_runs_the_local_mesh(tmp_path: Path) -> None:
    """README's quick start: `meshagent` is the app, or where there is no display the headless
    local mesh, saying so in one line."""
    home = tmp_path / "h"
    assert run("--home", str(home), "config", "set", "local.port", str(free_port())).returncode == 0
    agent = Process(["--home", str(home)], tmp_path / "agent.log", env=HEADLESS)
    try:
        agent.read_line(r"meshagent --home DIR join mesh://\S+:\d+/\S+")  # the pairing lines
    finally:
        assert agent.stop() == 0
    said = (tmp_path / "agent.log").read_text().splitlines()
    assert said[0].startswith("meshagent: no display here") and "headless local mesh" in said[0]
    assert "Traceback" not in "\n".join(said)


@pytest.mark.skipif(sys.platform != "linux", reason="Qt's xcb plugin is Linux only")
def test_missing_xcb_libraries_are_one_line_naming_the_packages(tmp_path: Path) -> None:
    """A stock Debian desktop lacks libxcb-icccm4/libxcb-keysyms1: say so, before Qt aborts."""
    missing = [
        package
        for soname, (package, _) in XCB_LIBRARIES.items()
        if ctypes.util.find_library(soname.removeprefix("lib").split(".so")[0]) is None
    ]
    if not missing:
        pytest.skip("this machine has every library Qt's xcb plugin needs")
    on_x11 = {"DISPLAY": ":99", "WAYLAND_DISPLAY": "", "QT_QPA_PLATFORM": ""}
    for command in (("gui",), ()):
        done = run("--home", str(tmp_path), *command, env=on_x11)
        assert_one_clear_line(done, "the desktop app needs the X11 libraries")
        assert done.returncode == 1  # not Qt's abort (-6) or core dump
        assert all(package in done.stderr for package in missing), done.stderr
        assert "apt install" in done.stderr


def test_a_closed_pipe_is_no_traceback(tmp_path: Path) -> None:
    """`meshagent config list | head -3`: the reader went away; no BrokenPipeError traceback."""
    reader, writer = os.pipe()
    os.close(reader)  # before the command writes anything: every write meets a closed pipe
    try:
        done = subprocess.run(
            meshagent_cmd("--home", str(tmp_path), "config", "list"),
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            env=BASE_ENV,
            timeout=60,
            check=False,
        )
    finally:
        os.close(writer)
    assert done.stderr == ""
    assert done.returncode == 1


@pytest.mark.parametrize(
    ("key", "bad", "says"),
    [
        ("transfer.auto_accept", "maybe", "own, all or none"),
        ("transfer.rate_limit", "5X", "bytes per second"),
        ("gotify.url", "not-a-url", "http:// or https://"),
    ],
)
def test_config_set_refuses_a_bad_value_and_writes_nothing(
    tmp_path: Path, key: str, bad: str, says: str
) -> None:
    home = ["--home", str(tmp_path)]
    assert_one_clear_line(run(*home, "config", "set", key, bad), says)
    assert not (tmp_path / "config" / "config.toml").exists()
    assert run(*home, "config", "get", key).stdout.strip() != bad


def test_an_agent_with_a_bad_value_in_its_file_says_so(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir(parents=True)
    (tmp_path / "config" / "config.toml").write_text('[transfer]\nauto_accept = "maybe"\n')
    for command in (("up",), ("up", "--local"), ("devices",)):
        done = run("--home", str(tmp_path), *command, timeout=30)
        assert_one_clear_line(done, "transfer.auto_accept takes own, all or none, not 'maybe'")
    doctor = run("--home", str(tmp_path), "doctor")
    assert "FAIL config" in doctor.stdout and "auto_accept" in doctor.stdout
    # `config set` is the way out
    assert (
        run("--home", str(tmp_path), "config", "set", "transfer.auto_accept", "all").returncode == 0
    )
    assert run("--home", str(tmp_path), "config", "get", "transfer.auto_accept").stdout == "all\n"
