"""One authenticated WebSocket to the Mesh Server: the access token at the upgrade, one refresh
when the server refuses it, then the caller's session until it ends.

Shared by the control link (`/ws`) and the relay (`/relay`); each keeps its own reconnect loop.
The server closes a socket 4401 when its token is bad or expired and 4403 when its session
was revoked (docs/server-api.md); both mean: refresh, then try again. A refused refresh after
that means the device's session is gone for good and it must enrol again: the one reason
:data:`ENROL_AGAIN` says so.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from .client import MeshClient, MeshError
from .types import CLOSE_REVOKED, CLOSE_UNAUTHORIZED

log = logging.getLogger(__name__)

__all__ = ["CLOSE_REVOKED", "CLOSE_UNAUTHORIZED", "ENROL_AGAIN", "run_authed_socket"]

# Close codes after which a refreshed token may succeed.
REFRESHABLE: Final = frozenset({CLOSE_UNAUTHORIZED, CLOSE_REVOKED})
ENROL_AGAIN: Final = (
    "this device's session was revoked or has expired: enrol it again (meshagent login)"
)
# Refresh refusals that no retry can fix: the refresh token is spent, revoked or unknown.
_SESSION_GONE: Final = frozenset({"invalid_refresh_token", "not_enrolled", "unauthorized"})


def refreshable(exc: ConnectionClosed) -> bool:
    """Did the server close this socket for its token or session (refresh and retry)?"""
    return exc.rcvd is not None and exc.rcvd.code in REFRESHABLE


async def run_authed_socket(
    client: MeshClient,
    url: str,
    serve: Callable[[ClientConnection], Awaitable[str]],
    *,
    on_refresh_error: Callable[[str], None],
    **options: Any,
) -> str:
    """Open ``url`` with the device's token and run ``serve``; returns why the session ended.

    A refusal (close 4401 or 4403, or HTTP 401/403 at the upgrade) refreshes the token once and
    retries; a second refusal, or a failed refresh, ends the attempt. ``serve`` re-raises the
    ConnectionClosed of a refreshable close code so it lands here.
    """
    gone = False

    async def refresh(stale: str | None) -> str | None:
        nonlocal gone
        try:
            return await client.refresh(stale)
        except MeshError as exc:
            gone = exc.code in _SESSION_GONE
            # A session gone for good is said once, by the control link; not at every retry.
            log.log(logging.DEBUG if gone else logging.WARNING, "cannot refresh: %s", exc.message)
            on_refresh_error(ENROL_AGAIN if gone else exc.message)
            return None

    token = client.access_token
    for attempt in range(2):
        if token is None:
            token = await refresh(None)
            if token is None:
                return ENROL_AGAIN if gone else "not logged in"
        refused = False
        try:
            async with connect(
                url, additional_headers={"Authorization": f"Bearer {token}"}, **options
            ) as ws:
                return await serve(ws)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            if not refreshable(exc) or attempt:
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
                return ENROL_AGAIN if gone else "cannot refresh the session"
    return "refused twice"
