from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import AgentHome, Server, wait_until


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    running = Server(tmp_path / "server", logs).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def make_agent(tmp_path: Path) -> Iterator[type[AgentHome]]:
    made: list[AgentHome] = []
    (tmp_path / "logs").mkdir(exist_ok=True)

    def factory(name: str, **config: str) -> AgentHome:
        agent = AgentHome(
            tmp_path / name,
            tmp_path / "logs",
            name,
            config={"server.reconnect_max": "1", "device.name": name, **config},
        )
        made.append(agent)
        return agent

    try:
        yield factory  # type: ignore[misc]
    finally:
        for agent in made:
            agent.stop()


@pytest.fixture
def pair(server: Server, make_agent) -> Iterator[tuple[AgentHome, AgentHome]]:  # type: ignore[no-untyped-def]
    """Two agents of one user, both up: `sender` and `receiver`."""
    server.add_user("ann")
    sender: AgentHome = make_agent("sender")
    receiver: AgentHome = make_agent("receiver")
    sender.login(server, server.join_code("ann"))
    receiver.login(server, server.join_code("ann"))
    sender.up()
    receiver.up()
    wait_until(lambda: "receiver" in sender.online(), 5, "receiver online")
    yield sender, receiver
