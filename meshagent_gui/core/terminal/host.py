"""The terminal session host: one PTY, its output stream with byte offsets, viewers, control.

Hot path (one PTY read callback, all on the event loop): the batch gets its offset, goes into
the replay log (for resumes), onto the screen tracker's queue (O(1), parsed later), into every
viewer's queue (O(1) each) and to the host console callback. Nothing on it waits: not for the
emulator (the :class:`~meshagent_gui.core.terminal.screen.ScreenTracker` is parsed in slices
between other work, not at all during a flood, and skips ahead past its bound), not for a
viewer (bounded queue; one that overflows is cleared and gets a fresh snapshot when it next
asks), not for the recording (a writer thread; only if it falls 16 MiB behind does the host
pause reading the PTY, because a recording that silently loses output would be worse).

Control: at most one controller (a viewer attachment), None meaning the host's own console,
which can always type. Only the controller's Input reaches the PTY (after
:func:`~meshagent_gui.core.terminal.sanitize.sanitize_input`); everyone else's is dropped and
counted. The PTY's size is the controller's console size, or the host console's when nobody
controls; viewers' sizes never change it. Whoever decides on control requests (the server, the
host's user, ``--allow-control``) calls :meth:`TerminalHost.grant_control` /
:meth:`~TerminalHost.revoke_control`; with ``auto_grant`` a request is granted when nobody holds
control and refused otherwise, so of two simultaneous requests exactly one wins.

Wiring to a P2P channel (one per viewer)::

    join = await channel.receive()                      # Join
    viewer = host.attach(peer, can_control=..., from_offset=join.from_offset,
                         cols=join.cols, rows=join.rows)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(pump(viewer, channel))          # async for m in viewer: send(m)
        while True:
            host.receive(viewer, await channel.receive())
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from typing import IO, Final

from meshagent_gui.core.protocol.errors import ErrorCode, ProtocolError
from meshagent_gui.core.protocol.terminal import (
    MAX_OUTPUT_DATA,
    ControlDenied,
    ControlRelease,
    ControlRequest,
    ControlState,
    Ended,
    HostMessage,
    Input,
    Join,
    Output,
    Resize,
    snapshot_parts,
)
from meshagent_gui.core.terminal.pty import ExitStatus, Pty, PtyClosed
from meshagent_gui.core.terminal.sanitize import sanitize_input
from meshagent_gui.core.terminal.screen import ScreenSnapshot, ScreenTracker, WindowSize

KiB: Final = 1024
MiB: Final = 1024 * KiB
FLOOD_RECHECK_SECONDS: Final = 0.005
FLOOD_FRAME_SECONDS: Final = 0.25
"""While the output floods, how often viewers get a picture of the screen."""
FLOOD_FRAME_TAIL: Final = 64 * 1024
"""Output parsed for such a picture: a screenful many times over, about 2 ms of avt."""


@dataclass(frozen=True, slots=True)
class HostLimits:
    viewer_queue_bytes: int = 1 * MiB
    """Output a viewer may have queued; past it the queue is dropped for a fresh snapshot."""
    replay_bytes: int = 4 * MiB
    """Output kept for resumes; a viewer resuming from further back gets a snapshot."""
    screen_backlog_bytes: int = 1 * MiB
    """Output the emulator may have queued before it skips ahead (bounds snapshot latency)."""
    screen_slice_bytes: int = 16 * KiB
    """Parsed per turn of the event loop (about 0.5 ms of avt)."""
    output_message_bytes: int = 64 * KiB
    """Largest Output a viewer's queue coalesces into."""
    input_buffer_bytes: int = 1 * MiB
    """Input the program has not read yet; more is dropped rather than buffered."""
    recorder_backlog_bytes: int = 16 * MiB
    max_viewers: int = 64
    exit_drain_seconds: float = 0.5
    """After the command exits, how long its last output may take to arrive."""
    kill_grace_seconds: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.output_message_bytes <= MAX_OUTPUT_DATA:
            raise ValueError(f"output_message_bytes must be in 1..{MAX_OUTPUT_DATA}")


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class ViewerJoined:
    party: str
    resumed: bool


@dataclass(frozen=True, slots=True)
class ViewerLeft:
    party: str


@dataclass(frozen=True, slots=True)
class ViewerFellBehind:
    """A viewer's queue overflowed: it skips to a fresh snapshot."""

    party: str


@dataclass(frozen=True, slots=True)
class ControlRequested:
    party: str


@dataclass(frozen=True, slots=True)
class ControlChanged:
    controller: str | None
    previous: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class CommandExited:
    status: ExitStatus


HostEvent = (
    ViewerJoined | ViewerLeft | ViewerFellBehind | ControlRequested | ControlChanged | CommandExited
)


class ViewerClosed(Exception):
    """The viewer was detached (or its stream already ended)."""


class TooManyViewers(Exception):
    pass


class NotAllowed(Exception):
    """The viewer may not control (its stream carries no terminal:control grant)."""


# ---------------------------------------------------------------- a viewer


_Chunk = tuple[int, bytes]
_MESSAGE_COST: Final = 64


class Viewer:
    """One attached party: the messages the host has for it, in order (``async for``).

    Created by :meth:`TerminalHost.attach`. Iteration ends after :class:`Ended`.
    """

    def __init__(
        self, host: TerminalHost, party: str, can_control: bool, console: WindowSize | None
    ) -> None:
        self._host = host
        self.party = party
        self.can_control = can_control
        self.console_size = console
        self.resyncs = 0
        """Times the viewer fell behind and was sent a fresh snapshot."""
        self.dropped_input_bytes = 0
        self._items: deque[_Chunk | HostMessage] = deque()
        self._queued = 0
        self._needs_snapshot = False
        self._ended: Ended | None = None
        self._done = False
        self._closed = False
        self._wakeup = asyncio.Event()

    @property
    def queued_bytes(self) -> int:
        return self._queued

    @property
    def closed(self) -> bool:
        return self._closed

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
            if self._host._flooding:
                # Held until the flood pauses: one snapshot then, not one per queue-full.
                return self._queued_message()
            self._needs_snapshot = False
            for message in self._host._snapshot_messages(self):
                self._items.append(message)
                self._queued += _MESSAGE_COST
        if self._items:
            item = self._items.popleft()
            if isinstance(item, tuple):
                return self._coalesce(item)
            self._queued -= _MESSAGE_COST
            return item
        if self._ended is not None:
            self._done = True
            return self._ended
        return None

    def _queued_message(self) -> HostMessage | None:
        """A control message queued while held (output is never queued then)."""
        if self._items and not isinstance(self._items[0], tuple):
            message = self._items.popleft()
            assert not isinstance(message, tuple)
            self._queued -= _MESSAGE_COST
            return message
        return None

    def close(self) -> None:
        """Detach from the host (the same as :meth:`TerminalHost.detach`)."""
        self._host.detach(self)

    # ------------------------------------------------------------ used by the host

    def _coalesce(self, first: _Chunk) -> Output:
        limit = self._host.limits.output_message_bytes
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

    def _push_output(self, offset: int, data: bytes) -> None:
        if self._needs_snapshot or self._closed:
            return  # the snapshot it will get covers this
        if self._fits(len(data)):
            self._items.append((offset, data))
            self._queued += len(data)
        self._wakeup.set()

    def _push(self, message: HostMessage) -> None:
        if self._closed or (self._needs_snapshot and isinstance(message, Resize | ControlState)):
            return  # the snapshot carries the size, and the current control state follows it
        # Small messages count too, so that a party asking for control again and again while
        # never reading cannot grow its queue without bound.
        if self._fits(_MESSAGE_COST):
            self._items.append(message)
            self._queued += _MESSAGE_COST
        self._wakeup.set()

    def _fits(self, size: int) -> bool:
        """Room for ``size`` more bytes; if not, drop the queue for a fresh snapshot."""
        if self._queued + size <= self._host.limits.viewer_queue_bytes:
            return True
        self._items.clear()
        self._queued = 0
        self._needs_snapshot = True
        self.resyncs += 1
        self._host._emit(ViewerFellBehind(self.party))
        return False

    def _end(self, message: Ended) -> None:
        self._ended = message
        self._wakeup.set()

    def _frame(self, messages: list[HostMessage]) -> None:
        """A snapshot while held: it stays held (the live output after it is not queued)."""
        self._items.extend(messages)
        self._queued += _MESSAGE_COST * len(messages)
        self._wakeup.set()

    def _hold(self) -> None:
        """The output floods: drop what is queued; a snapshot follows when it pauses."""
        self._items = deque(item for item in self._items if not isinstance(item, tuple))
        self._queued = _MESSAGE_COST * len(self._items)
        self._needs_snapshot = True

    def _detached(self) -> None:
        self._closed = True
        self._items.clear()
        self._queued = 0
        self._wakeup.set()


# ---------------------------------------------------------------- replay log


class _ReplayLog:
    """The last ``capacity`` bytes of output with their offsets, and the sizes in force."""

    def __init__(self, capacity: int, size: WindowSize) -> None:
        self._capacity = capacity
        self._chunks: deque[_Chunk] = deque()
        self._bytes = 0
        self._start = 0
        self._end = 0
        self._sizes: deque[tuple[int, WindowSize]] = deque([(0, size)])

    def append(self, offset: int, data: bytes) -> None:
        self._chunks.append((offset, data))
        self._bytes += len(data)
        self._end = offset + len(data)
        while self._bytes > self._capacity and len(self._chunks) > 1:
            _, old = self._chunks.popleft()
            self._bytes -= len(old)
            self._start = self._chunks[0][0]
        while len(self._sizes) > 1 and self._sizes[1][0] <= self._start:
            self._sizes.popleft()

    def resized(self, offset: int, size: WindowSize) -> None:
        self._sizes.append((offset, size))

    def replay(self, offset: int) -> tuple[list[_Chunk | WindowSize], int] | None:
        """What a viewer resuming at ``offset`` needs (output and size changes in order) and
        the bytes of output in it; None if that is outside the log."""
        if not self._start <= offset <= self._end:
            return None
        size = self._sizes[0][1]
        for at, recorded in self._sizes:
            if at <= offset:
                size = recorded
        items: list[_Chunk | WindowSize] = [size]
        later_sizes = deque((at, s) for at, s in self._sizes if at > offset)
        total = 0
        for start, data in self._chunks:
            end = start + len(data)
            if end <= offset:
                continue
            while later_sizes and later_sizes[0][0] <= start:
                items.append(later_sizes.popleft()[1])
            piece = data[offset - start :] if start < offset else data
            items.append((max(start, offset), piece))
            total += len(piece)
        items.extend(s for _, s in later_sizes)
        return items, total


# ---------------------------------------------------------------- asciicast recording


class AsciicastRecorder:
    """Writes an asciicast v2 file (header line, then ``[time, "o", text]`` and ``"r"`` lines).

    Only output and resizes are recorded, never input (passwords are typed blind, not echoed).
    The file is written by a thread: :meth:`output` only queues.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        cols: int,
        rows: int,
        title: str | None = None,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self._started = clock()
        header: dict[str, object] = {
            "version": 2,
            "width": cols,
            "height": rows,
            "timestamp": int(wall_clock()),
        }
        if env:
            header["env"] = {key: env[key] for key in ("TERM", "SHELL") if key in env}
        if title:
            header["title"] = title
        self._queue: SimpleQueue[tuple[float, str, bytes | str] | None] = SimpleQueue()
        self._queue.put((0.0, "header", json.dumps(header)))
        self._backlog = 0
        self._lock = threading.Lock()
        self._drained: list[Callable[[], None]] = []
        self._threshold = 0
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._write_loop, name="asciicast", daemon=True)
        self._thread.start()

    @property
    def backlog_bytes(self) -> int:
        with self._lock:
            return self._backlog

    def output(self, data: bytes) -> None:
        with self._lock:
            self._backlog += len(data)
        self._queue.put((self._clock() - self._started, "o", data))

    def resize(self, cols: int, rows: int) -> None:
        self._queue.put((self._clock() - self._started, "r", f"{cols}x{rows}"))

    def when_below(self, threshold: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the writer thread) once the backlog is under ``threshold``."""
        with self._lock:
            if self._backlog < threshold:
                ready = True
            else:
                ready = False
                self._drained.append(callback)
                self._threshold = threshold
        if ready:
            callback()

    async def aclose(self) -> None:
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    def _write_loop(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        file: IO[str] | None = None
        try:
            file = self.path.open("w", encoding="utf-8")
            while (item := self._queue.get()) is not None:
                at, kind, payload = item
                if isinstance(payload, str) and kind == "header":
                    file.write(payload + "\n")
                    continue
                if kind == "o":
                    assert isinstance(payload, bytes)
                    text = decoder.decode(payload)
                    with self._lock:
                        self._backlog -= len(payload)
                        callbacks = self._take_drained()
                    for callback in callbacks:
                        callback()
                    if not text:
                        continue
                    payload = text
                file.write(json.dumps([round(at, 6), kind, payload], ensure_ascii=False) + "\n")
            tail = decoder.decode(b"", final=True)
            if tail:
                file.write(json.dumps([round(self._clock() - self._started, 6), "o", tail]) + "\n")
        except OSError as exc:
            self.error = exc
            while self._queue.get() is not None:  # keep taking, so nobody waits on us
                pass
        finally:
            if file is not None:
                file.close()
            with self._lock:
                self._backlog = 0
                callbacks = self._take_drained(force=True)
            for callback in callbacks:
                callback()

    def _take_drained(self, *, force: bool = False) -> list[Callable[[], None]]:
        if self._drained and (force or self._backlog < self._threshold):
            callbacks, self._drained = self._drained, []
            return callbacks
        return []


# ---------------------------------------------------------------- the host


class TerminalHost:
    """Shares one PTY with any number of viewers (see the module docstring)."""

    def __init__(
        self,
        pty: Pty,
        *,
        limits: HostLimits | None = None,
        auto_grant: bool = True,
        recorder: AsciicastRecorder | None = None,
        console_output: Callable[[bytes], None] | None = None,
        on_event: Callable[[HostEvent], None] | None = None,
    ) -> None:
        self.limits = limits or HostLimits()
        self.auto_grant = auto_grant
        self._pty = pty
        cols, rows = pty.size
        self._console_size = WindowSize(cols, rows)
        self._size = self._console_size
        self._tracker = ScreenTracker(cols, rows, max_backlog=self.limits.screen_backlog_bytes)
        self._replay = _ReplayLog(self.limits.replay_bytes, self._size)
        self._recorder = recorder
        self._console_output = console_output
        self._on_event = on_event
        self._viewers: list[Viewer] = []
        self._controller: Viewer | None = None
        self._control_epoch = 0
        self._offset = 0
        self._screen_work = asyncio.Event()
        self._eof = asyncio.Event()
        self._status: ExitStatus | None = None
        self._ended: Ended | None = None
        self._reading_paused = False
        self._flooding = False
        self.dropped_input_bytes = 0

    # ------------------------------------------------------------ state

    @property
    def offset(self) -> int:
        """Bytes of output so far (the offset of the next byte)."""
        return self._offset

    @property
    def size(self) -> tuple[int, int]:
        return self._size.cols, self._size.rows

    @property
    def controller(self) -> str | None:
        return self._controller.party if self._controller is not None else None

    @property
    def control_epoch(self) -> int:
        return self._control_epoch

    @property
    def viewers(self) -> tuple[Viewer, ...]:
        return tuple(self._viewers)

    @property
    def status(self) -> ExitStatus | None:
        return self._status

    @property
    def screen(self) -> ScreenTracker:
        return self._tracker

    @property
    def pty(self) -> Pty:
        return self._pty

    # ------------------------------------------------------------ running

    async def run(self) -> ExitStatus:
        """Share until the command exits; returns its status. Cancelling kills the command and
        tells the viewers the host stopped."""
        self._pty.start(self._on_output, self._eof.set)
        try:
            async with asyncio.TaskGroup() as tasks:
                screen = tasks.create_task(self._screen_worker(), name="terminal-screen")
                status = await self._pty.wait()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.limits.exit_drain_seconds):
                        await self._eof.wait()
                screen.cancel()
        except asyncio.CancelledError:
            self._end(ExitStatus(), "the host stopped sharing")
            await self._stop_command()
            raise
        finally:
            self._pty.close()
            if self._recorder is not None:
                await self._recorder.aclose()
        self._end(status, "")
        return status

    def close(self, *, force: bool = False) -> None:
        """End the session: hang up the command (or kill it); :meth:`run` then returns."""
        self._pty.terminate(force=force)

    async def _stop_command(self) -> None:
        self._pty.terminate()
        try:
            async with asyncio.timeout(self.limits.kill_grace_seconds):
                await self._pty.wait()
        except TimeoutError:
            self._pty.terminate(force=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.limits.kill_grace_seconds):
                    await self._pty.wait()

    async def _screen_worker(self) -> None:
        """Parse queued output between other work; stand back while the output floods.

        Output at a rate the emulator follows is parsed a slice per loop turn. Once the
        emulator is a quarter of its bound behind, the output is a flood (``cat`` of a big
        file): parsing it now would only slow the PTY reader, and most of it will be skipped
        anyway, so the worker waits until the output pauses, then catches up.

        Viewers stand back too: nobody reads a flood, and streaming it to ten viewers would
        cost ten times its encryption. While it lasts they are held (queues dropped, nothing
        sent) and each gets one snapshot of the screen once it pauses, as mosh does.
        """
        budget = self.limits.screen_slice_bytes
        flood = self.limits.screen_backlog_bytes // 4
        next_frame = 0.0
        while True:
            await self._screen_work.wait()
            self._screen_work.clear()
            while True:
                if self._tracker.pending_bytes > flood:
                    now = time.monotonic()
                    if not self._flooding:
                        self._flooding = True
                        next_frame = now + FLOOD_FRAME_SECONDS
                        for viewer in self._viewers:
                            viewer._hold()
                    elif now >= next_frame:
                        next_frame = now + FLOOD_FRAME_SECONDS
                        self._flood_frame()
                    seen = self._offset
                    await asyncio.sleep(FLOOD_RECHECK_SECONDS)
                    if self._offset != seen:
                        continue
                self._flood_paused()
                if not self._tracker.work(budget):
                    break
                await asyncio.sleep(0)  # the PTY reader and the viewers go first

    def _flood_frame(self) -> None:
        """While the output floods, viewers see the screen a few times a second: one snapshot,
        made once for all of them (a viewer still busy with the last one skips this one)."""
        idle = [v for v in self._viewers if v._needs_snapshot and not v._items and not v.closed]
        self._frame_for(idle)

    def _frame_for(self, idle: list[Viewer]) -> None:
        if not idle:
            return
        snap = self._tracker.snapshot(tail=FLOOD_FRAME_TAIL)
        parts = snapshot_parts(snap.offset, snap.cols, snap.rows, snap.data)
        for viewer in idle:
            viewer._frame([*parts, self._control_state(viewer)])

    def _flood_paused(self) -> None:
        if self._flooding:
            self._flooding = False
            for viewer in self._viewers:
                viewer._wakeup.set()  # its snapshot is due

    def _end(self, status: ExitStatus, message: str) -> None:
        self._flood_paused()
        if self._ended is not None:
            return
        self._status = status
        self._ended = Ended(status.code, status.signal, message)
        for viewer in self._viewers:
            viewer._end(self._ended)
        self._emit(CommandExited(status))

    # ------------------------------------------------------------ the hot path

    def _on_output(self, data: bytes) -> None:
        offset = self._offset
        self._offset += len(data)
        self._replay.append(offset, data)
        self._tracker.append(data)
        if not self._flooding:
            for viewer in self._viewers:
                viewer._push_output(offset, data)
        if self._console_output is not None:
            self._console_output(data)
        self._screen_work.set()  # after the viewers': an echo is not kept waiting by the parse
        recorder = self._recorder
        if recorder is not None:
            recorder.output(data)
            limit = self.limits.recorder_backlog_bytes
            if not self._reading_paused and recorder.backlog_bytes > limit:
                self._reading_paused = True
                self._pty.pause_reading()
                loop = asyncio.get_running_loop()

                def drained() -> None:
                    loop.call_soon_threadsafe(self._resume_after_recorder)

                recorder.when_below(limit // 2, drained)

    def _resume_after_recorder(self) -> None:
        self._reading_paused = False
        self._pty.resume_reading()

    # ------------------------------------------------------------ viewers

    def attach(
        self,
        party: str,
        *,
        can_control: bool = False,
        from_offset: int | None = None,
        cols: int = 0,
        rows: int = 0,
    ) -> Viewer:
        """A new viewer: a snapshot first, or (``from_offset`` in the replay window) what it
        missed since then."""
        if len(self._viewers) >= self.limits.max_viewers:
            raise TooManyViewers(f"{len(self._viewers)} viewers already")
        console = WindowSize(cols, rows) if cols > 0 and rows > 0 else None
        viewer = Viewer(self, party, can_control, console)
        replay = self._replay.replay(from_offset) if from_offset is not None else None
        if replay is None or replay[1] > self.limits.viewer_queue_bytes:
            viewer._needs_snapshot = True
        else:
            items, total = replay
            for item in items:
                if isinstance(item, WindowSize):
                    viewer._push(Resize(item.cols, item.rows))
                else:
                    viewer._items.append(item)
            viewer._queued += total
            viewer._push(self._control_state(viewer))
        if self._ended is not None:
            viewer._end(self._ended)
        elif self._flooding and viewer._needs_snapshot:
            self._frame_for([viewer])  # a late joiner sees the screen now, not at the next frame
        self._viewers.append(viewer)
        self._emit(ViewerJoined(party, resumed=not viewer._needs_snapshot))
        return viewer

    def detach(self, viewer: Viewer) -> None:
        if viewer not in self._viewers:
            return
        self._viewers.remove(viewer)
        viewer._detached()
        if viewer is self._controller:
            self._set_controller(None, "left")
        self._emit(ViewerLeft(viewer.party))

    def snapshot(self) -> ScreenSnapshot:
        """The screen now (parses what the emulator has queued first)."""
        return self._tracker.snapshot()

    def _snapshot_messages(self, viewer: Viewer) -> list[HostMessage]:
        snap = self._tracker.snapshot()
        parts: list[HostMessage] = list(
            snapshot_parts(snap.offset, snap.cols, snap.rows, snap.data)
        )
        parts.append(self._control_state(viewer))
        return parts

    def receive(self, viewer: Viewer, message: object) -> None:
        """Act on a message from ``viewer``'s stream (after its Join)."""
        match message:
            case Input(data=data):
                self.input(viewer, bytes(data))
            case Resize(cols=cols, rows=rows):
                self.viewer_resized(viewer, cols, rows)
            case ControlRequest():
                self._emit(ControlRequested(viewer.party))
                if self.auto_grant:
                    self.request_control(viewer)
            case ControlRelease():
                self.release_control(viewer)
            case Join():
                raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "a second Join")
            case _:
                raise ProtocolError(
                    ErrorCode.UNEXPECTED_MESSAGE, f"{type(message).__name__} from a viewer"
                )

    # ------------------------------------------------------------ input and size

    def input(self, viewer: Viewer, data: bytes) -> bool:
        """Write ``viewer``'s keystrokes to the PTY if it controls it; False if dropped."""
        if viewer is not self._controller or viewer.closed:
            viewer.dropped_input_bytes += len(data)
            self.dropped_input_bytes += len(data)
            return False
        return self._write(sanitize_input(data))

    def console_input(self, data: bytes) -> bool:
        """Keystrokes from the host's own console: always accepted, never filtered."""
        return self._write(data)

    def _write(self, data: bytes) -> bool:
        if self._ended is not None:
            return False
        if self._pty.write_buffer_size + len(data) > self.limits.input_buffer_bytes:
            self.dropped_input_bytes += len(data)
            return False
        try:
            self._pty.write(data)
        except PtyClosed:
            return False
        return True

    def set_console_size(self, cols: int, rows: int) -> None:
        """The host console was resized: it drives the PTY while nobody controls."""
        self._console_size = WindowSize(cols, rows)
        self._apply_size()

    def viewer_resized(self, viewer: Viewer, cols: int, rows: int) -> None:
        viewer.console_size = WindowSize(cols, rows)
        if viewer is self._controller:
            self._apply_size()

    def _apply_size(self) -> None:
        controller = self._controller
        wanted = (
            controller.console_size
            if controller is not None and controller.console_size is not None
            else self._console_size
        )
        if wanted == self._size or self._ended is not None:
            return
        try:
            self._pty.resize(wanted.cols, wanted.rows)
        except PtyClosed:
            return
        self._size = wanted
        self._tracker.resize(wanted.cols, wanted.rows)
        self._screen_work.set()
        self._replay.resized(self._offset, wanted)
        if self._recorder is not None:
            self._recorder.resize(wanted.cols, wanted.rows)
        for viewer in self._viewers:
            viewer._push(Resize(wanted.cols, wanted.rows))

    # ------------------------------------------------------------ control

    def request_control(self, viewer: Viewer) -> bool:
        """Grant control if nobody holds it; otherwise tell ``viewer`` it was refused."""
        if viewer is self._controller:
            return True
        if not viewer.can_control or viewer.closed:
            viewer._push(ControlDenied("this viewer may only watch"))
            return False
        if self._controller is not None:
            viewer._push(ControlDenied(f"{self._controller.party} is in control"))
            return False
        self._set_controller(viewer, "granted")
        return True

    def deny_control(self, viewer: Viewer, reason: str) -> None:
        """Tell ``viewer`` its request was refused (by the host's user or its policy)."""
        viewer._push(ControlDenied(reason))

    def grant_control(self, viewer: Viewer) -> None:
        """Give control to ``viewer`` (the host's decision), demoting any other controller."""
        if not viewer.can_control or viewer.closed:
            raise NotAllowed(f"{viewer.party} may not control")
        if viewer is not self._controller:
            self._set_controller(viewer, "granted")

    def revoke_control(self) -> None:
        """Take control back to the host's console."""
        if self._controller is not None:
            self._set_controller(None, "revoked")

    def release_control(self, viewer: Viewer) -> bool:
        """``viewer`` gives control back; False if it did not have it."""
        if viewer is not self._controller:
            return False
        self._set_controller(None, "released")
        return True

    def _set_controller(self, viewer: Viewer | None, reason: str) -> None:
        previous = self._controller
        self._controller = viewer
        self._control_epoch += 1
        for each in self._viewers:
            each._push(self._control_state(each))
        self._apply_size()
        self._emit(
            ControlChanged(
                viewer.party if viewer else None, previous.party if previous else None, reason
            )
        )

    def _control_state(self, viewer: Viewer) -> ControlState:
        controller = self._controller
        return ControlState(
            controller.party if controller is not None else None,
            self._control_epoch,
            controller is viewer,
        )

    def _emit(self, event: HostEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)
