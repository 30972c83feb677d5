"""The receiver's memory of files it received whole, per sender: a repeated send skips them."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from .paths import is_clash_name


class CompletedIndex:
    """Files received whole, per sender and entry key: a repeated send skips them.

    One JSON object per line, appended; a line is trusted only while the file it names still
    has the size it had (the user may have edited or moved it: then it is received again).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[tuple[str, str], tuple[str, int]] | None = None
        self._unsaved: list[str] = []

    def _load(self) -> dict[tuple[str, str], tuple[str, int]]:
        if self._entries is None:
            self._entries = {}
            with contextlib.suppress(FileNotFoundError):
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        row = json.loads(line)
                        self._entries[(row["sender"], row["key"])] = (row["path"], int(row["size"]))
        return self._entries

    def find(self, sender: str, key: bytes, destination: Path, size: int) -> Path | None:
        """Where this version of a file was received whole before, if it is still there: at
        ``destination`` or one of its clash names (``name (1)``...), with the size it had."""
        known = self._load().get((sender, key.hex()))
        if known is None:
            return None
        path, known_size = Path(known[0]), known[1]
        if path.parent != destination.parent or not is_clash_name(path.name, destination.name):
            return None
        try:
            if os.stat(path).st_size == size == known_size:
                return path
        except OSError:
            pass
        return None

    def add(self, sender: str, key: bytes, final: Path, size: int) -> None:
        """Remember a file (in memory at once; on disk at the next :meth:`flush`)."""
        self._load()[(sender, key.hex())] = (str(final), size)
        row = {"sender": sender, "key": key.hex(), "path": str(final), "size": size}
        self._unsaved.append(json.dumps(row))

    @property
    def unsaved(self) -> int:
        return len(self._unsaved)

    def flush(self) -> None:
        """(Blocking) append what was added since the last flush, in one write."""
        if self._unsaved:
            lines, self._unsaved = self._unsaved, []
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write("\n".join(lines) + "\n")
