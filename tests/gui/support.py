"""Helpers for the GUI tests."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from PySide6.QtWidgets import QApplication

from meshagent_gui.ui.offers import OfferDialog
from tests.integration.harness import BASE_ENV, AgentHome, meshagent_cmd

T = TypeVar("T")


def run(qtbot: Any, coro: Coroutine[Any, Any, T], timeout: float = 20) -> T:
    """Run a coroutine on the (already running) qasync loop while Qt spins."""
    task = asyncio.ensure_future(coro)
    qtbot.waitUntil(task.done, timeout=round(timeout * 1000))
    return task.result()


def offer_dialog() -> OfferDialog | None:
    """The offer dialog on screen, if any."""
    for widget in QApplication.topLevelWidgets():
        if isinstance(widget, OfferDialog) and widget.isVisible():
            return widget
    return None


def send_from(sender: AgentHome, path: Path, to: str = "desk") -> subprocess.Popen[str]:
    """`meshagent send PATH --to desk` from ``sender``'s home, running."""
    return subprocess.Popen(
        meshagent_cmd("--home", str(sender.home), "send", str(path), "--to", to),
        env=BASE_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
