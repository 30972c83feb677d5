"""Issue 2 acceptance: a real server process, real agents with their own --home."""

from __future__ import annotations

import json
import signal

from .harness import AgentHome, Server, wait_until


def test_presence_and_reconnect(server: Server, make_agent) -> None:  # type: ignore[no-untyped-def]
    server.add_user("alice")
    laptop: AgentHome = make_agent("laptop")
    desktop: AgentHome = make_agent("desktop")
    first = laptop.login(server, server.join_code("alice"))
    second = desktop.login(server, server.join_code("alice"))
    assert first["user"] == second["user"] == "alice"
    assert first["device_id"] != second["device_id"]

    laptop.up()
    desktop.up()
    wait_until(lambda: "desktop" in laptop.online(), 5, "desktop online for laptop")
    wait_until(lambda: "laptop" in desktop.online(), 5, "laptop online for desktop")

    desktop.stop(signal.SIGKILL)
    wait_until(lambda: "desktop" not in laptop.online(), 10, "desktop offline after kill -9")

    desktop.up()
    wait_until(lambda: "desktop" in laptop.online(), 5, "desktop back")

    # The server goes away and comes back on the same port: both agents reconnect by themselves.
    server.stop()
    wait_until(lambda: "desktop" not in laptop.online(), 10, "server loss noticed")
    server.start()
    for agent, other in ((laptop, "desktop"), (desktop, "laptop")):
        wait_until(lambda a=agent, o=other: o in a.online(), 15, f"{agent.name} reconnected")


def test_devices_without_a_running_agent(server: Server, make_agent) -> None:  # type: ignore[no-untyped-def]
    server.add_user("bob")
    phone: AgentHome = make_agent("phone")
    tablet: AgentHome = make_agent("tablet")
    phone.login(server, server.join_code("bob"))
    tablet.login(server, server.join_code("bob"))
    devices = phone.devices()  # in-process: no agent runs for this home
    assert [(d["name"], d["online"]) for d in devices] == [("tablet", False)]
    tablet.up()
    wait_until(lambda: phone.online() == {"tablet"}, 5, "tablet online seen in-process")


def test_users_do_not_see_each_other(server: Server, make_agent) -> None:  # type: ignore[no-untyped-def]
    server.add_user("carol")
    server.add_user("dave")
    carol: AgentHome = make_agent("carol-pc")
    dave: AgentHome = make_agent("dave-pc")
    carol.login(server, server.join_code("carol"))
    dave.login(server, server.join_code("dave"))
    assert carol.devices() == []
    # A shared room makes them visible to each other.
    room_code = server.join_code("dave", room="project")
    dave2: AgentHome = make_agent("dave-laptop")
    dave2.login(server, room_code)
    carol_room = server.join_code("carol", room="project")
    carol2: AgentHome = make_agent("carol-laptop")
    carol2.login(server, carol_room)
    names = {d["name"] for d in carol.devices()}
    assert {"carol-laptop", "dave-pc", "dave-laptop"} <= names


def test_doctor_reports_each_part(server: Server, make_agent) -> None:  # type: ignore[no-untyped-def]
    server.add_user("erin")
    agent: AgentHome = make_agent("erin-pc")
    agent.login(server, server.join_code("erin"))
    done = agent.cli("doctor", "--json")
    checks = {c["name"]: c for c in map(json.loads, done.stdout.splitlines())}
    assert checks["server"]["status"] == "ok"
    assert checks["session"]["status"] == "ok"
    assert checks["secret store"]["status"] == "warn"  # file store in tests: said loudly
    assert checks["agent"]["status"] == "warn"
    assert abs(float(checks["clock skew"]["detail"].split()[0])) < 5
    agent.up()
    checks = {c["name"]: c for c in map(json.loads, agent.ok("doctor", "--json").splitlines())}
    assert checks["agent"]["status"] == "ok", checks["agent"]
    # The running agent's typed status reply decoded: its data-plane checks are there.
    assert {"quic engine", "socket buffers"} <= checks.keys(), sorted(checks)
    server.stop()
    done = agent.cli("doctor")
    assert done.returncode == 1
    assert "cannot reach the Mesh Server" in done.stdout


def test_agent_events_reach_gotify(server: Server, make_agent) -> None:  # type: ignore[no-untyped-def]
    from tests.fakes.gotify import FakeGotify

    server.add_user("frank")
    with FakeGotify() as gotify:
        watcher: AgentHome = make_agent(
            "watcher", **{"gotify.url": gotify.url, "notify.peer_offline": "6"}
        )
        watcher.login(server, server.join_code("frank"))
        watcher.ok("config", "set", "gotify.token", gotify.app_token)
        laptop: AgentHome = make_agent("flaky")
        laptop.login(server, server.join_code("frank"))
        watcher.up()
        laptop.up()
        wait_until(lambda: "flaky" in watcher.online(), 5, "flaky online")
        assert gotify.messages == []  # peer_online is off by default
        laptop.stop(signal.SIGKILL)
        message = wait_until(lambda: gotify.messages, 10, "a Gotify message")[0]
        assert "flaky" in message["title"] + message["message"]
        assert message["priority"] == 6
