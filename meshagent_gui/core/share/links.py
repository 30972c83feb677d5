"""``meshagent send PATH --link``: a one-time URL for someone with no account.

The agent asks the server for a link naming what it will send (name and size, a folder as its
zip), hands out ``<server>/s/<link_id>#<secret>`` (the secret stays in the fragment: browsers do
not send it to the server in the path, nor in a Referer), and waits. The first page that opens
it claims it with its DTLS fingerprint and becomes a guest that can reach this device only; the
server tells us (``link.claimed``) and the sender dials the guest over WebRTC and sends, as to
a browser of its own. Nobody claims it before it expires: the send ends with one clear error.
The send is cancelled first: the link is withdrawn, so nobody opens it to wait in vain.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from meshagent_gui.core.bus import EventBus, Subscription
from meshagent_gui.core.events import AnnouncementReceived
from meshagent_gui.core.mesh.client import MeshClient, MeshError
from meshagent_gui.errors import UserError

from .source import walk
from .zipsource import zip_folders

LINK_CLAIMED: Final = "link.claimed"
# While nobody has opened the link, the URL is repeated this often: the CLI's connection to the
# agent counts silence longer than two minutes as a dead agent.
HEARTBEAT: Final = 30.0
# How long a cancelled send waits for the server to withdraw its link.
WITHDRAW_TIMEOUT: Final = 5.0


@dataclass(frozen=True)
class LinkReady:
    url: str
    expires_at: float


@dataclass(frozen=True)
class LinkClaimedBy:
    guest: str  # the guest's device id (its DTLS fingerprint)


async def share_link(
    client: MeshClient, bus: EventBus, paths: Sequence[Path], ttl: int | None = None
) -> AsyncIterator[LinkReady | LinkClaimedBy]:
    """Open a link for ``paths`` (one file or folder); yields :class:`LinkReady` (again every
    :data:`HEARTBEAT`) until someone claims it, then :class:`LinkClaimedBy`."""
    if len(paths) != 1:
        raise UserError("a share link carries one file or folder", code="usage")
    # What the page will receive: one file (laid out in a worker, like the walk).
    [item] = (await asyncio.to_thread(lambda: zip_folders(walk(paths)))).entries
    with bus.subscribed() as events:  # before the link exists: no claim can be missed
        link = await client.create_link(item.path, item.size, ttl)
        ready = LinkReady(f"{client.url.rstrip('/')}{link.path}#{link.secret}", link.expires_at)
        guest: str | None = None
        try:
            # A streamed reply passes each item on when the next one comes (the last is the
            # reply): said twice, the URL reaches the user now rather than one heartbeat later.
            yield ready
            while guest is None:
                yield ready
                left = link.expires_at - time.time()
                if left <= 0:
                    raise UserError(
                        "nobody opened the share link before it expired", code="link_expired"
                    )
                try:
                    async with asyncio.timeout(min(HEARTBEAT, left)):
                        guest = await _claim(events, link.link_id)
                except TimeoutError:
                    # The event is lost if our socket was down when the link was claimed: ask.
                    with contextlib.suppress(MeshError):
                        guest = (await client.link_status(link.link_id)).guest
        except (asyncio.CancelledError, GeneratorExit):
            # Cancelled (Ctrl-C, the app's "Cancel link") before anyone opened it: a page that
            # opened it now would wait for a sender who never dials.
            if guest is None:
                await _withdraw(client, link.link_id)
            raise
        yield LinkClaimedBy(guest)


async def _withdraw(client: MeshClient, link_id: str) -> None:
    """Best effort, bounded, and never in the cancellation's way: the link expires anyway."""

    async def attempt() -> None:
        with contextlib.suppress(MeshError, TimeoutError):
            async with asyncio.timeout(WITHDRAW_TIMEOUT):
                await client.withdraw_link(link_id)

    # Shielded: we are being cancelled; a second cancel leaves it to finish on its own.
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(attempt())


async def _claim(events: Subscription, link_id: str) -> str:
    async for event in events:
        if (
            isinstance(event, AnnouncementReceived)
            and event.kind == LINK_CLAIMED
            and event.sender is None  # the server's own event, not a peer's announcement
            and event.data.get("link_id") == link_id
            and isinstance(event.data.get("guest"), str)
        ):
            return str(event.data["guest"])
    raise UserError("the agent is stopping", code="stopped")
