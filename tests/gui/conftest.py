"""GUI tests: offscreen Qt, any Qt warning fails the test, a qasync loop per test.

The qasync loop is created "already running": pytest-qt's waits (qtbot.waitUntil) spin the Qt
event loop, and asyncio callbacks run from it, so tests drive real widgets and the real agent
core on one thread, as the app does.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before any Qt import

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import qasync
from PySide6.QtCore import QMessageLogContext, QtMsgType, qInstallMessageHandler
from PySide6.QtWidgets import QApplication

from meshagent_gui.context import Context
from tests.integration.harness import AgentHome, Server, free_port

_FAILING = {QtMsgType.QtWarningMsg, QtMsgType.QtCriticalMsg, QtMsgType.QtFatalMsg}
# The offscreen platform says so when asked for what only a window system can do (raise a
# window, pass size hints to a window manager); those are facts about the platform, not bugs.
_OFFSCREEN_NOTICE = "This plugin does not support "


@pytest.fixture(autouse=True)
def gui_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Per test, not at import: the rest of the suite must not inherit these.
    monkeypatch.setenv("MESHAGENT_SECRET_STORE", "file")
    monkeypatch.setenv("MESHAGENT_NO_OPEN", "1")  # "Open folder" must not launch a file manager


@pytest.fixture(autouse=True)
def fail_on_qt_warnings(qapp: QApplication) -> Iterator[list[str]]:
    """Record every Qt warning; the test fails if there was any."""
    recorded: list[str] = []

    def handler(kind: QtMsgType, context: QMessageLogContext, message: str) -> None:
        offscreen = QApplication.platformName() == "offscreen"
        if offscreen and message.startswith(_OFFSCREEN_NOTICE):
            return
        if kind in _FAILING:
            recorded.append(f"{kind.name}: {message} ({context.file}:{context.line})")

    previous = qInstallMessageHandler(handler)
    try:
        yield recorded
    finally:
        qInstallMessageHandler(previous)
    assert not recorded, "Qt warnings:\n" + "\n".join(recorded)


@pytest.fixture
def qloop(qapp: QApplication, qtbot: Any) -> Iterator[asyncio.AbstractEventLoop]:
    loop = qasync.QEventLoop(qapp, already_running=True)
    try:
        yield loop
    finally:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            qtbot.waitUntil(lambda: all(t.done() for t in pending), timeout=15_000)
        # Not loop.stop(): it calls QApplication.exit(), which would end the next test's waits.
        loop._QEventLoop__is_running = False  # type: ignore[attr-defined]
        loop._after_run_forever()
        asyncio.events._set_running_loop(None)
        loop.close()


@pytest.fixture
def gui_home(tmp_path: Path) -> Context:
    ctx = Context.open(tmp_path / "gui")
    ctx.config.set("server.reconnect_max", 1.0)
    ctx.config.set("device.name", "desk")
    ctx.config.set("local.port", free_port())
    ctx.config.save()
    return ctx


@pytest.fixture
def mesh(gui_home: Context, server: Server, make_agent) -> tuple[Server, AgentHome]:  # type: ignore[no-untyped-def]
    """The reference server, ann's laptop (a real `meshagent up`) and the app's home (desk),
    enrolled as ann's."""
    server.add_user("ann")
    receiver: AgentHome = make_agent("laptop")
    receiver.login(server, server.join_code("ann"))
    receiver.up()
    assert gui_home.paths.home is not None
    home = AgentHome(gui_home.paths.home, receiver.logs, "desk")
    home.ok("login", server.url, "--join-code", server.join_code("ann"), "--name", "desk")
    gui_home.config = Context.open(gui_home.paths.home).config
    return server, receiver


@pytest.fixture
def bob_and_desk(gui_home: Context, server: Server, make_agent) -> AgentHome:  # type: ignore[no-untyped-def]
    """bob's laptop (a real `meshagent up`) and ann's desk (the app) share the room `team`:
    bob's offers ask ann first."""
    server.add_user("ann")
    server.add_user("bob")
    bob: AgentHome = make_agent("bobs-laptop")
    bob.login(server, server.join_code("bob", room="team"))
    bob.up()
    assert gui_home.paths.home is not None
    desk = AgentHome(gui_home.paths.home, bob.logs, "desk")
    desk.ok("login", server.url, "--join-code", server.join_code("ann", room="team"))
    return bob
