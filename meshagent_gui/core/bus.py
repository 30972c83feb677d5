"""Fan-out of core events to any number of subscribers (UI, CLI, notification router).

Publishing never blocks the core, and never loses a one-off event: an offer, a completion, a
failure, a control request reaches every subscriber however far behind it is (a lost
``TransferOffered`` would decline the offer by silence). What a lagging subscriber may miss is
declared on the event class (:attr:`Event.lossy`): a running state such as progress, of which
a subscriber that has not read the last one gets only the newest, per :attr:`Event.subject`.
So a subscriber's backlog holds its unread one-off events plus one progress per transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterator

from .events import Event

log = logging.getLogger(__name__)


class Subscription:
    def __init__(self, bus: EventBus, maxsize: int) -> None:
        self._bus = bus
        self.maxsize = maxsize
        """A backlog above this many events is logged (once per time it grows past it)."""
        self._queue: deque[Event] = deque()
        self._lossy: dict[object, Event] = {}  # per subject: the one in the queue
        self._ready = asyncio.Event()
        self._over = False
        self.dropped = 0
        """Lossy events replaced by a newer one before this subscriber read them."""

    def offer(self, event: Event) -> None:
        if event.lossy:
            older = self._lossy.pop(event.subject, None)
            if older is not None:
                # The newest takes the older one's place at the end: after every event
                # published before it, so progress never comes after its transfer's end.
                self._queue.remove(older)
                self.dropped += 1
            self._lossy[event.subject] = event
        self._queue.append(event)
        self._ready.set()
        if len(self._queue) > self.maxsize and not self._over:
            self._over = True
            log.warning(
                "an event subscriber lags: %d events wait for it (none is dropped)",
                len(self._queue),
            )

    def pending(self) -> int:
        """Events published and not read yet."""
        return len(self._queue)

    def get_nowait(self) -> Event | None:
        """The next event if one waits, else None."""
        if not self._queue:
            return None
        event = self._queue.popleft()
        if event.lossy and self._lossy.get(event.subject) is event:
            del self._lossy[event.subject]
        if len(self._queue) <= self.maxsize // 2:
            self._over = False
        return event

    async def get(self) -> Event:
        while True:
            event = self.get_nowait()
            if event is not None:
                return event
            self._ready.clear()
            await self._ready.wait()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            yield await self.get()

    def close(self) -> None:
        self._bus.unsubscribe(self)


class EventBus:
    def __init__(self) -> None:
        self._subscriptions: list[Subscription] = []

    def publish(self, event: Event) -> None:
        log.debug("event %s", type(event).__name__)
        for subscription in self._subscriptions:
            subscription.offer(event)

    def subscribe(self, maxsize: int = 1000) -> Subscription:
        subscription = Subscription(self, maxsize)
        self._subscriptions.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subscriptions.remove(subscription)

    @contextlib.contextmanager
    def subscribed(self, maxsize: int = 1000) -> Iterator[Subscription]:
        subscription = self.subscribe(maxsize)
        try:
            yield subscription
        finally:
            subscription.close()
