"""`meshagent gui` as a desktop without a tray runs it, with a user who clicks "Start a local
mesh" on the first-run dialog. A separate process, so the app's own quit rules (run_gui's) are
the ones tested: python -m tests.gui.first_run_driver HOME"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # no system tray there

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication

from meshagent_gui.ui.app import make_application, run_gui
from meshagent_gui.ui.first_run import FirstRunDialog


def click_start_a_local_mesh() -> None:
    for widget in QApplication.topLevelWidgets():
        if isinstance(widget, FirstRunDialog) and widget.isVisible():
            widget.local_button.click()
            return
    QTimer.singleShot(100, click_start_a_local_mesh)


if __name__ == "__main__":
    make_application()  # run_gui takes this one; the timer needs it first
    QTimer.singleShot(100, click_start_a_local_mesh)
    sys.exit(run_gui(sys.argv[1]))
