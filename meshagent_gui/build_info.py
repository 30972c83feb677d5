"""Which build is running, and whether a version someone announces is newer than it.

A release binary carries a one-line label of its build next to the package (``BUILD``, written
by installers/meshagent.spec: date and commit); a source checkout has none and says so.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

from meshagent_gui import __version__

BUILD_FILE: Final = Path(__file__).with_name("BUILD")
FROM_SOURCE: Final = "from source"
_RELEASE = re.compile(r"(\d+(?:\.\d+)*)")


def build_label(build_file: Path = BUILD_FILE) -> str:
    """``build 2026-12-08 24a084d`` in a release binary; ``from source`` otherwise."""
    try:
        label = build_file.read_text(encoding="utf-8").strip().splitlines()[0][:80]
    except (OSError, UnicodeDecodeError, IndexError):
        return FROM_SOURCE
    return label or FROM_SOURCE


def version_line() -> str:
    """What ``meshagent --version`` prints and the app's About shows."""
    return f"meshagent {__version__} ({build_label()})"


def _release(version: str) -> tuple[int, ...] | None:
    match = _RELEASE.match(version.strip().removeprefix("v"))
    if match is None:
        return None
    parts = tuple(int(part) for part in match.group(1).split(".")[:4])
    return parts + (0,) * (4 - len(parts))


def is_newer(announced: str | None, current: str = __version__) -> bool:
    """Whether ``announced`` (say, the server's ``agent_version``) is a later release.

    Only the numeric release counts (``1.2.3``; a ``v`` prefix and any suffix are ignored), so
    garbage, an empty string or an overlong number is never "newer".
    """
    if not announced or len(announced) > 64:
        return False
    theirs, ours = _release(announced), _release(current)
    return theirs is not None and ours is not None and theirs > ours
