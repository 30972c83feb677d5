"""The ends of test_bench_paths.py, each run as its own process inside a namespace:
``python -m tests.benchmarks._path_support ROLE ARGS_JSON``. A listener prints ``{"port": N}``
(and ``"id"`` for QUIC) when ready; every role ends by printing ``{"result": {...}}``.

Roles: ``echo-listener``/``echo-dialer`` (32-byte TCP echo, RTT samples), ``tcp-listener``/
``tcp-dialer`` (bulk TCP with a chosen congestion controller, ``TCP_CONGESTION``),
``quic-listener``/``quic-dialer`` (bulk over our QUIC endpoint, as ``send`` carries a file).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

CHUNK: Final = 1 << 20
LOOPBACK: Final = "127.0.0.1"
ECHO_SIZE: Final = 32
REPOSITORY: Final = Path(__file__).resolve().parents[2]


def _hello(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def echo_listener(args: dict[str, Any]) -> dict[str, Any]:
    with socket.create_server((args["listener_ip"], 0)) as listener:
        _hello(port=listener.getsockname()[1])
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(ECHO_SIZE):
                conn.sendall(data)
    return {}


def echo_dialer(args: dict[str, Any]) -> dict[str, Any]:
    rtts = []
    with socket.create_connection((args["listener_ip"], args["port"]), timeout=30) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(args["count"]):
            started = time.perf_counter()
            conn.sendall(b"e" * ECHO_SIZE)
            received = 0
            while received < ECHO_SIZE:
                received += len(conn.recv(ECHO_SIZE - received))
            rtts.append(time.perf_counter() - started)
    return {"rtts": rtts}


def tcp_listener(args: dict[str, Any]) -> dict[str, Any]:
    with socket.create_server((args["listener_ip"], 0)) as listener:
        _hello(port=listener.getsockname()[1])
        conn, _ = listener.accept()
        received = 0
        buffer = bytearray(CHUNK)
        with conn:
            while received < args["bytes"] and (n := conn.recv_into(buffer)):
                received += n
            conn.sendall(b"k")
    return {"received": received}


def tcp_dialer(args: dict[str, Any]) -> dict[str, Any]:
    conn = socket.socket()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, args["congestion"].encode())
    conn.connect((args["listener_ip"], args["port"]))
    payload = os.urandom(CHUNK)
    started = time.perf_counter()
    with conn:
        for _ in range(args["bytes"] // CHUNK):
            conn.sendall(payload)
        assert conn.recv(1) == b"k"
    return {"elapsed": time.perf_counter() - started}


async def quic_listener(args: dict[str, Any]) -> dict[str, Any]:
    from meshagent_gui import identity
    from meshagent_gui.core.p2p import Endpoint

    me = identity.generate("listener")
    endpoint = Endpoint(me, engine="qh3")
    await endpoint.start(args["listener_ip"], 0)
    async with endpoint:
        _hello(port=endpoint.local_address[1], id=me.device_id)
        conn = await asyncio.wait_for(endpoint.accept(), 60)
        stream = await conn.accept_stream()
        received = 0
        while data := await stream.read(CHUNK):
            received += len(data)
        await stream.write(b"k")
        await stream.close()
        await asyncio.wait_for(conn.wait_closed(), 60)
    return {"received": received}


async def quic_dialer(args: dict[str, Any]) -> dict[str, Any]:
    from meshagent_gui import identity
    from meshagent_gui.core.p2p import Endpoint

    endpoint = Endpoint(identity.generate("dialer"), engine="qh3")
    await endpoint.start(args["dialer_ip"], 0)
    async with endpoint:
        target = (args["listener_ip"], args["port"])
        conn = await endpoint.connect(target, args["peer_id"], timeout=30)
        stream = await conn.open_stream()
        payload = os.urandom(CHUNK)
        started = time.perf_counter()
        for _ in range(args["bytes"] // CHUNK):
            await stream.write(payload)
        await stream.close()
        assert await stream.readexactly(1) == b"k"
        elapsed = time.perf_counter() - started
        conn.close()
    return {"elapsed": elapsed}


ROLES: Final = {
    "echo-listener": echo_listener,
    "echo-dialer": echo_dialer,
    "tcp-listener": tcp_listener,
    "tcp-dialer": tcp_dialer,
}
ASYNC_ROLES: Final = {"quic-listener": quic_listener, "quic-dialer": quic_dialer}


# ---------------------------------------------------------------------------- the runner


def _spawn(role: str, prefix: Sequence[str], args: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "tests.benchmarks._path_support", role, json.dumps(args)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPOSITORY,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def _result(process: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, _ = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"path benchmark worker failed ({process.returncode}): {out[-2000:]}")
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    result: dict[str, Any] = next(line["result"] for line in lines if "result" in line)
    return result


def run_pair(
    kind: str,
    listener_prefix: Sequence[str],
    dialer_prefix: Sequence[str],
    args: dict[str, Any],
    timeout: float = 900,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``kind``'s listener and dialer; their results (dialer's first)."""
    listener = _spawn(f"{kind}-listener", listener_prefix, args)
    try:
        assert listener.stdout is not None
        hello = json.loads(listener.stdout.readline())
        dialer = _spawn(
            f"{kind}-dialer",
            dialer_prefix,
            {**args, "port": hello["port"], "peer_id": hello.get("id")},
        )
        return _result(dialer, timeout), _result(listener, timeout)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()


def main(argv: Sequence[str]) -> int:
    role, args = argv[0], json.loads(argv[1])
    result = asyncio.run(ASYNC_ROLES[role](args)) if role in ASYNC_ROLES else ROLES[role](args)
    print(json.dumps({"result": result}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))


# ---------------------------------------------------------------------------- relay vs direct


async def quic_in_process(
    size: int, turn: tuple[int, bytes] | None, *, jumbo: bool = True
) -> dict[str, float]:
    """One QUIC stream of ``size`` bytes between two endpoints of this process, directly or
    (``turn``: coturn's port on loopback and its secret) through TURN allocations only; the
    rate and this process's CPU seconds (both ends). ``jumbo`` False: loopback's direct path
    keeps the 1,452-byte datagrams of any other path (the relay's size)."""
    from meshagent_gui import identity
    from meshagent_gui.core.p2p import Endpoint, EndpointSettings
    from meshagent_gui.core.p2p.endpoint import relay_address
    from meshagent_gui.core.p2p.engine import TransportSettings
    from meshagent_gui.core.p2p.relay import TurnRelay
    from meshagent_gui.server.turn import TurnConfig

    ids = identity.generate("listener"), identity.generate("dialer")
    transport = TransportSettings()
    if not jumbo:
        transport = TransportSettings(local_datagram_size=transport.max_datagram_size)
    settings = EndpointSettings(transport=transport)
    listener, dialer = Endpoint(ids[0], settings=settings), Endpoint(ids[1], settings=settings)
    async with contextlib.AsyncExitStack() as stack:
        relays: dict[str, TurnRelay] = {}
        for me, endpoint in zip(ids, (listener, dialer), strict=True):
            await endpoint.start(LOOPBACK, 0)
            stack.push_async_callback(endpoint.close)
            if turn is None:
                continue
            relay = TurnRelay(endpoint)
            issued = TurnConfig((f"turn:{LOOPBACK}:{turn[0]}",), turn[1]).mint(
                me.device_id, time.time()
            )
            await relay.open((LOOPBACK, turn[0]), issued.username, issued.password)
            stack.push_async_callback(relay.close)
            endpoint.set_relay(relay.send_or_drop)
            relays[me.device_id] = relay
        if turn is not None:
            for me, other in (ids, ids[::-1]):
                relayed = relays[other.device_id].relayed_address
                assert relayed is not None
                relays[me.device_id].add_peer(other.device_id, relayed)
            target = relay_address(ids[0].device_id)
        else:
            target = listener.local_address
        return await _one_stream(listener, dialer, target, ids[0].device_id, size)


async def _one_stream(
    listener: Any, dialer: Any, target: Any, listener_id: str, size: int
) -> dict[str, float]:
    """``size`` bytes on one QUIC stream from ``dialer`` to ``listener`` (at ``target``): the
    rate and this process's CPU seconds."""

    async def receive() -> int:
        conn = await listener.accept()
        stream = await conn.accept_stream()
        received = 0
        while chunk := await stream.read(CHUNK):
            received += len(chunk)
        return received

    receiving = asyncio.create_task(receive())
    conn = await dialer.connect(target, listener_id, timeout=15)
    stream = await conn.open_stream()
    payload = os.urandom(CHUNK)
    cpu0, started = time.process_time(), time.perf_counter()
    for _ in range(size // CHUNK):
        await stream.write(payload)
    await stream.close()
    received = await asyncio.wait_for(receiving, 600)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu0
    conn.close()
    assert received == size // CHUNK * CHUNK
    return {"mb_per_s": size / elapsed / 1e6, "cpu": cpu}


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.wait([task])


async def quic_over_websocket_relay(
    size: int, homes: Sequence[Path], *, batch: bool
) -> dict[str, float]:
    """One QUIC stream between two enrolled homes' endpoints (this process) through their
    server's WebSocket relay only (``RelayLink``; ``batch`` False: single frames, as agents
    sent before batching). The server's CPU is the caller's to read (its own process)."""
    from meshagent_gui.context import Context
    from meshagent_gui.core.mesh.enroll import mesh_client
    from meshagent_gui.core.p2p import Endpoint
    from meshagent_gui.core.p2p.endpoint import relay_address
    from meshagent_gui.core.p2p.relay import RelayLink

    contexts = [Context.open(home) for home in homes]
    async with contextlib.AsyncExitStack() as stack:
        endpoints, links = [], []
        for ctx in contexts:
            client = mesh_client(ctx)
            stack.push_async_callback(client.aclose)
            endpoint = Endpoint(ctx.identity)
            await endpoint.start(LOOPBACK, 0)
            stack.push_async_callback(endpoint.close)
            link = RelayLink(client, endpoint, batch=batch)
            stack.push_async_callback(_cancelled, asyncio.create_task(link.run()))
            await link.wait_connected(15)
            endpoints.append(endpoint)
            links.append(link)
        listener, dialer = endpoints
        listener_id = contexts[0].identity.device_id
        result = await _one_stream(listener, dialer, relay_address(listener_id), listener_id, size)
        sent = links[1].stats
        result["datagrams_per_frame"] = sent.frames_out / max(sent.sends, 1)
        return result
