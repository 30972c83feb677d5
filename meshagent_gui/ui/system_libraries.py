"""The X11 libraries Qt's xcb platform plugin needs, checked before Qt is loaded.

PySide6's wheels bring Qt but not these system libraries, and a stock Debian desktop lacks some
(libxcb-icccm4, libxcb-keysyms1, libxcb-cursor0). Without them Qt prints a screenful and aborts
the process with a core dump; `meshagent gui` asks first and says in one line what to install.
No Qt import here: this runs before PySide6 is touched, and is tested without it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

# The libraries libqxcb.so and libQt6XcbQpa.so link (Qt 6.5+, "Qt for X11 Requirements"), by
# soname, with the package that brings each on Debian/Ubuntu and on Fedora/RHEL.
XCB_LIBRARIES: Final[Mapping[str, tuple[str, str]]] = {
    "libxcb-cursor.so.0": ("libxcb-cursor0", "xcb-util-cursor"),
    "libxcb-icccm.so.4": ("libxcb-icccm4", "xcb-util-wm"),
    "libxcb-keysyms.so.1": ("libxcb-keysyms1", "xcb-util-keysyms"),
    "libxcb-image.so.0": ("libxcb-image0", "xcb-util-image"),
    "libxcb-render-util.so.0": ("libxcb-render-util0", "xcb-util-renderutil"),
    "libxcb-util.so.1": ("libxcb-util1", "xcb-util"),
    "libxcb-xkb.so.1": ("libxcb-xkb1", "libxcb"),
    "libxkbcommon-x11.so.0": ("libxkbcommon-x11-0", "libxkbcommon-x11"),
    "libX11-xcb.so.1": ("libx11-xcb1", "libX11-xcb"),
}


def uses_xcb(environ: Mapping[str, str]) -> bool:
    """Whether Qt will load its xcb plugin (and nothing else) in this environment."""
    if sys.platform != "linux":
        return False
    chosen = [p for p in environ.get("QT_QPA_PLATFORM", "").split(";") if p]
    if chosen:
        return chosen[0].split(":")[0] == "xcb" and len(chosen) == 1
    # Unset: Qt prefers Wayland in a Wayland session and falls back to xcb with an X display.
    return bool(environ.get("DISPLAY")) and not environ.get("WAYLAND_DISPLAY")


def _loadable(soname: str) -> bool:
    try:
        ctypes.CDLL(soname)  # the dynamic loader's own search, as Qt's load will do
    except OSError:
        return False
    return True


def missing_xcb_libraries(
    loadable: Callable[[str], bool] = _loadable, bundled: Path | None = None
) -> list[str]:
    """Sonames of XCB_LIBRARIES the loader cannot find (a frozen build may bring its own)."""
    if bundled is None and getattr(sys, "frozen", False):
        bundled = Path(getattr(sys, "_MEIPASS", ""))
    return [
        soname
        for soname in XCB_LIBRARIES
        if not (bundled is not None and (bundled / soname).exists()) and not loadable(soname)
    ]


def install_hint(missing: list[str], which: Callable[[str], str | None] = shutil.which) -> str:
    """One line: what is missing and the command that installs it on this system."""
    rpm = which("apt-get") is None and which("dnf") is not None
    packages = sorted({XCB_LIBRARIES[soname][1 if rpm else 0] for soname in missing})
    command = "sudo dnf install" if rpm else "sudo apt install"
    return (
        f"the desktop app needs the X11 libraries {', '.join(packages)}:"
        f" {command} {' '.join(packages)} (or run `meshagent up` for the headless agent)"
    )


def check_xcb(environ: Mapping[str, str] = os.environ) -> str | None:
    """The install hint when Qt would abort for want of an xcb library, else None."""
    if not uses_xcb(environ):
        return None
    missing = missing_xcb_libraries()
    return install_hint(missing) if missing else None
