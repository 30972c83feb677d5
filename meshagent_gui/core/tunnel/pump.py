"""Bytes both ways between one TCP connection and its TUNNEL stream, as the state table says.

A :class:`Pipe` runs once the connection is open (Connected sent or received). Each direction
is its own task, so the two never wait on each other; each waits only on its own destination:

* TCP -> peer: read at most :data:`~meshagent_gui.core.protocol.tunnel.MAX_DATA`, send it as
  ``Data`` and wait until QUIC took it (the stream's credit): a slow peer stops our reads, the
  kernel's buffer fills and TCP's own window stops the client;
* peer -> TCP: write, then ``drain``: a slow TCP end stops our reads of the stream, whose credit
  then runs out, so the peer stops sending on this stream only (other streams keep theirs).

What ends a direction is mapped by :class:`~meshagent_gui.core.protocol.tunnel.TunnelEnd`: a
FIN becomes ``Close`` and back (half-close), a reset becomes ``Error(CONNECTION_RESET)`` and an
RST, the idle timer ends both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from typing import Final

from meshagent_gui.core.p2p.session import Channel, ChannelClosed
from meshagent_gui.core.protocol.errors import ErrorCode, ProtocolError
from meshagent_gui.core.protocol.tunnel import (
    MAX_DATA,
    Data,
    TunnelAction,
    TunnelEnd,
    TunnelErrorCode,
    TunnelInput,
)

log = logging.getLogger(__name__)

_LINGER_RESET: Final = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends an RST

Clock = Callable[[], float]


def reset_tcp(writer: asyncio.StreamWriter) -> None:
    """Abort the TCP connection with an RST (not a FIN), as the other end was reset."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()


def wire_code(code: TunnelErrorCode) -> ErrorCode:
    """A tunnel code in the one code space the session's Error carries."""
    return ErrorCode(int(code))


class Pipe:
    """One open tunnelled connection: ``end`` (OPEN) and its TCP and stream ends."""

    def __init__(
        self,
        channel: Channel,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        end: TunnelEnd,
        *,
        clock: Clock,
    ) -> None:
        self.channel = channel
        self.reader = reader
        self.writer = writer
        self.end = end
        self._clock = clock
        self._changed = asyncio.Event()  # activity or an end: the idle timer looks again
        self.reason: TunnelErrorCode = TunnelErrorCode.NO_ERROR

    async def run(self) -> TunnelErrorCode:
        """Pipe until both directions ended (or one reset); the reason (NO_ERROR: graceful)."""
        tasks = [
            asyncio.create_task(self._tcp_to_peer(), name="tunnel-tcp-to-peer"),
            asyncio.create_task(self._peer_to_tcp(), name="tunnel-peer-to-tcp"),
            asyncio.create_task(self._idle_timer(), name="tunnel-idle"),
        ]
        pending = set(tasks[:2])
        try:
            while pending and not self.end.ended:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if not task.cancelled() and (failure := task.exception()) is not None:
                        log.error("tunnel pipe failed", exc_info=failure)
                        self.channel.abort(ErrorCode.INTERNAL_ERROR, "internal error")
                        reset_tcp(self.writer)
                        return TunnelErrorCode.INTERNAL_ERROR
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not self.writer.is_closing():
                self.writer.close()
        return self.reason

    # ------------------------------------------------------------ the two directions

    async def _tcp_to_peer(self) -> None:
        while not self.end.ended:
            try:
                data = await self.reader.read(MAX_DATA)
            except (ConnectionError, OSError):
                await self._apply(TunnelInput.LOCAL_RESET, TunnelErrorCode.CONNECTION_RESET)
                return
            if not data:
                await self._apply(TunnelInput.LOCAL_EOF)
                return
            if TunnelAction.SEND_DATA in await self._apply(TunnelInput.LOCAL_DATA, size=len(data)):
                try:
                    await self.channel.send(Data(data))
                except ChannelClosed as exc:
                    await self._peer_ended(exc)
                    return

    async def _peer_to_tcp(self) -> None:
        while not self.end.ended:
            try:
                message = await self.channel.receive()
            except ChannelClosed as exc:
                await self._peer_ended(exc)
                return
            try:
                actions = self.end.message(message, self._clock())
            except ProtocolError as exc:
                log.warning("tunnel peer %s broke the protocol: %s", self.channel.peer_id[:12], exc)
                self.channel.abort(exc.code, exc.message)
                await self._apply(TunnelInput.PEER_RESET)
                return
            self._changed.set()
            if TunnelAction.WRITE_TCP in actions and isinstance(message, Data):
                try:
                    self.writer.write(message.data)
                    await self.writer.drain()
                except (ConnectionError, OSError):
                    await self._apply(TunnelInput.LOCAL_RESET, TunnelErrorCode.CONNECTION_RESET)
                    return

    async def _peer_ended(self, exc: ChannelClosed) -> None:
        if exc.code == ErrorCode.NO_ERROR:
            await self._apply(TunnelInput.PEER_EOF)
        else:
            self.reason = TunnelErrorCode(int(exc.code)) if exc.by_peer else self.reason
            if self.reason is TunnelErrorCode.NO_ERROR:
                self.reason = TunnelErrorCode.CONNECTION_RESET
            await self._apply(TunnelInput.PEER_RESET)

    async def _idle_timer(self) -> None:
        while not self.end.ended:
            deadline = self.end.deadline()
            self._changed.clear()
            if deadline is None:
                await self._changed.wait()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - self._clock())):
                    await self._changed.wait()
            actions = self.end.handle_timer(self._clock())
            if actions:
                self.reason = TunnelErrorCode.IDLE_TIMEOUT
                await self._carry_out(actions, TunnelErrorCode.IDLE_TIMEOUT)

    # ------------------------------------------------------------ actions

    async def _apply(
        self,
        event: TunnelInput,
        code: TunnelErrorCode = TunnelErrorCode.NO_ERROR,
        *,
        size: int = 0,
    ) -> tuple[TunnelAction, ...]:
        actions = self.end.handle(event, self._clock(), size)
        if code is not TunnelErrorCode.NO_ERROR:
            self.reason = code
        self._changed.set()
        await self._carry_out(actions, code)
        return actions

    async def _carry_out(self, actions: tuple[TunnelAction, ...], code: TunnelErrorCode) -> None:
        for action in actions:
            match action:
                case TunnelAction.SEND_CLOSE:
                    with contextlib.suppress(ChannelClosed):
                        await self.channel.close()
                case TunnelAction.SHUT_TCP_WRITE:
                    with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                        if self.writer.can_write_eof():
                            self.writer.write_eof()
                case TunnelAction.SEND_ERROR:
                    self.channel.abort(wire_code(code), code.name.lower())
                case TunnelAction.RESET_TCP:
                    reset_tcp(self.writer)
                case TunnelAction.CLOSE_TCP:
                    self.writer.close()
                case _:
                    pass  # SEND_DATA / WRITE_TCP: done by the direction that asked
