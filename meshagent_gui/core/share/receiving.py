"""One incoming transfer: from the offer to the last file made whole, or to its end.

:class:`IncomingTransfer` answers the offer (the folder scope, safe names, the user's decision,
what is here already), then pumps the sender's messages into partial files (partial.py) and
batches of small files (whole.py), its disk work running as :class:`~.jobs.DiskJobs`. It needs
a few things from its owner, and only those (:class:`ReceiverTools`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final, NoReturn, TypeVar

from blake3 import blake3

from meshagent_gui.core.events import Event, TransferAccepted, TransferCompleted, TransferProgressed
from meshagent_gui.core.p2p.session import Channel, ChannelClosed
from meshagent_gui.core.protocol import transfer as tp
from meshagent_gui.core.protocol.captoken import Capability
from meshagent_gui.core.protocol.errors import ProtocolError
from meshagent_gui.errors import UserError

from .completed import CompletedIndex
from .disk import DISK, Disk
from .errors import TransferError, quietly
from .jobs import DiskJobs
from .partial import (
    DiskFull,
    HashMismatch,
    PartialFile,
    partial_exists,
    state_files_in,
)
from .paths import UnsafePath, ensure_directory_inside, resolve_many, safe_relative_path
from .progress import RateMeter, transfer_title
from .whole import NOT_HERE, Outcome, WholeFile, store_whole_files

log = logging.getLogger(__name__)

SMALL_BATCH_FILES: Final = 256  # completed small files recorded on disk together
SMALL_BATCH_BYTES: Final = 4 * 1024 * 1024
MAX_CHUNK_WRITES: Final = 3  # per incoming transfer; chunk data held meanwhile: 3 chunks
MAX_FINISHING: Final = 4
MAX_BATCHES: Final = 2
WHOLE_BATCH_FILES: Final = 128  # small files stored per trip to the disk (whole.py)
WHOLE_BATCH_BYTES: Final = 4 * 1024 * 1024

_T = TypeVar("_T")
_WRITE, _FINISH, _BATCH = "write", "finish", "batch"
# Disk jobs of each kind one transfer may have running: writes overlap the network (and each
# other: hashing, copying), a few files finish at once, and small files go in batches.
_JOB_LIMITS: Final = {_WRITE: MAX_CHUNK_WRITES, _FINISH: MAX_FINISHING, _BATCH: MAX_BATCHES}
_EMPTY_DIGEST: Final = blake3(b"").digest()


@dataclass(frozen=True)
class Decision:
    """The answer to an offer: the accept policy's, or the user's."""

    accept: bool
    reason: str = ""  # why not
    folder: Path | None = None
    """Where to save it instead of the downloads folder (the user chose; it exists)."""
    timed_out: bool = False
    """Nobody answered in time: the sender is told so (OFFER_TIMEOUT), not "declined"."""


Decide = Callable[[str, tp.OfferReceived, tuple[str, ...]], Awaitable[Decision]]
"""(peer, offer, top-level names) -> the decision: the accept policy, or the user asked."""


@dataclass(frozen=True)
class ReceiverTools:
    """What every incoming transfer needs from the service that runs it."""

    downloads: Callable[[], Path]
    decide: Decide
    publish: Callable[[Event], None]
    executor: Executor
    completed: CompletedIndex
    disk: Disk = DISK  # the receiving disk (a faulty one in tests)


class IncomingTransfer:
    """One transfer being received.

    The pump reads the sender's messages and never waits on the disk for one of them: chunk
    writes (up to :data:`MAX_CHUNK_WRITES` at once), batches of small files and whole-file
    finishes run as jobs in the disk executor, and their results are handled by the pump
    between messages (so every message to the sender still goes out from one place, in order).
    """

    def __init__(
        self,
        tools: ReceiverTools,
        channel: Channel,
        receiver: tp.TransferReceiver,
        peer_id: str,
        *,
        offered: Callable[[str, int, tuple[str, ...]], None],
    ) -> None:
        self.tools = tools
        self.offered = offered  # told the offer's title, size and top names once it is known
        self.channel = channel
        self.receiver = receiver
        self.peer_id = peer_id
        self.root = Path()
        self.destinations: dict[int, Path] = {}
        self.partials: dict[int, PartialFile] = {}
        # Files of one chunk, verified, waiting for their FileEnd: (data, blake3 of data).
        self.small: dict[int, tuple[bytes, bytes]] = {}
        self.batch: list[tuple[int, WholeFile, bytes]] = []  # index, file, its blake3
        self.batch_bytes = 0
        self.jobs = DiskJobs(_JOB_LIMITS)
        self.getter: asyncio.Future[object] | None = None
        self.already: dict[int, Path] = {}  # files received whole before: where they are
        self.title = ""
        self.landed: dict[int, Path] = {}  # the files made whole: where each one is
        self.completed = False
        self.declined = ""  # why, when we declined the offer
        self.started = time.monotonic()
        self.rate: RateMeter | None = None

    async def run(self, capability: Capability | None) -> None:
        offer = await self._offer()
        self.title = transfer_title(offer.entries)
        names = tuple(sorted({e.path.split("/", 1)[0] for e in offer.entries}))
        self.offered(self.title, offer.total_bytes, names)
        folders = any(e.kind == "dir" or "/" in e.path for e in offer.entries)
        if folders and capability is not None and capability.scope != "share:folder":
            await self._decline("a folder needs a share:folder capability")
            return
        # Names are checked before anyone is asked: an offer we would refuse asks nobody.
        if not await self._plan(offer, self.tools.downloads()):
            return
        decision = await self.tools.decide(self.peer_id, offer, names)
        if not decision.accept:
            await self._decline(decision.reason, timed_out=decision.timed_out)
            return
        if decision.folder is not None and not await self._plan(offer, decision.folder):
            return
        self.tools.publish(TransferAccepted(offer.transfer_id, self.peer_id))
        have = await self._prepare(offer)
        for message in self.receiver.accept(have):
            await self.channel.send(message)
        self.rate = RateMeter(offer.total_bytes)
        await self._pump()

    async def _offer(self) -> tp.OfferReceived:
        while True:
            for event in self.receiver.receive(await self.channel.receive()):
                if isinstance(event, tp.OfferReceived):
                    return event

    async def _plan(self, offer: tp.OfferReceived, root: Path) -> bool:
        """Where each file goes under ``root``; False (offer declined) for a name we refuse."""
        self.root = root
        try:
            await self._disk(self._plan_destinations, offer)
        except UnsafePath as exc:
            await self._decline(f"unsafe name: {exc.message}")
            log.warning("refused an offer from %s: %s", self.peer_id[:12], exc.message)
            return False
        return True

    async def _decline(self, reason: str, *, timed_out: bool = False) -> None:
        self.declined = reason
        if timed_out:  # a Cancel with its own code: the sender words it as "did not answer"
            message: object = self.receiver.cancel(reason, tp.TransferErrorCode.OFFER_TIMEOUT)
        else:
            message = self.receiver.decline(reason)
        await self.channel.send(message)
        await quietly(self.channel.close())

    @property
    def where(self) -> str:
        """Where the transfer landed: the one file, the one top folder, or the folder they are
        in (a file found whole from an earlier transfer counts where it was found)."""
        finals = list(self.landed.values())
        if len(finals) == 1 and self.receiver.offer and len(self.receiver.offer.entries) == 1:
            return str(finals[0])
        tops: set[str] = set()
        for final in finals:
            try:
                tops.add(final.relative_to(self.root).parts[0])
            except (ValueError, IndexError):
                return str(self.root)
        return str(self.root / tops.pop()) if len(tops) == 1 else str(self.root)

    def _plan_destinations(self, offer: tp.OfferReceived) -> None:
        """(Blocking) where each file goes; UnsafePath for a name or a folder we refuse."""
        files = [index for index, entry in enumerate(offer.entries) if entry.kind == "file"]
        paths = resolve_many(self.root, (offer.entries[index].path for index in files))
        self.destinations = dict(zip(files, paths, strict=True))

    async def _disk(self, work: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self.tools.executor, work, *args)

    async def _prepare(self, offer: tp.OfferReceived) -> dict[int, bytes]:
        """Folders made; files already here (done earlier) or partly here (resume) reported."""
        # One trip to a disk thread for the whole offer: thousands of small files must not cost
        # thousands of thread hops (or stat calls on the event loop).
        done, partly = await self._disk(self._scan, offer)
        have: dict[int, bytes] = {}
        for index in done:
            have[index] = tp.full_bitmap(
                tp.chunk_count(offer.entries[index].size, offer.chunk_size)
            )
            self.already[index] = done[index]
        for index in partly:
            partial = await self._open(index, offer.entries[index], offer.chunk_size)
            if partial.verified_bytes:
                have[index] = partial.have
        return have

    def _scan(self, offer: tp.OfferReceived) -> tuple[dict[int, Path], list[int]]:
        """(Blocking) make the folders; find the files received whole before (and where they
        are), and partials."""
        made: set[PurePosixPath] = set()
        states: dict[Path, frozenset[str]] = {}  # per folder: one directory read, not 32 stats
        done: dict[int, Path] = {}
        partly: list[int] = []
        for index, entry in enumerate(offer.entries):
            folder = safe_relative_path(entry.path)
            if entry.kind == "file":
                folder = folder.parent
            if folder.parts and folder not in made:
                ensure_directory_inside(self.root, folder)
                made.update(folder.parents)
                made.add(folder)
            if entry.kind != "file":
                continue
            destination = self.destinations[index]
            found = self.tools.completed.find(self.peer_id, entry.key, destination, entry.size)
            if found is not None:
                done[index] = found
            elif partial_exists(
                destination,
                states.setdefault(destination.parent, state_files_in(destination.parent)),
            ):
                partly.append(index)
        return done, partly

    async def _open(self, index: int, entry: tp.Entry, chunk_size: int) -> PartialFile:
        partial = self.partials.get(index)
        if partial is None:
            partial = await PartialFile.open(
                self.destinations[index],
                sender=self.peer_id,
                key=entry.key,
                size=entry.size,
                chunk_size=chunk_size,
                executor=self.tools.executor,
                disk=self.tools.disk,
            )
            self.partials[index] = partial
        return partial

    # ---------------------------------------------------------------- the pump

    async def _pump(self) -> None:
        try:
            await self._receive_all()
        except DiskFull as exc:  # opening a partial, or a disk job
            await self._disk_full(exc)

    async def _receive_all(self) -> None:
        offer = self.receiver.offer
        assert offer is not None
        while not self.receiver.finished:
            await self._handle_results()
            if self.receiver.finished:
                break
            message = self._take()
            if message is None:
                await self._store_batch()  # nothing to read now: store what is batched
                message = await self._next_message()
                if message is None:
                    continue  # a job finished first
            for event in self.receiver.receive(message):
                match event:
                    case tp.ChunkReceived(index=index, chunk=chunk, digest=digest, data=data):
                        await self._chunk(offer, index, chunk, digest, data)
                    case tp.FileEnded(index=index, digest=digest):
                        await self._file_ended(offer, index, digest)
                    case tp.CancelledByPeer(reason=reason):
                        await self.abandon()
                        raise TransferError(f"the sender cancelled: {reason}", code="cancelled")
            progress = self.receiver.progress(time.monotonic())
            if progress is not None:
                self.channel.post(progress)
                self._report(offer)
        await self._settle()
        self.completed = True
        self._report(offer)
        self.tools.publish(
            TransferCompleted(
                offer.transfer_id,
                self.title,
                self.peer_id,
                offer.total_bytes,
                time.monotonic() - self.started,
                self.where,
            )
        )
        with contextlib.suppress(ChannelClosed):
            await self.channel.receive()  # the sender's Close

    def _take(self) -> object | None:
        """The sender's next message if it is here already (in order), else None."""
        getter = self.getter
        if getter is not None:
            if not getter.done():
                return None
            self.getter = None
            return getter.result()
        return self.channel.poll()

    async def _next_message(self) -> object | None:
        """Wait for the sender's next message; None if a job finished first."""
        if self.getter is None and not self.jobs.running:
            return await self.channel.receive()
        if self.getter is None:  # one reader at a time, or messages could swap
            self.getter = asyncio.ensure_future(self.channel.receive())
        if self.jobs.has_finished:
            return None
        finished = asyncio.ensure_future(self.jobs.wait_finished())
        waiting: set[asyncio.Future[Any]] = {self.getter, finished}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            finished.cancel()
        return self._take()

    async def _handle_results(self) -> None:
        if await self.jobs.handle_finished():
            await self.channel.drain()

    # ---------------------------------------------------------------- chunks and files

    async def _chunk(
        self, offer: tp.Offer, index: int, chunk: int, digest: bytes, data: bytes | memoryview
    ) -> None:
        entry = offer.entries[index]
        if entry.size <= offer.chunk_size and index not in self.partials:
            # Small files skip the partial: held in memory until their FileEnd (the next
            # message), then stored with others in one trip to the disk (whole.py).
            if blake3(data).digest() != digest:
                await self._chunk_failed(index, chunk)
                return
            self.small[index] = (bytes(data), bytes(digest))
            await self._chunk_verified(offer, index, chunk)
            return
        partial = await self._open(index, entry, offer.chunk_size)
        await self.jobs.room_for(_WRITE)

        async def written(job: asyncio.Future[None]) -> None:
            try:
                job.result()
            except HashMismatch:
                await self._chunk_failed(index, chunk)
                return
            except DiskFull as exc:
                await self._disk_full(exc)
            await self._chunk_verified(offer, index, chunk)

        self.jobs.start(_WRITE, partial.write_chunk(chunk, digest, data), written)

    async def _chunk_failed(self, index: int, chunk: int) -> None:
        resend = self.receiver.chunk_failed(index, chunk)
        if resend is not None:
            self.channel.post(resend)

    async def _chunk_verified(self, offer: tp.Offer, index: int, chunk: int) -> None:
        for event in self.receiver.chunk_verified(index, chunk):
            if isinstance(event, tp.FileEnded):
                await self._file_ended(offer, event.index, event.digest)

    async def _disk_full(self, exc: DiskFull) -> NoReturn:
        """Tell the sender (once), then give up; the partials are kept for a resume."""
        if not self.receiver.finished:
            self.channel.post(self.receiver.cancel(exc.message, tp.TransferErrorCode.DISK_FULL))
            await quietly(self.channel.drain())
        raise exc

    async def _file_ended(self, offer: tp.Offer, index: int, digest: bytes) -> None:
        entry = offer.entries[index]
        if index in self.already:
            # Where it was found (maybe "name (1)" after a clash), not where it would go now:
            # the index must keep pointing at the copy that is ours.
            await self._file_finished(index, entry, True, "", self.already[index])
            return
        if index not in self.partials and entry.size <= offer.chunk_size:
            data, chunk_digest = self.small.pop(index, (b"", _EMPTY_DIGEST))
            if digest != chunk_digest:  # one chunk: the file's blake3 is the chunk's
                message = HashMismatch(self.destinations[index], None).message
                await self._file_finished(index, entry, False, message, self.destinations[index])
                return
            whole = WholeFile(self.destinations[index], data, entry.mode, entry.mtime_ns)
            self.batch.append((index, whole, digest))
            self.batch_bytes += len(data)
            if len(self.batch) >= WHOLE_BATCH_FILES or self.batch_bytes >= WHOLE_BATCH_BYTES:
                await self._store_batch()
            return
        partial = await self._open(index, entry, offer.chunk_size)
        await self.jobs.room_for(_FINISH)

        async def finished(job: asyncio.Future[Path]) -> None:
            try:
                final = job.result()
            except HashMismatch as exc:
                await partial.discard()  # which chunk is wrong cannot be known
                self.partials.pop(index, None)
                await self._file_finished(index, entry, False, exc.message, partial.destination)
                return
            except DiskFull as exc:
                await self._disk_full(exc)
            self.partials.pop(index, None)
            await self._file_finished(index, entry, True, "", final)

        self.jobs.start(
            _FINISH, partial.finish(digest, mode=entry.mode, mtime_ns=entry.mtime_ns), finished
        )

    async def _store_batch(self) -> None:
        """Store the small files batched so far, in one job (see whole.py)."""
        if not self.batch:
            return
        await self.jobs.room_for(_BATCH)
        batch, self.batch, self.batch_bytes = self.batch, [], 0
        offer = self.receiver.offer
        assert offer is not None

        async def stored(job: asyncio.Future[list[Outcome]]) -> None:
            for (index, whole, _), outcome in zip(batch, job.result(), strict=True):
                entry = offer.entries[index]
                if isinstance(outcome, Path):
                    await self._file_finished(index, entry, True, "", outcome)
                elif isinstance(outcome, DiskFull):
                    await self._disk_full(outcome)
                elif isinstance(outcome, UserError):
                    reason = outcome.message
                    await self._file_finished(index, entry, False, reason, whole.destination)
                else:
                    assert isinstance(outcome, BaseException)
                    raise outcome

        files = [(whole, digest, offer.entries[index].key) for index, whole, digest in batch]
        work = self._disk(store_small_files, files, self.peer_id, offer.chunk_size, self.tools.disk)
        self.jobs.start(_BATCH, work, stored)

    async def _file_finished(
        self, index: int, entry: tp.Entry, ok: bool, reason: str, final: Path
    ) -> None:
        if ok:
            self.landed[index] = final
            index_file = self.tools.completed
            index_file.add(self.peer_id, entry.key, final, entry.size)
            # A receiver killed later must still know this file is whole (else it would come
            # again as "name (1)"): big files are recorded at once, small ones in batches.
            if entry.size > SMALL_BATCH_BYTES or index_file.unsaved >= SMALL_BATCH_FILES:
                await self._disk(index_file.flush)
        for message in self.receiver.file_done(index, ok, reason):
            self.channel.post(message)

    async def _settle(self) -> None:
        """Wait for every job still running; the first error is ours."""
        await self._store_batch()
        while self.jobs.busy:
            await self.jobs.wait_finished()
            await self._handle_results()
        if self.getter is not None and not self.getter.done():
            self.getter.cancel()
            self.getter = None
        await self._disk(self.tools.completed.flush)
        await self.channel.drain()

    def _report(self, offer: tp.Offer) -> None:
        if self.rate is None:
            return
        done = self.receiver.bytes_verified
        rate, eta = self.rate.update(done)
        self.tools.publish(
            TransferProgressed(
                offer.transfer_id,
                "receive",
                self.peer_id,
                self.title,
                done,
                offer.total_bytes,
                rate,
                eta,
            )
        )

    async def failed(
        self, reason: str, code: tp.TransferErrorCode = tp.TransferErrorCode.CANCELLED
    ) -> None:
        """We cannot go on: tell the sender why (unless it is over already), keep the partials."""
        if self.receiver.offer is not None and not self.receiver.finished:
            with contextlib.suppress(ProtocolError):
                await quietly(self.channel.send(self.receiver.cancel(reason, code)))
        with contextlib.suppress(Exception):  # the end is told above; this is tidying up
            await self.abandon()

    async def cancelled(self) -> None:
        """Our user cancelled: tell the sender, keep the partials."""
        with contextlib.suppress(ProtocolError):
            await quietly(self.channel.send(self.receiver.cancel("cancelled by the receiver")))
        await self.abandon()

    async def abandon(self) -> None:
        """Keep every partial for a resume; close their files."""
        if self.getter is not None:
            self.getter.cancel()
            self.getter = None
        # Jobs run in disk threads: let them end before the files they use are closed.
        await self.jobs.wait_all()
        with contextlib.suppress(OSError):
            # Not the service's executor: abandoning also happens while it shuts down.
            await asyncio.to_thread(self.tools.completed.flush)
        for partial in self.partials.values():
            with contextlib.suppress(Exception):
                await partial.abandon()
        self.partials.clear()


def store_small_files(
    files: Sequence[tuple[WholeFile, bytes, bytes]],
    sender: str,
    chunk_size: int,
    disk: Disk = DISK,
) -> list[Outcome]:
    """(Blocking) store small files (whole, digest, entry key) in one trip to a disk thread:
    as unnamed files linked into place where the filesystem can (whole.py), by the partial-file
    path where it cannot (macOS, Windows, some Linux filesystems), each folder synced once."""
    outcomes = store_whole_files([whole for whole, _, _ in files], disk=disk)
    folders: set[Path] = set()
    for position, (whole, digest, key) in enumerate(files):
        if outcomes[position] is not NOT_HERE:
            continue
        try:
            final = PartialFile.store_whole_blocking(
                whole.destination,
                whole.data,
                digest,
                sender=sender,
                key=key,
                chunk_size=chunk_size,
                mode=whole.mode,
                mtime_ns=whole.mtime_ns,
                sync_folder=False,  # once per folder below, not once per file
                disk=disk,
            )
        except (DiskFull, UserError) as exc:
            outcomes[position] = exc
            continue
        outcomes[position] = final
        folders.add(final.parent)
    disk.sync_directories(folders)
    return outcomes
