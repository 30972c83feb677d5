"""Small files stored whole, many per trip to the disk: the receiver's fast path.

A file that arrives in one chunk needs none of the partial-file machinery (no resume is worth a
state file for it). Each file of a batch is written into an **unnamed** file in its folder
(Linux ``O_TMPFILE``), so nothing is ever visible under any name before its content is
complete: a crash (``kill -9``, power) at any point before the link leaves no file at all, and
nothing to clean up. Then, once per batch:

1. **durable**: one ``syncfs`` of the filesystem makes the data of every file of the batch
   durable (one journal commit, not one per file); without ``syncfs``, each file is synced;
2. **named**: each file is linked to its final name with ``linkat``, which never replaces
   anything (taken: the next ``name (n).ext``);
3. the folders touched are synced once each, so the names survive a power cut too (until then a
   power cut may lose a name, which only means the file is received again).

Content is checked (blake3) before any of this, by the caller. Where ``O_TMPFILE`` or
``linkat`` is missing (another system, a filesystem without it), :func:`store_whole_files`
reports the file as not stored by this path (:data:`NOT_HERE`) and the caller uses
:meth:`~meshagent_gui.core.share.partial.PartialFile.store_whole` instead.

Blocking: run :func:`store_whole_files` in an executor.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from meshagent_gui.errors import UserError

from .disk import DISK, Disk
from .partial import _DISK_FULL, DiskFull, _disk_errors
from .paths import clash_names

_O_TMPFILE: Final = getattr(os, "O_TMPFILE", 0)
# The filesystem or system cannot make unnamed files: use the partial-file path.
_NO_TMPFILE: Final = frozenset(
    {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOTSUP, errno.ENOSYS, errno.EPERM}
)


class _NotHere:
    """Marks a file this path could not store (the caller uses the partial-file path)."""

    def __repr__(self) -> str:
        return "NOT_HERE"


NOT_HERE: Final = _NotHere()

Outcome = Path | BaseException | _NotHere

available: Final = DISK.unnamed_files
"""Whether this system can make unnamed files and link them (Linux with a libc)."""


@dataclass(frozen=True, slots=True)
class WholeFile:
    """One verified small file to put at ``destination`` (or its first free clash name)."""

    destination: Path
    data: bytes | memoryview
    mode: int  # only the exec bit matters
    mtime_ns: int


def store_whole_files(files: Sequence[WholeFile], *, disk: Disk = DISK) -> list[Outcome]:
    """(Blocking) store ``files``; per file, where it landed, its error, or :data:`NOT_HERE`."""
    outcomes: list[Outcome] = [NOT_HERE] * len(files)
    if not disk.unnamed_files():
        return outcomes
    fds: dict[int, int] = {}
    try:
        for position, whole in enumerate(files):
            try:
                fds[position] = write_unnamed(whole, disk=disk)
            except _Unsupported:
                continue  # NOT_HERE: the partial-file path stores it
            except Exception as exc:
                outcomes[position] = exc
        if not fds:
            return outcomes
        make_durable(list(fds.values()), disk=disk)
        folders: set[Path] = set()
        for position, fd in fds.items():
            try:
                final = link_unique(fd, files[position].destination, disk=disk)
            except _Unsupported:
                continue  # NOT_HERE: the partial-file path stores it
            except Exception as exc:
                outcomes[position] = exc
                continue
            outcomes[position] = final
            folders.add(final.parent)
        disk.sync_directories(folders)
    finally:
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
    return outcomes


class _Unsupported(Exception):
    """This filesystem cannot do it; not an error of the file."""


def write_unnamed(whole: WholeFile, *, disk: Disk = DISK) -> int:
    """An open, unnamed file in the destination's folder holding ``whole``'s data and times."""
    try:
        fd = disk.open(whole.destination.parent, _O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno in _NO_TMPFILE:
            raise _Unsupported(str(exc)) from exc
        if exc.errno in _DISK_FULL:
            raise DiskFull(whole.destination, len(whole.data)) from exc
        raise
    try:
        with _disk_errors(whole.destination, len(whole.data)):
            disk.write_all(fd, whole.data, 0)
            current = stat.S_IMODE(os.fstat(fd).st_mode)
            wanted = current | ((current & 0o444) >> 2) if whole.mode & 0o111 else current & ~0o111
            if wanted != current:
                os.fchmod(fd, wanted)
            os.utime(fd, ns=(time.time_ns(), whole.mtime_ns))
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_durable(fds: Sequence[int], *, disk: Disk = DISK) -> None:
    """The data of every file in ``fds`` on disk: one ``syncfs`` per filesystem, else (no
    ``syncfs``, or it failed) a sync of each file, which raises if one cannot be synced."""
    by_device: dict[int, list[int]] = {}
    for fd in fds:
        by_device.setdefault(os.fstat(fd).st_dev, []).append(fd)
    for same_device in by_device.values():
        synced = False
        with contextlib.suppress(OSError):  # the sync of each file tells which one failed
            synced = disk.syncfs(same_device[0])
        if synced:
            continue
        for fd in same_device:
            disk.fsync(fd)


def link_unique(fd: int, wanted: Path, *, disk: Disk = DISK) -> Path:
    """Give the unnamed file ``fd`` the name ``wanted`` or its first free clash name; never
    replaces anything (``linkat`` fails on an existing name, atomically)."""
    for candidate in clash_names(wanted.name):
        try:
            disk.link_at(fd, wanted.with_name(candidate))
        except FileExistsError:
            continue
        except OSError as exc:
            code = exc.errno
            if code in _NO_TMPFILE or code in (errno.ENOENT, errno.EXDEV):
                raise _Unsupported(exc.strerror) from exc
            if code in _DISK_FULL:
                raise DiskFull(wanted) from exc
            raise OSError(code, exc.strerror, str(wanted)) from exc
        return wanted.with_name(candidate)
    raise UserError(
        f"too many files named like {wanted.name!r} in {wanted.parent}", code="name_clash"
    )
