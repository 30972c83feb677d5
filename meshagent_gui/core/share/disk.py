"""The filesystem as a transfer uses it: one seam, real by default, faulty in tests.

:class:`Disk` holds the handful of operations that partial.py, whole.py and paths.py do on the
receiving disk (open, write at an offset, read back, sync a file or a whole filesystem, advise
the page cache, link, name an unnamed file, unlink, the no-replace rename, free space, unnamed
files), and that source.py does to read what is sent (open, read at an offset, advise).
Everything is real by default (:data:`DISK`); a test hands a :class:`Disk` subclass to the
constructors (``PartialFile.open(..., disk=)``, ``store_whole_files(..., disk=)``,
``rename_no_replace(..., disk=)``, ``ReceiverTools.disk``, ``walk(..., disk=)``,
``ChunkReader(..., disk=)``, ``TransferService(disk=)``) to fail one operation with an errno (a
full disk, an I/O error, a filesystem without links) or to watch what was synced, instead of
patching module functions.

Each operation is an attribute holding the function itself (``os.pwrite`` on the real disk,
not a method wrapping it), so the hot path binds it once and pays no extra Python call per
chunk. :meth:`Disk.bind` derives the compound operations (:attr:`Disk.write_all`,
:attr:`Disk.read_exact`) from the primitives; a subclass that replaces a primitive calls it
again.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Final

Buffer = bytes | bytearray | memoryview

_SEEK_LOCK: Final = threading.Lock()  # for systems without pread/pwrite (Windows)
_O_TMPFILE: Final = getattr(os, "O_TMPFILE", 0)
_RENAME_NOREPLACE: Final = 1  # linux/fs.h
_RENAME_EXCL: Final = 0x4  # macOS sys/stdio.h, for renamex_np
AT_FDCWD: Final = -100
_AT_SYMLINK_FOLLOW: Final = 0x400
_AT_EMPTY_PATH: Final = 0x1000
_PROC_FD: Final = "/proc/self/fd"
# The system or filesystem cannot rename without replacing in one step, or cannot link.
NOT_SUPPORTED: Final = frozenset(
    {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}
)
POSIX_FADV_DONTNEED: Final = getattr(os, "POSIX_FADV_DONTNEED", 4)
POSIX_FADV_SEQUENTIAL: Final = getattr(os, "POSIX_FADV_SEQUENTIAL", 2)


# ---------------------------------------------------------------------------- real primitives


def _seek_write(fd: int, data: Buffer, offset: int) -> int:
    with _SEEK_LOCK:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, data)


def _seek_read(fd: int, length: int, offset: int) -> bytes:
    with _SEEK_LOCK:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, length)


_PWRITE: Final[Callable[[int, Buffer, int], int]] = getattr(os, "pwrite", _seek_write)
_PREAD: Final[Callable[[int, int, int], bytes]] = getattr(os, "pread", _seek_read)


def pwrite_all(
    fd: int, data: Buffer, offset: int, pwrite: Callable[[int, Buffer, int], int] = _PWRITE
) -> None:
    """Write all of ``data`` at ``offset`` (``pwrite`` may write less than asked)."""
    view = memoryview(data).cast("B")
    while view:
        written = pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def pread_exact(
    fd: int, length: int, offset: int, pread: Callable[[int, int, int], bytes] = _PREAD
) -> bytes:
    """``length`` bytes at ``offset``, fewer only at the end of the file."""
    parts: list[bytes] = []
    while length > 0:
        piece = pread(fd, length, offset)
        if not piece:
            break
        parts.append(piece)
        length -= len(piece)
        offset += len(piece)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def sync_directory(directory: Path) -> None:
    """Make renames and deletions in ``directory`` durable (blocking; a no-op on Windows)."""
    if sys.platform == "win32":
        return  # no directory handles to sync; NTFS journals the rename
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_space(folder: Path) -> int:
    """Bytes free for us in ``folder``'s filesystem."""
    return shutil.disk_usage(folder).free


def link_no_follow(source: Path, target: Path) -> None:
    """A hard link ``target`` to ``source`` itself (never what a link points to)."""
    os.link(source, target, follow_symlinks=False)


@functools.cache
def libc() -> ctypes.CDLL | None:
    if sys.platform == "win32":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None


def rename_exclusive(source: Path, target: Path) -> bool:
    """Rename in one step, never replacing (``renameat2(RENAME_NOREPLACE)``, macOS
    ``renamex_np(RENAME_EXCL)``): True when done; False when this system or filesystem cannot;
    :class:`FileExistsError` when ``target`` exists."""
    lib = libc()
    if lib is None:
        return False
    src, dst = os.fsencode(source), os.fsencode(target)
    if sys.platform == "darwin" and hasattr(lib, "renamex_np"):
        result = lib.renamex_np(src, dst, ctypes.c_uint(_RENAME_EXCL))
    elif hasattr(lib, "renameat2"):
        result = lib.renameat2(AT_FDCWD, src, AT_FDCWD, dst, ctypes.c_uint(_RENAME_NOREPLACE))
    else:
        return False
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in NOT_SUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(target))


def syncfs(fd: int) -> bool:
    """Make the data of every file on ``fd``'s filesystem durable in one step (Linux
    ``syncfs``): True when done; False when this system has no ``syncfs``; :class:`OSError`
    when it failed."""
    lib = libc()
    function = getattr(lib, "syncfs", None) if lib is not None else None
    if function is None:
        return False
    if function(fd) == 0:
        return True
    code = ctypes.get_errno()
    raise OSError(code, os.strerror(code))


def link_at(fd: int, target: Path) -> None:
    """Give the open file ``fd`` (an unnamed one, say) the name ``target`` (``linkat``, Linux):
    never replaces anything, :class:`FileExistsError` when ``target`` exists; other
    :class:`OSError` as ``linkat`` reports it."""
    lib = libc()
    if lib is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS), str(target))
    name = os.fsencode(target)
    source = f"{_PROC_FD}/{fd}".encode()
    if lib.linkat(AT_FDCWD, source, AT_FDCWD, name, _AT_SYMLINK_FOLLOW) == 0:
        return
    code = ctypes.get_errno()
    if code == errno.ENOENT and not os.path.isdir(_PROC_FD):
        # No /proc: AT_EMPTY_PATH (needs CAP_DAC_READ_SEARCH before Linux 6.10).
        if lib.linkat(fd, b"", AT_FDCWD, name, _AT_EMPTY_PATH) == 0:
            return
        code = ctypes.get_errno()
    raise OSError(code, os.strerror(code), str(target))


def unnamed_files() -> bool:
    """Whether this system can make unnamed files and link them (Linux with a libc)."""
    return bool(_O_TMPFILE) and sys.platform.startswith("linux") and libc() is not None


# ---------------------------------------------------------------------------- the seam


class Disk:
    """The disk's operations, each an attribute holding the function to call.

    The signatures are those of :mod:`os`; ``sync_data`` is ``fdatasync`` where there is one,
    ``fadvise`` is ``posix_fadvise`` or None (macOS, Windows), ``preadv`` likewise;
    ``syncfs`` and ``link_at`` are :func:`syncfs` and :func:`link_at`.
    """

    open: Callable[..., int]
    pwrite: Callable[[int, Buffer, int], int]
    pread: Callable[[int, int, int], bytes]
    preadv: Callable[[int, Sequence[memoryview], int], int] | None
    fsync: Callable[[int], None]
    sync_data: Callable[[int], None]
    sync_directory: Callable[[Path], None]
    syncfs: Callable[[int], bool]
    fadvise: Callable[[int, int, int, int], None] | None
    unlink: Callable[[Path], None]
    link: Callable[[Path, Path], None]
    link_at: Callable[[int, Path], None]
    lexists: Callable[[Path], bool]
    rename_exclusive: Callable[[Path, Path], bool]
    free_space: Callable[[Path], int]
    unnamed_files: Callable[[], bool]
    # Derived by bind():
    write_all: Callable[[int, Buffer, int], None]
    read_exact: Callable[[int, int, int], bytes]

    def __init__(self) -> None:
        self.open = os.open
        self.pwrite = _PWRITE
        self.pread = _PREAD
        self.preadv = getattr(os, "preadv", None)
        self.fsync = os.fsync
        self.sync_data = getattr(os, "fdatasync", None) or os.fsync
        self.sync_directory = sync_directory
        self.syncfs = syncfs
        self.fadvise = getattr(os, "posix_fadvise", None)
        self.unlink = os.unlink
        self.link = link_no_follow
        self.link_at = link_at
        self.lexists = os.path.lexists
        self.rename_exclusive = rename_exclusive
        self.free_space = free_space
        self.unnamed_files = unnamed_files
        self.bind()

    def bind(self) -> None:
        """(Re)derive the compound operations from the primitives."""
        self.write_all = functools.partial(pwrite_all, pwrite=self.pwrite)
        self.read_exact = functools.partial(pread_exact, pread=self.pread)

    def sync_directories(self, folders: Iterable[Path]) -> None:
        """Make the new names in each folder durable, once per folder (a batch of files shares
        one sync). Best effort: the files themselves are already synced."""
        for folder in sorted(set(folders)):
            with contextlib.suppress(OSError):
                self.sync_directory(folder)


DISK: Final = Disk()
"""The real disk: the default everywhere."""
