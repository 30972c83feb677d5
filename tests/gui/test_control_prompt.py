"""The host's consent prompt for a control request: answers, the timeout, cancellation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QMessageBox, QPushButton, QWidget

from meshagent_gui.ui.control_prompt import ask_control


@pytest.fixture
def parent(qtbot: Any) -> QWidget:
    widget = QWidget()
    qtbot.addWidget(widget)
    return widget


def prompt(parent: QWidget, qtbot: Any) -> QMessageBox:
    def shown() -> QMessageBox | None:
        box = parent.findChild(QMessageBox, "control-prompt")
        return box if box is not None and box.isVisible() else None

    qtbot.waitUntil(lambda: shown() is not None)
    box = shown()
    assert box is not None
    return box


def button(box: QMessageBox, text: str) -> QPushButton:
    (found,) = [b for b in box.findChildren(QPushButton) if b.text() == text]
    return found


def gone(parent: QWidget) -> bool:
    return parent.findChild(QMessageBox, "control-prompt") is None


def test_allow_is_a_yes(parent: QWidget, qtbot: Any, qloop: asyncio.AbstractEventLoop) -> None:
    answer = asyncio.ensure_future(ask_control(parent, "alice-laptop", "bash on build-box"))
    box = prompt(parent, qtbot)

    assert "alice-laptop asks to control your shared terminal “bash on build-box”" in box.text()
    assert "Denied automatically in 30 s" in box.informativeText()
    assert not box.isModal()  # the app keeps working while the question is open
    qtbot.mouseClick(button(box, "Allow control"), Qt.MouseButton.LeftButton)

    qtbot.waitUntil(answer.done)
    assert answer.result() is True
    qtbot.waitUntil(lambda: gone(parent))


@pytest.mark.parametrize("how", ["deny", "escape", "close"])
def test_deny_escape_or_closing_is_a_no(
    how: str, parent: QWidget, qtbot: Any, qloop: asyncio.AbstractEventLoop
) -> None:
    answer = asyncio.ensure_future(ask_control(parent, "bob", "zsh"))
    box = prompt(parent, qtbot)

    if how == "deny":
        qtbot.mouseClick(button(box, "Deny"), Qt.MouseButton.LeftButton)
    elif how == "escape":
        qtbot.keyClick(box, Qt.Key.Key_Escape)
    else:
        box.close()

    qtbot.waitUntil(answer.done)
    assert answer.result() is False
    qtbot.waitUntil(lambda: gone(parent))


def test_no_answer_in_time_is_a_no(
    parent: QWidget, qtbot: Any, qloop: asyncio.AbstractEventLoop
) -> None:
    answer = asyncio.ensure_future(ask_control(parent, "carol", "htop", timeout=0.3))
    prompt(parent, qtbot)

    qtbot.waitUntil(answer.done)

    assert answer.result() is False
    qtbot.waitUntil(lambda: gone(parent))


def test_cancelling_the_question_closes_the_dialog(
    parent: QWidget, qtbot: Any, qloop: asyncio.AbstractEventLoop
) -> None:
    answer = asyncio.ensure_future(ask_control(parent, "dave", "bash"))
    prompt(parent, qtbot)

    answer.cancel()

    qtbot.waitUntil(answer.done)
    assert answer.cancelled()
    qtbot.waitUntil(lambda: gone(parent))


def test_names_are_shown_as_plain_text(
    parent: QWidget, qtbot: Any, qloop: asyncio.AbstractEventLoop
) -> None:
    answer = asyncio.ensure_future(ask_control(parent, "<img src=x>", "<b>bash</b>"))
    box = prompt(parent, qtbot)

    assert box.textFormat() == Qt.TextFormat.PlainText
    assert "<img src=x>" in box.text()
    answer.cancel()
    qtbot.waitUntil(answer.done)
