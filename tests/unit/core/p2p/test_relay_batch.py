"""RelayLink's batch frames: a flight for one peer goes out as one frame (in order, bounded),
and what comes in is read only as far as its lengths hold."""

from __future__ import annotations

import struct

from meshagent_gui.core.mesh.types import RELAY_ID_BYTES, RELAY_MAX_BATCH
from meshagent_gui.core.p2p.endpoint import relay_address
from meshagent_gui.core.p2p.relay import RelayLink

PEER, OTHER = "ab" * 32, "cd" * 32


class FakeEndpoint:
    def feed_datagrams(self, datagrams: object) -> None:
        pass


def _link() -> RelayLink:
    link = RelayLink(None, FakeEndpoint())  # type: ignore[arg-type]
    link._ws = object()  # type: ignore[assignment]  # "connected"
    link._batched = True
    return link


def _datagrams(frame: bytes) -> list[bytes]:
    out, offset = [], RELAY_ID_BYTES
    while offset < len(frame):
        (length,) = struct.unpack_from("!H", frame, offset)
        out.append(frame[offset + 2 : offset + 2 + length])
        offset += 2 + length
    return out


def test_a_flight_for_one_peer_is_one_frame_and_peers_are_not_mixed() -> None:
    link = _link()
    link.send([b"a1", b"a2"], relay_address(PEER))
    link.send([b"b1"], relay_address(OTHER))
    link.send([b"a3"], relay_address(PEER))
    first = link._next_batch()
    assert first[:RELAY_ID_BYTES] == bytes.fromhex(PEER) and _datagrams(first) == [b"a1", b"a2"]
    second = link._next_batch()
    assert second[:RELAY_ID_BYTES] == bytes.fromhex(OTHER) and _datagrams(second) == [b"b1"]
    assert _datagrams(link._next_batch()) == [b"a3"]  # order kept: never ahead of b1
    assert link.stats.frames_out == 4 and link.stats.bytes_out == 8


def test_a_batch_never_exceeds_the_frame_limit() -> None:
    link = _link()
    link.send([bytes(1400)] * 100, relay_address(PEER))
    sizes = []
    while link._outbox:
        sizes.append(len(link._next_batch()))
    assert max(sizes) <= RELAY_MAX_BATCH and len(sizes) > 1
    assert link.stats.frames_out == 100


def test_a_damaged_batch_is_read_up_to_the_damage() -> None:
    link = _link()
    source = bytes.fromhex(PEER)
    good = struct.pack("!H", 3) + b"one"
    for tail in (struct.pack("!H", 500) + b"short", struct.pack("!H", 0), b"\x00", bytes(2)):
        link._inbound.clear()
        link._read_batch(source + good + tail, relay_address(PEER))
        assert link._inbound == [(b"one", relay_address(PEER))]
    assert link.stats.malformed == 4
