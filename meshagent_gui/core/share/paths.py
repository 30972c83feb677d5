"""Names from a peer, made safe to use under a folder of ours, and clash-free destinations.

Every path a sender offers goes through :func:`safe_relative_path` before anything touches the
disk. The rules are the same on every platform (a name is accepted or refused identically on
Linux, Windows and macOS), so a sender can check its own names with the same function and skip,
with a reason, a file that the receiver would refuse, instead of failing the whole offer:

- relative only: no leading ``/``, no ``//server`` or ``\\\\server\\share`` (UNC), no drive
  (``C:``), no ``..``, ``.`` or empty component (so no trailing ``/`` either);
- no backslash (a separator on Windows) and none of ``<>:"|?*`` (invalid on Windows; ``:`` also
  opens NTFS alternate data streams);
- no control character (C0, DEL, C1), line or paragraph separator, lone surrogate, or bidi
  override/isolate (``invoice\\u202efdp.exe`` displays as ``invoiceexe.pdf``);
- no reserved Windows device name as a component's stem (``CON``, ``nul.txt``, ``COM1``,
  ``LPT9``, ``CONIN$``...), no component ending in a dot or a space (Windows strips them,
  so two different names would land on one file);
- at most 255 UTF-8 bytes per component and 4096 bytes in all;
- the result is NFC-normalised (macOS hands out NFD names; the receiver keeps one form).

:func:`resolve_inside` then maps the name under the receiving root and refuses to pass through a
symbolic link or a Windows reparse point: the receiver never creates links from the wire, so any
link below the root was made locally and is not ours to follow. :func:`unique_destination` and
:func:`rename_no_replace` give ``name (1).ext``-style names and a final rename that can never
replace an existing file.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import sys
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Final

from meshagent_gui.errors import UserError

from .disk import DISK, NOT_SUPPORTED, Disk

MAX_COMPONENT_BYTES: Final = 255
MAX_PATH_BYTES: Final = 4096
MAX_CLASH_COUNTER: Final = 9_999
_CLASH_TAG: Final = re.compile(r"(.*) \((\d+)\)", re.DOTALL)

_WINDOWS_INVALID: Final = frozenset('<>:"|?*\\')
_BIDI_CONTROLS: Final = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
_REFUSED_CATEGORIES: Final = frozenset({"Cc", "Cs", "Zl", "Zp"})
_SUPERSCRIPT_DIGITS: Final = "\u00b9\u00b2\u00b3"
_RESERVED_STEMS: Final = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", "CLOCK$"}
    | {f"{port}{digit}" for port in ("COM", "LPT") for digit in "0123456789" + _SUPERSCRIPT_DIGITS}
)
# Multi-part extensions kept together when counting clashes: ``backup (1).tar.gz``.
_COMPOUND_INNER: Final = ".tar"
_MAX_EXTENSION_CHARS: Final = 10
_MESSAGE_NAME_CHARS: Final = 120


class UnsafePath(UserError):
    """A name from a peer that cannot be used safely (refused; nothing is written)."""

    def __init__(self, name: str, reason: str) -> None:
        shown = name if len(name) <= _MESSAGE_NAME_CHARS else name[:_MESSAGE_NAME_CHARS] + "..."
        super().__init__(f"refused the unsafe name {shown!r}: {reason}", code="unsafe_path")
        self.name = name
        self.reason = reason


def safe_relative_path(name: str) -> PurePosixPath:
    """``name`` (POSIX separators, as on the wire) as a safe relative path, or :class:`UnsafePath`.

    The result has at least one component, none of them empty, ``.`` or ``..``; it is NFC and
    ``safe_relative_path(str(result)) == result``.
    """
    normal = unicodedata.normalize("NFC", name)
    if not normal:
        raise UnsafePath(name, "the name is empty")
    if len(normal.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise UnsafePath(name, f"the path is longer than {MAX_PATH_BYTES} bytes")
    if normal.startswith("/"):
        raise UnsafePath(name, "absolute paths are not accepted")
    if "\\" in normal:
        raise UnsafePath(name, "backslashes are not accepted (a separator on Windows)")
    parts = normal.split("/")
    if len(parts[0]) >= 2 and parts[0][1] == ":" and parts[0][0].isascii():
        raise UnsafePath(name, "drive letters are not accepted")
    for part in parts:
        _check_component(name, part)
    return PurePosixPath(*parts)


def _check_component(name: str, part: str) -> None:
    if part in ("", "."):
        raise UnsafePath(name, "empty or '.' path components are not accepted")
    if part == "..":
        raise UnsafePath(name, "'..' is not accepted")
    for char in part:
        if char in _WINDOWS_INVALID:
            raise UnsafePath(name, f"the character {char!r} is not accepted in names")
        if char in _BIDI_CONTROLS or unicodedata.category(char) in _REFUSED_CATEGORIES:
            raise UnsafePath(name, f"control character {char!r} in a name")
    if part[-1] in ". ":
        raise UnsafePath(name, "a name may not end with a dot or a space")
    if part.split(".", 1)[0].rstrip(" ").upper() in _RESERVED_STEMS:
        raise UnsafePath(name, f"{part!r} is a reserved device name on Windows")
    if len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
        raise UnsafePath(name, f"a name is longer than {MAX_COMPONENT_BYTES} bytes")


def resolve_inside(root: Path, rel: str | PurePosixPath) -> Path:
    """The local path for ``rel`` under ``root``, refusing any way out of ``root``.

    ``root`` itself may be (or sit under) a symbolic link: it is resolved once. Below it, an
    existing component that is a symbolic link or reparse point is refused, and so is an
    existing non-directory where a folder is needed. Missing components are fine (the caller
    creates them with :func:`ensure_directory_inside`). Blocking: call it off the event loop.
    """
    return resolve_many(root, [rel])[0]


def resolve_many(root: Path, rels: Iterable[str | PurePosixPath]) -> list[Path]:
    """:func:`resolve_inside` for many paths under one ``root`` (an offer's thousands of
    files): the root is resolved once and each existing component is looked at once."""
    base = _resolved_root(root)
    seen: dict[str, os.stat_result | None] = {}
    resolved: list[Path] = []
    for rel in rels:
        safe = safe_relative_path(str(rel))
        current = str(base)
        last = len(safe.parts) - 1
        for position, part in enumerate(safe.parts):
            current = os.path.join(current, part)
            if current in seen:
                info = seen[current]
            else:
                try:
                    info = os.lstat(current)
                except FileNotFoundError:
                    info = None
                seen[current] = info
            if info is None:
                break
            if is_link(info):
                raise UnsafePath(
                    str(rel), f"{current} is a symbolic link; links are never followed"
                )
            if position < last and not stat.S_ISDIR(info.st_mode):
                raise UnsafePath(str(rel), f"{current} is not a folder")
        target = base.joinpath(*safe.parts)
        if os.path.commonpath([base, target]) != str(base):  # belt and braces: cannot happen
            raise UnsafePath(str(rel), "the path leaves the receiving folder")
        resolved.append(target)
    return resolved


def ensure_directory_inside(root: Path, rel: str | PurePosixPath) -> Path:
    """Create the folder ``rel`` under ``root`` (and its parents), never through a link.

    An existing real folder is reused (folders merge; files never overwrite, see
    :func:`unique_destination`). Blocking: call it off the event loop.
    """
    target = resolve_inside(root, rel)
    current = _resolved_root(root)
    for part in target.relative_to(current).parts:
        current = current / part
        try:
            os.mkdir(current)
        except FileExistsError:
            info = os.lstat(current)
            if is_link(info) or not stat.S_ISDIR(info.st_mode):
                raise UnsafePath(str(rel), f"{current} exists and is not a folder") from None
    return target


def _resolved_root(root: Path) -> Path:
    try:
        base = root.resolve(strict=True)
    except OSError as exc:
        raise UserError(f"the receiving folder {root} is not usable: {exc.strerror}") from exc
    if not base.is_dir():
        raise UserError(f"the receiving folder {root} is not a folder")
    return base


def is_link(info: os.stat_result) -> bool:
    """A symbolic link, or on Windows any reparse point (junctions included), from ``lstat``."""
    reparse = getattr(info, "st_file_attributes", 0) & getattr(
        stat, "FILE_ATTRIBUTE_REPARSE_POINT", 0
    )
    return stat.S_ISLNK(info.st_mode) or bool(reparse)


# ---------------------------------------------------------------------------- clash-free names


def split_name(name: str) -> tuple[str, str]:
    """``("report", ".pdf")``, ``("backup", ".tar.gz")``, ``(".bashrc", "")``, ``("Makefile", "")``.

    A dotfile's leading dot belongs to the stem; a "suffix" with a space or longer than 10
    characters is part of the name (``"v2.final draft"`` has no extension).
    """
    dot = name.rfind(".")
    if dot <= 0 or dot == len(name) - 1:
        return name, ""
    stem, extension = name[:dot], name[dot:]
    if " " in extension or len(extension) > _MAX_EXTENSION_CHARS:
        return name, ""
    if stem.lower().endswith(_COMPOUND_INNER) and len(stem) > len(_COMPOUND_INNER):
        cut = len(stem) - len(_COMPOUND_INNER)
        return stem[:cut], stem[cut:] + extension
    return stem, extension


def clash_names(name: str) -> Iterator[str]:
    """``name``, then ``stem (1).ext``, ``stem (2).ext``... each within the component limit."""
    yield name
    stem, extension = split_name(name)
    for counter in range(1, MAX_CLASH_COUNTER + 1):
        tag = f" ({counter})"
        room = MAX_COMPONENT_BYTES - len((tag + extension).encode("utf-8", "surrogatepass"))
        yield _truncate_utf8(stem, room) + tag + extension


def is_clash_name(candidate: str, name: str) -> bool:
    """Whether ``candidate`` is ``name`` or one of its :func:`clash_names` (``stem (n).ext``,
    the stem maybe shortened to fit)."""
    if candidate == name:
        return bool(name)
    stem, extension = split_name(name)
    if extension and not candidate.endswith(extension):
        return False
    numbered = _CLASH_TAG.fullmatch(candidate[: len(candidate) - len(extension)])
    if numbered is None or not 1 <= int(numbered.group(2)) <= MAX_CLASH_COUNTER:
        return False
    kept = numbered.group(1)
    if kept == stem:
        return True
    # A shortened stem: only where the full one would not fit (a UTF-8 character is <= 4 bytes).
    full = len(candidate.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES - 4
    return full and bool(kept) and stem.startswith(kept)


def _truncate_utf8(text: str, limit: int) -> str:
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) <= limit:
        return text
    return encoded[: max(limit, 0)].decode("utf-8", "ignore")


def unique_destination(path: Path) -> Path:
    """``path`` if nothing exists there (not even a dangling link), else the first free clash name.

    A free name can be taken by someone else right after this returns: the final move must use
    :func:`rename_no_replace` (or :func:`move_to_unique`, which retries with the next name).
    """
    for candidate in clash_names(path.name):
        target = path.with_name(candidate)
        if not os.path.lexists(target):
            return target
    raise UserError(f"too many files named like {path.name!r} in {path.parent}", code="name_clash")


def move_to_unique(source: Path, wanted: Path, *, disk: Disk = DISK) -> Path:
    """Move ``source`` to ``wanted`` or its first free clash name; never replaces anything.

    Returns where it landed. Blocking: call it off the event loop.
    """
    for candidate in clash_names(wanted.name):
        target = wanted.with_name(candidate)
        if disk.lexists(target):
            continue
        try:
            rename_no_replace(source, target, disk=disk)
        except FileExistsError:
            continue  # taken between the check and the move: try the next name
        return target
    raise UserError(
        f"too many files named like {wanted.name!r} in {wanted.parent}", code="name_clash"
    )


# ---------------------------------------------------------------------------- no-replace rename


def rename_no_replace(source: Path, target: Path, *, disk: Disk = DISK) -> None:
    """Rename ``source`` to ``target`` atomically, or raise :class:`FileExistsError`.

    The check and the rename are one step wherever the system offers it, so no other writer can
    slip a file in between and have it replaced:

    1. Linux: ``renameat2(RENAME_NOREPLACE)`` (glibc >= 2.28; ext4, xfs, btrfs, tmpfs...);
       macOS: ``renamex_np(RENAME_EXCL)``; Windows: ``os.rename`` already refuses an existing
       target.
    2. Where the filesystem refuses that flag: ``os.link`` (fails atomically with EEXIST) then
       unlink the source. For a moment both names exist; a crash there leaves the complete
       file under both names, never a lost or replaced one.
    3. Where hard links are impossible too (FAT, some network shares): reserve the name with
       ``O_CREAT | O_EXCL`` and ``os.replace`` our own empty placeholder. Only a writer that
       replaces files without checking could race this, and nothing in this program does.
    """
    if sys.platform == "win32":
        os.rename(source, target)
        return
    if disk.rename_exclusive(source, target):
        return
    try:
        disk.link(source, target)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in NOT_SUPPORTED | {errno.EMLINK}:
            raise
    else:
        disk.unlink(source)
        return
    placeholder = disk.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(placeholder)
    os.replace(source, target)
