"""One incoming file on the receiver's disk: chunks land in place, resume after any crash.

Files beside the wanted destination ``<dir>/<name>``:

``<name>.meshpart``
    The data, each chunk written at ``chunk * chunk_size``. Not sized up front: the file
    grows as chunks land, so a partial left behind shows (in a file manager too) about what
    arrived, not the whole size. Partials older than ``transfer.partial_max_age`` are removed
    when an agent starts (:func:`remove_stale_partials`).
``<name>.meshpart.state``
    What is known to be there. A fixed 128-byte header, then the digest table:

    ======  =====  ==========================================================================
    offset  bytes  field (big-endian)
    ======  =====  ==========================================================================
    0       8      magic ``MESHPART``
    8       2      format version (1)
    10      2      table offset (128)
    12      8      file size
    20      4      chunk size
    24      4      chunk count (``ceil(size / chunk_size)``)
    28      32     blake3 of the sender's device id (UTF-8)
    60      16     entry key (the sender's id for this version of this file)
    76      16     first 16 bytes of blake3 over bytes 0-75 (a torn or foreign header)
    92      36     zero
    128     32*n   blake3 of chunk ``i`` at ``128 + 32*i``; 32 zero bytes = missing
    ======  =====  ==========================================================================

    A landed chunk updates its one 32-byte entry with ``pwrite``; entries never straddle a
    512-byte sector, so a crash leaves each one old or new, never half. The table is written
    in full (zeros) when the file is created, so updates never need new space.

Crash safety. A chunk's digest is written only after its data, but the kernel may still put
them on disk in either order, so the table is a claim, not a proof: :meth:`PartialFile.open`
re-reads every claimed chunk and hashes it; a chunk whose data did not survive is missing
again (and its entry is zeroed). The state file is always checked and a bad one (short, foreign
magic, unknown version, bad checksum, wrong table size) never crashes anything: the partial
starts over (:class:`PartialCorrupt` names the reason in :attr:`PartialFile.discarded`).

Durability. A killed process loses nothing (the page cache survives it). Against power loss,
every ``sync_every`` bytes (64 MiB by default) the data is synced, then the state: at most
that much verified work is lost. What a sync made durable and the whole-file hash has seen is
then dropped from the page cache (nothing reads it again, and writes into recycled pages cost
less CPU). :meth:`PartialFile.finish` checks the blake3 of the whole file in order, syncs it,
renames it into place with no overwrite (``name (1).ext`` on a clash,
:func:`~meshagent_gui.core.share.paths.move_to_unique`), syncs the folder, and only then
deletes the state file. A crash between the rename and that delete leaves a state file with no
data beside it, which the next open of that name discards.

The whole-file hash runs while chunks land: each chunk that extends the in-order prefix is
hashed from the verified bytes just written (chunks that overtook it are read back from the
page cache to catch up; a resume hashes the verified prefix while re-checking it), so
``finish`` reads back only what never joined the prefix, or everything with
``full_read_back=True``. Reading 1 GiB back costs about a second at the end of a transfer on
the reference machine (tests/benchmarks/test_bench_share_disk.py).

Sharing a name. The state file is locked (``flock``; ``msvcrt.locking`` on Windows) while a
:class:`PartialFile` has it open. A name held by another live writer, or by another sender's
unfinished partial, is left alone and the next slot is used (``<name>.1.meshpart``...); a
partial from the same sender for another version of the file (another key) is stale and is
replaced.

Every blocking call runs in an executor (the default one unless given): nothing blocks the loop.
The disk is reached through a :class:`~meshagent_gui.core.share.disk.Disk` (the real one unless
given), so tests fail its operations instead of patching this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import stat
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from blake3 import blake3

from meshagent_gui.core.protocol.transfer import chunk_count, chunk_length
from meshagent_gui.errors import UserError

from .disk import DISK, POSIX_FADV_DONTNEED, Disk
from .paths import MAX_COMPONENT_BYTES, move_to_unique

MiB: Final = 1024 * 1024
MAGIC: Final = b"MESHPART"
FORMAT_VERSION: Final = 1
DIGEST_SIZE: Final = 32
KEY_SIZE: Final = 16
TABLE_OFFSET: Final = 128
MAX_CHUNK_SIZE: Final = 16 * MiB
MAX_CHUNKS: Final = 2**32 - 1  # chunk numbers are u32 on the wire
DEFAULT_SYNC_EVERY: Final = 64 * MiB
MAX_SLOTS: Final = 32
VERIFY_BLOCK: Final = 4 * MiB
PARTIAL_SUFFIX: Final = ".meshpart"
STATE_SUFFIX: Final = ".meshpart.state"

_HEADER: Final = struct.Struct("!8sHHQII32s16s")
_CHECKSUM_SIZE: Final = 16
_ZERO_DIGEST: Final = bytes(DIGEST_SIZE)
_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)
_BINARY: Final = getattr(os, "O_BINARY", 0)
_DISK_FULL: Final = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
# Windows cannot rename or delete a file that is open (os.open does not share delete access).
_OPEN_FILES_PINNED: Final = sys.platform == "win32"

T = TypeVar("T")


# ---------------------------------------------------------------------------- errors


class DiskFull(UserError):
    """No space (or quota) left for an incoming file; the partial is kept for a resume."""

    def __init__(self, path: Path, needed: int | None = None) -> None:
        more = f" ({_human(needed)} more needed)" if needed else ""
        super().__init__(f"the disk is full: cannot store {path.name}{more}", code="disk_full")
        self.path = path


class HashMismatch(UserError):
    """Received data does not match its blake3: one chunk (``chunk``) or the whole file (None)."""

    def __init__(self, path: Path, chunk: int | None) -> None:
        what = f"chunk {chunk} of {path.name}" if chunk is not None else path.name
        super().__init__(f"{what} arrived damaged (blake3 mismatch)", code="hash_mismatch")
        self.path = path
        self.chunk = chunk


class PartialCorrupt(Exception):
    """A state file that cannot be trusted; :meth:`PartialFile.open` starts that file over."""


def _human(count: int) -> str:
    return f"{count / MiB:.1f} MiB" if count >= MiB else f"{count} bytes"


@contextlib.contextmanager
def _disk_errors(path: Path, needed: int | None = None) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT into :class:`DiskFull` (and EFBIG into a clear UserError)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise DiskFull(path, needed) from exc
        if exc.errno == errno.EFBIG:
            raise UserError(
                f"{path.name} is too large for the receiving filesystem", code="file_too_large"
            ) from exc
        raise


# ---------------------------------------------------------------------------- layout


@dataclass(frozen=True, slots=True)
class StateHeader:
    size: int
    chunk_size: int
    sender: bytes  # blake3 of the sender's device id
    key: bytes

    @property
    def chunks(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    def encode(self) -> bytes:
        head = _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            TABLE_OFFSET,
            self.size,
            self.chunk_size,
            self.chunks,
            self.sender,
            self.key,
        )
        head += blake3(head).digest()[:_CHECKSUM_SIZE]
        return head.ljust(TABLE_OFFSET, b"\0")

    @classmethod
    def decode(cls, raw: bytes) -> StateHeader:
        """Parse a header, or :class:`PartialCorrupt` saying what is wrong with it."""
        end = _HEADER.size + _CHECKSUM_SIZE
        if len(raw) < end:
            raise PartialCorrupt("the state file is truncated")
        magic, version, table_offset, size, chunk_size, chunks, sender, key = _HEADER.unpack_from(
            raw
        )
        if magic != MAGIC:
            raise PartialCorrupt("the state file is not ours")
        if version != FORMAT_VERSION or table_offset != TABLE_OFFSET:
            raise PartialCorrupt(f"unknown state file version {version}")
        if raw[_HEADER.size : end] != blake3(raw[: _HEADER.size]).digest()[:_CHECKSUM_SIZE]:
            raise PartialCorrupt("the state file header is damaged")
        if not 0 < chunk_size <= MAX_CHUNK_SIZE or chunks != chunk_count(size, chunk_size):
            raise PartialCorrupt("the state file header is inconsistent")
        return cls(size=size, chunk_size=chunk_size, sender=sender, key=key)


def slot_names(destination: Path, slot: int) -> tuple[Path, Path]:
    """(data, state) paths of slot ``slot`` for ``destination``, within the name-length limit."""
    tag = f".{slot}" if slot else ""
    name = destination.name
    room = MAX_COMPONENT_BYTES - len((tag + STATE_SUFFIX).encode())
    if len(name.encode("utf-8", "surrogatepass")) > room:
        # Keep the names apart: a short stable hash of the full name replaces its tail.
        mark = "~" + blake3(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        encoded = name.encode("utf-8", "surrogatepass")[: room - len(mark)]
        name = encoded.decode("utf-8", "ignore") + mark
    base = destination.with_name(name + tag)
    return Path(str(base) + PARTIAL_SUFFIX), Path(str(base) + STATE_SUFFIX)


def partial_exists(destination: Path, states: frozenset[str] | None = None) -> bool:
    """Whether any slot beside ``destination`` holds a partial.

    No locking, no reading: one ``lstat`` per slot (blocking), or none when ``states`` (the
    folder's state-file names, from :func:`state_files_in`) is given, as a whole offer's scan
    does. Use it to skip :meth:`PartialFile.open`, which creates a partial, for files with
    nothing to resume.
    """
    if states is not None:
        if not states:
            return False
        return any(slot_names(destination, slot)[1].name in states for slot in range(MAX_SLOTS))
    return any(os.path.lexists(slot_names(destination, slot)[1]) for slot in range(MAX_SLOTS))


def state_files_in(folder: Path) -> frozenset[str]:
    """(Blocking) the names of the partial state files in ``folder``: one directory read."""
    try:
        with os.scandir(folder) as entries:
            return frozenset(e.name for e in entries if e.name.endswith(STATE_SUFFIX))
    except OSError:
        return frozenset()


# ---------------------------------------------------------------------------- low-level I/O


def _try_lock(fd: int) -> bool:
    """Take an exclusive advisory lock on ``fd`` without waiting; False if someone holds it."""
    try:
        if sys.platform == "win32":
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN, errno.EDEADLK):
            return False
        raise
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.lstat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _close_quietly(*fds: int) -> None:
    for fd in fds:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


# ---------------------------------------------------------------------------- leftovers


def remove_stale_partials(folder: Path, max_age: float, *, now: float | None = None) -> list[Path]:
    """(Blocking) delete the partials under ``folder`` (data and state) that nothing touched
    for ``max_age`` seconds: receives abandoned for good. A state file that is not ours (no
    magic), or that a live writer holds (locked), is left alone; links are not followed.
    Returns the data paths removed."""
    now = time.time() if now is None else now
    removed: list[Path] = []
    for where, _, names in os.walk(folder):
        for name in names:
            if name.endswith(STATE_SUFFIX):
                state = Path(where) / name
                data = state.with_name(name.removesuffix(".state"))
                with contextlib.suppress(OSError):
                    if _remove_if_stale(state, data, now - max_age):
                        removed.append(data)
    return removed


def _remove_if_stale(state: Path, data: Path, before: float) -> bool:
    times = [os.lstat(state).st_mtime]
    with contextlib.suppress(FileNotFoundError):
        times.append(os.lstat(data).st_mtime)
    if max(times) >= before:
        return False
    fd = os.open(state, os.O_RDWR | _NOFOLLOW | _BINARY)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or os.read(fd, len(MAGIC)) != MAGIC:
            return False
        if not _try_lock(fd):
            return False  # a receive is writing it right now
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISREG(os.lstat(data).st_mode):
                os.unlink(data)
        if _OPEN_FILES_PINNED:
            _close_quietly(fd)
            fd = -1
        os.unlink(state)  # while locked where we can, as finish() does: nobody adopts it
        return True
    finally:
        _close_quietly(fd)


# ---------------------------------------------------------------------------- the partial file


class PartialFile:
    """One file being received. Create with :meth:`open`; end with :meth:`finish`,
    :meth:`abandon` (keep it for a resume) or :meth:`discard`.

    ``write_chunk`` calls may overlap (distinct chunks); ``finish`` must run after the last one.
    """

    def __init__(
        self,
        *,
        destination: Path,
        header: StateHeader,
        data_path: Path,
        state_path: Path,
        data_fd: int,
        state_fd: int,
        table: bytearray,
        sync_every: int,
        executor: Executor | None,
        discarded: str | None,
        disk: Disk,
    ) -> None:
        self.destination = destination
        self.size = header.size
        self.chunk_size = header.chunk_size
        self.chunk_count = header.chunks
        self.data_path = data_path
        self.state_path = state_path
        self.discarded = discarded
        self._fds = _Descriptors(data_fd, state_fd)
        # Dropped without abandon/finish (a bug, or a test's "crash"): close like a dying
        # process would, so the lock is released and the next open resumes.
        weakref.finalize(self, self._fds.close)
        self._table = table
        self._have = bytearray(-(-self.chunk_count // 8))
        self._sync_every = sync_every
        self._executor = executor
        # The disk's operations, bound once: the chunk path pays one attribute lookup each.
        self._disk = disk
        self._write_all = disk.write_all
        self._read_exact = disk.read_exact
        self._lock = threading.Lock()  # guards the in-memory table, bitmap and counters
        self._unsynced = 0
        self._closed = False
        # blake3 of chunks 0.._hashed_chunks-1, fed with the same verified bytes that were
        # written, so finish() only reads back what did not land in order.
        self._running = blake3()
        self._hashed_chunks = 0
        self._dropped = 0  # the data before this offset was synced and dropped from the cache
        self.verified_bytes = 0
        for chunk in range(self.chunk_count):
            if self._digest_at(chunk) != _ZERO_DIGEST:
                self._mark(chunk)
        self.resumed_bytes = self.verified_bytes

    # -------------------------------------------------------------- opening

    @classmethod
    async def open(
        cls,
        destination: Path,
        *,
        sender: str,
        key: bytes,
        size: int,
        chunk_size: int,
        sync_every: int = DEFAULT_SYNC_EVERY,
        executor: Executor | None = None,
        disk: Disk = DISK,
    ) -> PartialFile:
        """Resume the partial of this (sender, key, size, chunk size) beside ``destination``, or
        start one. Every chunk an existing state file claims is re-read and re-hashed first.

        ``destination`` is the wanted final path (from ``resolve_inside``); its folder must
        exist. Raises :class:`DiskFull` (partial kept) when the free space cannot hold the rest.
        """
        if sync_every <= 0:
            raise ValueError("sync_every must be positive")
        header = cls._header(sender, key, size, chunk_size)
        return await asyncio.get_running_loop().run_in_executor(
            executor, cls._open_blocking, destination, header, sync_every, executor, disk
        )

    @classmethod
    async def store_whole(
        cls,
        destination: Path,
        data: bytes | memoryview,
        digest: bytes,
        *,
        sender: str,
        key: bytes,
        chunk_size: int,
        mode: int = 0o644,
        mtime_ns: int,
        sync_folder: bool = True,
        executor: Executor | None = None,
        disk: Disk = DISK,
    ) -> Path:
        """:meth:`open`, :meth:`write_chunk` and :meth:`finish` for a file that is one chunk
        (``len(data) <= chunk_size``), in one trip to the executor: for many small files, the
        hops cost as much as the disk. Same checks, same files, same errors.
        """
        store = functools.partial(
            cls.store_whole_blocking,
            destination,
            data,
            digest,
            sender=sender,
            key=key,
            chunk_size=chunk_size,
            mode=mode,
            mtime_ns=mtime_ns,
            sync_folder=sync_folder,
            executor=executor,
            disk=disk,
        )
        return await asyncio.get_running_loop().run_in_executor(executor, store)

    @classmethod
    def store_whole_blocking(
        cls,
        destination: Path,
        data: bytes | memoryview,
        digest: bytes,
        *,
        sender: str,
        key: bytes,
        chunk_size: int,
        mode: int = 0o644,
        mtime_ns: int,
        sync_folder: bool = True,
        executor: Executor | None = None,
        disk: Disk = DISK,
    ) -> Path:
        """(Blocking) :meth:`store_whole`, for a caller already in a disk thread."""
        if len(data) > chunk_size:
            raise ValueError(f"{len(data)} bytes is more than one chunk of {chunk_size}")
        header = cls._header(sender, key, len(data), chunk_size)
        partial = cls._open_blocking(destination, header, DEFAULT_SYNC_EVERY, executor, disk)
        try:
            if partial.chunk_count:
                partial._write_blocking(0, bytes(digest), data)
            return partial._finish_blocking(bytes(digest), mode, mtime_ns, False, sync_folder)
        except HashMismatch:
            partial._discard_blocking()
            raise
        except BaseException:
            partial._abandon_blocking()
            raise

    @staticmethod
    def _header(sender: str, key: bytes, size: int, chunk_size: int) -> StateHeader:
        if len(key) != KEY_SIZE:
            raise ValueError(f"an entry key is {KEY_SIZE} bytes, not {len(key)}")
        if size < 0 or not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"bad size {size} or chunk size {chunk_size}")
        if chunk_count(size, chunk_size) > MAX_CHUNKS:
            raise ValueError(f"{size} bytes in chunks of {chunk_size} is too many chunks")
        return StateHeader(size, chunk_size, blake3(sender.encode()).digest(), key)

    @classmethod
    def _open_blocking(
        cls,
        destination: Path,
        header: StateHeader,
        sync_every: int,
        executor: Executor | None,
        disk: Disk,
    ) -> PartialFile:
        for slot in range(MAX_SLOTS):
            data_path, state_path = slot_names(destination, slot)
            state_fd = cls._claim_state(state_path, disk)
            if state_fd < 0:
                continue
            try:
                table, discarded = cls._read_matching_state(state_fd, header, disk)
            except _ForeignPartial:
                _close_quietly(state_fd)
                continue
            except BaseException:
                _close_quietly(state_fd)
                raise
            try:
                with _disk_errors(destination, header.size):
                    data_fd = -1
                    if table is not None:
                        data_fd = cls._reopen_data(data_path, header.size, disk)
                        if data_fd < 0:
                            table, discarded = None, "the partial data is missing"
                    if table is None:
                        data_fd = cls._start_over(data_path, state_fd, header, disk)
                        table = bytearray(header.chunks * DIGEST_SIZE)
            except BaseException:
                _close_quietly(state_fd)
                raise
            partial = cls(
                destination=destination,
                header=header,
                data_path=data_path,
                state_path=state_path,
                data_fd=data_fd,
                state_fd=state_fd,
                table=table,
                sync_every=sync_every,
                executor=executor,
                discarded=discarded,
                disk=disk,
            )
            try:
                partial._reverify()
                partial._check_free_space()
            except DiskFull:
                partial._abandon_blocking()  # kept: space may be freed, then it resumes
                raise
            except BaseException:
                partial._close()
                raise
            return partial
        raise UserError(
            f"too many unfinished transfers of {destination.name} in {destination.parent}",
            code="busy",
        )

    @staticmethod
    def _claim_state(state_path: Path, disk: Disk) -> int:
        """An fd of the state file, locked by us and still at that path; -1 if the slot is busy."""
        for _ in range(3):  # the file can vanish under us when its writer finishes
            try:
                fd = disk.open(state_path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _BINARY, 0o600)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    return -1  # a link where our state file should be: not ours, leave it
                raise
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                _close_quietly(fd)
                return -1
            if not _try_lock(fd):
                _close_quietly(fd)
                return -1
            if _same_file(fd, state_path):
                return fd
            _close_quietly(fd)
        return -1

    @staticmethod
    def _read_matching_state(
        state_fd: int, wanted: StateHeader, disk: Disk
    ) -> tuple[bytearray | None, str | None]:
        """(the digest table, None) to resume; (None, why) to start over in this slot."""
        raw = disk.read_exact(state_fd, TABLE_OFFSET, 0)
        if not raw:
            return None, None  # created just now (or before a crash wrote its header)
        try:
            found = StateHeader.decode(raw)
        except PartialCorrupt as exc:
            return None, str(exc)
        if found.sender != wanted.sender:
            raise _ForeignPartial
        if found != wanted:
            return None, "an older version of the file was partly received"
        table = bytearray(disk.read_exact(state_fd, wanted.chunks * DIGEST_SIZE, TABLE_OFFSET))
        if len(table) != wanted.chunks * DIGEST_SIZE:
            return None, "the state file is truncated"
        return table, None

    @staticmethod
    def _reopen_data(data_path: Path, size: int, disk: Disk) -> int:
        try:
            fd = disk.open(data_path, os.O_RDWR | _NOFOLLOW | _BINARY)
        except FileNotFoundError:
            return -1
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return -1
            raise
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            _close_quietly(fd)  # not a file we made: start over with a new one
            return -1
        if info.st_size > size:  # never grown to the size: it grows as chunks land
            os.ftruncate(fd, size)
        return fd

    @staticmethod
    def _start_over(data_path: Path, state_fd: int, header: StateHeader, disk: Disk) -> int:
        """A new, empty data file (a fresh inode, never someone's link) and a blank table."""
        with contextlib.suppress(FileNotFoundError):
            disk.unlink(data_path)
        fd = disk.open(data_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _BINARY, 0o666)
        try:
            fresh = header.encode() + bytes(header.chunks * DIGEST_SIZE)
            disk.write_all(state_fd, fresh, 0)
            # Cut any old tail only now: truncating to zero would make ext4 flush the file
            # on close (auto_da_alloc), a few milliseconds per file.
            os.ftruncate(state_fd, len(fresh))
        except BaseException:
            _close_quietly(fd)
            raise
        return fd

    def _reverify(self) -> None:
        """Re-hash every chunk the table claims; a chunk whose data did not survive is missing."""
        for chunk in range(self.chunk_count):
            claimed = self._digest_at(chunk)
            if claimed == _ZERO_DIGEST:
                continue
            length = chunk_length(self.size, self.chunk_size, chunk)
            data = self._read_exact(self._fds.data, length, chunk * self.chunk_size)
            if len(data) == length and blake3(data).digest() == claimed:
                if chunk == self._hashed_chunks:  # the resumed prefix, read in order anyway
                    self._running.update(data)
                    self._hashed_chunks += 1
                continue
            self._forget(chunk)
            self._write_all(self._fds.state, _ZERO_DIGEST, TABLE_OFFSET + chunk * DIGEST_SIZE)
        self.resumed_bytes = self.verified_bytes

    def _check_free_space(self) -> None:
        needed = self.size - self.verified_bytes
        if needed and self._disk.free_space(self.data_path.parent) < needed:
            raise DiskFull(self.destination, needed)

    # -------------------------------------------------------------- state

    def _digest_at(self, chunk: int) -> bytes:
        return bytes(self._table[chunk * DIGEST_SIZE : (chunk + 1) * DIGEST_SIZE])

    def _mark(self, chunk: int) -> None:
        if not self.has(chunk):
            self._have[chunk >> 3] |= 1 << (chunk & 7)
            self.verified_bytes += chunk_length(self.size, self.chunk_size, chunk)

    def _forget(self, chunk: int) -> None:
        if self.has(chunk):
            self._have[chunk >> 3] &= ~(1 << (chunk & 7)) & 0xFF
            self.verified_bytes -= chunk_length(self.size, self.chunk_size, chunk)
        self._table[chunk * DIGEST_SIZE : (chunk + 1) * DIGEST_SIZE] = _ZERO_DIGEST

    def has(self, chunk: int) -> bool:
        """Whether chunk ``chunk`` is here and verified."""
        return bool(self._have[chunk >> 3] & (1 << (chunk & 7)))

    @property
    def have(self) -> bytes:
        """The verified-chunk bitmap for ``Answer.have`` (bit i of byte i//8, LSB first)."""
        return bytes(self._have)

    @property
    def complete(self) -> bool:
        return self.verified_bytes == self.size and all(
            self.has(chunk) for chunk in range(self.chunk_count)
        )

    def missing(self) -> Iterator[int]:
        """The chunk numbers still needed, in order."""
        return (chunk for chunk in range(self.chunk_count) if not self.has(chunk))

    # -------------------------------------------------------------- writing

    async def write_chunk(self, chunk: int, digest: bytes, data: bytes | memoryview) -> None:
        """Check ``data`` against ``digest`` and store it as chunk ``chunk``.

        :class:`HashMismatch` (nothing written: ask for it again), :class:`DiskFull` (the
        partial is kept), ValueError for a chunk number or length the offer does not allow.
        A chunk already held is stored again only if it differs.
        """
        self._check_open()
        if not 0 <= chunk < self.chunk_count:
            raise ValueError(f"chunk {chunk} is beyond {self.chunk_count} chunks")
        expected = chunk_length(self.size, self.chunk_size, chunk)
        if len(data) != expected:
            raise ValueError(f"chunk {chunk} has {len(data)} bytes, not {expected}")
        await self._run(self._write_blocking, chunk, bytes(digest), data)

    def _write_blocking(self, chunk: int, digest: bytes, data: bytes | memoryview) -> None:
        if blake3(data).digest() != digest:
            raise HashMismatch(self.destination, chunk)
        with self._lock:
            if self.has(chunk) and self._digest_at(chunk) == digest:
                return
        with _disk_errors(self.destination, self.size - self.verified_bytes):
            self._write_all(self._fds.data, data, chunk * self.chunk_size)
            # Only now may the table claim the chunk (re-checked at the next open anyway).
            self._write_all(self._fds.state, digest, TABLE_OFFSET + chunk * DIGEST_SIZE)
            with self._lock:
                self._table[chunk * DIGEST_SIZE : (chunk + 1) * DIGEST_SIZE] = digest
                self._mark(chunk)
                self._advance_running_hash(chunk, data)
                self._unsynced += len(data)
                due = self._unsynced >= self._sync_every
                if due:
                    self._unsynced = 0
                    # What the sync makes durable and the whole-file hash has already seen.
                    drop_from = self._dropped
                    self._dropped = max(drop_from, self._hashed_chunks * self.chunk_size)
                    drop_to = min(self._dropped, self.size)
            if due:
                self._disk.sync_data(self._fds.data)
                self._disk.sync_data(self._fds.state)
                self._drop_cached(drop_from, drop_to)

    def _drop_cached(self, start: int, end: int) -> None:
        """Let the kernel drop synced data that is not read again from its page cache.

        Clean pages handed back now are the ones the next chunks' writes reuse, and copying
        into recycled pages costs much less than filling fresh ones: a 1 GiB file is received
        with about 1 CPU-s less (tests/benchmarks/test_bench_transfer.py). A big transfer also
        no longer pushes everything else out of the cache.
        """
        fadvise = self._disk.fadvise
        if fadvise is not None and end > start:
            with contextlib.suppress(OSError):
                fadvise(self._fds.data, start, end - start, POSIX_FADV_DONTNEED)

    def _advance_running_hash(self, chunk: int, data: bytes | memoryview) -> None:
        """Feed the whole-file hash in order (called with the lock held, after the write)."""
        if chunk < self._hashed_chunks:  # a chunk already hashed was replaced: start again
            self._reset_running_hash()
        if chunk == self._hashed_chunks:
            self._running.update(data)
            self._hashed_chunks += 1
            # Chunks that overtook this one are on disk (in the page cache): catch up.
            while self._hashed_chunks < self.chunk_count and self.has(self._hashed_chunks):
                following = self._hashed_chunks
                length = chunk_length(self.size, self.chunk_size, following)
                self._running.update(
                    self._read_exact(self._fds.data, length, following * self.chunk_size)
                )
                self._hashed_chunks += 1

    def _reset_running_hash(self) -> None:
        self._running = blake3()
        self._hashed_chunks = 0

    # -------------------------------------------------------------- ending

    async def finish(
        self,
        expected_digest: bytes,
        *,
        mode: int = 0o644,
        mtime_ns: int,
        full_read_back: bool = False,
        sync_folder: bool = True,
    ) -> Path:
        """Verify the whole file, put it in place, and return where it landed.

        The whole-file blake3 over the data in order is compared with ``expected_digest`` (the
        sender's ``FileEnd``). Chunks that landed in order (and the prefix verified at a resume)
        were hashed as they were written, from the very bytes that were checked and written;
        only the rest is read back from the file (``full_read_back`` reads all of it: reading
        1 GiB back costs about a second, see tests/benchmarks/test_bench_share_disk.py). On a
        mismatch every chunk is forgotten (which one is wrong cannot be known: the file is
        received again) and :class:`HashMismatch` is raised, the partial staying open.
        Otherwise: the exec bit from ``mode`` (applied like ``chmod +x``, within the umask),
        ``mtime_ns``, a sync, a no-replace rename to ``destination`` or its first free
        ``name (n).ext``, a sync of the folder, and the state file is deleted.

        ``sync_folder=False`` leaves the folder sync to the caller (:func:`sync_directory`,
        once for many files: with a sync per file, fsyncs bound small files to a few hundred
        per second); until then a power cut may undo the rename, which only means the file is
        received again.
        """
        self._check_open()
        if not self.complete:
            missing = sum(1 for _ in self.missing())
            raise ValueError(f"{self.destination.name} still misses {missing} chunks")
        final = await self._run(
            self._finish_blocking,
            bytes(expected_digest),
            mode,
            mtime_ns,
            full_read_back,
            sync_folder,
        )
        self._closed = True
        return final

    def _finish_blocking(
        self,
        expected_digest: bytes,
        mode: int,
        mtime_ns: int,
        full_read_back: bool,
        sync_folder: bool,
    ) -> Path:
        if full_read_back:
            self._reset_running_hash()
        if self._whole_digest() != expected_digest:
            with self._lock:
                for chunk in range(self.chunk_count):
                    self._forget(chunk)
                self._reset_running_hash()
            self._write_all(self._fds.state, bytes(self.chunk_count * DIGEST_SIZE), TABLE_OFFSET)
            raise HashMismatch(self.destination, None)
        with _disk_errors(self.destination):
            self._apply_metadata(mode, mtime_ns)
            self._disk.fsync(self._fds.data)
            if _OPEN_FILES_PINNED:
                self._close_data()
                os.utime(self.data_path, ns=(time.time_ns(), mtime_ns))  # closing touched it
            final = move_to_unique(self.data_path, self.destination, disk=self._disk)
            if sync_folder:
                self._disk.sync_directory(final.parent)
        if _OPEN_FILES_PINNED:
            self._close()
        # Elsewhere the state file is removed while still locked: no one adopts it in between.
        with contextlib.suppress(FileNotFoundError):
            self._disk.unlink(self.state_path)
        self._close()
        return final

    def _whole_digest(self) -> bytes:
        """The running hash, completed by reading back what it has not seen."""
        hasher = self._running.copy()
        offset = min(self._hashed_chunks * self.chunk_size, self.size)
        buffer = bytearray(min(VERIFY_BLOCK, max(self.size - offset, 1)))
        preadv = self._disk.preadv
        while offset < self.size:
            view = memoryview(buffer)[: min(len(buffer), self.size - offset)]
            if preadv is not None:
                got = preadv(self._fds.data, [view], offset)
                if got <= 0:
                    break
                hasher.update(view[:got])
            else:
                piece = self._read_exact(self._fds.data, len(view), offset)
                if not piece:
                    break
                got = len(piece)
                hasher.update(piece)
            offset += got
        return hasher.digest() if offset == self.size else b""

    def _apply_metadata(self, mode: int, mtime_ns: int) -> None:
        if sys.platform != "win32":
            current = stat.S_IMODE(os.fstat(self._fds.data).st_mode)
            wanted = current | ((current & 0o444) >> 2) if mode & 0o111 else current & ~0o111
            if wanted != current:
                os.fchmod(self._fds.data, wanted)
        times = (time.time_ns(), mtime_ns)
        if os.utime in os.supports_fd:
            os.utime(self._fds.data, ns=times)
        else:
            os.utime(self.data_path, ns=times)

    async def abandon(self) -> None:
        """Close the files and keep them: the next :meth:`open` of this version resumes."""
        if self._closed:
            return
        self._closed = True
        await self._run(self._abandon_blocking)

    def _abandon_blocking(self) -> None:
        with contextlib.suppress(OSError):
            self._disk.sync_data(self._fds.data)
            self._disk.sync_data(self._fds.state)
        self._close()

    async def discard(self) -> None:
        """Delete the partial and its state (a cancelled or refused file)."""
        if self._closed:
            return
        self._closed = True
        await self._run(self._discard_blocking)

    def _discard_blocking(self) -> None:
        if _OPEN_FILES_PINNED:
            self._close()
        for path in (self.data_path, self.state_path):  # state last: it holds the lock
            with contextlib.suppress(FileNotFoundError):
                self._disk.unlink(path)
        self._close()

    # -------------------------------------------------------------- plumbing

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the partial of {self.destination.name} is closed")

    def _close_data(self) -> None:
        self._fds.close_data()

    def _close(self) -> None:
        self._fds.close()

    async def _run(self, work: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, *args)

    def __repr__(self) -> str:
        return (
            f"<PartialFile {self.destination.name} {self.verified_bytes}/{self.size} bytes"
            f" in {self.chunk_count} chunks>"
        )


class _Descriptors:
    """The two open files of a partial; closing the state file drops its lock."""

    __slots__ = ("data", "state")

    def __init__(self, data: int, state: int) -> None:
        self.data = data
        self.state = state

    def close_data(self) -> None:
        _close_quietly(self.data)
        self.data = -1

    def close(self) -> None:
        _close_quietly(self.data, self.state)
        self.data = self.state = -1


class _ForeignPartial(Exception):
    """Another sender's unfinished partial holds this slot."""
