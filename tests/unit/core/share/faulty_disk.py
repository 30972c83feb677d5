"""A disk that fails when told to: the receiver's disk faults without patching module functions.

Hand :class:`FaultyDisk` to whatever takes a ``disk`` (``PartialFile.open``,
``store_whole_files``, ``rename_no_replace``, ``store_small_files``, ``walk``, ``ChunkReader``,
``read_whole_files``, ``TransferService``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from meshagent_gui.core.share.disk import Buffer, Disk

# Logged with their arguments (the others carry data, or are too many to keep).
_LOGGED = (
    "open",
    "fsync",
    "sync_data",
    "sync_directory",
    "syncfs",
    "fadvise",
    "unlink",
    "link",
    "link_at",
    "rename_exclusive",
    "free_space",
)

_FAILABLE = (*_LOGGED, "pwrite", "pread", "preadv")


def _no_advice(fd: int, offset: int, length: int, advice: int) -> None:
    pass


class FaultyDisk(Disk):
    """The real disk, but ``fail`` (an operation's name: ``"pwrite"``, ``"fsync"``,
    ``"link"``, ``"open"``...) raises ``OSError(error)`` once ``after_calls`` calls of it have
    succeeded, or, for ``"pwrite"``, once ``after_bytes`` bytes were written (the write that
    reaches the limit is short, as on a disk that fills up). :meth:`heal` ends the fault.

    Also: ``free`` is what ``free_space`` reports; ``unnamed_files=False`` is a system without
    ``O_TMPFILE``; ``syncfs=False`` one without ``syncfs`` (each file is synced instead);
    ``exclusive_rename=False`` a filesystem without a no-replace rename;
    ``lexists=False`` an existence check that another writer beats every time.
    What was done is in :attr:`calls` (``(operation, arguments)``, in order; ``pwrite`` logs
    ``(fd, length, offset)``, ``preadv`` ``(fd, offset, bytes read)``).
    """

    def __init__(
        self,
        *,
        fail: str | None = None,
        error: int = errno.ENOSPC,
        after_calls: int = 0,
        after_bytes: int | None = None,
        free: int | None = None,
        unnamed_files: bool | None = None,
        exclusive_rename: bool = True,
        syncfs: bool = True,
        lexists: bool | None = None,
    ) -> None:
        super().__init__()
        self.fail: str | None = None
        self.error = error
        self.after_calls = 0
        self.after_bytes: int | None = None
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.failures = 0
        self.written = 0
        self._counts: dict[str, int] = {}
        if fail is not None:
            self.fault(fail, error=error, after_calls=after_calls, after_bytes=after_bytes)
        if self.fadvise is None:  # macOS, Windows: still logged, so tests see the advice
            self.fadvise = _no_advice
        for name in _LOGGED:
            setattr(self, name, self._wrap(name, getattr(self, name)))
        self.pwrite = self._pwrite(self.pwrite)
        if self.preadv is not None:
            self.preadv = self._preadv(self.preadv)
        self.pread = self._wrap("pread", self.pread, log=False)
        if free is not None:
            self.free_space = self._wrap("free_space", lambda folder: free)
        if unnamed_files is not None:
            self.unnamed_files = lambda: unnamed_files
        if not exclusive_rename:
            self.rename_exclusive = self._wrap("rename_exclusive", lambda source, target: False)
        if not syncfs:
            self.syncfs = self._wrap("syncfs", lambda fd: False)
        if lexists is not None:
            self.lexists = lambda path: lexists
        self.bind()

    def fault(
        self,
        name: str,
        *,
        error: int = errno.ENOSPC,
        after_calls: int = 0,
        after_bytes: int | None = None,
    ) -> None:
        """From now on, ``name`` fails with ``error`` after ``after_calls`` more calls (or, for
        ``"pwrite"``, ``after_bytes`` more bytes)."""
        if name not in _FAILABLE:
            raise ValueError(f"the disk has no operation {name!r}")
        self.fail = name
        self.error = error
        self.after_calls = self._counts.get(name, 0) + after_calls
        self.after_bytes = None if after_bytes is None else self.written + after_bytes

    def heal(self) -> None:
        """The fault is over (space was freed, the disk came back)."""
        self.fail = None

    def calls_of(self, name: str) -> list[tuple[Any, ...]]:
        """The arguments of each call of ``name``, in order."""
        return [arguments for called, arguments in self.calls if called == name]

    # ---------------------------------------------------------------- faults

    def _due(self, name: str) -> bool:
        """Count a call of ``name``; whether it must fail."""
        count = self._counts.get(name, 0)
        self._counts[name] = count + 1
        return name == self.fail and self.after_bytes is None and count >= self.after_calls

    def _raise(self, *where: object) -> None:
        self.failures += 1
        raise OSError(self.error, os.strerror(self.error), *(str(w) for w in where[:1]))

    def _wrap(self, name: str, real: Callable[..., Any], *, log: bool = True) -> Callable[..., Any]:
        def operation(*args: Any, **kwargs: Any) -> Any:
            if self._due(name):
                self._raise(*(a for a in args if isinstance(a, Path)))
            result = real(*args, **kwargs)
            if log:
                self.calls.append((name, args))
            return result

        return operation

    def _pwrite(self, real: Callable[[int, Buffer, int], int]) -> Callable[[int, Buffer, int], int]:
        def pwrite(fd: int, data: Buffer, offset: int) -> int:
            if self.fail == "pwrite" and self.after_bytes is not None:
                room = self.after_bytes - self.written
                if room <= 0:
                    self._raise()
                data = memoryview(data)[:room]
            elif self._due("pwrite"):
                self._raise()
            written = real(fd, data, offset)
            self.written += written
            self.calls.append(("pwrite", (fd, written, offset)))
            return written

        return pwrite

    def _preadv(
        self, real: Callable[[int, Sequence[memoryview], int], int]
    ) -> Callable[[int, Sequence[memoryview], int], int]:
        def preadv(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
            if self._due("preadv"):
                self._raise()
            got = real(fd, buffers, offset)
            self.calls.append(("preadv", (fd, offset, got)))
            return got

        return preadv
