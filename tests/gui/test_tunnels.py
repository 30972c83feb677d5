"""The Tunnels window with real agents (issue 16): the app (ann's `desk`) exposes an echo
service, ann's `laptop` (a real `meshagent up`) exposes one too and forwards to the desk's, and
opens a shell on the desk; the window lists each and its Stop ends each.

One test: every step needs the same server, agents and running app (a GUI test's loop is per
test), and each step builds on the one before.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from meshagent_gui.config import Paths
from meshagent_gui.context import Context
from meshagent_gui.core import ipc
from meshagent_gui.ui.main_window import MainWindow
from meshagent_gui.ui.tunnels import TunnelRow, TunnelsWindow
from tests.integration.harness import AgentHome, Server
from tests.integration.test_tunnel import EchoHandler, EchoServer, start_forward

from .support import run
from .test_terminal_flow import started, stopped


@pytest.fixture
def echo_port() -> Iterator[int]:
    echo = EchoServer(("127.0.0.1", 0), EchoHandler)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    try:
        yield echo.server_address[1]
    finally:
        echo.shutdown()
        echo.server_close()


def rows_of(window: TunnelsWindow, kind: str) -> list[TunnelRow]:
    window.refresh()
    return [row for row in window.rows if row.kind == kind]


def received(qtbot: Any, sock: socket.socket) -> bytes:
    """What the socket has, waiting with Qt spinning: the app's agent runs on this thread, so a
    blocking recv would stall the very tunnel it waits for."""
    qtbot.waitUntil(lambda: bool(select.select([sock], [], [], 0)[0]), timeout=15_000)
    return sock.recv(65536)


def stop_button(window: TunnelsWindow, row: TunnelRow) -> Any:
    return window.table.cellWidget(window.rows.index(row), 4)


def test_the_window_lists_each_tunnel_and_stops_each(
    qtbot: Any,
    qloop: asyncio.AbstractEventLoop,
    gui_home: Context,
    mesh: tuple[Server, AgentHome],
    echo_port: int,
) -> None:
    _, laptop = mesh
    target = f"127.0.0.1:{echo_port}"
    gui_home.config.set("tunnel.expose", target)
    gui_home.config.set("terminal.allow_open", "own")
    gui_home.config.save()
    gui, task = started(qtbot, gui_home)
    processes = []
    try:
        main = gui.window
        assert isinstance(main, MainWindow)
        window = main.open_tunnels()
        qtbot.addWidget(window)
        [exposed] = rows_of(window, "exposed")
        assert (exposed.target, exposed.details) == (target, "for your own devices")

        # The laptop exposes a port: its announcement reaches the app before any connection.
        laptop.ok("expose", "7")
        qtbot.waitUntil(lambda: bool(rows_of(window, "available")), timeout=15_000)
        [offered] = rows_of(window, "available")
        assert (offered.device, offered.target, offered.stop_id) == ("laptop", "localhost:7", "")
        assert stop_button(window, offered) is None  # a peer's offer is not ours to stop

        # The laptop forwards to the app's exposed port: the connection in is listed, and Stop
        # resets it.
        qtbot.waitUntil(lambda: "desk" in laptop.online(), timeout=15_000)
        forward, port = start_forward(laptop, f"desk:{target}")
        processes.append(forward)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"hello\n")
            assert received(qtbot, sock) == b"hello\n"
            qtbot.waitUntil(lambda: bool(rows_of(window, "served")), timeout=15_000)
            [served] = rows_of(window, "served")
            assert served.device == "laptop" and served.target == target
            stop_button(window, served).click()
            qtbot.waitUntil(lambda: not rows_of(window, "served"), timeout=15_000)
            with contextlib.suppress(ConnectionResetError):
                assert received(qtbot, sock) == b""

        # Stop on the exposed port unexposes it: the setting changes and new connections are
        # refused.
        stop_button(window, exposed).click()
        qtbot.waitUntil(lambda: not rows_of(window, "exposed"), timeout=15_000)
        assert str(Context.open(gui_home.paths.home).config["tunnel.expose"]) == ""

        # A shell the laptop opens here (`meshagent terminal open desk`) is listed; Stop ends it.
        laptop_ipc = Paths.resolve(str(laptop.home)).ipc_path
        console = run(qtbot, ipc.attach(laptop_ipc, "terminal.open", {"device": "desk"}))
        try:
            qtbot.waitUntil(lambda: bool(rows_of(window, "shell")), timeout=15_000)
            [shell] = rows_of(window, "shell")
            qtbot.waitUntil(lambda: rows_of(window, "shell")[0].details == "1 viewer")
            stop_button(window, shell).click()
            qtbot.waitUntil(lambda: not rows_of(window, "shell"), timeout=15_000)
        finally:
            run(qtbot, console.aclose())
    finally:
        for process in processes:
            process.stop()
        stopped(qtbot, gui, task)
