"""Send-rate limits: a token bucket in bytes per second, shared by whoever holds it.

`--rate` on one `send` and the global `transfer.rate_limit` are two buckets; a chunk waits for
both. The bucket only makes callers wait (no busy loop, no thread): it is backpressure at the
source, so nothing piles up behind it. A rate as the user writes it (`5M`) is read by
`config.parse_rate`, with the settings it validates.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence


class TokenBucket:
    """At most ``rate`` bytes per second on average, bursts up to ``burst`` bytes."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        # A burst of ~50 ms keeps the average exact without making big chunks wait long.
        self.burst = burst if burst is not None else max(rate / 20, 64 * 1024)
        loop = asyncio.get_running_loop()
        self._tokens = self.burst
        self._stamp = loop.time()
        self._lock = asyncio.Lock()

    async def take(self, amount: int) -> None:
        """Wait until ``amount`` bytes may go (amounts above the burst go into debt)."""
        async with self._lock:  # first come, first served
            loop = asyncio.get_running_loop()
            now = loop.time()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= amount
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)


async def take_all(buckets: Sequence[TokenBucket], amount: int) -> None:
    for bucket in buckets:
        await bucket.take(amount)
