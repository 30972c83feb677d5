"""Candidates: host addresses, STUN from the endpoint's own socket against the real reference
server, hostile candidate input, and the NAT guess."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, cast

import ifaddr
import pytest
from aioice import stun
from hypothesis import given
from hypothesis import strategies as st

from meshagent_gui import identity
from meshagent_gui.core.mesh.client import MeshClient
from meshagent_gui.core.p2p import Endpoint
from meshagent_gui.core.p2p.candidates import (
    MAX_PEER_CANDIDATES,
    Candidate,
    StunClient,
    StunError,
    canonical_ip,
    gather,
    host_candidates,
    nat_type_guess,
    own_addresses,
    parse_candidates,
    peer_candidates,
    probe_nat,
    same_host,
)
from meshagent_gui.core.p2p.endpoint import relay_address
from meshagent_gui.server.runner import ServerSettings, start_server

WAIT = 10.0
DEVICE_ID = "ab" * 32


@pytest.fixture
async def stun_server(tmp_path: Path) -> AsyncIterator[tuple[str, int]]:
    """The reference server's STUN address, as its /info advertises it."""
    server = await start_server(ServerSettings(data_dir=tmp_path / "server"))
    try:
        async with MeshClient(server.url) as client:
            info = await client.info()
        assert info.stun_port is not None
        yield ("127.0.0.1", info.stun_port)
    finally:
        await server.stop()


@asynccontextmanager
async def running(who: identity.Identity, host: str = "127.0.0.1") -> AsyncIterator[Endpoint]:
    endpoint = Endpoint(who)
    await endpoint.start(host, 0)
    try:
        yield endpoint
    finally:
        await endpoint.close()


@contextmanager
def silent_udp_port() -> Iterator[socket.socket]:
    """A bound UDP socket nobody reads: requests to it are never answered."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def drain(sock: socket.socket) -> list[bytes]:
    got: list[bytes] = []
    while True:
        try:
            got.append(sock.recv(2048))
        except BlockingIOError:
            return got


# ---------------------------------------------------------------- STUN against the real server


async def test_stun_query_returns_the_endpoints_own_address(
    stun_server: tuple[str, int], alice: identity.Identity
) -> None:
    async with running(alice) as endpoint:
        with StunClient(endpoint) as client:
            mapped = await client.query(stun_server, timeout=WAIT)
            assert mapped == ("127.0.0.1", endpoint.local_address[1])
            # Concurrent queries each get their own answer, matched by transaction id.
            many = await asyncio.gather(*(client.query(stun_server) for _ in range(8)))
            assert set(many) == {mapped}


async def test_gather_on_a_loopback_bind_folds_srflx_into_host(
    stun_server: tuple[str, int], alice: identity.Identity
) -> None:
    async with running(alice) as endpoint:
        port = endpoint.local_address[1]
        found = await gather(endpoint, stun_server)
        # The server saw the bound address itself: no NAT, one candidate.
        assert found == [Candidate("host", "127.0.0.1", port)]


async def test_gather_on_a_wildcard_bind(
    stun_server: tuple[str, int], alice: identity.Identity
) -> None:
    async with running(alice, "0.0.0.0") as endpoint:
        port = endpoint.local_address[1]
        # Concurrent gathers share the endpoint's one STUN client: both get every answer.
        found, again = await asyncio.gather(
            gather(endpoint, stun_server), gather(endpoint, stun_server)
        )
        assert found == again
        assert StunClient.of(endpoint) is StunClient.of(endpoint)
        hosts = [c for c in found if c.kind == "host"]
        assert hosts == host_candidates(port, families=(4,))
        assert all(ipaddress.ip_address(c.address).version == 4 for c in hosts)
        # 127.0.0.1 is not a host candidate unless asked, so the answer over loopback is new.
        if Candidate("host", "127.0.0.1", port) not in hosts:
            assert found[-1] == Candidate("srflx", "127.0.0.1", port)
        assert len({(c.address, c.port) for c in found}) == len(found)


async def test_query_times_out_against_a_silent_port(alice: identity.Identity) -> None:
    async with running(alice) as endpoint:
        with silent_udp_port() as silent, StunClient(endpoint) as client:
            server = silent.getsockname()
            with pytest.raises(TimeoutError):
                await client.query(server, timeout=1.5)
            sent = drain(silent)
            # Retransmitted (0, 0.25, 0.75 s), always the same transaction.
            assert len(sent) >= 2
            assert len(set(sent)) == 1
            assert stun.parse_message(sent[0]).message_method == stun.Method.BINDING
            # gather leaves srflx out and still returns the host candidate.
            found = await gather(endpoint, server, stun_client=client, stun_timeout=0.3)
            assert [c.kind for c in found] == ["host"]


class ErrorResponder(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        request = stun.parse_message(data)
        answer = stun.Message(
            message_method=stun.Method.BINDING,
            message_class=stun.Class.ERROR,
            transaction_id=request.transaction_id,
        )
        answer.attributes["ERROR-CODE"] = (400, "Bad Request")
        assert self.transport is not None
        self.transport.sendto(bytes(answer), addr)


async def test_error_answer_raises_stun_error(alice: identity.Identity) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(ErrorResponder, local_addr=("127.0.0.1", 0))
    try:
        async with running(alice) as endpoint:
            with StunClient(endpoint) as client, pytest.raises(StunError, match="400"):
                await client.query(transport.get_extra_info("sockname"), timeout=WAIT)
    finally:
        transport.close()


async def test_unmatched_stun_goes_to_the_fallback_handler(alice: identity.Identity) -> None:
    seen: list[bytes] = []
    got_one = asyncio.Event()

    def fallback(data: bytes, addr: Any) -> None:
        seen.append(data)
        got_one.set()

    async with running(alice) as endpoint:
        client = StunClient(endpoint, fallback=fallback)
        request = bytes(
            stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        )
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.sendto(request, endpoint.local_address)
            await asyncio.wait_for(got_one.wait(), WAIT)
            assert seen == [request]
            # Closed, the client hands the endpoint back to the fallback directly.
            client.close()
            got_one.clear()
            peer.sendto(request, endpoint.local_address)
            await asyncio.wait_for(got_one.wait(), WAIT)
            assert seen == [request, request]
        with pytest.raises(RuntimeError):
            await client.query(("127.0.0.1", 9))


# ---------------------------------------------------------------- host candidates


def test_host_candidates_of_this_machine() -> None:
    found = host_candidates(4433)
    assert found == host_candidates(4433)  # stable
    for candidate in found:
        ip = ipaddress.ip_address(candidate.address)
        assert (candidate.kind, candidate.port) == ("host", 4433)
        assert not ip.is_link_local
        assert not ip.is_multicast and not ip.is_unspecified
    assert len({c.address for c in found}) == len(found)
    non_loopback = [c for c in found if not ipaddress.ip_address(c.address).is_loopback]
    if non_loopback:
        assert found == non_loopback
    with_loopback = host_candidates(4433, include_loopback=True)
    assert Candidate("host", "127.0.0.1", 4433) in with_loopback
    assert with_loopback[: len(non_loopback)] == non_loopback  # loopback goes last


def adapter(name: str, *addresses: str) -> ifaddr.Adapter:
    ips = [ifaddr.IP((a, 0, 0) if ":" in a else a, 64 if ":" in a else 24, name) for a in addresses]
    return ifaddr.Adapter(name, name, ips)


def test_host_candidates_filter_and_order(monkeypatch: pytest.MonkeyPatch) -> None:
    adapters = [
        adapter("lo", "127.0.0.1", "::1"),
        adapter("wan", "81.2.69.160", "2001:db8::7", "fe80::1", "169.254.3.3"),
        adapter("lan", "192.168.1.20", "fd00::20", "fe80::2"),
        adapter("docker", "172.17.0.1", "192.168.1.20"),
        adapter("odd", "224.0.0.1", "0.0.0.0", "fec0::1"),
    ]
    monkeypatch.setattr(ifaddr, "get_adapters", lambda: adapters)
    assert [c.address for c in host_candidates(1)] == [
        "172.17.0.1",
        "192.168.1.20",
        "fd00::20",
        "81.2.69.160",
        "2001:db8::7",
    ]
    assert [c.address for c in host_candidates(1, families=(4,), include_loopback=True)] == [
        "172.17.0.1",
        "192.168.1.20",
        "81.2.69.160",
        "127.0.0.1",
    ]
    # A machine with nothing but loopback still offers loopback.
    monkeypatch.setattr(ifaddr, "get_adapters", lambda: adapters[:1])
    assert [c.address for c in host_candidates(1)] == ["127.0.0.1", "::1"]


# ---------------------------------------------------------------- hostile candidate input


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ({"kind": "host", "address": "10.0.0.1", "port": 1}, Candidate("host", "10.0.0.1", 1)),
        (
            {"kind": "srflx", "address": "::FFFF:1.2.3.4", "port": 65535, "extra": [1]},
            Candidate("srflx", "1.2.3.4", 65535),
        ),
        (
            {"kind": "host", "address": "2001:DB8:0:0::1", "port": 9},
            Candidate("host", "2001:db8::1", 9),
        ),
        ({"kind": "relay", "address": DEVICE_ID.upper(), "port": 0}, Candidate.relay(DEVICE_ID)),
    ],
)
def test_from_wire_accepts_and_canonicalises(wire: object, expected: Candidate) -> None:
    assert Candidate.from_wire(wire) == expected
    assert Candidate.from_wire(expected.to_wire()) == expected


@pytest.mark.parametrize(
    "wire",
    [
        None,
        [],
        "host 1.2.3.4 5",
        {},
        {"kind": "host", "address": "1.2.3.4"},
        {"kind": "prflx", "address": "1.2.3.4", "port": 5},  # a kind we do not speak
        {"kind": "turn", "address": "1.2.3.4", "port": 0},
        {"kind": "turn", "address": "169.254.1.1", "port": 5},
        {"kind": ["host"], "address": "1.2.3.4", "port": 5},
        {"kind": "host", "address": "1.2.3.4", "port": True},
        {"kind": "host", "address": "1.2.3.4", "port": 5.0},
        {"kind": "host", "address": "1.2.3.4", "port": "5"},
        {"kind": "host", "address": "1.2.3.4", "port": 0},
        {"kind": "host", "address": "1.2.3.4", "port": 65536},
        {"kind": "host", "address": "1.2.3", "port": 5},
        {"kind": "host", "address": "example.com", "port": 5},
        {"kind": "host", "address": "", "port": 5},
        {"kind": "host", "address": "1" * 10_000, "port": 5},
        {"kind": "host", "address": 16909060, "port": 5},
        {"kind": "host", "address": "0.0.0.0", "port": 5},
        {"kind": "host", "address": "::", "port": 5},
        {"kind": "host", "address": "255.255.255.255", "port": 5},
        {"kind": "host", "address": "239.1.2.3", "port": 5},
        {"kind": "host", "address": "ff02::1", "port": 5},
        {"kind": "host", "address": "169.254.1.1", "port": 5},
        {"kind": "host", "address": "fe80::1", "port": 5},
        {"kind": "host", "address": "fe80::1%eth0", "port": 5},
        {"kind": "host", "address": " 1.2.3.4", "port": 5},
        {"kind": "relay", "address": "1.2.3.4", "port": 0},
        {"kind": "relay", "address": DEVICE_ID, "port": 443},
        {"kind": "relay", "address": DEVICE_ID[:-1] + "g", "port": 0},
    ],
)
def test_from_wire_refuses_garbage(wire: object) -> None:
    with pytest.raises(ValueError):
        Candidate.from_wire(wire)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
candidate_like = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["host", "srflx", "relay", "turn"]) | json_values,
        "address": st.ip_addresses().map(str)
        | st.text(alphabet="0123456789abcdefABCDEF:.%", max_size=70)
        | json_values,
        "port": st.integers(-5, 70_000) | json_values,
    }
)


@given(st.one_of(json_values, candidate_like))
def test_from_wire_never_fails_otherwise(wire: object) -> None:
    try:
        candidate = Candidate.from_wire(wire)
    except ValueError:
        return
    assert Candidate.from_wire(candidate.to_wire()) == candidate
    if candidate.kind != "relay":
        assert canonical_ip(candidate.address) == candidate.address


@given(st.ip_addresses(), st.integers(1, 65535), st.sampled_from(["host", "srflx"]))
def test_usable_addresses_round_trip(ip: Any, port: int, kind: str) -> None:
    try:
        address = canonical_ip(str(ip))
    except ValueError:
        assert (
            ip.is_link_local
            or ip.is_multicast
            or ip.is_unspecified
            or ip.is_reserved
            or (ip.version == 6 and (ip.is_site_local or ip.ipv4_mapped is not None))
        )
        return
    candidate = Candidate.from_wire({"kind": kind, "address": str(ip), "port": port})
    assert candidate.address == address
    assert Candidate.from_wire(candidate.to_wire()) == candidate


def test_parse_candidates() -> None:
    good = Candidate("host", "10.0.0.1", 5)
    wire = [good.to_wire(), {"kind": "turn"}, good.to_wire(), Candidate.relay(DEVICE_ID).to_wire()]
    assert parse_candidates(wire) == [good, Candidate.relay(DEVICE_ID)]
    assert Candidate.relay(DEVICE_ID).transport_address == relay_address(DEVICE_ID)
    assert good.transport_address == ("10.0.0.1", 5)
    with pytest.raises(ValueError):
        parse_candidates({"candidates": []})
    with pytest.raises(ValueError):
        parse_candidates([good.to_wire()] * 33)


def wire(*candidates: Candidate) -> list[dict[str, Any]]:
    return [c.to_wire() for c in candidates]


OWN = frozenset({"192.168.1.20", "fd00::20"})
LOOPBACK = [Candidate("host", "127.0.0.1", port) for port in range(1000, 1032)]


def test_peer_candidates_read_at_most_sixteen() -> None:
    public = [Candidate("srflx", "203.0.113.9", port) for port in range(2000, 2032)]
    assert peer_candidates(wire(*public), own=OWN) == public[:MAX_PEER_CANDIDATES]
    # Entries past the limit are not even parsed: garbage there costs nothing.
    assert peer_candidates([*wire(public[0]), *[{"kind": "x"}] * 10_000], own=OWN) == public[:1]
    with pytest.raises(ValueError):
        peer_candidates({"kind": "host"}, own=OWN)


def test_loopback_candidates_only_from_this_host() -> None:
    lan = Candidate("host", "192.168.1.77", 4000)
    v6_loopback = Candidate("host", "::1", 4000)
    # Another machine: its loopback is ours, so none of it is a target.
    assert peer_candidates(wire(*LOOPBACK), own=OWN) == []
    assert peer_candidates(wire(lan, v6_loopback, *LOOPBACK[:2]), own=OWN) == [lan]
    # The same machine: it advertises one of our own addresses.
    ours = Candidate("host", "192.168.1.20", 4000)
    assert peer_candidates(wire(ours, *LOOPBACK[:2]), own=OWN) == [ours, *LOOPBACK[:2]]
    # Same NAT (an srflx or a host address that is not ours) is not the same host.
    srflx = Candidate("srflx", "192.168.1.20", 4000)
    assert peer_candidates(wire(srflx, *LOOPBACK[:1]), own=OWN) == [srflx]
    # Link-local never, same host or not.
    link_local = {"kind": "host", "address": "fe80::1", "port": 4000}
    assert peer_candidates([link_local, ours.to_wire()], own=OWN) == [ours]


def test_same_host_rule() -> None:
    loopback = Candidate("host", "127.0.0.1", 1)
    assert same_host([Candidate("host", "fd00::20", 1), loopback], OWN)
    assert same_host([Candidate("host", "fd00::20", 1), Candidate("host", "192.168.1.20", 1)], OWN)
    assert not same_host([Candidate("host", "fd00::21", 1)], OWN)
    assert not same_host([loopback], OWN)
    assert not same_host([], OWN)
    # One shared address is not enough: docker's bridge is 172.17.0.1 on every docker host.
    bridge = frozenset({*OWN, "172.17.0.1"})
    elsewhere = [Candidate("host", "172.17.0.1", 1), Candidate("host", "192.168.1.77", 1)]
    assert not same_host(elsewhere, bridge)
    assert same_host([Candidate("host", "172.17.0.1", 1)], bridge)
    # A machine with nothing but loopback can only meet peers on itself.
    assert same_host([Candidate("host", "127.0.0.1", 1)], frozenset())


def test_own_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    adapters = [
        adapter("lo", "127.0.0.1", "::1"),
        adapter("lan", "192.168.1.20", "fd00::20", "fe80::2", "169.254.3.3"),
    ]
    monkeypatch.setattr(ifaddr, "get_adapters", lambda: adapters)
    assert own_addresses() == OWN
    monkeypatch.setattr(ifaddr, "get_adapters", lambda: adapters[:1])
    assert own_addresses() == frozenset()


# ---------------------------------------------------------------- NAT guess


HOST = [Candidate("host", "192.168.1.2", 5000)]


@pytest.mark.parametrize(
    ("answers", "guess"),
    [
        ({}, "unknown"),
        ({("198.51.100.1", 3478): ("192.168.1.2", 5000)}, "open"),
        ({("198.51.100.1", 3478): ("::ffff:192.168.1.2", 5000)}, "open"),
        ({("198.51.100.1", 3478): ("203.0.113.9", 40000)}, "unknown"),
        (
            {
                ("198.51.100.1", 3478): ("203.0.113.9", 40000),
                ("198.51.100.2", 3478): ("203.0.113.9", 40000),
            },
            "cone",
        ),
        (
            {
                ("198.51.100.1", 3478): ("203.0.113.9", 40000),
                ("198.51.100.1", 3479): ("203.0.113.9", 40001),
            },
            "symmetric",
        ),
    ],
)
def test_nat_type_guess(answers: dict[tuple[str, int], tuple[str, int]], guess: str) -> None:
    assert nat_type_guess(HOST, answers) == guess


async def test_probe_nat_against_the_real_server(
    stun_server: tuple[str, int], alice: identity.Identity
) -> None:
    async with running(alice) as endpoint:
        with StunClient(endpoint) as client, silent_udp_port() as silent:
            host = await gather(endpoint, None)
            # One server port answers (our own address: "open"), a silent one is left out.
            servers = [stun_server, silent.getsockname()]
            assert await probe_nat(client, servers, host, timeout=0.5) == "open"
            assert await probe_nat(client, [silent.getsockname()], host, timeout=0.3) == ("unknown")


def test_a_turn_candidate_is_a_relayed_address_never_dialed_directly() -> None:
    turn = Candidate.from_wire({"kind": "turn", "address": "::ffff:203.0.113.5", "port": 3479})
    assert turn == Candidate("turn", "203.0.113.5", 3479)
    assert not turn.direct and Candidate("srflx", "203.0.113.5", 3479).direct
    assert turn.transport_address == ("203.0.113.5", 3479)


def test_a_loopback_turn_candidate_is_kept_for_the_turn_server_to_judge() -> None:
    """Our socket never sends to it; the TURN server decides whether it relays to loopback."""
    wire = [
        {"kind": "host", "address": "127.0.0.1", "port": 4000},
        {"kind": "turn", "address": "127.0.0.1", "port": 50000},
    ]
    assert peer_candidates(wire, own={"192.0.2.2"}) == [Candidate("turn", "127.0.0.1", 50000)]
