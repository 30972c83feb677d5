"""The replay log: the window kept for resumes and the sizes in force in it."""

from __future__ import annotations

from meshagent_gui.core.terminal.replay import ReplayLog
from meshagent_gui.core.terminal.screen import WindowSize


def test_the_log_keeps_the_last_bytes_and_replays_from_inside_them() -> None:
    log = ReplayLog(10, WindowSize(80, 24))
    for offset in range(0, 20, 4):
        log.append(offset, bytes([65 + offset // 4]) * 4)
    assert (log.start, log.end) == (12, 20)  # at least the last 10 bytes, whole chunks
    assert log.replay(11) is None and log.replay(21) is None
    assert log.replay(14) == ([WindowSize(80, 24), (14, b"DD"), (16, b"EEEE")], 6)
    assert log.replay(20) == ([WindowSize(80, 24)], 0)


def test_size_changes_are_replayed_in_order_and_forgotten_with_their_output() -> None:
    log = ReplayLog(100, WindowSize(80, 24))
    log.append(0, b"a" * 10)
    log.resized(10, WindowSize(100, 30))
    log.append(10, b"b" * 10)
    log.resized(20, WindowSize(120, 40))
    items, total = log.replay(5) or ([], 0)
    assert total == 15
    assert items == [
        WindowSize(80, 24),
        (5, b"a" * 5),
        WindowSize(100, 30),
        (10, b"b" * 10),
        WindowSize(120, 40),
    ]
    assert log.replay(10) == ([WindowSize(100, 30), (10, b"b" * 10), WindowSize(120, 40)], 10)
    small = ReplayLog(10, WindowSize(80, 24))
    small.append(0, b"a" * 10)
    small.resized(10, WindowSize(100, 30))
    small.append(10, b"b" * 10)
    assert small.replay(10) == ([WindowSize(100, 30), (10, b"b" * 10)], 10)
