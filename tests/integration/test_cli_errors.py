"""Bad input: one clear line on stderr, a non-zero exit, no traceback, nothing lost."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.fakes.gotify import FakeGotify

from .harness import AgentHome, Server, run


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


def test_the_app_without_a_display_is_one_line(tmp_path: Path) -> None:
    headless = {"DISPLAY": "", "WAYLAND_DISPLAY": "", "QT_QPA_PLATFORM": ""}
    for command in ((), ("gui",)):  # `meshagent` alone is the app
        done = run("--home", str(tmp_path), *command, env=headless)
        assert_one_clear_line(done, "no display for the desktop app")
