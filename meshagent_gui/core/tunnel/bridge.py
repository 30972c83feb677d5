"""The agent's IPC side of tunnels: ``tunnel.forward`` (an attached stream that lives as long as
the ``meshagent forward`` command) and ``tunnel.list``.

``tunnel.forward`` answers ``{"ok": ForwardOpened}`` once it listens (or one error: no right to
tunnel there, the port taken, an unreadable target), then sends a :class:`TunnelEvent` frame
per connection opened, closed or refused. The forward stops when the command hangs up or sends
``{"stop": true}``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from meshagent_gui.core.ipc import (
    Handler,
    IpcStream,
    IpcStreamClosed,
    Route,
    StreamHandler,
    StreamRoute,
)
from meshagent_gui.core.ipc_types import NoParams, TunnelForwardParams, TunnelStopParams
from meshagent_gui.core.protocol.tunnel import parse_target
from meshagent_gui.errors import UserError

from .service import ForwardOpened, TunnelInfo, TunnelService

ResolveDevice = Callable[[str], Awaitable[tuple[str, str]]]


def tunnel_handlers(service: TunnelService) -> dict[str, Handler]:
    async def listing(_: NoParams) -> list[TunnelInfo]:
        return service.listing()

    async def stop(params: TunnelStopParams) -> dict[str, bool]:
        return {"stopped": await service.stop(params.id)}

    return {"tunnel.list": Route(NoParams, listing), "tunnel.stop": Route(TunnelStopParams, stop)}


def tunnel_streams(service: TunnelService, resolve: ResolveDevice) -> dict[str, StreamHandler]:
    async def forward(params: TunnelForwardParams, stream: IpcStream) -> None:
        try:
            try:
                target = parse_target(params.target)
            except ValueError as exc:
                raise UserError(f"cannot read the target: {exc}", code="usage") from None
            device_id, name = await resolve(params.device)
            running = await service.forward(
                device_id,
                name,
                target,
                bind=params.bind,
                port=params.port,
                on_event=stream.write_json,
            )
        except UserError as exc:
            stream.write_json({"error": {"code": exc.code, "message": exc.message}})
            return
        stream.write_json(
            {
                "ok": ForwardOpened(
                    listen=running.listen,
                    port=running.port,
                    device=name,
                    device_id=device_id,
                    target=str(target),
                    announced=service.announced_by(device_id),
                )
            }
        )
        try:
            await _until_stopped(stream, running.closed)
        finally:
            await running.aclose()

    return {"tunnel.forward": StreamRoute(TunnelForwardParams, forward)}


async def _until_stopped(stream: IpcStream, closed: asyncio.Event) -> None:
    """Until the command hangs up or says stop, or the forward was stopped here (the app's
    Tunnels window): then the command is told so and its stream ends."""

    async def hung_up() -> None:
        with contextlib.suppress(IpcStreamClosed):
            while True:
                frame = await stream.receive()
                if isinstance(frame, dict) and frame.get("stop"):
                    return

    command = asyncio.ensure_future(hung_up())
    stopped_here = asyncio.ensure_future(closed.wait())
    try:
        await asyncio.wait({command, stopped_here}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        command.cancel()
        stopped_here.cancel()
    if closed.is_set():
        with contextlib.suppress(IpcStreamClosed, ConnectionError):
            stream.write_json({"event": "stopped", "message": "stopped on this device"})
