"""What a MeshSession needs of a connection, so the one session protocol runs on either
transport: QUIC (:class:`~.connection.PeerConnection`) or WebRTC DataChannels
(:class:`~.webrtc.DataChannelConnection`). Both hand out :class:`~.streams.PeerStream` objects
(bytes in order, receive credit, send backpressure); only where the bytes go differs.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from .engine import Address
from .errors import CloseInfo, ConnectionClosedError, P2PError, PeerAuthenticationError
from .streams import PeerStream


class TransportStats(Protocol):
    """Counters of a connection, for status displays (QUIC: UDP datagrams; WebRTC: DTLS)."""

    @property
    def bytes_sent(self) -> int: ...
    @property
    def bytes_received(self) -> int: ...
    @property
    def datagrams_sent(self) -> int: ...
    @property
    def datagrams_received(self) -> int: ...
    @property
    def smoothed_rtt(self) -> float | None: ...


class Transport(Protocol):
    """An authenticated connection to one peer device, carrying bidirectional streams."""

    @property
    def peer_id(self) -> str:
        """The verified device id of the peer (the SHA-256 of the certificate it proved)."""
        ...

    @property
    def remote_address(self) -> Address: ...

    @property
    def is_closed(self) -> bool: ...

    async def open_stream(self) -> PeerStream: ...

    async def accept_stream(self) -> PeerStream: ...

    async def ping(self, timeout: float = 5.0) -> float: ...

    def close(self, code: int = 0, reason: str = "") -> None: ...

    async def wait_closed(self) -> CloseInfo: ...

    def stats(self) -> TransportStats: ...


class IncomingStreams:
    """The streams a peer opened, queued until the application accepts them (one acceptor at a
    time). Streams opened before the peer is admitted are held, and queued when it is. Once the
    connection fails, a waiting or later accept raises its error; streams queued before that are
    still handed out."""

    def __init__(self) -> None:
        self._queue: deque[PeerStream] = deque()
        self._held: list[PeerStream] = []
        self._waiter: asyncio.Future[None] | None = None
        self._error: ConnectionClosedError | None = None

    def hold(self, stream: PeerStream) -> None:
        self._held.append(stream)

    def release_held(self, keep_back: PeerStream | None) -> None:
        """The peer is admitted: queue its held streams, all but ``keep_back`` (the first
        stream, which the authorize hook took)."""
        held, self._held = self._held, []
        for stream in held:
            if stream is not keep_back:
                self.deliver(stream)

    def deliver(self, stream: PeerStream) -> None:
        self._queue.append(stream)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def fail(self, error: ConnectionClosedError) -> None:
        self._error = error
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)

    async def accept(self) -> PeerStream:
        while not self._queue:
            if self._error is not None:
                raise self._error
            if self._waiter is not None:
                raise RuntimeError("another task is already accepting streams")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        stream = self._queue.popleft()
        stream.on_accepted()
        return stream


class Pings:
    """The pings in flight, by number; each one's round trip on the ``perf_counter`` clock."""

    def __init__(self) -> None:
        self._next = 1
        self._waiting: dict[int, tuple[float, asyncio.Future[float]]] = {}

    async def measure(self, send: Callable[[int], None], timeout: float) -> float:
        """Send ping number n (``send(n)``) and wait, at most ``timeout``, for its answer."""
        uid = self._next
        self._next += 1
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiting[uid] = (time.perf_counter(), future)
        try:
            send(uid)
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self._waiting.pop(uid, None)

    def answered(self, uid: int) -> None:
        entry = self._waiting.get(uid)
        if entry is not None and not entry[1].done():
            entry[1].set_result(time.perf_counter() - entry[0])

    def fail(self, error: ConnectionClosedError) -> None:
        for _, future in self._waiting.values():
            if not future.done():
                future.set_exception(error)


class PeerStreamIds:
    """Which of the peer's stream ids (one parity class, every fourth id) are new. Streams may
    announce themselves out of order, so the gaps below the highest id seen are remembered;
    ``max_gap`` (in ids of the class) refuses a jump that would remember a huge gap."""

    def __init__(self, *, max_gap: int | None = None) -> None:
        self._high = -1
        self._gaps: set[int] = set()
        self._max_gap = max_gap

    def is_new(self, stream_id: int) -> bool:
        """True the first time ``stream_id`` is seen; it is then remembered as seen."""
        if stream_id > self._high:
            start = self._high + 4 if self._high >= 0 else stream_id % 4
            if self._max_gap is not None and (stream_id - start) // 4 > self._max_gap:
                return False
            self._gaps.update(range(start, stream_id, 4))
            self._high = stream_id
            return True
        if stream_id in self._gaps:
            self._gaps.discard(stream_id)
            return True
        return False


class TransportBase:
    """What both transports keep alike: the peer's verified id, the streams it opened, the
    pings in flight, and why the connection closed. A subclass sets ``_peer_id`` once the peer
    is verified and ends its own close bookkeeping between :meth:`_begin_close` and
    :meth:`_end_close`."""

    def __init__(self) -> None:
        self._peer_id: str | None = None
        self._incoming = IncomingStreams()
        self._pings = Pings()
        self._close_info: CloseInfo | None = None
        self._closed_error: ConnectionClosedError | None = None
        self._closed: asyncio.Future[CloseInfo] = asyncio.get_running_loop().create_future()
        self._closed.add_done_callback(consume_exception)

    @property
    def peer_id(self) -> str:
        """The verified device id of the peer; raises until it is verified."""
        if self._peer_id is None:
            raise P2PError("the peer is not authenticated (yet)")
        return self._peer_id

    @property
    def is_closed(self) -> bool:
        return self._close_info is not None

    @property
    def close_info(self) -> CloseInfo | None:
        return self._close_info

    async def accept_stream(self) -> PeerStream:
        """The next stream the peer opened."""
        return await self._incoming.accept()

    async def wait_closed(self) -> CloseInfo:
        """Wait until the connection is closed (by either side, or idle); why it closed."""
        return await asyncio.shield(self._closed)

    def closed_error(self) -> ConnectionClosedError | None:
        return self._closed_error

    def _begin_close(self, info: CloseInfo, *, admitted: bool) -> ConnectionClosedError | None:
        """Remember why the connection closed and the error every later call raises: an
        authentication error unless the peer was verified and ``admitted``. None if it was
        closed already."""
        if self._close_info is not None:
            return None
        self._close_info = info
        authenticated = self._peer_id is not None and admitted
        error_type = ConnectionClosedError if authenticated else PeerAuthenticationError
        self._closed_error = error_type(info)
        return self._closed_error

    def _end_close(self, error: ConnectionClosedError) -> None:
        """Fail whoever waits on a stream or a ping; then wake :meth:`wait_closed`."""
        self._incoming.fail(error)
        self._pings.fail(error)
        assert self._close_info is not None
        if not self._closed.done():
            self._closed.set_result(self._close_info)


def consume_exception(future: asyncio.Future[Any]) -> None:
    """A done callback that retrieves a failed future's exception: nobody may be waiting when
    a connection fails, and asyncio would log "exception was never retrieved"."""
    if not future.cancelled():
        future.exception()
