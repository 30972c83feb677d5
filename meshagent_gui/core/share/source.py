"""The sender's side on disk: what an offer contains (:func:`walk`) and reading it (ChunkReader).

Paths in an offer are POSIX, relative, and start with the name of the item the user named:
sending ``/a/b/photos`` gives ``photos``, ``photos/2024``, ``photos/2024/beach.jpg``...;
sending a file gives just its name. Names are NFC-normalised and pass
:func:`~meshagent_gui.core.share.paths.safe_relative_path` (the receiver's own rules), so the
receiver never refuses an offer we build.

Link and special-file policy, inside a folder being sent: a symbolic link (to anything,
inside or outside the tree) is never followed and never sent; it is skipped and reported in
:attr:`Manifest.skipped` with the reason, and so are FIFOs, sockets and devices, folders and
files we may not read, and names the receiver would refuse. An item the user named on the command
line is taken as named, even if it is itself a link (like ``cp`` and ``scp`` do); a named item
that is missing, unreadable or special is a :class:`UserError`.

Order is stable: every folder first (parents before children, so empty folders survive and
the receiver creates them before any file), then the files. Both lists follow one depth-first
walk in code point order of the names, in which a folder's own files come before its
sub-folders' contents.

A ``key`` identifies one version of one file: blake3 (derive-key mode) of the path, size,
mtime and inode/device. The same key next time means the same bytes, so the receiver's
verified chunks still count.

Files are opened and read through a :class:`~meshagent_gui.core.share.disk.Disk` (``disk=``,
the real one by default), so tests fail an open or a read without patching :mod:`os`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, Protocol

from blake3 import blake3

from meshagent_gui.core.protocol.transfer import chunk_count, chunk_length
from meshagent_gui.errors import UserError

from .disk import DISK, POSIX_FADV_SEQUENTIAL, Disk
from .paths import UnsafePath, is_link, safe_relative_path

DEFAULT_READ_AHEAD: Final = 4
MAX_ENTRIES: Final = 1_000_000  # as the offer allows
KEY_SIZE: Final = 16
KEY_CONTEXT: Final = "meshagent 2026-01 transfer entry key v1"
FILE_MODE: Final = 0o644
EXEC_MODE: Final = 0o755

_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)
_BINARY: Final = getattr(os, "O_BINARY", 0)
_KEY_FIELDS: Final = struct.Struct("!QqQQ")

Kind = Literal["file", "dir"]


@dataclass(frozen=True, slots=True)
class SourceEntry:
    """One item of an offer, plus what the sender needs to read it back and spot changes."""

    path: str  # POSIX relative path as offered, e.g. "photos/2024/beach.jpg"
    kind: Kind
    size: int
    mode: int  # 0o755 or 0o644: only the exec bit matters
    mtime_ns: int
    key: bytes  # 16 bytes: this version of this file
    source: Path  # where it is on this machine
    inode: int
    device: int
    made: MadeSource | None = None  # a file made on the fly (a folder as one zip): read from it


class OpenedSource(Protocol):
    """What reads an entry's bytes: the file itself (_OpenFile), or a made one (a zip)."""

    def read(self, chunk: int, chunk_size: int) -> bytes: ...
    def read_at(self, offset: int, length: int) -> bytes: ...
    def check_end(self) -> None: ...
    def close(self) -> None: ...


class MadeSource(Protocol):
    """A file that exists only as it is sent (core/share/zipsource.py)."""

    def open(self, disk: Disk) -> OpenedSource: ...


def open_source(entry: SourceEntry, disk: Disk) -> OpenedSource:
    """Open an entry for reading, checked against the walk (blocking: call it in a worker)."""
    if entry.made is not None:
        return entry.made.open(disk)
    return _OpenFile(entry, disk)


@dataclass(frozen=True, slots=True)
class SkippedPath:
    """Something inside a folder that is not sent, and why."""

    path: str  # as it would have been offered (or the local path if it has no valid name)
    source: Path
    reason: str


@dataclass(frozen=True, slots=True)
class Manifest:
    entries: tuple[SourceEntry, ...]
    skipped: tuple[SkippedPath, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.entries)

    @property
    def files(self) -> int:
        return sum(1 for entry in self.entries if entry.kind == "file")

    @property
    def has_folders(self) -> bool:
        """An offer with a folder needs the ``share:folder`` scope."""
        return any(entry.kind == "dir" for entry in self.entries)


class SourceChanged(UserError):
    """A file changed (or vanished) between the walk and the end of its reading."""

    def __init__(self, entry: SourceEntry, what: str) -> None:
        super().__init__(f"{entry.source} changed while it was being sent: {what}", code="changed")
        self.entry = entry


# ---------------------------------------------------------------------------- walking


def entry_key(path: str, info: os.stat_result) -> bytes:
    """The 16-byte version key of the item at ``path`` (as offered) with ``info``."""
    fields = _KEY_FIELDS.pack(info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev)
    hasher = blake3(fields + path.encode(), derive_key_context=KEY_CONTEXT)
    return hasher.digest(length=KEY_SIZE)


def _entry(path: str, kind: Kind, source: Path, info: os.stat_result) -> SourceEntry:
    is_file = kind == "file"
    return SourceEntry(
        path=path,
        kind=kind,
        size=info.st_size if is_file else 0,
        mode=EXEC_MODE if not is_file or info.st_mode & 0o111 else FILE_MODE,
        mtime_ns=info.st_mtime_ns,
        key=entry_key(path, info),
        source=source,
        inode=info.st_ino,
        device=info.st_dev,
    )


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file or folder"


class _Walker:
    def __init__(self, disk: Disk) -> None:
        self.disk = disk
        self.folders: list[SourceEntry] = []
        self.files: list[SourceEntry] = []
        self.skipped: list[SkippedPath] = []
        self.offered: set[str] = set()  # NFC paths, to catch names that differ only in form

    def count(self) -> int:
        return len(self.folders) + len(self.files)

    def add(self, entry: SourceEntry) -> None:
        if self.count() >= MAX_ENTRIES:
            raise UserError(f"too many files and folders to send (more than {MAX_ENTRIES:,})")
        self.offered.add(entry.path)
        (self.files if entry.kind == "file" else self.folders).append(entry)

    def top_level(self, given: Path) -> None:
        local = Path(os.path.abspath(given))
        if not local.name:
            raise UserError(f"cannot send {given}: it has no name (a filesystem root?)")
        try:
            info = os.stat(local)  # a named item is taken as named, links included
        except FileNotFoundError:
            raise UserError(f"cannot send {given}: no such file or folder") from None
        except OSError as exc:
            raise UserError(f"cannot send {given}: {exc.strerror}") from None
        try:
            name = str(safe_relative_path(local.name))
        except UnsafePath as exc:
            raise UserError(f"cannot send {given}: {exc.reason}") from None
        if name in self.offered:
            raise UserError(f"two items to send are both named {name!r}: send them separately")
        if stat.S_ISREG(info.st_mode):
            _check_readable(given, local, folder=False, disk=self.disk)
            self.add(_entry(name, "file", Path(os.path.realpath(local)), info))
        elif stat.S_ISDIR(info.st_mode):
            _check_readable(given, local, folder=True, disk=self.disk)
            self.add(_entry(name, "dir", local, info))
            self.folder(name, Path(os.path.realpath(local)))
        else:
            raise UserError(f"cannot send {given}: it is {_special_kind(info.st_mode)}")

    def folder(self, top: str, root: Path) -> None:
        """Everything under ``root`` (offered as ``top``), depth first, never through a link.

        A folder's entry is recorded when it is walked (pre-order, names in order); within a
        folder, its files come before those of its sub-folders.
        """
        pending: list[tuple[str, Path, os.stat_result | None]] = [(top, root, None)]
        while pending:
            rel, directory, info = pending.pop()
            if info is not None:
                self.add(_entry(rel, "dir", directory, info))
            try:
                with os.scandir(directory) as listing:
                    children = sorted(listing, key=lambda child: child.name)
            except OSError as exc:
                self.skip(rel, directory, f"cannot list the folder: {exc.strerror}")
                continue
            subfolders: list[tuple[str, Path, os.stat_result | None]] = []
            for child in children:
                found = self.child(rel, child)
                if found is not None:
                    subfolders.append(found)
            pending.extend(reversed(subfolders))  # popped in name order

    def child(
        self, parent: str, child: os.DirEntry[str]
    ) -> tuple[str, Path, os.stat_result | None] | None:
        """Record one directory entry; a sub-folder comes back to be walked."""
        local = Path(child.path)
        try:
            child.name.encode("utf-8")
        except UnicodeEncodeError:
            self.skip(f"{parent}/{child.name!r}", local, "the name is not valid UTF-8")
            return None
        try:
            rel = str(safe_relative_path(f"{parent}/{child.name}"))
        except UnsafePath as exc:
            self.skip(f"{parent}/{child.name}", local, exc.reason)
            return None
        if rel in self.offered:
            self.skip(rel, local, "another name in this folder is the same after normalisation")
            return None
        try:
            info = child.stat(follow_symlinks=False)
        except OSError as exc:
            self.skip(rel, local, f"cannot read it: {exc.strerror}")
            return None
        if is_link(info):
            self.skip(rel, local, "a symbolic link (links are never followed)")
            return None
        if stat.S_ISDIR(info.st_mode):
            if not os.access(local, os.R_OK | os.X_OK):
                self.skip(rel, local, "cannot list the folder: permission denied")
                return None
            self.offered.add(rel)  # its entry is added when it is walked
            return rel, local, info
        if stat.S_ISREG(info.st_mode):
            if not os.access(local, os.R_OK):
                self.skip(rel, local, "cannot read it: permission denied")
                return None
            self.add(_entry(rel, "file", local, info))
            return None
        self.skip(rel, local, f"{_special_kind(info.st_mode)} (only files and folders are sent)")
        return None

    def skip(self, rel: str, local: Path, reason: str) -> None:
        self.skipped.append(SkippedPath(rel, local, reason))


def _check_readable(given: Path, local: Path, *, folder: bool, disk: Disk) -> None:
    try:
        if folder:
            with os.scandir(local):
                pass
        else:
            os.close(disk.open(local, os.O_RDONLY | _BINARY))
    except OSError as exc:
        raise UserError(f"cannot send {given}: {exc.strerror}") from None


def walk(paths: Sequence[Path], *, disk: Disk = DISK) -> Manifest:
    """The offer for ``paths`` (files and folders, in this order). Blocking: run it in a thread.
    A named file is opened once through ``disk`` to check that it can be read.

    Raises :class:`UserError` (one line, naming the path) for a named item that is missing,
    unreadable, special, or has a name the receiver would refuse.
    """
    walker = _Walker(disk)
    seen: set[tuple[int, int]] = set()
    for given in paths:
        try:
            identity = os.stat(given)
        except OSError:
            identity = None
        if identity is not None:
            if (identity.st_dev, identity.st_ino) in seen:
                continue  # the same item named twice
            seen.add((identity.st_dev, identity.st_ino))
        walker.top_level(given)
    return Manifest(tuple(walker.folders + walker.files), tuple(walker.skipped))


# ---------------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class SourceChunk:
    chunk: int
    digest: bytes  # blake3 of data
    data: bytes


def _is_wanted(have: bytes, chunk: int) -> bool:
    byte = chunk >> 3
    return byte >= len(have) or not have[byte] & (1 << (chunk & 7))


class _OpenFile:
    """The file behind an entry, checked against the walk at open and at the end."""

    def __init__(self, entry: SourceEntry, disk: Disk) -> None:
        self.entry = entry
        self.read_exact = disk.read_exact
        try:
            self.fd = disk.open(entry.source, os.O_RDONLY | _NOFOLLOW | _BINARY)
        except FileNotFoundError:
            raise SourceChanged(entry, "it was deleted") from None
        except OSError as exc:
            raise UserError(f"cannot read {entry.source}: {exc.strerror}") from None
        try:
            self.check("at open")
            if disk.fadvise is not None:
                disk.fadvise(self.fd, 0, 0, POSIX_FADV_SEQUENTIAL)
        except BaseException:
            self.close()
            raise

    def check(self, when: str) -> None:
        info = os.fstat(self.fd)
        entry = self.entry
        if (info.st_ino, info.st_dev) != (entry.inode, entry.device):
            raise SourceChanged(entry, f"it was replaced by another file ({when})")
        if info.st_size != entry.size:
            raise SourceChanged(entry, f"its size is now {info.st_size} bytes ({when})")
        if info.st_mtime_ns != entry.mtime_ns:
            raise SourceChanged(entry, f"it was modified ({when})")

    def read(self, chunk: int, chunk_size: int) -> bytes:
        return self.read_at(chunk * chunk_size, chunk_length(self.entry.size, chunk_size, chunk))

    def read_at(self, offset: int, length: int) -> bytes:
        data = self.read_exact(self.fd, length, offset)
        if len(data) != length:
            raise SourceChanged(self.entry, "it became shorter")
        return data

    def check_end(self) -> None:
        if self.read_exact(self.fd, 1, self.entry.size):
            raise SourceChanged(self.entry, "it became longer")
        self.check("at the end")

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


# (next chunk number to read, the chunk to send if any, whether the file has ended)
_Read = tuple[int, SourceChunk | None, bool]


class ChunkReader:
    """Reads one file's chunks off the event loop, ``read_ahead`` chunks ahead at most.

    ::

        async with ChunkReader(entry, chunk_size, have=answer_bitmap) as reader:
            async for chunk in reader:          # SourceChunk(chunk, digest, data)
                await channel.send(Chunk(index, chunk.chunk, chunk.digest, chunk.data))
            await channel.send(FileEnd(index, reader.file_digest))

    Chunks set in ``have`` (the receiver's bitmap) are read and hashed but not yielded: the
    whole-file blake3 is computed while streaming, from the first byte, with no pass before.
    At most one read runs at a time (the running hash needs the chunks in order), so any
    executor will do. The file is checked against the walk (inode, size, mtime) at open and
    after the last byte: :class:`SourceChanged` if it differs. The file is opened and read
    through ``disk``.
    """

    def __init__(
        self,
        entry: SourceEntry,
        chunk_size: int,
        *,
        have: bytes = b"",
        read_ahead: int = DEFAULT_READ_AHEAD,
        executor: Executor | None = None,
        disk: Disk = DISK,
    ) -> None:
        if entry.kind != "file":
            raise ValueError(f"{entry.path} is a folder: it has no chunks")
        if chunk_size <= 0 or read_ahead <= 0:
            raise ValueError("chunk_size and read_ahead must be positive")
        self.entry = entry
        self.chunk_size = chunk_size
        self.chunk_count = chunk_count(entry.size, chunk_size)
        self.read_ahead = read_ahead
        self.max_held_chunks = 0  # high-water mark of chunks read but not yet taken
        self.bytes_read = 0
        self._have = bytes(have)
        self._executor = executor
        self._disk = disk
        self._hasher = blake3()
        self._file: OpenedSource | None = None
        self._next = 0  # the next chunk number to read
        self._ready: deque[SourceChunk] = deque()
        self._inflight: asyncio.Future[_Read] | None = None
        self._landed_event = asyncio.Event()
        self._error: BaseException | None = None
        self._ended = False
        self._closed = False
        self._digest: bytes | None = None

    @property
    def held_chunks(self) -> int:
        """Chunks in memory here: read and waiting, plus the one being read."""
        return len(self._ready) + (self._inflight is not None)

    @property
    def file_digest(self) -> bytes:
        """blake3 of the whole file; available once iteration has ended."""
        if self._digest is None:
            raise RuntimeError(f"{self.entry.path} has not been read to the end")
        return self._digest

    async def __aenter__(self) -> ChunkReader:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> ChunkReader:
        return self

    async def __anext__(self) -> SourceChunk:
        while True:
            if self._ready:
                item = self._ready.popleft()
                self._pump()
                return item
            if self._error is not None:
                raise self._error
            if self._ended:
                raise StopAsyncIteration
            if self._closed:
                raise RuntimeError(f"the reader of {self.entry.path} is closed")
            self._pump()
            self._landed_event.clear()
            await self._landed_event.wait()

    def _pump(self) -> None:
        """Start the next read if nothing is being read and the read-ahead has room."""
        if self._inflight is not None or self._ended or self._closed or self._error:
            return
        if len(self._ready) + 1 > self.read_ahead:
            return
        loop = asyncio.get_running_loop()
        self._inflight = loop.run_in_executor(self._executor, self._read_next, self._next)
        self.max_held_chunks = max(self.max_held_chunks, self.held_chunks)
        self._inflight.add_done_callback(self._landed)

    def _landed(self, done: asyncio.Future[_Read]) -> None:
        self._inflight = None
        self._landed_event.set()
        if done.cancelled():
            return
        error = done.exception()
        if error is not None:
            self._error = error
            return
        self._next, item, ended = done.result()
        if item is not None:
            self._ready.append(item)
        if ended:
            self._ended = True
            self._digest = self._hasher.digest()
        self._pump()

    def _read_next(self, chunk: int) -> _Read:
        """In a worker: read (and hash) from ``chunk`` on until one chunk to send is read or the
        file ends; at the end the file is checked against the walk and closed. Chunks the
        receiver already has are only hashed."""
        try:
            if self._file is None:
                self._file = open_source(self.entry, self._disk)
            while chunk < self.chunk_count:
                data = self._file.read(chunk, self.chunk_size)
                self._hasher.update(data)
                self.bytes_read += len(data)
                chunk += 1
                if _is_wanted(self._have, chunk - 1):
                    ended = chunk == self.chunk_count
                    if ended:
                        self._end_file()  # a one-chunk file costs one trip to the worker
                    return chunk, SourceChunk(chunk - 1, blake3(data).digest(), data), ended
            self._end_file()
            return chunk, None, True
        except BaseException:
            self._close_file()
            raise

    def _end_file(self) -> None:
        assert self._file is not None
        self._file.check_end()
        self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()

    async def aclose(self) -> None:
        """Stop reading; waits for a read in progress (its buffer and descriptor) to finish."""
        self._closed = True
        inflight = self._inflight
        if inflight is not None:
            await asyncio.wait({inflight})
        self._ready.clear()
        self._close_file()


async def read_one_chunk(
    entry: SourceEntry,
    chunk_size: int,
    chunk: int,
    *,
    executor: Executor | None = None,
    disk: Disk = DISK,
) -> SourceChunk:
    """Read chunk ``chunk`` again (the receiver asked for a resend), checking the file first."""
    if not 0 <= chunk < chunk_count(entry.size, chunk_size):
        raise ValueError(f"{entry.path} has no chunk {chunk}")

    def read() -> SourceChunk:
        opened = open_source(entry, disk)
        try:
            data = opened.read(chunk, chunk_size)
            return SourceChunk(chunk, blake3(data).digest(), data)
        finally:
            opened.close()

    return await asyncio.get_running_loop().run_in_executor(executor, read)


def read_whole_files(
    entries: Sequence[SourceEntry], *, disk: Disk = DISK
) -> list[SourceChunk | BaseException]:
    """(Blocking) each file of at most one chunk, read whole and checked against the walk
    like :class:`ChunkReader` does, in one trip to a worker for many small files. A file of one
    chunk has one digest: the chunk's is the file's. Per file: its chunk, or why it failed."""
    pieces: list[SourceChunk | BaseException] = []
    for entry in entries:
        try:
            opened = open_source(entry, disk)
        except (SourceChanged, UserError) as exc:
            pieces.append(exc)
            continue
        try:
            data = opened.read(0, max(entry.size, 1)) if entry.size else b""
            opened.check_end()
            pieces.append(SourceChunk(0, blake3(data).digest(), data))
        except (SourceChanged, UserError) as exc:
            pieces.append(exc)
        except OSError as exc:
            pieces.append(UserError(f"cannot read {entry.source}: {exc.strerror}"))
        finally:
            opened.close()
    return pieces


def describe_skipped(skipped: Iterable[SkippedPath]) -> list[str]:
    """One line per skipped item, for the CLI and the logs."""
    return [f"skipped {item.path}: {item.reason}" for item in skipped]
