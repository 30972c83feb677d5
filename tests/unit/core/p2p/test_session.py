"""The protocol Session driven over real QUIC connections on 127.0.0.1 (both engines)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from meshagent_gui import identity
from meshagent_gui.core.p2p import Endpoint, PeerConnection, PeerStream
from meshagent_gui.core.p2p import session as session_module
from meshagent_gui.core.p2p.session import (
    Channel,
    ChannelClosed,
    ChannelRefused,
    HandshakeRefusedError,
    MeshSession,
)
from meshagent_gui.core.protocol.errors import ErrorCode
from meshagent_gui.core.protocol.framing import encode_header
from meshagent_gui.core.protocol.handshake import Refusal
from meshagent_gui.core.protocol.messages import Hello, StreamRole
from tests.unit.core.protocol.pair import TEST_REGISTRY, Chunk, Note, RecordingValidator

TIMEOUT = 10.0


@asynccontextmanager
async def pair(
    engine: str, alice: identity.Identity, bob: identity.Identity, validator: RecordingValidator
) -> AsyncIterator[tuple[Endpoint, Endpoint, asyncio.Queue[MeshSession]]]:
    accepted: asyncio.Queue[MeshSession] = asyncio.Queue()

    async def authorize(conn: PeerConnection, first: PeerStream) -> bool:
        mesh = await MeshSession.accept(conn, first, validate=validator, registry=TEST_REGISTRY)
        accepted.put_nowait(mesh)
        return True

    listener = Endpoint(bob, engine=engine, authorize=authorize)
    dialer = Endpoint(alice, engine=engine)
    await listener.start("127.0.0.1", 0)
    await dialer.start("127.0.0.1", 0)
    try:
        yield dialer, listener, accepted
    finally:
        await dialer.close()
        await listener.close()


async def dial(
    dialer: Endpoint, listener: Endpoint, bob: identity.Identity, token: str
) -> MeshSession:
    conn = await dialer.connect(("127.0.0.1", listener.local_address[1]), bob.device_id)
    return await MeshSession.dial(
        conn, tokens=(token,), validate=RecordingValidator(), registry=TEST_REGISTRY
    )


@asynccontextmanager
async def transfer_channel(
    engine: str, alice: identity.Identity, bob: identity.Identity
) -> AsyncIterator[tuple[Channel, Channel]]:
    """A session from alice to bob and one TRANSFER channel on it: (ours, theirs)."""
    validator = RecordingValidator(good=frozenset({"good", "transfer-ok"}))
    async with pair(engine, alice, bob, validator) as (dialer, listener, accepted):
        ours = await asyncio.wait_for(dial(dialer, listener, bob, "good"), TIMEOUT)
        theirs = await asyncio.wait_for(accepted.get(), TIMEOUT)
        channel = await ours.open_channel(StreamRole.TRANSFER, tokens=("transfer-ok",))
        yield channel, await asyncio.wait_for(theirs.accept_channel(), TIMEOUT)


async def test_handshake_then_channels_both_ways(
    engine: str, alice: identity.Identity, bob: identity.Identity
) -> None:
    validator = RecordingValidator(good=frozenset({"good", "transfer-ok"}))
    async with pair(engine, alice, bob, validator) as (dialer, listener, accepted):
        ours = await asyncio.wait_for(dial(dialer, listener, bob, "good"), TIMEOUT)
        theirs = await asyncio.wait_for(accepted.get(), TIMEOUT)
        assert validator.seen[0].role is StreamRole.CONTROL
        assert theirs.peer_id == alice.device_id

        channel = await ours.open_channel(
            StreamRole.TRANSFER, tokens=("transfer-ok",), resource="file-1"
        )
        incoming = await asyncio.wait_for(theirs.accept_channel(), TIMEOUT)
        assert (incoming.role, incoming.resource, incoming.grant) == (
            StreamRole.TRANSFER,
            "file-1",
            "grant:transfer-ok",
        )

        payload = os.urandom(3 * 1024 * 1024)

        async def send_all() -> None:
            for offset in range(0, len(payload), 256 * 1024):
                piece = payload[offset : offset + 256 * 1024]
                await channel.send(Chunk(offset, b"abcd", False, piece))
            await channel.send(Note("done"))
            await channel.close()

        received = bytearray()
        sender = asyncio.create_task(send_all())
        while True:
            message = await asyncio.wait_for(incoming.receive(), TIMEOUT)
            if isinstance(message, Note):
                break
            assert isinstance(message, Chunk)
            received += message.data
        with pytest.raises(ChannelClosed) as ended:
            await asyncio.wait_for(incoming.receive(), TIMEOUT)
        assert ended.value.code is ErrorCode.NO_ERROR
        await sender
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()

        # The listener opens a channel toward the dialer too.
        back = await theirs.open_channel(StreamRole.SYNC, tokens=("good",))
        arrived = await asyncio.wait_for(ours.accept_channel(), TIMEOUT)
        await back.send(Note("hello back", (1, 2)))
        assert await asyncio.wait_for(arrived.receive(), TIMEOUT) == Note("hello back", (1, 2))


async def test_bad_connection_token_is_refused_with_its_reason(
    engine: str, alice: identity.Identity, bob: identity.Identity
) -> None:
    async with pair(engine, alice, bob, RecordingValidator()) as (dialer, listener, accepted):
        with pytest.raises(HandshakeRefusedError) as refused:
            await asyncio.wait_for(dial(dialer, listener, bob, "forged"), TIMEOUT)
        assert refused.value.code is ErrorCode.BAD_TOKEN and refused.value.by_peer
        assert accepted.empty()


async def test_a_refused_channel_leaves_the_connection_usable(
    engine: str, alice: identity.Identity, bob: identity.Identity
) -> None:
    class ScopeValidator(RecordingValidator):
        def __call__(self, hello: Hello) -> object:
            if hello.role is StreamRole.TERMINAL:
                raise Refusal(ErrorCode.NOT_ALLOWED, "no terminal for you")
            return super().__call__(hello)

    async with pair(engine, alice, bob, ScopeValidator()) as (dialer, listener, accepted):
        ours = await asyncio.wait_for(dial(dialer, listener, bob, "good"), TIMEOUT)
        theirs = await asyncio.wait_for(accepted.get(), TIMEOUT)
        with pytest.raises(ChannelRefused) as refused:
            await asyncio.wait_for(
                ours.open_channel(StreamRole.TERMINAL, tokens=("good",)), TIMEOUT
            )
        assert refused.value.code is ErrorCode.NOT_ALLOWED
        ok = await ours.open_channel(StreamRole.TRANSFER, tokens=("good",))
        incoming = await asyncio.wait_for(theirs.accept_channel(), TIMEOUT)
        await ok.send(Note("still fine"))
        assert await asyncio.wait_for(incoming.receive(), TIMEOUT) == Note("still fine")
        await ours.aclose()
        await asyncio.wait_for(theirs.closed.wait(), TIMEOUT)


async def test_posted_messages_arrive_in_order_and_share_writes(
    engine: str, alice: identity.Identity, bob: identity.Identity
) -> None:
    async with transfer_channel(engine, alice, bob) as (channel, incoming):
        writes: list[int] = []
        real_write = channel.stream.write

        async def counting_write(data: bytes | bytearray | memoryview) -> None:
            writes.append(len(data))
            await real_write(data)

        channel.stream.write = counting_write  # type: ignore[method-assign]
        notes = [Note(f"note {n}") for n in range(200)]
        for note in notes:
            channel.post(note)
        await asyncio.wait_for(channel.drain(), TIMEOUT)
        got = [await asyncio.wait_for(incoming.receive(), TIMEOUT) for _ in notes]
        assert got == notes
        assert 0 < len(writes) < len(notes) // 10  # small messages go to QUIC together
        assert incoming.poll() is None


async def test_unread_bulk_data_is_bounded_in_bytes_not_messages(
    engine: str, alice: identity.Identity, bob: identity.Identity
) -> None:
    async with transfer_channel(engine, alice, bob) as (channel, incoming):
        piece = os.urandom(512 * 1024)

        async def send_all() -> None:
            for offset in range(40):  # 20 MiB, more than the inbox and the stream window
                await channel.send(Chunk(offset, b"abcd", False, piece))

        sender = asyncio.create_task(send_all())
        # The reader reads nothing meanwhile: wait until the inbox has filled up to its bound.
        while incoming.inbox_bytes + len(piece) <= session_module.INBOX_BYTES:
            await asyncio.sleep(0.01)
        assert incoming.inbox_bytes <= session_module.INBOX_BYTES
        assert not sender.done()  # held back: the peer's credit ran out
        for offset in range(40):
            message = await asyncio.wait_for(incoming.receive(), TIMEOUT)
            assert isinstance(message, Chunk) and message.offset == offset
        await asyncio.wait_for(sender, TIMEOUT)


class _Owner:
    """Just enough of a connection for a PeerStream that is only read."""

    def stream_grant(self, stream_id: int, limit: int) -> None:
        pass

    def closed_error(self) -> None:
        return None

    def stream_finished(self, stream_id: int) -> None:
        pass


def _frame(type_code: int, size: int) -> bytes:
    return encode_header(type_code, 0, size) + os.urandom(size)


async def test_reads_follow_frame_boundaries_and_take_large_frames_whole() -> None:
    stream = PeerStream(_Owner(), 1, window=16 << 20, max_unsent=1 << 20, local=True)  # type: ignore[arg-type]
    small, big, tail = _frame(0x10, 30), _frame(0x11, 1 << 20), _frame(0x10, 5)
    wire = small + small + big + tail
    for start in range(0, 20_000, 7000):  # the small frames and the big one's start
        stream.on_data(wire[start : start + 7000], False)
    cursor = session_module._FrameCursor()
    assert await cursor.read(stream, whole=True) == small + small  # not into the big frame
    reading = asyncio.create_task(cursor.read(stream, whole=True))
    for start in range(21_000, len(wire), 9000):
        await asyncio.sleep(0)
        assert not reading.done()  # a large frame is read whole
        stream.on_data(wire[start : start + 9000], False)
    stream.on_data(b"", True)
    assert await reading == big
    assert await cursor.read(stream, whole=True) == tail
    assert await cursor.read(stream, whole=True) == b""


async def test_large_frames_of_a_stream_not_yet_opened_are_read_in_pieces() -> None:
    stream = PeerStream(_Owner(), 1, window=16 << 20, max_unsent=1 << 20, local=True)  # type: ignore[arg-type]
    big, tail = _frame(0x11, 1 << 20), _frame(0x10, 5)
    stream.on_data(big[:1000], False)  # the first bytes open the window
    stream.on_data(big[1000:] + tail, True)
    cursor = session_module._FrameCursor()
    pieces = []
    while data := await cursor.read(stream, whole=False):
        pieces.append(data)
    assert b"".join(pieces) == big + tail
    assert len(pieces) > 2 and pieces[-1] == tail  # in pieces, yet never across a boundary
    assert all(len(piece) <= session_module.READ_SIZE for piece in pieces)
