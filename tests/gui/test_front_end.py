"""The app composes the core's Agent, it does not subclass it: what the app adds (the ``show``
request of a second launch, its desktop toasts) goes in at construction, through FrontEnd."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import pkgutil
from typing import Any

import meshagent_gui.ui
from meshagent_gui.context import Context
from meshagent_gui.core.agent import Agent, FrontEnd
from meshagent_gui.core.ipc import invoke
from meshagent_gui.core.ipc_types import NoParams
from meshagent_gui.core.mesh.client import Enrollment
from meshagent_gui.core.notify.router import Notification
from meshagent_gui.ui.bridge import AgentBridge


class Recorder:
    def __init__(self) -> None:
        self.received: list[Notification] = []

    async def deliver(self, notification: Notification) -> None:
        self.received.append(notification)


def _enrol(ctx: Context) -> Enrollment:
    enrollment = Enrollment("http://127.0.0.1:9", "server-1", "ab" * 32, "ann")
    enrollment.save(ctx.paths.data_dir)
    return enrollment


def _close(agent: Agent) -> None:
    agent.transfers.close()
    asyncio.run(agent.client.aclose())


async def _answer(agent: Agent, method: str) -> Any:
    outcome = invoke(agent.ipc_handlers()[method], NoParams())
    return await outcome if inspect.isawaitable(outcome) else outcome


def test_the_app_composes_a_plain_agent_with_its_front_end(qtbot: Any, gui_home: Context) -> None:
    _enrol(gui_home)
    bridge = AgentBridge(gui_home)
    toasts = Recorder()
    agent = bridge.make_agent(gui_home, notification_sinks=[toasts])
    try:
        assert type(agent) is Agent
        assert agent.notification_sinks == [toasts]
        with qtbot.waitSignal(bridge.show_requested, timeout=2000):
            assert asyncio.run(_answer(agent, "show")) == {"shown": True}
    finally:
        _close(agent)


def test_a_headless_agent_has_no_show_request(gui_home: Context) -> None:
    """`meshagent up` has no window: a second launch of the app hears bad_request and says so."""
    agent = Agent(gui_home, _enrol(gui_home))
    try:
        assert agent.front_end == FrontEnd()
        assert "show" not in agent.ipc_handlers() and agent.notification_sinks == []
    finally:
        _close(agent)


def test_no_ui_class_subclasses_the_agent() -> None:
    for info in pkgutil.iter_modules(meshagent_gui.ui.__path__, "meshagent_gui.ui."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if inspect.isclass(value) and value is not Agent:
                assert not issubclass(value, Agent), f"{info.name}.{name} subclasses Agent"
