"""Fixtures for every test that runs real processes: the reference server and agent homes
(the integration tests, and the GUI tests that put the app among real agents)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import AgentHome, Server


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
