"""The WebRTC DataChannel transport: two aiortc peer connections in one process, on loopback.

Streams both ways, backpressure against a reader that stops, resets and stop-sending, the
connection's close with its code, many streams at once, and a peer that breaks the transport
rules (records, credit, labels).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import aioice.ice
import pytest

from meshagent_gui import identity
from meshagent_gui.core.p2p.errors import (
    CloseCode,
    ConnectionClosedError,
    PeerAuthenticationError,
    StreamResetError,
)
from meshagent_gui.core.p2p.streams import INITIAL_CREDIT, PeerStream
from meshagent_gui.core.p2p.webrtc import (
    CONTROL_LABEL,
    PROTOCOL,
    CandidateBudget,
    DataChannelConnection,
    WebRTCSettings,
    certificate_fingerprint,
    new_peer_connection,
    parse_candidate,
    rtc_certificate,
    sdp_fingerprints,
)

TIMEOUT = 15.0


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """ICE on 127.0.0.1 only: hermetic, whatever interfaces the machine has."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])
    yield


async def negotiate(dialer: DataChannelConnection, listener: DataChannelConnection) -> None:
    """Offer/answer in memory (aiortc puts every candidate in its SDP: no trickle needed)."""
    await dialer.pc.setLocalDescription(await dialer.pc.createOffer())
    await listener.pc.setRemoteDescription(dialer.pc.localDescription)
    await listener.pc.setLocalDescription(await listener.pc.createAnswer())
    await dialer.pc.setRemoteDescription(listener.pc.localDescription)


@asynccontextmanager
async def connected(
    alice: identity.Identity,
    bob: identity.Identity,
    *,
    settings: WebRTCSettings | None = None,
    establish: bool = True,
    expected: str | None = None,
) -> AsyncIterator[tuple[DataChannelConnection, DataChannelConnection]]:
    """alice dials bob over WebRTC: (dialer, listener), both verified (and established)."""
    dialer = DataChannelConnection(
        new_peer_connection(rtc_certificate(alice)),
        is_dialer=True,
        expected_peer_id=expected or bob.device_id,
        settings=settings,
    )
    listener = DataChannelConnection(
        new_peer_connection(rtc_certificate(bob)), is_dialer=False, settings=settings
    )
    try:
        await negotiate(dialer, listener)
        await asyncio.gather(dialer.wait_connected(TIMEOUT), listener.wait_connected(TIMEOUT))
        if establish:
            listener.establish()
        yield dialer, listener
    finally:
        await asyncio.gather(dialer.aclose(), listener.aclose())


async def read_all(stream: PeerStream) -> bytes:
    parts = []
    while part := await asyncio.wait_for(stream.read(1 << 20), TIMEOUT):
        parts.append(part)
    return b"".join(parts)


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# ------------------------------------------------------------------ identity


async def test_dtls_fingerprints_are_the_device_ids(
    alice: identity.Identity, bob: identity.Identity
) -> None:
    assert certificate_fingerprint(rtc_certificate(alice)) == alice.device_id
    async with connected(alice, bob) as (dialer, listener):
        assert dialer.peer_id == bob.device_id
        assert listener.peer_id == alice.device_id
        assert sdp_fingerprints(dialer.pc.localDescription.sdp) == {alice.device_id}
        assert await dialer.ping() < 1.0 and await listener.ping() < 1.0
        stats = dialer.stats()
        assert stats.datagrams_sent > 0 and stats.bytes_received > 0
        assert stats.smoothed_rtt is not None and stats.remote_address[0] == "127.0.0.1"


async def test_a_dialer_refuses_a_listener_that_is_not_the_device_it_meant(
    alice: identity.Identity, bob: identity.Identity, mallory: identity.Identity
) -> None:
    with pytest.raises(PeerAuthenticationError) as refused:
        async with connected(alice, bob, expected=mallory.device_id):
            pass
    assert refused.value.info.code == CloseCode.PEER_ID_MISMATCH


# ------------------------------------------------------------------ streams


async def test_streams_carry_bytes_both_ways_in_order(
    alice: identity.Identity, bob: identity.Identity
) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    async with connected(alice, bob) as (dialer, listener):
        ours = await dialer.open_stream()

        async def send() -> None:
            await ours.write(payload)  # past the initial credit: needs the reader's grants
            ours.write_eof()

        sender = asyncio.create_task(send())
        theirs = await asyncio.wait_for(listener.accept_stream(), TIMEOUT)
        assert theirs.stream_id == ours.stream_id == 0
        assert digest(await read_all(theirs)) == digest(payload)
        await sender

        # and back, on the same stream and on one the listener opens
        await theirs.write(b"thanks")
        theirs.write_eof()
        assert await read_all(ours) == b"thanks"
        back = await listener.open_stream()
        assert back.stream_id == 1
        await back.write(payload[:1000])
        await back.close()
        arrived = await asyncio.wait_for(dialer.accept_stream(), TIMEOUT)
        assert await read_all(arrived) == payload[:1000]


async def test_a_reader_that_stops_stalls_the_writer_with_bounded_memory(
    alice: identity.Identity, bob: identity.Identity
) -> None:
    settings = WebRTCSettings(stream_window=1024 * 1024, max_unsent=256 * 1024)
    async with connected(alice, bob, settings=settings) as (dialer, listener):
        ours = await dialer.open_stream()
        total = 8 * 1024 * 1024
        block = os.urandom(256 * 1024)

        async def write_all() -> None:
            for _ in range(total // len(block)):
                await ours.write(block)
            ours.write_eof()

        writer = asyncio.create_task(write_all())
        theirs = await asyncio.wait_for(listener.accept_stream(), TIMEOUT)
        async with asyncio.timeout(TIMEOUT):  # nobody reads: the writer comes to a stop
            while True:
                before = ours.written
                await asyncio.sleep(0.5)
                if ours.written == before:
                    break
        assert not writer.done()
        # what the reader holds is at most its window; what the writer queued, its bound
        assert theirs.buffered <= settings.stream_window + INITIAL_CREDIT
        assert ours.unsent <= settings.max_unsent
        assert ours.written <= settings.stream_window + INITIAL_CREDIT + settings.max_unsent

        received = 0
        while chunk := await asyncio.wait_for(theirs.read(1 << 20), TIMEOUT):
            received += len(chunk)
        await asyncio.wait_for(writer, TIMEOUT)
        assert received == total


async def test_reset_and_stop_sending_reach_the_other_side_with_their_code(
    alice: identity.Identity, bob: identity.Identity
) -> None:
    async with connected(alice, bob) as (dialer, listener):
        ours = await dialer.open_stream()
        await ours.write(b"partial")
        ours.reset(0x21)
        theirs = await asyncio.wait_for(listener.accept_stream(), TIMEOUT)
        with pytest.raises(StreamResetError) as reset:
            while await asyncio.wait_for(theirs.read(100), TIMEOUT):
                pass
        assert reset.value.error_code == 0x21

        # the reader asks the writer to stop: the writer's next write fails with that code
        second = await dialer.open_stream()
        await second.write(b"x")
        peer = await asyncio.wait_for(listener.accept_stream(), TIMEOUT)
        peer.stop_reading(0x27)
        with pytest.raises(StreamResetError) as stopped:
            async with asyncio.timeout(TIMEOUT):
                while True:
                    await second.write(b"y" * 1024)
                    await asyncio.sleep(0.01)
        assert stopped.value.error_code == 0x27


async def test_many_streams_at_once(alice: identity.Identity, bob: identity.Identity) -> None:
    count = 60
    async with connected(alice, bob) as (dialer, listener):

        async def echo_server() -> None:
            async with asyncio.TaskGroup() as tasks:
                for _ in range(count):
                    stream = await asyncio.wait_for(listener.accept_stream(), TIMEOUT)
                    tasks.create_task(echo(stream))

        async def echo(stream: PeerStream) -> None:
            data = await read_all(stream)
            await stream.write(data[::-1])
            stream.write_eof()

        async def client(n: int) -> None:
            stream = await dialer.open_stream()
            payload = os.urandom(32 * 1024 + n)
            await stream.write(payload)
            stream.write_eof()
            assert await read_all(stream) == payload[::-1]

        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(echo_server())
            for n in range(count):
                tasks.create_task(client(n))
        # finished streams free their channels on both sides
        await asyncio.sleep(0.5)
        assert len(dialer._pipes) == 0 and len(listener._pipes) == 0


# ------------------------------------------------------------------ closing


async def test_close_reaches_the_peer_with_its_code_and_ends_every_stream(
    alice: identity.Identity, bob: identity.Identity
) -> None:
    async with connected(alice, bob) as (dialer, listener):
        ours = await dialer.open_stream()
        await ours.write(b"hello")
        theirs = await asyncio.wait_for(listener.accept_stream(), TIMEOUT)
        assert await theirs.read(5) == b"hello"
        blocked_read = asyncio.create_task(ours.read(10))
        await asyncio.sleep(0.05)
        listener.close(0x123, "bye now")
        info = await asyncio.wait_for(dialer.wait_closed(), TIMEOUT)
        assert (info.code, info.reason, info.by_peer, info.application) == (
            0x123,
            "bye now",
            True,
            True,
        )
        with pytest.raises(ConnectionClosedError):
            await asyncio.wait_for(blocked_read, TIMEOUT)
        with pytest.raises(ConnectionClosedError):
            await dialer.open_stream()
        with pytest.raises(ConnectionClosedError):
            await ours.write(b"more")


async def test_a_peer_that_vanishes_ends_the_connection(
    alice: identity.Identity, bob: identity.Identity
) -> None:
    async with connected(alice, bob) as (dialer, listener):
        await listener.pc.close()  # no close record: the control channel just goes
        info = await asyncio.wait_for(dialer.wait_closed(), TIMEOUT)
        assert info.by_peer
        with pytest.raises(ConnectionClosedError):
            await dialer.ping(1.0)


# ------------------------------------------------------------------ a peer that breaks the rules


async def raw_channel(
    conn: DataChannelConnection, label: str, *, protocol: str = PROTOCOL
) -> object:
    channel = conn.pc.createDataChannel(label, protocol=protocol)
    opened = asyncio.Event()
    channel.on("open", opened.set)
    await asyncio.wait_for(opened.wait(), TIMEOUT)
    return channel


@pytest.mark.parametrize(
    ("label", "messages", "code"),
    [
        ("mesh-stream/0", ["credit -5"], CloseCode.PROTOCOL_ERROR),
        ("mesh-stream/0", ["fin", b"after the end"], CloseCode.PROTOCOL_ERROR),
        ("mesh-stream/0", ["hello"], CloseCode.PROTOCOL_ERROR),
        ("mesh-stream/0", [b"x" * 60_000] * 3, CloseCode.FLOW_CONTROL_ERROR),
        ("mesh-stream/1", [b"wrong parity"], CloseCode.PROTOCOL_ERROR),
        ("mesh-stream/007", [b"odd label"], CloseCode.PROTOCOL_ERROR),
        (CONTROL_LABEL, ["ping 1"], CloseCode.PROTOCOL_ERROR),
    ],
    ids=[
        "bad-record",
        "data-after-fin",
        "unknown-record",
        "past-credit",
        "parity",
        "label",
        "control",
    ],
)
async def test_transport_rule_breakers_are_disconnected(
    alice: identity.Identity,
    bob: identity.Identity,
    label: str,
    messages: list[bytes | str],
    code: int,
) -> None:
    async with connected(alice, bob) as (dialer, listener):
        channel = await raw_channel(dialer, label)
        for message in messages:
            channel.send(message)  # type: ignore[attr-defined]
        info = await asyncio.wait_for(listener.wait_closed(), TIMEOUT)
        assert info.code == code and not info.by_peer
        assert (await asyncio.wait_for(dialer.wait_closed(), TIMEOUT)).code == code


async def test_a_channel_of_another_protocol_is_refused(
    alice: identity.Identity, bob: identity.Identity
) -> None:
    async with connected(alice, bob) as (dialer, listener):
        dialer.pc.createDataChannel("mesh-stream/0", protocol="chat")
        info = await asyncio.wait_for(listener.wait_closed(), TIMEOUT)
        assert info.code == CloseCode.PROTOCOL_ERROR


async def test_streams_are_held_until_the_listener_admits_the_peer(
    alice: identity.Identity, bob: identity.Identity
) -> None:
    async with connected(alice, bob, establish=False) as (dialer, listener):
        first = await dialer.open_stream()
        second = await dialer.open_stream()
        await first.write(b"hello")

        async def send() -> None:
            await second.write(b"x" * (INITIAL_CREDIT + 1000))  # past the initial credit: waits
            second.write_eof()

        sender = asyncio.create_task(send())
        handshake = await asyncio.wait_for(listener.wait_first_stream(), TIMEOUT)
        listener.hand_first_stream(handshake)
        assert await handshake.read(5) == b"hello"
        accept = asyncio.create_task(listener.accept_stream())
        await asyncio.sleep(0.2)
        assert not accept.done()  # held: not visible before establish()
        listener.establish()
        held = await asyncio.wait_for(accept, TIMEOUT)
        assert held.stream_id == second.stream_id == 4
        assert not sender.done()
        assert len(await read_all(held)) == INITIAL_CREDIT + 1000
        await sender


# ------------------------------------------------------------------ candidates


def test_candidates_follow_the_quic_offer_rules() -> None:
    own = frozenset({"192.0.2.2"})
    lines = [
        "candidate:1 1 udp 2130706431 203.0.113.5 5000 typ host",
        "candidate:2 1 udp 2130706431 127.0.0.1 5001 typ host",  # loopback: not the same host
        "candidate:3 1 udp 2130706431 fe80::1 5002 typ host",  # link-local
        "candidate:4 1 tcp 2130706431 203.0.113.5 9 typ host tcptype active",
        "candidate:5 1 udp 2130706431 0b7d3c4e-1f2a-4c5d-9e8f-123456789abc.local 5003 typ host",
        "candidate:6 1 udp 1694498815 198.51.100.7 6000 typ srflx raddr 0.0.0.0 rport 0",
    ]
    budget = CandidateBudget(own)
    admitted = [budget.admit(c) for line in lines if (c := parse_candidate(line))]
    assert admitted == [True, False, False, False, True, True]

    same_host = CandidateBudget(own)
    sdp = "v=0\r\n" + "".join(
        f"a={line}\r\n"
        for line in (
            "candidate:2 1 udp 1 127.0.0.1 5001 typ host",
            "candidate:1 1 udp 1 192.0.2.2 5000 typ host",
        )
    )
    kept = same_host.filter_sdp(sdp)
    assert "127.0.0.1" in kept and "192.0.2.2" in kept  # every host address is ours

    flood = CandidateBudget(own)
    many = [f"candidate:{n} 1 udp 1 203.0.113.{n} 5000 typ host" for n in range(1, 40)]
    parsed = [c for line in many if (c := parse_candidate(line)) is not None]
    assert sum(flood.admit(c) for c in parsed) == 16
    assert parse_candidate("candidate:garbage") is None
