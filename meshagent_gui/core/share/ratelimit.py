"""Send-rate limits: a token bucket in bytes per second, shared by whoever holds it.

`--rate` on one `send` and the global `transfer.rate_limit` are two buckets; a chunk waits for
both. The bucket only makes callers wait (no busy loop, no thread): it is backpressure at the
source, so nothing piles up behind it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Final

from meshagent_gui.errors import UserError

_UNITS: Final = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "KI": 2**10, "MI": 2**20, "GI": 2**30}
_RATE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]I?)?(?:B(?:/S)?|/S)?\s*$", re.IGNORECASE)


def parse_rate(text: str) -> float | None:
    """'5M' -> 5,000,000 bytes/s ('5Mi' binary, '500K', '2.5MB/s'); '' or '0' -> no limit."""
    if not text.strip() or text.strip() == "0":
        return None
    match = _RATE.match(text)
    if match is None:
        raise UserError(
            f"cannot read the rate {text!r}: use bytes per second like 500K, 5M or 1.5G",
            code="bad_rate",
        )
    value = float(match.group(1)) * _UNITS[(match.group(2) or "").upper()]
    if value < 1024:
        raise UserError(f"the rate {text!r} is below 1 KiB/s", code="bad_rate")
    return value


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
