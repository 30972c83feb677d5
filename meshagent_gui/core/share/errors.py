"""How a transfer ends badly: the user's error, and the channel errors that only mean the other
end has gone (which whoever is ending a transfer anyway may ignore)."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable
from typing import Any

from meshagent_gui.core.mesh.client import MeshError
from meshagent_gui.core.p2p.errors import P2PError
from meshagent_gui.core.p2p.session import ChannelClosed
from meshagent_gui.core.protocol import transfer as tp
from meshagent_gui.errors import UserError


class TransferError(UserError):
    pass


def ended_by_receiver(reason: str, code: tp.TransferErrorCode) -> TransferError:
    if code is tp.TransferErrorCode.INTERNAL_ERROR:
        return TransferError(f"the receiver failed: {reason}", code="receiver_failed")
    return TransferError(f"the receiver cancelled: {reason}", code="cancelled")


def describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


async def quietly(awaitable: Awaitable[Any]) -> None:
    with contextlib.suppress(ChannelClosed, P2PError, ConnectionError, MeshError):
        await awaitable
