"""Connection candidates: the addresses at which a peer may reach this agent's QUIC endpoint.

- **host**: the machine's own interface addresses with the endpoint's port (LAN peers).
- **srflx**: the address and port a NAT gave the endpoint's socket, as the Mesh Server's STUN
  responder saw it (peers behind other NATs punch toward it).
- **relay**: "through the server's relay to device X" (relay.py); the address is the device id.
- **turn**: the relayed address of the peer's TURN allocation (relay.py's ``TurnRelay``): we
  send to it from our own allocation, never from the endpoint's socket, so it is no direct
  target (:data:`DIRECT_KINDS`); a peer that predates it skips the kind.

Candidates travel between peers through signalling, so :meth:`Candidate.from_wire` treats them
as hostile input, and :func:`peer_candidates` decides which of a peer's candidates we may send
packets to at all: at most :data:`MAX_PEER_CANDIDATES`, never link-local, and loopback only from
a peer on this very machine (:func:`same_host`). The STUN client shares the endpoint's socket
(the endpoint demultiplexes STUN from QUIC), so the server-reflexive address it learns is the one
of the QUIC socket itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import weakref
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, TypedDict, get_args

import ifaddr
from aioice import stun

from meshagent_gui.core.p2p.endpoint import Endpoint, StunHandler, relay_address
from meshagent_gui.core.p2p.engine import Address

log = logging.getLogger(__name__)

CandidateKind = Literal["host", "srflx", "relay", "turn"]
KINDS: Final[frozenset[str]] = frozenset(get_args(CandidateKind))
# The kinds the endpoint's own socket dials and punches toward.
DIRECT_KINDS: Final[frozenset[str]] = frozenset({"host", "srflx"})
NatGuess = Literal["open", "cone", "symmetric", "unknown"]

# A candidate list from a peer longer than this is refused outright (signalling is small).
MAX_CANDIDATES: Final = 32
# Of a peer's offer or answer, only this many candidates are read (the rest are ignored): ours
# are a few interfaces and one srflx, and every candidate read may cost a few punch packets.
MAX_PEER_CANDIDATES: Final = 16
_MAX_ADDRESS_CHARS: Final = 64  # an IPv6 address is at most 45; a device id is 64
_DEVICE_ID_HEX: Final = 64
# RFC 8489 section 6.2.1 starts at 500 ms; on the short paths STUN sees here, 250 ms retries
# sooner without adding much load (a handful of 20-byte requests per query).
_FIRST_RETRANSMIT: Final = 0.25
_MAX_RETRANSMIT: Final = 2.0

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


class StunError(Exception):
    """The STUN server answered with an error, or with no usable address."""


class WireCandidate(TypedDict):
    """A candidate as an offer or answer carries it (:meth:`Candidate.to_wire`); what a peer
    sends is read by :meth:`Candidate.from_wire`, which checks every field."""

    kind: CandidateKind
    address: str
    port: int


@dataclass(frozen=True)
class Candidate:
    """One way to reach an endpoint. Construction validates; see :meth:`from_wire`."""

    kind: CandidateKind
    address: str  # canonical IP text (IPv4-mapped IPv6 is unmapped); for "relay": the device id
    port: int  # 1-65535; 0 for "relay"

    @property
    def direct(self) -> bool:
        """Whether the endpoint's socket dials it (host, srflx), not a relay."""
        return self.kind in DIRECT_KINDS

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise ValueError(f"unknown candidate kind {self.kind!r}")
        if not isinstance(self.address, str) or not isinstance(self.port, int):
            raise ValueError("candidate address must be text and port an integer")
        if isinstance(self.port, bool):
            raise ValueError("candidate port must be an integer")
        if self.kind == "relay":
            if not _is_device_id(self.address) or self.port != 0:
                raise ValueError("a relay candidate names a device id (64 hex digits), port 0")
            return
        if not 1 <= self.port <= 65535:
            raise ValueError(f"candidate port {self.port} out of range")
        if canonical_ip(self.address) != self.address:
            raise ValueError(f"candidate address {self.address!r} is not in canonical form")

    @classmethod
    def relay(cls, device_id: str) -> Candidate:
        return cls("relay", device_id, 0)

    @property
    def transport_address(self) -> Address:
        """What to dial: an IP address and port, or the relay pseudo address."""
        if self.kind == "relay":
            return relay_address(self.address)
        return (self.address, self.port)

    def to_wire(self) -> WireCandidate:
        return {"kind": self.kind, "address": self.address, "port": self.port}

    @classmethod
    def from_wire(cls, obj: object) -> Candidate:
        """Parse a candidate a peer sent; raises ValueError for anything malformed.

        Unknown extra keys are ignored (a newer peer may add some). Addresses are accepted in
        any IP text form and canonicalised; unspecified, multicast, broadcast, reserved and
        link-local addresses are refused (we would only spray packets at them).
        """
        if not isinstance(obj, Mapping):
            raise ValueError("a candidate is a JSON object")
        kind, address, port = obj.get("kind"), obj.get("address"), obj.get("port")
        if not isinstance(kind, str) or kind not in KINDS:
            raise ValueError("unknown candidate kind")
        if not isinstance(address, str) or not 0 < len(address) <= _MAX_ADDRESS_CHARS:
            raise ValueError("candidate address must be short text")
        if not isinstance(port, int) or isinstance(port, bool):
            raise ValueError("candidate port must be an integer")
        if kind == "relay":
            return cls("relay", address.lower(), port)
        return cls(kind, canonical_ip(address), port)  # type: ignore[arg-type]


def parse_candidates(obj: object, *, limit: int = MAX_CANDIDATES) -> list[Candidate]:
    """A peer's candidate list: malformed entries are skipped (a newer peer may send kinds we do
    not know), a list that is not a list or is too long is refused with ValueError."""
    if not isinstance(obj, list) or len(obj) > limit:
        raise ValueError(f"candidates must be a list of at most {limit}")
    parsed: list[Candidate] = []
    for item in obj:
        try:
            candidate = Candidate.from_wire(item)
        except ValueError as exc:
            log.debug("skipped a candidate: %s", exc)
            continue
        if candidate not in parsed:
            parsed.append(candidate)
    return parsed


def peer_candidates(obj: object, *, own: Collection[str]) -> list[Candidate]:
    """The candidates of a peer's offer or answer that we may send packets to.

    Only the first :data:`MAX_PEER_CANDIDATES` entries are read; malformed ones and link-local
    addresses are skipped (:meth:`Candidate.from_wire`); loopback ones are kept only when
    :func:`same_host` says the peer runs on this machine, with ``own`` our
    :func:`own_addresses`. Anything else would let any peer aim our packets at this machine's
    own services. A ``turn`` candidate is kept as it is: our socket never sends to it, our TURN
    server does, by its own rules of which peers it relays to (coturn refuses loopback and
    other reserved addresses unless told otherwise). ValueError when ``obj`` is not a list.
    """
    if not isinstance(obj, list):
        raise ValueError("candidates must be a list")
    parsed = parse_candidates(obj[:MAX_PEER_CANDIDATES])
    if same_host(parsed, own):
        return parsed
    return [c for c in parsed if not c.direct or not _parse_ip(c.address).is_loopback]


def same_host(peer: Iterable[Candidate], own: Collection[str]) -> bool:
    """Whether a peer's candidates say it runs on this machine.

    The rule: it has non-loopback host candidates and every one of them is one of our own
    interface addresses (``own``, non-loopback): two agents on one machine enumerate the same
    interfaces. "Every", not "one": a docker or libvirt bridge has the same address (172.17.0.1,
    192.168.122.1) on every machine that runs one, so one shared address proves nothing. Or we
    have no non-loopback address at all: such a machine can only reach a Mesh Server on itself,
    so every peer is local. A reflexive address shared with ours is deliberately not enough: it
    only says the peer sits behind the same NAT, and that peer's loopback is not ours.

    This is a peer's claim, not a proof: it is read only after the peer's ``p2p:connect`` token
    for us has been checked, and it bounds what a token holder that copied our addresses gets
    to a few STUN requests to a few local ports, once per token.
    """
    if not own:
        return True
    hosts = {c.address for c in peer if c.kind == "host" and not _parse_ip(c.address).is_loopback}
    return bool(hosts) and hosts <= set(own)


def own_addresses() -> frozenset[str]:
    """This machine's usable non-loopback interface addresses, canonical (see :func:`same_host`)."""
    found: set[str] = set()
    for ip in _interface_addresses():
        if ip.is_loopback:
            continue
        try:
            found.add(canonical_ip(str(ip)))
        except ValueError:
            continue  # link-local, multicast, ...
    return frozenset(found)


def _is_device_id(text: str) -> bool:
    return len(text) == _DEVICE_ID_HEX and all(c in "0123456789abcdef" for c in text)


def _parse_ip(text: str) -> IP:
    ip = ipaddress.ip_address(text)  # ValueError for anything that is not an IP address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            raise ValueError("scoped (link-local) IPv6 addresses are not candidates")
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
    return ip


def canonical_ip(text: str) -> str:
    """The canonical text of a usable unicast IP address; ValueError otherwise."""
    if len(text) > _MAX_ADDRESS_CHARS:
        raise ValueError("address too long")
    ip = _parse_ip(text)
    if ip.is_loopback:
        return str(ip)  # (IPv6 counts ::1 among its "reserved" addresses)
    if (
        ip.is_unspecified
        or ip.is_multicast
        or ip.is_link_local
        or ip.is_reserved
        or ip == ipaddress.IPv4Address("255.255.255.255")
        or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local)
    ):
        raise ValueError(f"{ip} is not a usable unicast address")
    return str(ip)


# ---------------------------------------------------------------------- host candidates


def _rank(ip: IP) -> int:
    """Preference order: private LAN IPv4, ULA IPv6, other IPv4, global IPv6, loopback."""
    if ip.is_loopback:
        return 4
    if isinstance(ip, ipaddress.IPv4Address):
        return 0 if ip.is_private else 2
    return 1 if ip in _ULA else 3


_ULA: Final = ipaddress.IPv6Network("fc00::/7")


def _interface_addresses() -> list[IP]:
    found: list[IP] = []
    for adapter in ifaddr.get_adapters():
        for entry in adapter.ips:
            # ifaddr gives IPv4 as text and IPv6 as (address, flowinfo, scope_id).
            text = entry.ip if isinstance(entry.ip, str) else entry.ip[0]
            try:
                found.append(ipaddress.ip_address(text))
            except ValueError:
                continue
    return found


def host_candidates(
    port: int, *, include_loopback: bool = False, families: Collection[int] = (4, 6)
) -> list[Candidate]:
    """This machine's interface addresses with ``port``: IPv4 and global or ULA IPv6, never
    link-local; loopback only when asked or when nothing else exists. De-duplicated and in a
    stable order, private LAN addresses first."""
    usable: set[IP] = set()
    loopback: set[IP] = set()
    for ip in _interface_addresses():
        if ip.version not in families:
            continue
        try:
            canonical_ip(str(ip))
        except ValueError:
            continue  # link-local, multicast, ...
        (loopback if ip.is_loopback else usable).add(ip)
    if include_loopback or not usable:
        usable |= loopback
    ordered = sorted(usable, key=lambda ip: (_rank(ip), ip.version, int(ip)))
    return [Candidate("host", str(ip), port) for ip in ordered]


# ---------------------------------------------------------------------- STUN

_installed: weakref.WeakKeyDictionary[Endpoint, StunClient] = weakref.WeakKeyDictionary()


class StunClient:
    """Binding requests (RFC 8489) from an endpoint's own socket.

    It installs itself as the endpoint's STUN handler; STUN messages that answer none of its
    queries go to ``fallback`` (e.g. a handler for peers' connectivity checks; settable).
    :meth:`close` puts ``fallback`` back. Any number of queries may run at once. One client per
    endpoint: :meth:`of` returns the endpoint's current one (or installs one).
    """

    def __init__(self, endpoint: Endpoint, *, fallback: StunHandler | None = None) -> None:
        self._endpoint = endpoint
        self.fallback = fallback
        self._pending: dict[bytes, asyncio.Future[Address]] = {}
        self._closed = False
        endpoint.set_stun_handler(self.handle)
        _installed[endpoint] = self

    @classmethod
    def of(cls, endpoint: Endpoint) -> StunClient:
        """The client installed on ``endpoint`` (created on first use, kept until closed)."""
        client = _installed.get(endpoint)
        return client if client is not None else cls(endpoint)

    def __enter__(self) -> StunClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if _installed.get(self._endpoint) is self:
            del _installed[self._endpoint]
        self._endpoint.set_stun_handler(self.fallback)
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()

    async def query(self, server: tuple[str, int], *, timeout: float = 3.0) -> tuple[str, int]:
        """This socket's address as ``server`` sees it (XOR-MAPPED-ADDRESS).

        Retransmits at 0.25, 0.5, 1, 2, 2 ... s until ``timeout``, then raises TimeoutError.
        Raises StunError for an error answer and OSError when the server cannot be resolved or
        the request cannot be sent.
        """
        if self._closed:
            raise RuntimeError("the STUN client is closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        target = await self._resolve(server)
        request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        payload = bytes(request)
        future: asyncio.Future[Address] = loop.create_future()
        self._pending[request.transaction_id] = future
        interval = _FIRST_RETRANSMIT
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError(f"no STUN answer from {server[0]}:{server[1]}")
                self._endpoint.send_datagram(payload, target)
                await asyncio.wait([future], timeout=min(interval, remaining))
                if future.done():
                    host, port = future.result()
                    return str(host), int(port)
                interval = min(2 * interval, _MAX_RETRANSMIT)
        finally:
            self._pending.pop(request.transaction_id, None)
            future.cancel()

    async def _resolve(self, server: tuple[str, int]) -> Address:
        host, port = server
        try:
            ipaddress.ip_address(host)
            return (host, port)
        except ValueError:
            pass
        v4_only = len(self._endpoint.local_address) == 2
        infos = await asyncio.get_running_loop().getaddrinfo(
            host,
            port,
            family=socket.AF_INET if v4_only else socket.AF_UNSPEC,
            type=socket.SOCK_DGRAM,
        )
        if not infos:
            raise OSError(f"cannot resolve {host}")
        return (str(infos[0][4][0]), port)

    def handle(self, data: bytes, addr: Address) -> None:
        """The endpoint's STUN handler: completes the query whose transaction id matches."""
        future = self._pending.get(data[8:20])
        if future is None:
            if self.fallback is not None:
                self.fallback(data, addr)
            return
        if future.done():
            return  # the answer to a retransmission
        try:
            message = stun.parse_message(data)
        except ValueError:
            return  # a forged or damaged answer: keep waiting for the real one
        if message.message_method != stun.Method.BINDING:
            return
        if message.message_class == stun.Class.ERROR:
            code = message.attributes.get("ERROR-CODE")
            future.set_exception(StunError(f"STUN error answer {code!r}"))
            return
        if message.message_class != stun.Class.RESPONSE:
            return
        mapped = message.attributes.get("XOR-MAPPED-ADDRESS") or message.attributes.get(
            "MAPPED-ADDRESS"
        )
        if mapped is None:
            future.set_exception(StunError("STUN answer without a mapped address"))
            return
        try:
            future.set_result((str(_parse_ip(str(mapped[0]))), int(mapped[1])))
        except ValueError as exc:
            future.set_exception(StunError(f"STUN answer with a bad address: {exc}"))


# ---------------------------------------------------------------------- gathering


def _bound_host_candidates(endpoint: Endpoint, include_loopback: bool) -> list[Candidate]:
    """Host candidates the endpoint's socket can actually use: on a wildcard bind every
    interface of its family (dual-stack ``::`` takes both), else only the bound address."""
    local = endpoint.local_address
    host, port = str(local[0]), int(local[1])
    ip = _parse_ip(host)
    if ip.is_unspecified:
        families = (4,) if len(local) == 2 else (4, 6)
        return host_candidates(port, include_loopback=include_loopback, families=families)
    return [Candidate("host", str(ip), port)]


async def gather(
    endpoint: Endpoint,
    stun_server: tuple[str, int] | None,
    *,
    include_loopback: bool = False,
    stun_client: StunClient | None = None,
    stun_timeout: float = 3.0,
) -> list[Candidate]:
    """Host candidates (endpoint's port) then the server-reflexive one, de-duplicated.

    A STUN failure (timeout, error answer, unreachable server) only leaves srflx out. Without
    ``stun_client`` the endpoint's :meth:`StunClient.of` is used (installed on first use; give
    any other STUN handler to it as ``fallback``), so concurrent gathers share one handler.
    """
    found = _bound_host_candidates(endpoint, include_loopback)
    if stun_server is not None:
        client = stun_client or StunClient.of(endpoint)
        try:
            host, port = await client.query(stun_server, timeout=stun_timeout)
            found.append(Candidate("srflx", canonical_ip(host), port))
        except (TimeoutError, StunError, OSError, ValueError) as exc:
            log.info("no server-reflexive candidate from %s: %s", stun_server, exc)
    unique: list[Candidate] = []
    seen: set[tuple[str, int]] = set()
    for candidate in found:
        if (candidate.address, candidate.port) not in seen:  # srflx == host: no NAT
            seen.add((candidate.address, candidate.port))
            unique.append(candidate)
    return unique


# ---------------------------------------------------------------------- NAT behaviour


def nat_type_guess(
    host: Iterable[Candidate], answers: Mapping[tuple[str, int], tuple[str, int]]
) -> NatGuess:
    """A rough guess at the NAT in front of us from STUN answers (server -> mapped address).

    - "open": a mapped address is one of our own (no NAT; a firewall may still filter).
    - "cone": answers from at least two different servers agree: the mapping does not depend
      on the destination, so a peer can punch toward the srflx candidate.
    - "symmetric": they differ: each destination gets its own mapping; punching is unlikely to
      work and the relay is the way.
    - "unknown": no answer, or answers from only one destination.

    What this cannot tell: the filtering behaviour (full cone vs restricted cone), and, when
    the servers differ only by port, a NAT whose mapping depends on the destination address
    alone looks like "cone". The reference server has one STUN port, so against it alone the
    honest answer is "open" or "unknown"; "cone"/"symmetric" need a second STUN server.
    """
    if not answers:
        return "unknown"
    own = {(c.address, c.port) for c in host if c.kind == "host"}
    mapped = [(str(_parse_ip(a)), p) for a, p in answers.values()]
    if any(m in own for m in mapped):
        return "open"
    if len(answers) < 2:
        return "unknown"
    return "cone" if len(set(mapped)) == 1 else "symmetric"


async def probe_nat(
    client: StunClient,
    servers: Sequence[tuple[str, int]],
    host: Sequence[Candidate],
    *,
    timeout: float = 3.0,
) -> NatGuess:
    """Ask every server at once (failures are left out) and guess with :func:`nat_type_guess`."""
    results = await asyncio.gather(
        *(client.query(server, timeout=timeout) for server in servers), return_exceptions=True
    )
    answers: dict[tuple[str, int], tuple[str, int]] = {}
    for server, result in zip(servers, results, strict=True):
        if isinstance(result, tuple):
            answers[server] = result
        elif not isinstance(result, TimeoutError | StunError | OSError):
            raise result
    return nat_type_guess(host, answers)
