"""The check `meshagent gui` makes before Qt loads: which X11 libraries are missing, in one line
naming the packages (no Qt involved; a fake loader stands in for the dynamic linker)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from meshagent_gui.ui import system_libraries
from meshagent_gui.ui.system_libraries import (
    XCB_LIBRARIES,
    install_hint,
    missing_xcb_libraries,
    uses_xcb,
)

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="Qt's xcb plugin is Linux only")


@linux_only
@pytest.mark.parametrize(
    ("environ", "xcb"),
    [
        ({"DISPLAY": ":0"}, True),
        ({"DISPLAY": ":0", "WAYLAND_DISPLAY": "wayland-0"}, False),  # Qt picks Wayland
        ({"QT_QPA_PLATFORM": "xcb", "WAYLAND_DISPLAY": "wayland-0"}, True),
        ({"QT_QPA_PLATFORM": "xcb:dpi=96", "DISPLAY": ":0"}, True),
        ({"QT_QPA_PLATFORM": "wayland;xcb", "DISPLAY": ":0"}, False),  # a fallback exists
        ({"QT_QPA_PLATFORM": "offscreen", "DISPLAY": ":0"}, False),
        ({}, False),
    ],
)
def test_only_an_xcb_start_is_checked(environ: dict[str, str], xcb: bool) -> None:
    assert uses_xcb(environ) is xcb


def test_missing_libraries_by_soname_and_a_bundle_counts(tmp_path: Path) -> None:
    absent = {"libxcb-icccm.so.4", "libxcb-keysyms.so.1", "libxcb-cursor.so.0"}
    assert missing_xcb_libraries(lambda soname: soname not in absent) == [
        s for s in XCB_LIBRARIES if s in absent
    ]
    (tmp_path / "libxcb-icccm.so.4").write_bytes(b"")  # a frozen build that brought its own
    assert "libxcb-icccm.so.4" not in missing_xcb_libraries(
        lambda soname: soname not in absent, bundled=tmp_path
    )


def test_the_hint_names_the_packages_for_this_system() -> None:
    missing = ["libxcb-icccm.so.4", "libxcb-keysyms.so.1"]
    apt = install_hint(
        missing, which=lambda tool: "/usr/bin/apt-get" if tool == "apt-get" else None
    )
    assert apt.startswith("the desktop app needs the X11 libraries libxcb-icccm4, libxcb-keysyms1")
    assert "sudo apt install libxcb-icccm4 libxcb-keysyms1" in apt and "\n" not in apt
    dnf = install_hint(missing, which=lambda tool: "/usr/bin/dnf" if tool == "dnf" else None)
    assert "sudo dnf install xcb-util-keysyms xcb-util-wm" in dnf


def test_the_readme_and_the_installers_name_the_same_libraries() -> None:
    root = Path(__file__).parents[2]
    readme = (root / "README.md").read_text(encoding="utf-8")
    debian = {names[0] for names in XCB_LIBRARIES.values()}
    fedora = {names[1] for names in XCB_LIBRARIES.values()}
    assert {"libxcb-cursor0", "libxcb-icccm4", "libxcb-keysyms1"} <= debian
    assert "sudo apt install libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1" in readme
    assert {"xcb-util-cursor", "xcb-util-wm", "xcb-util-keysyms"} <= fedora
    build = (root / "installers" / "build_linux.sh").read_text(encoding="utf-8")
    assert "meshagent_gui.ui.system_libraries import XCB_LIBRARIES" in build
    assert "@DEPENDS@/libc6 (>= $glibc), $xcb_debs/" in build and "@XCB@/$xcb_rpms/" in build
    spec = (root / "installers" / "linux" / "meshagent.rpm.spec.in").read_text(encoding="utf-8")
    assert "Requires:       @XCB@" in spec


def test_check_xcb_says_nothing_when_qt_will_not_load_xcb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(system_libraries, "_loadable", lambda soname: False)
    assert system_libraries.check_xcb({"QT_QPA_PLATFORM": "offscreen"}) is None
