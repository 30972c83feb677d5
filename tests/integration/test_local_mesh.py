"""`meshagent up --local`: the quick start's mesh, embedded in the agent, survives a restart."""

from __future__ import annotations

import pytest

from meshagent_gui.compose.local_mesh import lan_address

from .harness import AgentHome, free_port, wait_until


def test_local_mesh_enrols_others_and_restarts(make_agent) -> None:  # type: ignore[no-untyped-def]
    owner: AgentHome = make_agent("owner", **{"local.port": str(free_port())})
    for key, value in owner.config.items():
        owner.ok("config", "set", key, value)
    owner.process = owner.up_process("--local")
    started = owner.process.read_line(r'"server": "(\S+)", "join_code": "(\S+)"')
    url, code = started.group(1), started.group(2)

    guest: AgentHome = make_agent("guest")
    guest.ok("config", "set", "server.reconnect_max", "1")
    guest.ok("login", url, "--join-code", code, "--name", "guest")
    guest.up()
    wait_until(lambda: "guest" in owner.online(), 5, "guest online for the owner")
    assert guest.devices()[0]["user"] == owner.devices()[0]["user"]  # the owner's own devices

    # Restart the owner's agent: the embedded server comes back with the same data and port.
    owner.stop()
    wait_until(lambda: "owner" not in guest.online(), 10, "owner offline")
    owner.process = owner.up_process()
    owner.process.read_line(r'"event": "up"')
    wait_until(lambda: "owner" in guest.online(), 15, "guest reconnected to the restarted mesh")


@pytest.mark.parametrize("listen", ["0.0.0.0", "lan"])
def test_a_local_mesh_listening_on_the_network_gives_others_its_network_url(  # type: ignore[no-untyped-def]
    make_agent, listen: str
) -> None:
    """On every address, or on the network address alone (where loopback does not answer:
    the owner's own agent must use that address too)."""
    if lan_address() == "127.0.0.1":
        pytest.skip("this machine has no network address besides loopback")
    owner: AgentHome = make_agent("owner", **{"local.port": str(free_port())})
    for key, value in owner.config.items():
        owner.ok("config", "set", key, value)
    owner.ok("config", "set", "local.listen", lan_address() if listen == "lan" else listen)
    owner.process = owner.up_process("--local")
    started = owner.process.read_line(r'"server": "(\S+)", "join_code": "(\S+)"')
    url, code = started.group(1), started.group(2)
    assert url.startswith(f"http://{lan_address()}:")  # what another computer can reach

    guest: AgentHome = make_agent("guest")
    guest.ok("config", "set", "server.reconnect_max", "1")
    guest.ok("login", url, "--join-code", code, "--name", "guest")
    guest.up()
    wait_until(lambda: "guest" in owner.online(), 5, "guest online for the owner")
