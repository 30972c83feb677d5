"""Render resources/icons/meshagent.svg into the PNG, ICO and ICNS files the installers use.

The SVG is the only hand-made source; run this after changing it and commit the results (they
are small, and the builds then need no SVG renderer). Needs `rsvg-convert` (Debian/Ubuntu:
`apt-get install librsvg2-bin`); the ICO and ICNS containers are packed here with the standard
library, both holding PNG images (Windows Vista+ and macOS 10.7+ read those).

    python3 installers/make_icons.py
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

ICONS = Path(__file__).resolve().parent.parent / "resources" / "icons"
SOURCE = ICONS / "meshagent.svg"
# The freedesktop hicolor sizes, plus 1024 for the macOS Retina 512@2x slot.
PNG_SIZES = (16, 24, 32, 48, 64, 128, 256, 512, 1024)
ICO_SIZES = (16, 24, 32, 48, 64, 128, 256)
# ICNS element type -> pixel size (PNG payloads; "@2x" slots reuse the larger renderings).
ICNS_TYPES = (
    (b"icp4", 16),
    (b"icp5", 32),
    (b"icp6", 64),
    (b"ic07", 128),
    (b"ic08", 256),
    (b"ic09", 512),
    (b"ic10", 1024),
    (b"ic11", 32),
    (b"ic12", 64),
    (b"ic13", 256),
    (b"ic14", 512),
)


def png_path(size: int) -> Path:
    return ICONS / f"meshagent-{size}.png"


def render_pngs() -> None:
    renderer = shutil.which("rsvg-convert")
    if renderer is None:
        sys.exit("make_icons: rsvg-convert not found (apt-get install librsvg2-bin)")
    for size in PNG_SIZES:
        subprocess.run(
            [renderer, "-w", str(size), "-h", str(size), str(SOURCE), "-o", str(png_path(size))],
            check=True,
        )


def pack_ico(sizes: tuple[int, ...], target: Path) -> None:
    """ICONDIR header, one 16-byte entry per image, then the PNG payloads."""
    images = [png_path(size).read_bytes() for size in sizes]
    header = struct.pack("<HHH", 0, 1, len(images))
    offset = len(header) + 16 * len(images)
    entries = b""
    for size, data in zip(sizes, images, strict=True):
        side = 0 if size >= 256 else size  # 0 means 256 in an ICO entry
        entries += struct.pack("<BBBBHHII", side, side, 0, 0, 1, 32, len(data), offset)
        offset += len(data)
    target.write_bytes(header + entries + b"".join(images))


def pack_icns(target: Path) -> None:
    """'icns' + total length, then (type, length including its 8-byte header, PNG data)."""
    body = b""
    for kind, size in ICNS_TYPES:
        data = png_path(size).read_bytes()
        body += kind + struct.pack(">I", 8 + len(data)) + data
    target.write_bytes(b"icns" + struct.pack(">I", 8 + len(body)) + body)


def main() -> None:
    render_pngs()
    pack_ico(ICO_SIZES, ICONS / "meshagent.ico")
    pack_icns(ICONS / "meshagent.icns")
    print(f"icons written to {ICONS}")


if __name__ == "__main__":
    main()
