from __future__ import annotations

import asyncio
import random

from hypothesis import given
from hypothesis import strategies as st

from meshagent_gui.core.bus import EventBus
from meshagent_gui.core.events import (
    ControlRequested,
    Event,
    PeerCameOnline,
    TransferFailed,
    TransferOffered,
    TransferProgressed,
)
from meshagent_gui.core.mesh.backoff import Backoff


@given(st.integers(min_value=0, max_value=2**32), st.floats(min_value=0.1, max_value=60))
def test_backoff_grows_to_the_cap_with_jitter(seed: int, cap: float) -> None:
    backoff = Backoff(initial=0.5, cap=cap, rng=random.Random(seed))
    delays = [backoff.next_delay() for _ in range(20)]
    assert all(0 < d <= cap for d in delays)
    assert delays[-1] >= cap / 2  # reached the cap
    backoff.reset()
    assert backoff.next_delay() <= 0.5


async def test_a_lagging_subscriber_gets_every_event_in_order_without_blocking() -> None:
    bus = EventBus()
    slow = bus.subscribe(maxsize=3)
    with bus.subscribed() as fast:
        for i in range(5):
            bus.publish(PeerCameOnline(str(i), "n"))
        assert [(await fast.get()).device_id for _ in range(5)] == ["0", "1", "2", "3", "4"]  # type: ignore[attr-defined]
    assert slow.dropped == 0 and slow.pending() == 5
    assert [(await slow.get()).device_id for _ in range(5)] == ["0", "1", "2", "3", "4"]  # type: ignore[attr-defined]
    slow.close()
    bus.publish(PeerCameOnline("x", "n"))
    assert slow.pending() == 0


def _progress(transfer_id: str, done: int, direction: str = "receive") -> TransferProgressed:
    return TransferProgressed(transfer_id, direction, "peer", "name", done, 100, 1.0, None)


async def test_one_off_events_are_never_dropped_progress_keeps_its_newest_per_transfer() -> None:
    """A subscriber far behind: the offer, the failure and the control request all arrive (a
    lost offer would decline it by silence); of each transfer's progress, only the newest."""
    bus = EventBus()
    with bus.subscribed(maxsize=2) as slow:
        offered = TransferOffered("t1", "peer", "desk", ("a.txt",), 1, 100, False)
        bus.publish(offered)
        for done in range(0, 100, 10):
            bus.publish(_progress("t1", done))
            bus.publish(_progress("t2", done))
            bus.publish(_progress("t1", done, direction="send"))
        asked = ControlRequested("session", "device", "desk")
        bus.publish(asked)
        bus.publish(_progress("t1", 100))
        failed = TransferFailed("t2", "b.txt", "peer", "cut off")
        bus.publish(failed)
        got: list[Event] = []
        while (event := slow.get_nowait()) is not None:
            got.append(event)
    assert got == [
        offered,
        _progress("t2", 90),
        _progress("t1", 90, direction="send"),
        asked,
        _progress("t1", 100),
        failed,
    ]
    assert slow.dropped == 3 * 10 + 1 - 3  # published, less the three kept
    assert all(type(event).lossy is (type(event) is TransferProgressed) for event in got)


async def test_a_waiting_reader_wakes_for_the_next_event() -> None:
    bus = EventBus()
    with bus.subscribed() as events:
        reading = asyncio.ensure_future(events.get())
        await asyncio.sleep(0)
        assert not reading.done()
        bus.publish(PeerCameOnline("a", "n"))
        assert (await reading) == PeerCameOnline("a", "n")
