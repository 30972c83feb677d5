"""What progress reports say: a smoothed rate with an ETA, and a transfer's title."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from meshagent_gui.core.protocol import transfer as tp

from .source import SourceEntry


@dataclass
class RateMeter:
    """A smoothed transfer rate and ETA for progress reports."""

    total: int
    started: float = field(default_factory=time.monotonic)
    last_time: float = field(default_factory=time.monotonic)
    last_done: int = 0
    rate: float = 0.0
    done: int = 0  # as last reported

    def update(self, done: int) -> tuple[float, float | None]:
        self.done = done
        now = time.monotonic()
        elapsed = now - self.last_time
        if elapsed >= 0.2:
            instant = (done - self.last_done) / elapsed
            self.rate = instant if self.rate == 0 else 0.7 * self.rate + 0.3 * instant
            self.last_time, self.last_done = now, done
        eta = (self.total - done) / self.rate if self.rate > 0 else None
        return self.rate, eta


def transfer_title(entries: tuple[tp.Entry, ...] | tuple[SourceEntry, ...]) -> str:
    tops = sorted({e.path.split("/", 1)[0] for e in entries})
    return tops[0] if len(tops) == 1 else f"{tops[0]} and {len(tops) - 1} more"
