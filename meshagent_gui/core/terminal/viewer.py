"""One viewer of a shared terminal: the messages the host has for it, its queue and its resyncs.

The host puts output and messages in (:meth:`Viewer.push_output`, :meth:`Viewer.push`); the
viewer's stream takes them out in order (``async for``), with consecutive output coalesced into
Output messages. The queue is bounded: a viewer that does not keep up has it dropped and gets a
fresh snapshot when it next asks (a resync), so a slow viewer never holds up the PTY or anyone
else. While the output floods the host *holds* its viewers: nothing is queued, and each gets
one snapshot when the flood pauses (or a picture of the screen now and then, :meth:`frame`).

What a viewer needs from its host is the narrow :class:`ViewerOwner`: the messages that restart
its stream (a snapshot and its control state), its right to control, and detaching.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Final, Protocol

from meshagent_gui.core.protocol.terminal import ControlState, Ended, HostMessage, Output, Resize
from meshagent_gui.core.terminal.replay import Chunk
from meshagent_gui.core.terminal.screen import WindowSize

MESSAGE_COST: Final = 64
"""What a queued message other than output counts for against the queue's bound."""


class ViewerClosed(Exception):
    """The viewer was detached (or its stream already ended)."""


class ViewerOwner(Protocol):
    """What a viewer asks of the host it is attached to."""

    def snapshot_for(self, viewer: Viewer) -> list[HostMessage]:
        """The messages that restart ``viewer``'s stream: the screen, then its ControlState."""
        ...

    def detach(self, viewer: Viewer) -> None: ...

    def may_control(self, viewer: Viewer) -> bool: ...

    def allow_control(self, viewer: Viewer) -> None:
        """``viewer`` showed a ``terminal:control`` capability after it joined."""
        ...


class Viewer:
    """One attached party: the messages the host has for it, in order (``async for``).

    Created by :meth:`TerminalHost.attach`. Iteration ends after :class:`Ended`. A new viewer
    starts with a snapshot, unless the host :meth:`resume` s it from its replay log.
    """

    def __init__(
        self,
        owner: ViewerOwner,
        party: str,
        seat: int,
        console: WindowSize | None,
        *,
        queue_bytes: int,
        message_bytes: int,
    ) -> None:
        self._owner = owner
        self.party = party
        self.seat = seat
        """Its place in the host's control rules (``HostControl`` in protocol/terminal.py)."""
        self.console_size = console
        self.resyncs = 0
        """Times the viewer fell behind and was sent a fresh snapshot."""
        self.dropped_input_bytes = 0
        self._queue_bytes = queue_bytes
        self._message_bytes = message_bytes
        self._items: deque[Chunk | HostMessage] = deque()
        self._queued = 0
        self._needs_snapshot = True
        self._held = False
        self._ended: Ended | None = None
        self._done = False
        self._closed = False
        self._wakeup = asyncio.Event()

    @property
    def can_control(self) -> bool:
        """Whether its stream carries a ``terminal:control`` grant. Set it (to True) once the
        viewer shows one later; a right is never taken back (revoke control instead)."""
        return self._owner.may_control(self)

    @can_control.setter
    def can_control(self, value: bool) -> None:
        if value:
            self._owner.allow_control(self)
        elif self.can_control:
            raise ValueError("a right to control is not taken back: revoke control instead")

    @property
    def queued_bytes(self) -> int:
        return self._queued

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def awaiting_snapshot(self) -> bool:
        """Its next message is a fresh snapshot (it joined, fell behind, or is held)."""
        return self._needs_snapshot

    @property
    def wants_frame(self) -> bool:
        """Held for a snapshot with nothing queued: ready for a picture of the screen."""
        return self._needs_snapshot and not self._items and not self._closed

    # ------------------------------------------------------------ the stream's side

    def __aiter__(self) -> AsyncIterator[HostMessage]:
        return self

    async def __anext__(self) -> HostMessage:
        if self._done:
            raise StopAsyncIteration
        try:
            return await self.next()
        except ViewerClosed:
            raise StopAsyncIteration from None

    async def next(self) -> HostMessage:
        """The next message; raises :class:`ViewerClosed` after Ended or once detached."""
        while True:
            message = self.next_nowait()
            if message is not None:
                return message
            if self._done or self._closed:
                raise ViewerClosed(self.party)
            self._wakeup.clear()
            await self._wakeup.wait()

    def next_nowait(self) -> HostMessage | None:
        if self._done or self._closed:
            return None
        if self._needs_snapshot:
            if self._held:
                # Held until the flood pauses: one snapshot then, not one per queue-full.
                return self._queued_message()
            self._needs_snapshot = False
            for message in self._owner.snapshot_for(self):
                self._items.append(message)
                self._queued += MESSAGE_COST
        if self._items:
            item = self._items.popleft()
            if isinstance(item, tuple):
                return self._coalesce(item)
            self._queued -= MESSAGE_COST
            return item
        if self._ended is not None:
            self._done = True
            return self._ended
        return None

    def close(self) -> None:
        """Detach from the host (the same as :meth:`TerminalHost.detach`)."""
        self._owner.detach(self)

    # ------------------------------------------------------------ the host's side

    def resume(self, items: Iterable[Chunk | HostMessage], output_bytes: int) -> bool:
        """Start from the replay log instead of a snapshot: ``items`` in order, with
        ``output_bytes`` of output among them (the host checked it fits). True if the messages
        overflowed the queue after all (the viewer then gets a snapshot)."""
        self._needs_snapshot = False
        fell_behind = False
        for item in items:
            if isinstance(item, tuple):
                self._items.append(item)
            else:
                fell_behind |= self.push(item)
        self._queued += output_bytes
        return fell_behind

    def push_output(self, offset: int, data: bytes) -> bool:
        """Queue live output; True if the viewer just fell behind (it skips to a snapshot)."""
        if self._needs_snapshot or self._closed:
            return False  # the snapshot it will get covers this
        fell_behind = not self._fits(len(data))
        if not fell_behind:
            self._items.append((offset, data))
            self._queued += len(data)
        self._wakeup.set()
        return fell_behind

    def push(self, message: HostMessage) -> bool:
        """Queue a message; True if the viewer just fell behind (it skips to a snapshot)."""
        if self._closed or (self._needs_snapshot and isinstance(message, Resize | ControlState)):
            return False  # the snapshot carries the size, and the current control state follows it
        # Small messages count too, so that a party asking for control again and again while
        # never reading cannot grow its queue without bound.
        fell_behind = not self._fits(MESSAGE_COST)
        if not fell_behind:
            self._items.append(message)
            self._queued += MESSAGE_COST
        self._wakeup.set()
        return fell_behind

    def end(self, message: Ended) -> None:
        """The session ended: ``message`` comes after everything queued."""
        self._ended = message
        self._wakeup.set()

    def hold(self) -> None:
        """The output floods: drop what is queued; a snapshot follows when it pauses."""
        self._items = deque(item for item in self._items if not isinstance(item, tuple))
        self._queued = MESSAGE_COST * len(self._items)
        self._needs_snapshot = True
        self._held = True

    def frame(self, messages: list[HostMessage]) -> None:
        """A snapshot while held: it stays held (the live output after it is not queued)."""
        self._items.extend(messages)
        self._queued += MESSAGE_COST * len(messages)
        self._wakeup.set()

    def release(self) -> None:
        """The flood paused: its snapshot is due."""
        self._held = False
        self._wakeup.set()

    def discard(self) -> None:
        """The host let go of it: the queue is freed and iteration ends."""
        self._closed = True
        self._items.clear()
        self._queued = 0
        self._wakeup.set()

    # ------------------------------------------------------------ inside

    def _queued_message(self) -> HostMessage | None:
        """A control message queued while held (output is never queued then)."""
        if self._items and not isinstance(self._items[0], tuple):
            message = self._items.popleft()
            assert not isinstance(message, tuple)
            self._queued -= MESSAGE_COST
            return message
        return None

    def _coalesce(self, first: Chunk) -> Output:
        limit = self._message_bytes
        offset, data = first
        if len(data) > limit:
            self._items.appendleft((offset + limit, data[limit:]))
            data = data[:limit]
            self._queued -= limit
            return Output(offset, data)
        self._queued -= len(data)
        parts = [data]
        size = len(data)
        while self._items and size < limit:
            following = self._items[0]
            if not isinstance(following, tuple):
                break
            self._items.popleft()
            next_offset, more = following
            room = limit - size
            if len(more) > room:
                self._items.appendleft((next_offset + room, more[room:]))
                more = more[:room]
            parts.append(more)
            size += len(more)
            self._queued -= len(more)
        return Output(offset, parts[0] if len(parts) == 1 else b"".join(parts))

    def _fits(self, size: int) -> bool:
        """Room for ``size`` more bytes; if not, drop the queue for a fresh snapshot."""
        if self._queued + size <= self._queue_bytes:
            return True
        self._items.clear()
        self._queued = 0
        self._needs_snapshot = True
        self.resyncs += 1
        return False
