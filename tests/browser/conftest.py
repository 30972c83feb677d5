"""Chromium (Debian's, driven by playwright; nothing is downloaded) against the real server and
real agents. One browser and one server per module keep the suite fast."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import AgentHome, Server, agent_homes

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


def sign_in(page: Any, url: str, name: str, user: str = "ann", password: str = PASSWORD) -> None:
    """Enrols ``page`` as the browser device ``name`` with a user's password."""
    page.goto(url + "/app/")
    page.fill("#device-name", name)
    page.fill("#login-password [name=username]", user)
    page.fill("#login-password [name=password]", password)
    page.click("#login-password button")


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
    with agent_homes(tmp_path_factory.mktemp("agents")) as factory:
        yield factory
