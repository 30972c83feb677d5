"""Fixtures for every test that runs real processes: the reference server and agent homes
(the integration tests, and the GUI tests that put the app among real agents)."""

from __future__ import annotations

import compileall
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import meshagent_gui
from tests.integration.harness import AgentHome, Server


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compile the package's bytecode once: the tests start hundreds of agents, servers and CLI
    commands, and where PYTHONDONTWRITEBYTECODE is set (as on this project's CI machines) each
    of them would otherwise compile every module from source again (about 40 % of its start)."""
    if sys.dont_write_bytecode:
        compileall.compile_dir(Path(meshagent_gui.__file__).parent, quiet=1, workers=0)


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
