"""STUN responder and datagram relay through a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aioice import stun
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from meshagent_gui.core.mesh.types import API_PREFIX
from meshagent_gui.server.relay import RelayLimits
from meshagent_gui.server.store import Store
from meshagent_gui.server.stun import binding_response, is_stun
from tests.unit.server.test_hub import WAIT, Mesh, start_mesh


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    async for running in start_mesh(tmp_path):
        yield running


def binding_request() -> stun.Message:
    return stun.Message(
        message_method=stun.Method.BINDING,
        message_class=stun.Class.REQUEST,
        transaction_id=os.urandom(12),
    )


def test_binding_response_carries_the_address() -> None:
    request = binding_request()
    answer = binding_response(bytes(request), ("203.0.113.7", 40000))
    assert answer is not None
    parsed = stun.parse_message(answer)
    assert parsed.transaction_id == request.transaction_id
    assert parsed.attributes["XOR-MAPPED-ADDRESS"] == ("203.0.113.7", 40000)


@given(st.binary(max_size=600))
def test_garbage_is_never_answered_nor_crashes(data: bytes) -> None:
    answer = binding_response(data, ("127.0.0.1", 1))
    assert answer is None or is_stun(data)


async def test_stun_over_udp_reports_our_socket(mesh: Mesh) -> None:
    info = (await mesh.http.get("/info")).json()
    port = info["stun_port"]
    assert port
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        request = binding_request()
        await loop.sock_sendto(sock, bytes(request), ("127.0.0.1", port))
        data = await asyncio.wait_for(loop.sock_recv(sock, 2048), WAIT)
        assert stun.parse_message(data).attributes["XOR-MAPPED-ADDRESS"] == sock.getsockname()


async def test_relay_forwards_between_room_peers_only(mesh: Mesh) -> None:
    await mesh.user("ann")
    await mesh.user("eve")
    laptop = await mesh.device("ann", "laptop")
    phone = await mesh.device("ann", "phone")
    stranger = await mesh.device("eve", "eve-box")
    url = mesh.ws_url.removesuffix("/ws") + "/relay"
    assert url.endswith(API_PREFIX + "/relay")
    async with (
        connect(url, additional_headers=laptop.auth, open_timeout=WAIT) as a,
        connect(url, additional_headers=phone.auth, open_timeout=WAIT) as b,
        connect(url, additional_headers=stranger.auth, open_timeout=WAIT) as e,
    ):
        while mesh.server.state.relay.connection_count < 3:  # all three registered
            await asyncio.sleep(0.01)
        await a.send(bytes.fromhex(phone.device_id) + b"quic-packet")
        got = await asyncio.wait_for(b.recv(), WAIT)
        assert got == bytes.fromhex(laptop.device_id) + b"quic-packet"
        await e.send(bytes.fromhex(phone.device_id) + b"intruder")
        await b.send(bytes.fromhex(laptop.device_id) + b"reply")
        assert await asyncio.wait_for(a.recv(), WAIT) == bytes.fromhex(phone.device_id) + b"reply"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(b.recv(), 0.3)  # the stranger's packet never arrived
        assert mesh.server.state.relay.stats.refused == 1


async def until(condition: Callable[[], bool]) -> None:
    """Wait (bounded) for the server to get somewhere; never a timing assertion."""
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.01)


async def test_the_relay_budget_belongs_to_the_device_not_the_socket(mesh: Mesh) -> None:
    relay = mesh.server.state.relay
    relay.limits = RelayLimits(bytes_per_second=1.0, burst_bytes=3000.0)
    await mesh.user("ann")
    laptop, phone = await mesh.device("ann", "laptop"), await mesh.device("ann", "phone")
    url = mesh.ws_url.removesuffix("/ws") + "/relay"
    packet = bytes.fromhex(phone.device_id) + b"q" * 1400
    async with connect(url, additional_headers=phone.auth, open_timeout=WAIT) as b:
        async with connect(url, additional_headers=laptop.auth, open_timeout=WAIT) as a:
            await until(lambda: relay.connection_count == 2)
            for _ in range(3):
                await a.send(packet)
            await until(lambda: relay.stats.forwarded + relay.stats.dropped == 3)
            assert (relay.stats.forwarded, relay.stats.dropped) == (2, 1)
        # A new socket of the same device: still the same, spent budget.
        async with connect(url, additional_headers=laptop.auth, open_timeout=WAIT) as a:
            await until(lambda: relay.connection_count == 2)
            await a.send(packet)
            await until(lambda: relay.stats.dropped == 2)
        assert relay.stats.forwarded == 2
        for _ in range(2):
            assert len(await asyncio.wait_for(b.recv(), WAIT)) == len(packet)


async def test_revoked_sessions_lose_ws_and_relay_at_once(mesh: Mesh) -> None:
    await mesh.user("ann")
    laptop, phone = await mesh.device("ann", "laptop"), await mesh.device("ann", "phone")
    state = mesh.server.state
    principal = await state.db.call(Store.authenticate, laptop.access_token, now=state.clock())
    assert principal is not None
    url = mesh.ws_url.removesuffix("/ws") + "/relay"
    async with (
        connect(url, additional_headers=laptop.auth, open_timeout=WAIT) as relay_socket,
        mesh.online(laptop) as agent,
        mesh.online(phone) as watcher,
    ):
        await until(lambda: state.relay.connection_count == 1)
        assert watcher.hello["online"] == [laptop.device_id]
        state.revoke_sockets([principal.session_id])
        assert await agent.closed_with() == 4403
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(WAIT):
                await relay_socket.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
        offline = await watcher.receive_until(lambda f: f.get("type") == "presence")
        assert (offline["device_id"], offline["online"]) == (laptop.device_id, False)
