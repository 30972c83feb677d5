"""The relay's batch frames (``meshagent-relay-batch``): a flight of datagrams in one frame,
passed unopened between sockets that speak it and split for one that does not; a damaged or
oversized batch costs its sender, never the server or the receiver."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from meshagent_gui.core.mesh.types import (
    RELAY_BATCH_PROTOCOL,
    RELAY_ID_BYTES,
    RELAY_MAX_BATCH,
    RELAY_MAX_DATAGRAM,
)
from meshagent_gui.server.relay import CLOSE_BAD_FRAME, RelayLimits, _Peer, split_batch
from meshagent_gui.server.store import Principal
from tests.unit.server.test_hub import WAIT, Mesh, start_mesh

BATCH = [RELAY_BATCH_PROTOCOL]


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    async for running in start_mesh(tmp_path):
        yield running


def batch(*datagrams: bytes) -> bytes:
    return b"".join(struct.pack("!H", len(d)) + d for d in datagrams)


async def test_batches_pass_between_batching_sockets_and_are_split_for_others(mesh: Mesh) -> None:
    await mesh.user("ann")
    laptop, phone, old = [await mesh.device("ann", name) for name in ("laptop", "phone", "old")]
    url = mesh.ws_url.removesuffix("/ws") + "/relay"
    async with (
        connect(url, additional_headers=laptop.auth, subprotocols=BATCH) as a,  # type: ignore[list-item]
        connect(url, additional_headers=phone.auth, subprotocols=BATCH) as b,  # type: ignore[list-item]
        connect(url, additional_headers=old.auth) as c,
    ):
        assert a.subprotocol == b.subprotocol == RELAY_BATCH_PROTOCOL and c.subprotocol is None
        async with asyncio.timeout(WAIT):
            while mesh.server.state.relay.connection_count < 3:
                await asyncio.sleep(0.01)
        flight = batch(b"one", b"two", b"three")
        await a.send(bytes.fromhex(phone.device_id) + flight)
        assert await asyncio.wait_for(b.recv(), WAIT) == bytes.fromhex(laptop.device_id) + flight
        await a.send(bytes.fromhex(old.device_id) + flight)  # split for the older agent
        for datagram in (b"one", b"two", b"three"):
            got = await asyncio.wait_for(c.recv(), WAIT)
            assert got == bytes.fromhex(laptop.device_id) + datagram
        await c.send(bytes.fromhex(laptop.device_id) + b"single")  # a batch of one for a
        got = await asyncio.wait_for(a.recv(), WAIT)
        assert got == bytes.fromhex(old.device_id) + batch(b"single")


async def test_an_oversized_batch_closes_its_senders_socket(mesh: Mesh) -> None:
    await mesh.user("ann")
    laptop = await mesh.device("ann", "laptop")
    phone = await mesh.device("ann", "phone")
    url = mesh.ws_url.removesuffix("/ws") + "/relay"
    async with connect(url, additional_headers=laptop.auth, subprotocols=BATCH) as a:  # type: ignore[list-item]
        await a.send(bytes.fromhex(phone.device_id) + bytes(RELAY_MAX_BATCH))
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(a.recv(), WAIT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == CLOSE_BAD_FRAME


@given(st.binary(max_size=4000))
def test_splitting_garbage_yields_only_whole_bounded_datagrams(body: bytes) -> None:
    frame = bytes(RELAY_ID_BYTES) + body
    datagrams = split_batch(frame)
    assert all(0 < len(d) <= RELAY_MAX_DATAGRAM for d in datagrams)
    assert sum(2 + len(d) for d in datagrams) <= len(body)


def test_a_slow_receivers_queue_is_bounded_in_bytes_and_merges_per_source() -> None:
    principal = Principal(
        device_id="ab" * 32, user="ann", admin=False, session_id="s", access_expires_at=0.0
    )
    peer = _Peer(principal, RelayLimits(max_queued_bytes=64 * 1024), batched=True)
    source = bytes(RELAY_ID_BYTES)
    frame = source + batch(bytes(1400))
    kept = [peer.push(frame) for _ in range(200)]
    assert not all(kept) and peer.queued_bytes <= 64 * 1024
    merged = peer.pop()
    assert merged.startswith(source) and len(merged) <= RELAY_MAX_BATCH
    assert len(split_batch(merged)) > 1  # one frame out for many queued
    while peer.outbox:
        peer.pop()
    assert peer.queued_bytes == 0
