"""One attempt of a send: offer, answer, then every chunk the receiver still needs.

:class:`OutgoingTransfer` runs over one channel: it offers the files, reads the answer (what the
receiver holds already), streams the rest (runs of small files read many per trip to a disk
thread, big files chunk by chunk with read-ahead, resends first) while a listener reads the
receiver's reports, and ends when the receiver confirms everything, or raises: a
:class:`~meshagent_gui.core.share.errors.TransferError` to give up, :class:`Interrupted` to
reconnect and offer again (the service's loop does that, with the same :class:`Totals`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Final

from blake3 import blake3

from meshagent_gui.core.p2p.session import Channel, ChannelClosed
from meshagent_gui.core.protocol import transfer as tp
from meshagent_gui.core.protocol.errors import ProtocolError
from meshagent_gui.units import human_seconds

from .disk import DISK, Disk
from .errors import TransferError, ended_by_receiver, quietly
from .ratelimit import TokenBucket, take_all
from .source import (
    ChunkReader,
    SourceChanged,
    SourceChunk,
    SourceEntry,
    read_one_chunk,
    read_whole_files,
)

CHUNK_SIZE: Final = 1024 * 1024
OFFER_TIMEOUT: Final = 120.0  # the receiver may be asking its user (it gives up after 90 s)
ASKING_AFTER: Final = 1.0  # no answer for this long: the receiver's user is being asked
READ_AHEAD: Final = 4
SEND_BATCH_FILES: Final = 64  # small files read per trip to the disk and sent together
SEND_BATCH_BYTES: Final = 2 * 1024 * 1024


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
class Totals:
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


class Interrupted(Exception):
    """The channel ended before the receiver said Complete: reconnect and offer again."""


class OutgoingTransfer:
    """One attempt of a send over ``channel``; :meth:`run` until the receiver has it all."""

    def __init__(
        self,
        channel: Channel,
        sender: tp.TransferSender,
        entries: tuple[SourceEntry, ...],
        *,
        buckets: list[TokenBucket],
        totals: Totals,
        executor: Executor,
        report: Callable[[int], None],
        peer_name: str = "the receiver",
        asking: Callable[[bool], None] | None = None,
        disk: Disk = DISK,
    ) -> None:
        self.peer_name = peer_name
        self.asking = asking  # told when an answer is slow to come (True), then when it came
        self.channel = channel
        self.sender = sender
        self.entries = entries
        self.buckets = buckets
        self.totals = totals
        self.executor = executor
        self.disk = disk  # where the files are read from (a faulty one in tests)
        self.report = report  # bytes the receiver verified so far
        self.stop = asyncio.Event()
        """Set when the listener ends (the receiver is done, gone, or gave up)."""
        self.heard = asyncio.Event()
        """Set by each message from the receiver (a Resend may have come)."""

    async def run(self) -> None:
        channel, sender, entries, totals = self.channel, self.sender, self.entries, self.totals
        for offer in sender.start():
            await channel.send(offer)
        answer = await self._wait_answer()
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
        failure: list[BaseException] = []

        async def listen() -> None:
            try:
                while not sender.finished:
                    message = await channel.receive()
                    self.heard.set()
                    for event in sender.receive(message):
                        match event:
                            case tp.ProgressReported(bytes_verified=verified):
                                self.report(verified)
                            case tp.FileConfirmed(index=index, ok=False, reason=reason):
                                failure.append(
                                    TransferError(
                                        f"{entries[index].path}: the receiver failed it ({reason})",
                                        code="file_failed",
                                    )
                                )
                            case tp.CancelledByPeer(reason=reason, code=code):
                                failure.append(ended_by_receiver(reason, code))
                            case tp.TransferGaveUp(cancel=cancel, reason=reason):
                                await channel.send(cancel)
                                failure.append(TransferError(reason, code="failed"))
                    if sender.finished:
                        break
            except (ChannelClosed, ProtocolError) as exc:
                failure.append(exc)
            finally:
                self.stop.set()

        listener = asyncio.create_task(listen())
        streaming = asyncio.create_task(self._stream())
        try:
            await asyncio.wait({listener, streaming}, return_when=asyncio.FIRST_COMPLETED)
            if not streaming.done() and failure:
                # The receiver ended it (cancel, disk full) while we may be blocked on flow
                # control of a stream it no longer reads: stop writing, or wait forever.
                streaming.cancel()
            await asyncio.wait({streaming})
            if not streaming.cancelled():
                streaming.result()  # SourceChanged, a read error: raised here
            await self.stop.wait()
        except SourceChanged as exc:
            await tell_cancel(channel, sender, str(exc), tp.TransferErrorCode.SOURCE_CHANGED)
            raise
        except asyncio.CancelledError:
            # Cancelled here (Ctrl-C, the UI): no chunk after the Cancel, which tells the
            # receiver (who keeps its partials).
            async def stop_then_tell() -> None:
                streaming.cancel()
                await asyncio.wait({streaming})
                await tell_cancel(
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
            raise Interrupted("the connection to the receiver was cut")
        self.report(sender.total_bytes)
        await quietly(channel.close())

    async def _wait_answer(self) -> tp.AnswerReceived:
        channel, sender = self.channel, self.sender
        offered = time.monotonic()
        asked: list[bool] = []
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None

        def slow() -> None:
            # Said again every ASKING_AFTER: over IPC an update goes out when the next comes.
            nonlocal timer
            asked.append(True)
            if self.asking is not None:
                self.asking(True)
            timer = loop.call_later(ASKING_AFTER, slow)

        # A timer, not a timeout on the receive: a cancelled receive could lose the answer.
        timer = loop.call_later(ASKING_AFTER, slow)
        try:
            async with asyncio.timeout(OFFER_TIMEOUT):
                while True:
                    message = await channel.receive()
                    for event in sender.receive(message):
                        if isinstance(event, tp.AnswerReceived):
                            return event
                        if isinstance(event, tp.CancelledByPeer):
                            if event.code is tp.TransferErrorCode.OFFER_TIMEOUT:
                                raise self._no_answer(time.monotonic() - offered)
                            raise ended_by_receiver(event.reason, event.code)
        except TimeoutError:
            await tell_cancel(channel, sender, "no answer", tp.TransferErrorCode.OFFER_TIMEOUT)
            raise self._no_answer(OFFER_TIMEOUT) from None
        finally:
            if timer is not None:
                timer.cancel()
            if asked and self.asking is not None:
                self.asking(False)

    def _no_answer(self, waited: float) -> TransferError:
        return TransferError(
            f"{self.peer_name} did not answer within {human_seconds(waited)}", code="no_answer"
        )

    async def _stream(self) -> None:
        """Send every chunk the plan asks for, file by file, resends first.

        Runs of small files (one chunk each, nothing of them at the receiver) are read many per
        trip to a disk thread, the next run while this one is sent, and their messages are
        queued together: one drain per run, not two waits per file."""
        channel, sender, entries = self.channel, self.sender, self.entries
        groups = sending_groups(sender, entries)
        reads: dict[int, asyncio.Future[list[SourceChunk | BaseException]]] = {}
        loop = asyncio.get_running_loop()

        def read_ahead(group: int) -> None:
            run = groups[group] if group < len(groups) else None
            if isinstance(run, list) and group not in reads:
                members = [entries[i] for i in run]
                read = functools.partial(read_whole_files, members, disk=self.disk)
                reads[group] = loop.run_in_executor(self.executor, read)

        try:
            for position, group in enumerate(groups):
                if self.stop.is_set():
                    return
                if isinstance(group, list):
                    read_ahead(position)
                    read_ahead(position + 1)
                    pieces = await reads.pop(position)
                    for index, piece in zip(group, pieces, strict=True):
                        if not await self._due(index):
                            continue
                        if isinstance(piece, BaseException):
                            raise piece
                        if piece.data:
                            await take_all(self.buckets, len(piece.data))
                            channel.post(tp.Chunk(index, 0, piece.digest, piece.data))
                            sender.chunk_sent(index, 0)
                            self.totals.count_sent(index, len(piece.data))
                        self.totals.digests[index] = piece.digest
                        end = sender.file_sent(index, piece.digest)
                        if end is not None:
                            channel.post(end)
                    await channel.drain()
                    continue
                index = group
                if not await self._due(index):
                    continue
                read_ahead(position + 1)
                await self._stream_file(index)
                if self.stop.is_set():
                    return
        finally:
            for pending in reads.values():
                pending.add_done_callback(_consume)
        await self._finish_stream()

    async def _resends_then_next(self) -> tp.SendChunk | tp.EndFile | None:
        """Send every resend the receiver asked for; then the plan's next work."""
        work = self.sender.next_work()
        while isinstance(work, tp.SendChunk) and work.resend:
            await self._resend(work)
            work = self.sender.next_work()
        return work

    async def _due(self, index: int) -> bool:
        """Resends first; then whether file ``index`` is still to be sent (the receiver may
        have confirmed or failed it meanwhile)."""
        work = await self._resends_then_next()
        return work is not None and work.index == index

    async def _stream_file(self, index: int) -> None:
        """One file chunk by chunk (read ahead, hashed while streaming), then its FileEnd."""
        async with ChunkReader(
            self.entries[index],
            CHUNK_SIZE,
            have=self.sender.receiver_bitmap(index),
            read_ahead=READ_AHEAD,
            executor=self.executor,
            disk=self.disk,
        ) as reader:
            async for piece in reader:
                if self.stop.is_set():
                    return
                await self._resends_then_next()
                await self._send_chunk(index, piece)
            self.totals.digests[index] = reader.file_digest
        end = self.sender.file_sent(index, reader.file_digest)
        if end is not None:
            await self.channel.send(end)

    async def _finish_stream(self) -> None:
        """Resends asked for after the last file went out, until the receiver is done: woken
        by each message from the receiver, not by a timer."""
        while True:
            self.heard.clear()
            await self._resends_then_next()
            if self.stop.is_set():
                return
            heard = asyncio.ensure_future(self.heard.wait())
            stopped = asyncio.ensure_future(self.stop.wait())
            try:
                await asyncio.wait({heard, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                heard.cancel()
                stopped.cancel()

    async def _resend(self, work: tp.SendChunk) -> None:
        piece = await read_one_chunk(
            self.entries[work.index],
            CHUNK_SIZE,
            work.chunk,
            executor=self.executor,
            disk=self.disk,
        )
        await self._send_chunk(work.index, piece)

    async def _send_chunk(self, index: int, piece: SourceChunk) -> None:
        await take_all(self.buckets, len(piece.data))
        await self.channel.send(tp.Chunk(index, piece.chunk, piece.digest, piece.data))
        self.sender.chunk_sent(index, piece.chunk)
        self.totals.count_sent(index, len(piece.data))


SendGroup = int | list[int]
"""A file sent chunk by chunk (its index), or a run of small files sent together."""


def sending_groups(sender: tp.TransferSender, entries: tuple[SourceEntry, ...]) -> list[SendGroup]:
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


def item_results(
    entries: tuple[SourceEntry, ...], totals: Totals, seconds: float, path_kind: str
) -> list[ItemResult]:
    digests, sent, skipped = totals.digests, totals.sent, totals.skipped or {}
    results: dict[str, ItemResult] = {}
    hashers: dict[str, blake3] = {}  # a folder's digest, by the folder's name
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


async def tell_cancel(
    channel: Channel, sender: tp.TransferSender, reason: str, code: tp.TransferErrorCode
) -> None:
    """Best effort: the transfer is over for us either way."""
    with contextlib.suppress(ProtocolError):
        await quietly(channel.send(sender.cancel(reason, code)))
