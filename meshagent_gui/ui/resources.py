"""Icons, found both when run from the source tree and from a PyInstaller build.

PyInstaller unpacks data files under ``sys._MEIPASS`` (installers/meshagent.spec puts them in
``resources/icons``); from source they live in the repository's ``resources/icons``.
"""

from __future__ import annotations

import sys
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Final

from PySide6.QtCore import QSize
from PySide6.QtGui import QIcon

TRAY_PNG_SIZES: Final = (16, 22, 32, 48, 64)


class TrayState(Enum):
    OFFLINE = "offline"
    ONLINE = "online"
    TRANSFERRING = "transferring"


def icons_dir() -> Path:
    """The folder holding meshagent.svg and the tray icons."""
    frozen = getattr(sys, "_MEIPASS", None)
    candidates = [Path(frozen) / "resources" / "icons"] if frozen else []
    candidates.append(Path(__file__).resolve().parents[2] / "resources" / "icons")
    for folder in candidates:
        if (folder / "meshagent.svg").is_file():
            return folder
    return candidates[-1]  # missing icons show as blank, never as a crash


@cache
def app_icon() -> QIcon:
    icon = QIcon()
    folder = icons_dir()
    for png in sorted(folder.glob("meshagent-[0-9]*.png")):
        size = int(png.stem.rsplit("-", 1)[1])
        if size <= 256:
            icon.addFile(str(png), QSize(size, size))
    if icon.isNull():
        icon.addFile(str(folder / "meshagent.svg"))
    return icon


@cache
def tray_icon(state: TrayState) -> QIcon:
    """PNG sizes first (no SVG plugin needed), the SVG for any other size."""
    icon = QIcon()
    folder = icons_dir()
    for size in TRAY_PNG_SIZES:
        png = folder / f"meshagent-tray-{state.value}-{size}.png"
        if png.is_file():
            icon.addFile(str(png), QSize(size, size))
    svg = folder / f"meshagent-tray-{state.value}.svg"
    if icon.isNull() and svg.is_file():
        icon.addFile(str(svg))
    return icon
