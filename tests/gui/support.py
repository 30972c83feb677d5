"""Helpers for the GUI tests."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(qtbot: Any, coro: Coroutine[Any, Any, T], timeout: float = 20) -> T:
    """Run a coroutine on the (already running) qasync loop while Qt spins."""
    task = asyncio.ensure_future(coro)
    qtbot.waitUntil(task.done, timeout=round(timeout * 1000))
    return task.result()
