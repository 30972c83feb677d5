"""PeerStream against a fake connection: credit, backpressure and reads, no sockets."""

from __future__ import annotations

import asyncio

import pytest

from meshagent_gui.core.p2p.errors import (
    CloseInfo,
    ConnectionClosedError,
    StreamClosedError,
    StreamResetError,
)
from meshagent_gui.core.p2p.streams import INITIAL_CREDIT, FlowControlViolation, PeerStream

WINDOW = 1024 * 1024


class FakeOwner:
    def __init__(self) -> None:
        self.sent = bytearray()
        self.fin = False
        self.transmitted = 0
        self.grants: list[int] = []
        self.resets: list[int] = []
        self.stops: list[int] = []
        self.blocked: set[PeerStream] = set()
        self.finished: list[int] = []
        self.error: ConnectionClosedError | None = None

    def stream_send(self, stream_id: int, data: bytes | memoryview, end: bool) -> None:
        self.sent += data
        self.fin = self.fin or end

    def stream_unsent(self, stream_id: int, written: int) -> int:
        return written - self.transmitted

    def stream_grant(self, stream_id: int, limit: int) -> None:
        self.grants.append(limit)

    def stream_reset(self, stream_id: int, error_code: int) -> None:
        self.resets.append(error_code)

    def stream_stop(self, stream_id: int, error_code: int) -> None:
        self.stops.append(error_code)

    def stream_blocked(self, stream: PeerStream, blocked: bool) -> None:
        (self.blocked.add if blocked else self.blocked.discard)(stream)

    def stream_finished(self, stream_id: int) -> None:
        self.finished.append(stream_id)

    def closed_error(self) -> ConnectionClosedError | None:
        return self.error

    def transmit_all(self) -> None:
        self.transmitted = len(self.sent)
        for stream in tuple(self.blocked):
            stream.on_send_progress()


def make(owner: FakeOwner, *, local: bool = False, max_unsent: int = 64 * 1024) -> PeerStream:
    return PeerStream(owner, 1, window=WINDOW, max_unsent=max_unsent, local=local)


async def test_reads_join_and_split_chunks() -> None:
    stream = make(FakeOwner())
    for part in (b"abc", b"defg", b"hi"):
        stream.on_data(part, False)
    stream.on_data(b"", True)
    assert await stream.read(2) == b"ab"
    assert await stream.read(4) == b"cdef"
    assert await stream.readexactly(3) == b"ghi"
    assert await stream.read(10) == b""
    assert stream.at_eof()


async def test_readexactly_reports_a_short_stream() -> None:
    stream = make(FakeOwner())
    stream.on_data(b"abc", True)
    with pytest.raises(asyncio.IncompleteReadError) as caught:
        await stream.readexactly(5)
    assert caught.value.partial == b"abc"


async def test_read_whole_gathers_pieces_into_one_buffer() -> None:
    stream = make(FakeOwner())
    for part in (b"abc", b"defg", b"hi"):
        stream.on_data(part, False)
    assert await stream.read_whole(5) == b"abcde"  # splits the second piece
    assert stream.buffered == 4
    stream.on_data(b"jk", True)
    assert await stream.read_whole(10) == b"fghijk"  # fewer only at the end
    assert await stream.read_whole(1) == b""
    assert stream.at_eof()


async def test_read_whole_waits_for_the_rest_and_grants_credit_meanwhile() -> None:
    owner = FakeOwner()
    stream = make(owner)
    stream.on_accepted()
    size = 3 * WINDOW  # more than the peer may send before we read
    reading = asyncio.create_task(stream.read_whole(size))
    sent = 0
    while sent < size:
        await asyncio.sleep(0)
        assert not reading.done()
        piece = min(INITIAL_CREDIT, size - sent)
        stream.on_data(bytes([sent // piece % 251]) * piece, False)  # within the credit
        sent += piece
    data = await reading
    assert len(data) == size and isinstance(data, bytes)
    assert owner.grants[-1] >= size  # credit flowed while the pieces were gathered


async def test_scan_finds_record_sizes_across_pieces_without_consuming() -> None:
    stream = make(FakeOwner())

    def record_size(header: bytes) -> int:
        return 2 + int.from_bytes(header, "big")

    # Records: [len 3] [len 0] [len 5], headers of 2 bytes split across pieces.
    wire = b"\x00\x03abc" + b"\x00\x00" + b"\x00\x05hello"
    for cut in (1, 4, 6, 7, len(wire)):
        stream.on_data(wire[:cut][stream.buffered :], False)
    assert stream.scan(2, record_size, max_records=10, max_bytes=100) == [5, 2, 7]
    assert stream.scan(2, record_size, max_records=2, max_bytes=100) == [5, 2]
    assert stream.scan(2, record_size, max_records=10, max_bytes=6) == [5, 2]
    assert stream.buffered == len(wire)
    assert await stream.read(100) == wire
    stream.on_data(b"\x00", False)
    assert stream.scan(2, record_size, max_records=10, max_bytes=100) == []  # half a header


async def test_an_unaccepted_stream_only_gets_the_initial_credit() -> None:
    owner = FakeOwner()
    stream = make(owner)
    stream.on_data(b"x" * INITIAL_CREDIT, False)
    assert owner.grants == []
    with pytest.raises(FlowControlViolation):
        stream.on_data(b"x", False)


async def test_credit_follows_what_the_application_reads() -> None:
    owner = FakeOwner()
    stream = make(owner)
    stream.on_data(b"x" * 1000, False)
    stream.on_accepted()
    assert owner.grants == [WINDOW]  # a full window once accepted
    stream.on_data(b"x" * (WINDOW - 1000), False)
    with pytest.raises(FlowControlViolation):
        stream.on_data(b"x", False)  # the peer may not pass the window while we do not read
    assert len(await stream.readexactly(WINDOW // 2 - 1)) == WINDOW // 2 - 1
    assert owner.grants == [WINDOW]  # less than half a window read: no update yet
    await stream.readexactly(1)
    assert owner.grants == [WINDOW, WINDOW + WINDOW // 2]
    assert stream.buffered == WINDOW // 2


async def test_writes_block_on_the_unsent_bound_and_resume_after_transmission() -> None:
    owner = FakeOwner()
    stream = make(owner, local=True, max_unsent=16 * 1024)
    stream.on_credit(10 * 1024 * 1024)
    writer = asyncio.create_task(stream.write(b"y" * 100_000))
    await asyncio.sleep(0)
    assert len(owner.sent) == 16 * 1024 and not writer.done()
    while not writer.done():
        owner.transmit_all()
        await asyncio.sleep(0)
        assert stream.unsent <= 16 * 1024
    assert bytes(owner.sent) == b"y" * 100_000


async def test_writes_block_on_peer_credit() -> None:
    owner = FakeOwner()
    stream = make(owner, local=True, max_unsent=10 * 1024 * 1024)
    writer = asyncio.create_task(stream.write(b"z" * (INITIAL_CREDIT + 10)))
    await asyncio.sleep(0)
    owner.transmit_all()
    await asyncio.sleep(0)
    assert len(owner.sent) == INITIAL_CREDIT and not writer.done()
    assert stream.send_credit == 0
    stream.on_credit(INITIAL_CREDIT + 10)
    await writer
    assert len(owner.sent) == INITIAL_CREDIT + 10


async def test_reset_and_stop_sending_surface_as_errors() -> None:
    owner = FakeOwner()
    stream = make(owner)
    reader = asyncio.create_task(stream.read(10))
    await asyncio.sleep(0)
    stream.on_reset(7)
    with pytest.raises(StreamResetError) as caught:
        await reader
    assert caught.value.error_code == 7
    stream.on_stop_sending(9)
    assert owner.resets == [9]  # answered with RESET_STREAM
    with pytest.raises(StreamResetError):
        await stream.write(b"late")
    assert owner.finished == [1]


async def test_writes_after_eof_and_reads_after_stop_are_refused() -> None:
    owner = FakeOwner()
    stream = make(owner, local=True)
    stream.write_eof()
    assert owner.fin
    with pytest.raises(StreamClosedError):
        await stream.write(b"more")
    stream.stop_reading(3)
    assert owner.stops == [3]
    with pytest.raises(StreamClosedError):
        await stream.read(1)


async def test_a_closed_connection_fails_waiting_readers_and_writers() -> None:
    owner = FakeOwner()
    stream = make(owner, local=True, max_unsent=10)
    reader = asyncio.create_task(stream.read(1))
    writer = asyncio.create_task(stream.write(b"w" * 100))
    await asyncio.sleep(0)
    owner.error = ConnectionClosedError(CloseInfo(1, "bye", by_peer=True, application=True))
    stream.on_connection_closed(owner.error)
    for task in (reader, writer):
        with pytest.raises(ConnectionClosedError):
            await task
