"""Apply one peer row to the local folder: assemble, dedup, verify, keep versions, conflicts.

docs/sync.md ("Safety") is the contract. A pulled file is assembled in ``.meshsync/tmp/`` (same
filesystem), every block blake3-verified, fsynced, then ``os.replace``d over the old one, so a
reader sees the old file or the new one, never neither and never half. The old content is first
hard-linked (else copied) into ``.meshsync/versions/<name>~YYYYMMDD-HHMMSS`` (UTC). The index is
written only once the file is in place: after a kill -9 the rescan finds what was done.

Before anything replaces or deletes a local path, the path must still match our index row (size
and mtime_ns): otherwise it changed since the last scan, which is newer information than the
peer's row, and the outcome is ``"deferred"`` (the caller rescans it, then decides again).

Blocks come from local copies first (any file of the folder holding that digest, re-hashed when
read: a mismatch means that file changed, and the source is asked instead), then from the
:class:`BlockSource`, a window of ~32 MiB of requests in flight at a time. Identical blocks of
one file are fetched once.

Every disk and index call runs in the given executor; the index (SQLite) is only ever touched
from there, so the executor should be the folder's single worker thread.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import dataclasses
import errno
import functools
import os
import re
import secrets
import shutil
import stat
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Collection, Coroutine, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypeVar

from meshagent_gui.core.protocol.sync import (
    Action,
    Block,
    Decision,
    FileRow,
    Segment,
    conflict_name,
    same_content,
)
from meshagent_gui.core.share.disk import DISK, NOT_SUPPORTED, Disk
from meshagent_gui.core.share.partial import HashMismatch, _disk_errors
from meshagent_gui.core.share.paths import (
    UnsafePath,
    clash_names,
    is_link,
    move_to_unique,
    safe_relative_path,
)
from meshagent_gui.core.share.whole import WholeFile, _Unsupported, make_durable, write_unnamed
from meshagent_gui.core.sync.blocks import digest, segment_digest
from meshagent_gui.errors import UserError

if TYPE_CHECKING:
    from meshagent_gui.core.sync.index import FolderIndex

T = TypeVar("T")

MiB: Final = 1024 * 1024
WINDOW_BYTES: Final = 8 * MiB
WINDOWS_AHEAD: Final = 4
"""A large file is assembled in windows of WINDOW_BYTES, the blocks of WINDOWS_AHEAD of them
requested at once (docs/sync.md: the puller keeps up to 32 MiB in flight)."""
SEGMENT_WINDOW: Final = 32
META_DIR: Final = ".meshsync"
TMP_SUFFIX: Final = ".tmp"
VERSION_STAMP: Final = "%Y%m%d-%H%M%S"
_VERSION_NAME: Final = re.compile(r"~(\d{8}-\d{6})(?:-\d+)?$")
_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)
_BINARY: Final = getattr(os, "O_BINARY", 0)
_NOT_EMPTY: Final = frozenset({errno.ENOTEMPTY, errno.EEXIST})
_SHOWN_ENTRIES: Final = 3
_PROC_FD: Final = "/proc/self/fd"
_ECHOES_KEPT: Final = 10_000  # a few seconds of pulled files; 2-3 MB

Outcome = Literal["done", "conflict", "skipped", "deferred"]


class BlockUnavailable(Exception):
    """The peer no longer has that block (its file changed since the row was sent)."""


class BlockSource(Protocol):
    """Where blocks and segment lists come from (the pull stream). Concurrent-safe."""

    async def block(self, digest: bytes, name: str, offset: int, size: int) -> bytes:
        """One block's bytes; ``name``/``offset`` are where the peer's index has it.
        Raises :class:`BlockUnavailable`."""
        ...

    async def segment(self, digest: bytes) -> tuple[Block, ...]:
        """A segment's block list (verified here against ``digest``)."""
        ...


@dataclass(frozen=True, slots=True)
class Applied:
    """What :meth:`Applier.apply` did with one row.

    ``done``: applied (or nothing to do); ``conflict``: ours was renamed to ``conflict_name``,
    then theirs taken; ``skipped``: not applied, ``detail`` says why (report it); ``deferred``:
    the local path changed since the last scan, rescan it and decide again.
    """

    name: str
    outcome: Outcome
    detail: str = ""
    conflict_name: str = ""


def is_small(row: FileRow) -> bool:
    """A file of at most one block: :meth:`Applier.apply_small` stores many at a time."""
    return row.kind == "file" and not row.deleted and not row.segments and len(row.blocks) <= 1


SmallOutcome = Applied | BaseException


@dataclass(slots=True)
class _Small:
    """One file of a small-file batch as it goes through :meth:`Applier.apply_small`."""

    remote: FileRow
    decision: Decision
    place: _Place | None = None
    data: bytes | None = None
    outcome: SmallOutcome | None = None
    fd: int = -1  # an unnamed file (a new name, linked in) ...
    tmp: _TmpFile | None = None  # ... or a temp file in .meshsync/tmp (it replaces a file)
    old: os.stat_result | None = None


_Window = tuple[
    list[tuple[int, Block, int]], dict[bytes, bytes], dict[bytes, "asyncio.Task[bytes]"]
]
"""A window of a large file on its way: its blocks, those found here, the source's replies."""


class _Stop(Exception):
    """Ends one apply early with a skipped/deferred outcome (raised inside executor jobs)."""

    def __init__(self, outcome: Outcome, detail: str) -> None:
        super().__init__(detail)
        self.outcome: Outcome = outcome
        self.detail = detail


@dataclass(frozen=True, slots=True)
class _Place:
    """A row's local path and what is there now (checked against our index row)."""

    path: Path
    info: os.stat_result | None
    case_of: str = ""
    """On a case-insensitive filesystem: the existing entry's real name, when it differs from
    the row's name only by case."""


# ---------------------------------------------------------------------------- the temp file


class _TmpFile:
    """One file being assembled. A lock serialises writes with :meth:`discard`, so a cancelled
    apply never closes the descriptor under a write still running in the executor."""

    def __init__(self, path: Path, fd: int, disk: Disk) -> None:
        self.path = path
        self._fd = fd
        self._disk = disk
        self._lock = threading.Lock()
        self._placed = False

    def write(self, data: bytes, offset: int) -> None:
        with self._lock:
            if self._fd < 0:
                raise OSError(errno.EBADF, "the temp file was discarded", str(self.path))
            self._disk.write_all(self._fd, data, offset)

    def read(self, size: int, offset: int) -> bytes:
        with self._lock:
            return self._disk.read_exact(self._fd, size, offset)

    def finish(self, mtime_ns: int, mode: int | None) -> None:
        """Metadata, then fsync (which makes the metadata durable too), then close."""
        with self._lock:
            if mode is not None:
                os.chmod(self.path, mode)
            os.utime(self.path, ns=(time.time_ns(), mtime_ns))
            self._disk.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def stamp(self, mtime_ns: int, mode: int | None) -> None:
        """Metadata only, the descriptor left open: a batch makes many files durable with one
        ``syncfs`` (:func:`~meshagent_gui.core.share.whole.make_durable`), then closes them."""
        with self._lock:
            if mode is not None:
                os.chmod(self.path, mode)
            os.utime(self.path, ns=(time.time_ns(), mtime_ns))

    @property
    def fd(self) -> int:
        return self._fd

    def placed(self) -> None:
        self._placed = True

    def discard(self) -> None:
        with self._lock:
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = -1
            if not self._placed:
                with contextlib.suppress(OSError):
                    self._disk.unlink(self.path)


# ---------------------------------------------------------------------------- the applier


class Applier:
    """Applies peers' rows to one folder (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        index: FolderIndex,
        *,
        executor: Executor,
        device_name: str,
        versions_days: float = 30,
        disk: Disk = DISK,
        writer: Executor | None = None,
    ) -> None:
        self.root = root
        self.index = index
        self.device_name = device_name
        self.versions_days = versions_days
        self._executor = executor
        self._writer = executor if writer is None else writer
        """Where a small-file batch is written (no index there): beside the worker."""
        self._disk = disk
        self._tmp_dir = root / META_DIR / "tmp"
        self._versions_dir = root / META_DIR / "versions"
        self._windows = os.name == "nt"
        self._case_insensitive: bool | None = None
        self._unnamed_ok = disk.unnamed_files() and os.path.isdir(_PROC_FD)
        self.placed: dict[str, tuple[str, int, int, int]] = {}
        """Files put in place by a batch: name -> (path, size, mtime_ns, mode) as written, so
        the watcher's echo of our own writes need not be scanned (see :meth:`echo`)."""

    async def _run_writer(self, function: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer, functools.partial(function, *args))

    async def _run(self, function: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(function, *args))

    # ---------------------------------------------------------------- housekeeping

    async def clean_tmp(self) -> int:
        """Remove what interrupted applies left in ``.meshsync/tmp`` (call at start, before any
        :meth:`apply`). Returns how many entries were removed."""
        return await self._run(self._clean_tmp)

    async def clean_versions(self, *, now: float | None = None) -> int:
        """Drop versions older than ``versions_days`` (by the time in their name). Returns how
        many were removed."""
        cutoff = (time.time() if now is None else now) - self.versions_days * 86400
        return await self._run(self._clean_versions, cutoff)

    def _clean_tmp(self) -> int:
        self._ensure_tmp_dir()
        removed = 0
        with os.scandir(self._tmp_dir) as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        self._disk.unlink(Path(entry.path))
                    removed += 1
        return removed

    def _clean_versions(self, cutoff: float) -> int:
        removed = 0
        if not self._versions_dir.is_dir():
            return 0
        for folder, dirs, files in os.walk(self._versions_dir, topdown=False):
            for name in files:
                match = _VERSION_NAME.search(name)
                if match is None:
                    continue
                when = calendar.timegm(time.strptime(match.group(1), VERSION_STAMP))
                if when < cutoff:
                    with contextlib.suppress(FileNotFoundError):
                        self._disk.unlink(Path(folder, name))
                        removed += 1
            for name in dirs:
                with contextlib.suppress(OSError):  # not empty: some versions are still kept
                    os.rmdir(os.path.join(folder, name))
        return removed

    def _ensure_tmp_dir(self) -> None:
        # Never recreate the root itself: a missing root is an unmounted disk, not a folder.
        if not self.root.is_dir():
            raise UserError(f"the synced folder {self.root} is missing", code="root_missing")
        self._tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _case_insensitive_fs(self) -> bool:
        if self._case_insensitive is None:
            self._ensure_tmp_dir()
            probe = self._tmp_dir / f"case-{secrets.token_hex(8)}{TMP_SUFFIX}"
            probe.touch()
            try:
                self._case_insensitive = os.path.lexists(probe.with_name(probe.name.upper()))
            finally:
                probe.unlink()
        return self._case_insensitive

    # ---------------------------------------------------------------- apply

    async def apply(self, remote: FileRow, decision: Decision, source: BlockSource) -> Applied:
        """Apply ``remote`` as ``decision`` says; see :class:`Applied` for the outcomes.

        Raises :class:`~meshagent_gui.core.share.partial.DiskFull` (a UserError, code
        ``disk_full``) when the disk fills up and
        :class:`~meshagent_gui.core.share.partial.HashMismatch` (code ``hash_mismatch``) when
        the source sent a block or segment that is not what the row names, and lets the
        source's :class:`BlockUnavailable` through (the peer's file changed: its new row will
        come); in every case the temp file is gone and nothing local changed.
        """
        name = remote.name
        action = decision.action
        if action is Action.NOTHING:
            return Applied(name, "done")
        try:
            if action in (Action.ADOPT_VERSION, Action.KEEP_LOCAL):
                return await self._run(self._restamp, name, decision)
            problem = self._name_problem(name)
            if problem:
                return Applied(name, "skipped", problem)
            if remote.deleted:
                return await self._run(self._delete, remote, decision)
            if remote.kind == "dir":
                return await self._run(self._make_dir, remote, decision)
            return await self._pull_file(remote, decision, source)
        except _Stop as stop:
            return Applied(name, stop.outcome, stop.detail)

    def _restamp(self, name: str, decision: Decision) -> Applied:
        """KEEP_LOCAL / ADOPT_VERSION: our row, with the decided version; no disk I/O."""
        ours = self.index.get(name)
        if ours is None:
            return Applied(name, "skipped", "no local row to keep")
        self.index.put([dataclasses.replace(ours, version=decision.version)])
        return Applied(name, "done")

    def _name_problem(self, name: str) -> str:
        """Why ``name`` cannot exist here ('' if it can). The peer's validate_row already
        refused unsafe names; this adds what only this OS refuses (``a:b``, ``CON`` on
        Windows). paths.py's rules are those of Windows, applied everywhere for transfers;
        sync keeps such names on systems that allow them."""
        parts = name.split("/")
        if parts[0] == META_DIR or any(part in ("", ".", "..") for part in parts):
            return "not a name inside the folder"
        if self._windows:
            try:
                safe_relative_path(name)
            except UnsafePath as exc:
                return f"not a valid name on this system: {exc.reason}"
        return ""

    # ---------------------------------------------------------------- paths

    def _locate(
        self,
        name: str,
        *,
        case_check: Literal["never", "unknown", "always"] = "unknown",
        root_checked: bool = False,
    ) -> _Place:
        """The local path of ``name`` (never through a link) and what is there now.

        Each component is looked up as given (NFC), then NFD (names written on macOS).
        A file or link where a folder is needed: skipped.
        """
        if not root_checked:
            self._check_root()
        current = self.root
        parts = name.split("/")
        info: os.stat_result | None = None
        for position, part in enumerate(parts):
            path = current / part
            info = _lstat(path)
            if info is None and (nfd := unicodedata.normalize("NFD", part)) != part:
                alternative = current / nfd
                if (found := _lstat(alternative)) is not None:
                    path, info = alternative, found
            current = path
            if info is None:
                current = current.joinpath(*parts[position + 1 :])
                break
            if is_link(info):
                raise _Stop("skipped", f"{_rel(self.root, path)} is a symbolic link")
            if position < len(parts) - 1 and not stat.S_ISDIR(info.st_mode):
                raise _Stop("skipped", f"{_rel(self.root, path)} is a file, not a folder")
        case_of = ""
        # The directory listing that tells a case variant apart costs O(folder size): only
        # where it can matter (a name we do not hold live; a deletion, always).
        if info is not None and case_check != "never" and self._case_insensitive_fs():
            row = self.index.get(name) if case_check == "unknown" else None
            if row is None or row.deleted:
                case_of = _case_variant(current)
        return _Place(current, info, case_of)

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise UserError(f"the synced folder {self.root} is missing", code="root_missing")

    def _check_local(
        self, name: str, place: _Place, rows: dict[str, FileRow] | None = None
    ) -> FileRow | None:
        """Our live row for ``name``, after checking that the disk still matches it.

        Anything else on disk (changed, deleted, new and not yet indexed) is newer than what
        we know: deferred, so the caller rescans it before deciding again.
        """
        row = self.index.get(name) if rows is None else rows.get(name)
        live = row if row is not None and not row.deleted else None
        info = place.info
        if info is None:
            if live is not None:
                raise _Stop("deferred", "deleted here since the last scan")
            return None
        if live is None:
            raise _Stop("deferred", "created here since the last scan")
        if live.kind == "dir":
            if not stat.S_ISDIR(info.st_mode):
                raise _Stop("deferred", "changed here since the last scan")
        elif (
            not stat.S_ISREG(info.st_mode)
            or info.st_size != live.size
            or info.st_mtime_ns != live.mtime_ns
        ):
            raise _Stop("deferred", "changed here since the last scan")
        return live

    def _make_parents(self, path: Path) -> None:
        """Create the missing folders above ``path`` (below the root only)."""
        missing: list[Path] = []
        parent = path.parent
        while parent != self.root and _lstat(parent) is None:
            missing.append(parent)
            parent = parent.parent
        for folder in reversed(missing):
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder)
            info = os.lstat(folder)
            if is_link(info) or not stat.S_ISDIR(info.st_mode):
                raise _Stop("skipped", f"{_rel(self.root, folder)} is not a folder")
        if missing:
            self._disk.sync_directories({folder.parent for folder in missing})

    # ---------------------------------------------------------------- versions, conflicts

    def _version_path(self, name: str) -> Iterator[Path]:
        stamp = time.strftime(VERSION_STAMP, time.gmtime())
        base = self._versions_dir / name
        base.parent.mkdir(parents=True, exist_ok=True)
        for counter in range(1000):
            tag = f"~{stamp}" + (f"-{counter}" if counter else "")
            yield base.with_name(_fit(base.name, tag) + tag)

    def _keep_version(self, path: Path, name: str) -> Path:
        """Hard-link the current file into versions (the replace then takes its name only)."""
        for candidate in self._version_path(name):
            try:
                self._disk.link(path, candidate)
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno not in NOT_SUPPORTED | {errno.EMLINK}:
                    raise
                if self._disk.lexists(candidate):
                    continue
                shutil.copy2(path, candidate, follow_symlinks=False)
            return candidate
        raise UserError(f"too many versions of {name} kept at once", code="name_clash")

    def _move_to_versions(self, path: Path, name: str) -> None:
        for candidate in self._version_path(name):
            if not self._disk.lexists(candidate):
                landed = move_to_unique(path, candidate, disk=self._disk)
                self._disk.sync_directories([landed.parent])
                return
        raise UserError(f"too many versions of {name} kept at once", code="name_clash")

    def _conflict_copy(self, place: _Place, name: str, *, keep_original: bool) -> str:
        """Put our current file under its conflict name; returns that name (relative).

        With ``keep_original`` it is hard-linked, so the original name never goes missing
        before the replace (where links are impossible: renamed)."""
        assert place.info is not None
        wanted = conflict_name(name, when_ns=place.info.st_mtime_ns, device=self.device_name)
        target = place.path.with_name(wanted.rsplit("/", 1)[-1])
        if keep_original:
            for candidate in clash_names(target.name):
                try:
                    self._disk.link(place.path, target.with_name(candidate))
                except FileExistsError:
                    continue
                except OSError as exc:
                    if exc.errno not in NOT_SUPPORTED | {errno.EMLINK}:
                        raise
                    break
                else:
                    return _rel(self.root, target.with_name(candidate))
        landed = move_to_unique(place.path, target, disk=self._disk)
        return _rel(self.root, landed)

    # ---------------------------------------------------------------- deletions, folders

    def _delete(self, remote: FileRow, decision: Decision) -> Applied:
        name = remote.name
        place = self._locate(name, case_check="always")
        tombstone = dataclasses.replace(remote, version=decision.version)
        if place.case_of:
            # Only a name differing by case is here: the row's exact name is already gone.
            self.index.put([tombstone])
            return Applied(name, "done")
        ours = self._check_local(name, place)
        if place.info is None or ours is None:
            self.index.put([tombstone])
            return Applied(name, "done")
        if stat.S_ISDIR(place.info.st_mode):
            try:
                os.rmdir(place.path)
            except OSError as exc:
                if exc.errno not in _NOT_EMPTY:
                    raise
                # Files we do not sync (ignored ones) or not yet deleted: keep the folder and
                # its row, so nothing resurrects it on the peers; reported, retried next pass.
                return Applied(name, "skipped", _not_empty(place.path))
            self._disk.sync_directories([place.path.parent])
            self.index.put([tombstone])
            return Applied(name, "done")
        copy = ""
        if decision.action is Action.CONFLICT:
            copy = self._conflict_copy(place, name, keep_original=False)
        else:
            self._move_to_versions(place.path, name)
        self._disk.sync_directories([place.path.parent])
        self.index.put([tombstone])
        return Applied(name, "conflict", conflict_name=copy) if copy else Applied(name, "done")

    def _make_dir(self, remote: FileRow, decision: Decision) -> Applied:
        name = remote.name
        place = self._locate(name)
        if place.case_of:
            return Applied(name, "skipped", f"differs only by case from {place.case_of!r} here")
        ours = self._check_local(name, place)
        row = dataclasses.replace(remote, version=decision.version)
        copy = ""
        if place.info is not None and stat.S_ISDIR(place.info.st_mode):
            self.index.put([row])
            return Applied(name, "done")
        if place.info is not None and ours is not None:  # our file where their folder goes
            if decision.action is Action.CONFLICT:
                copy = self._conflict_copy(place, name, keep_original=False)
            else:
                self._move_to_versions(place.path, name)
        self._make_parents(place.path)
        os.mkdir(place.path)
        self._disk.sync_directories([place.path.parent])
        self.index.put([row])
        return Applied(name, "conflict", conflict_name=copy) if copy else Applied(name, "done")

    # ---------------------------------------------------------------- files

    async def _pull_file(self, remote: FileRow, decision: Decision, source: BlockSource) -> Applied:
        place = await self._run(self._plan_file, remote)
        if place.case_of:
            return await self._run(self._case_rename, remote, decision, place)
        blocks = await self._block_list(remote, place.path, source)
        tmp = await self._run(self._open_tmp)
        try:
            await self._assemble(tmp, remote, blocks, place.path, source)
            return await self._run(self._commit_file, tmp, remote, decision)
        finally:
            await asyncio.shield(self._run(tmp.discard))  # a no-op once it is in place

    def _plan_file(self, remote: FileRow) -> _Place:
        place = self._locate(remote.name)
        if not place.case_of:
            self._check_local(remote.name, place)
        return place

    def _open_tmp(self) -> _TmpFile:
        self._ensure_tmp_dir()
        path = self._tmp_dir / f"{secrets.token_hex(12)}{TMP_SUFFIX}"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _BINARY
        return _TmpFile(path, self._disk.open(path, flags, 0o600), self._disk)

    async def _block_list(
        self, remote: FileRow, path: Path, source: BlockSource
    ) -> tuple[Block, ...]:
        blocks = await self._run(self.index.blocks_of, remote)
        if blocks is None:
            unknown: list[Segment] = []
            for segment in remote.segments:
                if await self._run(self.index.segment, segment.digest) is None:
                    unknown.append(segment)
            for start in range(0, len(unknown), SEGMENT_WINDOW):
                batch = unknown[start : start + SEGMENT_WINDOW]
                lists = await _gather([source.segment(s.digest) for s in batch])
                await self._run(self._store_segments, batch, lists, path)
            blocks = await self._run(self.index.blocks_of, remote)
        if blocks is None or sum(block.size for block in blocks) != remote.size:
            raise HashMismatch(path, None)
        return blocks

    def _store_segments(
        self, segments: Sequence[Segment], lists: Sequence[tuple[Block, ...]], path: Path
    ) -> None:
        for segment, blocks in zip(segments, lists, strict=True):
            if (
                len(blocks) != segment.blocks
                or sum(block.size for block in blocks) != segment.size
                or segment_digest(blocks) != segment.digest
            ):
                raise HashMismatch(path, None)
            self.index.store_segment(segment.digest, blocks)

    async def _assemble(
        self,
        tmp: _TmpFile,
        remote: FileRow,
        blocks: Sequence[Block],
        path: Path,
        source: BlockSource,
    ) -> None:
        """Fill ``tmp`` window by window: local copies, then the source for the rest. Up to
        :data:`WINDOWS_AHEAD` windows' blocks are on their way while the oldest is verified
        and written (in the writer thread), so the stream never waits for the disk."""
        windows = iter(_block_windows(blocks))
        written: dict[bytes, tuple[int, int]] = {}  # digest -> (offset in tmp, block number)
        asked: dict[bytes, asyncio.Task[bytes]] = {}  # on their way, or arrived, not written
        ahead: deque[_Window] = deque()

        async def launch(group: asyncio.TaskGroup) -> None:
            window = next(windows, None)
            if window is None:
                return
            found = await self._find_local(window, written, tmp, asked)
            tasks: dict[bytes, asyncio.Task[bytes]] = {}
            for offset, block, _ in window:
                key = block.digest
                if key in found or key in tasks:
                    continue  # identical blocks of a file are fetched once
                task = asked.get(key)
                if task is None:
                    request = source.block(key, remote.name, offset, block.size)
                    task = asked[key] = group.create_task(request)
                tasks[key] = task
            ahead.append((window, found, tasks))

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(WINDOWS_AHEAD):
                    await launch(group)
                while ahead:
                    window, found, tasks = ahead.popleft()
                    fetched = {key: await task for key, task in tasks.items()}
                    await launch(group)
                    await self._run_writer(
                        self._write_window, tmp, window, found, fetched, path, remote.size
                    )
                    for offset, block, number in window:
                        written.setdefault(block.digest, (offset, number))
                        asked.pop(block.digest, None)
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None

    async def _find_local(
        self,
        window: Sequence[tuple[int, Block, int]],
        written: dict[bytes, tuple[int, int]],
        tmp: _TmpFile,
        asked: Collection[bytes],
    ) -> dict[bytes, bytes]:
        """The window's blocks at hand: in ``tmp`` already, or in a file of the folder (those
        already ``asked`` of the source are not looked for)."""
        wanted = {
            block.digest: (block, offset)
            for offset, block, _ in window
            if block.digest not in asked
        }
        if not wanted:
            return {}
        return await self._run(self._read_local, wanted, written, tmp)

    def _read_local(
        self,
        wanted: dict[bytes, tuple[Block, int]],
        written: dict[bytes, tuple[int, int]],
        tmp: _TmpFile,
    ) -> dict[bytes, bytes]:
        """Blocks found here: already in ``tmp``, or in a file of the folder (re-hashed: a file
        that changed since it was indexed no longer has it)."""
        found: dict[bytes, bytes] = {}
        opened: dict[str, int] = {}
        here = self.index.known_blocks(d for d in wanted if d not in written)
        try:
            for block_digest, (block, _) in wanted.items():
                if block_digest in written:
                    found[block_digest] = tmp.read(block.size, written[block_digest][0])
                    continue
                if block_digest not in here:
                    continue
                for name, offset in self.index.find_block(block_digest):
                    data = self._read_block(opened, name, offset, block.size)
                    if data is not None and digest(data) == block_digest:
                        found[block_digest] = data
                        break
        finally:
            for fd in opened.values():
                if fd >= 0:
                    os.close(fd)
        return found

    def _read_block(
        self, opened: dict[str, int], name: str, offset: int, size: int
    ) -> bytes | None:
        fd = opened.get(name)
        try:
            if fd is None:
                opened[name] = fd = -1
                place = self._locate(name, case_check="never")  # the bytes are re-hashed
                if place.info is None or not stat.S_ISREG(place.info.st_mode):
                    return None
                opened[name] = fd = self._disk.open(place.path, os.O_RDONLY | _NOFOLLOW | _BINARY)
            if fd < 0:
                return None
            data = self._disk.read_exact(fd, size, offset)
        except (OSError, _Stop, UserError):
            return None  # gone, changed, unreadable: the source has it
        return data if len(data) == size else None

    def _write_window(
        self,
        tmp: _TmpFile,
        window: Sequence[tuple[int, Block, int]],
        found: dict[bytes, bytes],
        fetched: dict[bytes, bytes],
        path: Path,
        size: int,
    ) -> None:
        for _, block, number in window:
            if block.digest in fetched and block.digest not in found:
                data = fetched[block.digest]
                if len(data) != block.size or digest(data) != block.digest:
                    raise HashMismatch(path, number)
                found[block.digest] = data  # verified once, written wherever it recurs
        with _disk_errors(path, size):
            for offset, block, _ in window:
                tmp.write(found[block.digest], offset)

    def _commit_file(self, tmp: _TmpFile, remote: FileRow, decision: Decision) -> Applied:
        name = remote.name
        # Checked again just before the replace: a change while we assembled wins.
        place = self._locate(name)
        ours = self._check_local(name, place)
        old = place.info if ours is not None else None
        base = stat.S_IMODE(old.st_mode) & 0o666 if old is not None else 0o644
        mode = None if self._windows else base | (remote.permissions & 0o111)
        with _disk_errors(place.path, remote.size):
            tmp.finish(remote.mtime_ns, mode)
            self._make_parents(place.path)
            copy = ""
            if old is not None and stat.S_ISDIR(old.st_mode):
                try:  # their file where our (empty) folder is
                    os.rmdir(place.path)
                except OSError as exc:
                    if exc.errno not in _NOT_EMPTY:
                        raise
                    raise _Stop("skipped", _not_empty(place.path)) from None
            elif old is not None:
                if decision.action is Action.CONFLICT:
                    copy = self._conflict_copy(place, name, keep_original=True)
                else:
                    # Durable before the replace: a power cut must not keep the new file
                    # and lose the link that holds the old one.
                    self._disk.sync_directories([self._keep_version(place.path, name).parent])
            os.replace(tmp.path, place.path)
            tmp.placed()
        self._disk.sync_directories([place.path.parent])
        self.index.put([dataclasses.replace(remote, version=decision.version)])
        return Applied(name, "conflict", conflict_name=copy) if copy else Applied(name, "done")

    def _case_rename(self, remote: FileRow, decision: Decision, place: _Place) -> Applied:
        """On a case-insensitive filesystem, ``remote.name`` differs only by case from a file
        here. When that file is ours, unchanged, with the same content, this is a case-only
        rename: done in two steps through a temp name (some filesystems ignore a rename that
        changes only the case). Anything else would overwrite a different file: skipped."""
        name = remote.name
        other_name = _rel(self.root, place.path.with_name(place.case_of))
        other = place.path.with_name(place.case_of)
        info = place.info
        ours = self.index.get(other_name)
        if (
            info is None
            or ours is None
            or ours.deleted
            or ours.kind != "file"
            or not stat.S_ISREG(info.st_mode)
            or (info.st_size, info.st_mtime_ns) != (ours.size, ours.mtime_ns)
            or not same_content(ours, remote)
        ):
            return Applied(name, "skipped", f"differs only by case from {place.case_of!r} here")
        # Beside it, not in .meshsync/tmp: a crash between the steps must not lose it to
        # clean_tmp (the default ignores skip "*.tmp").
        step = other.with_name(f".{secrets.token_hex(6)}{TMP_SUFFIX}")
        os.rename(other, step)
        os.rename(step, place.path)
        if not self._windows:
            mode = stat.S_IMODE(info.st_mode) & 0o666 | (remote.permissions & 0o111)
            os.chmod(place.path, mode)
        os.utime(place.path, ns=(time.time_ns(), remote.mtime_ns))
        self._disk.sync_directories([place.path.parent])
        self.index.put([dataclasses.replace(remote, version=decision.version)])
        return Applied(name, "done")

    # ---------------------------------------------------------------- small files, batched

    async def apply_small(
        self, items: Sequence[tuple[FileRow, Decision]], source: BlockSource
    ) -> list[SmallOutcome]:
        """Apply many files of at most one block (:func:`is_small`, action TAKE) in three trips
        to the worker: plan and copy local blocks, fetch the rest (all at once), then write
        them all, make them durable with one ``syncfs``, put them in place and index them in
        one transaction.

        The safety rules of :meth:`apply` hold for each file: a new name is written into an
        unnamed file (``O_TMPFILE``) and linked in (never over anything), a replaced file goes
        through a temp file, its version kept, and ``os.replace``; every local path is checked
        against the index again just before it changes. Per file: its :class:`Applied`, or the
        error that stopped it (:class:`BlockUnavailable`, ``DiskFull``, ``HashMismatch``,
        ``OSError``...). An error of the stream itself (the peer gone) is raised.
        """
        entries = await self._run(self._prepare_small, items)
        missing = [e for e in entries if e.outcome is None and e.data is None]
        if missing:
            replies = await asyncio.gather(
                *(
                    source.block(e.remote.blocks[0].digest, e.remote.name, 0, e.remote.size)
                    for e in missing
                ),
                return_exceptions=True,
            )
            for entry, reply in zip(missing, replies, strict=True):
                if isinstance(reply, BlockUnavailable):
                    entry.outcome = reply
                elif isinstance(reply, BaseException):
                    raise reply  # the stream broke: the whole batch is tried again later
                else:
                    entry.data = reply
        if any(e.outcome is None for e in entries):
            # Shielded: once the writer starts, the batch finishes (and closes what it opened).
            await asyncio.shield(self._store_small(entries))
        return [
            e.outcome if e.outcome is not None else Applied(e.remote.name, "done") for e in entries
        ]

    def _prepare_small(self, items: Sequence[tuple[FileRow, Decision]]) -> list[_Small]:
        entries = [_Small(remote, decision) for remote, decision in items]
        try:
            self._check_root()  # once for the batch
        except UserError as exc:
            for entry in entries:
                entry.outcome = exc
            return entries
        rows = self.index.get_many(remote.name for remote, _ in items)
        here = self.index.known_blocks(r.blocks[0].digest for r, _ in items if r.blocks)
        for entry in entries:
            remote = entry.remote
            try:
                problem = self._name_problem(remote.name)
                if problem:
                    entry.outcome = Applied(remote.name, "skipped", problem)
                    continue
                place = entry.place = self._locate(remote.name, root_checked=True)
                if place.case_of:
                    entry.outcome = self._case_rename(remote, entry.decision, place)
                    continue
                self._check_local(remote.name, place, rows)
                entry.data = self._local_copy(remote.blocks[0], here) if remote.blocks else b""
            except _Stop as stop:
                entry.outcome = Applied(remote.name, stop.outcome, stop.detail)
            except (OSError, UserError) as exc:
                entry.outcome = exc
        return entries

    def _local_copy(self, block: Block, here: set[bytes]) -> bytes | None:
        """The block's bytes from a file of the folder that holds it (re-hashed), or None;
        ``here``: the digests :meth:`FolderIndex.known_blocks` found (others are not looked
        for)."""
        if block.digest not in here:
            return None
        opened: dict[str, int] = {}
        try:
            for name, offset in self.index.find_block(block.digest):
                data = self._read_block(opened, name, offset, block.size)
                if data is not None and digest(data) == block.digest:
                    return data
        finally:
            for fd in opened.values():
                if fd >= 0:
                    os.close(fd)
        return None

    async def _store_small(self, entries: list[_Small]) -> None:
        """Write and make durable (the writer thread: nothing there touches the index or a
        visible name), then check, place and index (the worker): see :meth:`apply_small`.
        The writer works on this batch while the worker places the one before."""
        try:
            writing = await self._run_writer(self._write_small_batch, entries)
            if writing:
                await self._run(self._place_small, writing)
        finally:
            _close_small(entries)  # both threads are done with them

    def _write_small_batch(self, entries: list[_Small]) -> list[_Small]:
        """(Writer) Each file's data into an unnamed or temp file, then one ``syncfs``; the
        entries written."""
        for entry in entries:
            if entry.outcome is None:
                self._write_small(entry)
        writing = [e for e in entries if e.outcome is None]
        if writing:
            fds = [e.fd if e.fd >= 0 else _tmp_fd(e) for e in writing]
            with _disk_errors(self.root, None):
                make_durable(fds, disk=self._disk)  # one journal commit for the whole batch
        return writing

    def _write_small(self, entry: _Small) -> None:
        remote, place, data = entry.remote, entry.place, entry.data
        assert place is not None and data is not None
        if remote.blocks and (len(data) != remote.size or digest(data) != remote.blocks[0].digest):
            entry.outcome = HashMismatch(place.path, 0)
            return
        try:
            if place.info is None and self._unnamed_ok:
                # In the file's folder; in the root while that folder is still to be made
                # (by the worker, just before the file is linked in): same filesystem.
                where = place.path if _lstat(place.path.parent) else self.root / place.path.name
                whole = WholeFile(where, data, remote.permissions, remote.mtime_ns)
                try:
                    entry.fd = write_unnamed(whole, disk=self._disk)
                    return
                except _Unsupported:  # this filesystem cannot: temp files from now on
                    self._unnamed_ok = False
            old = place.info
            base = stat.S_IMODE(old.st_mode) & 0o666 if old is not None else 0o644
            mode = None if self._windows else base | (remote.permissions & 0o111)
            tmp = entry.tmp = self._open_tmp()
            with _disk_errors(place.path, remote.size):
                tmp.write(data, 0)
                tmp.stamp(remote.mtime_ns, mode)
        except _Stop as stop:
            entry.outcome = Applied(remote.name, stop.outcome, stop.detail)
        except (OSError, UserError) as exc:
            entry.outcome = exc

    def _place_small(self, writing: list[_Small]) -> None:
        """Check each path again, keep the versions of what is replaced (made durable before
        any replace), put the files in place, sync their folders, index them (one put)."""
        kept: set[Path] = set()
        try:
            self._check_root()
        except UserError as exc:
            for entry in writing:
                entry.outcome = exc
            return
        rows = self.index.get_many(entry.remote.name for entry in writing)
        for entry in writing:
            name = entry.remote.name
            try:
                now = entry.place = self._locate(name, root_checked=True)
                ours = self._check_local(name, now, rows)
                entry.old = now.info if ours is not None else None
                if entry.old is None:
                    self._make_parents(now.path)
                if entry.old is not None and entry.fd >= 0:
                    raise _Stop("deferred", "created here since the last scan")
                if entry.old is not None and not stat.S_ISDIR(entry.old.st_mode):
                    kept.add(self._keep_version(now.path, name).parent)
            except _Stop as stop:
                entry.outcome = Applied(name, stop.outcome, stop.detail)
            except (OSError, UserError) as exc:
                entry.outcome = exc
        self._disk.sync_directories(kept)
        done: list[FileRow] = []
        folders: set[Path] = set()
        for entry in writing:
            if entry.outcome is not None:
                continue
            name = entry.remote.name
            place = entry.place
            assert place is not None
            try:
                with _disk_errors(place.path, entry.remote.size):
                    if entry.fd >= 0:
                        if not self._link_exact(entry.fd, place.path):
                            raise _Stop("deferred", "created here since the last scan")
                    else:
                        assert entry.tmp is not None
                        if entry.old is not None and stat.S_ISDIR(entry.old.st_mode):
                            try:  # their file where our (empty) folder is
                                os.rmdir(place.path)
                            except OSError as exc:
                                if exc.errno not in _NOT_EMPTY:
                                    raise
                                raise _Stop("skipped", _not_empty(place.path)) from None
                        os.replace(entry.tmp.path, place.path)
                        entry.tmp.placed()
            except _Stop as stop:
                entry.outcome = Applied(name, stop.outcome, stop.detail)
                continue
            except (OSError, UserError) as exc:
                entry.outcome = exc
                continue
            folders.add(place.path.parent)
            done.append(dataclasses.replace(entry.remote, version=entry.decision.version))
            with contextlib.suppress(OSError):
                written = os.fstat(entry.fd if entry.fd >= 0 else _tmp_fd(entry))
                self._remember(name, place.path, written)
        self._disk.sync_directories(folders)
        if done:
            self.index.put(done)

    def _remember(self, name: str, path: Path, info: os.stat_result) -> None:
        if len(self.placed) >= _ECHOES_KEPT:
            self.placed.clear()  # only an optimisation: those names are scanned after all
        self.placed[name] = (str(path), info.st_size, info.st_mtime_ns, info.st_mode)

    def echo(self, name: str) -> bool:
        """(Worker) Whether ``name`` is still exactly as a batch wrote it (then a watcher event
        for it is our own write, and scanning it would find nothing). Asked once per write."""
        written = self.placed.pop(name, None)
        if written is None:
            return False
        try:
            info = os.lstat(written[0])
        except OSError:
            return False
        return (info.st_size, info.st_mtime_ns, info.st_mode) == written[1:]

    def _link_exact(self, fd: int, path: Path) -> bool:
        """Give the unnamed file ``fd`` the name ``path``; False if the name is taken (never
        replaces anything: ``linkat`` fails on an existing name)."""
        try:
            self._disk.link_at(fd, path)
        except FileExistsError:
            return False
        except OSError:
            self._unnamed_ok = False  # e.g. no /proc: the next batches use temp files
            raise
        return True


# ---------------------------------------------------------------------------- helpers


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _case_variant(path: Path) -> str:
    """The real name of the existing entry ``path`` when it differs from ``path.name`` other
    than by Unicode normalisation (on a case-insensitive filesystem: by case); else ''."""
    wanted = unicodedata.normalize("NFC", path.name)
    try:
        names = os.listdir(path.parent)
    except OSError:
        return ""
    if any(unicodedata.normalize("NFC", entry) == wanted for entry in names):
        return ""
    folded = wanted.casefold()
    for entry in names:
        if unicodedata.normalize("NFC", entry).casefold() == folded:
            return entry
    return ""


def _close_small(entries: Sequence[_Small]) -> None:
    """Close what a small-file batch opened; remove its temp files not put in place."""
    for entry in entries:
        if entry.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(entry.fd)
            entry.fd = -1
        if entry.tmp is not None:
            entry.tmp.discard()  # a no-op for those in place


def _tmp_fd(entry: _Small) -> int:
    assert entry.tmp is not None
    return entry.tmp.fd


def _fit(name: str, tag: str, limit: int = 255) -> str:
    """``name`` shortened so that ``name + tag`` fits in one path component."""
    room = limit - len(tag.encode())
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) <= room:
        return name
    return encoded[:room].decode("utf-8", "ignore")


def _not_empty(path: Path) -> str:
    try:
        names = sorted(os.listdir(path))
    except OSError:
        names = []
    shown = ", ".join(names[:_SHOWN_ENTRIES]) + (", ..." if len(names) > _SHOWN_ENTRIES else "")
    return f"the folder still holds files that are not synced ({shown}); it was kept"


def _block_windows(blocks: Sequence[Block]) -> Iterator[list[tuple[int, Block, int]]]:
    """``(offset, block, number)`` runs of about :data:`WINDOW_BYTES`."""
    window: list[tuple[int, Block, int]] = []
    offset = size = 0
    for number, block in enumerate(blocks):
        window.append((offset, block, number))
        offset += block.size
        size += block.size
        if size >= WINDOW_BYTES:
            yield window
            window, size = [], 0
    if window:
        yield window


async def _gather(calls: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``calls`` concurrently; the first failure cancels the others and is raised as is."""
    if not calls:
        return []
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(call) for call in calls]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]
