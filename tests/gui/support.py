"""Helpers for the GUI tests."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(qtbot: Any, coro: Coroutine[Any, Any, T], timeout: float = 20) -> T:
    """Run a coroutine on the (already running) qasync loop while Qt spins."""
    task = asyncio.ensure_future(coro)
    qtbot.waitUntil(task.done, timeout=round(timeout * 1000))
    return task.result()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
