"""The two ends of the QUIC and TLS benchmarks, and the runner that pits them against each other.

Shared by test_bench_quic.py (loopback) and test_bench_netns.py (a veth pair between two network
namespaces). Each end runs in its own process: this file re-runs itself as the worker,
``python _quic_support.py ROLE ARGS_JSON``. Optional keys in ARGS: ``listener_ip`` (where the
listener binds and the dialer connects) and ``dialer_ip`` (the dialer's bind), both 127.0.0.1 by
default; ``prefixes``: a command prefix per side (``{"listener": [...], "dialer": [...]}``),
e.g. ``ip netns exec NS``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Final

LOOPBACK: Final = "127.0.0.1"
CHUNK = 1 << 20
ECHO_SIZE = 32
ECHO_COUNT = 3000
ECHO_WARMUP = 200
GIB = 1 << 30


# ---------------------------------------------------------------------------- workers


def _identity(name: str) -> Any:
    from meshagent_gui import identity

    return identity.generate(name)


async def _quic_listener(args: dict[str, Any]) -> dict[str, Any]:
    from meshagent_gui.core.p2p import Endpoint, EndpointSettings

    me = _identity("listener")
    settings = EndpointSettings(udp_io=args["udp_io"])
    endpoint = Endpoint(me, engine=args["engine"], settings=settings)
    await endpoint.start(args.get("listener_ip", LOOPBACK), 0)
    async with endpoint:
        print(json.dumps({"port": endpoint.local_address[1], "id": me.device_id}), flush=True)
        conn = await asyncio.wait_for(endpoint.accept(), 30)
        # throughput: read everything, then acknowledge with one byte
        stream = await conn.accept_stream()
        first = await stream.read(CHUNK)
        cpu0 = time.process_time()
        received = len(first)
        while data := await stream.read(CHUNK):
            received += len(data)
        await stream.write(b"k")
        await stream.close()
        cpu = time.process_time() - cpu0
        # echo
        echo = await conn.accept_stream()
        while data := await echo.read(ECHO_SIZE):
            await echo.write(data)
        await echo.close()
        await asyncio.wait_for(conn.wait_closed(), 30)
        return {"received": received, "cpu": cpu, "buffers": asdict(endpoint.socket_buffers)}


async def _quic_dialer(args: dict[str, Any]) -> dict[str, Any]:
    from meshagent_gui.core.p2p import Endpoint, EndpointSettings

    me = _identity("dialer")
    settings = EndpointSettings(udp_io=args["udp_io"])
    endpoint = Endpoint(me, engine=args["engine"], settings=settings)
    await endpoint.start(args.get("dialer_ip", LOOPBACK), 0)
    async with endpoint:
        target = (args.get("listener_ip", LOOPBACK), args["port"])
        conn = await endpoint.connect(target, args["peer_id"], timeout=30)
        stream = await conn.open_stream()
        payload = os.urandom(CHUNK)
        size = args["bytes"]
        cpu0, t0 = time.process_time(), time.perf_counter()
        for _ in range(size // CHUNK):
            await stream.write(payload)
        await stream.close()
        assert await stream.readexactly(1) == b"k"
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        echo = await conn.open_stream()
        rtts = await _echo(echo)
        await echo.close()
        assert await echo.read(1) == b""  # the listener finished too
        conn.close()
        return {"elapsed": elapsed, "cpu": cpu, "rtts": rtts, "io": endpoint.io_name}


async def _echo(stream: Any) -> list[float]:
    message = b"e" * ECHO_SIZE
    rtts: list[float] = []
    for index in range(ECHO_WARMUP + ECHO_COUNT):
        t0 = time.perf_counter()
        await stream.write(message)
        await stream.readexactly(ECHO_SIZE)
        if index >= ECHO_WARMUP:
            rtts.append(time.perf_counter() - t0)
    return rtts


def _tls_contexts(cert: Path, key: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(cert, key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.load_verify_locations(cert)
    client.check_hostname = False
    return server, client


async def _tls_listener(args: dict[str, Any]) -> dict[str, Any]:
    server_context, _ = _tls_contexts(Path(args["cert"]), Path(args["key"]))
    done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.read(CHUNK)
        cpu0 = time.process_time()
        received = len(first)
        while received < args["bytes"]:
            data = await reader.read(CHUNK)
            if not data:
                break
            received += len(data)
        writer.write(b"k")
        await writer.drain()
        cpu = time.process_time() - cpu0
        while data := await reader.read(ECHO_SIZE):
            writer.write(data)
            await writer.drain()
        writer.close()
        done.set_result({"received": received, "cpu": cpu})

    server = await asyncio.start_server(
        serve, args.get("listener_ip", LOOPBACK), 0, ssl=server_context
    )
    async with server:
        print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
        return await asyncio.wait_for(done, 300)


async def _tls_dialer(args: dict[str, Any]) -> dict[str, Any]:
    _, client_context = _tls_contexts(Path(args["cert"]), Path(args["key"]))
    reader, writer = await asyncio.open_connection(
        args.get("listener_ip", LOOPBACK),
        args["port"],
        ssl=client_context,
        server_hostname="listener",
    )
    payload = os.urandom(CHUNK)
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(args["bytes"] // CHUNK):
        writer.write(payload)
        await writer.drain()
    assert await reader.readexactly(1) == b"k"
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0

    class Echo:
        async def write(self, data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        async def readexactly(self, n: int) -> bytes:
            return await reader.readexactly(n)

    rtts = await _echo(Echo())
    writer.close()
    return {"elapsed": elapsed, "cpu": cpu, "rtts": rtts, "io": "asyncio"}


_WORKERS = {
    "quic-listener": _quic_listener,
    "quic-dialer": _quic_dialer,
    "tls-listener": _tls_listener,
    "tls-dialer": _tls_dialer,
}


def _worker_main(role: str, args_json: str) -> None:
    result = asyncio.run(_WORKERS[role](json.loads(args_json)))
    print(json.dumps({"result": result}), flush=True)


# ---------------------------------------------------------------------------- the runner


@dataclass(frozen=True)
class Result:
    name: str
    megabytes_per_s: float
    cpu_s_per_gib: float  # both ends together
    sender_cpu_s_per_gib: float
    receiver_cpu_s_per_gib: float
    rtt_p50_us: float
    rtt_p99_us: float
    bytes: int
    io: str

    @property
    def cpu_bound_megabytes_per_s(self) -> float:
        """The rate if each end had a core of its own: bytes / the busier end's CPU time.

        Other work on a shared 2-core machine lowers the measured rate, hardly this one.
        """
        busiest = max(self.sender_cpu_s_per_gib, self.receiver_cpu_s_per_gib)
        return GIB / busiest / 1e6


def _spawn(role: str, args: dict[str, Any]) -> subprocess.Popen[str]:
    # args["prefixes"]: optional command prefix per side, e.g. {"dialer": ["ip", "netns", ...]}
    prefix = args.get("prefixes", {}).get(role.rsplit("-", 1)[1], [])
    return subprocess.Popen(
        [*prefix, sys.executable, __file__, role, json.dumps(args)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def _result(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = process.communicate(timeout=600)
    if process.returncode != 0:
        raise RuntimeError(f"benchmark worker failed with {process.returncode}: {out[-2000:]}")
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return next(line["result"] for line in lines if "result" in line)


def run_pair(name: str, kind: str, args: dict[str, Any]) -> Result:
    listener = _spawn(f"{kind}-listener", args)
    try:
        assert listener.stdout is not None
        hello = json.loads(listener.stdout.readline())
        dialer = _spawn(
            f"{kind}-dialer", {**args, "port": hello["port"], "peer_id": hello.get("id")}
        )
        sent = _result(dialer)
        received = _result(listener)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    assert received["received"] == args["bytes"]
    rtts = sorted(sent["rtts"])
    gib = args["bytes"] / GIB
    return Result(
        name=name,
        megabytes_per_s=args["bytes"] / sent["elapsed"] / 1e6,
        cpu_s_per_gib=(sent["cpu"] + received["cpu"]) / gib,
        sender_cpu_s_per_gib=sent["cpu"] / gib,
        receiver_cpu_s_per_gib=received["cpu"] / gib,
        rtt_p50_us=statistics.median(rtts) * 1e6,
        rtt_p99_us=rtts[int(len(rtts) * 0.99) - 1] * 1e6,
        bytes=args["bytes"],
        io=sent["io"],
    )


def best_of(repeat: int, name: str, kind: str, args: dict[str, Any]) -> Result:
    """Best throughput, least CPU and lowest p99 of ``repeat`` runs (other load only slows)."""
    runs = [run_pair(name, kind, args) for _ in range(repeat)]
    fastest = max(runs, key=lambda r: r.megabytes_per_s)
    leanest = min(runs, key=lambda r: r.cpu_s_per_gib)
    steadiest = min(runs, key=lambda r: r.rtt_p99_us)
    return replace(
        fastest,
        cpu_s_per_gib=leanest.cpu_s_per_gib,
        sender_cpu_s_per_gib=leanest.sender_cpu_s_per_gib,
        receiver_cpu_s_per_gib=leanest.receiver_cpu_s_per_gib,
        rtt_p50_us=steadiest.rtt_p50_us,
        rtt_p99_us=steadiest.rtt_p99_us,
    )


def table(results: Sequence[Result], baseline: Result, name_width: int = 24) -> str:
    """The results beside the baseline; NaN (not measured, e.g. scp's RTT) shows as ``-``."""

    def num(value: float, width: int, digits: int = 0) -> str:
        return f"{'-':>{width}}" if math.isnan(value) else f"{value:>{width}.{digits}f}"

    rows = [
        f"{'transport':<{name_width}}{'MB/s':>8}{'xTLS':>6}{'CPU-bound':>10}{'CPU-s/GiB':>10}{'xTLS':>6}"
        f"{'snd+rcv':>12}{'p50 us':>8}{'p99 us':>8}{'xTLS':>6}  I/O"
    ]
    for r in results:
        split = f"{r.sender_cpu_s_per_gib:.1f}+{r.receiver_cpu_s_per_gib:.1f}"
        rows.append(
            f"{r.name:<{name_width}}{num(r.megabytes_per_s, 8)}"
            f"{num(r.megabytes_per_s / baseline.megabytes_per_s, 6, 2)}"
            f"{num(r.cpu_bound_megabytes_per_s, 10)}{num(r.cpu_s_per_gib, 10, 2)}"
            f"{num(r.cpu_s_per_gib / baseline.cpu_s_per_gib, 6, 2)}{split:>12}"
            f"{num(r.rtt_p50_us, 8)}{num(r.rtt_p99_us, 8)}"
            f"{num(r.rtt_p99_us / baseline.rtt_p99_us, 6, 2)}  {r.io}"
        )
    return "\n".join(rows)


def as_json(r: Result, baseline: Result) -> dict[str, Any]:
    def clean(value: float) -> float | None:
        return None if math.isnan(value) else value

    return {
        **{k: clean(v) if isinstance(v, float) else v for k, v in asdict(r).items()},
        "cpu_bound_megabytes_per_s": r.cpu_bound_megabytes_per_s,
        "throughput_ratio": r.megabytes_per_s / baseline.megabytes_per_s,
        "cpu_ratio": r.cpu_s_per_gib / baseline.cpu_s_per_gib,
        "rtt_p99_ratio": clean(r.rtt_p99_us / baseline.rtt_p99_us),
    }


def tls_files(directory: Path) -> dict[str, str]:
    """A throwaway certificate and key for the TLS baseline, as worker args."""
    from cryptography.hazmat.primitives import serialization

    ident = _identity("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(ident.certificate_pem)
    key.write_bytes(
        ident.private_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return {"cert": str(cert), "key": str(key)}


if __name__ == "__main__":
    _worker_main(sys.argv[1], sys.argv[2])
