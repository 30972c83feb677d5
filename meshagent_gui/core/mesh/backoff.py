"""Reconnect delays: exponential with full jitter, capped (pure; the caller sleeps)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    initial: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self) -> float:
        """The next wait: uniform in [base/2, base] so that a fleet of agents spreads out."""
        base = min(self.cap, self.initial * self.factor**self.attempt)
        self.attempt += 1
        return base / 2 + self.rng.random() * base / 2

    def reset(self) -> None:
        self.attempt = 0
