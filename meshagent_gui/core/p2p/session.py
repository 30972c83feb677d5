"""The application layer of one peer connection: the sans-IO protocol Session driven over QUIC
or WebRTC DataChannels (any :class:`~.transport.Transport`; both carry :class:`PeerStream`s).

Like aioquic's asyncio protocol around ``QuicConnection``, this module is a thin router: bytes
read from each :class:`PeerStream` go into :class:`~meshagent_gui.core.protocol.handshake.Session`,
its commands come back out as stream writes, resets and closes, and its events become
:class:`Channel` objects (one per service stream) that services use with backpressure.

The connection handshake runs on the dialer's first stream, inside the endpoint's ``authorize``
hook on the listener: no other stream reaches the application before it is accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from meshagent_gui.core.protocol.errors import ErrorCode, LocalProtocolError
from meshagent_gui.core.protocol.framing import (
    DEFAULT_MAX_BULK_PAYLOAD,
    HEADER,
    HEADER_SIZE,
    BytesLike,
)
from meshagent_gui.core.protocol.handshake import (
    CloseConnection,
    HandshakeFailed,
    MessageReceived,
    ResetStream,
    Session,
    SessionClosed,
    SessionCommand,
    SessionEstablished,
    SessionEvent,
    Side,
    StopSending,
    StreamAccepted,
    StreamClosed,
    StreamFailed,
    StreamRefused,
    Validator,
    WriteStream,
)
from meshagent_gui.core.protocol.messages import BASE_REGISTRY, StreamRole
from meshagent_gui.core.protocol.registry import MessageRegistry

from .errors import CloseCode, P2PError, StreamResetError, Unauthorized
from .streams import PeerStream
from .transport import Transport

log = logging.getLogger(__name__)

READ_SIZE: Final = 256 * 1024
# What a channel holds for a service that has not read it yet; past either bound the stream is
# not read, so a service that stops reading stops the peer (its credit runs out). Bytes count
# the messages' bulk data (a transfer's chunks), so memory stays bounded whatever they carry.
INBOX_MESSAGES: Final = 1024
INBOX_BYTES: Final = 4 * 1024 * 1024
# Consecutive small writes queued on one stream go to QUIC as one (many small messages, one
# packet); larger data is handed over as it is, never copied.
COALESCE_BELOW: Final = 64 * 1024
# Frames at least this big are read whole into one buffer, up to the largest frame allowed.
WHOLE_FRAME_MIN: Final = 64 * 1024
WHOLE_FRAME_MAX: Final = HEADER_SIZE + DEFAULT_MAX_BULK_PAYLOAD
_SCAN_FRAMES: Final = 64  # frame headers looked at per read


class ChannelClosed(P2PError):
    """The stream ended: ``code`` says how (NO_ERROR for a graceful Close)."""

    def __init__(self, code: ErrorCode, message: str, *, by_peer: bool) -> None:
        super().__init__(message or code.name)
        self.code = code
        self.message = message
        self.by_peer = by_peer


class ChannelRefused(ChannelClosed):
    """The peer refused to open the stream (bad token, unknown role, ...)."""


class HandshakeRefusedError(P2PError):
    def __init__(self, code: ErrorCode, message: str, *, by_peer: bool) -> None:
        super().__init__(f"{message or code.name} ({code.name})")
        self.code = code
        self.by_peer = by_peer


class Channel:
    """One service stream: typed messages both ways, with backpressure both ways."""

    def __init__(self, mesh: MeshSession, stream: PeerStream, role: StreamRole, resource: str):
        self._mesh = mesh
        self.stream = stream
        self.role = role
        self.resource = resource
        self.grant: object = None
        self._inbox: deque[object] = deque()
        self._inbox_bytes = 0
        self._wake_reader = asyncio.Event()
        self._room = asyncio.Event()
        self._end: ChannelClosed | None = None
        self._broken: ChannelClosed | None = None  # our direction is dead too
        self._outbox: deque[SessionCommand] = deque()
        self._wake_writer = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        # Both sides accepted the stream: its large frames may be read whole (_FrameCursor).
        self.opened = False
        # Our direction's end (FIN or reset) is queued: once the peer's has come too, the
        # stream needs no routing (a half-closed stream still carries our writes until then).
        self.sent_end = False

    @property
    def stream_id(self) -> int:
        return self.stream.stream_id

    @property
    def peer_id(self) -> str:
        return self._mesh.peer_id

    @property
    def is_ended(self) -> bool:
        return self._end is not None

    @property
    def is_done(self) -> bool:
        """Both directions ended: the peer's, and ours (our end queued, or the stream broke)."""
        return self._end is not None and (self.sent_end or self._broken is not None)

    async def send(self, message: object) -> None:
        """Queue ``message``; returns once earlier writes have reached QUIC's send buffer.

        Raises :class:`ChannelClosed` once the stream cannot carry our data any more (the
        peer reset it, the connection died): a sender never writes into the void."""
        self.post(message)
        await self.drain()

    def post(self, message: object) -> None:
        """Queue ``message`` without waiting: messages posted together share packets. The caller
        bounds what it posts between two :meth:`drain` calls (that is its backpressure)."""
        if self._broken is not None:
            raise self._broken
        try:
            self._mesh.session.send(self.stream_id, message)
        except LocalProtocolError as exc:
            raise ChannelClosed(ErrorCode.GOING_AWAY, str(exc), by_peer=False) from exc
        self._mesh.dispatch()

    async def drain(self) -> None:
        """Wait until everything queued has reached QUIC's send buffer."""
        await self._drained.wait()
        if self._broken is not None:
            raise self._broken

    async def receive(self) -> object:
        """The next message; raises :class:`ChannelClosed` once the stream has ended."""
        while True:
            message = self.poll()
            if message is not None:
                return message
            self._wake_reader.clear()
            await self._wake_reader.wait()

    def poll(self) -> object | None:
        """The next message if one is waiting, else None; raises :class:`ChannelClosed` once
        the stream has ended and everything before the end was read."""
        if self._inbox:
            message = self._inbox.popleft()
            self._inbox_bytes -= _bulk_size(message)
            self._room.set()
            return message
        if self._end is not None:
            raise self._end
        return None

    @property
    def inbox_bytes(self) -> int:
        """Bulk bytes received and not read yet (at most about :data:`INBOX_BYTES`)."""
        return self._inbox_bytes

    async def close(self, code: ErrorCode = ErrorCode.NO_ERROR, message: str = "") -> None:
        with contextlib.suppress(Exception):
            self._mesh.session.close_stream(self.stream_id, code, message)
            self._mesh.dispatch()
        await self._drained.wait()

    def abort(self, code: ErrorCode, message: str = "") -> None:
        with contextlib.suppress(Exception):
            self._mesh.session.abort_stream(self.stream_id, code, message)
            self._mesh.dispatch()

    # ------------------------------------------------------------ used by MeshSession

    async def deliver(self, message: object) -> None:
        # Waiting here blocks the stream's reader: backpressure to the peer.
        while self._inbox and (
            len(self._inbox) >= INBOX_MESSAGES or self._inbox_bytes >= INBOX_BYTES
        ):
            self._room.clear()
            await self._room.wait()
        self._inbox.append(message)
        self._inbox_bytes += _bulk_size(message)
        self._wake_reader.set()

    def ended(self, error: ChannelClosed, *, broken: bool) -> None:
        """The peer's direction ended (``broken``: ours cannot carry data either)."""
        if self._end is None:
            self._end = error
            self._wake_reader.set()
            self._wake_writer.set()
        if broken and self._broken is None:
            self._broken = error  # new sends raise; what the session queued still goes out

    def kill(self, error: ChannelClosed) -> None:
        """The stream is gone with its writer: drop what was queued, wake every waiter."""
        self.ended(error, broken=True)
        self._outbox.clear()
        self._drained.set()

    def queue(self, command: SessionCommand) -> None:
        if isinstance(command, ResetStream) or (
            isinstance(command, WriteStream) and command.end_stream
        ):
            self.sent_end = True
        self._outbox.append(command)
        self._drained.clear()
        self._wake_writer.set()

    async def write_loop(self, connection: Transport) -> None:
        """Carry out this stream's commands in order; a blocked write blocks only this stream."""
        while True:
            if not self._outbox:
                self._drained.set()
                if self._broken is not None:
                    return
                self._wake_writer.clear()
                await self._wake_writer.wait()
                continue
            command = self._outbox.popleft()
            try:
                match command:
                    case WriteStream(data=data, end_stream=end):
                        if not end and len(data) < COALESCE_BELOW:
                            data, end = self._coalesce(data)
                        if len(data):
                            await self.stream.write(data)
                        if end:
                            self.stream.write_eof()
                    case ResetStream(code=code):
                        self.stream.reset(int(code))
                    case StopSending(code=code):
                        self.stream.stop_reading(int(code))
            except (P2PError, ConnectionError) as exc:
                log.debug("stream %d write failed: %s", self.stream_id, exc)
                self.kill(ChannelClosed(ErrorCode.GOING_AWAY, str(exc), by_peer=True))
                return

    def _coalesce(self, first: BytesLike) -> tuple[BytesLike, bool]:
        """``first`` joined with the small writes queued right behind it: (data, then FIN)."""
        outbox = self._outbox
        parts: list[BytesLike] = [first]
        size = len(first)
        end = False
        while outbox and size < COALESCE_BELOW:
            following = outbox[0]
            if not isinstance(following, WriteStream) or len(following.data) >= COALESCE_BELOW:
                break
            outbox.popleft()
            parts.append(following.data)
            size += len(following.data)
            if following.end_stream:
                end = True
                break
        return (first if len(parts) == 1 else b"".join(parts)), end


class _FrameCursor:
    """Reads a stream along its frame boundaries, so that a large frame arrives in one buffer.

    A frame read in :data:`READ_SIZE` pieces is copied twice: each piece is joined from the
    received packets, then the frame decoder joins the pieces (growing its buffer as they
    come). Read whole, it is copied once and stays a zero-copy slice all the way to the
    service (a transfer's chunks). Only the headers are looked at here; the decoder still
    checks every frame.

    Reads never run past a large frame's start, so a large frame is always read from its
    header. Frames up to :data:`WHOLE_FRAME_MAX` are read whole, and only on an opened stream
    (before that the decoder refuses a big frame at its header, as soon as it is here).
    """

    __slots__ = ("owed",)

    def __init__(self) -> None:
        self.owed = 0  # bytes still to read before the next frame boundary

    async def read(self, stream: PeerStream, *, whole: bool) -> bytes:
        while True:
            if self.owed:
                data = await stream.read(min(self.owed, READ_SIZE))
                self.owed -= len(data)
                return data
            if stream.buffered < HEADER_SIZE and not stream.fin_received:
                await stream.wait_more()
                continue
            size, frame_end = self._plan(stream, whole=whole)
            if size is None:
                return await stream.read(READ_SIZE)  # the end of the stream: what is left
            if size < 0:
                data = await stream.read_whole(-size)
            else:
                data = await stream.read(size)
            self.owed = frame_end - len(data)
            return data

    @staticmethod
    def _plan(stream: PeerStream, *, whole: bool) -> tuple[int | None, int]:
        """(how much to read, the boundary it aims at): a negative size is one large frame to
        read whole; None when no header is complete (the stream has ended)."""
        sizes = stream.scan(HEADER_SIZE, _frame_size, max_records=_SCAN_FRAMES, max_bytes=READ_SIZE)
        if not sizes:
            return None, 0
        first = sizes[0]
        if whole and WHOLE_FRAME_MIN <= first <= WHOLE_FRAME_MAX:
            return -first, first
        offset = first
        for size in sizes[1:]:
            if size >= WHOLE_FRAME_MIN:
                break  # the frames before it first
            offset += size
        return min(offset, READ_SIZE), offset


def _frame_size(header: bytes) -> int:
    return HEADER_SIZE + int(HEADER.unpack(header)[3])


def _bulk_size(message: object) -> int:
    """The bulk payload a message holds (a chunk's data); small messages count as nothing."""
    data = getattr(message, "data", None)
    return len(data) if isinstance(data, bytes | bytearray | memoryview) else 0


class MeshSession:
    """The protocol session of one authenticated peer connection."""

    def __init__(self, connection: Transport, session: Session, registry: MessageRegistry) -> None:
        self.connection = connection
        self.session = session
        self.registry = registry
        self._loop = asyncio.get_running_loop()
        self._channels: dict[int, Channel] = {}
        self._opening: dict[int, asyncio.Future[Channel]] = {}
        self._incoming: asyncio.Queue[Channel | None] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._established = asyncio.Event()
        self._failure: HandshakeRefusedError | None = None
        self.closed = asyncio.Event()

    @property
    def peer_id(self) -> str:
        return self.connection.peer_id

    @property
    def now(self) -> float:
        return self._loop.time()

    # ------------------------------------------------------------ both handshakes

    @classmethod
    async def dial(
        cls,
        connection: Transport,
        *,
        tokens: Sequence[str],
        validate: Validator,
        registry: MessageRegistry = BASE_REGISTRY,
    ) -> MeshSession:
        """Run the connection handshake as the dialer; raises :class:`HandshakeRefusedError`."""
        loop = asyncio.get_running_loop()
        mesh = cls(
            connection,
            Session(Side.DIALER, validate=validate, now=loop.time(), registry=registry),
            registry,
        )
        first = await connection.open_stream()
        mesh._adopt(first, StreamRole.CONTROL, "")
        mesh.session.start(first.stream_id, tokens=tokens, now=mesh.now)
        mesh.dispatch()
        await mesh._wait_established()
        return mesh

    @classmethod
    async def accept(
        cls,
        connection: Transport,
        first: PeerStream,
        *,
        validate: Validator,
        registry: MessageRegistry = BASE_REGISTRY,
    ) -> MeshSession:
        """Run the connection handshake as the listener (inside the endpoint's authorize hook).

        Raises :class:`Unauthorized` (the endpoint closes the connection with its code)."""
        loop = asyncio.get_running_loop()
        mesh = cls(
            connection,
            Session(Side.LISTENER, validate=validate, now=loop.time(), registry=registry),
            registry,
        )
        mesh._adopt(first, StreamRole.CONTROL, "")
        try:
            await mesh._wait_established()
        except HandshakeRefusedError as exc:
            await asyncio.sleep(0)  # let the refusal's bytes go out before the close
            raise Unauthorized(str(exc), CloseCode.UNAUTHORIZED) from exc
        return mesh

    async def _wait_established(self) -> None:
        timer = self._spawn(self._timers(), "p2p-session-timers")
        watch = self._spawn(self._watch_connection(), "p2p-session-watch")
        try:
            await self._established.wait()
        except asyncio.CancelledError:
            self.close(ErrorCode.NO_ERROR, "cancelled")
            raise
        if self._failure is not None:
            timer.cancel()
            watch.cancel()
            raise self._failure
        self._spawn(self._accept_streams(), "p2p-session-accept")

    # ------------------------------------------------------------ channels

    async def open_channel(
        self, role: StreamRole, *, tokens: Sequence[str] = (), resource: str = ""
    ) -> Channel:
        """Open a service stream; raises :class:`ChannelRefused` if the peer says no."""
        stream = await self.connection.open_stream()
        opened: asyncio.Future[Channel] = self._loop.create_future()
        self._opening[stream.stream_id] = opened
        self._adopt(stream, role, resource)
        self.session.open_stream(
            stream.stream_id, role, tokens=tokens, resource=resource, now=self.now
        )
        self.dispatch()
        return await opened

    async def accept_channel(self) -> Channel:
        """The next stream the peer opened and our validator accepted."""
        channel = await self._incoming.get()
        if channel is None:
            self._incoming.put_nowait(None)
            raise ChannelClosed(ErrorCode.GOING_AWAY, "the connection closed", by_peer=False)
        return channel

    def has_open_channels(self) -> bool:
        """Any service stream still running (the control stream does not count)."""
        control = self.session.control_stream_id
        return any(sid != control and not c.is_ended for sid, c in self._channels.items())

    def close(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        self.session.close(code, reason)
        self.dispatch()
        self._finish()

    # ------------------------------------------------------------ plumbing

    def _adopt(self, stream: PeerStream, role: StreamRole, resource: str) -> Channel:
        channel = Channel(self, stream, role, resource)
        self._channels[stream.stream_id] = channel
        self._spawn(self._read_loop(channel), f"p2p-read-{stream.stream_id}")
        self._spawn(channel.write_loop(self.connection), f"p2p-write-{stream.stream_id}")
        return channel

    def _spawn(self, coroutine: Awaitable[None], name: str) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coroutine)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def dispatch(self) -> None:
        """Hand the session's commands to their streams' writers (in order, per stream)."""
        for command in self.session.commands_to_send():
            if isinstance(command, CloseConnection):
                self.connection.close(int(command.code), command.reason)
                continue
            channel = self._channels.get(command.stream_id)
            if channel is not None:
                channel.queue(command)
                if channel.is_done:
                    del self._channels[command.stream_id]  # its writer still has the command

    async def _read_loop(self, channel: Channel) -> None:
        stream = channel.stream
        frames = _FrameCursor()
        try:
            while True:
                try:
                    data = await frames.read(stream, whole=channel.opened)
                except StreamResetError as exc:
                    await self._handle(
                        self.session.stream_reset(stream.stream_id, exc.error_code, self.now)
                    )
                    return
                except P2PError:
                    return
                await self._handle(
                    self.session.receive_data(stream.stream_id, data, not data, self.now)
                )
                if not data:
                    return
        finally:
            if channel.is_done:
                self._channels.pop(stream.stream_id, None)

    async def _accept_streams(self) -> None:
        while True:
            try:
                stream = await self.connection.accept_stream()
            except P2PError:
                return
            self._adopt(stream, StreamRole.CONTROL, "")  # the role comes with its Hello

    async def _timers(self) -> None:
        while True:
            deadline = self.session.next_deadline()
            await asyncio.sleep(1.0 if deadline is None else max(0.0, deadline - self.now))
            await self._handle(self.session.handle_timer(self.now))

    async def _watch_connection(self) -> None:
        info = await self.connection.wait_closed()
        code = info.code if info.application else int(ErrorCode.GOING_AWAY)
        await self._handle(self.session.connection_lost(code, info.reason, self.now))
        self._finish()

    async def _handle(self, events: list[SessionEvent]) -> None:
        self.dispatch()
        for event in events:
            match event:
                case SessionEstablished():
                    self._established.set()
                case HandshakeFailed(code=code, message=message, by_peer=by_peer):
                    self._failure = HandshakeRefusedError(code, message, by_peer=by_peer)
                    self._established.set()
                case StreamAccepted(stream_id=sid, role=role, resource=resource):
                    channel = self._channels[sid]
                    channel.role, channel.resource, channel.grant = role, resource, event.grant
                    channel.opened = True
                    if event.opened_by_peer:
                        self._incoming.put_nowait(channel)
                    elif (opened := self._opening.pop(sid, None)) is not None:
                        opened.set_result(channel)
                case StreamRefused(stream_id=sid, code=code, message=message, by_peer=by_peer):
                    refused = ChannelRefused(code, message, by_peer=by_peer)
                    if (opened := self._opening.pop(sid, None)) is not None:
                        opened.set_exception(refused)
                    self._end_channel(sid, refused, broken=True)
                case MessageReceived(stream_id=sid, message=message):
                    if (receiver := self._channels.get(sid)) is not None:
                        await receiver.deliver(message)
                case StreamClosed(stream_id=sid, code=code, message=message):
                    self._end_channel(sid, ChannelClosed(code, message, by_peer=True), broken=False)
                case StreamFailed(stream_id=sid, code=code, message=message, by_peer=by_peer):
                    failed = ChannelClosed(code, message, by_peer=by_peer)
                    if (opened := self._opening.pop(sid, None)) is not None:
                        opened.set_exception(failed)
                    self._end_channel(sid, failed, broken=True)
                case SessionClosed(code=code, message=message, by_peer=by_peer):
                    self._finish(ChannelClosed(code, message, by_peer=by_peer))

    def _end_channel(self, stream_id: int, error: ChannelClosed, *, broken: bool) -> None:
        channel = self._channels.get(stream_id)
        if channel is not None:
            channel.ended(error, broken=broken)

    def _finish(self, why: ChannelClosed | None = None) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        gone = why or ChannelClosed(ErrorCode.GOING_AWAY, "the connection closed", by_peer=False)
        for channel in self._channels.values():
            channel.kill(gone)  # before their tasks go: nobody waits forever
        for opened in self._opening.values():
            if not opened.done():
                opened.set_exception(
                    ChannelClosed(ErrorCode.GOING_AWAY, "the connection closed", by_peer=False)
                )
        self._opening.clear()
        self._incoming.put_nowait(None)
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()

    async def aclose(self) -> None:
        """Close the connection and wait for every task of this session to end."""
        self.close(ErrorCode.NO_ERROR, "closed")
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        await asyncio.gather(*tasks, return_exceptions=True)


ValidatorFactory = Callable[[str], Validator]
"""Builds the validator for one authenticated peer (its device id)."""
