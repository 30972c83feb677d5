"""A server that announces a newer agent release: the agent says so, in one line (issue 19).

A real server started with `--agent-version` and a real agent: GET /info carries the version,
and the agent, once connected, logs that a newer release exists. No self-update happens. The
comparison's garbage cases (a non-version, an overlong string, an older or equal release) are
unit-tested in tests/unit/test_packaging_version.py.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshagent_gui import __version__
from meshagent_gui.core.mesh.types import API_PREFIX
from tests.integration.harness import AgentHome, Server, wait_until

NEWER = "99.0.0"


@pytest.fixture
def announcing_server(tmp_path: Path) -> Iterator[Server]:
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    running = Server(tmp_path / "server", logs, extra_args=["--agent-version", NEWER]).start()
    try:
        yield running
    finally:
        running.stop()


def test_agent_says_once_that_the_server_announces_a_newer_release(
    announcing_server: Server, make_agent: Callable[..., AgentHome]
) -> None:
    with urllib.request.urlopen(announcing_server.url + API_PREFIX + "/info") as response:
        assert json.load(response)["agent_version"] == NEWER

    announcing_server.add_user("alice")
    agent = make_agent("laptop")
    agent.login(announcing_server, announcing_server.join_code("alice"))
    agent.up()
    assert agent.process is not None
    log_path = agent.process.log_path
    notice = f"Mesh Agent {NEWER} is available (this is {__version__})"
    wait_until(lambda: notice in log_path.read_text(errors="replace"), 30, "the update notice")
    agent.stop()
    log = log_path.read_text(errors="replace")
    assert log.count(notice) == 1
    assert "Traceback" not in log
