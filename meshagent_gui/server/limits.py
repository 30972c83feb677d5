"""Limits on what a stranger can make the server spend: request bytes and guessing attempts.

:class:`BodyLimit` refuses a request body over the cap before the app reads it (a declared
``Content-Length`` is refused without reading a byte; a chunked body is counted as it arrives,
so at most one chunk past the cap is ever held). :class:`FailureLimiter` reserves a slot
*before* an attempt runs, so concurrent guesses cannot all pass a check made before any of
them failed.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

from starlette.exceptions import HTTPException

MAX_BODY_BYTES: Final = 64 * 1024

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Responder = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once the body passes the cap.

    An HTTPException so that FastAPI's body reading re-raises it as it is (any other exception
    becomes its own 400) and the app's handler answers it with the ApiError body.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than {limit} bytes.")


class BodyLimit:
    """Pure ASGI middleware: HTTP request bodies over ``limit`` bytes answer ``too_large``.

    ``too_large`` is the app's 413 responder (it writes the ApiError body); it is called for a
    declared length over the cap, and for a counted body whose overflow nobody else answered.
    """

    def __init__(self, app: AsgiApp, *, limit: int, too_large: Responder) -> None:
        self.app = app
        self.limit = limit
        self.too_large = too_large

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await self.too_large(scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge:
            if started:
                raise
            await self.too_large(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            # A malformed value never gets this far through uvicorn; be safe anyway: huge.
            return int(value) if value.isdigit() else 2**63
    return None


class Slot:
    """One reserved attempt. ``release()`` when it succeeded; left alone it counts as failed."""

    def __init__(self, entries: deque[float], at: float) -> None:
        self._entries = entries
        self._at = at
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        with contextlib.suppress(ValueError):  # it may have slid out of the window already
            self._entries.remove(self._at)


class FailureLimiter:
    """At most ``max_failures`` failed (or in-flight) attempts per key in a sliding window.

    :meth:`reserve` counts the attempt before it runs and is atomic on the event loop (no
    ``await`` between the check and the count): N concurrent attempts get at most
    ``max_failures`` slots, and the rest are refused at once.
    """

    def __init__(self, max_failures: int = 10, window: float = 300.0) -> None:
        self.max_failures = max_failures
        self.window = window
        self._failures: dict[str, deque[float]] = {}

    def reserve(self, key: str, now: float) -> Slot | None:
        """A slot for one attempt, or None when ``key`` has used up its attempts."""
        if self.blocked(key, now):
            return None
        if len(self._failures) > 100_000:
            self._forget_stale(now)
        entries = self._failures.setdefault(key, deque())
        entries.append(now)
        return Slot(entries, now)

    def blocked(self, key: str, now: float) -> bool:
        failures = self._failures.get(key)
        if failures is None:
            return False
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[key]
            return False
        return len(failures) >= self.max_failures

    def record_failure(self, key: str, now: float) -> None:
        """Count a failure that had no reserved slot (a reservation counts by itself)."""
        self.reserve(key, now)

    def _forget_stale(self, now: float) -> None:
        for key in [k for k, f in self._failures.items() if not f or f[-1] <= now - self.window]:
            del self._failures[key]
