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
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final, NoReturn, TypeVar

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
from .paths import UnsafePath, ensure_directory_inside, resolve_many, safe_relative_path
from .ratelimit import TokenBucket, take_all
from .source import (
    ChunkReader,
    SourceChanged,
    SourceChunk,
    SourceEntry,
    read_one_chunk,
    read_whole_files,
    walk,
)
from .whole import NOT_HERE, Outcome, WholeFile, store_whole_files

log = logging.getLogger(__name__)

CHUNK_SIZE: Final = 1024 * 1024
OFFER_TIMEOUT: Final = 120.0  # the receiver may be asking its user
ASK_TIMEOUT: Final = 90.0  # how long an offer waits for an answer from the UI
SMALL_BATCH_FILES: Final = 256  # completed small files recorded on disk together
SMALL_BATCH_BYTES: Final = 4 * 1024 * 1024
READ_AHEAD: Final = 4
MAX_CHUNK_WRITES: Final = 3  # per incoming transfer; chunk data held meanwhile: 3 chunks
MAX_FINISHING: Final = 4
MAX_BATCHES: Final = 2
WHOLE_BATCH_FILES: Final = 128  # small files stored per trip to the disk (whole.py)
WHOLE_BATCH_BYTES: Final = 4 * 1024 * 1024
SEND_BATCH_FILES: Final = 64  # small files read per trip to the disk and sent together
SEND_BATCH_BYTES: Final = 2 * 1024 * 1024


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
        always_accept: Callable[[], frozenset[str]] = frozenset,
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
        self._always_accept = always_accept
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
        out = _Outgoing(channel, sender, entries, buckets, totals, stop=done)
        failure: list[BaseException] = []

        async def listen() -> None:
            try:
                while not sender.finished:
                    message = await channel.receive()
                    out.heard.set()
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
        streaming = asyncio.create_task(self._stream(out))
        try:
            await asyncio.wait({listener, streaming}, return_when=asyncio.FIRST_COMPLETED)
            if not streaming.done() and failure:
                # The receiver ended it (cancel, disk full) while we may be blocked on flow
                # control of a stream it no longer reads: stop writing, or wait forever.
                streaming.cancel()
            await asyncio.wait({streaming})
            if not streaming.cancelled():
                streaming.result()  # SourceChanged, a read error: raised here
            await done.wait()
        except SourceChanged as exc:
            await _tell_cancel(channel, sender, str(exc), tp.TransferErrorCode.SOURCE_CHANGED)
            raise
        except asyncio.CancelledError:
            # Cancelled here (Ctrl-C, the UI): no chunk after the Cancel, which tells the
            # receiver (who keeps its partials).
            async def stop_then_tell() -> None:
                streaming.cancel()
                await asyncio.wait({streaming})
                await _tell_cancel(
                    channel, sender, "cancelled by the sender", tp.TransferErrorCode.CANCELLED
                )

            await asyncio.shield(stop_then_tell())
            raise
        finally:
            for task in (streaming, listener):
                task.cancel()
            await asyncio.gather(streaming, listener, return_exceptions=True)
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

    async def _stream(self, out: _Outgoing) -> None:
        """Send every chunk the plan asks for, file by file, resends first.

        Runs of small files (one chunk each, nothing of them at the receiver) are read many per
        trip to a disk thread, the next run while this one is sent, and their messages are
        queued together: one drain per run, not two waits per file."""
        channel, sender, entries = out.channel, out.sender, out.entries
        groups = _sending_groups(sender, entries)
        reads: dict[int, asyncio.Future[list[SourceChunk | BaseException]]] = {}
        loop = asyncio.get_running_loop()

        def read_ahead(group: int) -> None:
            run = groups[group] if group < len(groups) else None
            if isinstance(run, list) and group not in reads:
                members = [entries[i] for i in run]
                reads[group] = loop.run_in_executor(self.executor, read_whole_files, members)

        try:
            for position, group in enumerate(groups):
                if out.stop.is_set():
                    return
                if isinstance(group, list):
                    read_ahead(position)
                    read_ahead(position + 1)
                    pieces = await reads.pop(position)
                    for index, piece in zip(group, pieces, strict=True):
                        if not await self._due(out, index):
                            continue
                        if isinstance(piece, BaseException):
                            raise piece
                        if piece.data:
                            await take_all(out.buckets, len(piece.data))
                            channel.post(tp.Chunk(index, 0, piece.digest, piece.data))
                            sender.chunk_sent(index, 0)
                            out.totals.count_sent(index, len(piece.data))
                        out.totals.digests[index] = piece.digest
                        end = sender.file_sent(index, piece.digest)
                        if end is not None:
                            channel.post(end)
                    await channel.drain()
                    continue
                index = group
                if not await self._due(out, index):
                    continue
                read_ahead(position + 1)
                await self._stream_file(out, index)
                if out.stop.is_set():
                    return
        finally:
            for pending in reads.values():
                pending.add_done_callback(_consume)
        await self._finish_stream(out)

    async def _resends_then_next(self, out: _Outgoing) -> tp.SendChunk | tp.EndFile | None:
        """Send every resend the receiver asked for; then the plan's next work."""
        work = out.sender.next_work()
        while isinstance(work, tp.SendChunk) and work.resend:
            await self._resend(out, work)
            work = out.sender.next_work()
        return work

    async def _due(self, out: _Outgoing, index: int) -> bool:
        """Resends first; then whether file ``index`` is still to be sent (the receiver may
        have confirmed or failed it meanwhile)."""
        work = await self._resends_then_next(out)
        return work is not None and work.index == index

    async def _stream_file(self, out: _Outgoing, index: int) -> None:
        """One file chunk by chunk (read ahead, hashed while streaming), then its FileEnd."""
        async with ChunkReader(
            out.entries[index],
            CHUNK_SIZE,
            have=out.sender.receiver_bitmap(index),
            read_ahead=READ_AHEAD,
            executor=self.executor,
        ) as reader:
            async for piece in reader:
                if out.stop.is_set():
                    return
                await self._resends_then_next(out)
                await self._send_chunk(out, index, piece)
            out.totals.digests[index] = reader.file_digest
        end = out.sender.file_sent(index, reader.file_digest)
        if end is not None:
            await out.channel.send(end)

    async def _finish_stream(self, out: _Outgoing) -> None:
        """Resends asked for after the last file went out, until the receiver is done: woken
        by each message from the receiver, not by a timer."""
        while True:
            out.heard.clear()
            await self._resends_then_next(out)
            if out.stop.is_set():
                return
            heard = asyncio.ensure_future(out.heard.wait())
            stopped = asyncio.ensure_future(out.stop.wait())
            try:
                await asyncio.wait({heard, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                heard.cancel()
                stopped.cancel()

    async def _resend(self, out: _Outgoing, work: tp.SendChunk) -> None:
        piece = await read_one_chunk(
            out.entries[work.index], CHUNK_SIZE, work.chunk, executor=self.executor
        )
        await self._send_chunk(out, work.index, piece)

    async def _send_chunk(self, out: _Outgoing, index: int, piece: SourceChunk) -> None:
        await take_all(out.buckets, len(piece.data))
        await out.channel.send(tp.Chunk(index, piece.chunk, piece.digest, piece.data))
        out.sender.chunk_sent(index, piece.chunk)
        out.totals.count_sent(index, len(piece.data))

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
            on_progress(
                {
                    "transfer_id": sender.transfer_id,
                    "done": verified,
                    "total": sender.total_bytes,
                    "rate": rate,
                    "eta": eta,
                }
            )

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
        auto = policy == "all" or own or peer_id in self._always_accept()
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
class _Outgoing:
    """One attempt of a send: what every step of streaming needs."""

    channel: Channel
    sender: tp.TransferSender
    entries: tuple[SourceEntry, ...]
    buckets: list[TokenBucket]
    totals: _Totals
    stop: asyncio.Event
    heard: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by each message from the receiver (a Resend may have come)."""


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
    """One transfer being received.

    The pump reads the sender's messages and never waits on the disk for one of them: chunk
    writes (up to :data:`MAX_CHUNK_WRITES` at once), batches of small files and whole-file
    finishes run as jobs in the disk executor, and their results are handled by the pump
    between messages (so every message to the sender still goes out from one place, in order).
    """

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
        # Files of one chunk, verified, waiting for their FileEnd: (data, blake3 of data).
        self.small: dict[int, tuple[bytes, bytes]] = {}
        self.batch: list[tuple[int, WholeFile, bytes]] = []  # index, file, its blake3
        self.batch_bytes = 0
        self.jobs: set[asyncio.Future[Any]] = set()
        self.results: deque[tuple[asyncio.Future[Any], _JobDone]] = deque()
        self.result_ready: asyncio.Future[None] | None = None
        self.running = dict.fromkeys(_JOB_LIMITS, 0)
        self.getter: asyncio.Future[object] | None = None
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
            await self._disk(self._plan_destinations, offer)
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
        """(Blocking) where each file goes; UnsafePath for a name or a folder we refuse."""
        files = [index for index, entry in enumerate(offer.entries) if entry.kind == "file"]
        paths = resolve_many(self.root, (offer.entries[index].path for index in files))
        self.destinations = dict(zip(files, paths, strict=True))

    async def _disk(self, work: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self.service.executor, work, *args)

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
                executor=self.service.executor,
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
        if self.getter is None and not self.jobs:
            return await self.channel.receive()
        if self.getter is None:  # one reader at a time, or messages could swap
            self.getter = asyncio.ensure_future(self.channel.receive())
        if self.results:
            return None
        self.result_ready = asyncio.get_running_loop().create_future()
        waiting: set[asyncio.Future[Any]] = {self.getter, self.result_ready}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        self.result_ready = None
        return self._take()

    def _start(self, kind: str, work: Awaitable[Any], done: _JobDone) -> None:
        job = asyncio.ensure_future(work)
        self.jobs.add(job)
        self.running[kind] += 1

        def finished(job: asyncio.Future[Any]) -> None:
            self.jobs.discard(job)
            self.running[kind] -= 1
            self.results.append((job, done))
            if self.result_ready is not None and not self.result_ready.done():
                self.result_ready.set_result(None)

        job.add_done_callback(finished)

    async def _room_for(self, kind: str) -> None:
        """Wait until fewer than the limit of ``kind`` jobs run (handling what finished)."""
        while self.running[kind] >= _JOB_LIMITS[kind]:
            await self._wait_result()
            await self._handle_results()

    async def _wait_result(self) -> None:
        """Wait until a job has finished (at once if one has and is not handled yet)."""
        if not self.results:
            self.result_ready = asyncio.get_running_loop().create_future()
            await self.result_ready
            self.result_ready = None

    async def _handle_results(self) -> None:
        if not self.results:
            return
        while self.results:
            job, done = self.results.popleft()
            await done(job)
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
        await self._room_for(_WRITE)

        async def written(job: asyncio.Future[None]) -> None:
            try:
                job.result()
            except HashMismatch:
                await self._chunk_failed(index, chunk)
                return
            except DiskFull as exc:
                await self._disk_full(exc)
            await self._chunk_verified(offer, index, chunk)

        self._start(_WRITE, partial.write_chunk(chunk, digest, data), written)

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
            await _quietly(self.channel.drain())
        raise exc

    async def _file_ended(self, offer: tp.Offer, index: int, digest: bytes) -> None:
        entry = offer.entries[index]
        if index in self.already:
            await self._file_finished(index, entry, True, "", self.destinations[index])
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
        await self._room_for(_FINISH)

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

        self._start(
            _FINISH, partial.finish(digest, mode=entry.mode, mtime_ns=entry.mtime_ns), finished
        )

    async def _store_batch(self) -> None:
        """Store the small files batched so far, in one job (see whole.py)."""
        if not self.batch:
            return
        await self._room_for(_BATCH)
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
        work = self._disk(_store_small_files, files, self.peer_id, offer.chunk_size)
        self._start(_BATCH, work, stored)

    async def _file_finished(
        self, index: int, entry: tp.Entry, ok: bool, reason: str, final: Path
    ) -> None:
        if ok:
            index_file = self.service._completed
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
        while self.jobs or self.results:
            await self._wait_result()
            await self._handle_results()
        if self.getter is not None and not self.getter.done():
            self.getter.cancel()
            self.getter = None
        await self._disk(self.service._completed.flush)
        await self.channel.drain()

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
        if self.getter is not None:
            self.getter.cancel()
            self.getter = None
        # Jobs run in disk threads: let them end before the files they use are closed.
        if self.jobs:
            await asyncio.wait(set(self.jobs))
        self.results.clear()
        with contextlib.suppress(OSError):
            # Not the service's executor: abandoning also happens while it shuts down.
            await asyncio.to_thread(self.service._completed.flush)
        for partial in self.partials.values():
            with contextlib.suppress(Exception):
                await partial.abandon()
        self.partials.clear()


_T = TypeVar("_T")
_JobDone = Callable[[asyncio.Future[Any]], Awaitable[None]]
_WRITE, _FINISH, _BATCH = "write", "finish", "batch"
# Disk jobs of each kind one transfer may have running: writes overlap the network (and each
# other: hashing, copying), a few files finish at once, and small files go in batches.
_JOB_LIMITS: Final = {_WRITE: MAX_CHUNK_WRITES, _FINISH: MAX_FINISHING, _BATCH: MAX_BATCHES}
_EMPTY_DIGEST: Final = blake3(b"").digest()


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


SendGroup = int | list[int]
"""A file sent chunk by chunk (its index), or a run of small files sent together."""


def _sending_groups(sender: tp.TransferSender, entries: tuple[SourceEntry, ...]) -> list[SendGroup]:
    groups: list[SendGroup] = []
    run: list[int] = []
    run_bytes = 0
    for index in sender.files:
        entry = entries[index]
        if entry.size <= CHUNK_SIZE and not sender.receiver_bitmap(index):
            if len(run) >= SEND_BATCH_FILES or run_bytes + entry.size > SEND_BATCH_BYTES:
                groups.append(run)
                run, run_bytes = [], 0
            run.append(index)
            run_bytes += entry.size
            continue
        if run:
            groups.append(run)
            run, run_bytes = [], 0
        groups.append(index)
    if run:
        groups.append(run)
    return groups


def _consume(future: asyncio.Future[Any]) -> None:
    """A read nobody waits for any more: its error is moot."""
    if not future.cancelled():
        future.exception()


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


def _store_small_files(
    files: Sequence[tuple[WholeFile, bytes, bytes]], sender: str, chunk_size: int
) -> list[Outcome]:
    """(Blocking) store small files (whole, digest, entry key) in one trip to a disk thread:
    as unnamed files linked into place where the filesystem can (whole.py), by the partial-file
    path where it cannot (macOS, Windows, some Linux filesystems), each folder synced once."""
    outcomes = store_whole_files([whole for whole, _, _ in files])
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
            )
        except (DiskFull, UserError) as exc:
            outcomes[position] = exc
            continue
        outcomes[position] = final
        folders.add(final.parent)
    for folder in sorted(folders):
        with contextlib.suppress(OSError):
            sync_directory(folder)
    return outcomes


async def _quietly(awaitable: Awaitable[Any]) -> None:
    with contextlib.suppress(ChannelClosed, P2PError, ConnectionError, MeshError):
        await awaitable
