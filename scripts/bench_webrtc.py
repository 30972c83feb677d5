"""Agent <-> agent throughput on loopback: the session protocol over WebRTC vs over QUIC.

Two in-process endpoints per transport, one TRANSFER channel, 1 MiB transfer ``Chunk``
messages (what a file transfer sends), no disk and no hashing: the transport's own ceiling.

    .venv/bin/python scripts/bench_webrtc.py [MiB] [--profile webrtc.prof]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import time
from collections.abc import Awaitable, Callable

import aioice.ice

from meshagent_gui import identity
from meshagent_gui.core.p2p import Endpoint, PeerConnection, PeerStream
from meshagent_gui.core.p2p.session import Channel, MeshSession
from meshagent_gui.core.p2p.webrtc import (
    DataChannelConnection,
    new_peer_connection,
    rtc_certificate,
)
from meshagent_gui.core.p2p.webrtc_peers import accept_session, dial_session
from meshagent_gui.core.protocol.handshake import Validator
from meshagent_gui.core.protocol.messages import Hello, StreamRole
from meshagent_gui.core.protocol.transfer import TRANSFER_REGISTRY, Chunk

CHUNK = 1024 * 1024


def accept_all(hello: Hello) -> object:
    return "ok"


def validator(_: str) -> Validator:
    return accept_all


async def pump(ours: Channel, theirs: Channel, total: int) -> float:
    data = os.urandom(CHUNK)
    started = time.perf_counter()

    async def send() -> None:
        for n in range(total // CHUNK):
            await ours.send(Chunk(0, n, b"\0" * 32, data))
        await ours.close()

    sender = asyncio.create_task(send())
    received = 0
    while received < total:
        message = await theirs.receive()
        assert isinstance(message, Chunk)
        received += len(message.data)
    await sender
    return total / (time.perf_counter() - started) / 1e6


async def over_quic(alice: identity.Identity, bob: identity.Identity, total: int) -> float:
    accepted: asyncio.Queue[MeshSession] = asyncio.Queue()

    async def authorize(conn: PeerConnection, first: PeerStream) -> bool:
        accepted.put_nowait(
            await MeshSession.accept(conn, first, validate=accept_all, registry=TRANSFER_REGISTRY)
        )
        return True

    listener = Endpoint(bob, authorize=authorize)
    dialer = Endpoint(alice)
    await listener.start("127.0.0.1", 0)
    await dialer.start("127.0.0.1", 0)
    try:
        conn = await dialer.connect(("127.0.0.1", listener.local_address[1]), bob.device_id)
        ours = await MeshSession.dial(
            conn, tokens=("t",), validate=accept_all, registry=TRANSFER_REGISTRY
        )
        theirs = await accepted.get()
        channel = await ours.open_channel(StreamRole.TRANSFER, tokens=("t",))
        return await pump(channel, await theirs.accept_channel(), total)
    finally:
        await dialer.close()
        await listener.close()


async def over_webrtc(alice: identity.Identity, bob: identity.Identity, total: int) -> float:
    dialer = DataChannelConnection(
        new_peer_connection(rtc_certificate(alice)), is_dialer=True, expected_peer_id=bob.device_id
    )
    listener = DataChannelConnection(new_peer_connection(rtc_certificate(bob)), is_dialer=False)
    try:
        await dialer.pc.setLocalDescription(await dialer.pc.createOffer())
        await listener.pc.setRemoteDescription(dialer.pc.localDescription)
        await listener.pc.setLocalDescription(await listener.pc.createAnswer())
        await dialer.pc.setRemoteDescription(listener.pc.localDescription)
        ours, theirs = await asyncio.gather(
            dial_session(dialer, tokens=("t",), validate=accept_all, registry=TRANSFER_REGISTRY),
            accept_session(listener, validator=validator, registry=TRANSFER_REGISTRY),
        )
        channel = await ours.open_channel(StreamRole.TRANSFER, tokens=("t",))
        return await pump(channel, await theirs.accept_channel(), total)
    finally:
        await asyncio.gather(dialer.aclose(), listener.aclose())


def run(
    name: str,
    bench: Callable[[identity.Identity, identity.Identity, int], Awaitable[float]],
    total: int,
    profile: str | None,
) -> None:
    alice, bob = identity.generate("alice"), identity.generate("bob")
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    rate = asyncio.run(bench(alice, bob, total))  # type: ignore[arg-type]
    if profiler is not None and profile is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    print(f"{name:7s} {total // CHUNK:5d} MiB  {rate:8.1f} MB/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mib", type=int, nargs="?", default=32)
    parser.add_argument("--profile", help="cProfile the WebRTC run into this file")
    parser.add_argument("--only", choices=("quic", "webrtc"))
    args = parser.parse_args()
    # loopback only, as the QUIC run (ICE would otherwise also pair every interface)
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
    total = args.mib * CHUNK
    if args.only != "webrtc":
        run("quic", over_quic, total, None)
    if args.only != "quic":
        run("webrtc", over_webrtc, total, args.profile)


if __name__ == "__main__":
    main()
