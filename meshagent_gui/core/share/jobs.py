"""The disk work of one incoming transfer: jobs bounded per kind, results handed back in order.

The receiver's pump never waits on the disk for a message: it starts a job (a chunk write, a
batch of small files, a file's finish) and reads on. A job's result is not acted on where the
job ran but given back to the pump (:meth:`DiskJobs.handle_finished`), which handles it between
two messages: so every message to the sender still goes out from one place, in order.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

JobDone = Callable[[asyncio.Future[Any]], Awaitable[None]]
"""What to do with a finished job (its future: a result or an exception)."""


class DiskJobs:
    def __init__(self, limits: Mapping[str, int]) -> None:
        self._limits = dict(limits)
        self._running = dict.fromkeys(limits, 0)
        self._jobs: set[asyncio.Future[Any]] = set()
        self._finished: deque[tuple[asyncio.Future[Any], JobDone]] = deque()
        self._any_finished = asyncio.Event()

    @property
    def running(self) -> bool:
        return bool(self._jobs)

    @property
    def has_finished(self) -> bool:
        """A job has finished and its result is not handled yet."""
        return bool(self._finished)

    @property
    def busy(self) -> bool:
        return self.running or self.has_finished

    def start(self, kind: str, work: Awaitable[Any], done: JobDone) -> None:
        """Run ``work``; ``done`` gets it from :meth:`handle_finished` once it has finished."""
        job = asyncio.ensure_future(work)
        self._jobs.add(job)
        self._running[kind] += 1

        def finished(job: asyncio.Future[Any]) -> None:
            self._jobs.discard(job)
            self._running[kind] -= 1
            self._finished.append((job, done))
            self._any_finished.set()

        job.add_done_callback(finished)

    async def wait_finished(self) -> None:
        """Until a job has finished (at once if one has and is not handled yet)."""
        while not self._finished:
            self._any_finished.clear()
            await self._any_finished.wait()

    async def handle_finished(self) -> bool:
        """Hand each finished job to its ``done``, in the order they finished; False if none."""
        if not self._finished:
            return False
        while self._finished:
            job, done = self._finished.popleft()
            await done(job)
        return True

    async def room_for(self, kind: str) -> None:
        """Wait until fewer than the limit of ``kind`` jobs run (handling what finished)."""
        while self._running[kind] >= self._limits[kind]:
            await self.wait_finished()
            await self.handle_finished()

    async def wait_all(self) -> None:
        """Let every running job end (they use files about to be closed); drop the results."""
        if self._jobs:
            await asyncio.wait(set(self._jobs))
        self._finished.clear()
