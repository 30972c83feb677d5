"""One viewer's queue without a PTY: coalescing, resyncs, floods, the end, and its narrow owner."""

from __future__ import annotations

import pytest

from meshagent_gui.core.protocol.terminal import (
    ControlDenied,
    ControlState,
    Ended,
    HostMessage,
    Output,
    Resize,
    Snapshot,
)
from meshagent_gui.core.terminal.viewer import MESSAGE_COST, Viewer, ViewerClosed

SNAPSHOT = Snapshot(0, 80, 24, True, b"screen")


class Owner:
    """What a host gives its viewers, and nothing more."""

    def __init__(self) -> None:
        self.snapshots = 0
        self.detached: list[Viewer] = []
        self.allowed: set[int] = set()

    def snapshot_for(self, viewer: Viewer) -> list[HostMessage]:
        self.snapshots += 1
        return [SNAPSHOT, ControlState(None, 0, False)]

    def detach(self, viewer: Viewer) -> None:
        self.detached.append(viewer)
        viewer.discard()

    def may_control(self, viewer: Viewer) -> bool:
        return viewer.seat in self.allowed

    def allow_control(self, viewer: Viewer) -> None:
        self.allowed.add(viewer.seat)


def make(owner: Owner, queue_bytes: int = 1000, message_bytes: int = 100) -> Viewer:
    return Viewer(owner, "v", 7, None, queue_bytes=queue_bytes, message_bytes=message_bytes)


def drain(viewer: Viewer) -> list[HostMessage]:
    out = []
    while (message := viewer.next_nowait()) is not None:
        out.append(message)
    return out


def test_a_new_viewer_starts_with_a_snapshot_a_resumed_one_with_its_replay() -> None:
    owner = Owner()
    fresh = make(owner)
    assert fresh.awaiting_snapshot
    assert fresh.push_output(0, b"covered by the snapshot") is False
    assert drain(fresh) == [SNAPSHOT, ControlState(None, 0, False)]
    resumed = make(owner)
    assert resumed.resume([Resize(80, 24), (5, b"abc"), (8, b"def")], 6) is False
    assert not resumed.awaiting_snapshot and resumed.queued_bytes == 6 + MESSAGE_COST
    assert drain(resumed) == [Resize(80, 24), Output(5, b"abcdef")]
    assert owner.snapshots == 1 and resumed.queued_bytes == 0


def test_output_is_coalesced_up_to_the_message_size_and_split_beyond() -> None:
    viewer = make(Owner(), message_bytes=10)
    viewer.resume([], 0)
    for offset in range(0, 12, 3):
        viewer.push_output(offset, b"x" * 3)
    viewer.push_output(12, b"y" * 25)
    out = drain(viewer)
    assert [(m.offset, bytes(m.data)) for m in out if isinstance(m, Output)] == [
        (0, b"xxxxxxxxxx"),
        (10, b"xxyyyyyyyy"),
        (20, b"yyyyyyyyyy"),
        (30, b"yyyyyyy"),
    ]
    assert viewer.queued_bytes == 0


def test_a_viewer_that_falls_behind_gets_a_fresh_snapshot() -> None:
    owner = Owner()
    viewer = make(owner, queue_bytes=100)
    viewer.resume([], 0)
    assert viewer.push_output(0, b"a" * 60) is False
    assert viewer.push_output(60, b"b" * 60) is True  # over the bound: dropped, snapshot due
    assert viewer.resyncs == 1 and viewer.queued_bytes == 0 and viewer.awaiting_snapshot
    assert viewer.push(Resize(100, 30)) is False  # the snapshot carries the size
    assert drain(viewer) == [SNAPSHOT, ControlState(None, 0, False)]


def test_a_party_that_never_reads_cannot_grow_its_queue() -> None:
    viewer = make(Owner(), queue_bytes=10 * MESSAGE_COST)
    viewer.resume([], 0)
    behind = [viewer.push(ControlDenied("no")) for _ in range(10_000)]
    assert viewer.queued_bytes <= 10 * MESSAGE_COST and sum(behind) >= 1


def test_held_during_a_flood_then_one_snapshot() -> None:
    owner = Owner()
    viewer = make(owner)
    viewer.resume([], 0)
    viewer.push_output(0, b"old")
    viewer.push(ControlDenied("busy"))
    viewer.hold()
    assert viewer.awaiting_snapshot and not viewer.wants_frame  # the refusal is still queued
    assert viewer.next_nowait() == ControlDenied("busy")  # messages pass, output was dropped
    assert viewer.next_nowait() is None and viewer.wants_frame
    viewer.frame([SNAPSHOT])  # a picture of the screen while it floods
    assert viewer.next_nowait() == SNAPSHOT and viewer.next_nowait() is None
    assert owner.snapshots == 0
    viewer.release()
    assert drain(viewer) == [SNAPSHOT, ControlState(None, 0, False)] and owner.snapshots == 1


async def test_ended_comes_last_and_closing_ends_iteration() -> None:
    owner = Owner()
    viewer = make(owner)
    viewer.resume([], 0)
    viewer.push_output(0, b"bye")
    viewer.end(Ended(0))
    assert [m async for m in viewer] == [Output(0, b"bye"), Ended(0)]
    other = make(owner)
    other.close()
    assert owner.detached == [other] and other.closed
    assert [m async for m in other] == []
    with pytest.raises(ViewerClosed):
        await other.next()


def test_the_right_to_control_lives_with_the_owner() -> None:
    owner = Owner()
    viewer = make(owner)
    assert not viewer.can_control
    viewer.can_control = False  # already so: nothing
    viewer.can_control = True
    assert viewer.can_control and owner.allowed == {7}
    with pytest.raises(ValueError):
        viewer.can_control = False
