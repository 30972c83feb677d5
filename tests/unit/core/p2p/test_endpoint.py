"""The endpoint over real UDP sockets on 127.0.0.1, on both engines."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from meshagent_gui import identity
from meshagent_gui.core.p2p import (
    CloseCode,
    ConnectionClosedError,
    ConnectionState,
    Endpoint,
    EndpointSettings,
    PeerAuthenticationError,
    PeerConnection,
    PeerStream,
    StreamLimitError,
    StreamResetError,
    TransportSettings,
    Unauthorized,
)
from meshagent_gui.core.p2p.endpoint import stays_on_this_host

TIMEOUT = 10.0


@asynccontextmanager
async def endpoint(
    who: identity.Identity | FakeCredentials, engine: str, **kwargs: object
) -> AsyncIterator[Endpoint]:
    ep = Endpoint(who, engine=engine, **kwargs)  # type: ignore[arg-type]
    await ep.start("127.0.0.1", 0)
    try:
        yield ep
    finally:
        await ep.close()


def address(ep: Endpoint) -> tuple[str, int]:
    return ("127.0.0.1", ep.local_address[1])


@dataclasses.dataclass(frozen=True)
class FakeCredentials:
    """An impostor's credentials: any certificate, key and claimed id."""

    certificate_pem: bytes
    private_key_pem: bytes
    device_id: str


async def echo_all(conn: PeerConnection) -> None:
    async for stream in conn.streams():
        asyncio.get_running_loop().create_task(echo(stream))


async def echo(stream: PeerStream) -> None:
    while data := await stream.read(65536):
        await stream.write(data)
    await stream.close()


async def test_connect_and_exchange_data_both_ways(
    engine: str, alice: identity.Identity, bob: identity.Identity
) -> None:
    async with endpoint(alice, engine) as listener, endpoint(bob, engine) as dialer:
        conn = await dialer.connect(address(listener), alice.device_id, timeout=TIMEOUT)
        incoming = await asyncio.wait_for(listener.accept(), TIMEOUT)
        # Both ends know who is on the other side, verified.
        assert conn.peer_id == alice.device_id
        assert incoming.peer_id == bob.device_id
        assert conn.state is incoming.state is ConnectionState.ESTABLISHED
        assert conn.engine == incoming.engine == engine

        ours = await conn.open_stream()
        await ours.write(b"hello from bob")
        theirs = await asyncio.wait_for(incoming.accept_stream(), TIMEOUT)
        assert await theirs.readexactly(14) == b"hello from bob"
        await theirs.write(b"hello from alice")
        await theirs.close()
        assert await asyncio.wait_for(ours.readexactly(16), TIMEOUT) == b"hello from alice"
        assert await ours.read(1) == b""

        # The listener may open streams toward the dialer too.
        reverse = await incoming.open_stream()
        await reverse.write(b"ping")
        reverse.write_eof()
        accepted = await asyncio.wait_for(conn.accept_stream(), TIMEOUT)
        assert await accepted.read(100) == b"ping"
        assert 0 < await conn.ping() < TIMEOUT
        assert conn.stats().datagrams_received > 0


async def test_many_streams_on_one_connection(
    engine: str, alice: identity.Identity, bob: identity.Identity
) -> None:
    async with endpoint(alice, engine) as listener, endpoint(bob, engine) as dialer:
        conn = await dialer.connect(address(listener), alice.device_id, timeout=TIMEOUT)
        incoming = await asyncio.wait_for(listener.accept(), TIMEOUT)
        server = asyncio.create_task(echo_all(incoming))

        async def one(index: int) -> bytes:
            stream = await conn.open_stream()
            message = f"stream {index} ".encode() * (index + 1) * 50
            await stream.write(message)
            stream.write_eof()
            got = bytearray()
            while part := await stream.read(65536):
                got += part
            assert bytes(got) == message
            return bytes(got)

        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(60))), TIMEOUT)
        assert len(results) == 60
        conn.close()
        await asyncio.wait_for(server, TIMEOUT)


async def test_twenty_megabytes_through_one_stream_arrive_intact(
    engine: str, alice: identity.Identity, bob: identity.Identity
) -> None:
    payload = hashlib.sha256(b"seed").digest() * (20 * 1024 * 1024 // 32)
    async with endpoint(alice, engine) as listener, endpoint(bob, engine) as dialer:
        conn = await dialer.connect(address(listener), alice.device_id, timeout=TIMEOUT)
        incoming = await asyncio.wait_for(listener.accept(), TIMEOUT)

        async def receive() -> tuple[int, bytes]:
            stream = await incoming.accept_stream()
            digest, size = hashlib.sha256(), 0
            while data := await stream.read(1 << 20):
                digest.update(data)
                size += len(data)
            return size, digest.digest()

        receiver = asyncio.create_task(receive())
        stream = await conn.open_stream()
        await asyncio.wait_for(stream.write(payload), 60)
        await stream.close()
        size, digest = await asyncio.wait_for(receiver, 60)
        assert size == len(payload)
        assert digest == hashlib.sha256(payload).digest()


async def test_a_reader_that_stops_reading_bounds_what_the_writer_buffers(
    engine: str, alice: identity.Identity, bob: identity.Identity
) -> None:
    window, max_unsent = 256 * 1024, 64 * 1024
    settings = EndpointSettings(
        transport=TransportSettings(stream_window=window, connection_window=4 * window),
        max_unsent=max_unsent,
    )
    async with (
        endpoint(alice, engine, settings=settings) as listener,
        endpoint(bob, engine, settings=settings) as dialer,
    ):
        conn = await dialer.connect(address(listener), alice.device_id, timeout=TIMEOUT)
        incoming = await asyncio.wait_for(listener.accept(), TIMEOUT)
        stream = await conn.open_stream()
        total = 8 * window
        writer = asyncio.create_task(stream.write(b"q" * total))
        theirs = await asyncio.wait_for(incoming.accept_stream(), TIMEOUT)
        # Nobody reads: the writer stalls once the receiver's window and our queue are full.
        previous = -1
        while stream.written != previous:
            previous = stream.written
            await asyncio.sleep(0.2)
        assert not writer.done()
        assert stream.written <= window + max_unsent  # never more than a window ahead
        assert theirs.buffered <= window  # and the receiver holds at most one window
        assert stream.unsent <= max_unsent
        # Reading again lets everything through.
        received = 0
        while received < total:
            received += len(await asyncio.wait_for(theirs.read(1 << 20), TIMEOUT))
            assert theirs.buffered <= window
        await asyncio.wait_for(writer, TIMEOUT)


async def test_a_wrong_pinned_fingerprint_is_refused(
    engine: str, alice: identity.Identity, bob: identity.Identity, mallory: identity.Identity
) -> None:
    async with endpoint(mallory, engine) as impostor, endpoint(bob, engine) as dialer:
        with pytest.raises(PeerAuthenticationError) as caught:
            # Bob means to reach Alice, but Mallory answers at that address.
            await dialer.connect(address(impostor), alice.device_id, timeout=TIMEOUT)
        info = caught.value.info
        assert (info.code, info.application, info.by_peer) == (
            CloseCode.PEER_ID_MISMATCH,
            True,
            False,
        )
        assert impostor._accepted.empty()


@pytest.mark.parametrize("forgery", ["someone else's certificate", "a false claimed id"])
async def test_a_dialer_impersonating_another_device_is_refused(
    engine: str,
    forgery: str,
    alice: identity.Identity,
    bob: identity.Identity,
    mallory: identity.Identity,
) -> None:
    if forgery == "someone else's certificate":
        # Bob's certificate (so Bob's id), but only Mallory's key to sign with.
        fake = FakeCredentials(bob.certificate_pem, mallory.private_key_pem, bob.device_id)
    else:
        # Mallory's own certificate and key, claiming to be Bob.
        fake = FakeCredentials(mallory.certificate_pem, mallory.private_key_pem, bob.device_id)
    async with endpoint(alice, engine) as listener, endpoint(fake, engine) as dialer:
        with pytest.raises(PeerAuthenticationError) as caught:
            await dialer.connect(address(listener), alice.device_id, timeout=TIMEOUT)
        info = caught.value.info
        assert (info.code, info.by_peer) == (CloseCode.AUTH_FAILED, True)
        assert listener._accepted.empty()


async def test_the_authorize_hook_sees_the_first_stream_before_anything_else(
    engine: str, alice: identity.Identity, bob: identity.Identity
) -> None:
    seen: list[tuple[str, bytes]] = []

    async def authorize(conn: PeerConnection, first: PeerStream) -> bool:
        token = await first.readexactly(5)
        seen.append((conn.peer_id, token))
        if token != b"token":
            raise Unauthorized("bad token")
        await first.write(b"ok")
        return True

    async with (
        endpoint(alice, engine, authorize=authorize) as listener,
        endpoint(bob, engine) as dialer,
    ):
        conn = await dialer.connect(address(listener), alice.device_id, timeout=TIMEOUT)
        handshake = await conn.open_stream()
        other = await conn.open_stream()
        await other.write(b"early")  # held until the peer is authorized
        await handshake.write(b"token")
        assert await asyncio.wait_for(handshake.readexactly(2), TIMEOUT) == b"ok"
        incoming = await asyncio.wait_for(listener.accept(), TIMEOUT)
        assert seen == [(bob.device_id, b"token")]
        delivered = await asyncio.wait_for(incoming.accept_stream(), TIMEOUT)
        assert delivered.stream_id == other.stream_id  # the first stream stays with the hook
        assert await delivered.readexactly(5) == b"early"

        refused = await dialer.connect(address(listener), alice.device_id, timeout=TIMEOUT)
        first = await refused.open_stream()
        await first.write(b"wrong")
        info = await asyncio.wait_for(refused.wait_closed(), TIMEOUT)
        assert (info.code, info.reason, info.by_peer) == (CloseCode.UNAUTHORIZED, "bad token", True)


async def test_resets_reach_the_other_side(
    engine: str, alice: identity.Identity, bob: identity.Identity
) -> None:
    async with endpoint(alice, engine) as listener, endpoint(bob, engine) as dialer:
        conn = await dialer.connect(address(listener), alice.device_id, timeout=TIMEOUT)
        incoming = await asyncio.wait_for(listener.accept(), TIMEOUT)
        stream = await conn.open_stream()
        await stream.write(b"abc")
        theirs = await asyncio.wait_for(incoming.accept_stream(), TIMEOUT)
        assert await theirs.readexactly(3) == b"abc"
        stream.reset(42)
        with pytest.raises(StreamResetError) as caught:
            await asyncio.wait_for(theirs.read(10), TIMEOUT)
        assert caught.value.error_code == 42

        # STOP_SENDING: the reader asks the writer to stop.
        second = await conn.open_stream()
        await second.write(b"x")
        theirs = await asyncio.wait_for(incoming.accept_stream(), TIMEOUT)
        theirs.stop_reading(7)
        with pytest.raises(StreamResetError) as stopped:
            async with asyncio.timeout(TIMEOUT):
                while True:
                    await second.write(b"y" * 65536)
        assert stopped.value.error_code == 7


async def test_stun_datagrams_go_to_the_stun_handler(engine: str, alice: identity.Identity) -> None:
    got: asyncio.Queue[tuple[bytes, tuple[object, ...]]] = asyncio.Queue()
    async with endpoint(alice, engine, stun_handler=lambda d, a: got.put_nowait((d, a))) as ep:
        binding_request = (
            b"\x00\x01\x00\x00" + b"\x21\x12\xa4\x42" + b"transaction!"  # 12-byte id
        )
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.bind(("127.0.0.1", 0))
            client.sendto(b"\x00\x01\x00\x00not stun at all!!!!!", address(ep))
            client.sendto(binding_request, address(ep))
            data, source = await asyncio.wait_for(got.get(), TIMEOUT)
            assert data == binding_request
            assert source == client.getsockname()
            # The handler can answer from the same socket.
            ep.send_datagram(b"\x01\x01\x00\x00\x21\x12\xa4\x42transaction!", source)
            client.settimeout(TIMEOUT)
            assert client.recv(100).startswith(b"\x01\x01")
        assert got.empty()
        assert ep.dropped_datagrams == 1


async def test_an_idle_connection_times_out_and_keepalives_prevent_it(
    engine: str, alice: identity.Identity, bob: identity.Identity, mallory: identity.Identity
) -> None:
    quiet = EndpointSettings(transport=TransportSettings(idle_timeout=0.5), keepalive_interval=None)
    lively = EndpointSettings(transport=TransportSettings(idle_timeout=0.5), keepalive_interval=0.1)
    async with (
        endpoint(alice, engine, settings=quiet) as listener,
        endpoint(bob, engine, settings=lively) as lively_dialer,
        endpoint(mallory, engine, settings=quiet) as quiet_dialer,
    ):
        kept = await lively_dialer.connect(address(listener), alice.device_id, timeout=TIMEOUT)
        idle = await quiet_dialer.connect(address(listener), alice.device_id, timeout=TIMEOUT)
        # The quiet connection timing out is the clock: the lively one, older, outlived it.
        info = await asyncio.wait_for(idle.wait_closed(), TIMEOUT)
        assert not info.application
        assert "idle" in info.reason.lower()
        with pytest.raises(ConnectionClosedError):
            await idle.open_stream()
        assert not kept.is_closed


async def test_shutdown_closes_connections_and_leaves_no_tasks(
    engine: str, alice: identity.Identity, bob: identity.Identity
) -> None:
    before = asyncio.all_tasks()
    listener = Endpoint(alice, engine=engine)
    await listener.start("127.0.0.1", 0)
    async with endpoint(bob, engine) as dialer:
        conn = await dialer.connect(address(listener), alice.device_id, timeout=TIMEOUT)
        stream = await conn.open_stream()
        reader = asyncio.create_task(stream.read(10))
        await listener.close()
        info = await asyncio.wait_for(conn.wait_closed(), TIMEOUT)
        assert (info.code, info.by_peer) == (CloseCode.SHUTDOWN, True)
        with pytest.raises(ConnectionClosedError):
            await reader
    assert asyncio.all_tasks() == before
    with pytest.raises(Exception, match="closed"):
        await listener.accept()


async def test_an_unauthenticated_dialer_is_dropped_after_the_handshake_timeout(
    engine: str, alice: identity.Identity, bob: identity.Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshagent_gui.core.p2p import connection

    # A dialer that never sends its proof.
    monkeypatch.setattr(connection.PeerConnection, "_maybe_send_proof", lambda self: None)
    short = EndpointSettings(handshake_timeout=0.5)
    async with endpoint(alice, engine, settings=short) as listener, endpoint(bob, engine) as dialer:
        with pytest.raises(PeerAuthenticationError) as caught:
            await dialer.connect(address(listener), alice.device_id, timeout=TIMEOUT)
        assert caught.value.info.code == CloseCode.AUTH_TIMEOUT


async def test_a_dialer_that_opens_streams_before_its_proof_is_cut_off(
    engine: str, alice: identity.Identity, bob: identity.Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshagent_gui.core.p2p import connection

    def data_instead_of_proof(self: connection.PeerConnection) -> None:
        stream_id = self._engine.open_stream()
        self._engine.send_stream_data(stream_id, b"act on this", False)

    monkeypatch.setattr(connection.PeerConnection, "_maybe_send_proof", data_instead_of_proof)
    async with endpoint(alice, engine) as listener, endpoint(bob, engine) as dialer:
        with pytest.raises(PeerAuthenticationError) as caught:
            await dialer.connect(address(listener), alice.device_id, timeout=TIMEOUT)
        assert (caught.value.info.code, caught.value.info.by_peer) == (
            CloseCode.PROTOCOL_ERROR,
            True,
        )


async def test_a_writer_that_ignores_our_credit_is_cut_off(
    engine: str, alice: identity.Identity, bob: identity.Identity
) -> None:
    async with endpoint(alice, engine) as listener, endpoint(bob, engine) as dialer:
        conn = await dialer.connect(address(listener), alice.device_id, timeout=TIMEOUT)
        await asyncio.wait_for(listener.accept(), TIMEOUT)  # but never accepts the stream
        stream = await conn.open_stream()
        stream._peer_limit = 1 << 40  # a hostile peer's stack would not respect CREDIT
        with pytest.raises(ConnectionClosedError):
            async with asyncio.timeout(TIMEOUT):
                while True:
                    await stream.write(b"f" * 65536)
        info = await conn.wait_closed()
        assert (info.code, info.by_peer) == (CloseCode.FLOW_CONTROL_ERROR, True)


async def test_qh3_without_its_fast_path_carries_the_same_bytes(
    alice: identity.Identity, bob: identity.Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshagent_gui.core.p2p import engine as engine_module

    monkeypatch.setattr(engine_module._Qh3Connection, "fast_path_available", False)
    payload = hashlib.sha256(b"slow").digest() * (4 * 1024 * 1024 // 32)
    async with endpoint(alice, "qh3") as listener, endpoint(bob, "qh3") as dialer:
        conn = await dialer.connect(address(listener), alice.device_id, timeout=TIMEOUT)
        incoming = await asyncio.wait_for(listener.accept(), TIMEOUT)
        stream = await conn.open_stream()
        writer = asyncio.create_task(stream.write(payload))
        theirs = await asyncio.wait_for(incoming.accept_stream(), TIMEOUT)
        assert await asyncio.wait_for(theirs.readexactly(len(payload)), TIMEOUT) == payload
        await writer


async def test_socket_buffers_are_raised_and_reported(
    engine: str, alice: identity.Identity
) -> None:
    async with endpoint(alice, engine) as ep:
        buffers = ep.socket_buffers
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain:
            default = plain.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        cap = buffers.system_receive_max
        if not buffers.receive_forced and cap is not None and 2 * cap <= default:
            pytest.skip("net.core.rmem_max allows no more than the default buffer")
        assert buffers.requested == ep.settings.socket_buffer
        assert buffers.receive > default
        assert buffers.send > default


async def test_opening_more_streams_than_the_peer_allows_is_a_clear_error(
    engine: str, alice: identity.Identity, bob: identity.Identity
) -> None:
    async with endpoint(alice, engine) as listener, endpoint(bob, engine) as dialer:
        conn = await dialer.connect(address(listener), alice.device_id, timeout=TIMEOUT)
        opened = []
        with pytest.raises(StreamLimitError):
            for _ in range(1000):
                opened.append(await conn.open_stream())
        assert len(opened) >= 100
        assert not conn.is_closed


def test_paths_that_stay_on_this_host_are_recognised() -> None:
    assert stays_on_this_host("127.0.0.1")
    assert stays_on_this_host("127.5.6.7")
    assert stays_on_this_host("::ffff:127.0.0.1")
    assert not stays_on_this_host("0.0.0.0")
    assert not stays_on_this_host("224.0.0.1")
    assert not stays_on_this_host("192.0.2.200")  # TEST-NET: never one of ours
    assert not stays_on_this_host("not an address")
    assert not stays_on_this_host("fdfe:6d65:7368::1")  # the relay's pseudo network


async def test_a_loopback_connection_uses_jumbo_datagrams_both_ways(
    engine: str, alice: identity.Identity, bob: identity.Identity
) -> None:
    async with endpoint(alice, engine) as listener, endpoint(bob, engine) as dialer:
        assert dialer.datagram_size(("127.0.0.1", 1)) == TransportSettings().local_datagram_size
        assert dialer.datagram_size(("192.0.2.200", 1)) == TransportSettings().max_datagram_size
        conn = await dialer.connect(address(listener), alice.device_id, timeout=TIMEOUT)
        incoming = await asyncio.wait_for(listener.accept(), TIMEOUT)
        payload = os.urandom(2 * 1024 * 1024)
        # qh3's client announces max_udp_payload_size 1472 whatever its configuration (its
        # tls_bridge.py), so a qh3 listener answers in 1472-byte datagrams.
        directions = [(conn, incoming)] if engine == "qh3" else [(conn, incoming), (incoming, conn)]
        for sending, receiving in directions:
            before = sending.stats()

            async def receive(side: PeerConnection) -> bytes:
                back = await side.accept_stream()
                got = bytearray()
                while part := await back.read(1 << 20):
                    got += part
                return bytes(got)

            reader = asyncio.create_task(receive(receiving))
            out = await sending.open_stream()
            await asyncio.wait_for(out.write(payload), TIMEOUT)
            await asyncio.wait_for(out.close(), TIMEOUT)
            assert await asyncio.wait_for(reader, TIMEOUT) == payload
            after = sending.stats()
            sent = after.bytes_sent - before.bytes_sent
            datagrams = after.datagrams_sent - before.datagrams_sent
            assert sent / datagrams > 4000  # 1452-byte datagrams would average below that
