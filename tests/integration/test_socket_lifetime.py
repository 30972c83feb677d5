"""Issue 11 case 6 through the real server process: sockets die with their session.

Refresh-token reuse revokes a session (the token leaked: someone else exchanged it too). The
session's open ``/ws`` must close (4403) within seconds instead of going on receiving presence
and signals, and an agent whose session is gone must say, once, that it needs to enrol again.
Token expiry (4401 unless renewed in-band) is tested in-process on a fake clock:
tests/unit/server/test_hub_limits.py and tests/unit/core/mesh/test_link.py.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from meshagent_gui.core.mesh.authed_socket import ENROL_AGAIN
from meshagent_gui.core.mesh.client import ACCESS_SECRET, REFRESH_SECRET
from meshagent_gui.core.mesh.types import API_PREFIX

from .harness import AgentHome, Server, wait_until

WAIT = 15.0


def tokens(agent: AgentHome) -> tuple[str, str]:
    """(access, refresh) from the agent home's file secret store (tests use the file store)."""
    [path] = agent.home.rglob("secrets.json")
    stored = json.loads(path.read_text(encoding="utf-8"))
    return stored[ACCESS_SECRET], stored[REFRESH_SECRET]


def reuse_refresh_token(server: Server, refresh_token: str) -> None:
    """Exchange the token twice, as a thief and the device would: the second is a reuse."""
    url = server.url + API_PREFIX + "/token/refresh"
    first = httpx.post(url, json={"refresh_token": refresh_token}, timeout=WAIT)
    assert first.status_code == 200, first.text
    second = httpx.post(url, json={"refresh_token": refresh_token}, timeout=WAIT)
    assert second.status_code == 401, second.text


def agent_check(agent: AgentHome) -> str:
    """What ``meshagent doctor`` says about the running agent (its link and last error)."""
    checks = [json.loads(line) for line in agent.cli("doctor", "--json").stdout.splitlines()]
    return " ".join(c["detail"] for c in checks if c["name"] == "agent")


def frames_until_closed(ws: ClientConnection) -> tuple[list[dict[str, Any]], int | None]:
    """Everything the server still sends, and the close code it ends with."""
    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + WAIT
    try:
        while True:
            frames.append(json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic()))))
    except ConnectionClosed as exc:
        return frames, exc.rcvd.code if exc.rcvd else None


def test_refresh_token_reuse_closes_the_sessions_sockets(
    server: Server,
    make_agent,  # type: ignore[no-untyped-def]
) -> None:
    server.add_user("ann")
    watcher: AgentHome = make_agent("watcher")
    victim: AgentHome = make_agent("victim")
    spy: AgentHome = make_agent("spy")
    ids = {
        agent.name: agent.login(server, server.join_code("ann"))["device_id"]
        for agent in (watcher, victim, spy)
    }
    watcher.up()
    victim.up()
    wait_until(lambda: "victim" in watcher.online(), 10, "victim online for watcher")

    # A bare /ws held with the spy device's tokens: what a revoked session still gets.
    access, refresh = tokens(spy)
    ws_url = "ws" + server.url.removeprefix("http") + API_PREFIX + "/ws"
    with connect(ws_url, additional_headers={"Authorization": f"Bearer {access}"}) as ws:
        hello = json.loads(ws.recv(timeout=WAIT))
        assert set(hello["online"]) == {ids["watcher"], ids["victim"]}
        reuse_refresh_token(server, refresh)
        frames, code = frames_until_closed(ws)
    # 4403 within WAIT: the revocation closed it (the token itself expires only in an hour).
    assert code == 4403
    assert [f for f in frames if f["type"] in ("presence", "signal")] == []

    # A running agent whose session is revoked: offline for its peers, and it says why.
    reuse_refresh_token(server, tokens(victim)[1])
    wait_until(lambda: "victim" not in watcher.online(), 20, "victim offline after revocation")
    wait_until(lambda: ENROL_AGAIN in agent_check(victim), 20, "the agent to say: enrol again")
    assert victim.process is not None
    log_path = victim.process.log_path
    wait_until(lambda: ENROL_AGAIN in log_path.read_text(errors="replace"), 5, "the reason logged")
    time.sleep(3)  # a few more reconnect attempts (reconnect_max is 1 s in these tests)...
    assert log_path.read_text(errors="replace").count(ENROL_AGAIN) == 1  # ...said once
