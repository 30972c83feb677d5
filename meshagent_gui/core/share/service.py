"""Files and folders over the P2P session: the transfer service, sending and receiving.

The protocol decisions are the sans-IO state machines' (core/protocol/transfer.py) and the disk
work is source.py (reading, hashing while streaming), partial.py (chunks in place, resume,
verified rename) and whole.py (small files in batches). Around them:

- sending.py runs one attempt of a send over a channel (offer, answer, stream, confirm);
- receiving.py runs one incoming transfer (decide, plan, pump the chunks to disk), its disk
  work bounded by jobs.py, and remembers whole files in completed.py;
- this module is the service both hang from: ``send`` (its retry loop across reconnects, the
  rate limits, progress), the receive handler with its one terminal event, the accept policy
  and the offers waiting for an answer (``answer_offer``, from the app or ``meshagent
  transfers accept``), the list of running transfers, cancel, and the history (history.py).

Resume, either side:

- the receiver keeps, per file, a partial plus a state file, and a small index of the files it
  completed for each sender (``completed.jsonl`` in the data dir); its Answer tells the sender
  which chunks it already holds, so a new ``send`` of the same files sends only the rest;
- the sender's ``send`` survives the receiver going away (restarted, stopped with Ctrl-C, cut
  off): it says it waits for the peer, reconnects when it is back (bounded by
  ``reconnect_window``) and offers again. Only an explicit cancel ends a transfer for both.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec

from meshagent_gui.core.bus import EventBus
from meshagent_gui.core.events import (
    TransferFailed,
    TransferOffered,
    TransferOutcome,
    TransferProgressed,
    TransferWaiting,
)
from meshagent_gui.core.ipc_types import SHORT_ID, SendProgress, TransferInfo
from meshagent_gui.core.mesh.client import MeshClient
from meshagent_gui.core.p2p.errors import P2PError
from meshagent_gui.core.p2p.peers import PeerManager, PeerUnreachable, Service
from meshagent_gui.core.p2p.session import Channel, ChannelClosed
from meshagent_gui.core.protocol import transfer as tp
from meshagent_gui.core.protocol.captoken import Capability
from meshagent_gui.core.protocol.errors import ProtocolError
from meshagent_gui.core.protocol.messages import StreamRole
from meshagent_gui.errors import UserError
from meshagent_gui.units import human_seconds, human_size

from .completed import CompletedIndex
from .disk import DISK, Disk
from .errors import TransferError, describe
from .history import TransferHistory
from .partial import remove_stale_partials
from .progress import RateMeter, transfer_title
from .ratelimit import TokenBucket
from .receiving import Decision, IncomingTransfer, ReceiverTools
from .sending import CHUNK_SIZE, Interrupted, ItemResult, OutgoingTransfer, Totals, item_results
from .source import Manifest, SourceEntry, walk
from .zipsource import zip_folders

__all__ = ["CHUNK_SIZE", "ActiveTransfer", "ItemResult", "TransferError", "TransferService"]

log = logging.getLogger(__name__)

ASK_TIMEOUT: Final = 90.0  # how long an offer waits for an answer from the UI


@dataclass
class ActiveTransfer:
    """A transfer running now, as `transfers` lists it (and the UI's transfer list)."""

    transfer_id: str
    direction: str
    peer: str
    name: str
    total: int
    task: asyncio.Task[Any] | None = field(default=None, repr=False)
    cancel_requested: bool = field(default=False, repr=False)
    """Our user cancelled it (not: this agent is stopping, which only pauses a receive)."""
    peer_name: str = ""
    names: tuple[str, ...] = ()
    started: float = field(default_factory=time.time)
    state: str = "running"  # or "offered" / "asking": an offer waits for an answer
    done: int = 0
    where: str = ""  # a receive: the folder it lands in, once known

    def describe(self) -> TransferInfo:
        return TransferInfo(
            transfer_id=self.transfer_id,
            direction=self.direction,
            peer=self.peer,
            name=self.name,
            total=self.total,
            state=self.state,
            peer_name=self.peer_name,
            names=list(self.names),
            done=self.done,
            started=self.started,
            where=self.where,
        )


@dataclass
class PendingOffer:
    """An offer waiting for this device's answer (the app's dialog, or `transfers accept`)."""

    transfer_id: str
    peer_name: str
    names: tuple[str, ...]
    total: int
    answer: asyncio.Future[Decision] = field(repr=False)


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
        retry_delay: float = 1.0,
        ask_timeout: float = ASK_TIMEOUT,
        disk: Disk = DISK,
    ) -> None:
        self._peers = peers
        self._client = client
        self._bus = bus
        self._own_user = own_user
        self._peer_user = peer_user
        self._peer_name = peer_name
        self._auto_accept = auto_accept
        self._always_accept = always_accept
        self._global_rate = global_rate
        self._global_bucket: tuple[float, TokenBucket] | None = None
        self.reconnect_window = reconnect_window
        self.retry_delay = retry_delay  # between tries to reach a receiver that went away
        self._completed = CompletedIndex(data_dir / "completed.jsonl")
        self.history = TransferHistory(data_dir / "transfers.jsonl")
        self.ask_timeout = ask_timeout
        self._disk = disk  # read from when sending, written to when receiving
        # Disk work (reads, writes, hashing, fsync, rename) runs here, never on the loop; more
        # threads than cores because most of it waits on the disk, not the CPU.
        self.executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="meshagent-disk")
        self._receiving = ReceiverTools(
            downloads=downloads,
            decide=self.decide,
            publish=bus.publish,
            executor=self.executor,
            completed=self._completed,
            disk=disk,
        )
        self.offers: dict[str, PendingOffer] = {}
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
        on_progress: Callable[[SendProgress], None] | None = None,
        folders_as_zip: bool = False,
    ) -> list[ItemResult]:
        """Send files and folders to ``peer_id``; resumes by itself across reconnects.

        ``folders_as_zip``: each folder goes as one ``NAME.zip`` made on the fly (to a browser,
        which saves one file)."""

        def manifest_of() -> Manifest:  # in a worker: a big folder's zip layout is work too
            walked = walk(paths, disk=self._disk)
            return zip_folders(walked) if folders_as_zip else walked

        manifest = await asyncio.to_thread(manifest_of)
        for skipped in manifest.skipped:
            log.warning("not sent: %s (%s)", skipped.path, skipped.reason)
        entries = manifest.entries
        offer_entries = [
            tp.Entry(e.path, e.kind, e.size, e.mode, e.mtime_ns, e.key) for e in entries
        ]
        scope = "share:folder" if manifest.has_folders else "share:file"
        transfer_id = uuid.uuid4().hex
        active = ActiveTransfer(
            transfer_id,
            "send",
            peer_id,
            transfer_title(entries),
            manifest.total_bytes,
            asyncio.current_task(),
            peer_name=self._peer_name(peer_id),
            names=tuple(sorted({e.path.split("/", 1)[0] for e in entries})),
        )
        self.active[transfer_id] = active
        state, reason = TransferOutcome.FAILED.value, "ended before it finished"
        try:
            results = await self._send(
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
            state, reason = "completed", ""
            return results
        except asyncio.CancelledError:
            state, reason = TransferOutcome.CANCELLED.value, "cancelled by the sender"
            raise
        except UserError as exc:
            reason = exc.message
            if exc.code in ("declined", "no_answer"):
                state = TransferOutcome.DECLINED.value
            elif exc.code == "cancelled":
                state = TransferOutcome.CANCELLED.value
            raise
        except Exception as exc:
            reason = describe(exc)
            raise
        finally:
            self.active.pop(transfer_id, None)
            self._titles.pop(transfer_id, None)
            self._remember(active, state, reason)

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
        on_progress: Callable[[SendProgress], None] | None,
        total_bytes: int,
    ) -> list[ItemResult]:
        buckets = [TokenBucket(rate)] if rate else []
        started = time.monotonic()
        deadline = started + self.reconnect_window
        totals = Totals()
        progress = RateMeter(total_bytes)
        path_kind = ""
        waiting = False
        while True:
            try:
                session = await self._peers.session(peer_id)
                path_kind = self._peers.path_of(session).kind
                grant = await self._client.capability(peer_id, scope, transfer_id)
                channel = await session.open_channel(
                    StreamRole.TRANSFER, tokens=(grant.token,), resource=transfer_id
                )
                sender = tp.TransferSender(offer_entries, CHUNK_SIZE, transfer_id)
                waiting = False
                asking = functools.partial(
                    self._asking, transfer_id, peer_id, progress, on_progress
                )
                attempt = OutgoingTransfer(
                    channel,
                    sender,
                    entries,
                    buckets=[*buckets, *self._global_buckets()],
                    totals=totals,
                    executor=self.executor,
                    report=functools.partial(
                        self._report, sender, progress, peer_id=peer_id, on_progress=on_progress
                    ),
                    peer_name=self._peer_name(peer_id),
                    asking=asking,
                    disk=self._disk,
                )
                await attempt.run()
                break
            except (PeerUnreachable, P2PError, ChannelClosed, ConnectionError, Interrupted) as exc:
                offline = isinstance(exc, PeerUnreachable) and exc.code == "peer_offline"
                if offline and not wait and not totals.started:
                    raise
                if time.monotonic() > deadline:
                    raise TransferError(
                        f"gave up: the receiver stayed unreachable ({exc})", code="unreachable"
                    ) from exc
                if not waiting:
                    log.info("transfer interrupted (%s); waiting for the receiver", exc)
                self._waiting(transfer_id, peer_id, progress, on_progress, first=not waiting)
                waiting = True
                await asyncio.sleep(self.retry_delay)
        results = item_results(entries, totals, time.monotonic() - started, path_kind)
        order = {path.name: n for n, path in enumerate(paths)}  # as given on the command line
        return sorted(results, key=lambda item: order.get(item.name, len(order)))

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def remove_stale_partials(self, folder: Path, max_age: float) -> None:
        """Delete the partials of receives abandoned longer than ``max_age`` seconds ago (the
        agent does it at start); never fatal: a folder we cannot read is only logged."""
        try:
            removed = await asyncio.to_thread(remove_stale_partials, folder, max_age)
        except OSError as exc:
            log.warning("could not look for old partial files in %s: %s", folder, describe(exc))
            return
        for path in removed:
            log.info("removed %s: an unfinished receive, untouched for a long time", path)

    def _asking(
        self,
        transfer_id: str,
        peer_id: str,
        progress: RateMeter,
        on_progress: Callable[[SendProgress], None] | None,
        asking: bool,
    ) -> None:
        """The offer is out and the receiver has not answered for a moment (its user is being
        asked), or (``asking`` False) it just answered."""
        active = self.active.get(transfer_id)
        if active is not None:
            active.state = "asking" if asking else "running"
        if asking and on_progress is not None:
            on_progress(
                SendProgress(
                    transfer_id=transfer_id,
                    done=progress.done,
                    total=progress.total,
                    rate=0.0,
                    eta=None,
                    answer_from=self._peer_name(peer_id),
                )
            )

    def _remember(self, active: ActiveTransfer, state: str, reason: str) -> None:
        """Append a finished transfer to the history (off the loop: it is a file write)."""
        record = msgspec.structs.replace(
            active.describe(), state=state, reason=reason, ended=time.time()
        )
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.run_in_executor(None, self.history.add, record)

    def _waiting(
        self,
        transfer_id: str,
        peer_id: str,
        progress: RateMeter,
        on_progress: Callable[[SendProgress], None] | None,
        *,
        first: bool,
    ) -> None:
        """Tell whoever follows the send that it waits for the receiver to come back: the bus
        once, ``on_progress`` at every try (over IPC, an update goes out when the next one
        comes, so the first must not be the last)."""
        name = self._peer_name(peer_id)
        if first:
            self._bus.publish(TransferWaiting(transfer_id, peer_id, name))
        if on_progress is not None:
            on_progress(
                SendProgress(
                    transfer_id=transfer_id,
                    done=progress.done,
                    total=progress.total,
                    rate=0.0,
                    eta=None,
                    waiting_for=name,
                )
            )

    def _global_buckets(self) -> list[TokenBucket]:
        rate = self._global_rate()
        if rate is None:
            return []
        if self._global_bucket is None or self._global_bucket[0] != rate:
            self._global_bucket = (rate, TokenBucket(rate))
        return [self._global_bucket[1]]

    def _report(
        self,
        sender: tp.TransferSender,
        progress: RateMeter,
        verified: int,
        *,
        peer_id: str,
        on_progress: Callable[[SendProgress], None] | None,
    ) -> None:
        rate, eta = progress.update(verified)
        if (active := self.active.get(sender.transfer_id)) is not None:
            active.done = verified
        event = TransferProgressed(
            sender.transfer_id,
            "send",
            peer_id,
            self._titles.setdefault(sender.transfer_id, transfer_title(sender.entries)),
            verified,
            sender.total_bytes,
            rate,
            eta,
        )
        self._bus.publish(event)
        if on_progress is not None:
            on_progress(
                SendProgress(
                    transfer_id=sender.transfer_id,
                    done=verified,
                    total=sender.total_bytes,
                    rate=rate,
                    eta=eta,
                )
            )

    # ================================================================ receiving

    def listing(self) -> list[TransferInfo]:
        """What `transfers` shows: running transfers and offers waiting for an answer."""
        return [active.describe() for active in self.active.values()]

    def find_offer(self, text: str) -> PendingOffer:
        """A waiting offer by its id or a unique prefix of it (as the log line shows it)."""
        wanted = text.strip().lower()
        found = [
            offer
            for key, offer in self.offers.items()
            if key == wanted or (len(wanted) >= 4 and key.startswith(wanted))
        ]
        if len(found) > 1:
            raise UserError(f"{text!r} matches several offers: give more of the id", code="usage")
        if not found or found[0].answer.done():
            raise UserError(
                f"no offer {text!r} is waiting for an answer (see meshagent transfers)",
                code="unknown_offer",
            )
        return found[0]

    async def answer_offer(
        self, transfer_id: str, accept: bool, destination: Path | None = None
    ) -> PendingOffer:
        """The user's answer to a TransferOffered event that was not auto-accepted (the app's
        dialog, `meshagent transfers accept|decline`); ``destination``: a folder to save it
        in instead of the downloads folder, made if need be (an error here leaves the offer
        waiting)."""
        offer = self.find_offer(transfer_id)
        if accept and destination is not None:
            await asyncio.to_thread(_usable_folder, destination)
        if offer.answer.done():  # answered (or timed out) while the folder was checked
            raise UserError("that offer is no longer waiting for an answer", code="unknown_offer")
        reason = "" if accept else "declined by the user"
        offer.answer.set_result(Decision(accept, reason, folder=destination if accept else None))
        return offer

    async def cancel(self, transfer_id: str) -> None:
        """Stop a transfer in either direction; the receiver keeps its partials for a resume.

        Only this is a cancel the other end hears of: a receive merely interrupted (this agent
        stopping) leaves the sender waiting to resume."""
        active = self.active.get(transfer_id)
        if active is None or active.task is None:
            raise UserError("no such transfer is running", code="unknown_transfer")
        active.cancel_requested = True
        active.task.cancel()

    async def _receive(self, channel: Channel) -> None:
        """One incoming transfer, from the offer to its end.

        Every end publishes exactly one terminal event: TransferCompleted (published when the
        last file is whole), else one TransferFailed saying why; and the transfer leaves
        :attr:`active` whichever way it ends."""
        peer_id = channel.peer_id
        receiver = tp.TransferReceiver(transfer_id=channel.resource)
        capability = channel.grant if isinstance(channel.grant, Capability) else None
        active = ActiveTransfer(
            channel.resource,
            "receive",
            peer_id,
            "",
            0,
            asyncio.current_task(),
            peer_name=self._peer_name(peer_id),
        )

        def offered(title: str, total: int, names: tuple[str, ...]) -> None:
            active.name, active.total, active.names = title, total, names

        incoming = IncomingTransfer(self._receiving, channel, receiver, peer_id, offered=offered)
        self.active[channel.resource] = active
        why = "ended before it finished"
        outcome = TransferOutcome.FAILED
        try:
            await incoming.run(capability)
            if incoming.declined:
                why = f"declined: {incoming.declined}"
                outcome = TransferOutcome.DECLINED
        except asyncio.CancelledError:
            if active.cancel_requested:
                await asyncio.shield(incoming.cancelled())
                why = "cancelled by the receiver"
                outcome = TransferOutcome.CANCELLED
            else:
                # This agent is stopping (Ctrl-C, logout, quit): a pause, not a cancel. The
                # sender is not told to give up: it waits for us to come back and resumes.
                await asyncio.shield(incoming.abandon())
                why = "interrupted: this device stopped; the sender resumes when it is back"
                outcome = TransferOutcome.INTERRUPTED
            raise
        except (ChannelClosed, P2PError, ConnectionError) as exc:
            await incoming.abandon()
            why = str(exc) or "cut off"
        except ProtocolError as exc:
            await incoming.abandon()
            log.warning("transfer from %s refused: %s", peer_id[:12], exc)
            channel.abort(exc.code, str(exc)[:200])
            why = f"refused: {exc}"
        except UserError as exc:
            await incoming.failed(exc.message)
            why = exc.message
            if exc.code == "cancelled":  # the sender cancelled
                outcome = TransferOutcome.CANCELLED
        except Exception as exc:
            # A disk error (OSError) or a bug: still one clear end for the UI and the sender.
            log.exception("receiving from %s failed", peer_id[:12])
            why = f"failed: {describe(exc)}"
            await incoming.failed(why, tp.TransferErrorCode.INTERNAL_ERROR)
        finally:
            self.active.pop(channel.resource, None)
            active.done = receiver.bytes_verified if receiver.offer is not None else 0
            active.where = incoming.where if incoming.root != Path() else ""
            if incoming.completed:
                self._arrived(active)
                self._remember(active, "completed", "")
            else:
                self._bus.publish(
                    TransferFailed(channel.resource, incoming.title, peer_id, why, outcome)
                )
                if incoming.title:  # nothing was offered: nothing to remember
                    self._remember(active, outcome.value, why)

    def _arrived(self, active: ActiveTransfer) -> None:
        log.info(
            "received %s (%s) from %s -> %s",
            active.name,
            human_size(active.total),
            active.peer_name,
            active.where,
        )

    async def decide(
        self, peer_id: str, offer: tp.OfferReceived, names: tuple[str, ...]
    ) -> Decision:
        policy = self._auto_accept()
        own = policy in ("own", "") and await self._peer_user(peer_id) == self._own_user
        auto = policy == "all" or own or peer_id in self._always_accept()
        peer_name = self._peer_name(peer_id)
        if auto:
            self._bus.publish(self._offered(offer, peer_id, peer_name, names, auto=True))
            return Decision(True)
        if policy == "none":
            self._bus.publish(self._offered(offer, peer_id, peer_name, names, auto=False))
            return Decision(False, "declined by the user")
        # Registered before the event goes out: a front end may answer at once.
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        pending = PendingOffer(offer.transfer_id, peer_name, names, offer.total_bytes, future)
        self.offers[offer.transfer_id] = pending
        if (active := self.active.get(offer.transfer_id)) is not None:
            active.state = "offered"
        short = offer.transfer_id[:SHORT_ID]
        log.info(
            "%s offers %s (%s): meshagent transfers accept %s / decline %s",
            peer_name,
            transfer_title(offer.entries),
            human_size(offer.total_bytes),
            short,
            short,
        )
        self._bus.publish(self._offered(offer, peer_id, peer_name, names, auto=False))
        try:
            return await asyncio.wait_for(future, self.ask_timeout)
        except TimeoutError:
            # Not "declined": nobody said no. The sender hears it as a timeout (OFFER_TIMEOUT).
            reason = f"no answer within {human_seconds(self.ask_timeout)}"
            return Decision(False, reason, timed_out=True)
        finally:
            self.offers.pop(offer.transfer_id, None)
            if (active := self.active.get(offer.transfer_id)) is not None:
                active.state = "running"

    def _offered(
        self,
        offer: tp.OfferReceived,
        peer_id: str,
        peer_name: str,
        names: tuple[str, ...],
        *,
        auto: bool,
    ) -> TransferOffered:
        return TransferOffered(
            offer.transfer_id,
            peer_id,
            peer_name,
            names,
            sum(1 for e in offer.entries if e.kind == "file"),
            offer.total_bytes,
            auto,
        )


def _usable_folder(folder: Path) -> None:
    """(Blocking) make ``folder`` if need be; one clear UserError if files cannot go there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{folder} is a file, not a folder", code="bad_folder") from None
    except OSError as exc:
        raise UserError(f"cannot use {folder}: {describe(exc)}", code="bad_folder") from None
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder", code="bad_folder")
