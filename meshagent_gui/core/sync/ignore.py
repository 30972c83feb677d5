"""``.meshignore`` (gitignore syntax, via ``pathspec``) and the names never synced.

The default ignores always apply: a ``!pattern`` in ``.meshignore`` cannot bring back an editor's
swap file or our own ``.meshsync/`` state (a nested synced folder's too). Blocking (reads one
small file): the scanner calls it from its worker thread.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Final

from pathspec import GitIgnoreSpec

IGNORE_FILE: Final = ".meshignore"
STATE_DIR: Final = ".meshsync"
MAX_IGNORE_FILE_BYTES: Final = 1024 * 1024
"""A bigger ``.meshignore`` is not read (reported): matching every name against it would crawl."""

DEFAULT_IGNORES: Final[tuple[str, ...]] = (
    f"{STATE_DIR}/",
    # .meshignore's own temp files (editors' backups; swap files are below)
    f"{IGNORE_FILE}~",
    f"{IGNORE_FILE}.tmp*",
    # our transfers' partial files
    "*.meshpart",
    "*.meshpart.state",
    # office and editors' lock, swap and temp files
    "~$*",
    ".~lock.*#",
    "*.swp",
    "*.swx",
    "4913",  # vim's probe file...
    "!4913/",  # ...but a folder may well be called that
    ".#*",
    "*.tmp",
    # desktop metadata
    ".DS_Store",
    "Thumbs.db",
    "desktop.ini",
)


# DEFAULT_IGNORES as one test of the last component (each of those patterns names a basename at
# any depth): pathspec's per-pattern regexes cost more than the rest of a scan's per-file work.
# tests/unit/core/sync/test_ignore.py checks that both agree.
_DEFAULT_NAMES: Final = re.compile(
    r"\.meshignore~|\.meshignore\.tmp.*|.*\.meshpart|.*\.meshpart\.state|~\$.*|\.~lock\..*#"
    r"|.*\.swp|.*\.swx|\.#.*|.*\.tmp|\.DS_Store|Thumbs\.db|desktop\.ini",
    re.DOTALL,
)


def _default_ignored(basename: str, is_dir: bool) -> bool:
    if basename == "4913":
        return not is_dir
    return _DEFAULT_NAMES.fullmatch(basename) is not None


class Ignores:
    """What the folder at ``root`` does not sync: :data:`DEFAULT_IGNORES` and ``.meshignore``.

    Lines that cannot be used (not UTF-8, not a valid pattern) are skipped and listed in
    :attr:`problems`, like an unreadable file; the rest still apply.
    """

    def __init__(self, root: Path) -> None:
        self._path = root / IGNORE_FILE
        self._defaults = GitIgnoreSpec.from_lines(DEFAULT_IGNORES)
        self._user = GitIgnoreSpec.from_lines([])
        self._user_empty = True
        self._raw: bytes | None = None
        self.problems: list[str] = []
        self.reload()

    def reload(self) -> bool:
        """Read ``.meshignore`` again; True when its patterns changed."""
        problems: list[str] = []
        try:
            with open(self._path, "rb") as file:
                raw = file.read(MAX_IGNORE_FILE_BYTES + 1)
        except FileNotFoundError:
            raw = b""
        except OSError as exc:
            # Keep the patterns we had: dropping them would start sending files the user
            # meant to keep private, because of a passing read error.
            self.problems = [f"{IGNORE_FILE} could not be read: {exc.strerror or exc}"]
            return False
        if len(raw) > MAX_IGNORE_FILE_BYTES:
            problems.append(f"{IGNORE_FILE} is larger than {MAX_IGNORE_FILE_BYTES} bytes: not used")
            raw = b""
        self.problems = problems
        if raw == self._raw:
            return False
        self._raw = raw
        lines = self._valid_lines(raw, problems)
        self._user = GitIgnoreSpec.from_lines(lines)
        self._user_empty = not any(line.strip() and not line.startswith("#") for line in lines)
        return True

    @staticmethod
    def _valid_lines(raw: bytes, problems: list[str]) -> list[str]:
        lines: list[str] = []
        for number, encoded in enumerate(raw.split(b"\n"), start=1):
            try:
                line = unicodedata.normalize("NFC", encoded.rstrip(b"\r").decode("utf-8"))
            except UnicodeDecodeError:
                problems.append(f"{IGNORE_FILE} line {number}: not UTF-8, skipped")
                continue
            if "\0" in line:
                problems.append(f"{IGNORE_FILE} line {number}: contains NUL, skipped")
                continue
            try:
                GitIgnoreSpec.from_lines([line])
            except (ValueError, re.error) as exc:  # GitIgnorePatternError, a bad [z-a] range
                problems.append(f"{IGNORE_FILE} line {number}: {exc}, skipped")
                continue
            lines.append(line)
        return lines

    def matches(self, name: str, *, is_dir: bool = False) -> bool:
        """Whether ``name`` itself matches, assuming no parent folder of it is ignored.

        For a walker that never descends into an ignored folder (the scanner); anyone else
        calls :meth:`ignored`.
        """
        parts = name.split("/")
        if STATE_DIR in parts or _default_ignored(parts[-1], is_dir):
            return True
        if self._user_empty:
            return False
        return bool(self._user.match_file(name + "/" if is_dir else name))

    def ignored(self, name: str, *, is_dir: bool = False) -> bool:
        """Whether ``name`` (relative, '/'-separated, NFC) is not synced.

        As in git, a file inside an ignored folder stays ignored even when a ``!pattern``
        names it: the folder is never looked into.
        """
        parts = name.split("/")
        for end in range(1, len(parts)):
            if self.matches("/".join(parts[:end]), is_dir=True):
                return True
        return self.matches(name, is_dir=is_dir)
