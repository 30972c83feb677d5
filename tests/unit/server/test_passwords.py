"""server/passwords.py: argon2 runs at most two at a time; callers beyond that wait or are
turned away, however many ask at once."""

from __future__ import annotations

import asyncio
import threading

import argon2
import pytest

from meshagent_gui.server.passwords import Passwords, PasswordsBusy


class _Gate:
    """A hasher whose ``verify`` blocks until opened, reporting each entry to the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.entered = asyncio.Queue[int]()
        self.open = threading.Event()
        self._inside = 0
        self.most_inside = 0
        self._lock = threading.Lock()

    def verify(self, stored_hash: str, password: str) -> bool:
        with self._lock:
            self._inside += 1
            self.most_inside = max(self.most_inside, self._inside)
        self.loop.call_soon_threadsafe(self.entered.put_nowait, 1)
        try:
            assert self.open.wait(timeout=30)  # a bound on a broken test, not a pacing sleep
            return password == "right"
        finally:
            with self._lock:
                self._inside -= 1


def _passwords(gate: _Gate, max_waiting: int = 64) -> Passwords:
    passwords = Passwords(max_waiting=max_waiting)
    passwords._hasher = gate  # type: ignore[assignment]
    return passwords


async def _entries(gate: _Gate, count: int) -> None:
    for _ in range(count):
        await asyncio.wait_for(gate.entered.get(), timeout=30)


async def test_two_verifications_run_and_the_rest_wait() -> None:
    gate = _Gate(asyncio.get_running_loop())
    passwords = _passwords(gate)
    tasks = [asyncio.create_task(passwords.verify_async("hash", "right")) for _ in range(6)]
    await _entries(gate, 2)
    assert passwords.running == 2 and passwords.waiting == 4
    gate.open.set()
    assert await asyncio.gather(*tasks) == [True] * 6
    assert gate.most_inside == 2 and passwords.running == passwords.waiting == 0


async def test_callers_beyond_the_queue_are_turned_away() -> None:
    gate = _Gate(asyncio.get_running_loop())
    passwords = _passwords(gate, max_waiting=1)
    running = [asyncio.create_task(passwords.verify_async("hash", "x")) for _ in range(2)]
    await _entries(gate, 2)
    queued = asyncio.create_task(passwords.verify_async("hash", "x"))
    await asyncio.sleep(0)  # let it take its place in the queue
    assert passwords.waiting == 1
    with pytest.raises(PasswordsBusy):
        await passwords.verify_async("hash", "x")
    gate.open.set()
    assert await asyncio.gather(*running, queued) == [False] * 3


async def test_a_cancelled_caller_keeps_its_thread_until_argon2_ends() -> None:
    gate = _Gate(asyncio.get_running_loop())
    passwords = _passwords(gate)
    first = [asyncio.create_task(passwords.verify_async("hash", "x")) for _ in range(2)]
    await _entries(gate, 2)
    for task in first:
        task.cancel()
    later = [asyncio.create_task(passwords.verify_async("hash", "right")) for _ in range(2)]
    await asyncio.sleep(0)
    assert gate.entered.empty()  # the two cancelled computations still hold both threads
    gate.open.set()
    assert await asyncio.gather(*later) == [True, True]
    assert gate.most_inside == 2


async def test_real_argon2_through_the_pool() -> None:
    passwords = Passwords(argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST))
    stored = await passwords.hash_async("correct horse")
    assert await passwords.verify_async(stored, "correct horse")
    assert not await passwords.verify_async(stored, "wrong")
    assert not await passwords.verify_async(None, "anything")
    passwords.close()
