"""Screenshots of the desktop app under Xvfb: the main window with a transfer in progress, the
first-run dialog and the synced folders window, saved to docs/screenshots/. The terminal viewer's screenshot comes from
scripts/screenshot_terminal.py (hooked in by :func:`terminal_viewer_hook`).

    python scripts/screenshots.py            # starts Xvfb itself (/usr/bin/Xvfb)
"""

from __future__ import annotations

import asyncio
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
    if os.environ.get("DISPLAY") or not shutil.which("Xvfb"):
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


async def scene(work: Path) -> None:
    from PySide6.QtWidgets import QApplication

    from meshagent_gui.context import Context
    from meshagent_gui.ui.app import GuiApp
    from meshagent_gui.ui.first_run import FirstRunDialog
    from tests.integration.harness import AgentHome, Server

    logs = work / "logs"
    logs.mkdir()
    # The first-run dialog, on a fresh home.
    fresh = Context.open(work / "fresh")
    dialog = FirstRunDialog(fresh)
    dialog.show()
    await asyncio.sleep(0.5)
    dialog.grab().save(str(OUT / "first-run.png"))
    dialog.close()

    server = Server(work / "server", logs).start()
    laptop = AgentHome(work / "laptop", logs, "laptop", config={"device.name": "laptop"})
    phone = AgentHome(work / "phone", logs, "phone", config={"device.name": "studio-pc"})
    try:
        server.add_user("ann")
        for home in (laptop, phone):
            home.login(server, server.join_code("ann"))
        laptop.up()
        desk = AgentHome(work / "desk", logs, "desk")
        desk.ok("config", "set", "device.name", "desk")
        desk.ok("config", "set", "transfer.rate_limit", "12M")  # keeps a transfer in view
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
        window.resize(1080, 620)
        await asyncio.sleep(0.6)
        QApplication.processEvents()
        window.grab().save(str(OUT / "main-window.png"))
        # Synced folders: a real folder synced with the laptop, up to date.
        notes = work / "Notes"
        notes.mkdir()
        for n in range(5):
            (notes / f"note-{n}.md").write_text(f"# Note {n}\n" * 40)
        agent = gui.bridge.agent
        assert agent is not None
        await agent.sync.add(notes, laptop_id)
        gui.sync.open()
        sync_window = gui.sync.window
        assert sync_window is not None
        await wait_for(lambda: any(f.state == "idle" for f in agent.sync.folders()), 30)
        gui.sync.model.refresh()
        await asyncio.sleep(0.6)
        QApplication.processEvents()
        sync_window.grab().save(str(OUT / "synced-folders.png"))
        gui.quit()
        await task
    finally:
        laptop.stop()
        phone.stop()
        server.stop()


def main() -> int:
    xvfb = start_xvfb()
    os.environ.setdefault("MESHAGENT_SECRET_STORE", "file")
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        import qasync

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
