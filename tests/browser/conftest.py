"""Chromium (Debian's, driven by playwright; nothing is downloaded) against the real server and
real agents. One browser and one server per module keep the suite fast."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import AgentHome, Server

CHROMIUM = os.environ.get("MESHAGENT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # WebRTC on loopback: real host candidates instead of mDNS names nothing here resolves.
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--allow-loopback-in-peer-connection",
]
PASSWORD = "correct horse battery"


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, as .ci/run does)"
    return None


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    reason = chromium_missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def web_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("web")
    logs = root / "logs"
    logs.mkdir()
    running = Server(root / "server", logs).start()
    running.add_user("ann", PASSWORD)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def module_agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., AgentHome]]:
    root = tmp_path_factory.mktemp("agents")
    (root / "logs").mkdir()
    made: list[AgentHome] = []

    def factory(name: str, **config: str) -> AgentHome:
        agent = AgentHome(
            root / name,
            root / "logs",
            name,
            config={"server.reconnect_max": "1", "device.name": name, **config},
        )
        made.append(agent)
        return agent

    try:
        yield factory
    finally:
        for agent in made:
            agent.stop()
