"""The floor under a keystroke echo through Python processes: the least a Python relay can do.

Run by the terminal-share benchmark as subprocesses, never imported by the package:

- ``pty SOCKET``: a Unix socket relayed to ``stty raw -echo; exec cat`` on a PTY, in one plain
  asyncio process (protocol callbacks, no tasks, no framing, no encryption). Like the host's own
  console, stripped of everything but the two hops.
- ``udp-pty``: the same PTY relayed to UDP on loopback (prints its port); answers whoever
  wrote last.
- ``socket-udp SOCKET PORT``: a Unix socket relayed to that UDP port. With ``udp-pty`` behind
  it: the viewer's path (console -> viewer agent -> network -> host agent -> PTY) with two
  Python processes that do nothing but forward bytes.

Each prints ``READY`` (``udp-pty``: ``READY <port>``) once it listens.
"""

from __future__ import annotations

import asyncio
import os
import pty
import sys
from collections.abc import Callable

LOOPBACK = "127.0.0.1"
RAW_CAT = "stty raw -echo; exec cat"


def _spawn_cat() -> int:
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp("sh", ["sh", "-c", RAW_CAT])
    os.set_blocking(fd, False)
    return fd


class _Forward(asyncio.Protocol):
    """Bytes from the client go to ``sink``; the relay writes answers to ``clients``."""

    def __init__(self, sink: Callable[[bytes], object], clients: list[asyncio.Transport]) -> None:
        self._sink = sink
        self._clients = clients

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._clients.append(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._clients.clear()

    def data_received(self, data: bytes) -> None:
        self._sink(data)


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, sink: Callable[[bytes, tuple[str, int]], None]) -> None:
        self._sink = sink

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._sink(data, addr)


async def _socket_to_pty(path: str) -> None:
    fd = _spawn_cat()
    loop = asyncio.get_running_loop()
    clients: list[asyncio.Transport] = []

    def answer() -> None:
        data = os.read(fd, 65536)
        for client in clients:
            client.write(data)

    loop.add_reader(fd, answer)
    await loop.create_unix_server(lambda: _Forward(lambda d: os.write(fd, d), clients), path)
    print("READY", flush=True)
    await asyncio.Event().wait()


async def _udp_to_pty() -> None:
    fd = _spawn_cat()
    loop = asyncio.get_running_loop()
    peer: list[tuple[str, int]] = []

    def received(data: bytes, addr: tuple[str, int]) -> None:
        peer[:] = [addr]
        os.write(fd, data)

    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Datagrams(received), local_addr=(LOOPBACK, 0)
    )
    loop.add_reader(fd, lambda: transport.sendto(os.read(fd, 65536), peer[0]))
    print("READY", transport.get_extra_info("sockname")[1], flush=True)
    await asyncio.Event().wait()


async def _socket_to_udp(path: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    clients: list[asyncio.Transport] = []

    def received(data: bytes, addr: tuple[str, int]) -> None:
        for client in clients:
            client.write(data)

    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Datagrams(received), local_addr=(LOOPBACK, 0)
    )
    target = (LOOPBACK, port)
    await loop.create_unix_server(
        lambda: _Forward(lambda d: transport.sendto(d, target), clients), path
    )
    print("READY", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str]) -> None:
    match argv:
        case ["pty", path]:
            asyncio.run(_socket_to_pty(path))
        case ["udp-pty"]:
            asyncio.run(_udp_to_pty())
        case ["socket-udp", path, port]:
            asyncio.run(_socket_to_udp(path, int(port)))
        case _:
            sys.exit("usage: _relay_floor.py pty SOCKET | udp-pty | socket-udp SOCKET PORT")


if __name__ == "__main__":
    main(sys.argv[1:])
