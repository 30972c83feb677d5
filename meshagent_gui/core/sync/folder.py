"""One synced folder: its index, scans, watcher, state, and the streams with each of its peers.

docs/sync.md is the design. A :class:`SyncFolder` owns:

- its :class:`~.index.FolderIndex`, used from ONE worker thread (``executor``): SQLite objects
  are bound to a thread, and one writer at a time is what SQLite wants anyway; the applier's
  disk work runs there too, so a file is never half-indexed while a scan looks at it;
- the scans: one at start (changes made while this agent was stopped), partial ones for what
  the watcher reports, and a full one every ``rescan_interval`` (the watcher's safety net, and
  the retry of a folder whose root was gone);
- for each peer a *pull* link (:class:`PullLink`): it subscribes to the peer's index, stores
  the rows, decides each with ``decide()`` and applies what needs doing, asking the peer for
  the blocks it cannot copy locally; and the *serve* side (:meth:`SyncFolder.serve`) that
  answers a peer's own pull stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar

import msgspec

from meshagent_gui.core.bus import EventBus
from meshagent_gui.core.events import (
    SyncConflict,
    SyncFailed,
    SyncFileChanged,
    SyncPeerConnected,
    SyncPeerDisconnected,
    SyncStateChanged,
)
from meshagent_gui.core.ipc_types import FolderInfo, FolderPeerInfo
from meshagent_gui.core.mesh.client import MeshClient
from meshagent_gui.core.p2p.errors import P2PError
from meshagent_gui.core.p2p.peers import PeerManager
from meshagent_gui.core.p2p.session import Channel, ChannelClosed
from meshagent_gui.core.protocol.errors import ErrorCode, LocalProtocolError, ProtocolError
from meshagent_gui.core.protocol.messages import StreamRole
from meshagent_gui.core.protocol.sync import (
    MAX_BATCH_ROWS,
    Action,
    Block,
    BlockMissing,
    BlockReply,
    BlockRequest,
    Decision,
    FileRow,
    FolderInput,
    FolderState,
    IndexBatch,
    RowKind,
    SegmentReply,
    SegmentRequest,
    Subscribe,
    decide,
    next_state,
    short_id,
    validate_row,
)
from meshagent_gui.core.share.disk import DISK
from meshagent_gui.core.share.paths import UnsafePath, resolve_inside, resolve_many
from meshagent_gui.errors import UserError

from .apply import Applied, Applier, BlockUnavailable, SmallOutcome, is_small
from .blocks import digest, segment_digest
from .ignore import Ignores
from .index import FolderIndex
from .scanner import MARKER, RootMissing, Skipped, ensure_marker, scan_batches
from .watcher import FolderWatcher

log = logging.getLogger(__name__)

T = TypeVar("T")

SCOPE: Final = "share:folder"
CONFLICT_MARK: Final = ".sync-conflict-"
MAX_IN_FLIGHT: Final = 32 * 1024 * 1024
"""Bytes of block requests a puller keeps outstanding toward one peer."""
MAX_DIRTY_NAMES: Final = 100_000
"""Names of a peer's new rows remembered until they are decided; more: all are decided again."""
BATCH_BYTES: Final = 1024 * 1024
"""An IndexBatch is cut at about this many bytes (or MAX_BATCH_ROWS rows)."""
REPLY_TIMEOUT: Final = 60.0
"""A block or segment the peer does not answer in this long: the stream is dead."""
RETRY_DELAY: Final = 2.0
"""Rows that could not be applied (a block gone, a file being written) are retried this late."""
BACKOFF_MAX: Final = 30.0
SERVE_READS: Final = 16
"""Block reads a serving stream runs at once."""
SERVE_BATCH: Final = 256
SERVE_BATCH_BYTES: Final = 4 * 1024 * 1024
"""Block requests read in one trip to a reader thread, at most (count, bytes)."""
_READ_FLAGS: Final = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
BACKOFF_MIN: Final = 1.0
RESCAN_SHARE: Final = 0.01
"""The safety-net rescan waits at least 100x its last duration (the watcher catches changes)."""
SMALL_BATCH_FILES: Final = 256
SMALL_BATCH_BYTES: Final = 8 * 1024 * 1024
"""Files of one block are applied in batches of this many (one syncfs, one index put each)."""
WRITERS: Final = 1
"""Threads writing small-file batches (no SQLite there)."""
PLAN_CHUNK: Final = 500
"""Rows decided per batched lookup of our own rows."""
BATCHES_IN_FLIGHT: Final = 3
"""Small-file batches in progress at once: one being written while the next ones fetch."""
FILES_IN_FLIGHT: Final = 8
FILE_BYTES_IN_FLIGHT: Final = 256 * 1024 * 1024
"""Larger files assembled at once (their block requests share the stream's MAX_IN_FLIGHT)."""


class FolderConfig(msgspec.Struct, kw_only=True):
    """What ``folders.json`` keeps of one folder."""

    folder_id: str
    label: str
    path: str
    peers: list[str] = []
    paused: bool = False


@dataclass(frozen=True)
class FolderHost:
    """What every folder gets from the service: the mesh, the bus, names and settings."""

    bus: EventBus
    peers: PeerManager
    client: MeshClient
    index_dir: Path
    device_id: str
    device_name: Callable[[], str]
    peer_name: Callable[[str], str]
    versions_days: Callable[[], float]
    rescan_interval: Callable[[], float]
    reader: Executor
    """Shared threads for the serving side's block reads (no SQLite there)."""


@dataclass
class PeerState:
    """One peer of one folder, as this device sees it."""

    device_id: str
    pulling: bool = False  # our pull stream to it is up
    serving: int = 0  # its pull streams to us
    needed: dict[str, int] = field(default_factory=dict)  # name -> size still to pull
    fetched_blocks: int = 0
    fetched_bytes: int = 0
    served_blocks: int = 0
    served_bytes: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the peer came online: the pull loop retries at once instead of backing off."""

    @property
    def connected(self) -> bool:
        return self.pulling or self.serving > 0


class Planned(NamedTuple):
    """A peer's row to apply, as the pull pipeline schedules it: names and sizes only, so a
    first pull of 100,000 files does not hold 100,000 rows with their blocks (a batch reads
    its rows again, and decides them again, when its turn comes)."""

    name: str
    kind: RowKind
    deleted: bool
    size: int
    small: bool
    """One block at most: applied many at a time (:func:`~.apply.is_small`)."""


class SyncProtocolError(ProtocolError):
    """The peer sent something a sync stream may not carry (a bad row, an unknown reply)."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(code, message)


class SyncFolder:
    def __init__(self, config: FolderConfig, host: FolderHost) -> None:
        self.config = config
        self.host = host
        self.root = Path(config.path)
        self.me = short_id(host.device_id)
        self.state = FolderState.STARTING
        self.error = ""
        self.files = 0
        self.bytes = 0
        self.conflicts = 0
        self.last_change: float | None = None
        # One thread: the index's SQLite connection lives there (see the module docstring).
        self.executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"meshsync-{config.folder_id[:8]}"
        )
        # Small-file batches are written (and synced) here while the worker places the last.
        self.writer = ThreadPoolExecutor(
            max_workers=WRITERS, thread_name_prefix=f"meshsync-w-{config.folder_id[:8]}"
        )
        self.index: FolderIndex | None = None
        self.applier: Applier | None = None
        self.ignores: Ignores | None = None
        self.peers: dict[str, PeerState] = {p: PeerState(p) for p in config.peers}
        self.opened = asyncio.Event()
        self._sequence = 0  # the index's, as last read in the worker (the servers wait on it)
        self._grew = asyncio.Condition()
        self._scan_lock = asyncio.Lock()
        self._applying: set[str] = set()  # names being applied (by any peer's link)
        self._serving: set[Channel] = set()  # peers' pull streams we answer (cut on pause)
        self._links: set[PullLink] = set()  # our pull streams
        self._ignores_changed = False  # set by the worker's scan, read on the loop
        self._working: set[str] = set()  # peers whose rows are being applied
        self._resumed = asyncio.Event()
        if not config.paused:
            self._resumed.set()
        self._activity: asyncio.Task[None] | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._pulls: dict[str, asyncio.Task[None]] = {}
        self._stale = False  # the index changed since the servers were last woken
        self._refresh: asyncio.Task[None] | None = None

    @property
    def folder_id(self) -> str:
        return self.config.folder_id

    @property
    def label(self) -> str:
        return self.config.label

    @property
    def healthy(self) -> bool:
        return self.state not in (FolderState.ERROR, FolderState.PAUSED, FolderState.STARTING)

    # ------------------------------------------------------------ the worker thread

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on this folder's worker thread (the index lives there)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args))

    def _index(self) -> FolderIndex:
        if self.index is None:
            raise RuntimeError("the folder's index is not open")
        return self.index

    # ------------------------------------------------------------ running

    async def run(self) -> None:
        """Until cancelled: open the index, then scan, watch, pull and serve while not paused."""
        try:
            path = self.host.index_dir / f"{self.folder_id}.sqlite"
            self.index = await self.db(_open_index, path, self.me)
            self.ignores = await self.db(Ignores, self.root)
            self.applier = Applier(
                self.root,
                self.index,
                executor=self.executor,
                writer=self.writer,
                device_name=self.host.device_name(),
                versions_days=self.host.versions_days(),
            )
            self._sequence = await self.db(lambda: self._index().sequence)
            self.opened.set()
            while True:
                if not self._resumed.is_set():
                    self._input(FolderInput.PAUSED)
                    await self._resumed.wait()
                    self._input(FolderInput.RESUMED)
                self._activity = asyncio.create_task(self._active(), name="sync-folder-active")
                try:
                    await self._activity
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise  # the folder stops (removed, agent stopping), not a pause
                except Exception as exc:
                    log.exception("sync of %s failed", self.label)
                    self._fail(f"failed: {exc}")
                    await asyncio.sleep(self.host.rescan_interval())
                finally:
                    self._activity = None
        finally:
            if self._activity is not None:
                self._activity.cancel()
            if self._refresh is not None:
                self._refresh.cancel()
            await self._close()

    async def _close(self) -> None:
        index = self.index
        self.index = None
        if index is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(asyncio.wrap_future(self.executor.submit(index.close)))
        self.executor.shutdown(wait=False)
        self.writer.shutdown(wait=False)

    async def _active(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            try:
                await self.db(self._adopt_root)
                await self.scan()
                if self.healthy and self.applier is not None:
                    await self.applier.clean_tmp()  # what a kill -9 left half-assembled
                tasks.create_task(self._watch(), name="sync-watch")
                tasks.create_task(self._rescan_loop(), name="sync-rescan")
                for peer in self.peers.values():
                    self._pulls[peer.device_id] = tasks.create_task(
                        self._pull_loop(peer), name="sync-pull"
                    )
            except BaseException:
                self._tasks = None
                raise
        self._tasks = None

    def _adopt_root(self) -> None:
        """(Worker) A folder that has nothing indexed yet gets its marker (nothing to lose)."""
        if self.root.is_dir() and self._index().sequence == 0 and not (self.root / MARKER).exists():
            ensure_marker(self.root, self.folder_id)

    def add_peer(self, peer_id: str) -> None:
        """Sync with one more device (its pull loop starts now if the folder runs)."""
        if peer_id in self.peers:
            return
        if peer_id not in self.config.peers:
            self.config.peers.append(peer_id)
        peer = self.peers[peer_id] = PeerState(peer_id)
        if self._tasks is not None:
            self._pulls[peer_id] = self._tasks.create_task(self._pull_loop(peer), name="sync-pull")

    def remove_peer(self, peer_id: str) -> None:
        """Stop syncing with ``peer_id`` (an offer it declined): its pull loop ends at once."""
        self.peers.pop(peer_id, None)
        with contextlib.suppress(ValueError):
            self.config.peers.remove(peer_id)
        task = self._pulls.pop(peer_id, None)
        if task is not None:
            task.cancel()

    def peer_online(self, peer_id: str) -> None:
        """The peer is reachable again: a pull loop waiting out its backoff retries now."""
        peer = self.peers.get(peer_id)
        if peer is not None and not peer.pulling:
            peer.wake.set()

    def pause(self) -> None:
        """Stop at once: scans, pulls (their streams closed, a file being assembled dropped)
        and the streams peers pull through (closed; new ones are refused until resumed)."""
        self.config.paused = True
        self._resumed.clear()
        if self._activity is not None:
            self._activity.cancel()
        if self.opened.is_set():
            self._input(FolderInput.PAUSED)  # shown at once (the run loop's is then a no-op)
        for channel in list(self._serving):
            channel.abort(ErrorCode.GOING_AWAY, "paused")

    def resume(self) -> None:
        self.config.paused = False
        self._resumed.set()

    # ------------------------------------------------------------ state

    def _input(self, event: FolderInput, detail: str = "") -> None:
        try:
            new = next_state(self.state, event)
        except LocalProtocolError:
            return  # e.g. a scan while syncing: the state shown stays "syncing"
        if new != self.state:
            self.state = new
            self.host.bus.publish(SyncStateChanged(self.folder_id, self.label, new.value, detail))

    def _linked(self, peer: PeerState, *, pulling: bool | None = None, serving: int = 0) -> None:
        """A stream with ``peer`` came or went: tell when that connects or disconnects it (so
        views follow without polling)."""
        before = peer.connected
        if pulling is not None:
            peer.pulling = pulling
        peer.serving += serving
        if peer.connected == before or peer is not self.peers.get(peer.device_id):
            return
        kind = SyncPeerConnected if peer.connected else SyncPeerDisconnected
        name = self.host.peer_name(peer.device_id)
        self.host.bus.publish(kind(self.folder_id, self.label, peer.device_id, name))

    def _fail(self, message: str) -> None:
        self.error = message
        self._input(FolderInput.FAILED, message)
        self.host.bus.publish(SyncFailed(self.folder_id, self.label, message))

    def _recovered(self) -> None:
        if self.state is FolderState.ERROR:
            self.error = ""
            self._input(FolderInput.RETRIED)
            for peer in self.peers.values():
                peer.wake.set()

    async def changed(self) -> None:
        """The index may have grown: wake the serving streams (and count the files again)."""
        sequence, (self.files, self.bytes) = await self.db(self._progress)
        if sequence != self._sequence:
            self._sequence = sequence
            self.last_change = time.time()
            async with self._grew:
                self._grew.notify_all()

    def _changed_soon(self) -> None:
        """:meth:`changed`, without waiting for it: a batch of pulled files frees its slot at
        once instead of queueing behind the worker's next batches (the index is read as soon
        as the worker is free; changes meanwhile are read by the same trip or the next)."""
        self._stale = True
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._refresh_loop(), name="sync-changed")

    async def _refresh_loop(self) -> None:
        while self._stale:
            self._stale = False
            try:
                await self.changed()
            except Exception:  # the index closed under us (removed, paused): nothing to tell
                log.debug("sync %s: progress not read", self.label, exc_info=True)
                return

    def _progress(self) -> tuple[int, tuple[int, int]]:
        index = self._index()
        return index.sequence, index.count()

    # ------------------------------------------------------------ scanning

    async def scan(self, only: Collection[str] | None = None) -> int | None:
        """Scan all (``only`` None) or some names: how many rows changed; None when the root
        is gone (state ERROR)."""
        if only is not None and not self.healthy:
            return None  # a broken or paused folder waits for its next full scan
        async with self._scan_lock:
            if only is None:
                self._input(FolderInput.SCAN_STARTED)
            try:
                changed, skipped = await self.db(self._scan_blocking, only)
            except RootMissing as exc:
                if self.state is not FolderState.ERROR:
                    self._fail(f"the folder {self.root} is gone or not ours any more ({exc})")
                return None
            except OSError as exc:
                self._fail(f"cannot scan {self.root}: {exc.strerror or exc}")
                return None
            self._recovered()
            if self._ignores_changed:
                # Peers' rows skipped as ignored (or taken before) are decided again.
                self._ignores_changed = False
                for link in self._links:
                    link.replan()
            for entry in skipped:
                log.info("sync %s: skipped %s (%s)", self.label, entry.name, entry.reason)
            if only is None:
                self._input(FolderInput.SCAN_DONE)
                if self._working:
                    self._input(FolderInput.WORK_FOUND)
        if changed:
            await self.changed()
        return changed

    def _scan_blocking(self, only: Collection[str] | None) -> tuple[int, list[Skipped]]:
        """(Worker) Scan, indexing each batch of rows as it comes (a first scan of 100,000
        files never holds all their rows at once); (rows changed, names skipped)."""
        index = self._index()
        ignores = self.ignores
        assert ignores is not None
        if ignores.reload():
            only = None  # newly unignored files are found by a full scan
            self._ignores_changed = True
        elif only is not None and self.applier is not None and self.applier.placed:
            # The watcher reports what we just pulled too: those need no scan.
            only = [name for name in only if not self.applier.echo(name)]
            if not only:
                return 0, []
        changed = 0
        skipped: list[Skipped] = []
        for batch in scan_batches(self.root, index, ignores, only=only, folder_id=self.folder_id):
            if batch.rows:
                index.put(batch.rows)
                changed += len(batch.rows)
            skipped.extend(batch.skipped)
        self.files, self.bytes = index.count()
        if only is None:
            self.conflicts = sum(
                1 for row in index.all_rows() if not row.deleted and CONFLICT_MARK in row.name
            )
        return changed, skipped

    async def _watch(self) -> None:
        while True:
            try:
                async with FolderWatcher(self.root) as watcher:
                    async for names in watcher.changes():
                        if not self.healthy:
                            continue
                        await self.scan(None if names is None else names)
            except OSError as exc:
                log.info("sync %s: not watching (%s); rescans only", self.label, exc)
            await asyncio.sleep(self.host.rescan_interval())

    async def _rescan_loop(self) -> None:
        took = 0.0
        while True:
            # A big folder's rescan takes long: it runs at most RESCAN_SHARE of the time, so an
            # idle folder of 100,000 files costs next to nothing between changes.
            await asyncio.sleep(max(self.host.rescan_interval(), took / RESCAN_SHARE))
            started = time.monotonic()
            await self.scan()
            took = time.monotonic() - started
            if self.applier is not None and self.healthy:
                with contextlib.suppress(OSError):
                    await self.applier.clean_versions()

    # ------------------------------------------------------------ pulling

    async def _pull_loop(self, peer: PeerState) -> None:
        """Keep a pull stream to ``peer`` while it is reachable; back off while it is not."""
        backoff = BACKOFF_MIN
        while True:
            started = time.monotonic()
            # Cleared before the attempt, not after: a PeerCameOnline that arrives while it
            # fails (the peer still starting) must cut the wait that follows short.
            peer.wake.clear()
            try:
                await self._pull(peer)
            except (UserError, P2PError, ConnectionError, TimeoutError) as exc:
                log.debug("sync %s: pull from %s ended: %s", self.label, peer.device_id[:12], exc)
            except ProtocolError as exc:
                log.warning("sync %s: %s broke the protocol: %s", self.label, peer.device_id, exc)
            finally:
                self._linked(peer, pulling=False)
                self._working.discard(peer.device_id)
            if time.monotonic() - started > 30:
                backoff = BACKOFF_MIN  # it worked for a while: this is a new problem
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):  # not wait_for: 3.11's can lose a cancel
                    await peer.wake.wait()
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _pull(self, peer: PeerState) -> None:
        session = await self.host.peers.session(peer.device_id)
        grant = await self.host.client.capability(peer.device_id, SCOPE, self.folder_id)
        channel = await session.open_channel(
            StreamRole.SYNC, tokens=(grant.token,), resource=self.folder_id
        )
        link = PullLink(self, peer, channel)
        self._linked(peer, pulling=True)
        self._links.add(link)
        try:
            await link.run()
        finally:
            self._links.discard(link)
            link.fail_waiting()
            channel.abort(ErrorCode.NO_ERROR, "done")

    async def apply_planned(
        self, peer: PeerState, planned: Sequence[Planned], source: PullLink
    ) -> set[str]:
        """Apply the peer's planned rows: folders, then files (many at once: files of one
        block in batches, larger ones side by side), then deletions (last, so a renamed file's
        blocks are still here to copy); the names to try again later."""
        retry: set[str] = set()
        folders = [row.name for row in planned if row.kind == "dir" and not row.deleted]
        files = [row for row in planned if row.kind == "file" and not row.deleted]
        gone = [row.name for row in planned if row.deleted]
        for start in range(0, len(folders), SMALL_BATCH_FILES):
            await self._apply_rows(peer, folders[start : start + SMALL_BATCH_FILES], source, retry)
        with unwrapped():
            async with asyncio.TaskGroup() as tasks:
                small = [row for row in files if row.small]
                tasks.create_task(self._apply_small_files(peer, small, source, retry))
                large = [row for row in files if not row.small]
                tasks.create_task(self._apply_large_files(peer, large, source, retry))
        for start in range(0, len(gone), SMALL_BATCH_FILES):
            await self._apply_rows(peer, gone[start : start + SMALL_BATCH_FILES], source, retry)
        return retry

    async def _apply_small_files(
        self, peer: PeerState, rows: Sequence[Planned], source: PullLink, retry: set[str]
    ) -> None:
        slots = asyncio.Semaphore(BATCHES_IN_FLIGHT)
        async with asyncio.TaskGroup() as tasks:  # unwrapped by apply_planned
            for batch in _small_batches(rows):
                await slots.acquire()
                task = tasks.create_task(self._apply_rows(peer, batch, source, retry))
                task.add_done_callback(lambda _: slots.release())

    async def _apply_large_files(
        self, peer: PeerState, rows: Sequence[Planned], source: PullLink, retry: set[str]
    ) -> None:
        slots = asyncio.Semaphore(FILES_IN_FLIGHT)
        budget = ByteBudget(FILE_BYTES_IN_FLIGHT)
        async with asyncio.TaskGroup() as tasks:  # unwrapped by apply_planned
            for row in rows:
                await slots.acquire()
                try:
                    taken = await budget.acquire(row.size)
                except BaseException:
                    slots.release()
                    raise
                task = tasks.create_task(self._apply_rows(peer, [row.name], source, retry))
                task.add_done_callback(functools.partial(_release_both, slots, budget, taken))

    async def _apply_rows(
        self, peer: PeerState, names: Sequence[str], source: PullLink, retry: set[str]
    ) -> None:
        """Decide ``names`` again (another peer's row may have been applied meanwhile), apply
        what is still to do, report it; names not done go to ``retry``."""
        applier = self.applier
        assert applier is not None
        if not self.healthy:
            retry.update(names)
            return
        # A name another peer's rows are applying right now waits for the next pass.
        mine = [name for name in names if name not in self._applying]
        retry.update(name for name in names if name in self._applying)
        self._applying.update(mine)
        outcomes: list[tuple[FileRow, SmallOutcome]] = []
        try:
            planned = await self.db(self._decide_many, peer.device_id, mine)
            for name in set(mine).difference(row.name for row, _ in planned):
                peer.needed.pop(name, None)
            small = [(r, d) for r, d in planned if d.action is Action.TAKE and is_small(r)]
            if small:
                results = await applier.apply_small(small, source)
                outcomes.extend(zip((r for r, _ in small), results, strict=True))
            for remote, decision in planned:
                if decision.action is Action.TAKE and is_small(remote):
                    continue
                try:
                    outcome: SmallOutcome = await applier.apply(remote, decision, source)
                except (BlockUnavailable, UserError, OSError) as exc:
                    outcome = exc
                outcomes.append((remote, outcome))
        finally:
            self._applying.difference_update(mine)
        failure = ""
        for remote, outcome in outcomes:
            if isinstance(outcome, Applied):
                if await self._applied(peer, remote, outcome):
                    retry.add(remote.name)
                else:
                    peer.needed.pop(remote.name, None)
                continue
            retry.add(remote.name)
            if isinstance(outcome, BlockUnavailable):
                log.info("sync %s: %s: %s; later", self.label, remote.name, outcome)
            elif isinstance(outcome, UserError) and outcome.code in ("disk_full", "root_missing"):
                failure = outcome.message  # one error state for the batch, retried at rescan
            elif isinstance(outcome, UserError):  # a damaged block (hash_mismatch): asked again
                log.warning("sync %s: %s: %s", self.label, remote.name, outcome.message)
            elif isinstance(outcome, OSError):
                log.warning("sync %s: cannot apply %s: %s", self.label, remote.name, outcome)
            else:
                raise outcome
        if failure and self.state is not FolderState.ERROR:
            self._fail(failure)
        if outcomes:
            self._changed_soon()

    async def _applied(self, peer: PeerState, remote: FileRow, applied: Applied) -> bool:
        """Report what ``apply`` did; True when the row must be tried again."""
        peer_name = self.host.peer_name(peer.device_id)
        match applied.outcome:
            case "deferred":
                await self.scan({remote.name})  # our change first: then decide again
                return True
            case "skipped":
                log.info("sync %s: skipped %s: %s", self.label, applied.name, applied.detail)
                return False
            case "conflict":
                self.conflicts += 1
                self.host.bus.publish(
                    SyncConflict(
                        self.folder_id, self.label, applied.name, applied.conflict_name, peer_name
                    )
                )
                if applied.conflict_name:
                    await self.scan({applied.conflict_name})
        self.host.bus.publish(
            SyncFileChanged(self.folder_id, self.label, remote.name, peer_name, remote.deleted)
        )
        return False

    def _decide_many(self, peer_id: str, names: Iterable[str]) -> list[tuple[FileRow, Decision]]:
        """(Worker) What is still to do of the peer's rows for ``names``, in their order
        (two queries per chunk of names, not two per name)."""
        index = self._index()
        wanted = list(names)
        remotes = index.peer_rows_named(peer_id, wanted)
        ours = index.get_many(remotes)
        planned = []
        for name in wanted:
            remote = remotes.get(name)
            if remote is None:
                continue
            decision = decide(ours.get(name), remote, me=self.me)
            if decision.action is not Action.NOTHING:
                planned.append((remote, decision))
        return planned

    def plan(self, peer_id: str, names: Collection[str] | None) -> list[Planned]:
        """(Worker) The peer's rows that need doing here (``names`` None: all of them), in
        the order to apply them, in their compact form (each is read and decided again when
        its batch is applied)."""
        index = self._index()
        ignores = self.ignores
        assert ignores is not None
        rows: Iterable[FileRow] = (
            index.peer_rows(peer_id)
            if names is None
            else index.peer_rows_named(peer_id, names).values()
        )
        planned = []
        for chunk in _chunks(rows, PLAN_CHUNK):
            kept = [r for r in chunk if not ignores.ignored(r.name, is_dir=r.kind == "dir")]
            ours = index.get_many(r.name for r in kept)
            for remote in kept:
                decision = decide(ours.get(remote.name), remote, me=self.me)
                if decision.action is not Action.NOTHING:
                    planned.append(
                        Planned(
                            remote.name, remote.kind, remote.deleted, remote.size, is_small(remote)
                        )
                    )
        planned.sort(key=_apply_order)
        return planned

    def working(self, peer_id: str, busy: bool) -> None:
        if busy and not self._working:
            self._working.add(peer_id)
            self._input(FolderInput.WORK_FOUND)
        elif busy:
            self._working.add(peer_id)
        elif peer_id in self._working:
            self._working.discard(peer_id)
            if not self._working:
                self._input(FolderInput.WORK_DONE)

    # ------------------------------------------------------------ serving

    async def serve(self, channel: Channel, subscribe: Subscribe) -> None:
        """Answer a peer's pull stream: our index from its ``since``, live rows after the
        backlog, and the blocks and segments it asks for."""
        await self.opened.wait()
        if self.config.paused:
            channel.abort(ErrorCode.GOING_AWAY, "paused")
            return
        peer = self.peers[channel.peer_id]
        self._linked(peer, serving=1)
        self._serving.add(channel)
        try:
            with unwrapped():
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self._send_index(channel, subscribe))
                    tasks.create_task(self._answer(channel, peer))
        finally:
            self._serving.discard(channel)
            self._linked(peer, serving=-1)

    async def _send_index(self, channel: Channel, subscribe: Subscribe) -> None:
        index = self._index()
        index_id = index.index_id
        since = subscribe.since if subscribe.index_id == index_id else 0
        backlog = True
        while True:
            rows = await self.db(index.since, since, MAX_BATCH_ROWS)
            for batch in _batches(rows):
                await channel.send(IndexBatch(index_id, batch))
            if rows:
                since = rows[-1].sequence
                if len(rows) == MAX_BATCH_ROWS:
                    continue
            if backlog:
                await channel.send(IndexBatch(index_id, (), done=True))
                backlog = False
            async with self._grew:
                await self._grew.wait_for(functools.partial(self._newer_than, since))

    def _newer_than(self, sequence: int) -> bool:
        return self._sequence > sequence

    async def _answer(self, channel: Channel, peer: PeerState) -> None:
        reads = asyncio.Semaphore(SERVE_READS)
        pending: object | None = None
        async with asyncio.TaskGroup() as tasks:  # unwrapped by serve()
            while True:
                message = pending if pending is not None else await channel.receive()
                pending = None
                if isinstance(message, BlockRequest):
                    # Requests that arrived together are read in one trip to a reader thread
                    # (a puller of small files asks for thousands of tiny blocks at once).
                    batch = [message]
                    size = message.size
                    while len(batch) < SERVE_BATCH and size < SERVE_BATCH_BYTES:
                        pending = channel.poll()
                        if not isinstance(pending, BlockRequest):
                            break
                        batch.append(pending)
                        size += pending.size
                        pending = None
                    await reads.acquire()
                    task = tasks.create_task(self._serve_blocks(channel, peer, batch))
                    task.add_done_callback(lambda _: reads.release())
                elif isinstance(message, SegmentRequest):
                    blocks = await self.db(self._index().segment, message.digest)
                    if blocks:
                        await channel.send(SegmentReply(message.request_id, tuple(blocks)))
                    else:
                        await channel.send(BlockMissing(message.request_id, "unknown segment"))
                else:
                    channel.abort(ErrorCode.UNEXPECTED_MESSAGE, "not a pull request")
                    raise SyncProtocolError(f"unexpected {type(message).__name__} from a puller")

    async def _serve_blocks(
        self, channel: Channel, peer: PeerState, requests: list[BlockRequest]
    ) -> None:
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self.host.reader, _read_blocks, self.root, requests)
        # Posted together (bounded by SERVE_BATCH_BYTES), then one wait for the stream.
        for request, data in zip(requests, found, strict=True):
            if data is None:
                channel.post(BlockMissing(request.request_id, "changed or gone"))
                continue
            peer.served_blocks += 1
            peer.served_bytes += len(data)
            channel.post(BlockReply(request.request_id, data))
        await channel.drain()

    # ------------------------------------------------------------ reporting

    def info(self) -> FolderInfo:
        return FolderInfo(
            folder_id=self.folder_id,
            label=self.label,
            path=str(self.root),
            state=self.state.value,
            paused=self.config.paused,
            error=self.error,
            files=self.files,
            bytes=self.bytes,
            conflicts=self.conflicts,
            last_change=self.last_change,
            peers=[
                FolderPeerInfo(
                    device_id=peer.device_id,
                    name=self.host.peer_name(peer.device_id),
                    connected=peer.connected,
                    needed_files=len(peer.needed),
                    needed_bytes=sum(peer.needed.values()),
                    fetched_blocks=peer.fetched_blocks,
                    fetched_bytes=peer.fetched_bytes,
                    served_blocks=peer.served_blocks,
                    served_bytes=peer.served_bytes,
                )
                for peer in self.peers.values()
            ],
        )


class PullLink:
    """One pull stream to one peer: its index in, blocks on request (the :class:`BlockSource`
    the applier reads from)."""

    def __init__(self, folder: SyncFolder, peer: PeerState, channel: Channel) -> None:
        self.folder = folder
        self.peer = peer
        self.channel = channel
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future[object]] = {}
        self._budget = ByteBudget(MAX_IN_FLIGHT)
        self._dirty: set[str] = set()
        self._full = False  # recompute against all of the peer's rows (after the backlog)
        self._backlog_done = False
        self._wake = asyncio.Event()

    async def run(self) -> None:
        folder = self.folder
        index = folder._index()
        index_id, since = await folder.db(index.peer_progress, self.peer.device_id)
        await self.channel.send(Subscribe(folder.folder_id, index_id, since))
        with unwrapped():
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._read())
                tasks.create_task(self._work())

    def replan(self) -> None:
        """Decide all of the peer's rows again (our ignores changed)."""
        if self._backlog_done:
            self._full = True
            self._wake.set()

    def fail_waiting(self) -> None:
        gone = ChannelClosed(ErrorCode.GOING_AWAY, "the sync stream ended", by_peer=False)
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(gone)
        self._waiting.clear()

    # ------------------------------------------------------------ reading

    async def _read(self) -> None:
        try:
            while True:
                message = await self.channel.receive()
                if isinstance(message, IndexBatch):
                    await self._batch(message)
                elif isinstance(message, BlockReply | SegmentReply | BlockMissing):
                    future = self._waiting.pop(message.request_id, None)
                    if future is not None and not future.done():
                        future.set_result(message)
                else:
                    raise SyncProtocolError(
                        f"unexpected {type(message).__name__} on a pull stream",
                        ErrorCode.UNEXPECTED_MESSAGE,
                    )
        except SyncProtocolError as exc:
            self.channel.abort(exc.code, exc.message[:200])
            raise
        finally:
            self.fail_waiting()

    async def _batch(self, batch: IndexBatch) -> None:
        for row in batch.rows:
            why = validate_row(row)
            if why is not None:
                # Nothing of this batch is stored: a hostile or broken peer writes nothing.
                raise SyncProtocolError(f"refused row {row.name[:100]!r}: {why}")
        folder = self.folder
        if batch.rows:
            await folder.db(
                folder._index().put_peer_rows, self.peer.device_id, batch.index_id, batch.rows
            )
        if batch.rows and self._backlog_done:  # the backlog's end decides all stored rows
            self._dirty.update(row.name for row in batch.rows)
            if len(self._dirty) > MAX_DIRTY_NAMES:
                # A flood of rows (or a huge folder's first index): decide them all from the
                # index instead of remembering each name here (memory stays bounded).
                self._dirty.clear()
                self._full = True
        if batch.done and not self._backlog_done:
            self._backlog_done = True
            self._full = True  # rows stored before a restart but never applied, too
        if self._backlog_done:
            self._wake.set()

    # ------------------------------------------------------------ applying

    async def _work(self) -> None:
        folder = self.folder
        retry: set[str] = set()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RETRY_DELAY if retry else None):
                    await self._wake.wait()
            self._wake.clear()
            if not folder.healthy:
                retry |= self._dirty
                self._dirty.clear()
                continue
            names: set[str] | None = None if self._full else self._dirty | retry
            self._full = False
            self._dirty = set()
            retry = set()
            planned = await folder.db(folder.plan, self.peer.device_id, names)
            self.peer.needed = {row.name: row.size for row in planned}
            if not planned:
                continue
            folder.working(self.peer.device_id, True)
            try:
                retry = await folder.apply_planned(self.peer, planned, self)
            finally:
                folder.working(self.peer.device_id, False)

    # ------------------------------------------------------------ BlockSource

    async def block(self, digest_: bytes, name: str, offset: int, size: int) -> bytes:
        taken = await self._budget.acquire(size)
        try:
            reply = await self._ask(
                lambda rid: BlockRequest(rid, digest_, name, offset, size), f"block of {name}"
            )
        finally:
            self._budget.release(taken)
        if isinstance(reply, BlockMissing):
            raise BlockUnavailable(reply.reason or "the peer no longer has that block")
        if not isinstance(reply, BlockReply):
            raise self._broken(f"a {type(reply).__name__} answered a block request")
        data = bytes(reply.data)
        self.peer.fetched_blocks += 1
        self.peer.fetched_bytes += len(data)
        return data

    async def segment(self, digest_: bytes) -> tuple[Block, ...]:
        reply = await self._ask(lambda rid: SegmentRequest(rid, digest_), "segment")
        if isinstance(reply, BlockMissing):
            raise BlockUnavailable(reply.reason or "the peer does not know that segment")
        if not isinstance(reply, SegmentReply):
            raise self._broken(f"a {type(reply).__name__} answered a segment request")
        blocks = tuple(reply.blocks)
        if segment_digest(blocks) != digest_:
            raise self._broken("a segment's block list does not match its digest")
        await self.folder.db(self.folder._index().store_segment, digest_, blocks)
        return blocks

    async def _ask(self, make: Callable[[int], object], what: str) -> object:
        request_id = next(self._ids) & 0xFFFF_FFFF
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            await self.channel.send(make(request_id))
            async with asyncio.timeout(REPLY_TIMEOUT):
                return await future
        except TimeoutError:
            raise self._broken(f"no answer for a {what} in {REPLY_TIMEOUT:.0f} s") from None
        finally:
            self._waiting.pop(request_id, None)

    def _broken(self, why: str) -> ChannelClosed:
        self.channel.abort(ErrorCode.PROTOCOL_ERROR, why)
        return ChannelClosed(ErrorCode.PROTOCOL_ERROR, why, by_peer=False)


# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def unwrapped() -> Iterator[None]:
    """A task group's failure as its first error, not an ExceptionGroup: callers tell a
    closed stream from a protocol error by type (TaskGroups nest: unwrapped all the way)."""
    try:
        yield
    except BaseExceptionGroup as group:
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        raise error from group


class ByteBudget:
    """A semaphore counted in bytes, first come first served (a large request is not passed
    over forever by small ones); a request larger than the limit takes all of it."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, amount: int) -> int:
        """Wait for ``amount`` bytes (at most the limit); returns what to :meth:`release`."""
        amount = min(amount, self._limit)
        if not self._waiters and self._used + amount <= self._limit:
            self._used += amount
            return amount
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (amount, waiter)
        self._waiters.append(entry)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(amount)  # granted just before the cancel
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._grant()
            raise
        return amount

    def release(self, amount: int) -> None:
        self._used -= amount
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            amount, waiter = self._waiters[0]
            if waiter.done():
                self._waiters.popleft()
                continue
            if self._used + amount > self._limit:
                return
            self._waiters.popleft()
            self._used += amount
            waiter.set_result(None)


def _release_both(
    slots: asyncio.Semaphore, budget: ByteBudget, taken: int, _: asyncio.Task[None]
) -> None:
    slots.release()
    budget.release(taken)


def _small_batches(rows: Sequence[Planned]) -> Iterator[list[str]]:
    """Names of ``rows`` in batches of at most SMALL_BATCH_FILES files / ~SMALL_BATCH_BYTES."""
    batch: list[str] = []
    size = 0
    for row in rows:
        if batch and (len(batch) >= SMALL_BATCH_FILES or size + row.size > SMALL_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(row.name)
        size += row.size
    if batch:
        yield batch


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _open_index(path: Path, device: int) -> FolderIndex:
    path.parent.mkdir(parents=True, exist_ok=True)
    return FolderIndex(path, device=device)


def _apply_order(row: Planned) -> tuple[int, int, int, str]:
    """Directories (shallow first), then files, then deletions (files, then the deepest
    directories first, so that a directory is empty when its turn comes)."""
    depth = row.name.count("/")
    if not row.deleted:
        return (0, 0 if row.kind == "dir" else 1, depth, row.name)
    return (1, 0 if row.kind == "file" else 1, -depth, row.name)


def _row_bytes(row: FileRow) -> int:
    return 128 + len(row.name.encode()) + 40 * len(row.blocks) + 48 * len(row.segments)


def _batches(rows: list[FileRow]) -> Iterable[tuple[FileRow, ...]]:
    """``rows`` cut into batches of about :data:`BATCH_BYTES` (a peer caps a batch's size)."""
    batch: list[FileRow] = []
    size = 0
    for row in rows:
        cost = _row_bytes(row)
        if batch and size + cost > BATCH_BYTES:
            yield tuple(batch)
            batch, size = [], 0
        batch.append(row)
        size += cost
    if batch:
        yield tuple(batch)


def _read_blocks(root: Path, requests: Sequence[BlockRequest]) -> list[bytes | None]:
    """(Blocking) The blocks the puller asks for, each re-hashed; None for one that is not
    there any more (the file changed) or whose name is not a file inside the folder. Each file
    is opened once per call."""
    handles: dict[str, int] = {}  # name -> fd (-1: not readable)
    names = list(dict.fromkeys(unicodedata.normalize("NFC", r.name) for r in requests))
    with contextlib.suppress(UnsafePath, UserError, OSError):
        # All at once where it can (the root resolved once); one by one where it cannot.
        for name, path in zip(names, resolve_many(root, names), strict=True):
            if not (name == ".meshsync" or name.startswith(".meshsync/")):
                with contextlib.suppress(OSError):
                    handles[name] = os.open(path, _READ_FLAGS)
    try:
        return [_read_block(root, request, handles) for request in requests]
    finally:
        for fd in handles.values():
            if fd >= 0:
                os.close(fd)


def _read_block(root: Path, request: BlockRequest, handles: dict[str, int]) -> bytes | None:
    name = unicodedata.normalize("NFC", request.name)
    fd = handles.get(name)
    if fd is None:
        fd = handles[name] = _open_served(root, name)
    if fd < 0:
        return None
    try:
        data = DISK.pread(fd, request.size, request.offset)
    except OSError:
        return None
    if len(data) == request.size and digest(data) == request.digest:
        return data
    return None


def _open_served(root: Path, name: str) -> int:
    """A read-only descriptor of the folder's file ``name`` (NFC, else NFD), or -1."""
    if name == ".meshsync" or name.startswith(".meshsync/"):
        return -1
    for candidate in dict.fromkeys((name, unicodedata.normalize("NFD", name))):
        try:
            path = resolve_inside(root, candidate)
            return os.open(path, _READ_FLAGS)
        except (UnsafePath, UserError, OSError):
            continue
    return -1
