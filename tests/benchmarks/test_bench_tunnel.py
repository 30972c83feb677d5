"""Tunnel throughput and latency (issue 16) against a direct TCP connection and `ssh -L`, same run.

Two real agents of one user on loopback (`box` exposes a port, `laptop` runs `meshagent
forward`), a target service in its own process, and a throwaway `sshd` with `ssh -N -L` to the
same target (aes128-gcm, the fastest cipher on this machine). Each round measures all three
paths back to back; medians over the rounds:

* bulk upload and download of 64 MiB on one connection (MB/s);
* connection setup: connect, one byte there and back (ms, median of 30 fresh connections);
* request/response: 100 bytes there and back on an open connection (us, p50 and p99 of 300).

Run: `.venv/bin/python -m pytest -m benchmark tests/benchmarks/test_bench_tunnel.py -s`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshagent_gui.config import KEYS, Config, Paths, parse_value
from tests.benchmarks._measure import print_uncaptured, write_report
from tests.benchmarks._transfer_support import LOOPBACK, Sshd, stop_process, wait_for_port
from tests.integration.harness import AgentHome, Process, Server, free_port, wait_until

pytestmark = pytest.mark.benchmark

BULK = 64 * 1024 * 1024
ROUNDS = 3
SETUPS = 30
ROUND_TRIPS = 300
PIECE = 1 << 20

# The target: 'U' upload (read to EOF, answer the count), 'D' + 8 bytes: download that many
# bytes, 'E' echo until EOF. In its own process, so it never shares a GIL with the client.
TARGET = r"""
import socket, socketserver, struct, sys
class H(socketserver.BaseRequestHandler):
    def handle(self):
        s = self.request
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        kind = s.recv(1)
        if kind == b"U":
            total = 0
            while chunk := s.recv(1 << 20):
                total += len(chunk)
            s.sendall(struct.pack("!Q", total))
        elif kind == b"D":
            head = b""
            while len(head) < 8:
                head += s.recv(8 - len(head))
            left, block = struct.unpack("!Q", head)[0], b"\0" * (1 << 20)
            while left:
                s.sendall(block[: min(left, len(block))])
                left -= min(left, len(block))
        elif kind == b"E":
            while chunk := s.recv(65536):
                s.sendall(chunk)
class S(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
server = S(("127.0.0.1", 0), H)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


@dataclass
class Paths3:
    direct: int
    tunnel: int
    ssh: int | None


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Paths3]:
    tmp = tmp_path_factory.mktemp("bench-tunnel")
    logs = tmp / "logs"
    logs.mkdir()
    target = subprocess.Popen(
        [sys.executable, "-c", TARGET], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert target.stdout is not None
    target_port = int(target.stdout.readline())
    target.stdout.close()
    server = Server(tmp / "server", logs).start()
    homes: list[AgentHome] = []
    with contextlib.ExitStack() as stack:
        stack.callback(stop_process, target)
        stack.callback(server.stop)
        server.add_user("ann")
        for name in ("laptop", "box"):
            home = AgentHome(tmp / name, logs, name)
            settings = Config.load(Paths.resolve(home.home).config_file)
            settings.set("server.reconnect_max", parse_value(KEYS["server.reconnect_max"], "1"))
            settings.save()
            home.login(server, server.join_code("ann"))
            home.up()
            stack.callback(home.stop)
            homes.append(home)
        laptop, box = homes
        wait_until(lambda: "box" in laptop.online(), 10, "box online")
        box.ok("expose", f"127.0.0.1:{target_port}")
        forward = Process(
            ["--home", str(laptop.home), "--json", "forward", "0", f"box:127.0.0.1:{target_port}"],
            logs / "forward.log",
        )
        stack.callback(forward.stop)
        line = forward.read_line(r'(\{"event": "listening".*\})').group(1)
        tunnel_port = int(json.loads(line)["port"])
        ssh_port = None
        if shutil.which("ssh") and (shutil.which("sshd") or Path("/usr/sbin/sshd").exists()):
            sshd = stack.enter_context(Sshd.run(tmp / "sshd"))
            ssh_port = free_port()
            user = os.environ.get("USER") or "root"
            ssh = subprocess.Popen(
                [
                    "ssh",
                    "-N",
                    *sshd.ssh_options(),
                    "-o",
                    "ExitOnForwardFailure=yes",
                    "-L",
                    f"{ssh_port}:127.0.0.1:{target_port}",
                    "-p",
                    str(sshd.port),
                    f"{user}@{LOOPBACK}",
                ]
            )
            stack.callback(stop_process, ssh)
            wait_for_port(ssh_port, 10)
        yield Paths3(target_port, tunnel_port, ssh_port)


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def upload(port: int) -> float:
    block = os.urandom(PIECE)
    with _connect(port) as sock:
        started = time.perf_counter()
        sock.sendall(b"U")
        for _ in range(BULK // PIECE):
            sock.sendall(block)
        sock.shutdown(socket.SHUT_WR)
        answer = _exactly(sock, 8)
        elapsed = time.perf_counter() - started
    assert int.from_bytes(answer, "big") == BULK
    return BULK / elapsed / 1e6


def download(port: int) -> float:
    with _connect(port) as sock:
        started = time.perf_counter()
        sock.sendall(b"D" + BULK.to_bytes(8, "big"))
        received = 0
        buffer = bytearray(PIECE)
        while count := sock.recv_into(buffer):
            received += count
        elapsed = time.perf_counter() - started
    assert received == BULK
    return BULK / elapsed / 1e6


def setup_ms(port: int) -> float:
    samples = []
    for _ in range(SETUPS):
        started = time.perf_counter()
        with _connect(port) as sock:
            sock.sendall(b"Ex")
            assert _exactly(sock, 1) == b"x"
            samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def round_trips_us(port: int) -> tuple[float, float]:
    request = b"r" * 100
    samples = []
    with _connect(port) as sock:
        sock.sendall(b"E")
        for _ in range(ROUND_TRIPS):
            started = time.perf_counter()
            sock.sendall(request)
            assert _exactly(sock, len(request)) == request
            samples.append((time.perf_counter() - started) * 1e6)
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.99) - 1]


def _exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "closed early"
        data += chunk
    return data


def _rate_ratio(ours: float, theirs: float) -> float:
    return ours / theirs


def _time_ratio(ours: float, theirs: float) -> float:
    return theirs / ours


def test_tunnel_against_direct_tcp_and_ssh_forwarding(
    paths: Paths3, pytestconfig: pytest.Config
) -> None:
    ports = {"direct": paths.direct, "tunnel": paths.tunnel}
    if paths.ssh is not None:
        ports["ssh -L"] = paths.ssh
    measures: dict[str, Callable[[int], float]] = {
        "upload MB/s": upload,
        "download MB/s": download,
        "setup ms": setup_ms,
        "round trip p50 us": lambda port: round_trips_us(port)[0],
        "round trip p99 us": lambda port: round_trips_us(port)[1],
    }
    rounds: dict[tuple[str, str], list[float]] = {}
    for _ in range(ROUNDS):
        for measure, run in measures.items():
            for name, port in ports.items():
                rounds.setdefault((measure, name), []).append(run(port))
    median = {key: statistics.median(values) for key, values in rounds.items()}
    report: dict[str, dict[str, float | None]] = {}
    lines = [
        "tunnel benchmark (loopback, 2 agents + server + target on a shared 2-core machine;"
        f" medians of {ROUNDS} rounds)",
        f"{'':<20}{'direct':>12}{'tunnel':>12}{'ssh -L':>12}"
        f"{'tunnel/ssh':>12}{'tunnel/direct':>15}",
    ]
    for measure in measures:
        ours, direct = median[measure, "tunnel"], median[measure, "direct"]
        ssh = median.get((measure, "ssh -L"))
        # Ratios as "how many times better": rates ours/theirs, times theirs/ours.
        better = _rate_ratio if "MB/s" in measure else _time_ratio
        report[measure] = {
            "direct": direct,
            "tunnel": ours,
            "ssh": ssh,
            "tunnel_vs_ssh": None if ssh is None else better(ours, ssh),
            "tunnel_vs_direct": better(ours, direct),
        }
        vs_ssh = "n/a" if ssh is None else f"{better(ours, ssh):.2f}x"
        lines.append(
            f"{measure:<20}{direct:>12.1f}{ours:>12.1f}"
            f"{'n/a' if ssh is None else f'{ssh:.1f}':>12}{vs_ssh:>12}"
            f"{better(ours, direct):>14.2f}x"
        )
    if paths.ssh is None:
        lines.append("ssh -L: not measured (openssh-server/openssh-client not installed)")
    print_uncaptured(pytestconfig, "\n".join(lines))
    write_report(report, "tunnel.json")
    assert all(value > 0 for value in median.values())
