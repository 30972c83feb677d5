"""Fan-out of core events to any number of subscribers (UI, CLI, notification router).

Publishing never blocks the core: each subscriber has a bounded queue, and one that falls
behind loses its oldest events (counted) rather than holding everyone up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

from .events import Event

log = logging.getLogger(__name__)


class Subscription:
    def __init__(self, bus: EventBus, maxsize: int) -> None:
        self._bus = bus
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.dropped = 0

    def offer(self, event: Event) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)

    async def get(self) -> Event:
        return await self.queue.get()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            yield await self.queue.get()

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
