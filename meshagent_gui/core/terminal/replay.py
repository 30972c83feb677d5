"""The output a session keeps for resumes: the last bytes with their offsets, and the sizes in
force, so a viewer that reconnects gets what it missed instead of a fresh snapshot."""

from __future__ import annotations

from collections import deque
from typing import TypeAlias

from meshagent_gui.core.terminal.screen import WindowSize

Chunk: TypeAlias = tuple[int, bytes]
"""A piece of output and the offset of its first byte."""


class ReplayLog:
    """The last ``capacity`` bytes of output with their offsets, and the sizes in force."""

    def __init__(self, capacity: int, size: WindowSize) -> None:
        self._capacity = capacity
        self._chunks: deque[Chunk] = deque()
        self._bytes = 0
        self._start = 0
        self._end = 0
        self._sizes: deque[tuple[int, WindowSize]] = deque([(0, size)])

    @property
    def start(self) -> int:
        """The oldest offset a viewer can resume from."""
        return self._start

    @property
    def end(self) -> int:
        """The offset after the last byte kept."""
        return self._end

    def append(self, offset: int, data: bytes) -> None:
        self._chunks.append((offset, data))
        self._bytes += len(data)
        self._end = offset + len(data)
        while self._bytes > self._capacity and len(self._chunks) > 1:
            _, old = self._chunks.popleft()
            self._bytes -= len(old)
            self._start = self._chunks[0][0]
        while len(self._sizes) > 1 and self._sizes[1][0] <= self._start:
            self._sizes.popleft()

    def resized(self, offset: int, size: WindowSize) -> None:
        self._sizes.append((offset, size))

    def replay(self, offset: int) -> tuple[list[Chunk | WindowSize], int] | None:
        """What a viewer resuming at ``offset`` needs (output and size changes in order) and
        the bytes of output in it; None if that is outside the log."""
        if not self._start <= offset <= self._end:
            return None
        size = self._sizes[0][1]
        for at, recorded in self._sizes:
            if at <= offset:
                size = recorded
        items: list[Chunk | WindowSize] = [size]
        later_sizes = deque((at, s) for at, s in self._sizes if at > offset)
        total = 0
        for start, data in self._chunks:
            end = start + len(data)
            if end <= offset:
                continue
            while later_sizes and later_sizes[0][0] <= start:
                items.append(later_sizes.popleft()[1])
            piece = data[offset - start :] if start < offset else data
            items.append((max(start, offset), piece))
            total += len(piece)
        items.extend(s for _, s in later_sizes)
        return items, total
