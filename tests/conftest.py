"""Fixtures for every test that runs real processes: the reference server and agent homes
(the integration tests, and the GUI tests that put the app among real agents)."""

from __future__ import annotations

import compileall
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import meshagent_gui
from tests.integration.harness import AgentHome, Server, agent_homes


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
    with agent_homes(tmp_path) as factory:
        yield factory  # type: ignore[misc]
