"""Password hashing for user accounts (argon2id), kept off the event loop by the callers."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import argon2
from argon2.exceptions import InvalidHashError, VerificationError

MIN_PASSWORD_LENGTH = 8
# argon2 happily hashes megabytes; a cap keeps a login request from becoming a CPU sink.
MAX_PASSWORD_LENGTH = 1024
# argon2id costs tens of milliseconds of CPU and 64 MiB each: run a few at a time, whatever the
# number of callers, and turn callers away once that many are already queued.
MAX_CONCURRENT = 2
MAX_WAITING = 64

T = TypeVar("T")


class PasswordsBusy(Exception):
    """More password checks are queued than ``max_waiting``; try again later."""


class Passwords:
    """Hash and verify passwords; ``verify`` spends the same time for unknown users.

    The ``*_async`` methods run on a pool of ``max_concurrent`` threads of their own, so at
    most that many argon2 computations run at once however many requests ask (a cancelled
    caller cannot free its thread early, as a semaphore around ``to_thread`` would). Callers
    beyond those wait their turn; beyond ``max_waiting`` waiters they get :class:`PasswordsBusy`.
    """

    def __init__(
        self,
        hasher: argon2.PasswordHasher | None = None,
        *,
        max_concurrent: int = MAX_CONCURRENT,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        self._hasher = hasher or argon2.PasswordHasher()
        self.max_concurrent = max_concurrent
        self.max_waiting = max_waiting
        self._pool = ThreadPoolExecutor(max_concurrent, thread_name_prefix="argon2")
        self._queued = 0  # submitted to the pool and not yet answered
        self._running = 0  # inside argon2 now (counted on the pool's threads)
        self._count_lock = threading.Lock()

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, stored_hash: str | None, password: str) -> bool:
        if len(password) > MAX_PASSWORD_LENGTH:
            return False
        if stored_hash is None:
            # Burn the same work as a real check so timing does not reveal which users exist.
            with contextlib.suppress(VerificationError):
                self._hasher.verify(self._decoy_hash, "\x00")
            return False
        try:
            return self._hasher.verify(stored_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    async def hash_async(self, password: str) -> str:
        return await self._on_pool(lambda: self.hash(password))

    async def verify_async(self, stored_hash: str | None, password: str) -> bool:
        return await self._on_pool(lambda: self.verify(stored_hash, password))

    @property
    def running(self) -> int:
        """argon2 computations under way now."""
        return self._running

    @property
    def waiting(self) -> int:
        """Callers waiting for a free thread."""
        return max(0, self._queued - self.max_concurrent)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _on_pool(self, function: Callable[[], T]) -> T:
        if self.waiting >= self.max_waiting:
            raise PasswordsBusy("too many password checks are waiting")
        self._queued += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, self._counted, function)
        finally:
            self._queued -= 1

    def _counted(self, function: Callable[[], T]) -> T:
        with self._count_lock:
            self._running += 1
        try:
            return function()
        finally:
            with self._count_lock:
                self._running -= 1

    @functools.cached_property
    def _decoy_hash(self) -> str:
        return self._hasher.hash("decoy password never used")


def check_password_policy(password: str) -> str | None:
    """Why ``password`` is not acceptable for a new account, or None."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"The password must have at least {MIN_PASSWORD_LENGTH} characters."
    if len(password) > MAX_PASSWORD_LENGTH:
        return f"The password must have at most {MAX_PASSWORD_LENGTH} characters."
    return None
