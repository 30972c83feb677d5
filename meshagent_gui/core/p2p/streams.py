"""A bidirectional QUIC stream as the application sees it: bytes in order, with backpressure.

Neither QUIC engine ties its flow-control window to what the application has read (both grant
new credit as soon as they hand data over), so a reader that stops reading would let a writer
fill our memory. We bound both ends ourselves:

- **Receive credit.** A peer may write on a stream up to the offset we granted it: a
  protocol-wide :data:`INITIAL_CREDIT` until the stream is accepted by the application, then
  ``bytes read + window``, sent as CREDIT records on our control stream (control.py) whenever
  at least half a window has been read. Writing past the grant closes the connection with
  ``FLOW_CONTROL_ERROR``. So unread data per stream is at most one window.
- **Send backpressure.** ``await write(data)`` hands bytes to QUIC only while both the peer's
  credit and our own queue bound allow: at most ``max_unsent`` bytes may wait in QUIC's send
  buffer untransmitted. It blocks otherwise, and wakes when transmission has drained the queue
  to half and credit is available.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol

from meshagent_gui.core.p2p.errors import (
    ConnectionClosedError,
    StreamClosedError,
    StreamResetError,
)

# Every endpoint may send this much on a new stream before the peer's first CREDIT record.
INITIAL_CREDIT: Final = 128 * 1024


class FlowControlViolation(Exception):
    """The peer wrote past the credit we granted on a stream."""


class StreamOwner(Protocol):
    """The connection side of a stream (implemented by PeerConnection)."""

    def stream_send(self, stream_id: int, data: bytes | memoryview, end: bool) -> None: ...

    def stream_unsent(self, stream_id: int, written: int) -> int: ...

    def stream_grant(self, stream_id: int, limit: int) -> None: ...

    def stream_reset(self, stream_id: int, error_code: int) -> None: ...

    def stream_stop(self, stream_id: int, error_code: int) -> None: ...

    def stream_blocked(self, stream: PeerStream, blocked: bool) -> None: ...

    def stream_finished(self, stream_id: int) -> None: ...

    def closed_error(self) -> ConnectionClosedError | None: ...


class PeerStream:
    """One bidirectional stream of a :class:`~meshagent_gui.core.p2p.connection.PeerConnection`."""

    def __init__(
        self,
        owner: StreamOwner,
        stream_id: int,
        *,
        window: int,
        max_unsent: int,
        local: bool,
    ) -> None:
        self.stream_id = stream_id
        self.is_local = local
        self._owner = owner
        self._window = window
        self._max_unsent = max_unsent
        # receive side
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._received = 0
        self._consumed = 0
        self._granted = INITIAL_CREDIT
        self._accepted = local
        self._peer_wrote = False
        self._fin_received = False
        self._eof_read = False
        self._reset_received: int | None = None
        self._read_stopped = False
        self._reader: asyncio.Future[None] | None = None
        # send side
        self._written = 0
        self._peer_limit = INITIAL_CREDIT
        self._fin_sent = False
        self._reset_sent = False
        self._stop_received: int | None = None
        self._writer: asyncio.Future[None] | None = None
        self._draining = False
        self._finished = False

    def __repr__(self) -> str:
        return f"<PeerStream {self.stream_id} written={self._written} read={self._consumed}>"

    # ------------------------------------------------------------------ reading

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (at least one), or ``b""`` at end of stream."""
        if n <= 0:
            raise ValueError("read() needs a positive size")
        while not self._buffered:
            if self._fin_received:
                self._eof_read = True
                self._check_finished()
                return b""
            self._raise_if_unreadable()
            await self._wait_readable()
        chunks = self._chunks
        first = chunks[0]
        if len(first) >= n:
            if len(first) == n:
                chunks.popleft()
                data = first
            else:
                data = first[:n]
                chunks[0] = first[n:]
        else:
            parts = [chunks.popleft()]
            size = len(first)
            while chunks and size < n:
                part = chunks[0]
                if size + len(part) <= n:
                    parts.append(chunks.popleft())
                    size += len(part)
                else:
                    take = n - size
                    parts.append(part[:take])
                    chunks[0] = part[take:]
                    size = n
            data = b"".join(parts)
        self._buffered -= len(data)
        self._consumed += len(data)
        self._maybe_grant()
        return data

    async def read_whole(self, n: int) -> bytes:
        """Exactly ``n`` bytes (fewer only at end of stream) in one buffer, copied once.

        :meth:`read` joins what is buffered into each piece it returns, so a large message
        read in pieces and joined again above is copied twice; this gathers the received
        pieces as they are and joins them once. Credit flows as the pieces are taken, so ``n``
        may exceed the window.
        """
        if n <= 0:
            raise ValueError("read_whole() needs a positive size")
        parts: list[bytes | memoryview] = []
        size = 0
        chunks = self._chunks
        while size < n:
            if not self._buffered:
                if self._fin_received:
                    break
                self._raise_if_unreadable()
                await self._wait_readable()
                continue
            taken = 0
            while chunks and size + taken < n:
                part = chunks[0]
                left = n - size - taken
                if len(part) <= left:
                    parts.append(chunks.popleft())
                    taken += len(part)
                else:
                    parts.append(memoryview(part)[:left])
                    chunks[0] = part[left:]
                    taken += left
            size += taken
            self._buffered -= taken
            self._consumed += taken
            self._maybe_grant()
        if not size:
            return await self.read(1)  # the end of the stream: b"", counted as read
        if len(parts) == 1 and isinstance(parts[0], bytes):
            return parts[0]
        return b"".join(parts)

    def scan(
        self,
        header_size: int,
        record_size: Callable[[bytes], int],
        *,
        max_records: int,
        max_bytes: int,
    ) -> list[int]:
        """The sizes of the length-prefixed records buffered from the read position on, as far
        as their headers are here (``record_size`` gives a whole record's size from its
        header). Nothing is consumed; one pass over the buffer; stops after ``max_records``
        records or past ``max_bytes``."""
        sizes: list[int] = []
        target = 0  # where the next header starts
        partial = b""  # the part of it seen so far
        base = 0  # where the current buffered piece starts
        for chunk in self._chunks:
            length = len(chunk)
            while (start := target + len(partial) - base) < length:
                piece = chunk[start : start + header_size - len(partial)]
                partial = partial + piece if partial else piece
                if len(partial) < header_size:
                    break  # the header goes on in the next piece
                size = record_size(partial)
                sizes.append(size)
                target += size
                partial = b""
                if len(sizes) >= max_records or target >= max_bytes:
                    return sizes
            base += length
        return sizes

    async def wait_more(self) -> None:
        """Wait until more bytes (or the end of the stream) arrive; raises like :meth:`read`."""
        if self._fin_received:
            return
        self._raise_if_unreadable()
        await self._wait_readable()

    @property
    def fin_received(self) -> bool:
        """The peer finished its side (the bytes before the end may still be buffered)."""
        return self._fin_received

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; :class:`asyncio.IncompleteReadError` if the stream ends first."""
        parts: list[bytes] = []
        size = 0
        while size < n:
            part = await self.read(n - size)
            if not part:
                raise asyncio.IncompleteReadError(b"".join(parts), n)
            parts.append(part)
            size += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def at_eof(self) -> bool:
        return self._fin_received and not self._buffered

    @property
    def buffered(self) -> int:
        """Received bytes the application has not read yet (at most one window)."""
        return self._buffered

    def stop_reading(self, error_code: int = 0) -> None:
        """Ask the peer to stop sending (STOP_SENDING) and drop what was buffered."""
        if self._read_stopped or self._fin_received or self._reset_received is not None:
            return
        self._read_stopped = True
        self._chunks.clear()
        self._buffered = 0
        self._owner.stream_stop(self.stream_id, error_code)
        self._wake_reader(StreamClosedError(f"stream {self.stream_id}: reading was stopped"))
        self._check_finished()

    def _raise_if_unreadable(self) -> None:
        if self._reset_received is not None:
            raise StreamResetError(self.stream_id, self._reset_received, direction="receive")
        if self._read_stopped:
            raise StreamClosedError(f"stream {self.stream_id}: reading was stopped")
        error = self._owner.closed_error()
        if error is not None:
            raise error

    async def _wait_readable(self) -> None:
        if self._reader is not None:
            raise RuntimeError("another task is already reading this stream")
        self._reader = asyncio.get_running_loop().create_future()
        try:
            await self._reader
        finally:
            self._reader = None

    def _wake_reader(self, error: BaseException | None = None) -> None:
        reader = self._reader
        if reader is not None and not reader.done():
            if error is None:
                reader.set_result(None)
            else:
                reader.set_exception(error)

    def _maybe_grant(self) -> None:
        if not (self._accepted and self._peer_wrote) or self._fin_received or self._read_stopped:
            return
        limit = self._consumed + self._window
        if limit - self._granted >= self._window // 2:
            self._granted = limit
            self._owner.stream_grant(self.stream_id, limit)

    # ------------------------------------------------------------------ writing

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue all of ``data``; waits while the peer's credit or our send queue is full."""
        total = len(data)
        if not total:
            self._raise_if_unwritable()
            return
        owner = self._owner
        stream_id = self.stream_id
        view: memoryview | None = None
        position = 0
        while position < total:
            self._raise_if_unwritable()
            room = min(
                self._peer_limit - self._written,
                self._max_unsent - owner.stream_unsent(stream_id, self._written),
            )
            if room <= 0:
                await self._wait_writable(draining=False)
                continue
            size = min(room, total - position)
            if position == 0 and size == total and isinstance(data, bytes):
                owner.stream_send(stream_id, data, False)
            else:
                if view is None:
                    view = memoryview(data).cast("B")
                owner.stream_send(stream_id, view[position : position + size], False)
            self._written += size
            position += size

    async def drain(self) -> None:
        """Wait until QUIC has transmitted everything written so far (at least once)."""
        while self._owner.stream_unsent(self.stream_id, self._written):
            self._raise_if_unwritable(allow_fin=True)
            await self._wait_writable(draining=True)

    def write_eof(self) -> None:
        """Finish our side of the stream (FIN); reading goes on."""
        if self._fin_sent or self._reset_sent or self._stop_received is not None:
            return
        if self._owner.closed_error() is not None:
            return
        self._fin_sent = True
        self._owner.stream_send(self.stream_id, b"", True)
        self._check_finished()

    async def close(self) -> None:
        """Finish our side of the stream (FIN) and wait until it is transmitted."""
        self.write_eof()
        if self._fin_sent and self._owner.closed_error() is None:
            await self.drain()

    def reset(self, error_code: int = 0) -> None:
        """Abandon our side of the stream (RESET_STREAM); unsent data is dropped."""
        if self._fin_sent or self._reset_sent or self._stop_received is not None:
            return
        if self._owner.closed_error() is None:
            self._owner.stream_reset(self.stream_id, error_code)
        self._reset_sent = True
        self._wake_writer(StreamClosedError(f"stream {self.stream_id} was reset"))
        self._check_finished()

    def abort(self, error_code: int = 0) -> None:
        """Reset our side and stop reading the peer's side."""
        self.reset(error_code)
        self.stop_reading(error_code)

    @property
    def written(self) -> int:
        """Bytes handed to QUIC so far (the stream offset)."""
        return self._written

    @property
    def unsent(self) -> int:
        """Bytes handed to QUIC and not transmitted yet (at most ``max_unsent``)."""
        return self._owner.stream_unsent(self.stream_id, self._written)

    @property
    def send_credit(self) -> int:
        """How many more bytes the peer lets us write right now."""
        return max(0, self._peer_limit - self._written)

    def _raise_if_unwritable(self, allow_fin: bool = False) -> None:
        if self._stop_received is not None:
            raise StreamResetError(self.stream_id, self._stop_received, direction="send")
        error = self._owner.closed_error()
        if error is not None:
            raise error
        if self._reset_sent or (self._fin_sent and not allow_fin):
            raise StreamClosedError(f"stream {self.stream_id} is closed for writing")

    async def _wait_writable(self, *, draining: bool) -> None:
        if self._writer is not None:
            raise RuntimeError("another task is already writing this stream")
        self._writer = asyncio.get_running_loop().create_future()
        self._draining = draining
        self._owner.stream_blocked(self, True)
        try:
            await self._writer
        finally:
            self._writer = None
            self._owner.stream_blocked(self, False)

    def _wake_writer(self, error: BaseException | None = None) -> None:
        writer = self._writer
        if writer is not None and not writer.done():
            if error is None:
                writer.set_result(None)
            else:
                writer.set_exception(error)

    # ------------------------------------------------------------------ called by the connection

    def on_data(self, data: bytes, end: bool) -> None:
        if data:
            self._received += len(data)
            if self._received > self._granted:
                raise FlowControlViolation(
                    f"stream {self.stream_id}: peer wrote {self._received} bytes,"
                    f" credit was {self._granted}"
                )
            if not self._read_stopped:
                self._chunks.append(data)
                self._buffered += len(data)
            if not self._peer_wrote:
                self._peer_wrote = True
                self._maybe_grant()
        if end:
            self._fin_received = True
            if self._read_stopped:
                self._check_finished()
        self._wake_reader()

    def on_reset(self, error_code: int) -> None:
        self._reset_received = error_code
        self._chunks.clear()
        self._buffered = 0
        self._wake_reader(StreamResetError(self.stream_id, error_code, direction="receive"))
        self._check_finished()

    def on_stop_sending(self, error_code: int) -> None:
        if self._fin_sent or self._reset_sent or self._stop_received is not None:
            return
        self._stop_received = error_code
        # RFC 9000 3.5: answer STOP_SENDING with RESET_STREAM.
        self._owner.stream_reset(self.stream_id, error_code)
        self._wake_writer(StreamResetError(self.stream_id, error_code, direction="send"))
        self._check_finished()

    def on_credit(self, limit: int) -> None:
        if limit > self._peer_limit:
            self._peer_limit = limit
            self.on_send_progress()

    def on_accepted(self) -> None:
        self._accepted = True
        self._maybe_grant()

    def on_send_progress(self) -> None:
        """QUIC transmitted something or credit arrived: wake a blocked writer if it can go on."""
        writer = self._writer
        if writer is None or writer.done():
            return
        unsent = self._owner.stream_unsent(self.stream_id, self._written)
        if self._draining:
            ready = unsent == 0
        else:
            ready = self._peer_limit > self._written and unsent <= self._max_unsent // 2
        if ready:
            writer.set_result(None)

    def on_connection_closed(self, error: ConnectionClosedError) -> None:
        self._wake_reader(error)
        self._wake_writer(error)

    def _check_finished(self) -> None:
        if self._finished:
            return
        send_done = self._fin_sent or self._reset_sent or self._stop_received is not None
        receive_done = (
            self._eof_read or self._read_stopped or self._reset_received is not None
        ) and not self._buffered
        if send_done and receive_done:
            self._finished = True
            self._owner.stream_finished(self.stream_id)
