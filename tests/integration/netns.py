"""Network namespaces for tests: hosts, NAT routers and a "public" segment built with iproute2.

Everything lives in namespaces this module creates (unique names per run) and is joined only by
veth pairs made directly inside them, so no interface, address or route ever appears in the
namespace the tests run in, and no packet can leave the lab. Addresses: RFC 5737
198.51.100.0/24 as the "internet" (a bridge in the public namespace) and 10.N.0.0/24 behind
each NAT.

    with NatLab.build(symmetric=(False, True)) as lab:
        subprocess.Popen([*lab.public.prefix, "server", ...])    # on lab.public_ip
        subprocess.Popen([*lab.sites[0].host.prefix, "agent"])    # behind a cone NAT
        lab.unplug(lab.sites[1]); lab.plug(lab.sites[1])          # a cut cable

    with Link.build(mtu=1500) as link:                           # two hosts, one veth cable
        ...

Requires root, iproute2 and iptables; :func:`unavailable` says why a machine cannot.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

PUBLIC_NET: Final = "198.51.100"  # RFC 5737 TEST-NET-2: the lab's "internet"
PUBLIC_BRIDGE: Final = "inet"
COMMAND_TIMEOUT: Final = 20.0
FIREWALL_RULE: Final = (
    "-A", "INPUT", "-i", "wan", "-m", "conntrack", "--ctstate", "NEW,INVALID", "-j", "DROP",
)  # fmt: skip


class NetnsError(RuntimeError):
    """An ip/iptables command failed; the message carries the command and its stderr."""


def sh(*cmd: str, timeout: float = COMMAND_TIMEOUT) -> str:
    """Run a command; its stdout, or NetnsError with its stderr."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def unavailable(*, nat: bool = True) -> str | None:
    """Why namespace tests cannot run here (None when they can): not root, tools missing, or
    the kernel refusing a namespace or (``nat``) a NAT rule inside one."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespace tests need root"
    for tool in ("ip", "iptables") if nat else ("ip",):
        if shutil.which(tool) is None:
            return f"network namespace tests need {tool!r} (iproute2 / iptables)"
    probe = Namespace(f"{new_tag()}-probe")
    try:
        probe.create()
        probe.ip("link", "set", "lo", "up")
        if not nat:
            return None
        probe.exec("iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "lo", "-j", "MASQUERADE")
        probe.exec(
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            "lo",
            "-j",
            "MASQUERADE",
            "--random-fully",
        )
        probe.exec("iptables", *FIREWALL_RULE)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot build a network namespace lab here: {exc}"
    finally:
        probe.delete()
    return None


@dataclass
class Namespace:
    """One named network namespace (``ip netns``); :meth:`delete` also ends what runs in it."""

    name: str
    created: bool = False

    @property
    def prefix(self) -> list[str]:
        """Put in front of a command to run it inside this namespace."""
        return ["ip", "netns", "exec", self.name]

    def create(self) -> Namespace:
        sh("ip", "netns", "add", self.name)
        self.created = True
        return self

    def ip(self, *args: str) -> str:
        return sh("ip", "-n", self.name, *args)

    def exec(self, *cmd: str, timeout: float = COMMAND_TIMEOUT) -> str:
        return sh(*self.prefix, *cmd, timeout=timeout)

    def sysctl(self, key: str, value: str) -> None:
        self.exec("sysctl", "-q", "-w", f"{key}={value}")

    def pids(self) -> list[int]:
        """Processes running inside (ours: nothing else can enter a namespace we just made)."""
        done = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True, check=False
        )
        return [int(p) for p in done.stdout.split() if p.isdigit()]

    def delete(self) -> None:
        """Kill whatever still runs inside (by pid), then remove the namespace (and with it its
        interfaces and their veth peers). Safe to call twice."""
        if not self.created and self.name not in list_namespaces():
            return
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
        self.created = False


_STALE: Final = re.compile(r"ma(\d+)x[0-9a-f]{4}-")


def sweep_stale() -> None:
    """Remove labs left by test runs that were killed outright (their pid, in the name, is
    gone): finalizers cover everything short of SIGKILL."""
    for name in list_namespaces():
        match = _STALE.match(name)
        if match is None:
            continue
        if not _alive(int(match.group(1))):
            Namespace(name, created=True).delete()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone too
    except (OSError, IndexError):
        return False


def new_tag() -> str:
    """A prefix for this lab's namespace names: unique, and naming our pid for sweep_stale."""
    sweep_stale()
    return f"ma{os.getpid()}x{secrets.token_hex(2)}"


def list_namespaces() -> list[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def veth(a: Namespace, a_name: str, b: Namespace, b_name: str, mtu: int = 1500) -> None:
    """A veth pair made directly between two namespaces (never in the caller's)."""
    a.ip(
        "link", "add", a_name, "mtu", str(mtu), "type", "veth",
        "peer", "name", b_name, "netns", b.name, "mtu", str(mtu),
    )  # fmt: skip


def address(ns: Namespace, ifname: str, cidr: str) -> None:
    ns.ip("addr", "add", cidr, "dev", ifname)
    ns.ip("link", "set", ifname, "up")


@dataclass
class Site:
    """A private network behind its own NAT router: ``host`` 10.N.0.2, ``router`` 10.N.0.1
    inside and ``public_ip`` on the public segment."""

    index: int
    router: Namespace
    host: Namespace
    public_ip: str
    private_ip: str
    symmetric: bool
    bridge_port: str  # the router's cable as plugged into the public bridge (in the public ns)

    def nat_rule(self) -> list[str]:
        rule = ["-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"]
        return [*rule, "--random-fully"] if self.symmetric else rule


@dataclass
class NatLab:
    """The public segment (bridge + the server's address) and one NAT'd site per entry of
    ``symmetric`` (True: ``MASQUERADE --random-fully``, a port per destination).

    ``firewall`` (the default) also drops unsolicited input on each router's WAN side, as real
    routers do. Without it, Linux conntrack records a peer's punch addressed to the router
    itself as a connection; the router's own outbound mapping toward that peer then clashes
    with it and MASQUERADE picks a random port: the NAT turns symmetric for that very peer.
    """

    tag: str
    public: Namespace
    public_ip: str
    sites: list[Site] = field(default_factory=list)

    @classmethod
    @contextlib.contextmanager
    def build(
        cls, symmetric: Sequence[bool] = (False, False), *, firewall: bool = True
    ) -> Iterator[NatLab]:
        """Build the lab; it is torn down on exit, whatever happened inside."""
        tag = new_tag()
        lab = cls(tag, Namespace(f"{tag}-pub"), f"{PUBLIC_NET}.1")
        try:
            lab._build(symmetric, firewall)
            yield lab
        finally:
            lab.teardown()

    def namespaces(self) -> list[Namespace]:
        return [self.public, *(ns for s in self.sites for ns in (s.router, s.host))]

    def teardown(self) -> None:
        for ns in reversed(self.namespaces()):
            ns.delete()

    def _build(self, symmetric: Sequence[bool], firewall: bool) -> None:
        pub = self.public.create()
        pub.ip("link", "set", "lo", "up")
        pub.ip("link", "add", PUBLIC_BRIDGE, "type", "bridge")
        address(pub, PUBLIC_BRIDGE, f"{self.public_ip}/24")
        for index, is_symmetric in enumerate(symmetric):
            site = Site(
                index=index,
                router=Namespace(f"{self.tag}-nat{index}"),
                host=Namespace(f"{self.tag}-host{index}"),
                public_ip=f"{PUBLIC_NET}.{index + 2}",
                private_ip=f"10.{index + 1}.0.2",
                symmetric=is_symmetric,
                bridge_port=f"nat{index}",
            )
            self.sites.append(site)
            router, host = site.router.create(), site.host.create()
            for ns in (router, host):
                ns.ip("link", "set", "lo", "up")
            veth(router, "wan", pub, site.bridge_port)
            pub.ip("link", "set", site.bridge_port, "master", PUBLIC_BRIDGE, "up")
            address(router, "wan", f"{site.public_ip}/24")
            veth(router, "lan", host, "eth0")
            address(router, "lan", f"10.{index + 1}.0.1/24")
            address(host, "eth0", f"{site.private_ip}/24")
            host.ip("route", "add", "default", "via", f"10.{index + 1}.0.1")
            router.sysctl("net.ipv4.ip_forward", "1")
            router.exec("iptables", *site.nat_rule())
            if firewall:
                router.exec("iptables", *FIREWALL_RULE)

    def unplug(self, site: Site) -> None:
        """Pull the router's cable at the public switch: its WAN loses carrier, routes stay."""
        self.public.ip("link", "set", site.bridge_port, "down")

    def plug(self, site: Site) -> None:
        self.public.ip("link", "set", site.bridge_port, "up")


def conntrack_table(ns: Namespace) -> str:
    """The router's NAT table (for failure messages); empty when conntrack is not installed."""
    if shutil.which("conntrack") is None:
        return ""
    done = subprocess.run(
        [*ns.prefix, "conntrack", "-L", "-p", "udp"], capture_output=True, text=True, check=False
    )
    return done.stdout


@dataclass
class Link:
    """Two hosts on one veth cable: ``left`` 192.0.2.1 and ``right`` 192.0.2.2 (RFC 5737)."""

    left: Namespace
    right: Namespace
    mtu: int
    left_ip: str = "192.0.2.1"
    right_ip: str = "192.0.2.2"

    @classmethod
    @contextlib.contextmanager
    def build(cls, mtu: int = 1500) -> Iterator[Link]:
        tag = new_tag()
        link = cls(Namespace(f"{tag}-left"), Namespace(f"{tag}-right"), mtu)
        try:
            for ns in (link.left, link.right):
                ns.create().ip("link", "set", "lo", "up")
            veth(link.left, "eth0", link.right, "eth0", mtu)
            address(link.left, "eth0", f"{link.left_ip}/24")
            address(link.right, "eth0", f"{link.right_ip}/24")
            yield link
        finally:
            link.right.delete()
            link.left.delete()
