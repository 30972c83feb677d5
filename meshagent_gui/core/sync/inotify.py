"""Linux's inotify read straight on the event loop (``loop.add_reader``): a synced folder's
changes as relative names, with no thread and no event object per change.

watchdog (the other platforms' source) runs three threads per folder and builds an event object
for every change, our own writes included: during a pull of small files that was the largest
single share of the CPU spent per file. Here a read of the inotify descriptor gives every queued
event at once, parsed into names in one pass.

One watch per folder below the root (inotify is not recursive): a folder created or moved in is
watched and walked (files made in it before its watch existed are reported too); a folder moved
away or deleted loses its watches. ``.meshsync`` is never watched.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
import struct
import sys
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Final

from .ignore import STATE_DIR

RESCAN: Final = object()
"""Stands for "rescan all" among the names reported (events lost, the root gone)."""

_IN_MODIFY: Final = 0x00000002
_IN_ATTRIB: Final = 0x00000004
_IN_CLOSE_WRITE: Final = 0x00000008
_IN_MOVED_FROM: Final = 0x00000040
_IN_MOVED_TO: Final = 0x00000080
_IN_CREATE: Final = 0x00000100
_IN_DELETE: Final = 0x00000200
_IN_DELETE_SELF: Final = 0x00000400
_IN_MOVE_SELF: Final = 0x00000800
_IN_Q_OVERFLOW: Final = 0x00004000
_IN_IGNORED: Final = 0x00008000
_IN_ONLYDIR: Final = 0x01000000
_IN_DONT_FOLLOW: Final = 0x02000000
_IN_ISDIR: Final = 0x40000000
_IN_NONBLOCK: Final = 0o4000
_IN_CLOEXEC: Final = 0o2000000

# Opens, reads and read-only closes are left out: the scanner's own reads would trigger scans.
_MASK: Final = (
    _IN_MODIFY
    | _IN_ATTRIB
    | _IN_CLOSE_WRITE
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
    | _IN_ONLYDIR
    | _IN_DONT_FOLLOW
)
_HEADER: Final = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)
_READ_SIZE: Final = 1 << 18
_STATE: Final = os.fsencode(STATE_DIR)
_HASH: Final = ord("#")
_NAMING: Final = _IN_CREATE | _IN_DELETE | _IN_MOVED_FROM | _IN_MOVED_TO


def available() -> bool:
    return sys.platform.startswith("linux") and _lib() is not None


@functools.cache
def _lib() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        lib.inotify_init1.argtypes = [ctypes.c_int]
        lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        lib.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None  # no libc to load, or one without inotify (musl has it; just in case)
    return lib


def _error(call: str, path: bytes | None = None) -> OSError:
    code = ctypes.get_errno()
    if code == errno.ENOSPC:
        # The per-user watch limit (fs.inotify.max_user_watches), the usual cause of failure.
        message = "inotify watch limit reached (raise fs.inotify.max_user_watches)"
    else:
        message = f"{call}: {os.strerror(code)}"
    return OSError(code, message, os.fsdecode(path) if path is not None else None)


class InotifySource:
    """Reports names changed under ``root`` to ``report`` (on the loop) until closed.

    ``report`` gets a list of relative NFC names ('/'-separated), or :data:`RESCAN` among them
    when events were lost or the root itself went away (then :attr:`alive` turns False).
    """

    def __init__(self, root: Path, report: Callable[[list[str | object]], None]) -> None:
        lib = _lib()
        if lib is None:
            raise OSError(errno.ENOSYS, "inotify is not available")
        self._lib = lib
        self._root = os.fsencode(root)
        self._report = report
        self._fd = -1
        self._dirs: dict[int, bytes] = {}  # watch -> folder's relative name (b"" for the root)
        self._watches: dict[bytes, int] = {}
        self._root_lost = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def alive(self) -> bool:
        return self._fd >= 0 and not self._root_lost

    def start(self) -> None:
        """(Any thread) Open the descriptor and watch the tree (a walk: run it off the loop)."""
        fd = self._lib.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise _error("inotify_init1")
        self._fd = fd
        try:
            self._watch_tree(b"", None)
        except BaseException:
            self.close()
            raise

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """(The loop) Start reading."""
        self._loop = loop
        loop.add_reader(self._fd, self._read)

    def close(self) -> None:
        if self._loop is not None and self._fd >= 0:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
        if self._fd >= 0:
            os.close(self._fd)  # drops every watch with it
        self._fd = -1
        self._dirs.clear()
        self._watches.clear()

    # ------------------------------------------------------------ watches

    def _watch_tree(self, relative: bytes, found: list[str | object] | None) -> None:
        """Watch ``relative`` and every folder below it; append to ``found`` each name below
        it (for a folder that arrived whole: what it holds came before its watches)."""
        stack = [relative]
        while stack:
            folder = stack.pop()
            path = os.path.join(self._root, folder) if folder else self._root
            wd = self._lib.inotify_add_watch(self._fd, path, _MASK)
            if wd < 0:
                code = ctypes.get_errno()
                if folder and code in (errno.ENOENT, errno.ENOTDIR):
                    continue  # gone again already: its deletion is reported
                raise _error("inotify_add_watch", path)
            old = self._dirs.get(wd)
            if old is not None and old != folder:
                self._watches.pop(old, None)
            self._dirs[wd] = folder
            self._watches[folder] = wd
            try:
                entries = os.scandir(path)
            except OSError:
                continue
            with entries:
                for entry in entries:
                    name = os.path.join(folder, entry.name) if folder else entry.name
                    if entry.name == _STATE:
                        continue
                    if found is not None:
                        found.append(_decode(name))
                    with contextlib.suppress(OSError):
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(name)

    def _forget_tree(self, relative: bytes) -> None:
        """Drop the watches of ``relative`` and below (moved away: their names are stale)."""
        prefix = relative + b"/"
        for folder in [f for f in self._watches if f == relative or f.startswith(prefix)]:
            wd = self._watches.pop(folder)
            self._dirs.pop(wd, None)
            self._lib.inotify_rm_watch(self._fd, wd)

    # ------------------------------------------------------------ reading (the loop)

    def _read(self) -> None:
        names: list[str | object] = []
        while self._fd >= 0:
            try:
                data = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                break
            except OSError:
                names.append(RESCAN)
                self._root_lost = True
                self.close()
                break
            self._parse(data, names)
            if len(data) < _READ_SIZE // 2:
                break  # drained (a short read): save the EAGAIN round trip
        if names:
            self._report(names)

    def _parse(self, data: bytes, names: list[str | object]) -> None:
        unpack = _HEADER.unpack_from
        header = _HEADER.size
        dirs = self._dirs
        state = _STATE
        offset = 0
        end = len(data)
        while offset < end:
            wd, mask, _cookie, length = unpack(data, offset)
            offset += header
            raw = data[offset : offset + length].rstrip(b"\0")
            offset += length
            if mask & _IN_Q_OVERFLOW:
                names.append(RESCAN)
                continue
            folder = dirs.get(wd)
            if folder is None:
                continue  # a watch already dropped
            if mask & (_IN_IGNORED | _IN_DELETE_SELF | _IN_MOVE_SELF):
                if not folder:  # the root itself deleted or moved: look at everything
                    names.append(RESCAN)
                    self._root_lost = True
                elif mask & _IN_IGNORED:
                    self._watches.pop(folder, None)
                    dirs.pop(wd, None)
                continue
            if not raw:
                continue
            name = folder + b"/" + raw if folder else raw
            if _unnamed(raw, mask) and not os.path.lexists(os.path.join(self._root, name)):
                continue
            if state in name and state in name.split(b"/"):
                continue
            names.append(_decode(name))
            if mask & _IN_ISDIR:
                if mask & (_IN_CREATE | _IN_MOVED_TO):
                    try:
                        self._watch_tree(name, names)
                    except OSError:
                        names.append(RESCAN)  # the watch limit: rescans cover the rest
                elif mask & _IN_MOVED_FROM:
                    self._forget_tree(name)


def _unnamed(raw: bytes, mask: int) -> bool:
    """Whether the event may be an unnamed (``O_TMPFILE``) file's, written before it is linked
    in (the applier's files): the kernel names those ``#<inode>``, a name that then does not
    exist (the caller checks). Not changes: each placed file's link is reported on its own."""
    return raw[0] == _HASH and not mask & _NAMING and raw[1:].isdigit()


def _decode(name: bytes) -> str:
    text = os.fsdecode(name)
    return text if text.isascii() else unicodedata.normalize("NFC", text)
