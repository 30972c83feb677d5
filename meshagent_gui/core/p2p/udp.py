"""The endpoint's UDP socket: buffer sizing and batched datagram I/O.

Two I/O backends with one shape (:class:`DatagramIO`):

- ``quinn``: qh3 ships quinn-udp's socket state (``qh3._hazmat.UdpSocketState``): recvmmsg with
  GRO and sendmsg with GSO on Linux, the batch calls on macOS. One system call moves dozens of
  datagrams, which is most of the difference at high rates. It is a syscall helper, not qh3's
  QUIC glue, so it serves either engine.
- ``python``: ``recvfrom``/``sendto`` loops; the portable fallback (Windows) and a baseline.

``MESHAGENT_UDP_IO=python`` forces the fallback.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Final, Protocol

from meshagent_gui.core.p2p.engine import Address

log = logging.getLogger(__name__)

UDP_IO_ENV: Final = "MESHAGENT_UDP_IO"
# SO_RCVBUFFORCE/SO_SNDBUFFORCE (Linux, needs CAP_NET_ADMIN) pass net.core.[rw]mem_max.
_SO_RCVBUFFORCE: Final = getattr(socket, "SO_RCVBUFFORCE", 33)
_SO_SNDBUFFORCE: Final = getattr(socket, "SO_SNDBUFFORCE", 32)
_RECV_CALLS_PER_WAKEUP: Final = 16
_PLAIN_RECV_BATCH: Final = 64
_GSO_ERRNOS: Final = frozenset({errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT})


@dataclass(frozen=True)
class SocketBuffers:
    """What we asked the kernel for and what it granted (``getsockopt`` after ``setsockopt``).

    Linux reports twice the usable size (it counts its bookkeeping) and caps unprivileged
    requests at ``net.core.rmem_max``/``wmem_max``; ``forced`` says SO_*BUFFORCE passed that cap.
    """

    requested: int
    receive: int  # as getsockopt(SO_RCVBUF) reports it
    send: int
    receive_forced: bool
    send_forced: bool
    system_receive_max: int | None  # net.core.rmem_max, where readable
    system_send_max: int | None

    @property
    def receive_usable(self) -> int:
        return self.receive // 2 if sys.platform == "linux" else self.receive

    @property
    def send_usable(self) -> int:
        return self.send // 2 if sys.platform == "linux" else self.send


def _read_sysctl(name: str) -> int | None:
    try:
        with open(f"/proc/sys/net/core/{name}") as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def _set_buffer(sock: socket.socket, option: int, force_option: int, size: int) -> bool:
    """Raise one buffer; True when the privileged (uncapped) option was used."""
    if sys.platform == "linux":
        try:
            sock.setsockopt(socket.SOL_SOCKET, force_option, size)
            return True
        except OSError:
            pass
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, option, size)
    return False


def open_socket(host: str, port: int, buffer_size: int) -> tuple[socket.socket, SocketBuffers]:
    """A non-blocking UDP socket bound to ``host:port`` with raised buffers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        receive_forced = _set_buffer(sock, socket.SO_RCVBUF, _SO_RCVBUFFORCE, buffer_size)
        send_forced = _set_buffer(sock, socket.SO_SNDBUF, _SO_SNDBUFFORCE, buffer_size)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    buffers = SocketBuffers(
        requested=buffer_size,
        receive=sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        send=sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
        receive_forced=receive_forced,
        send_forced=send_forced,
        system_receive_max=_read_sysctl("rmem_max"),
        system_send_max=_read_sysctl("wmem_max"),
    )
    if buffers.receive_usable < buffer_size:
        log.warning(
            "UDP receive buffer is %d bytes (asked %d); raise net.core.rmem_max for speed",
            buffers.receive_usable,
            buffer_size,
        )
    return sock, buffers


class DatagramIO(Protocol):
    name: str

    def receive(self) -> list[tuple[bytes, Address]]:
        """Everything readable now (up to a bound per call); empty when nothing is."""

    def send(self, datagrams: list[bytes], addr: Address) -> int:
        """Send a prefix of ``datagrams`` to ``addr``; the count sent (short when the buffer is
        full)."""


class PlainIO:
    name = "python"

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def receive(self) -> list[tuple[bytes, Address]]:
        recvfrom = self._sock.recvfrom
        received: list[tuple[bytes, Address]] = []
        for _ in range(_PLAIN_RECV_BATCH * _RECV_CALLS_PER_WAKEUP):
            try:
                received.append(recvfrom(65535))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. ICMP errors surfaced on some systems
                log.debug("UDP receive error: %s", exc)
                break
        return received

    def send(self, datagrams: list[bytes], addr: Address) -> int:
        sendto = self._sock.sendto
        for index, datagram in enumerate(datagrams):
            try:
                sendto(datagram, addr)
            except (BlockingIOError, InterruptedError):
                return index
            except OSError as exc:
                # Oversized probes (EMSGSIZE) and unreachable peers: QUIC recovers from loss.
                log.debug("UDP send to %s failed: %s", addr, exc)
        return len(datagrams)


class QuinnIO:
    name = "quinn"

    def __init__(self, sock: socket.socket) -> None:
        from qh3._hazmat import UdpSocketState

        self._sock = sock
        self._state: Any = UdpSocketState(sock.fileno())
        self._fallback = PlainIO(sock)

    @property
    def gso_segments(self) -> int:
        return int(self._state.max_gso_segments)

    @property
    def gro_segments(self) -> int:
        return int(self._state.gro_segments)

    def receive(self) -> list[tuple[bytes, Address]]:
        recv = self._state.recv
        received: list[tuple[bytes, Address]] = []
        for _ in range(_RECV_CALLS_PER_WAKEUP):
            try:
                batch = recv()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.debug("UDP receive error: %s", exc)
                break
            if not batch:
                break
            received += batch
        return received

    def send(self, datagrams: list[bytes], addr: Address) -> int:
        try:
            return int(self._state.send(datagrams, addr))
        except (BlockingIOError, InterruptedError) as exc:
            return int(getattr(exc, "datagrams_sent", 0))
        except OSError as exc:
            sent = int(getattr(exc, "datagrams_sent", 0))
            if exc.errno in _GSO_ERRNOS:
                log.info("UDP segmentation offload refused (%s); sending one by one", exc)
                self._state.disable_gso()
            return sent + self._fallback.send(datagrams[sent:], addr)


def create_io(sock: socket.socket, name: str | None = None) -> DatagramIO:
    chosen = name or os.environ.get(UDP_IO_ENV) or "quinn"
    if chosen == "quinn" and sys.platform != "win32":
        try:
            return QuinnIO(sock)
        except (ImportError, NotImplementedError, OSError) as exc:
            log.info("batched UDP I/O unavailable (%s); using recvfrom/sendto", exc)
    return PlainIO(sock)
