"""Per-user Gotify notifications: what a user must know at once, sent to their own Gotify.

The server tells a user (``PUT /users/self/notify``) about: a new device enrolled on their
account, control of their terminal granted, a session revoked, an invitation received. The
Gotify client is the agent's own (:mod:`meshagent_gui.core.notify.gotify`).

Rules the callers rely on:

* :meth:`UserNotifier.notify` never blocks the request: it starts a task this object owns and
  returns. The task looks the user's target up, posts once (one retry) and gives up after
  ``timeout`` seconds whatever happens.
* Failures are logged with the user and Gotify's error code only: never the token, never the
  message (a notification may name devices and rooms).
* Each user's notifications are rate limited (a burst, then one a minute), and at most
  ``max_in_flight`` posts run at once: someone inviting a user again and again cannot page them
  without end, nor make the server hold a task per request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Final

import httpx

from meshagent_gui.core.notify.gotify import GotifyClient, GotifyError, validate_url
from meshagent_gui.server.hub import RateAllowance
from meshagent_gui.server.store import AsyncStore, Store

log = logging.getLogger(__name__)

NOTIFY_TIMEOUT: Final = 15.0
MAX_IN_FLIGHT: Final = 64
PER_USER_RATE: Final = 1 / 60  # per second, after the burst
PER_USER_BURST: Final = 10.0
_MAX_TRACKED_USERS: Final = 10_000


class NotifySettingsError(ValueError):
    """A Gotify URL or token the server will not use; the message is safe to show."""


async def check_target(url: str, token: str | None) -> str:
    """The normalised Gotify base URL, or :class:`NotifySettingsError`.

    The server posts to a URL a user chose (a blind POST with a fixed body, no redirects, the
    answer never shown): link-local addresses are refused so that it cannot be pointed at a
    cloud metadata service. Loopback and private addresses stay allowed (Gotify often runs
    beside the server or on the LAN); docs/security.md says so.
    """
    try:
        base = validate_url(url)
        if token is not None:
            # The client checks the token's characters; it is closed at once, nothing is sent.
            async with GotifyClient(str(base), token):
                pass
    except GotifyError as exc:
        raise NotifySettingsError(str(exc).replace("gotify.", "gotify_")) from None
    try:
        address = ipaddress.ip_address(base.host.strip("[]"))
    except ValueError:
        return str(base)
    if address.is_link_local or address.is_unspecified or address.is_multicast:
        raise NotifySettingsError("gotify_url must not be a link-local or unspecified address")
    return str(base)


class UserNotifier:
    """Sends users' notifications in the background; see the module docstring."""

    def __init__(
        self,
        db: AsyncStore,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = NOTIFY_TIMEOUT,
        max_in_flight: int = MAX_IN_FLIGHT,
        retries: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = db
        self._transport = transport
        self._timeout = timeout
        self._retries = retries
        self._max_in_flight = max_in_flight
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()
        self._buckets: dict[str, RateAllowance] = {}

    def notify(self, user: str, title: str, message: str, *, priority: int = 5) -> None:
        """Queue one notification for ``user`` (nothing happens if they set no Gotify)."""
        if not self._take(user):
            log.info("notification for %s dropped: rate limited", user)
            return
        if len(self._tasks) >= self._max_in_flight:
            log.warning("notification for %s dropped: %d already in flight", user, len(self._tasks))
            return
        task = asyncio.get_running_loop().create_task(self._send(user, title, message, priority))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for every notification in flight (tests, and a graceful shutdown)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.drain()

    def _take(self, user: str) -> bool:
        now = self._clock()
        bucket = self._buckets.get(user)
        if bucket is None:
            if len(self._buckets) >= _MAX_TRACKED_USERS:
                self._buckets.clear()  # forgetting buckets only ever lets a few more through
            bucket = self._buckets[user] = RateAllowance(PER_USER_RATE, PER_USER_BURST, now)
        return bucket.take(now)

    async def _send(self, user: str, title: str, message: str, priority: int) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                target = await self._db.call(Store.notify_target, user)
                if target is None or target.token is None:
                    return
                async with GotifyClient(
                    target.url,
                    target.token,
                    transport=self._transport,
                    timeout=self._timeout / 3,
                    retries=self._retries,
                    backoff=1.0,
                ) as client:
                    await client.send(title, message, priority=priority)
        except GotifyError as exc:
            log.warning("notification for %s not delivered: %s", user, exc.code)
        except TimeoutError:
            log.warning("notification for %s not delivered: timed out", user)
        except Exception as exc:  # a notification must never take anything else down
            log.warning("notification for %s not delivered: %s", user, type(exc).__name__)
