"""Transfer protocol: a sender and a receiver paired in memory, every message through the wire
format (MessageStream encode -> bytes -> decode), hostile peers on both sides, and properties."""

from __future__ import annotations

import functools
import itertools
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec
import pytest
from blake3 import blake3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshagent_gui.core.protocol.errors import ErrorCode, LocalProtocolError, ProtocolError
from meshagent_gui.core.protocol.framing import MiB, encode_header
from meshagent_gui.core.protocol.registry import MessageStream
from meshagent_gui.core.protocol.transfer import (
    ANSWER,
    CHUNK,
    CHUNK_HEAD_SIZE,
    COMPLETE,
    FILE_DONE,
    FILE_END,
    INCOMING_FILE_TRANSITIONS,
    OFFER,
    OUTGOING_FILE_TRANSITIONS,
    PROGRESS,
    RECEIVER_ADMITS,
    RECEIVER_TRANSITIONS,
    RESEND,
    SENDER_ADMITS,
    SENDER_TRANSITIONS,
    TRANSFER_REGISTRY,
    Answer,
    AnswerReceived,
    Cancel,
    CancelledByPeer,
    Chunk,
    ChunkReceived,
    Complete,
    Completed,
    EndFile,
    Entry,
    FileConfirmed,
    FileDone,
    FileEnd,
    FileEnded,
    Have,
    Offer,
    OfferReceived,
    Progress,
    ProgressReported,
    ReceiverState,
    Resend,
    ResendRequested,
    SendChunk,
    SenderState,
    TransferErrorCode,
    TransferGaveUp,
    TransferLimits,
    TransferProtocolError,
    TransferReceiver,
    TransferSender,
    bitmap_bytes,
    bitmap_chunks,
    chunk_count,
    chunk_length,
    full_bitmap,
    is_valid_bitmap,
    make_bitmap,
    path_syntax_error,
)

T = TransferErrorCode
LIMITS = TransferLimits(min_chunk_size=1)
TRANSFER_ID = "t-1"
KEY = bytes(range(16))
Split = Callable[[bytes], Sequence[bytes]]


def digest(data: bytes) -> bytes:
    return blake3(data).digest()


def file_entry(path: str, size: int) -> Entry:
    return Entry(path, "file", size, 0o644, 1_700_000_000_000_000_000, KEY)


def dir_entry(path: str) -> Entry:
    return Entry(path, "dir", 0, 0o755, 1_700_000_000_000_000_000, bytes(16))


def expect(code: TransferErrorCode, action: Callable[[], object]) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        action()
    assert int(caught.value.code) == code, caught.value
    return caught.value


# --------------------------------------------------------------------------- the pair


class Link:
    """One direction of the stream: encoded by one MessageStream, decoded by another."""

    def __init__(self) -> None:
        self.encoder = MessageStream(TRANSFER_REGISTRY)
        self.decoder = MessageStream(TRANSFER_REGISTRY)
        self.wire = bytearray()
        self.sent: list[object] = []

    def put(self, *messages: object) -> None:
        for message in messages:
            self.sent.append(message)
            self.wire += self.encoder.send(message)

    def take(self, limit: int | None = None, split: Split | None = None) -> list[object]:
        size = len(self.wire) if limit is None else min(limit, len(self.wire))
        data = bytes(self.wire[:size])
        del self.wire[:size]
        if not data:
            return []
        messages: list[object] = []
        for piece in split(data) if split is not None else [data]:
            messages.extend(self.decoder.receive_data(piece))
        return messages


@dataclass
class TransferPair:
    """A sender and a receiver with a pretend disk on each side. ``contents[i]`` is entry i's
    data (``None``: a folder). ``have`` pre-fills the receiver's partial files; ``corrupt``
    damages a chunk on the wire that many times (its digest stays the true one)."""

    contents: Sequence[bytes | None]
    chunk_size: int
    have: dict[int, set[int]] = field(default_factory=dict)
    corrupt: dict[tuple[int, int], int] = field(default_factory=dict)
    max_resends: int = 3
    limits: TransferLimits = LIMITS

    def __post_init__(self) -> None:
        self.entries = [
            dir_entry(f"d{i}") if data is None else file_entry(f"d/f{i}.bin", len(data))
            for i, data in enumerate(self.contents)
        ]
        self.sender = TransferSender(
            self.entries, self.chunk_size, TRANSFER_ID, max_resends=self.max_resends
        )
        self.receiver = TransferReceiver(self.limits, transfer_id=TRANSFER_ID)
        self.to_receiver = Link()
        self.to_sender = Link()
        self.files = [i for i, data in enumerate(self.contents) if data is not None]
        self.disk = {i: bytearray(len(self.data(i))) for i in self.files}
        self.verified_bytes = 0
        for index, chunks in self.have.items():
            for chunk in chunks:
                offset, length = self.span(index, chunk)
                self.disk[index][offset : offset + length] = self.data(index)[offset:][:length]
        self.pending: list[ChunkReceived] = []
        self.ready: list[FileEnded] = []
        self.sender_events: list[object] = []
        self.receiver_events: list[object] = []
        self.chunks_on_wire: list[tuple[int, int]] = []
        self.sent_bytes = 0
        self.delivered_bytes = 0
        self.files_done = 0
        self.now = 0.0

    def data(self, index: int) -> bytes:
        data = self.contents[index]
        assert data is not None
        return data

    def span(self, index: int, chunk: int) -> tuple[int, int]:
        size = len(self.data(index))
        return chunk * self.chunk_size, chunk_length(size, self.chunk_size, chunk)

    def have_bitmaps(self) -> dict[int, bytes]:
        return {
            index: make_bitmap(chunks, chunk_count(len(self.data(index)), self.chunk_size))
            for index, chunks in self.have.items()
        }

    # ------------------------------------------------------------ sender side

    def start(self) -> None:
        self.to_receiver.put(*self.sender.start())

    def sender_step(self) -> bool:
        work = self.sender.next_work()
        if isinstance(work, SendChunk):
            offset, length = self.span(work.index, work.chunk)
            assert (work.offset, work.length) == (offset, length)
            data = self.data(work.index)[offset : offset + length]
            on_wire = data
            if self.corrupt.get((work.index, work.chunk), 0) > 0:
                self.corrupt[work.index, work.chunk] -= 1
                on_wire = bytes([data[0] ^ 0xFF]) + data[1:]
            self.to_receiver.put(Chunk(work.index, work.chunk, digest(data), on_wire))
            self.sender.chunk_sent(work.index, work.chunk)
            self.chunks_on_wire.append((work.index, work.chunk))
            self.sent_bytes += length
            return True
        if isinstance(work, EndFile):
            end = self.sender.file_sent(work.index, digest(self.data(work.index)))
            if end is not None:
                self.to_receiver.put(end)
            return True
        return False

    def sender_read(self, limit: int | None = None, split: Split | None = None) -> None:
        for message in self.to_sender.take(limit, split):
            for event in self.sender.receive(message):
                self.sender_events.append(event)
                if isinstance(event, TransferGaveUp):
                    self.to_receiver.put(event.cancel)

    # ------------------------------------------------------------ receiver side

    def receiver_read(self, limit: int | None = None, split: Split | None = None) -> None:
        for message in self.to_receiver.take(limit, split):
            if isinstance(message, Chunk):
                self.delivered_bytes += len(message.data)
            for event in self.receiver.receive(message):
                self.receiver_events.append(event)
                if isinstance(event, OfferReceived):
                    self.to_sender.put(*self.receiver.accept(self.have_bitmaps()))
                    self.verified_bytes += sum(
                        self.span(index, chunk)[1]
                        for index, chunks in self.have.items()
                        for chunk in chunks
                    )
                elif isinstance(event, ChunkReceived):
                    # The frame's buffer is the Link's: keep a copy, as a disk write would.
                    self.pending.append(
                        ChunkReceived(
                            event.index, event.chunk, event.offset, event.digest, bytes(event.data)
                        )
                    )
                elif isinstance(event, FileEnded):
                    self.ready.append(event)

    def receiver_verify(self, position: int = 0) -> None:
        event = self.pending.pop(position)
        data = bytes(event.data)
        if digest(data) == event.digest:
            self.disk[event.index][event.offset : event.offset + len(data)] = data
            self.verified_bytes += len(data)
            for ended in self.receiver.chunk_verified(event.index, event.chunk):
                assert isinstance(ended, FileEnded)
                self.ready.append(ended)
        else:
            resend = self.receiver.chunk_failed(event.index, event.chunk)
            if resend is not None:
                self.to_sender.put(resend)

    def receiver_finish(self, position: int = 0) -> None:
        event = self.ready.pop(position)
        ok = digest(bytes(self.disk[event.index])) == event.digest
        self.files_done += 1
        self.to_sender.put(*self.receiver.file_done(event.index, ok, "" if ok else "mismatch"))

    def receiver_report(self, seconds: float = 1.0) -> None:
        self.now += seconds
        progress = self.receiver.progress(self.now)
        if progress is not None:
            self.to_sender.put(progress)

    # ------------------------------------------------------------ both

    def run(self, split: Split | None = None, rounds: int = 1000) -> None:
        """Exchange everything until both sides are quiet."""
        if self.sender.state is SenderState.IDLE:
            self.start()
        for _ in range(rounds):
            busy = False
            while self.sender_step():
                busy = True
            busy |= bool(self.to_receiver.wire)
            self.receiver_read(split=split)
            while self.pending:
                busy = True
                self.receiver_verify()
            self.receiver_report()
            while self.ready:
                busy = True
                self.receiver_finish()
            busy |= bool(self.to_sender.wire)
            self.sender_read(split=split)
            if not busy:
                return
        raise AssertionError("the transfer never settled")

    def check_accounting(self) -> None:
        assert self.receiver.bytes_verified == self.verified_bytes
        assert self.receiver.bytes_received == self.delivered_bytes
        assert self.receiver.files_done == self.files_done
        assert self.sender.bytes_sent == self.sent_bytes

    def check_arrived_whole(self) -> None:
        self.check_accounting()
        for index in self.files:
            assert bytes(self.disk[index]) == self.data(index), f"entry {index}"
        total = sum(len(self.data(i)) for i in self.files)
        assert self.sender.state is SenderState.DONE
        assert self.receiver.state is ReceiverState.DONE
        assert self.sender_events[-1] == Completed(len(self.files), total)
        assert self.receiver.bytes_verified == total
        assert self.sender.bytes_skipped == self.verified_bytes - (
            self.sender.bytes_sent - self.sender.bytes_resent
        )
        # Every chunk crossed the wire once, plus one per corruption; none the receiver had.
        expected = sorted(
            (index, chunk)
            for index in self.files
            for chunk in range(chunk_count(len(self.data(index)), self.chunk_size))
            if chunk not in self.have.get(index, set())
        )
        assert sorted(set(self.chunks_on_wire)) == expected
        resent = len(self.chunks_on_wire) - len(expected)
        assert resent == sum(1 for e in self.sender_events if isinstance(e, ResendRequested))


# Three files whose sizes (0 excluded) are multiples of 3 and 4 but not of 5 or 7, and folders:
# one with the files, one empty. Entry order: folders first, as core/share/source.py lists them.
CONTENTS: list[bytes | None] = [
    None,
    None,
    bytes(range(12)),
    bytes(range(100, 124)),
    b"x" * 36,
]


# --------------------------------------------------------------------------- whole transfers


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 5, 7, 12, 36, 1000])
def test_three_files_and_an_empty_folder_arrive_whole(chunk_size: int) -> None:
    pair = TransferPair(CONTENTS, chunk_size)
    pair.run()
    pair.check_arrived_whole()
    offer = pair.to_receiver.sent[0]
    assert isinstance(offer, Offer)
    assert offer.total_bytes == 72 and offer.chunk_size == chunk_size
    assert [e.kind for e in offer.entries] == ["dir", "dir", "file", "file", "file"]
    # One Chunk per chunk, a FileEnd per file, nothing for the folders.
    ends = [m for m in pair.to_receiver.sent if isinstance(m, FileEnd)]
    assert [m.index for m in ends] == [2, 3, 4]
    assert [m.digest for m in ends] == [digest(pair.data(i)) for i in (2, 3, 4)]
    assert pair.sender.bytes_sent == 72 and pair.sender.bytes_skipped == 0
    confirmed = [e for e in pair.sender_events if isinstance(e, FileConfirmed)]
    assert confirmed == [FileConfirmed(i, True, "") for i in (2, 3, 4)]
    assert any(isinstance(e, ProgressReported) for e in pair.sender_events)
    assert pair.sender.finished and pair.receiver.finished


def test_chunks_of_the_last_size_carry_only_the_remainder() -> None:
    pair = TransferPair(CONTENTS, 5)
    pair.run()
    lengths = {
        (m.index, m.chunk): len(m.data) for m in pair.to_receiver.sent if isinstance(m, Chunk)
    }
    assert [lengths[2, c] for c in range(3)] == [5, 5, 2]
    assert [lengths[3, c] for c in range(5)] == [5, 5, 5, 5, 4]


def test_an_empty_file_is_a_file_end_only() -> None:
    pair = TransferPair([b"", b"abc"], 2)
    pair.run()
    pair.check_arrived_whole()
    assert pair.chunks_on_wire == [(1, 0), (1, 1)]
    first_end = pair.to_receiver.sent[1]
    assert first_end == FileEnd(0, digest(b""))


def test_only_folders_complete_with_the_answer() -> None:
    pair = TransferPair([None, None], 4)
    pair.start()
    pair.receiver_read()
    assert [type(m) for m in pair.to_sender.sent] == [Answer, Complete]
    pair.sender_read()
    assert pair.sender.state is SenderState.DONE
    assert pair.receiver.state is ReceiverState.DONE
    assert pair.sender_events[-1] == Completed(0, 0)


def test_any_split_of_the_byte_streams_gives_the_same_transfer() -> None:
    def bytewise(data: bytes) -> list[bytes]:
        return [data[i : i + 1] for i in range(len(data))]

    pair = TransferPair(CONTENTS, 5)
    pair.run(split=bytewise)
    pair.check_arrived_whole()


# --------------------------------------------------------------------------- resume


def test_resume_sends_only_missing_chunks_and_skips_files_held_whole() -> None:
    # chunk size 4: entry 2 has 3 chunks (held whole), entry 3 has 6 (0, 2 and 5 held).
    pair = TransferPair(CONTENTS, 4, have={2: {0, 1, 2}, 3: {0, 2, 5}})
    pair.run()
    pair.check_arrived_whole()
    assert pair.chunks_on_wire == [(3, 1), (3, 3), (3, 4), *[(4, c) for c in range(9)]]
    # The whole-file check still needs each file's FileEnd, the fully held one included.
    assert [m.index for m in pair.to_receiver.sent if isinstance(m, FileEnd)] == [2, 3, 4]
    answer = pair.to_sender.sent[0]
    assert answer == Answer(True, "", (Have(2, b"\x07"), Have(3, b"\x25")))
    assert pair.sender.bytes_skipped == 12 + 12
    assert pair.sender.bytes_sent == 72 - 24
    assert pair.sender.receiver_has(3, 2) and not pair.sender.receiver_has(3, 1)
    assert pair.sender.receiver_bitmap(3) == b"\x25" and pair.sender.receiver_bitmap(4) == b""
    first_progress = next(e for e in pair.sender_events if isinstance(e, ProgressReported))
    assert first_progress.bytes_verified >= 24  # resumed bytes count as verified


def test_resume_with_every_chunk_held_sends_file_ends_only() -> None:
    # 20 and 9 chunks: whole bitmap bytes, then a partial one.
    contents: list[bytes | None] = [bytes(range(40)), b"y" * 17]
    pair = TransferPair(contents, 2, have={0: set(range(20)), 1: set(range(9))})
    pair.start()
    pair.receiver_read()
    pair.sender_read()
    assert pair.sender.next_work() == EndFile(0)
    pair.run()
    pair.check_arrived_whole()
    assert pair.chunks_on_wire == []
    assert pair.sender.bytes_sent == 0 and pair.sender.bytes_skipped == 57


def test_resume_of_a_long_prefix_and_a_straggler() -> None:
    pair = TransferPair([bytes(range(30))], 1, have={0: {*range(17), 20, 29}})
    pair.run()
    pair.check_arrived_whole()
    assert pair.chunks_on_wire == [(0, c) for c in (17, 18, 19, *range(21, 29))]


def test_a_large_resumed_prefix_is_accounted_without_touching_each_chunk() -> None:
    receiver = TransferReceiver(TransferLimits())
    size = 10_000 * MiB + 5
    receiver.receive(Offer(TRANSFER_ID, (file_entry("big", size),), size, MiB))
    count = chunk_count(size, MiB)
    held = make_bitmap([*range(9_000), 9_500], count)
    receiver.accept({0: held})
    assert receiver.bytes_verified == 9_001 * MiB
    sender = TransferSender([file_entry("big", size)], MiB, TRANSFER_ID)
    sender.start()
    sender.receive(Answer(True, "", (Have(0, held),)))
    assert sender.next_work() == SendChunk(0, 9_000, 9_000 * MiB, MiB)
    assert sender.bytes_skipped == 9_001 * MiB


# --------------------------------------------------------------------------- resends


def test_a_chunk_that_fails_its_digest_is_sent_again_ahead_of_new_chunks() -> None:
    pair = TransferPair(CONTENTS, 4, corrupt={(2, 1): 1})
    pair.start()
    pair.receiver_read()
    pair.sender_read()
    for _ in range(4):  # chunks (2, 0..2) and FileEnd(2)
        assert pair.sender_step()
    pair.receiver_read()
    pair.receiver_verify()
    pair.receiver_verify()  # chunk 1 fails: Resend
    assert pair.to_sender.sent[-1] == Resend(2, 1)
    pair.sender_read()
    assert pair.sender_events[-1] == ResendRequested(2, 1)
    assert pair.sender.next_work() == SendChunk(2, 1, 4, 4, resend=True)
    pair.run()
    pair.check_arrived_whole()
    assert pair.chunks_on_wire.count((2, 1)) == 2
    assert pair.sender.bytes_resent == 4 and pair.sender.bytes_sent == 76


def test_file_ended_waits_until_every_chunk_is_verified() -> None:
    pair = TransferPair([b"abcdefgh"], 4, corrupt={(0, 0): 1})
    pair.start()
    pair.receiver_read()
    pair.sender_read()
    while pair.sender_step():
        pass
    pair.receiver_read()  # both chunks and the FileEnd arrived; none verified yet
    assert not pair.ready
    pair.receiver_verify(1)
    assert not pair.ready
    pair.receiver_verify(0)  # corrupted: Resend
    assert not pair.ready
    pair.sender_read()
    pair.sender_step()
    pair.receiver_read()
    pair.receiver_verify()
    assert pair.ready == [FileEnded(0, digest(b"abcdefgh"))]
    pair.run()
    pair.check_arrived_whole()


def test_a_chunk_failing_too_often_fails_the_transfer_and_cancels_the_receiver() -> None:
    pair = TransferPair(CONTENTS, 4, corrupt={(3, 2): 10}, max_resends=2)
    pair.run()
    failed = [e for e in pair.sender_events if isinstance(e, TransferGaveUp)]
    assert len(failed) == 1
    assert failed[0].code is T.TOO_MANY_RESENDS
    assert failed[0].cancel == Cancel(failed[0].reason, T.TOO_MANY_RESENDS)
    assert pair.chunks_on_wire.count((3, 2)) == 3  # sent, then resent twice
    assert pair.sender.state is SenderState.FAILED
    assert pair.sender.next_work() is None and pair.sender.finished
    assert pair.receiver.state is ReceiverState.CANCELLED
    assert pair.receiver_events[-1] == CancelledByPeer(failed[0].reason, T.TOO_MANY_RESENDS)


# --------------------------------------------------------------------------- verdicts, cancel


def test_a_file_the_receiver_fails_early_is_not_sent() -> None:
    pair = TransferPair(CONTENTS, 4)
    pair.start()
    pair.receiver_read()
    # The service refused entry 3's name (core/share/paths.py) right after accepting.
    pair.to_sender.put(*pair.receiver.file_done(3, False, "reserved name"))
    pair.files_done += 1
    pair.sender_read()
    pair.run()
    assert all(index != 3 for index, _ in pair.chunks_on_wire)
    assert FileConfirmed(3, False, "reserved name") in pair.sender_events
    assert pair.sender_events[-1] == Completed(2, 48)
    assert pair.sender.state is SenderState.DONE
    pair.check_accounting()


def test_a_file_failed_while_it_streams_stops_its_chunks() -> None:
    pair = TransferPair([b"a" * 40, b"b" * 8], 4)
    pair.start()
    pair.receiver_read()
    pair.sender_read()
    pair.sender_step()
    work = pair.sender.next_work()
    assert work == SendChunk(0, 1, 4, 4)
    # The verdict arrives while the service is sending chunk 1: its report is moot.
    pair.sender.receive(FileDone(0, False, "disk error"))
    pair.sender.chunk_sent(0, 1)
    assert pair.sender.file_sent(0, digest(b"a" * 40)) is None
    assert pair.sender.next_work() == SendChunk(1, 0, 0, 4)


def test_the_receiver_declines() -> None:
    declined = TransferPair(CONTENTS, 4)
    declined.start()
    (offer,) = declined.to_receiver.take()
    (event,) = declined.receiver.receive(offer)
    assert isinstance(event, OfferReceived) and event.total_bytes == 72
    declined.to_sender.put(declined.receiver.decline("not now"))
    declined.sender_read()
    assert declined.sender_events == [AnswerReceived(False, "not now", ())]
    assert declined.sender.state is SenderState.DECLINED
    assert declined.receiver.state is ReceiverState.DECLINED
    assert declined.sender.next_work() is None


def test_the_sender_cancels_mid_stream() -> None:
    pair = TransferPair(CONTENTS, 4)
    pair.start()
    pair.receiver_read()
    pair.sender_read()
    for _ in range(5):
        pair.sender_step()
    pair.to_receiver.put(pair.sender.cancel("stopped by the user"))
    pair.receiver_read()
    assert pair.receiver_events[-1] == CancelledByPeer("stopped by the user", T.CANCELLED)
    assert pair.receiver.state is ReceiverState.CANCELLED
    # Chunks handed to the disk before the cancel report into nothing.
    while pair.pending:
        pair.receiver_verify()
    assert pair.receiver.progress(100.0) is None
    pair.sender_read()  # whatever the receiver had sent is dropped
    assert pair.sender.state is SenderState.CANCELLED
    assert pair.sender.next_work() is None


def test_the_receiver_cancels_and_data_in_flight_is_dropped() -> None:
    pair = TransferPair(CONTENTS, 4)
    pair.start()
    pair.receiver_read()
    pair.sender_read()
    pair.sender_step()
    work = pair.sender.next_work()
    pair.to_sender.put(pair.receiver.cancel("disk full", T.DISK_FULL))
    pair.sender_read()
    assert pair.sender_events[-1] == CancelledByPeer("disk full", T.DISK_FULL)
    assert pair.sender.state is SenderState.CANCELLED
    assert isinstance(work, SendChunk)
    pair.sender.chunk_sent(work.index, work.chunk)  # a send that was under way: moot
    assert pair.sender.next_work() is None
    pair.receiver_read()  # the chunk that was in flight
    assert pair.receiver.state is ReceiverState.CANCELLED
    assert not pair.pending


def test_cancels_that_cross_are_both_harmless() -> None:
    pair = TransferPair(CONTENTS, 4)
    pair.start()
    pair.receiver_read()
    pair.sender_read()
    pair.to_receiver.put(pair.sender.cancel("a"))
    pair.to_sender.put(pair.receiver.cancel("b"))
    pair.receiver_read()
    pair.sender_read()
    assert not any(isinstance(e, CancelledByPeer) for e in pair.receiver_events)
    assert not any(isinstance(e, CancelledByPeer) for e in pair.sender_events)
    assert pair.sender.state is SenderState.CANCELLED
    assert pair.receiver.state is ReceiverState.CANCELLED


def test_progress_is_rate_limited_by_the_clock_passed_in() -> None:
    receiver = TransferReceiver(LIMITS, progress_interval=0.1)
    receiver.receive(Offer(TRANSFER_ID, (file_entry("a", 8),), 8, 4))
    assert receiver.next_progress_at() is None  # nothing to report before the answer
    receiver.accept()
    assert receiver.progress(10.0) is None  # nothing new: nothing verified yet
    receiver.receive(Chunk(0, 0, digest(b"abcd"), b"abcd"))
    receiver.chunk_verified(0, 0)
    assert receiver.progress(10.0) == Progress(4, 0)
    receiver.receive(Chunk(0, 1, digest(b"efgh"), b"efgh"))
    receiver.chunk_verified(0, 1)
    assert receiver.next_progress_at() == pytest.approx(10.1)
    assert receiver.progress(10.05) is None
    assert receiver.progress(10.1) == Progress(8, 0)
    assert receiver.progress(20.0) is None


# --------------------------------------------------------------------------- a hostile sender


def receiving(
    entries: Sequence[Entry] = (dir_entry("d"), file_entry("d/a", 10), file_entry("d/b", 4)),
    chunk_size: int = 4,
) -> TransferReceiver:
    receiver = TransferReceiver(LIMITS, transfer_id=TRANSFER_ID)
    total = sum(e.size for e in entries)
    receiver.receive(Offer(TRANSFER_ID, tuple(entries), total, chunk_size))
    receiver.accept()
    return receiver


def chunk(index: int, number: int, data: bytes) -> Chunk:
    return Chunk(index, number, digest(data), data)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (chunk(0, 0, b"abcd"), T.NOT_A_FILE),
        (chunk(3, 0, b"abcd"), T.NO_SUCH_ENTRY),
        (chunk(0xFFFF_FFFF, 0, b"abcd"), T.NO_SUCH_ENTRY),
        (chunk(1, 3, b"ab"), T.CHUNK_OUT_OF_RANGE),
        (chunk(2, 1, b""), T.CHUNK_OUT_OF_RANGE),
        (chunk(1, 0, b"abcde"), T.BAD_CHUNK_LENGTH),
        (chunk(1, 0, b"abc"), T.BAD_CHUNK_LENGTH),
        (chunk(1, 2, b"abc"), T.BAD_CHUNK_LENGTH),  # the last chunk holds exactly 2 bytes
        (chunk(1, 2, b"a"), T.BAD_CHUNK_LENGTH),
        (FileEnd(1, bytes(32)), T.EARLY_FILE_END),
        (FileEnd(0, bytes(32)), T.NOT_A_FILE),
        (FileEnd(9, bytes(32)), T.NO_SUCH_ENTRY),
        (Offer(TRANSFER_ID, (), 0, 4), T.UNEXPECTED_MESSAGE),
    ],
)
def test_a_hostile_sender_is_refused_with_a_specific_code(message: object, code: T) -> None:
    receiver = receiving()
    link = Link()
    link.put(message)
    (decoded,) = link.take()  # through the wire format
    error = expect(code, lambda: receiver.receive(decoded))
    assert isinstance(error, TransferProtocolError) and error.transfer_code is code
    assert receiver.state is ReceiverState.BROKEN
    # It stays broken: the next message raises the same error, and nothing else is reported.
    with pytest.raises(ProtocolError) as again:
        receiver.receive(chunk(1, 0, b"abcd"))
    assert again.value is error
    assert receiver.bytes_received == 0


def test_a_file_end_before_its_last_chunk_is_refused() -> None:
    receiver = receiving()
    receiver.receive(chunk(1, 0, b"abcd"))
    receiver.receive(chunk(1, 2, b"ij"))
    expect(T.EARLY_FILE_END, lambda: receiver.receive(FileEnd(1, bytes(32))))


def test_a_second_file_end_is_refused() -> None:
    receiver = receiving()
    receiver.receive(chunk(2, 0, b"wxyz"))
    receiver.receive(FileEnd(2, bytes(32)))
    expect(T.DUPLICATE_FILE_END, lambda: receiver.receive(FileEnd(2, bytes(32))))


def test_duplicates_are_ignored_until_they_exceed_the_offer() -> None:
    receiver = receiving()  # 14 bytes offered
    (first,) = receiver.receive(chunk(1, 0, b"abcd"))
    assert isinstance(first, ChunkReceived) and first.offset == 0
    assert receiver.receive(chunk(1, 0, b"abcd")) == []  # handed out already
    receiver.chunk_verified(1, 0)
    assert receiver.receive(chunk(1, 0, b"abcd")) == []  # verified already
    assert receiver.duplicate_chunks == 2 and receiver.bytes_received == 12
    expect(T.EXCESS_DATA, lambda: receiver.receive(chunk(1, 0, b"abcd")))


def test_a_resend_asked_for_widens_the_budget_by_that_chunk() -> None:
    receiver = receiving((file_entry("a", 8),))
    receiver.receive(chunk(0, 0, b"abcd"))
    receiver.receive(chunk(0, 1, b"efgh"))
    assert receiver.chunk_failed(0, 1) == Resend(0, 1)
    (again,) = receiver.receive(chunk(0, 1, b"efgh"))  # 12 bytes of 8 offered: asked for
    assert isinstance(again, ChunkReceived)
    expect(T.EXCESS_DATA, lambda: receiver.receive(chunk(0, 1, b"efgh")))


def test_data_before_the_answer_is_unexpected() -> None:
    receiver = TransferReceiver(LIMITS)
    expect(T.UNEXPECTED_MESSAGE, lambda: receiver.receive(chunk(0, 0, b"a")))
    receiver = TransferReceiver(LIMITS)
    receiver.receive(Offer(TRANSFER_ID, (file_entry("a", 1),), 1, 4))
    expect(T.UNEXPECTED_MESSAGE, lambda: receiver.receive(chunk(0, 0, b"a")))


OFFER_CASES: list[tuple[str, Offer, TransferErrorCode]] = [
    (
        "too many entries",
        Offer(TRANSFER_ID, tuple(file_entry(f"f{i}", 0) for i in range(101)), 0, 4),
        T.TOO_MANY_ENTRIES,
    ),
    ("huge total", Offer(TRANSFER_ID, (file_entry("a", 1 << 62),), 1 << 62, 4), T.TOO_LARGE),
    ("file over the limit", Offer(TRANSFER_ID, (file_entry("a", 2000),), 2000, 4), T.TOO_LARGE),
    ("total mismatch", Offer(TRANSFER_ID, (file_entry("a", 10),), 11, 4), T.BAD_OFFER),
    ("total hides a file", Offer(TRANSFER_ID, (file_entry("a", 10),), 0, 4), T.BAD_OFFER),
    (
        "folder with a size",
        Offer(TRANSFER_ID, (Entry("d", "dir", 5, 0, 0, KEY),), 0, 4),
        T.BAD_OFFER,
    ),
    (
        "same path twice",
        Offer(TRANSFER_ID, (file_entry("a", 1), file_entry("a", 1)), 2, 4),
        T.BAD_OFFER,
    ),
    ("another transfer", Offer("t-2", (), 0, 4), T.BAD_OFFER),
    ("chunk size under the floor", Offer(TRANSFER_ID, (), 0, 2), T.BAD_CHUNK_SIZE),
    ("chunk size over the cap", Offer(TRANSFER_ID, (), 0, 64), T.BAD_CHUNK_SIZE),
    ("empty path", Offer(TRANSFER_ID, (file_entry("", 0),), 0, 4), T.BAD_PATH),
    ("absolute path", Offer(TRANSFER_ID, (file_entry("/etc/passwd", 0),), 0, 4), T.BAD_PATH),
    ("trailing slash", Offer(TRANSFER_ID, (file_entry("a/", 0),), 0, 4), T.BAD_PATH),
    ("empty component", Offer(TRANSFER_ID, (file_entry("a//b", 0),), 0, 4), T.BAD_PATH),
    ("NUL", Offer(TRANSFER_ID, (file_entry("a\x00b", 0),), 0, 4), T.BAD_PATH),
    ("long path", Offer(TRANSFER_ID, (file_entry("p" * 300, 0),), 0, 4), T.BAD_PATH),
    # 100 characters, 300 bytes of UTF-8: the limit is in bytes.
    ("long in bytes", Offer(TRANSFER_ID, (file_entry("\u20ac" * 100, 0),), 0, 4), T.BAD_PATH),
]


@pytest.mark.parametrize(
    ("offer", "code"), [case[1:] for case in OFFER_CASES], ids=[case[0] for case in OFFER_CASES]
)
def test_an_offer_beyond_the_limits_is_refused(offer: Offer, code: T) -> None:
    limits = TransferLimits(
        max_entries=100,
        max_total_bytes=1 << 40,
        max_file_size=1000,
        max_path_length=256,
        min_chunk_size=4,
        max_chunk_size=32,
    )
    receiver = TransferReceiver(limits, transfer_id=TRANSFER_ID)
    # Encoded as a hostile peer would, without our encoder's bound checks.
    payload = msgspec.msgpack.encode(offer)
    stream = MessageStream(TRANSFER_REGISTRY)
    try:
        (decoded,) = stream.receive_data(encode_header(OFFER, 0, len(payload)) + payload)
    except ProtocolError as error:  # a wire bound caught it first; the receiver must too
        assert error.code is ErrorCode.BAD_MESSAGE
        decoded = offer
    expect(code, lambda: receiver.receive(decoded))
    assert receiver.offer is None


def test_a_file_with_more_chunks_than_a_u32_counts_is_refused() -> None:
    receiver = TransferReceiver(TransferLimits(min_chunk_size=1, max_file_size=1 << 62))
    offer = Offer(TRANSFER_ID, (file_entry("a", 1 << 33),), 1 << 33, 1)
    expect(T.TOO_LARGE, lambda: receiver.receive(offer))


def test_a_ten_million_entry_claim_costs_nothing() -> None:
    """A MessagePack header claiming 10 million entries, followed by two: refused while
    decoding, before anything is allocated for them."""
    packed_entry = msgspec.msgpack.encode(file_entry("a", 0))
    payload = (
        b"\x84"
        + msgspec.msgpack.encode("transfer_id")
        + msgspec.msgpack.encode(TRANSFER_ID)
        + msgspec.msgpack.encode("entries")
        + b"\xdd"
        + (10_000_000).to_bytes(4, "big")
        + packed_entry * 2
        + msgspec.msgpack.encode("total_bytes")
        + b"\x00"
        + msgspec.msgpack.encode("chunk_size")
        + b"\x04"
    )
    frame = encode_header(OFFER, 0, len(payload)) + payload
    stream = MessageStream(TRANSFER_REGISTRY)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError) as caught:
            stream.receive_data(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.code is ErrorCode.BAD_MESSAGE
    assert peak < 64 * 1024


def test_an_offer_within_the_wire_bound_but_over_our_limit_is_refused_by_count() -> None:
    entries = tuple(file_entry(f"f{i}", 0) for i in range(1001))
    receiver = TransferReceiver(TransferLimits(max_entries=1000, min_chunk_size=1))
    link = Link()
    link.put(Offer(TRANSFER_ID, entries, 0, 4))
    (decoded,) = link.take()
    expect(T.TOO_MANY_ENTRIES, lambda: receiver.receive(decoded))


def test_accounting_never_grows_with_the_claimed_size() -> None:
    """A 1 TiB file claimed and its last chunk sent first: the receiver keeps one entry."""
    size = (1 << 40) - 7
    receiver = TransferReceiver(TransferLimits(max_file_size=1 << 40, max_total_bytes=1 << 40))
    receiver.receive(Offer(TRANSFER_ID, (file_entry("big", size),), size, MiB))
    receiver.accept()
    last = chunk_count(size, MiB) - 1
    data = b"z" * chunk_length(size, MiB, last)
    message = Chunk(0, last, digest(data), data)
    tracemalloc.start()
    try:
        (event,) = receiver.receive(message)
        receiver.chunk_verified(0, last)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(event, ChunkReceived) and event.offset == last * MiB
    assert peak < 16 * 1024


def test_verified_chunks_in_order_leave_no_per_chunk_state_behind() -> None:
    size = 20_000
    receiver = receiving((file_entry("many", size),), chunk_size=1)
    messages = [chunk(0, number, b"q") for number in range(size)]
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for message in messages:
            (event,) = receiver.receive(message)
            assert isinstance(event, ChunkReceived)
            receiver.chunk_verified(0, event.chunk)
        del event
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert receiver.bytes_verified == size
    assert after - before < 16 * 1024


# --------------------------------------------------------------------------- a hostile receiver


def streaming(entries: Sequence[Entry] | None = None, chunk_size: int = 4) -> TransferSender:
    entries = entries or (dir_entry("d"), file_entry("d/a", 10), file_entry("d/b", 4))
    sender = TransferSender(entries, chunk_size, TRANSFER_ID)
    sender.start()
    sender.receive(Answer(True))
    return sender


def offering() -> TransferSender:
    sender = TransferSender(
        (dir_entry("d"), file_entry("d/a", 10), file_entry("d/b", 4)), 4, TRANSFER_ID
    )
    sender.start()
    return sender


@pytest.mark.parametrize(
    "answer",
    [
        Answer(True, "", (Have(0, b""),)),  # a folder
        Answer(True, "", (Have(5, b"\x01"),)),  # no such entry
        Answer(True, "", (Have(1, b"\x01\x00"),)),  # 3 chunks: one byte, not two
        Answer(True, "", (Have(1, b""),)),
        Answer(True, "", (Have(1, b"\x08"),)),  # bit 3 of a 3-chunk file
        Answer(True, "", (Have(1, b"\x01"), Have(1, b"\x02"))),  # twice
        Answer(False, "no", (Have(1, b"\x01"),)),  # a refusal holds nothing
    ],
)
def test_a_bad_answer_is_refused(answer: Answer) -> None:
    sender = offering()
    expect(T.BAD_ANSWER, lambda: sender.receive(answer))
    assert sender.state is SenderState.FAILED
    assert sender.next_work() is None


def test_a_resend_must_name_a_chunk_that_was_sent() -> None:
    sender = streaming()
    sender.chunk_sent(1, 0)
    for bad in [Resend(1, 1), Resend(0, 0), Resend(2, 0), Resend(1, 3), Resend(7, 0)]:
        probe = streaming()
        probe.chunk_sent(1, 0)
        expect(T.BAD_RESEND, functools.partial(probe.receive, bad))
    assert sender.receive(Resend(1, 0)) == [ResendRequested(1, 0)]
    expect(T.BAD_RESEND, lambda: sender.receive(Resend(1, 0)))  # queued already


def test_a_file_failed_after_a_resend_request_drops_the_resend() -> None:
    sender = streaming()
    sender.chunk_sent(1, 0)
    sender.receive(Resend(1, 0))
    assert sender.next_work() == SendChunk(1, 0, 0, 4, resend=True)
    sender.receive(FileDone(1, False, "disk error"))
    assert sender.next_work() == SendChunk(2, 0, 0, 4)


def test_a_resend_of_a_chunk_the_receiver_said_it_had_is_refused() -> None:
    sender = TransferSender([file_entry("a", 8)], 4, TRANSFER_ID)
    sender.start()
    sender.receive(Answer(True, "", (Have(0, b"\x01"),)))
    sender.chunk_sent(0, 1)
    expect(T.BAD_RESEND, lambda: sender.receive(Resend(0, 0)))


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ([], FileDone(1, True)),  # before its FileEnd
        ([], FileDone(0, False)),  # a folder
        ([], FileDone(9, False)),
        ([FileDone(2, False)], FileDone(2, False)),  # twice
        ([], Complete(0, 0)),  # before the verdicts
        ([FileDone(1, False)], Complete(0, 0)),
        ([FileDone(1, False), FileDone(2, False)], Complete(1, 4)),  # counts differ
        ([], Progress(15, 0)),  # more than offered
        ([], Progress(0, 3)),
    ],
)
def test_a_report_that_contradicts_the_sender_is_refused(
    setup: list[object], message: object
) -> None:
    sender = streaming()
    for earlier in setup:
        sender.receive(earlier)
    expect(T.BAD_REPORT, lambda: sender.receive(message))


def test_a_second_answer_or_a_stray_message_is_unexpected() -> None:
    expect(T.UNEXPECTED_MESSAGE, lambda: streaming().receive(Answer(True)))
    expect(T.UNEXPECTED_MESSAGE, lambda: offering().receive(Progress(0, 0)))
    expect(T.UNEXPECTED_MESSAGE, lambda: TransferSender([], 4, "x").receive(Answer(True)))


# --------------------------------------------------------------------------- our own mistakes


def test_local_mistakes_raise_and_change_nothing() -> None:
    sender = streaming()
    with pytest.raises(LocalProtocolError):
        sender.chunk_sent(1, 1)  # chunk 0 is due
    with pytest.raises(LocalProtocolError):
        sender.file_sent(1, bytes(32))  # its chunks are not all sent
    with pytest.raises(LocalProtocolError):
        sender.file_sent(1, b"short")
    with pytest.raises(LocalProtocolError):
        sender.start()
    assert sender.next_work() == SendChunk(1, 0, 0, 4)
    assert sender.bytes_sent == 0

    receiver = TransferReceiver(LIMITS)
    with pytest.raises(LocalProtocolError):
        receiver.accept()  # no offer yet
    receiver.receive(Offer(TRANSFER_ID, (dir_entry("d"), file_entry("f", 6)), 6, 4))
    for have in [{0: b""}, {1: b"\x04"}, {1: b"\x01\x00"}, {2: b"\x01"}]:
        with pytest.raises(LocalProtocolError):
            receiver.accept(have)
    assert receiver.state is ReceiverState.DECIDING
    receiver.accept()
    with pytest.raises(LocalProtocolError):
        receiver.chunk_verified(1, 0)  # never received
    with pytest.raises(LocalProtocolError):
        receiver.file_done(1, True)  # no FileEnded yet
    with pytest.raises(LocalProtocolError):
        receiver.file_done(0, False)  # a folder
    with pytest.raises(LocalProtocolError):
        receiver.decline()
    assert receiver.files_done == 0


def test_the_sender_checks_its_own_entries() -> None:
    for entries, chunk_size in [
        ([file_entry("", 1)], 4),
        ([file_entry("a//b", 1)], 4),
        ([Entry("d", "dir", 3, 0, 0, KEY)], 4),
        ([file_entry("a", 1)], 0),
        ([file_entry("a", 1)], 8 * MiB),
        ([file_entry("a", 1), dir_entry("a")], 4),
    ]:
        with pytest.raises(LocalProtocolError):
            TransferSender(entries, chunk_size, TRANSFER_ID)


# --------------------------------------------------------------------------- wire format


def test_type_codes_and_struct_layouts() -> None:
    codes = {spec.cls: spec.code for spec in TRANSFER_REGISTRY.specs if spec.code >= 0x100}
    assert codes == {
        Offer: OFFER,
        Answer: ANSWER,
        Chunk: CHUNK,
        FileEnd: FILE_END,
        Resend: RESEND,
        Progress: PROGRESS,
        FileDone: FILE_DONE,
        Cancel: 0x0107,
        Complete: COMPLETE,
    }
    assert all(0x100 <= code <= 0x1FF for code in codes.values())
    stream = MessageStream(TRANSFER_REGISTRY)
    frame = stream.send(Chunk(1, 2, b"d" * 32, b"data"))
    assert frame == encode_header(CHUNK, 0, CHUNK_HEAD_SIZE + 4) + (
        b"\x00\x00\x00\x01\x00\x00\x00\x02" + b"d" * 32 + b"data"
    )
    assert stream.send(Resend(7, 9))[8:] == bytes.fromhex("00000007 00000009")
    assert stream.send(Progress(5, 6))[8:] == bytes.fromhex("0000000000000005 00000006")
    assert stream.send(Complete(3, 4))[8:] == bytes.fromhex("00000003 0000000000000004")
    assert len(stream.send(FileEnd(1, bytes(32)))) == 8 + 36


def test_a_full_size_chunk_fits_the_bulk_cap_and_its_data_is_a_view() -> None:
    data = bytes(4 * MiB)
    wire = MessageStream(TRANSFER_REGISTRY).send(Chunk(0, 0, bytes(32), data))
    (decoded,) = MessageStream(TRANSFER_REGISTRY).receive_data(wire)
    assert isinstance(decoded, Chunk) and isinstance(decoded.data, memoryview)
    assert decoded.data.obj is wire and decoded.data.nbytes == 4 * MiB
    assert "data" not in repr(decoded)  # file contents never reach a log


def test_an_unknown_cancel_code_from_a_newer_peer_decodes() -> None:
    payload = msgspec.msgpack.encode({"reason": "x", "code": 0x1EE})
    (cancel,) = MessageStream(TRANSFER_REGISTRY).receive_data(
        encode_header(0x0107, 0, len(payload)) + payload
    )
    assert isinstance(cancel, Cancel) and cancel.code == 0x1EE and not cancel.code.known


def test_a_transfer_error_carries_the_shared_code_space() -> None:
    error = TransferProtocolError(T.NOT_A_FILE, "entry 0 is a dir")
    assert error.code == 0x111 and error.transfer_code is T.NOT_A_FILE
    assert str(error) == "NOT_A_FILE: entry 0 is a dir"
    assert int(T.UNEXPECTED_MESSAGE) == ErrorCode.UNEXPECTED_MESSAGE
    assert int(T.CANCELLED) == ErrorCode.CANCELLED


def test_bitmaps() -> None:
    assert make_bitmap([0, 2, 8], 9) == b"\x05\x01"
    assert full_bitmap(10) == b"\xff\x03" and full_bitmap(0) == b""
    assert list(bitmap_chunks(b"\x05\x01")) == [0, 2, 8]
    assert is_valid_bitmap(b"\xff\x03", 10)
    assert not is_valid_bitmap(b"\xff\x07", 10) and not is_valid_bitmap(b"\xff", 10)
    assert bitmap_bytes(b"\x05\x01", 8 * 4 + 1, 4) == 4 + 4 + 1
    assert path_syntax_error("a/b c/\u00e9") is None
    with pytest.raises(ValueError):
        make_bitmap([9], 9)


def test_the_tables_are_consistent() -> None:
    assert set(SENDER_ADMITS) == set(SenderState)
    assert set(RECEIVER_ADMITS) == set(ReceiverState)
    for state in (SenderState.DONE, SenderState.DECLINED):
        assert not any(s is state for (s, _) in SENDER_TRANSITIONS)  # terminal
    assert not any(s is ReceiverState.BROKEN for (s, _) in RECEIVER_TRANSITIONS)
    reachable = {SenderState.IDLE, *SENDER_TRANSITIONS.values()}
    assert reachable == set(SenderState)
    assert {ReceiverState.AWAITING_OFFER, *RECEIVER_TRANSITIONS.values()} == set(ReceiverState)
    assert len(INCOMING_FILE_TRANSITIONS) == 6 and len(OUTGOING_FILE_TRANSITIONS) == 4


# --------------------------------------------------------------------------- properties


@st.composite
def transfers(draw: st.DrawFn) -> TransferPair:
    contents = draw(
        st.lists(st.one_of(st.none(), st.binary(min_size=0, max_size=40)), min_size=1, max_size=4)
    )
    chunk_size = draw(st.integers(1, 9))
    have: dict[int, set[int]] = {}
    corrupt: dict[tuple[int, int], int] = {}
    for index, data in enumerate(contents):
        if data is None:
            continue
        count = chunk_count(len(data), chunk_size)
        held: set[int] = draw(st.sets(st.integers(0, count - 1))) if count else set()
        listed = draw(st.booleans())  # an empty bitmap is a valid Have too
        if held or listed:
            have[index] = held
        for number in draw(st.sets(st.integers(0, count - 1), max_size=2)) if count else ():
            if number not in held:
                corrupt[index, number] = draw(st.integers(1, 2))
    return TransferPair(contents, chunk_size, have=have, corrupt=corrupt, max_resends=3)


def random_split(data: st.DataObject) -> Split:
    def split(chunk: bytes) -> list[bytes]:
        cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(chunk) - 1)), max_size=4)))
        bounds = [0, *(c for c in cuts if c < len(chunk)), len(chunk)]
        return [chunk[a:b] for a, b in itertools.pairwise(bounds) if b > a]

    return split


ACTIONS = ("send", "to_receiver", "verify", "finish", "report", "to_sender")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(transfers(), st.data())
def test_any_interleaving_keeps_the_accounting_exact(
    pair: TransferPair, data: st.DataObject
) -> None:
    pair.start()
    split = random_split(data)
    for _ in range(data.draw(st.integers(0, 120))):
        action = data.draw(st.sampled_from(ACTIONS))
        if action == "send":
            pair.sender_step()
        elif action == "to_receiver":
            pair.receiver_read(data.draw(st.integers(1, 200)), split)
        elif action == "verify" and pair.pending:
            pair.receiver_verify(data.draw(st.integers(0, len(pair.pending) - 1)))
        elif action == "finish" and pair.ready:
            pair.receiver_finish(data.draw(st.integers(0, len(pair.ready) - 1)))
        elif action == "report":
            pair.receiver_report(data.draw(st.sampled_from([0.0, 0.05, 0.2])))
        elif action == "to_sender":
            pair.sender_read(data.draw(st.integers(1, 200)), split)
        pair.check_accounting()
        assert pair.receiver.bytes_received <= pair.receiver._budget
    pair.run(split=split)
    pair.check_arrived_whole()


U32S = st.integers(0, 0xFFFF_FFFF)
DIGESTS = st.binary(min_size=32, max_size=32)
SENDER_MESSAGES = st.one_of(
    st.builds(Chunk, st.integers(0, 4), st.integers(0, 4), DIGESTS, st.binary(max_size=6)),
    st.builds(Chunk, U32S, U32S, DIGESTS, st.binary(max_size=6)),
    st.builds(FileEnd, st.integers(0, 4), DIGESTS),
    st.builds(Cancel, st.text(max_size=5), st.sampled_from(list(T))),
    st.builds(
        Offer,
        st.sampled_from([TRANSFER_ID, "x"]),
        st.lists(
            st.builds(
                Entry,
                st.text(min_size=1, max_size=6),
                st.sampled_from(["file", "dir"]),
                st.integers(0, 20),
                st.just(0o644),
                st.just(0),
                st.just(KEY),
            ),
            max_size=3,
        ).map(tuple),
        st.integers(0, 40),
        st.integers(1, 8),
    ),
)
RECEIVER_MESSAGES = st.one_of(
    st.builds(
        Answer,
        st.booleans(),
        st.just(""),
        st.lists(st.builds(Have, st.integers(0, 3), st.binary(max_size=2)), max_size=2).map(tuple),
    ),
    st.builds(Resend, st.integers(0, 3), st.integers(0, 4)),
    st.builds(Progress, st.integers(0, 20), st.integers(0, 3)),
    st.builds(FileDone, st.integers(0, 3), st.booleans(), st.just("")),
    st.builds(Complete, st.integers(0, 3), st.integers(0, 20)),
    st.builds(Cancel, st.text(max_size=5), st.sampled_from(list(T))),
)


def garbage_frames() -> st.SearchStrategy[bytes]:
    frame = st.tuples(st.sampled_from(range(0x100, 0x10A)), st.binary(max_size=60)).map(
        lambda t: encode_header(t[0], 0, len(t[1])) + t[1]
    )
    return st.lists(st.one_of(frame, st.binary(max_size=20)), max_size=6).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.lists(SENDER_MESSAGES, max_size=8), garbage_frames())
def test_garbage_to_a_receiver_raises_only_protocol_errors(
    accepted: bool, messages: list[object], garbage: bytes
) -> None:
    receiver = receiving() if accepted else TransferReceiver(LIMITS, transfer_id=TRANSFER_ID)
    try:
        for message in messages:
            for event in receiver.receive(message):
                if isinstance(event, OfferReceived):
                    receiver.accept()
                elif isinstance(event, ChunkReceived):
                    receiver.chunk_verified(event.index, event.chunk)
            assert receiver.bytes_received <= receiver._budget
        stream = MessageStream(TRANSFER_REGISTRY)
        for message in stream.receive_data(garbage):
            receiver.receive(message)
    except LocalProtocolError:
        raise
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.lists(RECEIVER_MESSAGES, max_size=8), garbage_frames())
def test_garbage_to_a_sender_raises_only_protocol_errors(
    answered: bool, messages: list[object], garbage: bytes
) -> None:
    sender = streaming() if answered else offering()
    if answered:
        sender.chunk_sent(1, 0)
    try:
        for message in messages:
            sender.receive(message)
            work = sender.next_work()
            if isinstance(work, SendChunk):
                sender.chunk_sent(work.index, work.chunk)
        stream = MessageStream(TRANSFER_REGISTRY)
        for message in stream.receive_data(garbage):
            sender.receive(message)
    except LocalProtocolError:
        raise
    except ProtocolError:
        pass
