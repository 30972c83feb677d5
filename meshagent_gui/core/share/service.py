"""Files and folders over the P2P session: the sender's loop, the receiver's service.

The protocol decisions are the sans-IO state machines' (core/protocol/transfer.py); the disk
work is core/share/source.py (reading, hashing while streaming) and partial.py (chunks in place,
resume, verified rename); this module moves messages between them and a QUIC channel, applies
the accept policy and the rate limits, and reports progress as events.

Resume, either side:

- the receiver keeps, per file, a partial plus a state file, and a small index of the files it
  completed for each sender (``completed.jsonl`` in the data dir); its Answer tells the sender
  which chunks it already holds, so a new ``send`` of the same files sends only the rest;
- the sender's ``send`` survives the receiver going away: it waits for the peer to come back
  (bounded by ``reconnect_window``), reconnects and offers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final

from blake3 import blake3

from meshagent_gui.core.bus import EventBus
from meshagent_gui.core.events import (
    TransferAccepted,
    TransferCompleted,
    TransferFailed,
    TransferOffered,
    TransferProgressed,
)
from meshagent_gui.core.mesh.client import MeshClient, MeshError
from meshagent_gui.core.p2p.errors import P2PError
from meshagent_gui.core.p2p.peers import PeerManager, PeerUnreachable, Service
from meshagent_gui.core.p2p.session import Channel, ChannelClosed
from meshagent_gui.core.protocol import transfer as tp
from meshagent_gui.core.protocol.captoken import Capability
from meshagent_gui.core.protocol.errors import ProtocolError
from meshagent_gui.core.protocol.messages import StreamRole
from meshagent_gui.errors import UserError

from .partial import (
    DiskFull,
    HashMismatch,
    PartialFile,
    partial_exists,
    state_files_in,
    sync_directory,
)
from .paths import UnsafePath, ensure_directory_inside, resolve_inside, safe_relative_path
from .ratelimit import TokenBucket, take_all
from .source import ChunkReader, SourceChanged, SourceEntry, read_one_chunk, walk

log = logging.getLogger(__name__)

CHUNK_SIZE: Final = 1024 * 1024
OFFER_TIMEOUT: Final = 120.0  # the receiver may be asking its user
ASK_TIMEOUT: Final = 90.0  # how long an offer waits for an answer from the UI
SMALL_BATCH_FILES: Final = 256  # completed small files recorded on disk together
SMALL_BATCH_BYTES: Final = 4 * 1024 * 1024
READ_AHEAD: Final = 4


class TransferError(UserError):
    pass


@dataclass
class ItemResult:
    """One top-level item of a send, as `send --json` prints it."""

    name: str
    bytes: int
    sent: int = 0
    resumed_from: int = 0
    blake3: str | None = None
    seconds: float = 0.0
    path: str = ""
    attempts: int = 1  # connections it took (a receiver that restarts costs one more)
    last_resumed_from: int = 0  # what the last attempt found already there
    last_sent: int = 0  # what the last attempt sent


@dataclass
class ActiveTransfer:
    """A transfer running now, as `transfers` lists it (and the UI's transfer list)."""

    transfer_id: str
    direction: str
    peer: str
    name: str
    total: int
    task: asyncio.Task[Any] | None = field(default=None, repr=False)

    def describe(self) -> dict[str, Any]:
        return {
            "transfer_id": self.transfer_id,
            "direction": self.direction,
            "peer": self.peer,
            "name": self.name,
            "total": self.total,
        }


@dataclass
class _Rate:
    """A smoothed transfer rate and ETA for progress reports."""

    total: int
    started: float = field(default_factory=time.monotonic)
    last_time: float = field(default_factory=time.monotonic)
    last_done: int = 0
    rate: float = 0.0

    def update(self, done: int) -> tuple[float, float | None]:
        now = time.monotonic()
        elapsed = now - self.last_time
        if elapsed >= 0.2:
            instant = (done - self.last_done) / elapsed
            self.rate = instant if self.rate == 0 else 0.7 * self.rate + 0.3 * instant
            self.last_time, self.last_done = now, done
        eta = (self.total - done) / self.rate if self.rate > 0 else None
        return self.rate, eta


PeerUser = Callable[[str], Awaitable[str | None]]
PeerName = Callable[[str], str]


class TransferService:
    def __init__(
        self,
        *,
        peers: PeerManager,
        client: MeshClient,
        bus: EventBus,
        downloads: Callable[[], Path],
        data_dir: Path,
        own_user: str,
        peer_user: PeerUser,
        peer_name: PeerName,
        auto_accept: Callable[[], str],
        global_rate: Callable[[], float | None],
        reconnect_window: float = 600.0,
    ) -> None:
        self._peers = peers
        self._client = client
        self._bus = bus
        self._downloads = downloads
        self._own_user = own_user
        self._peer_user = peer_user
        self._peer_name = peer_name
        self._auto_accept = auto_accept
        self._global_rate = global_rate
        self._global_bucket: tuple[float, TokenBucket] | None = None
        self.reconnect_window = reconnect_window
        self._completed = CompletedIndex(data_dir / "completed.jsonl")
        # Disk work (reads, writes, hashing, fsync, rename) runs here, never on the loop; more
        # threads than cores because most of it waits on the disk, not the CPU.
        self.executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="meshagent-disk")
        self._pending_answers: dict[str, asyncio.Future[bool]] = {}
        self.active: dict[str, ActiveTransfer] = {}
        self._titles: dict[str, str] = {}  # per transfer: progress events name it often
        peers.register(Service(StreamRole.TRANSFER, ("share:file", "share:folder"), self._receive))

    # ================================================================ sending

    async def send(
        self,
        paths: list[Path],
        peer_id: str,
        *,
        rate: float | None = None,
        wait: bool = False,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> list[ItemResult]:
        """Send files and folders to ``peer_id``; resumes by itself across reconnects."""
        manifest = await asyncio.to_thread(walk, paths)
        for skipped in manifest.skipped:
            log.warning("not sent: %s (%s)", skipped.path, skipped.reason)
        entries = manifest.entries
        offer_entries = [
            tp.Entry(e.path, e.kind, e.size, e.mode, e.mtime_ns, e.key) for e in entries
        ]
        scope = "share:folder" if manifest.has_folders else "share:file"
        transfer_id = uuid.uuid4().hex
        self.active[transfer_id] = ActiveTransfer(
            transfer_id,
            "send",
            peer_id,
            _title(entries),
            manifest.total_bytes,
            asyncio.current_task(),
        )
        try:
            return await self._send(
                paths,
                entries,
                offer_entries,
                scope,
                transfer_id,
                peer_id,
                rate,
                wait,
                on_progress,
                manifest.total_bytes,
            )
        finally:
            self.active.pop(transfer_id, None)
            self._titles.pop(transfer_id, None)

    async def _send(
        self,
        paths: list[Path],
        entries: tuple[SourceEntry, ...],
        offer_entries: list[tp.Entry],
        scope: str,
        transfer_id: str,
        peer_id: str,
        rate: float | None,
        wait: bool,
        on_progress: Callable[[dict[str, Any]], None] | None,
        total_bytes: int,
    ) -> list[ItemResult]:
        buckets = [TokenBucket(rate)] if rate else []
        started = time.monotonic()
        deadline = started + self.reconnect_window
        totals = _Totals()
        progress = _Rate(total_bytes)
        path_kind = ""
        while True:
            try:
                session = await self._peers.session(peer_id)
                path_kind = self._peers.path_of(session).kind
                grant = await self._client.capability(peer_id, scope, transfer_id)
                channel = await session.open_channel(
                    StreamRole.TRANSFER, tokens=(grant.token,), resource=transfer_id
                )
                sender = tp.TransferSender(offer_entries, CHUNK_SIZE, transfer_id)
                await self._run_sender(
                    channel,
                    sender,
                    entries,
                    [*buckets, *self._global_buckets()],
                    totals,
                    progress,
                    peer_id,
                    on_progress,
                )
                break
            except (PeerUnreachable, P2PError, ChannelClosed, ConnectionError, _Interrupted) as exc:
                offline = isinstance(exc, PeerUnreachable) and exc.code == "peer_offline"
                if offline and not wait and not totals.started:
                    raise
                if time.monotonic() > deadline:
                    raise TransferError(
                        f"gave up: the receiver stayed unreachable ({exc})", code="unreachable"
                    ) from exc
                log.info("transfer interrupted (%s); reconnecting", exc)
                await asyncio.sleep(1.0)
        results = _item_results(entries, totals, time.monotonic() - started, path_kind)
        order = {path.name: n for n, path in enumerate(paths)}  # as given on the command line
        return sorted(results, key=lambda item: order.get(item.name, len(order)))

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _global_buckets(self) -> list[TokenBucket]:
        rate = self._global_rate()
        if rate is None:
            return []
        if self._global_bucket is None or self._global_bucket[0] != rate:
            self._global_bucket = (rate, TokenBucket(rate))
        return [self._global_bucket[1]]

    async def _run_sender(
        self,
        channel: Channel,
        sender: tp.TransferSender,
        entries: tuple[SourceEntry, ...],
        buckets: list[TokenBucket],
        totals: _Totals,
        progress: _Rate,
        peer_id: str,
        on_progress: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        for offer in sender.start():
            await channel.send(offer)
        answer = await self._wait_answer(channel, sender)
        if not answer.accepted:
            await channel.close()
            raise TransferError(
                f"the receiver declined: {answer.reason or 'no reason given'}", code="declined"
            )
        totals.started = True
        had = {
            have.index: tp.bitmap_bytes(have.chunks, entries[have.index].size, CHUNK_SIZE)
            for have in answer.have
        }
        if totals.skipped is None:  # what the first answer found already there
            totals.skipped = had
        totals.attempts += 1
        totals.last_skipped, totals.last_sent = had, {}
        done = asyncio.Event()
        failure: list[BaseException] = []

        async def listen() -> None:
            try:
                while not sender.finished:
                    message = await channel.receive()
                    for event in sender.receive(message):
                        match event:
                            case tp.ProgressReported(bytes_verified=verified):
                                self._report(sender, progress, verified, peer_id, on_progress)
                            case tp.FileConfirmed(index=index, ok=False, reason=reason):
                                failure.append(
                                    TransferError(
                                        f"{entries[index].path}: the receiver failed it ({reason})",
                                        code="file_failed",
                                    )
                                )
                            case tp.CancelledByPeer(reason=reason):
                                failure.append(
                                    TransferError(
                                        f"the receiver cancelled: {reason}", code="cancelled"
                                    )
                                )
                            case tp.TransferFailed(cancel=cancel, reason=reason):
                                await channel.send(cancel)
                                failure.append(TransferError(reason, code="failed"))
                    if sender.finished:
                        break
            except (ChannelClosed, ProtocolError) as exc:
                failure.append(exc)
            finally:
                done.set()

        listener = asyncio.create_task(listen())
        try:
            await self._stream(channel, sender, entries, buckets, totals, done)
            await done.wait()
        except SourceChanged as exc:
            await _tell_cancel(channel, sender, str(exc), tp.TransferErrorCode.SOURCE_CHANGED)
            raise
        except asyncio.CancelledError:
            # Cancelled here (Ctrl-C, the UI): tell the receiver, who keeps its partials.
            await asyncio.shield(
                _tell_cancel(
                    channel, sender, "cancelled by the sender", tp.TransferErrorCode.CANCELLED
                )
            )
            raise
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        real_failures = [f for f in failure if isinstance(f, TransferError)]
        if real_failures:
            raise real_failures[0]
        if sender.state is not tp.SenderState.DONE:
            raise _Interrupted("the connection to the receiver was cut")
        self._report(sender, progress, sender.total_bytes, peer_id, on_progress)
        await _quietly(channel.close())

    async def _wait_answer(self, channel: Channel, sender: tp.TransferSender) -> tp.AnswerReceived:
        async with asyncio.timeout(OFFER_TIMEOUT):
            while True:
                message = await channel.receive()
                for event in sender.receive(message):
                    if isinstance(event, tp.AnswerReceived):
                        return event
                    if isinstance(event, tp.CancelledByPeer):
                        raise TransferError(
                            f"the receiver cancelled: {event.reason}", code="cancelled"
                        )

    async def _stream(
        self,
        channel: Channel,
        sender: tp.TransferSender,
        entries: tuple[SourceEntry, ...],
        buckets: list[TokenBucket],
        totals: _Totals,
        stop: asyncio.Event,
    ) -> None:
        """Send every chunk the plan asks for, file by file, resends first."""
        for index in sender.files:
            if stop.is_set():
                return
            work = sender.next_work()
            while isinstance(work, tp.SendChunk) and work.resend:
                await self._resend(channel, sender, entries, buckets, totals, work)
                work = sender.next_work()
            if work is None or getattr(work, "index", None) != index:
                continue  # the receiver already confirmed or failed this file
            entry = entries[index]
            async with ChunkReader(
                entry,
                CHUNK_SIZE,
                have=sender.receiver_bitmap(index),
                read_ahead=READ_AHEAD,
                executor=self.executor,
            ) as reader:
                async for piece in reader:
                    if stop.is_set():
                        return
                    work = sender.next_work()
                    while isinstance(work, tp.SendChunk) and work.resend:
                        await self._resend(channel, sender, entries, buckets, totals, work)
                        work = sender.next_work()
                    await take_all(buckets, len(piece.data))
                    await channel.send(tp.Chunk(index, piece.chunk, piece.digest, piece.data))
                    sender.chunk_sent(index, piece.chunk)
                    totals.count_sent(index, len(piece.data))
                totals.digests[index] = reader.file_digest
            end = sender.file_sent(index, reader.file_digest)
            if end is not None:
                await channel.send(end)
        # Resends asked for after the last file went out, until the receiver is done.
        while True:
            work = sender.next_work()
            if isinstance(work, tp.SendChunk) and work.resend:
                await self._resend(channel, sender, entries, buckets, totals, work)
                continue
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)

    async def _resend(
        self,
        channel: Channel,
        sender: tp.TransferSender,
        entries: tuple[SourceEntry, ...],
        buckets: list[TokenBucket],
        totals: _Totals,
        work: tp.SendChunk,
    ) -> None:
        piece = await read_one_chunk(
            entries[work.index], CHUNK_SIZE, work.chunk, executor=self.executor
        )
        await take_all(buckets, len(piece.data))
        await channel.send(tp.Chunk(work.index, work.chunk, piece.digest, piece.data))
        sender.chunk_sent(work.index, work.chunk)
        totals.count_sent(work.index, len(piece.data))

    def _report(
        self,
        sender: tp.TransferSender,
        progress: _Rate,
        verified: int,
        peer_id: str,
        on_progress: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        rate, eta = progress.update(verified)
        event = TransferProgressed(
            sender.transfer_id,
            "send",
            peer_id,
            self._titles.setdefault(sender.transfer_id, _title(sender.entries)),
            verified,
            sender.total_bytes,
            rate,
            eta,
        )
        self._bus.publish(event)
        if on_progress is not None:
            on_progress({"done": verified, "total": sender.total_bytes, "rate": rate, "eta": eta})

    # ================================================================ receiving

    async def answer_offer(self, transfer_id: str, accept: bool) -> None:
        """The UI's answer to a TransferOffered event that was not auto-accepted."""
        future = self._pending_answers.get(transfer_id)
        if future is None or future.done():
            raise UserError("no such offer is waiting for an answer", code="unknown_offer")
        future.set_result(accept)

    async def cancel(self, transfer_id: str) -> None:
        """Stop a transfer in either direction; the receiver keeps its partials for a resume."""
        active = self.active.get(transfer_id)
        if active is None or active.task is None:
            raise UserError("no such transfer is running", code="unknown_transfer")
        active.task.cancel()

    async def _receive(self, channel: Channel) -> None:
        peer_id = channel.peer_id
        receiver = tp.TransferReceiver(transfer_id=channel.resource)
        capability = channel.grant if isinstance(channel.grant, Capability) else None
        incoming = _Incoming(self, channel, receiver, peer_id)
        self.active[channel.resource] = ActiveTransfer(
            channel.resource, "receive", peer_id, "", 0, asyncio.current_task()
        )
        try:
            await incoming.run(capability)
        except asyncio.CancelledError:
            await asyncio.shield(incoming.cancelled())
            self._bus.publish(
                TransferFailed(
                    channel.resource, incoming.title, peer_id, "cancelled by the receiver"
                )
            )
            raise
        except (ChannelClosed, P2PError, ConnectionError) as exc:
            await incoming.abandon()
            if not incoming.completed:
                self._bus.publish(
                    TransferFailed(
                        receiver.expected_transfer_id or "",
                        incoming.title,
                        peer_id,
                        str(exc) or "cut off",
                    )
                )
        except ProtocolError as exc:
            await incoming.abandon()
            log.warning("transfer from %s refused: %s", peer_id[:12], exc)
            channel.abort(exc.code, str(exc)[:200])
            self._bus.publish(
                TransferFailed(
                    receiver.expected_transfer_id or "", incoming.title, peer_id, f"refused: {exc}"
                )
            )
        except UserError as exc:
            await incoming.abandon()
            self._bus.publish(
                TransferFailed(
                    receiver.expected_transfer_id or "", incoming.title, peer_id, exc.message
                )
            )

    async def decide(self, peer_id: str, offer: tp.OfferReceived, names: tuple[str, ...]) -> bool:
        policy = self._auto_accept()
        own = policy in ("own", "") and await self._peer_user(peer_id) == self._own_user
        auto = policy == "all" or own
        event = TransferOffered(
            offer.transfer_id,
            peer_id,
            self._peer_name(peer_id),
            names,
            sum(1 for e in offer.entries if e.kind == "file"),
            offer.total_bytes,
            auto,
        )
        self._bus.publish(event)
        if auto:
            return True
        if policy == "none":
            return False
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending_answers[offer.transfer_id] = future
        try:
            return await asyncio.wait_for(future, ASK_TIMEOUT)
        except TimeoutError:
            return False
        finally:
            self._pending_answers.pop(offer.transfer_id, None)


@dataclass
class _Totals:
    """One `send` across its reconnects: bytes sent per entry, what the receiver had at the
    first answer, and the whole-file digests."""

    started: bool = False
    sent: dict[int, int] = field(default_factory=dict)
    skipped: dict[int, int] | None = None
    digests: dict[int, bytes] = field(default_factory=dict)
    attempts: int = 0
    last_sent: dict[int, int] = field(default_factory=dict)
    last_skipped: dict[int, int] = field(default_factory=dict)

    def count_sent(self, index: int, size: int) -> None:
        self.sent[index] = self.sent.get(index, 0) + size
        self.last_sent[index] = self.last_sent.get(index, 0) + size


class _Interrupted(Exception):
    """The channel ended before the receiver said Complete: reconnect and offer again."""


class _Incoming:
    """One transfer being received."""

    def __init__(
        self,
        service: TransferService,
        channel: Channel,
        receiver: tp.TransferReceiver,
        peer_id: str,
    ) -> None:
        self.service = service
        self.channel = channel
        self.receiver = receiver
        self.peer_id = peer_id
        self.root = Path()
        self.destinations: dict[int, Path] = {}
        self.partials: dict[int, PartialFile] = {}
        self.small: dict[int, bytes] = {}
        self.unsynced_folders: set[Path] = set()
        self.finishing: set[asyncio.Task[None]] = set()
        self.slots = asyncio.Semaphore(32)
        self.failure: BaseException | None = None
        self.already: set[int] = set()
        self.title = ""
        self.completed = False
        self.started = time.monotonic()
        self.rate: _Rate | None = None

    async def run(self, capability: Capability | None) -> None:
        offer = await self._offer()
        self.title = _title(offer.entries)
        active = self.service.active.get(offer.transfer_id)
        if active is not None:
            active.name, active.total = self.title, offer.total_bytes
        folders = any(e.kind == "dir" or "/" in e.path for e in offer.entries)
        if folders and capability is not None and capability.scope != "share:folder":
            await self._decline("a folder needs a share:folder capability")
            return
        self.root = self.service._downloads()
        try:
            self._plan_destinations(offer)
        except UnsafePath as exc:
            await self._decline(f"unsafe name: {exc.message}")
            log.warning("refused an offer from %s: %s", self.peer_id[:12], exc.message)
            return
        names = tuple(sorted({e.path.split("/", 1)[0] for e in offer.entries}))
        if not await self.service.decide(self.peer_id, offer, names):
            await self._decline("declined by the user")
            return
        self.service._bus.publish(TransferAccepted(offer.transfer_id, self.peer_id))
        have = await self._prepare(offer)
        for message in self.receiver.accept(have):
            await self.channel.send(message)
        self.rate = _Rate(offer.total_bytes)
        await self._pump()

    async def _offer(self) -> tp.OfferReceived:
        while True:
            for event in self.receiver.receive(await self.channel.receive()):
                if isinstance(event, tp.OfferReceived):
                    return event

    async def _decline(self, reason: str) -> None:
        await self.channel.send(self.receiver.decline(reason))
        await _quietly(self.channel.close())

    def _plan_destinations(self, offer: tp.OfferReceived) -> None:
        for index, entry in enumerate(offer.entries):
            relative = safe_relative_path(entry.path)
            if entry.kind == "file":
                self.destinations[index] = resolve_inside(self.root, relative)

    async def _prepare(self, offer: tp.OfferReceived) -> dict[int, bytes]:
        """Folders made; files already here (done earlier) or partly here (resume) reported."""
        # One trip to a disk thread for the whole offer: thousands of small files must not cost
        # thousands of thread hops (or stat calls on the event loop).
        done, partly = await asyncio.get_running_loop().run_in_executor(
            self.service.executor, self._scan, offer
        )
        have: dict[int, bytes] = {}
        for index in done:
            have[index] = tp.full_bitmap(
                tp.chunk_count(offer.entries[index].size, offer.chunk_size)
            )
            self.already.add(index)
        for index in partly:
            partial = await self._open(index, offer.entries[index], offer.chunk_size)
            if partial.verified_bytes:
                have[index] = partial.have
        return have

    def _scan(self, offer: tp.OfferReceived) -> tuple[list[int], list[int]]:
        """(Blocking) make the folders; find the files received whole before, and partials."""
        made: set[PurePosixPath] = set()
        states: dict[Path, frozenset[str]] = {}  # per folder: one directory read, not 32 stats
        done: list[int] = []
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
            if self.service._completed.has(self.peer_id, entry.key, destination, entry.size):
                done.append(index)
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
            )
            self.partials[index] = partial
        return partial

    async def _pump(self) -> None:
        offer = self.receiver.offer
        assert offer is not None
        while not self.receiver.finished:
            message = await self._next_message()
            if message is None:
                break  # the last small files were finished while we waited
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
                await self.channel.send(progress)
                self._report(offer)
        await self._settle()
        if self.unsynced_folders:
            await asyncio.get_running_loop().run_in_executor(
                self.service.executor, _sync_folders, sorted(self.unsynced_folders)
            )
        self.completed = True
        self._report(offer)
        self.service._bus.publish(
            TransferCompleted(
                offer.transfer_id,
                self.title,
                self.peer_id,
                offer.total_bytes,
                time.monotonic() - self.started,
            )
        )
        with contextlib.suppress(ChannelClosed):
            await self.channel.receive()  # the sender's Close

    async def _chunk(
        self, offer: tp.Offer, index: int, chunk: int, digest: bytes, data: bytes | memoryview
    ) -> None:
        entry = offer.entries[index]
        one_chunk = entry.size <= offer.chunk_size and index not in self.partials
        try:
            if one_chunk:
                # Small files skip the partial: held in memory until their FileEnd (the next
                # message), then written, checked and renamed in one trip to the disk thread.
                if blake3(data).digest() != digest:
                    raise HashMismatch(self.destinations[index], chunk)
                self.small[index] = bytes(data)
            else:
                partial = await self._open(index, entry, offer.chunk_size)
                await partial.write_chunk(chunk, digest, data)
        except HashMismatch:
            resend = self.receiver.chunk_failed(index, chunk)
            if resend is not None:
                await self.channel.send(resend)
            return
        except DiskFull as exc:
            await self.channel.send(
                self.receiver.cancel(exc.message, tp.TransferErrorCode.DISK_FULL)
            )
            raise
        for event in self.receiver.chunk_verified(index, chunk):
            if isinstance(event, tp.FileEnded):
                await self._file_ended(offer, event.index, event.digest)

    async def _file_ended(self, offer: tp.Offer, index: int, digest: bytes) -> None:
        entry = offer.entries[index]
        ok, reason = True, ""
        if index in self.already:
            final = self.destinations[index]
        elif index in self.small:
            # Small files are finished concurrently (each is an open, a write, an fsync and a
            # rename: latency, not CPU), so thousands of them do not queue behind each other.
            await self.slots.acquire()
            task = asyncio.ensure_future(self._finish_small(offer, index, digest))
            self.finishing.add(task)
            task.add_done_callback(self._small_finished)
            return
        else:
            partial = await self._open(index, entry, offer.chunk_size)
            try:
                final = await partial.finish(digest, mode=entry.mode, mtime_ns=entry.mtime_ns)
            except HashMismatch as exc:
                ok, reason, final = False, exc.message, self.destinations[index]
                await partial.discard()  # which chunk is wrong cannot be known
            self.partials.pop(index, None)
        await self._file_finished(index, entry, ok, reason, final)

    async def _finish_small(self, offer: tp.Offer, index: int, digest: bytes) -> None:
        entry = offer.entries[index]
        ok, reason = True, ""
        try:
            final = await PartialFile.store_whole(
                self.destinations[index],
                self.small.pop(index),
                digest,
                sender=self.peer_id,
                key=entry.key,
                chunk_size=offer.chunk_size,
                mode=entry.mode,
                mtime_ns=entry.mtime_ns,
                sync_folder=False,  # once per folder at the end, not once per small file
                executor=self.service.executor,
            )
            self.unsynced_folders.add(final.parent)
        except HashMismatch as exc:
            ok, reason, final = False, exc.message, self.destinations[index]
        await self._file_finished(index, entry, ok, reason, final)

    async def _file_finished(
        self, index: int, entry: tp.Entry, ok: bool, reason: str, final: Path
    ) -> None:
        if ok:
            index_file = self.service._completed
            index_file.add(self.peer_id, entry.key, final, entry.size)
            # A receiver killed later must still know this file is whole (else it would come
            # again as "name (1)"): big files are recorded at once, small ones in batches.
            if entry.size > SMALL_BATCH_BYTES or index_file.unsaved >= SMALL_BATCH_FILES:
                await asyncio.get_running_loop().run_in_executor(
                    self.service.executor, index_file.flush
                )
        for message in self.receiver.file_done(index, ok, reason):
            await self.channel.send(message)

    def _small_finished(self, task: asyncio.Task[None]) -> None:
        self.finishing.discard(task)
        self.slots.release()
        if not task.cancelled() and task.exception() is not None and self.failure is None:
            self.failure = task.exception()

    async def _next_message(self) -> object | None:
        """The sender's next message, or None once every file is done meanwhile."""
        while True:
            getter = asyncio.ensure_future(self.channel.receive())
            if not self.finishing:
                return await getter
            settling = asyncio.ensure_future(asyncio.wait(set(self.finishing)))
            await asyncio.wait({getter, settling}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                settling.cancel()
                return getter.result()
            getter.cancel()
            with contextlib.suppress(asyncio.CancelledError, ChannelClosed):
                await getter
            if self.failure is not None:
                raise self.failure
            if self.receiver.finished:
                return None

    async def _settle(self) -> None:
        """Wait for the small files still being finished; their first error is ours."""
        if self.finishing:
            await asyncio.wait(set(self.finishing))
        if self.failure is not None:
            raise self.failure
        await asyncio.get_running_loop().run_in_executor(
            self.service.executor, self.service._completed.flush
        )

    def _report(self, offer: tp.Offer) -> None:
        if self.rate is None:
            return
        done = self.receiver.bytes_verified
        rate, eta = self.rate.update(done)
        self.service._bus.publish(
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

    async def cancelled(self) -> None:
        """Our user cancelled: tell the sender, keep the partials."""
        with contextlib.suppress(ProtocolError):
            await _quietly(self.channel.send(self.receiver.cancel("cancelled by the receiver")))
        await self.abandon()

    async def abandon(self) -> None:
        """Keep every partial for a resume; close their files."""
        for task in list(self.finishing):
            task.cancel()
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self.service._completed.flush)
        for partial in self.partials.values():
            with contextlib.suppress(Exception):
                await partial.abandon()
        self.partials.clear()


class CompletedIndex:
    """Files received whole, per sender and entry key: a repeated send skips them.

    One JSON object per line, appended; a line is trusted only while the file it names still
    has the size it had (the user may have edited or moved it: then it is received again).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[tuple[str, str], tuple[str, int]] | None = None
        self._unsaved: list[str] = []

    def _load(self) -> dict[tuple[str, str], tuple[str, int]]:
        if self._entries is None:
            self._entries = {}
            with contextlib.suppress(FileNotFoundError):
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        row = json.loads(line)
                        self._entries[(row["sender"], row["key"])] = (row["path"], int(row["size"]))
        return self._entries

    def has(self, sender: str, key: bytes, destination: Path, size: int) -> bool:
        found = self._load().get((sender, key.hex()))
        if found is None:
            return False
        path, known_size = found
        try:
            return (
                Path(path).parent == destination.parent
                and os.stat(path).st_size == size == known_size
            )
        except OSError:
            return False

    def add(self, sender: str, key: bytes, final: Path, size: int) -> None:
        """Remember a file (in memory at once; on disk at the next :meth:`flush`)."""
        self._load()[(sender, key.hex())] = (str(final), size)
        row = {"sender": sender, "key": key.hex(), "path": str(final), "size": size}
        self._unsaved.append(json.dumps(row))

    @property
    def unsaved(self) -> int:
        return len(self._unsaved)

    def flush(self) -> None:
        """(Blocking) append what was added since the last flush, in one write."""
        if self._unsaved:
            lines, self._unsaved = self._unsaved, []
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write("\n".join(lines) + "\n")


def _sync_folders(folders: list[Path]) -> None:
    for folder in folders:
        sync_directory(folder)


def _title(entries: tuple[tp.Entry, ...] | tuple[SourceEntry, ...]) -> str:
    tops = sorted({e.path.split("/", 1)[0] for e in entries})
    return tops[0] if len(tops) == 1 else f"{tops[0]} and {len(tops) - 1} more"


def _item_results(
    entries: tuple[SourceEntry, ...], totals: _Totals, seconds: float, path_kind: str
) -> list[ItemResult]:
    digests, sent, skipped = totals.digests, totals.sent, totals.skipped or {}
    results: dict[str, ItemResult] = {}
    hashers: dict[str, Any] = {}
    for index, entry in enumerate(entries):
        top = entry.path.split("/", 1)[0]
        item = results.setdefault(top, ItemResult(top, 0, seconds=seconds, path=path_kind))
        item.bytes += entry.size
        item.sent += sent.get(index, 0)
        item.resumed_from += skipped.get(index, 0)
        item.attempts = totals.attempts
        item.last_sent += totals.last_sent.get(index, 0)
        item.last_resumed_from += totals.last_skipped.get(index, 0)
        if entry.kind == "file" and index in digests:
            if entry.path == top:
                item.blake3 = digests[index].hex()
            else:  # a folder's digest: over its files' paths and digests, in offer order
                hasher = hashers.setdefault(top, blake3())
                hasher.update(entry.path.encode() + b"\0" + digests[index])
    for top, hasher in hashers.items():
        results[top].blake3 = hasher.hexdigest()
    return list(results.values())


async def _tell_cancel(
    channel: Channel, sender: tp.TransferSender, reason: str, code: tp.TransferErrorCode
) -> None:
    """Best effort: the transfer is over for us either way."""
    with contextlib.suppress(ProtocolError):
        await _quietly(channel.send(sender.cancel(reason, code)))


async def _quietly(awaitable: Awaitable[Any]) -> None:
    with contextlib.suppress(ChannelClosed, P2PError, ConnectionError, MeshError):
        await awaitable
