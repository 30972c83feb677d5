"""TurnRelay's data path without a TURN server: what it sends for a bound channel, and what
it lets through to the endpoint (only a known peer's channel). coturn itself: test_turn.py."""

from __future__ import annotations

import asyncio
import struct
import time

from aioice.turn import TurnClientUdpProtocol

from meshagent_gui.core.p2p.endpoint import relay_address
from meshagent_gui.core.p2p.engine import Address
from meshagent_gui.core.p2p.relay import TurnRelay

PEER = "ab" * 32
STRANGER = "cd" * 32
SERVER: Address = ("192.0.2.10", 3478)
PEER_RELAYED: Address = ("192.0.2.10", 50000)


class FakeEndpoint:
    def __init__(self) -> None:
        self.fed: list[tuple[bytes, Address]] = []

    def feed_datagrams(self, datagrams: list[tuple[bytes, Address]]) -> None:
        self.fed += datagrams


class FakeIO:
    name = "fake"

    def __init__(self) -> None:
        self.sent: list[tuple[list[bytes], Address]] = []
        self.inbox: list[tuple[bytes, Address]] = []

    def receive(self) -> list[tuple[bytes, Address]]:
        received, self.inbox = self.inbox, []
        return received

    def send(self, datagrams: list[bytes], addr: Address) -> int:
        self.sent.append((datagrams, addr))
        return len(datagrams)


def _relay_with_channel(channel: int = 0x4000) -> tuple[TurnRelay, FakeEndpoint, FakeIO]:
    """A relay whose allocation is up and whose channel to PEER is bound (as aioice leaves it)."""
    endpoint = FakeEndpoint()
    relay = TurnRelay(endpoint)  # type: ignore[arg-type]
    client = TurnClientUdpProtocol(SERVER, "user", "pass", 600, 300)
    client.peer_to_channel[PEER_RELAYED] = channel
    client.channel_to_peer[channel] = PEER_RELAYED
    client.channel_refresh_at[channel] = time.time() + 300
    io = FakeIO()
    relay._client, relay._io, relay._server = client, io, SERVER
    relay.relayed_address = ("192.0.2.10", 50001)
    relay.add_peer(PEER, PEER_RELAYED)
    return relay, endpoint, io


async def test_datagrams_for_a_known_peer_go_out_as_channel_data() -> None:
    relay, _, io = _relay_with_channel()
    assert relay.send([b"\xc0one", b"\x40two"], relay_address(PEER))
    assert io.sent == [([b"\x40\x00\x00\x04\xc0one", b"\x40\x00\x00\x04\x40two"], SERVER)]
    assert relay.stats.datagrams_out == 2


async def test_datagrams_for_other_peers_or_real_addresses_are_not_ours() -> None:
    relay, _, io = _relay_with_channel()
    assert not relay.send([b"x"], relay_address(STRANGER))
    assert not relay.send([b"x"], ("198.51.100.1", 443))
    assert io.sent == []


async def test_only_a_known_peers_channel_reaches_the_endpoint() -> None:
    relay, endpoint, io = _relay_with_channel()
    header = struct.Struct("!HH").pack
    io.inbox = [
        (header(0x4000, 3) + b"abc", SERVER),  # our peer's channel
        (header(0x4001, 3) + b"xyz", SERVER),  # a channel nobody bound
        (header(0x4000, 0), SERVER),  # empty: a channel binding's probe
        (b"\x40", SERVER),  # truncated garbage
    ]
    relay._on_readable()
    assert endpoint.fed == [(b"abc", relay_address(PEER))]
    assert relay.stats.unknown_sources == 1


async def test_a_peer_that_moves_is_not_reachable_at_its_old_address() -> None:
    relay, endpoint, _ = _relay_with_channel()
    relay.add_peer(PEER, ("192.0.2.10", 50002))  # a new allocation, announced again
    await asyncio.sleep(0)  # the new binding's task starts (and fails: no transport)
    relay.datagram_received(b"late", PEER_RELAYED)
    relay._flush_inbound()
    assert endpoint.fed == []
    assert relay.stats.unknown_sources == 1
