from __future__ import annotations

from collections.abc import Iterator

import pytest

from .harness import AgentHome, Server, wait_until


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
