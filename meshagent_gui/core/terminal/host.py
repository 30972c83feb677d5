"""The terminal session host: one PTY, its output stream with byte offsets, viewers, control.

It composes modules with one job each: :mod:`.viewer` (one viewer's queue, resyncs and stream),
:mod:`.replay` (the output kept for resumes), :mod:`.recorder` (the asciicast file),
:mod:`.screen` (the emulator behind snapshots), and the control rules, a sans-IO table in
:mod:`meshagent_gui.core.protocol.terminal` (:class:`HostControl`). This module runs them: the
PTY's output, the screen worker, floods, sizes, and what each control decision means for the
viewers and the PTY.

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
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from meshagent_gui.core.protocol.errors import ErrorCode, ProtocolError
from meshagent_gui.core.protocol.terminal import (
    MAX_OUTPUT_DATA,
    ControlAllowed,
    ControlDenied,
    ControlEvent,
    ControlNotAllowed,
    ControlPassed,
    ControlRelease,
    ControlRequest,
    Ended,
    HostControl,
    HostMessage,
    Input,
    Join,
    RefusalWithheld,
    RequestRefused,
    Resize,
    Right,
    snapshot_parts,
)
from meshagent_gui.core.terminal.pty import ExitStatus, Pty, PtyClosed
from meshagent_gui.core.terminal.recorder import AsciicastRecorder
from meshagent_gui.core.terminal.replay import ReplayLog
from meshagent_gui.core.terminal.sanitize import sanitize_input
from meshagent_gui.core.terminal.screen import ScreenSnapshot, ScreenTracker, WindowSize
from meshagent_gui.core.terminal.viewer import Viewer, ViewerClosed

__all__ = [
    "FLOOD_FRAME_SECONDS",
    "FLOOD_FRAME_TAIL",
    "FLOOD_RECHECK_SECONDS",
    "STOPPED_BY_HOST",
    "AsciicastRecorder",
    "CommandExited",
    "HostControlChanged",
    "HostControlRequested",
    "HostEvent",
    "HostLimits",
    "NotAllowed",
    "TerminalHost",
    "TooManyViewers",
    "Viewer",
    "ViewerClosed",
    "ViewerFellBehind",
    "ViewerJoined",
    "ViewerLeft",
]

KiB: Final = 1024
MiB: Final = 1024 * KiB
FLOOD_RECHECK_SECONDS: Final = 0.005
FLOOD_FRAME_SECONDS: Final = 0.25
"""While the output floods, how often viewers get a picture of the screen."""
FLOOD_FRAME_TAIL: Final = 64 * 1024
"""Output parsed for such a picture: a screenful many times over, about 2 ms of avt."""
STOPPED_BY_HOST: Final = "the host stopped sharing"
"""How a session ends when the host stops sharing (the Ended message viewers see)."""


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
class HostControlRequested:
    party: str


@dataclass(frozen=True, slots=True)
class HostControlChanged:
    """Control of the PTY changed hands (None: the host's own console); ``reason`` is one of
    granted, released, revoked, left. (A viewer hears of it as a ControlState message.)"""

    controller: str | None
    previous: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class CommandExited:
    status: ExitStatus


HostEvent = (
    ViewerJoined
    | ViewerLeft
    | ViewerFellBehind
    | HostControlRequested
    | HostControlChanged
    | CommandExited
)


class TooManyViewers(Exception):
    pass


class NotAllowed(Exception):
    """The viewer may not control (its stream carries no terminal:control grant)."""


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
        self._replay = ReplayLog(self.limits.replay_bytes, self._size)
        self._recorder = recorder
        self._console_output = console_output
        self._on_event = on_event
        self._viewers: dict[int, Viewer] = {}  # by seat, in the order they attached
        self._control = HostControl()
        self._offset = 0
        self._screen_work = asyncio.Event()
        self._eof = asyncio.Event()
        self._status: ExitStatus | None = None
        self._ended: Ended | None = None
        self._stopped_by_host = False  # close(): the command's hang-up is no failure
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
        return self._control.controller_name

    @property
    def control_epoch(self) -> int:
        return self._control.epoch

    @property
    def viewers(self) -> tuple[Viewer, ...]:
        return tuple(self._viewers.values())

    @property
    def status(self) -> ExitStatus | None:
        return self._status

    @property
    def screen(self) -> ScreenTracker:
        return self._tracker

    @property
    def pty(self) -> Pty:
        return self._pty

    @property
    def flooding(self) -> bool:
        """The output floods: viewers are held (see :meth:`_screen_worker`)."""
        return self._flooding

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
            self._end(ExitStatus(), STOPPED_BY_HOST)
            await self._stop_command()
            raise
        finally:
            self._pty.close()
            if self._recorder is not None:
                await self._recorder.aclose()
        # The command dies of the hang-up close() sends: say who ended it, not "signal 1".
        self._end(status, STOPPED_BY_HOST if self._stopped_by_host else "")
        return status

    def close(self, *, force: bool = False) -> None:
        """End the session: hang up the command (or kill it); :meth:`run` then returns."""
        self._stopped_by_host = True
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
                        for viewer in self._viewers.values():
                            viewer.hold()
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
        self._frame_for([v for v in self._viewers.values() if v.wants_frame])

    def _frame_for(self, idle: list[Viewer]) -> None:
        if not idle:
            return
        snap = self._tracker.snapshot(tail=FLOOD_FRAME_TAIL)
        parts = snapshot_parts(snap.offset, snap.cols, snap.rows, snap.data)
        for viewer in idle:
            viewer.frame([*parts, self._control.state_for(viewer.seat)])

    def _flood_paused(self) -> None:
        if self._flooding:
            self._flooding = False
            for viewer in self._viewers.values():
                viewer.release()  # its snapshot is due

    def _end(self, status: ExitStatus, message: str) -> None:
        self._flood_paused()
        if self._ended is not None:
            return
        self._status = status
        self._ended = Ended(status.code, status.signal, message)
        for viewer in self._viewers.values():
            viewer.end(self._ended)
        self._emit(CommandExited(status))

    # ------------------------------------------------------------ the hot path

    def _on_output(self, data: bytes) -> None:
        offset = self._offset
        self._offset += len(data)
        self._replay.append(offset, data)
        self._tracker.append(data)
        if not self._flooding:
            for viewer in self._viewers.values():
                if viewer.push_output(offset, data):
                    self._emit(ViewerFellBehind(viewer.party))
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
        right = Right.CONTROL if can_control else Right.WATCH
        seat = self._control.join(party, right, time.monotonic())
        viewer = Viewer(
            self,
            party,
            seat,
            console,
            queue_bytes=self.limits.viewer_queue_bytes,
            message_bytes=self.limits.output_message_bytes,
        )
        # During a flood nobody is streamed output, so a resume would leave a gap: a snapshot.
        replay = None
        if from_offset is not None and not self._flooding:
            replay = self._replay.replay(from_offset)
        if replay is not None and replay[1] <= self.limits.viewer_queue_bytes:
            items, total = replay
            messages = (Resize(i.cols, i.rows) if isinstance(i, WindowSize) else i for i in items)
            fell_behind = viewer.resume(messages, total)
            fell_behind |= viewer.push(self._control.state_for(seat))
            if fell_behind:
                self._emit(ViewerFellBehind(party))
        if self._ended is not None:
            viewer.end(self._ended)
        elif self._flooding and viewer.awaiting_snapshot:
            viewer.hold()
            self._frame_for([viewer])  # a late joiner sees the screen now, not at the next frame
        self._viewers[seat] = viewer
        self._emit(ViewerJoined(party, resumed=not viewer.awaiting_snapshot))
        return viewer

    def detach(self, viewer: Viewer) -> None:
        if self._viewers.get(viewer.seat) is not viewer:
            return
        del self._viewers[viewer.seat]
        viewer.discard()
        self._carry_out(self._control.leave(viewer.seat, time.monotonic()))
        self._emit(ViewerLeft(viewer.party))

    def snapshot(self) -> ScreenSnapshot:
        """The screen now (parses what the emulator has queued first)."""
        return self._tracker.snapshot()

    def snapshot_for(self, viewer: Viewer) -> list[HostMessage]:
        """The messages that (re)start ``viewer``'s stream: the screen, then its ControlState."""
        snap = self._tracker.snapshot()
        parts: list[HostMessage] = list(
            snapshot_parts(snap.offset, snap.cols, snap.rows, snap.data)
        )
        parts.append(self._control.state_for(viewer.seat))
        return parts

    def receive(self, viewer: Viewer, message: object) -> None:
        """Act on a message from ``viewer``'s stream (after its Join)."""
        match message:
            case Input(data=data):
                self.input(viewer, bytes(data))
            case Resize(cols=cols, rows=rows):
                self.viewer_resized(viewer, cols, rows)
            case ControlRequest():
                self._emit(HostControlRequested(viewer.party))
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
        if viewer.closed or not self._control.typed(viewer.seat):
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
        if viewer.seat == self._control.controller and not viewer.closed:
            self._apply_size()

    def _apply_size(self) -> None:
        seat = self._control.controller
        controller = self._viewers.get(seat) if seat is not None else None
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
        for viewer in self._viewers.values():
            self._push(viewer, Resize(wanted.cols, wanted.rows))

    # ------------------------------------------------------------ control

    def may_control(self, viewer: Viewer) -> bool:
        """Whether ``viewer``'s stream allows it control (False once it left)."""
        return not viewer.closed and self._control.right(viewer.seat) is Right.CONTROL

    def allow_control(self, viewer: Viewer) -> None:
        """``viewer`` showed a ``terminal:control`` capability after it joined."""
        self._carry_out(self._control.prove(viewer.seat, time.monotonic()))

    def request_control(self, viewer: Viewer) -> bool:
        """Grant control if nobody holds it; otherwise tell ``viewer`` it was refused."""
        self._carry_out(self._control.request(viewer.seat, time.monotonic()))
        return self._control.controller == viewer.seat

    def deny_control(self, viewer: Viewer, reason: str) -> None:
        """Tell ``viewer`` its request was refused (by the host's user or its policy)."""
        self._carry_out(self._control.deny(viewer.seat, reason, time.monotonic()))

    def grant_control(self, viewer: Viewer) -> None:
        """Give control to ``viewer`` (the host's decision), demoting any other controller."""
        try:
            events = self._control.grant(viewer.seat, time.monotonic())
        except ControlNotAllowed:
            raise NotAllowed(f"{viewer.party} may not control") from None
        self._carry_out(events)

    def revoke_control(self) -> None:
        """Take control back to the host's console."""
        self._carry_out(self._control.revoke(time.monotonic()))

    def release_control(self, viewer: Viewer) -> bool:
        """``viewer`` gives control back; False if it did not have it."""
        events = self._control.release(viewer.seat, time.monotonic())
        self._carry_out(events)
        return bool(events)

    def _carry_out(self, events: list[ControlEvent]) -> None:
        """What the control rules decided, done: messages to viewers, the size, our events."""
        for event in events:
            match event:
                case ControlPassed(controller=controller, previous=previous, reason=reason):
                    for viewer in self._viewers.values():
                        self._push(viewer, self._control.state_for(viewer.seat))
                    self._apply_size()
                    self._emit(HostControlChanged(controller, previous, reason))
                case RequestRefused(seat=seat, reason=reason):
                    refused = self._viewers.get(seat)
                    if refused is not None:
                        self._push(refused, ControlDenied(reason))
                case RefusalWithheld() | ControlAllowed():
                    pass

    def _push(self, viewer: Viewer, message: HostMessage) -> None:
        if viewer.push(message):
            self._emit(ViewerFellBehind(viewer.party))

    def _emit(self, event: HostEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)
