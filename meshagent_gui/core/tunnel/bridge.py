"""The agent's IPC side of tunnels: ``tunnel.forward`` (an attached stream that lives as long as
the ``meshagent forward`` command) and ``tunnel.list``.

``tunnel.forward`` answers ``{"ok": ForwardOpened}`` once it listens (or one error: no right to
tunnel there, the port taken, an unreadable target), then sends a :class:`TunnelEvent` frame
per connection opened, closed or refused. The forward stops when the command hangs up or sends
``{"stop": true}``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from meshagent_gui.core.ipc import (
    Handler,
    IpcStream,
    IpcStreamClosed,
    Route,
    StreamHandler,
    StreamRoute,
)
from meshagent_gui.core.ipc_types import NoParams, TunnelForwardParams
from meshagent_gui.core.protocol.tunnel import parse_target
from meshagent_gui.errors import UserError

from .service import ForwardOpened, TunnelInfo, TunnelService

ResolveDevice = Callable[[str], Awaitable[tuple[str, str]]]


def tunnel_handlers(service: TunnelService) -> dict[str, Handler]:
    async def listing(_: NoParams) -> list[TunnelInfo]:
        return service.listing()

    return {"tunnel.list": Route(NoParams, listing)}


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
                )
            }
        )
        try:
            while True:
                frame = await stream.receive()
                if isinstance(frame, dict) and frame.get("stop"):
                    break
        except IpcStreamClosed:
            pass
        finally:
            await running.aclose()

    return {"tunnel.forward": StreamRoute(TunnelForwardParams, forward)}
