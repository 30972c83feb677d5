"""A user-space link emulator: delay each way, random loss and a rate limit between two hosts.

This kernel has no ``netem`` (``CONFIG_NET_SCH_NETEM`` is not set), so the link is emulated in a
third network namespace that sits between two veth pairs and bridges them at layer 2 itself:

    left (192.0.2.1) eth0 ==veth== l [emu] r ==veth== eth0 right (192.0.2.2)

One forwarder process per direction reads whole Ethernet frames from one side with an
``AF_PACKET`` socket and writes them out of the other after the link's treatment: a frame is lost
with probability ``loss``; otherwise it queues behind the frames before it for the serialisation
time its size takes at ``rate_mbit`` (tail drop when the queue holds more than ``queue_bytes``),
then travels ``delay_ms``. ARP crosses the same way, so the hosts see one plain Ethernet segment.
Offloads (checksum, TSO/GSO, GRO) are off on all four ends so every frame is at most MTU 1500 on
the wire, as off loopback, and checksums are real (a raw socket would otherwise forward
unfinished ones).

    with EmulatedLink.build(LinkProfile(delay_ms=25, loss=0.005, rate_mbit=200)) as link:
        subprocess.Popen([*link.right.prefix, "sink"]); subprocess.run([*link.left.prefix, ...])

Each forwarder is one Python process (``python -m tests.benchmarks.linkemu forward ...``); its
ceiling on this machine is measured by ``test_bench_paths.py`` (a TCP sink over a link with no
delay and no limit), so figures near it are the emulator's, not the path's.
Needs root, iproute2 and ethtool.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tests.integration.netns import Namespace, address, new_tag, veth

ETH_P_ALL: Final = 0x0003
SOL_PACKET: Final = 263  # not exported by the socket module
PACKET_OUTGOING: Final = 4  # sll_pkttype of a frame this host sends (we only forward arrivals)
PACKET_IGNORE_OUTGOING: Final = 23  # Linux 4.20+: do not even queue them
SOCKET_BUFFER: Final = 8 << 20
MTU: Final = 1500
LEFT_IP: Final = "192.0.2.1"
RIGHT_IP: Final = "192.0.2.2"
READY: Final = "ready"
REPOSITORY: Final = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class LinkProfile:
    """What the link does to each direction. ``rate_mbit`` 0: no limit (the forwarder's own
    ceiling); ``queue_bytes`` 0: one bandwidth-delay product (at least 64 KiB), a common router
    buffer size."""

    delay_ms: float = 0.0  # one way
    loss: float = 0.0  # fraction of frames lost, each way, independently
    rate_mbit: float = 0.0
    queue_bytes: int = 0

    @property
    def rtt_ms(self) -> float:
        return 2 * self.delay_ms

    def queue_limit(self) -> int:
        if self.queue_bytes:
            return self.queue_bytes
        bdp = self.rate_mbit * 1e6 / 8 * self.rtt_ms / 1000
        return max(int(bdp), 64 << 10)

    def describe(self) -> str:
        rate = f"{self.rate_mbit:g} Mbit" if self.rate_mbit else "no rate limit"
        return f"{self.rtt_ms:g} ms RTT, {self.loss * 100:g} % loss each way, {rate}, MTU {MTU}"


# ---------------------------------------------------------------------------- the forwarder


def packet_socket(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    with contextlib.suppress(OSError):
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.bind((ifname, ETH_P_ALL))
    return sock


def forward(source: str, target: str, profile: LinkProfile, seed: int) -> None:
    """Forward frames arriving on ``source`` out of ``target`` under ``profile``, forever.

    Frames leave in arrival order: each departs when the emulated wire is free (rate) and is
    delivered ``delay`` after its last bit left, so due times never decrease and a deque is the
    whole schedule."""
    inbound, outbound = packet_socket(source), packet_socket(target)
    inbound.setblocking(False)
    chance = random.Random(seed).random
    seconds_per_byte = 8 / (profile.rate_mbit * 1e6) if profile.rate_mbit else 0.0
    delay = profile.delay_ms / 1000
    backlog_limit = profile.queue_limit() * seconds_per_byte  # queue, as time on the wire
    wire_free = 0.0
    due: collections.deque[tuple[float, bytes]] = collections.deque()
    clock = time.monotonic
    print(READY, flush=True)
    while True:
        timeout = max(0.0, due[0][0] - clock()) if due else None
        readable, _, _ = select.select([inbound], [], [], timeout)
        if readable:
            for _ in range(256):  # a batch, then see what is due
                try:
                    frame, where = inbound.recvfrom(65536)
                except BlockingIOError:
                    break
                if where[2] == PACKET_OUTGOING or (profile.loss and chance() < profile.loss):
                    continue
                now = clock()
                start = max(now, wire_free)
                if start - now > backlog_limit > 0:
                    continue  # tail drop: the router's buffer is full
                wire_free = start + len(frame) * seconds_per_byte
                due.append((wire_free + delay, frame))
        now = clock()
        while due and due[0][0] <= now:
            with contextlib.suppress(OSError):  # a full device queue is loss too
                outbound.send(due.popleft()[1])


# ---------------------------------------------------------------------------- the lab


def offloads_off(ns: Namespace, ifname: str) -> None:
    """Frames at most MTU with finished checksums: segmentation and checksum offloads off."""
    ns.exec("ethtool", "-K", ifname, "tx", "off", "rx", "off", "tso", "off", "gso", "off",
            "gro", "off")  # fmt: skip


@dataclass
class EmulatedLink:
    """``left`` and ``right`` hosts joined through the emulator in ``emu`` (see the module)."""

    left: Namespace
    emu: Namespace
    right: Namespace
    profile: LinkProfile
    left_ip: str = LEFT_IP
    right_ip: str = RIGHT_IP

    @classmethod
    @contextlib.contextmanager
    def build(cls, profile: LinkProfile, *, seed: int = 1) -> Iterator[EmulatedLink]:
        tag = new_tag()
        link = cls(
            Namespace(f"{tag}-left"), Namespace(f"{tag}-emu"), Namespace(f"{tag}-right"), profile
        )
        forwarders: list[subprocess.Popen[str]] = []  # stdout kept open: it is their pipe
        try:
            for ns in (link.left, link.emu, link.right):
                ns.create().ip("link", "set", "lo", "up")
            veth(link.left, "eth0", link.emu, "l", MTU)
            veth(link.emu, "r", link.right, "eth0", MTU)
            address(link.left, "eth0", f"{link.left_ip}/24")
            address(link.right, "eth0", f"{link.right_ip}/24")
            for ifname in ("l", "r"):
                link.emu.ip("link", "set", "dev", ifname, "promisc", "on", "up")
                offloads_off(link.emu, ifname)
            offloads_off(link.left, "eth0")
            offloads_off(link.right, "eth0")
            for index, (source, target) in enumerate((("l", "r"), ("r", "l"))):
                forwarders.append(link._start_forwarder(source, target, seed + index))
            yield link
        finally:
            for process in forwarders:
                process.kill()
                process.communicate()
            for ns in (link.right, link.emu, link.left):
                ns.delete()

    def _start_forwarder(self, source: str, target: str, seed: int) -> subprocess.Popen[str]:
        p = self.profile
        process = subprocess.Popen(
            [
                *self.emu.prefix, sys.executable, "-m", "tests.benchmarks.linkemu", "forward",
                source, target, str(p.delay_ms), str(p.loss), str(p.rate_mbit),
                str(p.queue_limit()), str(seed),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPOSITORY,
        )  # fmt: skip
        assert process.stdout is not None
        if process.stdout.readline().strip() != READY:
            process.kill()
            raise RuntimeError(f"the link emulator's forwarder {source}->{target} did not start")
        return process


def unavailable() -> str | None:
    """Why the emulated link cannot run here (None when it can)."""
    from tests.integration.netns import unavailable as netns_unavailable

    reason = netns_unavailable(nat=False)
    if reason is None and shutil.which("ethtool") is None:
        reason = "the link emulator needs ethtool (apt-get install ethtool)"
    return reason


def main(argv: list[str]) -> int:
    if len(argv) != 8 or argv[0] != "forward":
        print("usage: linkemu.py forward SOURCE TARGET DELAY_MS LOSS RATE_MBIT QUEUE SEED")
        return 2
    _, source, target, delay_ms, loss, rate_mbit, queue, seed = argv
    if os.geteuid() == 0:
        os.nice(-5)  # the wire should not wait for the endpoints it carries
    profile = LinkProfile(float(delay_ms), float(loss), float(rate_mbit), int(queue))
    with contextlib.suppress(KeyboardInterrupt):
        forward(source, target, profile, int(seed))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
