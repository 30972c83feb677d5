"""TurnRelay's data path without a TURN server: what it sends for a bound channel, and what
it lets through to the endpoint (only a known peer's channel). coturn itself: test_turn.py."""

from __future__ import annotations

import asyncio
import struct
import time

import pytest
from aioice.turn import TurnClientUdpProtocol

from meshagent_gui.core.mesh.client import MeshError
from meshagent_gui.core.mesh.types import ServerInfo, TurnCredentials
from meshagent_gui.core.p2p.endpoint import relay_address
from meshagent_gui.core.p2p.engine import Address
from meshagent_gui.core.p2p.relay import RelayLink, TurnRelay, turn_server

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


async def test_a_channel_due_for_refresh_keeps_carrying_and_is_refreshed_once() -> None:
    relay, _, io = _relay_with_channel()
    assert relay._client is not None
    relay._client.channel_refresh_at[0x4000] = time.time() - 1  # aioice's refresh time passed
    refreshes: list[Address] = []

    async def refresh(client: object, target: Address) -> None:
        refreshes.append(target)
        await asyncio.Event().wait()  # the server has not answered yet

    relay._bind_channel = refresh  # type: ignore[method-assign]
    for _ in range(3):  # a flight of sends while the refresh is out
        assert relay.send([b"quic"], relay_address(PEER))
    await asyncio.sleep(0)
    assert len(io.sent) == 3  # nothing lost: the server still holds the binding
    assert refreshes == [PEER_RELAYED]  # one ChannelBind, not one per send
    await relay.close()


# ---------------------------------------------------------------------------- RelayLink's choice


class FakeWebSocket:
    """Stands for a connected relay WebSocket (RelayLink only checks that it has one)."""


def _link_with(turn: TurnRelay | None, client: object = None) -> RelayLink:
    link = RelayLink(client, FakeEndpoint())  # type: ignore[arg-type]
    link._ws = FakeWebSocket()  # type: ignore[assignment]
    link.turn = turn
    return link


async def test_a_peer_signalling_gave_a_relayed_address_goes_by_turn_the_rest_by_the_server() -> (
    None
):
    turn, _, io = _relay_with_channel()
    link = _link_with(turn)
    link.send([b"quic"], relay_address(PEER))
    link.send([b"quic"], relay_address(STRANGER))
    assert len(io.sent) == 1 and len(link._outbox) == 1  # one each way
    assert link.turn_carries(PEER) and not link.turn_carries(STRANGER)

    link.forget_turn_peer(PEER)  # TURN did not get through: the server relay again
    link.send([b"quic"], relay_address(PEER))
    assert len(io.sent) == 1 and len(link._outbox) == 2


async def test_a_replaced_allocation_carries_its_peers_until_they_are_signalled_again() -> None:
    old, _, old_io = _relay_with_channel()
    new, _, new_io = _relay_with_channel(channel=0x4001)
    new.remove_peer(PEER)  # the fresh allocation knows nobody yet
    link = _link_with(new)
    link._retiring.append(old)
    link.send([b"quic"], relay_address(PEER))
    assert len(old_io.sent) == 1 and not new_io.sent and not link._outbox
    link.add_turn_peer(PEER, PEER_RELAYED)  # the next offer/answer: the new one takes over
    link.send([b"quic"], relay_address(PEER))
    assert len(old_io.sent) == 1 and len(new_io.sent) == 1


async def test_a_channel_the_turn_server_refuses_sends_that_peer_back_to_the_server_relay() -> None:
    turn, _, _ = _relay_with_channel()

    class Refusing:
        async def send_data(self, data: bytes, addr: Address) -> None:
            raise ConnectionError("403 Forbidden IP")

    await turn._bind_channel(Refusing(), PEER_RELAYED)  # type: ignore[arg-type]
    assert not turn.knows(PEER)
    assert not turn.send([b"quic"], relay_address(PEER))


class FakeClient:
    def __init__(self, turn_urls: list[str], credentials: Exception | TurnCredentials) -> None:
        self.turn_urls = turn_urls
        self.credentials = credentials
        self.asked = 0

    async def info(self) -> ServerInfo:
        return ServerInfo(
            server_id="s", name="s", version="0", time=time.time(), turn_urls=self.turn_urls
        )

    async def turn_credentials(self) -> TurnCredentials:
        self.asked += 1
        if isinstance(self.credentials, Exception):
            raise self.credentials
        return self.credentials


async def test_no_turn_advertised_means_no_allocation_and_no_credentials_asked() -> None:
    client = FakeClient([], MeshError("unused", code="x"))
    link = _link_with(None, client)
    assert await link._allocate() is None
    assert link.turn is None and client.asked == 0


async def test_refused_credentials_leave_the_server_relay_and_retry_later() -> None:
    client = FakeClient(["turn:127.0.0.1:3478"], MeshError("slow down", code="rate_limited"))
    link = _link_with(None, client)
    first = await link._allocate()
    second = await link._allocate()
    assert first is not None and second is not None and 0 < first < second * 2
    assert link.turn is None and client.asked == 2


async def test_credentials_naming_no_usable_turn_url_are_not_used() -> None:
    issued = TurnCredentials(
        urls=["turns:turn.example:5349"], username="1:x", password="p", expires_at=2
    )
    link = _link_with(None, FakeClient(["turns:turn.example:5349"], issued))
    assert await link._allocate() is None and link.turn is None


@pytest.mark.parametrize(
    ("urls", "server"),
    [
        (["turn:127.0.0.1:3480"], ("127.0.0.1", 3480)),
        (["turn:127.0.0.1"], ("127.0.0.1", 3478)),
        (["turn:[::1]:3479?transport=udp"], ("::1", 3479)),
        (
            ["turns:127.0.0.1:5349", "turn:127.0.0.1:1?transport=tcp", "turn:127.0.0.1:9"],
            ("127.0.0.1", 9),
        ),
        (["turn:127.0.0.1:0", "turn::3478", "stun:127.0.0.1:3478", "garbage"], None),
        ([], None),
    ],
)
async def test_the_agent_uses_the_first_udp_turn_url(
    urls: list[str], server: Address | None
) -> None:
    assert await turn_server(urls) == server
