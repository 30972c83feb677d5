"""`meshagent rooms` end to end: real server, real agents, two (or three) users.

Joining a room takes the joiner's own act: an invitation they accept, or a room join code they
use. Until then the inviter sees nothing of theirs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .harness import AgentHome, Server, ok

# Every step is a CLI process (a Python start-up each), four users' worth of them.
pytestmark = pytest.mark.timeout(300)
USERS = ("ann", "bob", "eve", "dan")
World = tuple[Server, dict[str, AgentHome]]


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Server, dict[str, AgentHome]]]:
    """ann, bob, eve and dan, one device each (`ann-pc`...), enrolled with no room in common;
    shared by the module's tests, which each use rooms and people of their own."""
    root = tmp_path_factory.mktemp("rooms-cli")
    logs = root / "logs"
    logs.mkdir()
    server = Server(root / "server", logs).start()
    agents = {
        user: AgentHome(root / user, logs, f"{user}-pc", config={"server.reconnect_max": "1"})
        for user in USERS
    }

    def enrol(user: str) -> None:
        server.add_user(user)
        agents[user].login(server, server.join_code(user))

    try:
        with ThreadPoolExecutor(len(USERS)) as pool:
            list(pool.map(enrol, USERS))
        yield server, agents
    finally:
        for agent in agents.values():
            agent.stop()
        server.stop()


@pytest.fixture
def people(world: World) -> dict[str, AgentHome]:
    return world[1]


def lines(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def names(agent: AgentHome) -> set[str]:
    return {str(d["name"]) for d in agent.devices()}


def fails(agent: AgentHome, *args: str) -> str:
    """Run a command that must fail with one clear line; that line."""
    done = agent.cli(*args)
    assert done.returncode != 0, done.stdout
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    return done.stderr


def test_an_invitation_is_seen_accepted_and_then_the_devices_meet(
    people: dict[str, AgentHome],
) -> None:
    ann, bob = people["ann"], people["bob"]
    assert "created room team" in ann.ok("rooms", "create", "team")
    bob.up()  # bob's agent runs: his commands go through it, and it hears the invitation
    assert bob.process is not None

    ann.ok("rooms", "invite", "team", "bob")
    heard = bob.process.read_line(r'"event": "invitation"')
    assert json.loads(heard.string) == {
        "event": "invitation",
        "room": "team",
        "role": "member",
        "by": "ann",
    }
    # Invited is not joined: neither side sees the other's devices yet.
    assert "bob-pc" not in names(ann) and "ann-pc" not in names(bob)
    [invitation] = lines(bob.ok("rooms", "invitations", "--json"))
    assert (invitation["room"], invitation["role"], invitation["invited_by"]) == (
        "team",
        "member",
        "ann",
    )

    assert "joined room team as member" in bob.ok("rooms", "accept", "team")
    assert "bob-pc" in names(ann) and "ann-pc" in names(bob)
    assert lines(bob.ok("rooms", "invitations", "--json")) == []
    rooms = {r["name"]: r for r in lines(ann.ok("rooms", "list", "--json"))}
    assert rooms["team"]["role"] == "owner" and set(rooms["team"]["members"]) == {"ann", "bob"}


def test_decline_leave_role_join_code_and_the_audit(people: dict[str, AgentHome]) -> None:
    eve, dan, bob = people["eve"], people["dan"], people["bob"]
    eve.ok("rooms", "create", "club")

    eve.ok("rooms", "invite", "club", "dan", "--role", "viewer")
    dan.ok("rooms", "decline", "club")
    assert lines(dan.ok("rooms", "invitations", "--json")) == []
    fails(dan, "rooms", "accept", "club")  # nothing left to accept
    assert "dan-pc" not in names(eve)

    # An invitation to a user who does not exist answers like any other (no user-name oracle).
    assert "invited nobody" in eve.ok("rooms", "invite", "club", "nobody")

    eve.ok("rooms", "invite", "club", "dan")
    dan.ok("rooms", "accept", "club")
    [changed] = lines(eve.ok("rooms", "role", "club", "dan", "viewer", "--json"))
    assert changed["name"] == "club"
    assert {r["name"]: r["role"] for r in lines(dan.ok("rooms", "list", "--json"))}["club"] == (
        "viewer"
    )
    # Only an owner changes roles or reads the audit.
    assert fails(dan, "rooms", "role", "club", "eve", "viewer")
    assert fails(dan, "rooms", "audit", "club")

    assert "left room club" in dan.ok("rooms", "leave", "club")
    assert "dan-pc" not in names(eve)

    # A room join code: the joiner's own act, joined as member.
    code = eve.ok("rooms", "join-code", "club").strip()
    assert "joined room club as member" in bob.ok("rooms", "join", code)
    assert "bob-pc" in names(eve)

    kinds = [e["kind"] for e in lines(eve.ok("rooms", "audit", "club", "--json"))]
    for kind in ("room.invited", "room.joined", "room.role_changed", "room.left"):
        assert kind in kinds, kinds
    assert len(lines(eve.ok("rooms", "audit", "club", "--limit", "2", "--json"))) == 2


def test_a_room_one_is_not_in_looks_like_one_that_does_not_exist(
    people: dict[str, AgentHome],
) -> None:
    ann, dan = people["ann"], people["dan"]
    ann.ok("rooms", "create", "secret")
    for args in (("invite", "secret", "dan"), ("audit", "secret"), ("leave", "secret")):
        theirs = fails(dan, "rooms", *args)
        missing = fails(dan, "rooms", *args[:1], "no-such-room", *args[2:])
        assert theirs.replace("secret", "X") == missing.replace("no-such-room", "X")
    assert "invalid choice" in fails(ann, "rooms", "invite", "secret", "dan", "--role", "god")


def test_server_options_work_before_or_after_the_subcommand(
    world: World,
    make_agent,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    server = world[0]
    home = str(tmp_path / "elsewhere")
    data = str(server.data_dir)
    first = ok("--home", home, "server", "--data-dir", data, "join-code", "--user", "ann")
    second = ok("--home", home, "server", "join-code", "--data-dir", data, "--user", "ann")
    for name, code in (("one", first), ("two", second)):
        assert make_agent(name).login(server, code.strip())["user"] == "ann"
    assert not (tmp_path / "elsewhere" / "data" / "server").exists()
