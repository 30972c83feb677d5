"""The agent's side of ``meshagent terminal share|view``: a console attached over local IPC.

The console process (the CLI, in raw mode) and the agent exchange IPC stream frames: raw bytes
are terminal output (agent -> console) or keystrokes (console -> agent); JSON frames carry the
rest. Console -> agent: ``{"resize": [cols, rows]}``, ``{"consent": id, "allow": bool}``,
``{"revoke": true}``, ``{"stop": true}`` (host); ``{"control": "request"|"release"}`` (viewer).
Agent -> console: ``{"event": ...}`` with ``control_request`` (id, name), ``viewer_joined``,
``viewer_left``, ``control`` (controller, you), ``refused`` (reason), ``screen``/``size``
(cols, rows), ``ended`` (exit_code, signal, message), ``error`` (message).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

from meshagent_gui.core.ipc import IpcStream, IpcStreamClosed
from meshagent_gui.core.ipc_types import (
    AgentEvent,
    ControlFrame,
    ControlRequestClosedFrame,
    ControlRequestFrame,
    EndedFrame,
    ErrorFrame,
    RefusedFrame,
    ScreenFrame,
    ShareOpened,
    SizeFrame,
    TerminalShareParams,
    TerminalViewParams,
    ViewerJoinedFrame,
    ViewerLeftFrame,
    ViewOpened,
    console_frame,
)
from meshagent_gui.core.protocol.terminal import (
    ControlChanged,
    ControlRefused,
    OutputReceived,
    ScreenReplaced,
    SessionEnded,
    SizeChanged,
    ViewerEvent,
)
from meshagent_gui.core.terminal import host as h
from meshagent_gui.core.terminal.service import ControlAsk, TerminalService
from meshagent_gui.errors import UserError

CONSOLE_HIGH_WATER: Final = 1 << 20
"""Output queued toward a console before the viewer stops reading its stream (backpressure to
the host, whose bounded queue then skips this viewer ahead to a fresh snapshot)."""

ResolveDevice = Callable[[str], Awaitable[tuple[str, str]]]


def _refuse(stream: IpcStream, exc: UserError) -> None:
    stream.write_json({"error": {"code": exc.code, "message": exc.message}})


async def share_console(
    service: TerminalService, params: TerminalShareParams, stream: IpcStream
) -> None:
    """Share a new PTY; the attached console is the host's own terminal."""
    cols, rows = params.size or (80, 24)
    rooms = params.rooms or None
    try:
        if rooms is not None:
            await service.check_rooms(rooms)
        shared = service.share(
            params.command or None,
            allow_control=params.allow_control,
            record=Path(params.record) if params.record else None,
            cols=cols,
            rows=rows,
            cwd=params.cwd,
            env=params.env,
            rooms=rooms,
        )
    except UserError as exc:
        _refuse(stream, exc)
        return
    opened = ShareOpened(session_id=shared.session_id, title=shared.title, rooms=shared.rooms)
    stream.write_json({"ok": opened})
    asks: dict[int, asyncio.Future[bool]] = {}
    numbers = itertools.count(1)

    async def consent(ask: ControlAsk) -> bool:
        number = next(numbers)
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        asks[number] = answer
        stream.write_json(ControlRequestFrame(id=number, name=ask.device_name))
        try:
            return await answer
        finally:
            asks.pop(number, None)
            stream.write_json(ControlRequestClosedFrame(id=number))

    def on_event(event: h.HostEvent) -> None:
        match event:
            case h.ViewerJoined(party=party):
                stream.write_json(ViewerJoinedFrame(name=party))
            case h.ViewerLeft(party=party):
                stream.write_json(ViewerLeftFrame(name=party))
            case h.HostControlChanged(controller=controller, reason=reason):
                stream.write_json(ControlFrame(controller=controller, reason=reason, you=False))

    async def read_console() -> None:
        try:
            while True:
                raw = await stream.receive()
                if isinstance(raw, bytes):
                    shared.host.console_input(raw)
                elif (frame := console_frame(raw)) is None:
                    continue  # not a frame we know: ignored
                elif frame.resize is not None:
                    shared.host.set_console_size(*frame.resize)
                elif frame.consent is not None:
                    answer = asks.get(frame.consent)
                    if answer is not None and not answer.done():
                        answer.set_result(frame.allow)
                elif frame.revoke:
                    shared.revoke_control()
                elif frame.stop:
                    shared.stop()
        except IpcStreamClosed:
            shared.stop()  # the sharing console is gone: so is the session

    shared.console_output = stream.write_data
    shared.consent = consent
    shared.on_event = on_event
    async with asyncio.TaskGroup() as tasks:
        reader = tasks.create_task(read_console(), name="terminal-console-in")
        status = await shared.run()
        reader.cancel()
    stream.write_json(EndedFrame(exit_code=status.code, signal=status.signal, message=""))
    with contextlib.suppress(IpcStreamClosed):
        await stream.drain()


def _event_frame(event: ViewerEvent) -> AgentEvent:
    match event:
        case ScreenReplaced(cols=cols, rows=rows):
            return ScreenFrame(cols=cols, rows=rows)
        case SizeChanged(cols=cols, rows=rows):
            return SizeFrame(cols=cols, rows=rows)
        case ControlChanged(controller=controller, you=you):
            return ControlFrame(controller=controller, you=you)
        case ControlRefused(reason=reason):
            return RefusedFrame(reason=reason)
        case SessionEnded(exit_code=code, signal=signal, message=message):
            return EndedFrame(exit_code=code, signal=signal, message=message)
    raise AssertionError(event)


async def view_console(
    service: TerminalService,
    resolve: ResolveDevice,
    params: TerminalViewParams,
    stream: IpcStream,
    *,
    opening: bool = False,
) -> None:
    """Watch (or control) a peer's session; the attached console shows it. ``opening``:
    ``terminal open``, a new shell there instead of an announced session."""
    cols, rows = params.size or (0, 0)
    try:
        device_id, _ = await resolve(params.device)
        if opening:
            view = await service.open(device_id, cols=cols, rows=rows)
        else:
            view = await service.view(
                device_id, params.session or None, control=params.control, cols=cols, rows=rows
            )
    except UserError as exc:
        _refuse(stream, exc)
        return
    opened = ViewOpened(session_id=view.session_id, device=view.device_name, size=view.size)
    stream.write_json({"ok": opened})
    if view.control:
        try:
            await view.request_control()
        except UserError as exc:
            stream.write_json(RefusedFrame(reason=exc.message))

    async def show() -> None:
        try:
            async for event in view.events():
                if isinstance(event, OutputReceived):
                    stream.write_data(event.data)
                    if stream.buffered > CONSOLE_HIGH_WATER:
                        await stream.drain()
                else:
                    stream.write_json(_event_frame(event))
        except UserError as exc:
            stream.write_json(ErrorFrame(message=exc.message))
        await stream.drain()

    async def read_console() -> None:
        while True:
            raw = await stream.receive()
            if isinstance(raw, bytes):
                await view.send_input(raw)
            elif (frame := console_frame(raw)) is None:
                continue  # not a frame we know: ignored
            elif frame.resize is not None:
                await view.resize(*frame.resize)
            elif frame.control == "request":
                try:
                    await view.request_control()
                except UserError as exc:
                    stream.write_json(RefusedFrame(reason=exc.message))
            elif frame.control == "release":
                await view.release_control()

    try:
        async with asyncio.TaskGroup() as tasks:
            shower = tasks.create_task(show(), name="terminal-view-out")
            reader = tasks.create_task(read_console(), name="terminal-view-in")
            await asyncio.wait({shower, reader}, return_when=asyncio.FIRST_COMPLETED)
            shower.cancel()
            reader.cancel()
    except* IpcStreamClosed:
        pass  # the console left
    finally:
        await view.aclose()
