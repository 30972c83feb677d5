"""Processes behind the control-plane benchmark (test_bench_server.py).

``python -m tests.benchmarks._support worker URL``
    A load generator: holds many agent WebSockets (the agent's own client settings) and records
    when each ``presence`` frame about a watched device arrives. Driven by JSON lines on stdin,
    one JSON answer line on stdout per command.

``python -m tests.benchmarks._support baseline``
    The bare ``websockets`` server the reference server is compared with: no authentication, no
    database, no framework. The bearer token is ``ROOM:DEVICE``; on connect it sends the same
    ``hello`` (with the room's online devices) and broadcasts the same ``presence`` frames as the
    reference hub. Prints ``listening on ws://HOST:PORT/``.

Timestamps are ``time.monotonic_ns()``: CLOCK_MONOTONIC on Linux, one clock for every process
on the machine, so a sender in one process and a receiver in another can be compared.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

# What the agent's link uses (meshagent_gui/core/mesh/link.py): same pings, same frame cap.
AGENT_CLIENT_OPTIONS: Final[dict[str, Any]] = {
    "close_timeout": 2,
    "max_size": 2**16,
    "ping_interval": 10,
    "ping_timeout": 10,
}
HEARTBEAT: Final = 10.0  # the reference server's default ping interval, used by the baseline
LISTEN_BACKLOG: Final = 2048  # as the reference runner's listening socket
COMMAND_LINE_LIMIT: Final = 64 * 1024 * 1024  # a ``connect`` line carries thousands of tokens
MAX_REPORTED_ERRORS: Final = 5

Json = dict[str, Any]


def raise_open_file_limit() -> int:
    """Lift the soft descriptor limit to the hard one; returns the soft limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# ---------------------------------------------------------------------------- load worker


class LoadWorker:
    """Many agent connections in one process, plus the presence frames they saw."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connections: list[ClientConnection] = []
        self.watched: set[str] = set()
        # watched device -> connection index -> [(online, received at ns)], in arrival order
        self.records: dict[str, dict[int, list[tuple[bool, int]]]] = {}
        self.counts: dict[str, int] = {}
        self.closed_unexpectedly = 0
        self._recorded = asyncio.Condition()
        self._quitting = False
        self._readers = asyncio.TaskGroup()  # one reader per connection, for the worker's life

    async def connect_all(self, tokens: Sequence[str], concurrency: int, timeout: float) -> Json:
        """Open one connection per token (``concurrency`` handshakes in flight) and read hello."""
        gate = asyncio.Semaphore(concurrency)
        latencies_ms: list[float] = []
        errors: list[str] = []
        started = time.perf_counter()

        async def open_one(token: str) -> None:
            async with gate:
                began = time.perf_counter()
                try:
                    async with asyncio.timeout(timeout):
                        ws = await connect(
                            self.url,
                            additional_headers={"Authorization": f"Bearer {token}"},
                            open_timeout=timeout,
                            **AGENT_CLIENT_OPTIONS,
                        )
                        hello = json.loads(await ws.recv())
                except (OSError, TimeoutError, ConnectionClosed, ValueError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    return
                latencies_ms.append((time.perf_counter() - began) * 1000.0)
                if hello.get("type") != "hello":
                    errors.append(f"first frame was not hello: {str(hello)[:80]}")
                index = len(self.connections)
                self.connections.append(ws)
                self._readers.create_task(self._read(index, ws))

        async with asyncio.TaskGroup() as openers:
            for token in tokens:
                openers.create_task(open_one(token))
        return {
            "connected": len(latencies_ms),
            "failed": len(tokens) - len(latencies_ms),
            "errors": errors[:MAX_REPORTED_ERRORS],
            "latencies_ms": latencies_ms,
            "wall_s": time.perf_counter() - started,
        }

    async def _read(self, index: int, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                received = time.monotonic_ns()
                frame = json.loads(message)
                if frame.get("type") != "presence" or frame.get("device_id") not in self.watched:
                    continue
                device = frame["device_id"]
                self.records[device].setdefault(index, []).append((bool(frame["online"]), received))
                self.counts[device] += 1
                async with self._recorded:
                    self._recorded.notify_all()
        except ConnectionClosed:
            pass
        if not self._quitting:
            self.closed_unexpectedly += 1

    def watch(self, devices: Iterable[str]) -> Json:
        for device in devices:
            self.watched.add(device)
            self.records.setdefault(device, {})
            self.counts.setdefault(device, 0)
        return {}

    async def wait(self, device: str, count: int, timeout: float) -> Json:
        """Until this worker's connections have seen ``count`` presence frames about ``device``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self._recorded:
                await self._recorded.wait_for(lambda: self.counts[device] >= count)
        return {"recorded": self.counts[device], "reached": self.counts[device] >= count}

    def status(self) -> Json:
        still_open = sum(1 for ws in self.connections if ws.close_code is None)
        return {"open": still_open, "closed_unexpectedly": self.closed_unexpectedly}

    def dump(self) -> Json:
        return {
            "records": {
                device: {str(index): seen for index, seen in by_connection.items()}
                for device, by_connection in self.records.items()
            }
        }

    def quit(self) -> None:
        """Drop every connection at once: a clean close of thousands only slows the teardown."""
        self._quitting = True
        for ws in self.connections:
            ws.transport.abort()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        commands = asyncio.StreamReader(limit=COMMAND_LINE_LIMIT)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
        async with self._readers:
            while line := await commands.readline():
                request: Json = json.loads(line)
                command = request.pop("cmd")
                if command == "quit":
                    self.quit()
                    break
                answer = await self._handle(command, request)
                await _write_line(answer)
        await _write_line({"bye": True})

    async def _handle(self, command: str, request: Json) -> Json:
        handlers: dict[str, Callable[[], Awaitable[Json] | Json]] = {
            "connect": lambda: self.connect_all(
                request["tokens"], request["concurrency"], request["timeout"]
            ),
            "watch": lambda: self.watch(request["devices"]),
            "wait": lambda: self.wait(request["device"], request["count"], request["timeout"]),
            "status": self.status,
            "dump": self.dump,
        }
        answer = handlers[command]()
        return await answer if isinstance(answer, Awaitable) else answer


async def _write_line(answer: Json) -> None:
    data = (json.dumps(answer) + "\n").encode()

    def write() -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    # A ``dump`` answer can be megabytes: never let a full pipe block the readers' loop.
    await asyncio.to_thread(write)


# ---------------------------------------------------------------------------- baseline server


class BaselineHub:
    """The least a presence server can do: rooms in a dict, one broadcast per change."""

    def __init__(self) -> None:
        self.rooms: dict[str, dict[str, ServerConnection]] = {}

    async def handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        token = ws.request.headers.get("Authorization", "").removeprefix("Bearer ")
        room_name, _, device = token.partition(":")
        room = self.rooms.setdefault(room_name, {})
        peers = list(room.values())
        await ws.send(
            json.dumps(
                {
                    "type": "hello",
                    "device_id": device,
                    "session_id": "0" * 16,
                    "server_time": time.time(),
                    "heartbeat_interval": HEARTBEAT,
                    "online": list(room),
                }
            )
        )
        room[device] = ws
        broadcast(peers, _presence(device, online=True))
        try:
            await ws.wait_closed()
        finally:
            del room[device]
            broadcast(list(room.values()), _presence(device, online=False))


def _presence(device: str, *, online: bool) -> str:
    return json.dumps(
        {"type": "presence", "device_id": device, "online": online, "at": time.time()}
    )


async def run_baseline(host: str) -> None:
    hub = BaselineHub()
    async with serve(
        hub.handle,
        host,
        0,
        backlog=LISTEN_BACKLOG,
        compression=None,  # the reference server does not negotiate permessage-deflate either
        max_size=2**16,
        ping_interval=HEARTBEAT,
        ping_timeout=HEARTBEAT,
    ) as server:
        port = server.sockets[0].getsockname()[1]
        await _write_line({"url": f"ws://{host}:{port}/"})
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(number, stop.set)
        await stop.wait()


def main(argv: Sequence[str]) -> int:
    raise_open_file_limit()
    match list(argv):
        case ["worker", url]:
            asyncio.run(LoadWorker(url).run())
        case ["baseline"]:
            asyncio.run(run_baseline("127.0.0.1"))
        case _:
            print(
                "usage: python -m tests.benchmarks._support worker URL | baseline", file=sys.stderr
            )
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
