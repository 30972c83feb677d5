from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from meshagent_gui.core.bus import EventBus
from meshagent_gui.core.events import PeerCameOnline
from meshagent_gui.core.mesh.backoff import Backoff


@given(st.integers(min_value=0, max_value=2**32), st.floats(min_value=0.1, max_value=60))
def test_backoff_grows_to_the_cap_with_jitter(seed: int, cap: float) -> None:
    backoff = Backoff(initial=0.5, cap=cap, rng=random.Random(seed))
    delays = [backoff.next_delay() for _ in range(20)]
    assert all(0 < d <= cap for d in delays)
    assert delays[-1] >= cap / 2  # reached the cap
    backoff.reset()
    assert backoff.next_delay() <= 0.5


async def test_slow_subscriber_loses_oldest_not_blocking() -> None:
    bus = EventBus()
    slow = bus.subscribe(maxsize=3)
    with bus.subscribed() as fast:
        for i in range(5):
            bus.publish(PeerCameOnline(str(i), "n"))
        assert [(await fast.get()).device_id for _ in range(5)] == ["0", "1", "2", "3", "4"]  # type: ignore[attr-defined]
    assert slow.dropped == 2
    assert [(await slow.get()).device_id for _ in range(3)] == ["2", "3", "4"]  # type: ignore[attr-defined]
    slow.close()
    bus.publish(PeerCameOnline("x", "n"))
    assert slow.queue.empty()
