"""Transfer protocol costs: Chunk and Offer encoding, and the state machines per small file.

Each figure is paired with a baseline measured in the same run, interleaved round by round:

- **Chunk, 1 MiB**: ``MessageStream.send_parts`` + decode of a whole frame (zero copy), against
  ``struct.pack`` of the same header and metadata and ``unpack_from`` + a ``memoryview`` slice.
- **Offer, 10,000 entries**: our MessagePack codec (msgspec, typed, every bound checked; the
  encoder checks the bounds too), against stdlib ``json`` with the same checks written by hand
  and the same frozen dataclasses built: the dependency-free alternative.
- **one 4 KiB file through both state machines**: the whole sans-IO exchange of a 10,000-file
  transfer (plan, Chunk, FileEnd, receiver accounting, digest report, FileDone, Complete; no
  hashing, no disk), against only encoding and decoding the same messages: what the state
  machines add to the wire work, for the issue's 2,000 small files/s target.

Run: ``pytest -m benchmark tests/benchmarks/test_bench_transfer_protocol.py`` (the table is
always printed). With ``MESHAGENT_BENCH_OUT`` set, the figures are also written there as JSON
(a file path, or an existing directory that gets ``transfer_protocol.json``).
"""

from __future__ import annotations

import json
import os
import platform
import struct
from typing import Any

import pytest

from meshagent_gui.core.protocol.framing import HEADER, MiB
from meshagent_gui.core.protocol.registry import MessageStream
from meshagent_gui.core.protocol.transfer import (
    CHUNK,
    TRANSFER_REGISTRY,
    Answer,
    Chunk,
    ChunkReceived,
    Complete,
    EndFile,
    Entry,
    FileDone,
    FileEnd,
    FileEnded,
    Offer,
    OfferReceived,
    SendChunk,
    TransferLimits,
    TransferReceiver,
    TransferSender,
)
from tests.benchmarks._measure import against_baselines, timed, write_report

pytestmark = pytest.mark.benchmark

ROUNDS = 5
CHUNKS_PER_ROUND = 64
ENTRIES = 10_000
OFFERS_PER_ROUND = 3
SMALL_FILE = 4096
DIGEST = bytes(range(32))
KEY = bytes(16)
CHUNK_HEAD = struct.Struct("!BBHIII32s")


def entries() -> tuple[Entry, ...]:
    return tuple(
        Entry(
            f"photos/2024/trip {i // 100:03d}/IMG_{i:05d}.jpg",
            "file",
            SMALL_FILE,
            0o644,
            1_700_000_000_000_000_000 + i,
            KEY,
        )
        for i in range(ENTRIES)
    )


def json_offer_roundtrip(offer: Offer) -> Offer:
    """Stdlib json, with the checks a hostile peer makes necessary written out."""
    wire = json.dumps(
        {
            "transfer_id": offer.transfer_id,
            "entries": [
                [e.path, e.kind, e.size, e.mode, e.mtime_ns, e.key.hex()] for e in offer.entries
            ],
            "total_bytes": offer.total_bytes,
            "chunk_size": offer.chunk_size,
        },
        separators=(",", ":"),
    ).encode()
    raw = json.loads(wire)
    if type(raw) is not dict or type(raw.get("entries")) is not list:
        raise ValueError("shape")
    built: list[Entry] = []
    for item in raw["entries"]:
        path, kind, size, mode, mtime_ns, key = item
        if not (
            type(path) is str
            and 0 < len(path) <= 4096
            and kind in ("file", "dir")
            and type(size) is int
            and 0 <= size < 1 << 63
            and type(mode) is int
            and 0 <= mode <= 0o7777
            and type(mtime_ns) is int
            and -(1 << 63) <= mtime_ns < 1 << 63
            and type(key) is str
            and len(key) == 32
        ):
            raise ValueError("entry")
        built.append(Entry(path, kind, size, mode, mtime_ns, bytes.fromhex(key)))
    return Offer(raw["transfer_id"], tuple(built), raw["total_bytes"], raw["chunk_size"])


def small_files_exchange(files: tuple[Entry, ...], data: bytes) -> int:
    """Both state machines over the wire format; returns the files completed."""
    sender = TransferSender(files, MiB, "bench")
    receiver = TransferReceiver(TransferLimits())
    out, back = MessageStream(TRANSFER_REGISTRY), MessageStream(TRANSFER_REGISTRY)
    inbox, outbox = MessageStream(TRANSFER_REGISTRY), MessageStream(TRANSFER_REGISTRY)
    (offer,) = sender.start()
    for message in inbox.receive_data(out.send(offer)):
        for event in receiver.receive(message):
            assert isinstance(event, OfferReceived)
            for reply in receiver.accept():
                for answer in outbox.receive_data(back.send(reply)):
                    sender.receive(answer)
    completed = 0
    while (work := sender.next_work()) is not None:
        if isinstance(work, SendChunk):
            wire = out.send(Chunk(work.index, work.chunk, DIGEST, data))
            sender.chunk_sent(work.index, work.chunk)
        else:
            assert isinstance(work, EndFile)
            end = sender.file_sent(work.index, DIGEST)
            assert end is not None
            wire = out.send(end)
        for message in inbox.receive_data(wire):
            for event in receiver.receive(message):
                if isinstance(event, ChunkReceived):
                    receiver.chunk_verified(event.index, event.chunk)
                elif isinstance(event, FileEnded):
                    for report in receiver.file_done(event.index, True):
                        for verdict in outbox.receive_data(back.send(report)):
                            sender.receive(verdict)
                            completed += isinstance(verdict, Complete)
    assert completed == 1
    return len(files)


def codec_only_exchange(files: tuple[Entry, ...], data: bytes) -> int:
    """The same messages encoded and decoded, with no state machine."""
    out, inbox = MessageStream(TRANSFER_REGISTRY), MessageStream(TRANSFER_REGISTRY)
    back, outbox = MessageStream(TRANSFER_REGISTRY), MessageStream(TRANSFER_REGISTRY)
    inbox.receive_data(out.send(Offer("bench", files, SMALL_FILE * len(files), MiB)))
    outbox.receive_data(back.send(Answer(True)))
    for index in range(len(files)):
        inbox.receive_data(out.send(Chunk(index, 0, DIGEST, data)))
        inbox.receive_data(out.send(FileEnd(index, DIGEST)))
        outbox.receive_data(back.send(FileDone(index, True)))
    outbox.receive_data(back.send(Complete(len(files), SMALL_FILE * len(files))))
    return len(files)


def measure_round(data: bytes, small: bytes, offer: Offer) -> dict[str, float]:
    chunks = [Chunk(7, i, DIGEST, data) for i in range(CHUNKS_PER_ROUND)]
    stream = MessageStream(TRANSFER_REGISTRY)
    frames = [stream.send(chunk) for chunk in chunks]
    seconds: dict[str, float] = {}

    def ours_chunks() -> None:
        sender, receiver = MessageStream(TRANSFER_REGISTRY), MessageStream(TRANSFER_REGISTRY)
        for chunk in chunks:
            sender.send_parts(chunk)
        for frame in frames:
            receiver.receive_data(frame)

    def base_chunks() -> None:
        for chunk in chunks:
            head = CHUNK_HEAD.pack(
                1, 0, CHUNK, 40 + len(chunk.data), chunk.index, chunk.chunk, chunk.digest
            )
            (head, chunk.data)  # noqa: B018  # what a writer hands to the transport
        for frame in frames:
            _, _, _, length, index, number, digest = CHUNK_HEAD.unpack_from(frame)
            view = memoryview(frame)[HEADER.size + 40 : HEADER.size + length]
            (index, number, digest, view)  # noqa: B018  # the tuple a decoder would return

    def ours_offer() -> None:
        for _ in range(OFFERS_PER_ROUND):
            (decoded,) = MessageStream(TRANSFER_REGISTRY).receive_data(
                MessageStream(TRANSFER_REGISTRY).send(offer)
            )
            assert isinstance(decoded, Offer) and len(decoded.entries) == ENTRIES

    def base_offer() -> None:
        for _ in range(OFFERS_PER_ROUND):
            assert len(json_offer_roundtrip(offer).entries) == ENTRIES

    files = offer.entries
    seconds["chunk"] = timed(ours_chunks)
    seconds["base_chunk"] = timed(base_chunks)
    seconds["offer"] = timed(ours_offer)
    seconds["base_offer"] = timed(base_offer)
    seconds["files"] = timed(lambda: small_files_exchange(files, small))
    seconds["base_files"] = timed(lambda: codec_only_exchange(files, small))
    return {
        "chunk": CHUNKS_PER_ROUND / seconds["chunk"],
        "base_chunk": CHUNKS_PER_ROUND / seconds["base_chunk"],
        "offer": OFFERS_PER_ROUND / seconds["offer"],
        "base_offer": OFFERS_PER_ROUND / seconds["base_offer"],
        "files": ENTRIES / seconds["files"],
        "base_files": ENTRIES / seconds["base_files"],
    }


def test_transfer_protocol_against_baselines(
    one_core: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = os.urandom(MiB)
    small = os.urandom(SMALL_FILE)
    files = entries()
    offer = Offer("bench", files, SMALL_FILE * ENTRIES, MiB)
    offer_bytes = len(MessageStream(TRANSFER_REGISTRY).send(offer))
    rounds = [measure_round(data, small, offer) for _ in range(ROUNDS)]

    # label: (ours, baseline, unit, floor). Below the floor the layer is broken, not slow.
    pairs = {
        "Chunk 1 MiB enc+dec": ("chunk", "base_chunk", "msg/s", 0.03),
        "Offer 10k entries enc+dec": ("offer", "base_offer", "msg/s", 0.5),
        "4 KiB file, both machines": ("files", "base_files", "file/s", 0.1),
    }
    results = against_baselines(rounds, pairs)
    report: dict[str, Any] = {
        "benchmark": "transfer_protocol",
        "unit": "median of rounds; messages or files per second",
        "baseline": "hand-written struct / stdlib json / codec only, same run",
        "rounds": ROUNDS,
        "offer_bytes": offer_bytes,
        "pinned": one_core,
        "python": platform.python_version(),
        "results": results,
    }

    with capsys.disabled():
        print()
        print(f"{'transfer protocol':<28}{'ours':>12}{'baseline':>12}{'unit':>8}{'ratio':>8}")
        for label, figures in results.items():
            print(
                f"{label:<28}{figures['value']:>12,.0f}{figures['baseline']:>12,.0f}"
                f"{figures['unit']:>8}{figures['ratio']:>8.2f}"
            )
        print(f"(a 10,000-entry Offer is {offer_bytes:,} bytes on the wire)")

    write_report(report, "transfer_protocol.json")

    for label, figures in results.items():
        assert float(figures["ratio"]) > float(figures["floor"]), f"{label} too slow: {figures}"
