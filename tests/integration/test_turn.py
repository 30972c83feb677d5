"""TURN as the deployment's relay (issue 18): a real coturn (``use-auth-secret``) next to a real
server that advertises it in ``GET /info`` and mints short-lived credentials for its devices.

What a device gets must open a TURN allocation that relays packets; what anybody else can
make up must not: no token, a guessed password, a credential past its expiry, another
secret's. A flood of credential requests is cut off per device.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from aioice import stun
from aioice.stun import TransactionFailed
from aioice.turn import create_turn_endpoint

from meshagent_gui import identity
from meshagent_gui.context import Context
from meshagent_gui.core.mesh.enroll import mesh_client
from meshagent_gui.core.mesh.types import API_PREFIX, TurnCredentials
from meshagent_gui.core.p2p import Endpoint
from meshagent_gui.core.p2p.endpoint import relay_address
from meshagent_gui.core.p2p.relay import TurnRelay, TurnStats
from meshagent_gui.core.p2p.webrtc import new_peer_connection, rtc_certificate
from meshagent_gui.server.turn import ISSUE_BURST, TurnConfig
from tests.integration import test_browser_peers as browser_peers
from tests.integration.harness import AgentHome, Process, Server, cleanup, wait_until
from tests.integration.test_browser_peers import Page, start

LOOPBACK = "127.0.0.1"


@dataclass
class Coturn:
    """A throwaway coturn on loopback: UDP only, REST credentials, its own files and ports."""

    process: subprocess.Popen[bytes]
    port: int
    secret: bytes
    log: Path

    @property
    def url(self) -> str:
        return f"turn:{LOOPBACK}:{self.port}"

    @classmethod
    @contextlib.contextmanager
    def run(cls, workdir: Path, secret: bytes | None = None) -> Iterator[Coturn]:
        workdir.mkdir(parents=True, exist_ok=True)
        secret = secret or secrets.token_hex(16).encode()
        port = _free_udp_port()
        log = workdir / "turn.log"
        process = subprocess.Popen(
            [
                shutil.which("turnserver") or "turnserver",
                "-n",  # no configuration file: everything is on this line
                f"--listening-ip={LOOPBACK}",
                f"--listening-port={port}",
                f"--relay-ip={LOOPBACK}",
                "--use-auth-secret",
                f"--static-auth-secret={secret.decode()}",
                "--realm=mesh",
                "--no-tls",
                "--no-dtls",
                "--no-tcp",
                "--no-cli",
                "--allow-loopback-peers",  # the lab's peers are on loopback
                f"--userdb={workdir / 'turndb'}",
                f"--pidfile={workdir / 'turn.pid'}",
                f"--log-file={log}",
                "--simple-log",
                "--verbose",  # session usage lines (rb=, sb=): what went through it
                "--no-software-attribute",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(lambda: _answers_stun(port), 10, "coturn answering STUN")
            yield cls(process, port, secret, log)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _answers_stun(port: int) -> bool:
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(0.2)
        probe.sendto(bytes(request), (LOOPBACK, port))
        try:
            return stun.parse_message(probe.recv(2048)).transaction_id == request.transaction_id
        except (TimeoutError, ConnectionRefusedError, ValueError):
            return False


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


class _Inbox(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait((data, addr))


async def relay_round_trip(turn: Coturn, username: str, password: str) -> bytes:
    """Allocate with these credentials, send a datagram through the relay to a plain UDP socket
    and back; what came back (raises TransactionFailed when coturn refuses)."""
    loop = asyncio.get_running_loop()
    relayed, inbox = await asyncio.wait_for(
        create_turn_endpoint(_Inbox, (LOOPBACK, turn.port), username, password), 15
    )
    peer_transport, peer = await loop.create_datagram_endpoint(_Inbox, local_addr=(LOOPBACK, 0))
    try:
        relayed.sendto(b"through the relay", peer_transport.get_extra_info("sockname"))
        data, relayed_from = await asyncio.wait_for(peer.received.get(), 10)
        assert relayed_from == relayed.get_extra_info("sockname")  # the relayed address
        peer_transport.sendto(b"and back: " + data, relayed_from)
        answer, _ = await asyncio.wait_for(inbox.received.get(), 10)
        return answer
    finally:
        peer_transport.close()
        relayed.close()


@pytest.fixture(scope="module")
def turn_lab(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Coturn, Server, httpx.Client]]:
    """coturn, a server configured for it, and one enrolled device's signed-in REST client."""
    if shutil.which("turnserver") is None:
        pytest.skip("needs coturn (apt-get install coturn)")
    root = tmp_path_factory.mktemp("turn")
    logs = root / "logs"
    logs.mkdir()
    with Coturn.run(root / "coturn") as turn:
        secret_file = root / "turn-secret"
        secret_file.write_bytes(turn.secret + b"\n")  # surrounding whitespace is not the secret
        server = Server(
            root / "server",
            logs,
            extra_args=["--turn-url", turn.url, "--turn-secret-file", str(secret_file)],
        ).start()
        mp = pytest.MonkeyPatch()
        mp.setenv("MESHAGENT_SECRET_STORE", "file")  # read the home's token in-process
        agent = AgentHome(root / "ann", logs, "ann", config={"device.name": "ann"})
        try:
            server.add_user("ann")
            agent.login(server, server.join_code("ann"))
            token = mesh_client(Context.open(agent.home)).access_token
            assert token is not None
            with httpx.Client(
                base_url=server.url + API_PREFIX,
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            ) as http:
                yield turn, server, http
        finally:
            mp.undo()
            server.stop()


def test_info_advertises_the_turn_urls_but_not_the_secret(turn_lab: Any) -> None:
    turn, server, _ = turn_lab
    info = httpx.get(server.url + API_PREFIX + "/info", timeout=10).json()
    assert info["turn_urls"] == [turn.url]
    assert turn.secret.decode() not in str(info)


def test_a_device_gets_short_lived_credentials_that_relay(turn_lab: Any) -> None:
    turn, _, http = turn_lab
    response = http.post("/turn/credentials")
    assert response.status_code == 200, response.text
    issued = response.json()
    assert issued["urls"] == [turn.url]
    assert 0 < issued["expires_at"] - time.time() <= 600 + 5
    expiry, device_id = issued["username"].split(":")
    assert int(expiry) == issued["expires_at"] and len(device_id) == 64
    answer = asyncio.run(relay_round_trip(turn, issued["username"], issued["password"]))
    assert answer == b"and back: through the relay"


def test_a_stranger_gets_no_credentials(turn_lab: Any) -> None:
    _, server, _ = turn_lab
    url = server.url + API_PREFIX + "/turn/credentials"
    assert httpx.post(url, timeout=10).status_code == 401
    forged = {"Authorization": "Bearer not-a-token"}
    assert httpx.post(url, headers=forged, timeout=10).status_code == 401


def test_coturn_refuses_made_up_expired_and_foreign_credentials(turn_lab: Any) -> None:
    turn, _, http = turn_lab
    issued = http.post("/turn/credentials").json()
    device_id = issued["username"].split(":")[1]
    ours = TurnConfig((turn.url,), turn.secret)
    expired = ours.mint(device_id, time.time() - ours.ttl - 60)
    foreign = TurnConfig((turn.url,), b"another deployment's secret").mint(device_id, time.time())
    attempts = [
        (issued["username"], "guessed password"),
        (expired.username, expired.password),  # minted right, but past its expiry
        (foreign.username, foreign.password),
        (f"{int(time.time()) + 10**6}:{device_id}", issued["password"]),  # expiry moved on
    ]
    for username, password in attempts:
        with pytest.raises(TransactionFailed) as refused:
            asyncio.run(relay_round_trip(turn, username, password))
        assert "401" in str(refused.value)


def test_a_flood_of_credential_requests_is_cut_off(turn_lab: Any) -> None:
    _, _, http = turn_lab
    codes = [http.post("/turn/credentials").status_code for _ in range(int(ISSUE_BURST) + 5)]
    assert 429 in codes
    assert set(codes) <= {200, 429}


def test_a_server_without_turn_says_so(server: Server, tmp_path: Path) -> None:
    info = httpx.get(server.url + API_PREFIX + "/info", timeout=10).json()
    assert info["turn_urls"] == []
    bad = Server(tmp_path / "bad", server.logs, extra_args=["--turn-url", "turn:x:3478"])
    with pytest.raises(Exception, match="turn-secret-file"):
        bad.start()
    bad.stop()


# ---------------------------------------------------------------------------- QUIC over TURN


async def quic_through_turn(turn: Coturn, payload: bytes) -> tuple[bytes, TurnStats, TurnStats]:
    """Two endpoints that know each other only by relay address, each with a TURN allocation:
    a QUIC stream from one to the other; what arrived, and both sides' TURN counters."""
    listener_id, dialer_id = identity.generate("listener"), identity.generate("dialer")
    listener, dialer = Endpoint(listener_id), Endpoint(dialer_id)
    config = TurnConfig((turn.url,), turn.secret)
    async with contextlib.AsyncExitStack() as stack:
        relays = {}
        for me, endpoint in ((listener_id, listener), (dialer_id, dialer)):
            await endpoint.start(LOOPBACK, 0)
            stack.push_async_callback(endpoint.close)
            relay = TurnRelay(endpoint)
            issued = config.mint(me.device_id, time.time())
            await relay.open((LOOPBACK, turn.port), issued.username, issued.password)
            stack.push_async_callback(relay.close)
            endpoint.set_relay(relay.send_or_drop)
            relays[me.device_id] = relay
        for me, other in ((listener_id, dialer_id), (dialer_id, listener_id)):
            relayed = relays[other.device_id].relayed_address
            assert relayed is not None
            relays[me.device_id].add_peer(other.device_id, relayed)

        async def receive() -> bytes:
            conn = await listener.accept()
            stream = await conn.accept_stream()
            data = b""
            while chunk := await stream.read(1 << 16):
                data += chunk
            return data

        receiving = asyncio.create_task(receive())
        conn = await dialer.connect(
            relay_address(listener_id.device_id), listener_id.device_id, timeout=15
        )
        stream = await conn.open_stream()
        await stream.write(payload)
        await stream.close()
        received = await asyncio.wait_for(receiving, 30)
        conn.close()
        return received, relays[dialer_id.device_id].stats, relays[listener_id.device_id].stats


def test_quic_runs_through_turn_allocations(turn_lab: Any) -> None:
    turn, _, _ = turn_lab
    payload = os.urandom(1 << 20)
    received, dialer, listener = asyncio.run(quic_through_turn(turn, payload))
    assert received == payload
    assert dialer.bytes_out > len(payload) and listener.bytes_in > len(payload)
    # No unknown_sources == 0 here: coturn reuses relayed ports, so a straggler for an earlier
    # test's allocation may arrive; it is counted and dropped before QUIC, which the stranger
    # test below checks.


async def _stranger_sends_to(turn: Coturn) -> TurnStats:
    """Someone who learnt our relayed address but is no peer of ours sends to it."""
    me = identity.generate("me")
    endpoint = Endpoint(me)
    await endpoint.start(LOOPBACK, 0)
    relay = TurnRelay(endpoint)
    try:
        issued = TurnConfig((turn.url,), turn.secret).mint(me.device_id, time.time())
        relayed = await relay.open((LOOPBACK, turn.port), issued.username, issued.password)
        peer = await asyncio.get_running_loop().create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=(LOOPBACK, 0)
        )
        stranger = peer[0]
        # a peer of ours on the same IP opens the permission; the stranger's port is not it
        relay.add_peer("ab" * 32, (LOOPBACK, 9))
        # Until coturn installed the permission it drops the stranger's packets: keep sending
        # until some got through to us (no fixed sleep: a loaded machine may take longer).
        async with asyncio.timeout(30):
            while relay.stats.unknown_sources == 0:
                for _ in range(20):
                    stranger.sendto(b"\xc0garbage", relayed)
                await asyncio.sleep(0.05)
        stranger.close()
        return relay.stats
    finally:
        await relay.close()
        await endpoint.close()


def test_a_stranger_flooding_a_relayed_address_reaches_no_connection(turn_lab: Any) -> None:
    turn, _, _ = turn_lab
    stats = asyncio.run(_stranger_sends_to(turn))
    assert stats.unknown_sources > 0  # coturn let them in (same IP as a peer): we dropped them
    assert stats.datagrams_in == 0  # nothing reached the endpoint


# ---------------------------------------------------------------------------- WebRTC


async def _gathered_candidates(turn: TurnCredentials) -> str:
    """The SDP of an offer gathered with only this TURN server configured."""
    pc = new_peer_connection(rtc_certificate(identity.generate("browserish")), turn=turn)
    try:
        pc.createDataChannel("probe")
        await pc.setLocalDescription(await pc.createOffer())
        return str(pc.localDescription.sdp)
    finally:
        await pc.close()


def test_webrtc_gets_a_relayed_candidate_from_the_minted_credentials(turn_lab: Any) -> None:
    _, _, http = turn_lab
    issued = TurnCredentials.model_validate(http.post("/turn/credentials").json())
    assert " typ relay " in asyncio.run(_gathered_candidates(issued))
    stale = issued.model_copy(update={"password": "not the password"})
    assert " typ relay " not in asyncio.run(_gathered_candidates(stale))


# ---------------------------------------------------------------------------- agents over TURN


def _relay_totals(agent: AgentHome) -> tuple[int, int]:
    """Bytes the stopped agent sent through the server's relay and through TURN (its log)."""
    text = (agent.home / "state" / "meshagent.log").read_text()
    found = re.findall(r"relay totals: (\d+) bytes .*?, (\d+) through TURN", text)
    assert found, "the agent logged no relay totals"
    server, turn = found[-1]
    return int(server), int(turn)


def _coturn_received_bytes(turn: Coturn) -> int:
    """Bytes coturn received from its clients: the sum of its per-session usage lines (each
    the last second's counts; "peer usage" lines count the relayed side, left out)."""
    found = re.findall(r"session \d+: usage: .*?\brb=(\d+)", turn.log.read_text())
    return sum(map(int, found))


def test_agents_with_direct_blocked_transfer_through_coturn_not_the_server(
    turn_lab: Any, tmp_path: Path
) -> None:
    turn, server, _ = turn_lab
    block = tmp_path / "block-direct"
    block.touch()
    logs = tmp_path / "logs"
    logs.mkdir()
    agents = []
    for name, extra in (("tsender", {"p2p.upgrade_interval": "1"}), ("treceiver", {})):
        agent = AgentHome(
            tmp_path / name,
            logs,
            name,
            config={"server.reconnect_max": "1", "device.name": name, **extra},
        )
        agent.env = {"MESHAGENT_TEST_BLOCK_DIRECT": str(block)}
        agent.login(server, server.join_code("ann"))
        agents.append(agent)
    sender, receiver = agents
    with cleanup(*agents):
        sender.up()
        receiver.up()
        wait_until(lambda: "treceiver" in sender.online(), 10, "receiver online")

        def remote() -> str:
            out = sender.ok("ping", "treceiver", "--count", "1", "--json")
            return str(json.loads(out.splitlines()[0]).get("remote", ""))

        # Both allocate once they are signed in; the next offer carries the relayed addresses.
        wait_until(lambda: remote() == "TURN relay", 30, "a path through TURN", every=0.5)
        through_turn = _coturn_received_bytes(turn)
        source = tmp_path / "payload.bin"
        source.write_bytes(os.urandom(8 << 20))
        out = sender.ok("send", str(source), "--to", "treceiver", "--json")
        [item] = [json.loads(line) for line in out.splitlines() if line.strip()]
        assert item["path"] == "relay"
        assert (receiver.home / "downloads" / "payload.bin").read_bytes() == source.read_bytes()
        sender.stop()
        receiver.stop()
    # The payload went through coturn (by its own count); the Mesh Server's relay carried
    # nothing of it (the agents' counts, logged as they stopped).
    wait_until(
        lambda: _coturn_received_bytes(turn) - through_turn > 8 << 20, 10, "coturn's usage lines"
    )
    via_server, via_turn = _relay_totals(sender)
    assert via_turn > 8 << 20 and via_server < 64 << 10
    assert _relay_totals(receiver)[0] < 64 << 10


# ---------------------------------------------------------------------------- a guest over TURN


async def test_a_share_link_guest_receives_through_the_agents_turn_candidate(
    turn_lab: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guest may not have TURN credentials; the agent may not use direct paths (ICE policy
    ``relay``): the agent's relayed candidate carries the whole session."""
    turn, server, _ = turn_lab
    # A browser checks every candidate it is given. The stand-in keeps the agent's same-host
    # rule, which drops a loopback candidate from a peer without host candidates: the lab's
    # coturn relays on loopback, so the stand-in is told it has no other address.
    monkeypatch.setattr(browser_peers, "own_addresses", frozenset)
    block = tmp_path / "block-direct"
    block.touch()
    logs = tmp_path / "logs"
    logs.mkdir()
    agent = AgentHome(
        tmp_path / "rdesk",
        logs,
        "rdesk",
        config={"server.reconnect_max": "1", "device.name": "rdesk"},
    )
    agent.env = {"MESHAGENT_TEST_BLOCK_DIRECT": str(block)}
    agent.login(server, server.join_code("ann"))
    payload = os.urandom(1 << 20)
    source = tmp_path / "relayed.bin"
    source.write_bytes(payload)
    page = Page(server, tmp_path / "guest")
    with cleanup(agent):
        agent.up()
        log = agent.home / "state" / "meshagent.log"
        await asyncio.to_thread(
            wait_until, lambda: "TURN allocation" in log.read_text(), 30, "the agent's allocation"
        )
        before = _coturn_received_bytes(turn)
        sending = Process(
            ["--home", str(agent.home), "send", str(source), "--link", "--ttl", "120"],
            logs / "send-link.log",
            env=agent.env,
        )
        try:
            url = (await asyncio.to_thread(sending.read_line, r"(http://\S+/s/\S+#\S+)")).group(1)
            claimed = await page.claim(url)
            async with httpx.AsyncClient(base_url=server.url + API_PREFIX) as http:
                guest = {"Authorization": f"Bearer {claimed.access_token}"}
                refused = await http.post("/turn/credentials", headers=guest)
                assert refused.status_code == 403 and "password" not in refused.text
            await start(page)
            assert await asyncio.to_thread(sending.proc.wait, 60) == 0
            assert (page.downloads / "relayed.bin").read_bytes() == payload
        finally:
            sending.stop()
            if page.task is not None:
                page.task.cancel()
                await asyncio.gather(page.task, return_exceptions=True)
            await page.aclose()
        agent.stop()
    await asyncio.to_thread(
        wait_until,
        lambda: _coturn_received_bytes(turn) - before > len(payload),
        10,
        "coturn's usage lines",
    )
