"""Walk a synced folder, compare it with the index, and make rows for what changed.

Blocking (stat, read, hash): the folder's worker runs it off the event loop. A file is hashed
only when its kind, size, mtime or permissions differ from its index row; the read is checked
against the stat it started from (:func:`blocks.chunk_file` ``expect=``), so a file being
written is skipped and picked up by the next scan instead of being sent half-written.

Nothing here ever turns "could not look" into "deleted": a missing root or marker raises
:class:`RootMissing` (checked again before any deletion is reported), and the index rows below an
unreadable folder, a symbolic link or another skipped entry are left as they are.
"""

from __future__ import annotations

import os
import re
import stat
import unicodedata
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NamedTuple, Protocol

from meshagent_gui.core.protocol.sync import (
    MAX_NAME_LENGTH,
    Block,
    FileRow,
    RowKind,
    Segment,
    Version,
    bump,
)
from meshagent_gui.core.share.paths import (
    _RESERVED_STEMS,
    UnsafePath,
    is_link,
    safe_relative_path,
)
from meshagent_gui.errors import UserError

from . import blocks
from .ignore import STATE_DIR, Ignores

MARKER: Final = f"{STATE_DIR}/folder-id"
BATCH_ROWS: Final = 1000
BATCH_BLOCKS: Final = 64 * 1024
"""A batch is also cut at this many inline blocks (~5 MB of rows), whatever its row count."""
PERMISSION_BITS: Final = 0o777
SUBTREE_LOOKUPS: Final = 2000
"""A partial scan of at most this many names looks their rows up; more: one pass over all."""


class RootMissing(Exception):
    """The folder's root or its marker is gone (unmounted disk, deleted or replaced folder):
    the folder stops with an error; this is never read as "everything was deleted"."""


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


@dataclass(frozen=True)
class ScanResult:
    rows: list[FileRow] = field(default_factory=list)
    """New, changed and deleted rows for ``index.put``, in walk order (a folder before its
    contents; deletions last, contents before their folder)."""
    skipped: list[Skipped] = field(default_factory=list)


class ScanIndex(Protocol):
    """What the scanner needs of :class:`meshagent_gui.core.sync.index.FolderIndex`."""

    @property
    def device(self) -> int: ...

    def get(self, name: str) -> FileRow | None: ...

    def all_rows(self) -> Iterator[FileRow]: ...

    def store_segment(self, digest: bytes, blocks: Sequence[Block]) -> None: ...


class _Known(NamedTuple):
    """The compact form of an index row the scanner compares with (100k of them fit in a few
    tens of MB, where full rows with their blocks would not)."""

    kind: RowKind
    deleted: bool
    size: int
    mtime_ns: int
    permissions: int
    version: Version


# --------------------------------------------------------------------------- the marker


def ensure_marker(root: Path, folder_id: str) -> None:
    """Write ``root/.meshsync/folder-id`` (the folder's setup; ``root`` must exist already).

    Never creates ``root`` itself: called on a root that vanished it would hide an unmounted
    disk behind a fresh empty folder. Raises :class:`RootMissing` if ``root`` is not a folder
    and :class:`UserError` if it is already synced as another folder.
    """
    if not root.is_dir():
        raise RootMissing(f"the synced folder {root} is missing")
    state = root / STATE_DIR
    state.mkdir(exist_ok=True)
    marker = root / MARKER
    try:
        current = marker.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        current = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {marker}: {exc}") from exc
    if current == folder_id:
        return
    if current:
        raise UserError(
            f"{root} is already synced as another folder ({current})", code="sync_folder_in_use"
        )
    temporary = state / f"folder-id.{os.getpid()}.tmp"
    temporary.write_text(folder_id + "\n", encoding="ascii")
    os.replace(temporary, marker)


def check_marker(root: Path, folder_id: str | None = None) -> None:
    """Raise :class:`RootMissing` unless ``root`` is a folder holding our marker.

    ``folder_id`` None: any marker will do (the caller does not know the id).
    """
    if not root.is_dir():
        raise RootMissing(f"the synced folder {root} is missing")
    try:
        found = (root / MARKER).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise RootMissing(
            f"{root / MARKER} is missing or unreadable (disk not mounted, or the folder was"
            " replaced)"
        ) from exc
    if folder_id is not None and found != folder_id:
        raise RootMissing(f"{root} now holds another synced folder ({found})")


# --------------------------------------------------------------------------- scanning


def scan(
    root: Path,
    index: ScanIndex,
    ignores: Ignores,
    *,
    only: Collection[str] | None = None,
    folder_id: str | None = None,
) -> ScanResult:
    """Everything :func:`scan_batches` finds, as one result."""
    result = ScanResult()
    for batch in scan_batches(root, index, ignores, only=only, folder_id=folder_id):
        result.rows.extend(batch.rows)
        result.skipped.extend(batch.skipped)
    return result


def scan_batches(
    root: Path,
    index: ScanIndex,
    ignores: Ignores,
    *,
    only: Collection[str] | None = None,
    folder_id: str | None = None,
    batch_rows: int = BATCH_ROWS,
) -> Iterator[ScanResult]:
    """Compare ``root`` (or only the names in ``only`` and the subtrees of those that are
    folders) with ``index``, yielding the rows to ``index.put`` every ~``batch_rows`` rows.

    The index is read whole before the first batch is yielded, so the caller may ``put`` each
    batch as it comes (same thread) without disturbing the comparison. Raises
    :class:`RootMissing` (before anything is yielded, and again before any deletion).
    """
    check_marker(root, folder_id)
    scanner = _Scanner(root, index, ignores, folder_id, batch_rows)
    yield from scanner.run(only)


class _Scanner:
    def __init__(
        self, root: Path, index: ScanIndex, ignores: Ignores, folder_id: str | None, batch: int
    ) -> None:
        self.root = root
        self.index = index
        self.device = index.device
        self.ignores = ignores
        self.folder_id = folder_id
        self.batch = max(1, batch)
        self.known: dict[str, _Known] = {}
        # Names (and their subtrees) seen but not read: their index rows must not turn into
        # deletions.
        self.kept: set[str] = set()
        self.pending = ScanResult()
        self.pending_blocks = 0
        # only=: parent folders of the names (their rows are compared, never deleted unless
        # seen missing), those already handled, and names seen missing on the way down.
        self.parents_only: set[str] = set()
        self.parents_done: set[str] = set()
        self.missing: set[str] = set()

    # ----------------------------------------------------------------- driver

    def run(self, only: Collection[str] | None) -> Iterator[ScanResult]:
        targets = None if only is None else self._targets(only)
        self._load(targets)
        if targets is None:
            yield from self._walk(str(self.root), "")
        else:
            for name in sorted(targets):
                yield from self._scan_one(name)
        yield from self._deletions()
        if self.pending.rows or self.pending.skipped:
            yield self.pending

    def _targets(self, only: Collection[str]) -> set[str]:
        """The valid, not ignored NFC names of ``only``, without those inside another one
        (scanned with it)."""
        names: set[str] = set()
        for raw in only:
            try:
                name = str(safe_relative_path(raw))
            except UnsafePath as exc:
                self._skip(raw, exc.reason)
                continue
            if not self.ignores.ignored(name):  # a folder pattern is checked once on disk
                names.add(name)
        return {name for name in names if not any(a in names for a in _ancestors(name))}

    def _load(self, targets: set[str] | None) -> None:
        """The index rows the scan compares with: all, or those of ``targets``' subtrees and
        their parent folders."""
        parents = set() if targets is None else {a for t in targets for a in _ancestors(t)}
        subtree = getattr(self.index, "subtree", None)
        rows: Iterable[FileRow]
        if targets is not None and subtree is not None and len(targets) <= SUBTREE_LOOKUPS:
            # A few names (the watcher's usual batch): looked up, not a read of every row.
            found = [row for target in targets for row in subtree(target)]
            found += [row for parent in parents if (row := self.index.get(parent)) is not None]
            rows = found
        else:
            rows = self.index.all_rows()
        for row in rows:
            name = row.name
            if targets is not None and not _within(name, targets):
                if name not in parents:
                    continue
                self.parents_only.add(name)
            self.known[name] = _Known(
                row.kind, row.deleted, row.size, row.mtime_ns, row.permissions, row.version
            )

    def _flush_if_full(self) -> Iterator[ScanResult]:
        if len(self.pending.rows) >= self.batch or self.pending_blocks >= BATCH_BLOCKS:
            yield self.pending
            self.pending = ScanResult()
            self.pending_blocks = 0

    # ----------------------------------------------------------------- walking

    def _walk(self, path: str, name: str) -> Iterator[ScanResult]:
        """The subtree of the folder ``name`` (at ``path`` on disk), iteratively."""
        stack: list[tuple[str, str]] = [(path, name)]
        while stack:
            directory, parent = stack.pop()
            entries = self._list(directory, parent)
            subdirs: list[tuple[str, str]] = []
            for entry_path, entry_name, is_dir in entries:
                if self.ignores.matches(entry_name, is_dir=is_dir):
                    continue
                if self._visit(entry_path, entry_name):
                    subdirs.append((entry_path, entry_name))
                yield from self._flush_if_full()
            # Reversed onto the stack: folders are walked in name order, depth first.
            stack.extend(reversed(subdirs))

    def _list(self, directory: str, parent: str) -> list[tuple[str, str, bool]]:
        """``(path, NFC name, is_dir)`` of a folder's valid entries, in name order."""
        try:
            with os.scandir(directory) as iterator:
                raw = [(entry.name, entry.path, _is_dir(entry)) for entry in iterator]
        except (FileNotFoundError, NotADirectoryError):
            return []  # gone since it was listed: its rows become deletions (root re-checked)
        except OSError as exc:
            if parent:
                self._skip(parent, f"unreadable folder: {exc.strerror or exc}")
                self.kept.add(parent)
                return []
            raise RootMissing(f"the synced folder {self.root} cannot be read: {exc}") from exc
        # A name already in NFC first, so that of two names equal after normalisation (possible
        # on Linux) the one a peer would write wins and the other is reported.
        normalised = [(n := _nfc(disk), n != disk, disk, p, d) for disk, p, d in raw]
        normalised.sort()
        entries: list[tuple[str, str, bool]] = []
        previous = ""
        for normal, _, disk_name, entry_path, is_dir in normalised:
            name = f"{parent}/{normal}" if parent else normal
            if normal == previous:
                self._skip(name, "another name here is the same after Unicode normalisation")
                continue
            previous = normal
            # A name already in the index was checked when it was stored.
            problem = "" if name in self.known else _name_problem(normal, name)
            if problem:
                self._skip(_printable(f"{parent}/{disk_name}" if parent else disk_name), problem)
                continue
            entries.append((entry_path, name, is_dir))
        return entries

    def _visit(self, path: str, name: str) -> bool:
        """Compare one entry with its index row; True when it is a folder to walk into."""
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return False  # gone since it was listed: a deletion, unless it comes back
        except OSError as exc:
            self._keep(name, f"unreadable: {exc.strerror or exc}")
            return False
        known = self.known.pop(name, None)
        if is_link(info):
            self._keep(name, "symbolic link (links are not synced)")
            return False
        if stat.S_ISDIR(info.st_mode):
            if _unchanged_dir(known, info):
                return True
            self._add(self._dir_row(name, info, known))
            return True
        if not stat.S_ISREG(info.st_mode):
            self._keep(name, "not a regular file (device, socket or pipe)")
            return False
        if not _unchanged_file(known, info):
            self._file(path, name, info, known)
        return False

    # ----------------------------------------------------------------- only=

    def _scan_one(self, name: str) -> Iterator[ScanResult]:
        """One name of ``only=``: its parent folders' rows, then itself and its subtree."""
        parts = name.split("/")
        path = str(self.root)
        for depth, part in enumerate(parts):
            current = "/".join(parts[: depth + 1])
            found = _lookup(path, part)
            if found is None:
                self.missing.add(current)  # it and everything below: deletions
                return
            path = found
            if depth == len(parts) - 1 or current in self.parents_done:
                continue
            self.parents_done.add(current)
            try:
                info = os.lstat(path)
            except OSError:
                return
            if not stat.S_ISDIR(info.st_mode) or is_link(info):
                self._visit(path, current)  # a file where a folder was, or a link (kept)
                self.missing.add(current)
                return
            known = self.known.pop(current, None)
            if not _unchanged_dir(known, info):
                self._add(self._dir_row(current, info, known))
        try:
            is_dir = stat.S_ISDIR(os.lstat(path).st_mode)
        except OSError:
            is_dir = False
        if self.ignores.ignored(name, is_dir=is_dir):
            self.known.pop(name, None)  # left alone, like everything ignored
            return
        if self._visit(path, name):
            yield from self._walk(path, name)
        yield from self._flush_if_full()

    # ----------------------------------------------------------------- rows

    def _dir_row(self, name: str, info: os.stat_result, known: _Known | None) -> FileRow:
        return FileRow(
            name=name,
            kind="dir",
            deleted=False,
            size=0,
            mtime_ns=info.st_mtime_ns,
            permissions=info.st_mode & PERMISSION_BITS,
            version=self._bump(known),
            sequence=0,
            modified_by=self.device,
        )

    def _file(self, path: str, name: str, info: os.stat_result, known: _Known | None) -> None:
        inline: tuple[Block, ...] = ()
        segments: tuple[Segment, ...] = ()
        reused = self._same_content(name, info, known)
        if reused is not None:
            inline, segments = reused  # only the permissions changed: no need to read it
        else:
            try:
                found = blocks.chunk_file(path, expect=info, piece_size=_piece_size(info))
            except blocks.FileChangedError:
                self._keep(name, "changed while read (retried at the next scan)")
                return
            except FileNotFoundError:
                self._keep(name, "changed while read (retried at the next scan)")
                return
            except OSError as exc:
                self._keep(name, f"unreadable: {exc.strerror or exc}")
                return
            inline, segments = blocks.row_layout(found)
            if segments:
                for segment, run in blocks.segments_of(found):
                    self.index.store_segment(segment.digest, run)
        self.pending_blocks += len(inline)
        self._add(
            FileRow(
                name=name,
                kind="file",
                deleted=False,
                size=info.st_size,
                mtime_ns=info.st_mtime_ns,
                permissions=info.st_mode & PERMISSION_BITS,
                version=self._bump(known),
                sequence=0,
                modified_by=self.device,
                blocks=inline,
                segments=segments,
            )
        )

    def _same_content(
        self, name: str, info: os.stat_result, known: _Known | None
    ) -> tuple[tuple[Block, ...], tuple[Segment, ...]] | None:
        if (
            known is None
            or known.deleted
            or known.kind != "file"
            or known.size != info.st_size
            or known.mtime_ns != info.st_mtime_ns
        ):
            return None
        row = self.index.get(name)
        if row is None or row.deleted or row.kind != "file":
            return None
        return row.blocks, row.segments

    def _bump(self, known: _Known | None) -> Version:
        return bump(known.version if known is not None else (), self.device)

    def _deletions(self) -> Iterator[ScanResult]:
        """Index rows not found on disk, as deletions (contents before their folder)."""
        gone = [
            name
            for name, known in self.known.items()
            if not known.deleted
            and not (name in self.parents_only and not _within(name, self.missing))
            and not (self.kept and _within(name, self.kept))
            and not self.ignores.ignored(name, is_dir=known.kind == "dir")
        ]
        if not gone:
            return
        # An unmounted disk or a deleted folder looks like "everything is gone": look again.
        check_marker(self.root, self.folder_id)
        for name in sorted(gone, reverse=True):
            known = self.known[name]
            self._add(
                FileRow(
                    name=name,
                    kind=known.kind,
                    deleted=True,
                    size=0,
                    mtime_ns=known.mtime_ns,
                    permissions=known.permissions,
                    version=self._bump(known),
                    sequence=0,
                    modified_by=self.device,
                )
            )
            yield from self._flush_if_full()

    def _add(self, row: FileRow) -> None:
        self.pending.rows.append(row)

    def _skip(self, name: str, reason: str) -> None:
        self.pending.skipped.append(Skipped(name, reason))

    def _keep(self, name: str, reason: str) -> None:
        """Report ``name`` as skipped and keep its index rows (and those below it) as they are."""
        self.kept.add(name)
        self.known.pop(name, None)
        self._skip(name, reason)


# --------------------------------------------------------------------------- helpers


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _ancestors(name: str) -> Iterable[str]:
    """``"a/b/c"`` -> ``"a"``, ``"a/b"``."""
    position = name.find("/")
    while position != -1:
        yield name[:position]
        position = name.find("/", position + 1)


def _within(name: str, names: Collection[str]) -> bool:
    """``name`` is one of ``names`` or inside one of them."""
    return name in names or any(a in names for a in _ancestors(name))


def _printable(name: str) -> str:
    """A name from disk that may hold undecodable bytes (as surrogates), made safe to show."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


# Most names: ASCII letters, digits, "_-." and inner spaces, not ending in a dot or space, short:
# valid everywhere unless a reserved Windows stem (checked apart). A scan of 100k new files
# would otherwise spend a tenth of its time in the full check.
_PLAIN_NAME: Final = re.compile(
    r"[A-Za-z0-9_\-][A-Za-z0-9_\-. ]{0,198}[A-Za-z0-9_\-]|[A-Za-z0-9_\-]"
)


def _name_problem(component: str, name: str) -> str:
    """Why a name found on disk cannot be synced ("" when it can): the peer's checks."""
    if (
        _PLAIN_NAME.fullmatch(component)
        and len(name) <= MAX_NAME_LENGTH
        and name.isascii()
        and component.split(".", 1)[0].rstrip(" ").upper() not in _RESERVED_STEMS
    ):
        return ""
    try:
        safe_relative_path(component)
    except UnsafePath as exc:
        return exc.reason
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_LENGTH:
        return f"the path is longer than {MAX_NAME_LENGTH} bytes"
    return ""


def _lookup(directory: str, part: str) -> str | None:
    """``directory/part`` on disk: the NFC name, else its NFD form (macOS, or a file copied
    from there), else None."""
    for candidate in dict.fromkeys((part, unicodedata.normalize("NFD", part))):
        path = os.path.join(directory, candidate)
        if os.path.lexists(path):
            return path
    return None


def _piece_size(info: os.stat_result) -> int:
    # chunk_file allocates a whole piece per call (8 MiB by default): 3 ms for a tiny file,
    # minutes for a first scan of 100k of them. Any piece size gives the same blocks.
    return blocks.MIN_PIECE_SIZE if info.st_size < blocks.MIN_PIECE_SIZE else blocks.PIECE_SIZE


def _unchanged_dir(known: _Known | None, info: os.stat_result) -> bool:
    # A folder's mtime moves with every entry added or removed: that is no change of the
    # folder itself (comparing it would make every new file a folder conflict too).
    return (
        known is not None
        and not known.deleted
        and known.kind == "dir"
        and known.permissions == info.st_mode & PERMISSION_BITS
    )


def _unchanged_file(known: _Known | None, info: os.stat_result) -> bool:
    return (
        known is not None
        and not known.deleted
        and known.kind == "file"
        and known.size == info.st_size
        and known.mtime_ns == info.st_mtime_ns
        and known.permissions == info.st_mode & PERMISSION_BITS
    )
