"""One authenticated WebSocket to the Mesh Server: the access token at the upgrade, one refresh
when the server refuses it, then the caller's session until it ends.

Shared by the control link (`/ws`) and the relay (`/relay`); each keeps its own reconnect loop.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from .client import MeshClient, MeshError

log = logging.getLogger(__name__)

CLOSE_UNAUTHORIZED: Final = 4401
REFUSED: Final = "refused: this device's session is no longer valid"


async def run_authed_socket(
    client: MeshClient,
    url: str,
    serve: Callable[[ClientConnection], Awaitable[str]],
    *,
    on_refresh_error: Callable[[str], None],
    **options: Any,
) -> str:
    """Open ``url`` with the device's token and run ``serve``; returns why the session ended.

    A refusal (close 4401, or HTTP 401/403 at the upgrade) refreshes the token once and
    retries; a second refusal, or a failed refresh, ends the attempt.
    """

    async def refresh(stale: str | None) -> str | None:
        try:
            return await client.refresh(stale)
        except MeshError as exc:
            log.warning("cannot refresh the session: %s", exc.message)
            on_refresh_error(exc.message)
            return None

    token = client.access_token
    for attempt in range(2):
        if token is None:
            token = await refresh(None)
            if token is None:
                return "not logged in"
        refused = False
        try:
            async with connect(
                url, additional_headers={"Authorization": f"Bearer {token}"}, **options
            ) as ws:
                return await serve(ws)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            if code != CLOSE_UNAUTHORIZED or attempt:
                return f"closed ({code})" if code else "connection dropped"
            refused = True
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status not in (401, 403) or attempt:
                return f"server answered HTTP {status}"
            refused = True
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            return str(exc) or type(exc).__name__
        if refused:
            token = await refresh(token)
            if token is None:
                return REFUSED
    return "refused twice"
