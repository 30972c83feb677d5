"""Issue 3 acceptance on loopback: real agents, real QUIC, the server's relay as fallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .harness import AgentHome, Server, wait_until


def ping(agent: AgentHome, device: str, count: int = 2) -> list[dict[str, object]]:
    out = agent.ok("ping", device, "--count", str(count), "--json")
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize("engine", ["qh3", "aioquic"])
def test_direct_then_relay_then_upgrade(
    server: Server, make_agent, tmp_path: Path, engine: str
) -> None:  # type: ignore[no-untyped-def]
    block = tmp_path / "block-direct"
    env = {"MESHAGENT_TEST_BLOCK_DIRECT": str(block), "MESHAGENT_QUIC_ENGINE": engine}
    server.add_user("ann")
    laptop: AgentHome = make_agent("laptop", **{"p2p.upgrade_interval": "1"})
    desktop: AgentHome = make_agent("desktop")
    laptop.env = desktop.env = env
    laptop.login(server, server.join_code("ann"))
    desktop.login(server, server.join_code("ann"))
    laptop.up()
    desktop.up()
    wait_until(lambda: "desktop" in laptop.online(), 5, "desktop online")

    tries = ping(laptop, "desktop")
    assert [t["path"] for t in tries] == ["direct", "direct"]
    assert engine in laptop.ok("doctor")
    assert all(float(t["rtt_ms"]) < 1000 for t in tries)  # type: ignore[arg-type]

    # Direct UDP "blocked": a fresh connection goes through the relay and still carries data.
    block.touch()
    desktop.stop()
    desktop.up()
    wait_until(lambda: "desktop" in laptop.online(), 5, "desktop back")
    assert {t["path"] for t in ping(laptop, "desktop")} == {"relay"}

    # Lift the block: the relayed connection upgrades to direct by itself.
    block.unlink()
    wait_until(lambda: _path(laptop) == "direct", 20, "upgrade to a direct path")
    assert {t["path"] for t in ping(laptop, "desktop")} == {"direct"}


def _path(agent: AgentHome) -> str | None:
    """The path doctor reports for the (one) peer."""
    done = agent.cli("doctor", "--json")
    for check in map(json.loads, done.stdout.splitlines()):
        if check["name"].startswith("peer "):
            return str(check["detail"].split()[0])
    return None
