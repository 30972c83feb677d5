"""Tunnels through real agents and the real server (issue 16): `meshagent forward` on one device,
`meshagent expose` on another, a real TCP echo service behind it.

One server and one set of devices serve the whole module (module-scoped): ann's `laptop`
forwards to ann's `box`; `dave` is a member of ann's room `team`, `carol` only a viewer there,
and `bob` shares no room with ann at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshagent_gui.config import KEYS, Config, Paths, parse_value
from meshagent_gui.context import Context
from meshagent_gui.core.mesh.enroll import mesh_client, require_enrollment
from meshagent_gui.core.mesh.types import API_PREFIX
from meshagent_gui.core.p2p.peers import BLOCK_DIRECT_ENV
from tests.integration.harness import (
    AgentHome,
    Process,
    Server,
    Tmux,
    free_port,
    meshagent_cmd,
    wait_until,
)

TIMEOUT = 30.0


class EchoHandler(socketserver.BaseRequestHandler):
    """Echo until EOF, then close; a first line ``count`` answers the byte count after EOF."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        with contextlib.suppress(OSError):
            first = _read_exactly(sock, 6)
            if first == b"count\n":
                total = 0
                while chunk := sock.recv(65536):
                    total += len(chunk)
                sock.sendall(f"got {total}\n".encode())
                return
            sock.sendall(first)
            while chunk := sock.recv(65536):
                sock.sendall(chunk)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size and (chunk := sock.recv(size - len(data))):
        data += chunk
    return data


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@dataclass
class Mesh:
    server: Server
    laptop: AgentHome
    box: AgentHome
    echo_port: int
    forward_port: int
    forward: Process
    tmp: Path

    def connect(self, port: int | None = None) -> socket.socket:
        return socket.create_connection(("127.0.0.1", port or self.forward_port), timeout=TIMEOUT)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("tunnel")
    logs = tmp / "logs"
    logs.mkdir()
    echo = EchoServer(("127.0.0.1", 0), EchoHandler)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    echo_port = echo.server_address[1]
    server = Server(tmp / "server", logs).start()
    agents: list[AgentHome] = []
    processes: list[Process] = []
    try:
        for user in ("ann", "bob", "carol", "dave"):
            server.add_user(user)

        def agent(name: str, user: str, **config: str) -> AgentHome:
            home = AgentHome(tmp / name, logs, name)
            # Written here, not by `config set` per key: a process start each saved.
            settings = Config.load(Paths.resolve(home.home).config_file)
            for key, value in {"server.reconnect_max": "1", **config}.items():
                settings.set(key, parse_value(KEYS[key], value))
            settings.save()
            home.login(server, server.join_code(user))
            agents.append(home)
            return home

        laptop = agent("laptop", "ann")
        box = agent("box", "ann", **{"tunnel.max_connections": "8"})
        carol, dave = agent("carol", "carol"), agent("dave", "dave")
        laptop.ok("rooms", "create", "team")
        laptop.ok("rooms", "invite", "team", "carol", "--role", "viewer")
        laptop.ok("rooms", "invite", "team", "dave", "--role", "member")
        carol.ok("rooms", "accept", "team")
        dave.ok("rooms", "accept", "team")
        agent("stranger", "bob")
        laptop.up()
        box.up()
        wait_until(lambda: "box" in laptop.online(), 10, "box online")
        box.ok("expose", f"127.0.0.1:{echo_port}")
        box.ok("expose", f"127.0.0.1:{echo_port}", "--to", "team")
        forward, port = start_forward(laptop, f"box:127.0.0.1:{echo_port}")
        processes.append(forward)
        yield Mesh(server, laptop, box, echo_port, port, forward, tmp)
    finally:
        for process in processes:
            process.stop()
        for home in agents:
            home.stop()
        server.stop()
        echo.shutdown()
        echo.server_close()


def start_forward(home: AgentHome, remote: str, local: str = "0") -> tuple[Process, int]:
    process = Process(
        ["--home", str(home.home), "--json", "forward", local, remote],
        home.logs / f"{home.name}-forward-{os.getpid()}-{free_port()}.log",
        env=home.env,
    )
    line = process.read_line(r'(\{"event": "listening".*\})', timeout=TIMEOUT).group(1)
    return process, int(json.loads(line)["port"])


def exchange(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` then our FIN, while reading everything until the far end's FIN."""
    received = bytearray()

    def reader() -> None:
        with contextlib.suppress(OSError):
            while chunk := sock.recv(1 << 20):
                received.extend(chunk)

    thread = threading.Thread(target=reader)
    thread.start()
    view = memoryview(payload)
    for offset in range(0, len(view), 1 << 20):
        sock.sendall(view[offset : offset + (1 << 20)])
    sock.shutdown(socket.SHUT_WR)
    thread.join(TIMEOUT * 4)
    assert not thread.is_alive()
    return bytes(received)


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def forward_events(process: Process, kind: str, count: int = 1) -> list[dict[str, Any]]:
    """Wait for ``count`` events of ``kind`` in the forward's --json output, return them all."""
    seen: list[dict[str, Any]] = []

    def more() -> bool:
        with contextlib.suppress(AssertionError):
            line = process.read_line(rf'(\{{"event": "{kind}".*\}})', timeout=1).group(1)
            seen.append(json.loads(line))
        return len(seen) >= count

    wait_until(more, TIMEOUT, f"{count} {kind} event(s)")
    return seen


# ---------------------------------------------------------------- data


def test_bulk_data_both_ways_arrives_whole(mesh: Mesh) -> None:
    payload = os.urandom(32 * 1024 * 1024)
    with mesh.connect() as sock:
        back = exchange(sock, payload)
    assert len(back) == len(payload)
    assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()


def test_half_close_ends_the_request_and_the_answer_still_comes(mesh: Mesh) -> None:
    with mesh.connect() as sock:
        assert exchange(sock, b"count\n" + b"x" * 300_000) == b"got 300000\n"


def test_many_concurrent_connections_each_get_their_own_bytes(mesh: Mesh) -> None:
    def one(number: int) -> bool:
        with mesh.connect() as sock:
            data = number.to_bytes(4, "big") * 50_000
            return exchange(sock, data) == data

    # Six at a time: box takes 8 of laptop's connections at once (tunnel.max_connections).
    with ThreadPoolExecutor(6) as pool:
        assert all(pool.map(one, range(36)))


def test_connections_after_the_first_ride_a_ticket_not_the_server(mesh: Mesh) -> None:
    def tunnel_grants() -> int:
        out = mesh.laptop.ok("--json", "rooms", "audit", "@ann", "--limit", "500")
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        return sum(
            e["kind"] == "capability.granted" and e["detail"]["scope"] == "tunnel:connect"
            for e in entries
        )

    with mesh.connect() as sock:  # a ticket from this one, if there was none
        assert exchange(sock, b"first\n") == b"first\n"
    before = tunnel_grants()
    for number in range(10):
        with mesh.connect() as sock:
            assert exchange(sock, b"%d\n" % number) == b"%d\n" % number
    assert tunnel_grants() - before <= 2  # the token pool's refill at most, not one each


def test_tunnel_list_shows_the_forward(mesh: Mesh) -> None:
    rows = [json.loads(line) for line in mesh.laptop.ok("tunnel", "list", "--json").splitlines()]
    [forward] = [r for r in rows if r["kind"] == "forward"]
    assert forward["device"] == "box"
    assert forward["target"] == f"127.0.0.1:{mesh.echo_port}"
    assert forward["listen"].endswith(f":{mesh.forward_port}")
    exposed = mesh.box.ok("expose").splitlines()
    assert f"127.0.0.1:{mesh.echo_port}  your own devices" in exposed
    assert f"127.0.0.1:{mesh.echo_port}  room team" in exposed
    doctor = {c["name"]: c for c in map(json.loads, mesh.box.ok("doctor", "--json").splitlines())}
    assert f"127.0.0.1:{mesh.echo_port} (room team)" in doctor["tunnels"]["detail"]
    assert doctor["terminal open"]["detail"] == "off (terminal.allow_open)"


# ---------------------------------------------------------------- refusals


def test_a_target_that_refuses_resets_the_client_with_a_clear_event(mesh: Mesh) -> None:
    closed = free_port()
    mesh.box.ok("expose", f"127.0.0.1:{closed}")
    process, port = start_forward(mesh.laptop, f"box:127.0.0.1:{closed}")
    try:
        with mesh.connect(port) as sock:
            assert read_until_closed(sock) == b""
        [refused] = forward_events(process, "refused")
        assert refused["reason"] == "target_refused"
        assert (
            refused["message"] == f"box could not connect to 127.0.0.1:{closed}: connection refused"
        )
    finally:
        process.stop()
        mesh.box.ok("expose", f"127.0.0.1:{closed}", "--off")


def test_a_port_that_is_not_exposed_is_refused_with_a_clear_event(mesh: Mesh) -> None:
    process, port = start_forward(mesh.laptop, "box:22")
    try:
        with mesh.connect(port) as sock:
            assert read_until_closed(sock) == b""
        [refused] = forward_events(process, "refused")
        assert refused["reason"] == "not_exposed"
        assert refused["message"] == (
            "box does not expose localhost:22 to this device (on it: meshagent expose 22)"
        )
    finally:
        process.stop()


def test_a_stranger_cannot_even_name_the_device(mesh: Mesh) -> None:
    stranger = AgentHome(mesh.tmp / "stranger", mesh.tmp / "logs", "stranger")
    done = stranger.cli("forward", "0", f"box:127.0.0.1:{mesh.echo_port}")
    assert done.returncode != 0
    assert done.stderr.strip() == (
        "meshagent: no device 'box' shares a room with this one (see meshagent devices)"
    )


def test_a_room_member_without_the_role_is_refused_and_one_with_it_gets_through(
    mesh: Mesh,
) -> None:
    carol = AgentHome(mesh.tmp / "carol", mesh.tmp / "logs", "carol")
    done = carol.cli("forward", "0", f"box:127.0.0.1:{mesh.echo_port}")
    assert done.returncode != 0
    assert done.stderr.strip() == (
        "meshagent: you may not open tunnels to box: no room you share with it gives you"
        " tunnel:connect"
    )
    dave = AgentHome(mesh.tmp / "dave", mesh.tmp / "logs", "dave")
    process, port = start_forward(dave, f"box:127.0.0.1:{mesh.echo_port}")
    try:
        with mesh.connect(port) as sock:
            assert exchange(sock, b"member of team\n") == b"member of team\n"
        mesh.box.ok("expose", f"127.0.0.1:{mesh.echo_port}", "--off")  # every rule for it
        with mesh.connect(port) as sock:
            assert read_until_closed(sock) == b""
        assert forward_events(process, "refused")[0]["reason"] == "not_exposed"
    finally:
        process.stop()
        mesh.box.ok("expose", f"127.0.0.1:{mesh.echo_port}")
        mesh.box.ok("expose", f"127.0.0.1:{mesh.echo_port}", "--to", "team")


def test_a_flood_of_connections_gets_the_budget_and_the_rest_are_reset(mesh: Mesh) -> None:
    held = [mesh.connect() for _ in range(30)]
    try:
        for sock in held:
            # One over the budget may be reset before we even write: that is its answer too.
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                sock.sendall(b"flood\n")
        answers = []
        for sock in held:
            sock.settimeout(TIMEOUT)
            answers.append(_recv_or_reset(sock))
        assert answers.count(b"flood\n") == 8  # box's tunnel.max_connections
        assert answers.count(b"") == 22
    finally:
        for sock in held:
            sock.close()

    def echoes() -> bool:
        with contextlib.suppress(OSError), mesh.connect() as sock:
            return exchange(sock, b"after the flood\n") == b"after the flood\n"
        return False

    wait_until(echoes, TIMEOUT, "the budget's places back")  # as the closes reach box


def _recv_or_reset(sock: socket.socket) -> bytes:
    try:
        return _read_exactly(sock, 6)
    except ConnectionResetError:
        return b""


# ---------------------------------------------------------------- the peer goes away


def test_the_peer_stopping_ends_open_connections_and_the_forward_reaches_it_again(
    mesh: Mesh,
) -> None:
    with mesh.connect() as sock:
        sock.sendall(b"before\n")
        assert _read_exactly(sock, 7) == b"before\n"
        mesh.box.stop(signal.SIGTERM)
        assert read_until_closed(sock) == b""  # reset or closed, never hanging
    mesh.box.up()
    wait_until(lambda: "box" in mesh.laptop.online(), TIMEOUT, "box back online")
    with mesh.connect() as sock:
        assert exchange(sock, b"after restart\n") == b"after restart\n"


def test_a_peer_killed_outright_is_redialled_for_new_connections(mesh: Mesh) -> None:
    assert mesh.box.process is not None
    mesh.box.stop(signal.SIGKILL)
    mesh.box.up()
    wait_until(lambda: "box" in mesh.laptop.online(), TIMEOUT, "box back online")
    with mesh.connect() as sock:
        assert exchange(sock, b"after a kill\n") == b"after a kill\n"


def test_a_forward_works_through_the_relay_when_the_direct_path_is_blocked(mesh: Mesh) -> None:
    # The loopback stand-in for a firewall dropping UDP between the devices (as test_p2p does):
    # box answers offers with no candidates, so the laptop reaches it through the server's relay.
    block = mesh.tmp / "block-direct"
    block.touch()
    mesh.box.env = {**mesh.box.env, BLOCK_DIRECT_ENV: str(block)}
    try:
        mesh.box.stop()
        mesh.box.up()
        wait_until(lambda: "box" in mesh.laptop.online(), TIMEOUT, "box back online")
        payload = os.urandom(2 * 1024 * 1024)
        with mesh.connect() as sock:
            assert hashlib.sha256(exchange(sock, payload)).digest() == (
                hashlib.sha256(payload).digest()
            )
        assert peer_path(mesh.laptop) == "relay"
    finally:
        block.unlink()  # later tests may go direct again (the upgrade is the p2p tests' job)


def peer_path(agent: AgentHome) -> str | None:
    """The path `doctor` reports for the (one) peer agent is connected to."""
    for check in map(json.loads, agent.cli("doctor", "--json").stdout.splitlines()):
        if check["name"].startswith("peer "):
            return str(check["detail"].split()[0])
    return None


# ---------------------------------------------------------------- terminal open


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_terminal_open_gives_a_shell_on_an_own_device_only_where_it_allows_it(
    mesh: Mesh,
) -> None:
    refused = mesh.laptop.cli("terminal", "open", "box")
    assert refused.returncode != 0
    assert refused.stderr.strip() == (
        "meshagent: box refused the terminal: it does not allow opening a shell"
        " (on it: meshagent config set terminal.allow_open own)"
    ), (refused.stdout, refused.stderr)
    mesh.box.ok("config", "set", "terminal.allow_open", "own")
    consoles = Tmux(mesh.tmp / "tmux.sock")
    try:
        consoles.start(
            "opener",
            meshagent_cmd("--home", str(mesh.laptop.home), "terminal", "open", "box"),
            env={"PS1": "prompt> "},
        )
        consoles.type("opener", "echo opened-$((6*7)) on $0", enter=True)
        consoles.wait_for("opener", "opened-42 on", timeout=TIMEOUT)
        consoles.type("opener", "exit", enter=True)
        consoles.wait_for("opener", "[exited", timeout=TIMEOUT)
    finally:
        consoles.kill()
        mesh.box.ok("config", "set", "terminal.allow_open", "off")


def test_terminal_open_is_never_granted_toward_another_users_device(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    dave = AgentHome(mesh.tmp / "dave", mesh.tmp / "logs", "dave")
    done = dave.cli("terminal", "open", "box")
    assert done.returncode != 0
    assert done.stderr.strip() == "meshagent: box is not one of your devices"
    # Asked of the server directly: dave is a member of ann's room, and still no.
    monkeypatch.setenv("MESHAGENT_SECRET_STORE", "file")
    token = mesh_client(Context.open(dave.home)).access_token
    box_id = require_enrollment(Context.open(mesh.box.home)).device_id
    for room in (None, "team"):
        body: dict[str, Any] = {"aud": box_id, "scope": "terminal:open"}
        if room:
            body["room"] = room
        answer = httpx.post(
            mesh.server.url + API_PREFIX + "/capabilities",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert (answer.status_code, answer.json()["error"]) == (403, "not_allowed")


# ---------------------------------------------------------------- a real service: sshd


@pytest.mark.skipif(
    shutil.which("ssh") is None or not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists()),
    reason="needs openssh-server and openssh-client",
)
def test_ssh_logs_in_through_the_tunnel(mesh: Mesh) -> None:
    from tests.benchmarks._transfer_support import Sshd

    with Sshd.run(mesh.tmp / "sshd") as sshd:
        mesh.box.ok("expose", f"127.0.0.1:{sshd.port}")
        process, port = start_forward(mesh.laptop, f"box:127.0.0.1:{sshd.port}")
        try:
            user = os.environ.get("USER") or "root"
            done = subprocess.run(
                [
                    "ssh",
                    *sshd.ssh_options(),
                    "-p",
                    str(port),
                    f"{user}@127.0.0.1",
                    "echo in-$((6*7))",
                ],
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                check=False,
            )
            assert (done.returncode, done.stdout.strip()) == (0, "in-42"), done.stderr
        finally:
            process.stop()
            mesh.box.ok("expose", f"127.0.0.1:{sshd.port}", "--off")
