"""Desktop app figures: start to tray ready, idle RSS and CPU, UI frame time under full-speed
progress. Each against a baseline measured in the same run (a bare QApplication + QWidget).

    python -m pytest -m benchmark tests/benchmarks/test_bench_gui.py -s
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.benchmark
ENV = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "MESHAGENT_SECRET_STORE": "file"}

BARE = """
import time; t0 = time.perf_counter()
from PySide6.QtWidgets import QApplication, QWidget
app = QApplication([]); w = QWidget(); w.show(); app.processEvents()
print("READY", time.perf_counter() - t0, flush=True)
import sys; sys.stdin.readline()
"""

APP = """
import time; t0 = time.perf_counter()
import asyncio, qasync, sys
from meshagent_gui.context import Context
from meshagent_gui.ui.app import GuiApp, make_application
app = make_application(); loop = qasync.QEventLoop(app); asyncio.set_event_loop(loop)
ctx = Context.open(sys.argv[1])
gui = GuiApp(ctx, use_tray=True)
async def main():
    task = asyncio.ensure_future(gui.run())
    await gui.agent_ready.wait()
    print("READY", time.perf_counter() - t0, flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    gui.quit(); await task
with loop:
    loop.run_until_complete(main())
"""


def _start(code: str, *args: str) -> tuple[subprocess.Popen[str], float]:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("READY"):
            return proc, float(line.split()[1])
    raise AssertionError("did not start")


def _finish(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.wait(30)


def test_start_idle_rss_and_cpu(tmp_path: Path) -> None:
    from tests.integration.harness import AgentHome, Server

    logs = tmp_path / "logs"
    logs.mkdir()
    server = Server(tmp_path / "server", logs).start()
    try:
        server.add_user("ann")
        home = AgentHome(tmp_path / "desk", logs, "desk")
        home.ok("login", server.url, "--join-code", server.join_code("ann"), "--name", "desk")
        bare_times, app_times = [], []
        for _ in range(3):
            bare, ready = _start(BARE)
            bare_rss = psutil.Process(bare.pid).memory_info().rss
            _finish(bare)
            bare_times.append(ready)
            app, ready = _start(APP, str(home.home))
            app_times.append(ready)
            proc = psutil.Process(app.pid)
            rss = proc.memory_info().rss
            _finish(app)
        app, _ = _start(APP, str(home.home))
        proc = psutil.Process(app.pid)
        idle = float(os.environ.get("MESHAGENT_BENCH_IDLE", "60"))
        before = proc.cpu_times()
        time.sleep(idle)
        after = proc.cpu_times()
        idle_rss = proc.memory_info().rss
        _finish(app)
    finally:
        server.stop()
    cpu = (after.user + after.system) - (before.user + before.system)
    print(
        f"\nstart to tray ready: app {min(app_times):.3f} s (best of 3), bare Qt"
        f" {min(bare_times):.3f} s, ratio {min(app_times) / min(bare_times):.1f}"
        f"\nRSS at start: app {rss / 1e6:.0f} MB, bare Qt {bare_rss / 1e6:.0f} MB"
        f"\nidle over {idle:.0f} s: CPU {cpu:.3f} s ({cpu / idle * 100:.2f} %), RSS"
        f" {idle_rss / 1e6:.0f} MB"
    )


def test_frame_time_under_full_speed_progress(qtbot) -> None:  # type: ignore[no-untyped-def]
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtWidgets import QApplication, QTableView

    from meshagent_gui.core.events import TransferProgressed
    from meshagent_gui.ui.transfers import ProgressDelegate, TransferTableModel

    def frames(model: TransferTableModel, feed: bool, seconds: float = 2.0) -> list[float]:
        view = QTableView()
        view.setModel(model)
        view.setItemDelegateForColumn(3, ProgressDelegate(view))
        view.resize(900, 400)
        view.show()
        times: list[float] = []
        done = 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            if feed:  # 20 rows, 50 events each per frame = ~50,000 events/s at 60 fps
                for _ in range(50):
                    done += 1
                    for n in range(20):
                        model.apply(
                            TransferProgressed(
                                f"t{n}", "receive", "p", f"f{n}", done, 10**9, 1e8, 9.0
                            )
                        )
            QApplication.processEvents()
            view.viewport().repaint()
            times.append(time.perf_counter() - start)
        view.close()
        return sorted(times)

    idle = frames(TransferTableModel(), feed=False)
    busy = frames(TransferTableModel(), feed=True)

    def p(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(len(values) * q))] * 1000

    print(
        f"\nframe time, 20 rows under 1,000 progress events per frame: p50 {p(busy, 0.5):.2f} ms,"
        f" p99 {p(busy, 0.99):.2f} ms; idle table p50 {p(idle, 0.5):.2f} ms,"
        f" p99 {p(idle, 0.99):.2f} ms"
    )
