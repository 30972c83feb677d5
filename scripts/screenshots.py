"""Screenshots of the desktop app under Xvfb, each window at its default size: the main window
with a transfer in progress, the first-run dialog (with a real local mesh found on this network),
an offer's accept dialog, the transfer history, settings, rooms, a share link, the synced
folders window, the tunnels window and a shared terminal's host window, saved to
docs/screenshots/. The terminal viewer's screenshot comes from
scripts/screenshot_terminal.py (hooked in by :func:`terminal_viewer_hook`).

    python scripts/screenshots.py            # starts Xvfb itself if it can, else offscreen
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "screenshots"
sys.path.insert(0, str(ROOT))


def start_xvfb() -> subprocess.Popen[bytes] | None:
    if os.environ.get("DISPLAY"):
        return None
    if not shutil.which("Xvfb"):  # no display to start: render offscreen (same pixels)
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
        return None
    xcb_libs = ("libxcb-cursor.so.0", "libxcb-icccm.so.4", "libxcb-keysyms.so.1")
    probe = " && ".join(f"ldconfig -p | grep -q {lib}" for lib in xcb_libs)
    if subprocess.run(["sh", "-c", probe], check=False).returncode:
        # Qt's xcb plugin needs these (apt: libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1);
        # without them render offscreen (same widgets, same pixels).
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
        return None
    display = ":93"
    xvfb = subprocess.Popen(["Xvfb", display, "-screen", "0", "1400x900x24", "-nolisten", "tcp"])
    os.environ["DISPLAY"] = display
    os.environ["QT_QPA_PLATFORM"] = "xcb"
    time.sleep(0.8)
    return xvfb


def terminal_viewer_hook() -> None:
    """Where the terminal viewer's screenshot joins in (scripts/screenshot_terminal.py)."""
    script = ROOT / "scripts" / "screenshot_terminal.py"
    if script.is_file():
        subprocess.run([sys.executable, str(script)], check=False, env=os.environ.copy())


async def wait_for(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("screenshot scene did not come up")
        await asyncio.sleep(0.05)


async def grab(widget, name: str) -> None:  # type: ignore[no-untyped-def]
    """Show ``widget`` at its default size, let it settle, save it as docs/screenshots/NAME."""
    widget.show()
    # Not QApplication.processEvents(): inside a task it re-enters the qasync loop.
    await asyncio.sleep(0.6)
    widget.grab().save(str(OUT / name))


async def first_run(work: Path, logs: Path) -> None:
    """The first-run dialog on a fresh home, with a real local mesh running beside it (found by
    mDNS, as another computer on the network finds it)."""
    from meshagent_gui.context import Context
    from meshagent_gui.ui.first_run import FirstRunDialog
    from tests.integration.harness import AgentHome, Process, free_port

    studio = AgentHome(work / "studio", logs, "studio-pc")
    studio.ok("config", "set", "device.name", "studio-pc")
    studio.ok("config", "set", "local.port", str(free_port()))
    studio.process = Process(["--home", str(studio.home), "--json", "up", "--local"], logs / "s")
    try:
        studio.process.read_line(r'"event": "up"')
        dialog = FirstRunDialog(Context.open(work / "fresh"))
        dialog.show()
        with contextlib.suppress(TimeoutError):  # no multicast here: the dialog says none found
            await wait_for(lambda: dialog.found_list.count() > 0, 8)
        await grab(dialog, "first-run.png")
        dialog.close()
    finally:
        studio.stop()


async def scene(work: Path) -> None:

    from meshagent_gui.context import Context
    from meshagent_gui.core.events import TransferOffered
    from meshagent_gui.ui.app import GuiApp
    from meshagent_gui.ui.offers import OfferDialog
    from tests.integration.harness import AgentHome, Server

    logs = work / "logs"
    logs.mkdir()
    await first_run(work, logs)

    server = Server(work / "server", logs).start()
    laptop = AgentHome(work / "laptop", logs, "laptop", config={"device.name": "laptop"})
    phone = AgentHome(work / "phone", logs, "phone", config={"device.name": "studio-pc"})
    try:
        server.add_user("ann")
        for home in (laptop, phone):
            home.login(server, server.join_code("ann"))
        # A port the laptop lets its own devices reach (a real listener), for the tunnels window.
        service = await asyncio.start_server(echo, "127.0.0.1", 0)
        service_port = service.sockets[0].getsockname()[1]
        laptop.ok("expose", str(service_port))
        laptop.up()
        desk = AgentHome(work / "desk", logs, "desk")
        desk.ok("config", "set", "device.name", "desk")
        desk.ok("config", "set", "transfer.rate_limit", "12M")  # keeps a transfer in view
        desk.ok("expose", "8080")
        desk.ok("login", server.url, "--join-code", server.join_code("ann"), "--name", "desk")
        # The files first: writing 160 MB on the loop would stall the running app.
        done = work / "holiday-photos"
        done.mkdir()
        for n in range(12):
            (done / f"IMG_{n:04d}.jpg").write_bytes(os.urandom(150_000))
        movie = work / "family-video.mp4"
        movie.write_bytes(os.urandom(160 * 1024 * 1024))
        gui = GuiApp(Context.open(desk.home), use_tray=False)
        task = asyncio.ensure_future(gui.run())
        await wait_for(gui.agent_ready.is_set)
        await wait_for(lambda: bool(gui.bridge.online_devices()))
        laptop_id = gui.bridge.online_devices()[0].id
        gui.bridge.send([str(done)], laptop_id)
        await wait_for(lambda: gui.bridge.transfers.rows()[0].state.value == "Done")
        gui.bridge.send([str(movie)], laptop_id)
        await wait_for(lambda: 0.3 < gui.bridge.transfers.rows()[1].fraction < 0.9, 30)
        window = gui.window
        window.banner.hide()
        window.device_list.setCurrentIndex(gui.bridge.devices.index(0))
        window.table.selectRow(1)
        await asyncio.sleep(0.6)
        window.grab().save(str(OUT / "main-window.png"))
        agent = gui.bridge.agent
        assert agent is not None
        # What a receiver sees when another user's device offers files: where they will land.
        offer = TransferOffered(
            "t", laptop_id, "bobs-laptop", ("holiday-photos", "notes.txt"), 13, 1_843_200, False
        )
        offer_dialog = OfferDialog(offer, window, downloads=agent.downloads_dir())
        await grab(offer_dialog, "offer.png")
        offer_dialog.close()
        # The history: the folder sent above, kept in transfers.jsonl.
        history = window.open_history()
        await wait_for(lambda: history.model.rowCount() > 0)
        history.table.selectRow(0)
        await grab(history, "history.png")
        history.close()
        gui.open_settings()
        settings = gui._settings
        assert settings is not None
        await grab(settings, "settings.png")
        settings.close()
        gui.rooms.open()
        assert gui.rooms.window is not None
        await asyncio.sleep(1.0)  # the rooms load from the server
        await grab(gui.rooms.window, "rooms.png")
        gui.rooms.window.close()
        # Share by link: a real one-time link, waiting for someone to open it; then withdrawn.
        share = window.share_by_link()
        share.share(str(done))
        await wait_for(lambda: bool(share.url))
        await grab(share, "share-link.png")
        share.withdraw()
        share.close()
        # Synced folders: a real folder synced with the laptop, up to date.
        notes = work / "Notes"
        notes.mkdir()
        for n in range(5):
            (notes / f"note-{n}.md").write_text(f"# Note {n}\n" * 40)
        await agent.sync.add(notes, laptop_id)
        gui.sync.open()
        sync_window = gui.sync.window
        assert sync_window is not None
        await wait_for(lambda: any(f.state == "idle" for f in agent.sync.folders()), 30)
        gui.sync.model.refresh()
        await asyncio.sleep(0.6)
        sync_window.grab().save(str(OUT / "synced-folders.png"))
        sync_window.close()
        await tunnels_and_terminal(gui, laptop_id, service_port)
        gui.quit()
        await task
    finally:
        laptop.stop()
        phone.stop()
        server.stop()
        service.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The laptop's exposed service: answers what it is sent."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def tunnels_and_terminal(gui, laptop_id: str, service_port: int) -> None:  # type: ignore[no-untyped-def]
    """The tunnels window with a forward that carried a connection, this device's exposed port
    and a shared shell; then that shell's host window."""
    from meshagent_gui.core.protocol.tunnel import Target
    from meshagent_gui.ui.terminal_host_window import HostTerminalWindow

    agent = gui.bridge.agent
    forward = await agent.tunnels.forward(laptop_id, "laptop", Target("localhost", service_port))
    reader, writer = await asyncio.open_connection("127.0.0.1", forward.port)
    writer.write(b"hello" * 2000)
    await reader.readexactly(10_000)
    await gui.share_terminal()
    host = next(w for w in gui.terminal_windows if isinstance(w, HostTerminalWindow))
    tunnels = gui.window.open_tunnels()
    await asyncio.sleep(1.2)  # the window refreshes every second
    await grab(tunnels, "tunnels.png")
    tunnels.close()
    writer.close()
    await grab(host, "terminal-host.png")
    host.shared.stop()
    await asyncio.sleep(0.5)


def main() -> int:
    xvfb = start_xvfb()
    os.environ.setdefault("MESHAGENT_SECRET_STORE", "file")
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        import qasync  # type: ignore[import-untyped]

        from meshagent_gui.ui.app import make_application

        app = make_application()
        app.setStyle("Fusion")
        app.setQuitOnLastWindowClosed(False)
        loop = qasync.QEventLoop(app)
        asyncio.set_event_loop(loop)
        with tempfile.TemporaryDirectory() as work, loop:
            loop.run_until_complete(scene(Path(work)))
        terminal_viewer_hook()
    finally:
        if xvfb is not None:  # also after a failure: never leave Xvfb behind
            xvfb.terminate()
            xvfb.wait(5)
    print(f"screenshots in {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
