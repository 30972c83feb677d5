"""Password hashing for user accounts (argon2id), kept off the event loop by the callers."""

from __future__ import annotations

import asyncio
import contextlib
import functools

import argon2
from argon2.exceptions import InvalidHashError, VerificationError

MIN_PASSWORD_LENGTH = 8
# argon2 happily hashes megabytes; a cap keeps a login request from becoming a CPU sink.
MAX_PASSWORD_LENGTH = 1024


class Passwords:
    """Hash and verify passwords; ``verify`` spends the same time for unknown users."""

    def __init__(self, hasher: argon2.PasswordHasher | None = None) -> None:
        self._hasher = hasher or argon2.PasswordHasher()

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
        return await asyncio.to_thread(self.hash, password)

    async def verify_async(self, stored_hash: str | None, password: str) -> bool:
        return await asyncio.to_thread(self.verify, stored_hash, password)

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
