"""Folder sync, all folders: setup offers, the SYNC streams peers open, the API and its events.

docs/sync.md is the design; :mod:`.folder` runs one folder. This module keeps the list of
folders (``<data_dir>/sync/folders.json``, written atomically), starts each folder in the
service's task group, and answers every SYNC stream a peer opens:

- the stream's capability must be ``share:folder`` for exactly the stream's folder id (the
  P2P validator checked the token; here its resource is compared with the folder);
- a ``SyncOffer`` (setup) is decided by ``sync.auto_accept`` (own devices by default, and
  ``transfer.always_accept``), else the user is asked through :class:`SyncFolderOffered`;
- a ``Subscribe`` is served only to a device that is a peer of that folder: a room member
  holding a valid token for a folder it was never offered is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
import unicodedata
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec

from meshagent_gui.core.bus import EventBus
from meshagent_gui.core.events import (
    PeerCameOnline,
    SyncFolderAdded,
    SyncFolderOffered,
    SyncFolderRemoved,
)
from meshagent_gui.core.ipc_types import FolderInfo, SyncOfferInfo
from meshagent_gui.core.mesh.client import MeshClient
from meshagent_gui.core.p2p.errors import P2PError
from meshagent_gui.core.p2p.peers import PeerManager, Service
from meshagent_gui.core.p2p.session import Channel, ChannelClosed, ChannelRefused
from meshagent_gui.core.protocol.captoken import Capability
from meshagent_gui.core.protocol.errors import ErrorCode, ProtocolError
from meshagent_gui.core.protocol.messages import StreamRole
from meshagent_gui.core.protocol.sync import (
    MAX_LABEL_LENGTH,
    Subscribe,
    SyncOffer,
    SyncOfferAnswer,
)
from meshagent_gui.core.share.paths import UnsafePath, safe_relative_path, unique_destination
from meshagent_gui.errors import UserError

from .folder import SCOPE, FolderConfig, FolderHost, SyncFolder
from .scanner import MARKER, RootMissing, ensure_marker

__all__ = ["SCOPE", "SyncService"]

log = logging.getLogger(__name__)

ASK_TIMEOUT: Final = 90.0
"""How long an offer waits for this device's user to answer."""
OFFER_TIMEOUT: Final = ASK_TIMEOUT + 30.0
"""How long ``add`` waits for the peer's answer (its user may be asked)."""
FIRST_MESSAGE_TIMEOUT: Final = 30.0

PeerUser = Callable[[str], Awaitable[str | None]]
PeerName = Callable[[str], str]


@dataclass
class _Offer:
    info: SyncOfferInfo
    answer: asyncio.Future[tuple[bool, Path | None]]


class SyncService:
    def __init__(
        self,
        *,
        peers: PeerManager,
        client: MeshClient,
        bus: EventBus,
        data_dir: Path,
        device_id: str,
        own_user: str,
        peer_user: PeerUser,
        peer_name: PeerName,
        auto_accept: Callable[[], str],
        always_accept: Callable[[], frozenset[str]],
        sync_root: Callable[[], Path],
        versions_days: Callable[[], float],
        rescan_interval: Callable[[], float] = lambda: 60.0,
        device_name: Callable[[], str] = lambda: "this device",
    ) -> None:
        self._peers = peers
        self._client = client
        self._bus = bus
        self._dir = data_dir / "sync"
        self._file = self._dir / "folders.json"
        self._device_id = device_id
        self._own_user = own_user
        self._peer_user = peer_user
        self._peer_name = peer_name
        self._auto_accept = auto_accept
        self._always_accept = always_accept
        self._sync_root = sync_root
        # Reads of blocks a peer asks for: off the loop, and off the folders' index threads.
        self._reader = ThreadPoolExecutor(max_workers=4, thread_name_prefix="meshsync-read")
        self._host = FolderHost(
            bus=bus,
            peers=peers,
            client=client,
            index_dir=self._dir,
            device_id=device_id,
            device_name=device_name,
            peer_name=peer_name,
            versions_days=versions_days,
            rescan_interval=rescan_interval,
            reader=self._reader,
        )
        self._folders: dict[str, SyncFolder] = {}
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._offers: dict[str, _Offer] = {}
        self._save_lock = asyncio.Lock()
        self._tasks: asyncio.TaskGroup | None = None
        self._started = asyncio.Event()
        peers.register(Service(StreamRole.SYNC, (SCOPE,), self._handle))

    # ------------------------------------------------------------ running

    async def run(self) -> None:
        """All folders, until cancelled."""
        configs = await asyncio.to_thread(self._load)
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                for config in configs:
                    self._start(config)
                tasks.create_task(self._follow_events(), name="sync-events")
                self._started.set()
        finally:
            self._tasks = None
            self._reader.shutdown(wait=False, cancel_futures=True)

    def _start(self, config: FolderConfig) -> SyncFolder:
        if self._tasks is None:
            raise UserError("folder sync is not running yet; try again", code="not_ready")
        folder = SyncFolder(config, self._host)
        self._folders[config.folder_id] = folder
        self._runs[config.folder_id] = self._tasks.create_task(
            folder.run(), name=f"sync-{config.folder_id[:8]}"
        )
        return folder

    async def _stop(self, folder: SyncFolder) -> None:
        self._folders.pop(folder.folder_id, None)
        task = self._runs.pop(folder.folder_id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _follow_events(self) -> None:
        with self._bus.subscribed() as events:
            async for event in events:
                if isinstance(event, PeerCameOnline):
                    for folder in self._folders.values():
                        folder.peer_online(event.device_id)

    # ------------------------------------------------------------ folders.json

    def _load(self) -> list[FolderConfig]:
        try:
            raw = self._file.read_bytes()
        except FileNotFoundError:
            return []
        try:
            return msgspec.json.decode(raw, type=list[FolderConfig])
        except msgspec.DecodeError as exc:
            log.error("%s is damaged (%s); no folder is synced until it is fixed", self._file, exc)
            raise UserError(f"{self._file} is damaged: {exc}", code="sync_config") from exc

    async def _save(self) -> None:
        configs = [folder.config for folder in self._folders.values()]
        data = msgspec.json.format(msgspec.json.encode(configs), indent=2)
        async with self._save_lock:
            await asyncio.to_thread(_write_atomically, self._file, data)

    # ------------------------------------------------------------ API

    def folders(self) -> list[FolderInfo]:
        return [folder.info() for folder in self._folders.values()]

    def offers(self) -> list[SyncOfferInfo]:
        return [offer.info for offer in self._offers.values() if not offer.answer.done()]

    def find(self, text: str) -> SyncFolder:
        """A folder by id, id prefix (4+ characters), label (any case) or path."""
        wanted = text.strip()
        lowered = wanted.lower()
        folders = list(self._folders.values())
        path = os.path.abspath(os.path.expanduser(wanted)) if wanted else ""
        for matches in (
            [f for f in folders if f.folder_id == lowered],
            [f for f in folders if f.label.lower() == lowered or str(f.root) == path],
            [f for f in folders if len(lowered) >= 4 and f.folder_id.startswith(lowered)],
        ):
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                named = ", ".join(f"{f.label} ({f.folder_id[:8]})" for f in matches)
                raise UserError(f"{text!r} matches several folders: {named}", code="ambiguous")
        raise UserError(
            f"no synced folder {text!r} (see meshagent sync list)", code="unknown_folder"
        )

    async def add(self, path: Path, peer_id: str, *, remote_name: str = "") -> FolderInfo:
        """Sync ``path`` with ``peer_id``: offer it, and on yes start syncing. Adding a peer to
        a folder synced already works the same way. UserError if declined or unreachable."""
        await self._wait_started()
        root = await asyncio.to_thread(_existing_folder, path)
        if peer_id == self._device_id:
            raise UserError("that is this device: sync a folder with another one", code="usage")
        existing = next((f for f in self._folders.values() if f.root == root), None)
        if existing is not None and peer_id in existing.peers:
            return existing.info()
        label = existing.label if existing else _label(root.name)
        name = _folder_name(remote_name or label)
        if remote_name and name != remote_name:
            raise UserError(
                f"--remote-dir {remote_name!r} is not a usable folder name", code="usage"
            )
        # Known before the offer goes out: the peer starts pulling as soon as it says yes.
        if existing is None:
            folder_id = secrets.token_hex(16)
            config = FolderConfig(folder_id=folder_id, label=label, path=str(root))
            await asyncio.to_thread(_claim, root, folder_id)
            folder = self._start(config)
        else:
            folder = existing
        folder.add_peer(peer_id)
        await self._save()
        try:
            answer = await self._offer(peer_id, folder.folder_id, folder.label, name)
            if not answer.accepted:
                why = f": {answer.reason}" if answer.reason else ""
                raise UserError(
                    f"{self._peer_name(peer_id)} declined to sync {folder.label}{why}",
                    code="declined",
                )
        except BaseException:
            if existing is None:
                await self._forget(folder, keep_marker=False)
            else:
                folder.remove_peer(peer_id)
                await self._save()
            raise
        if existing is None:
            self._bus.publish(SyncFolderAdded(folder.folder_id, folder.label, str(root)))
        return folder.info()

    async def pause(self, folder: str) -> FolderInfo:
        found = self.find(folder)
        found.pause()
        await self._save()
        return found.info()

    async def resume(self, folder: str) -> FolderInfo:
        found = self.find(folder)
        found.resume()
        await self._save()
        return found.info()

    async def remove(self, folder: str) -> None:
        """Stop syncing ``folder`` and forget it; its files stay where they are."""
        await self._forget(self.find(folder), keep_marker=False)

    async def answer_offer(self, offer_id: str, accept: bool, *, path: Path | None = None) -> None:
        """The user's answer to a :class:`SyncFolderOffered` that was not auto-accepted;
        ``path``: where the folder goes (default: a new folder in ``sync.dir``)."""
        offer = self._offers.get(offer_id)
        if offer is None or offer.answer.done():
            raise UserError(
                f"no sync offer {offer_id!r} is waiting (see meshagent sync offers)",
                code="unknown_offer",
            )
        if path is not None:
            path = await asyncio.to_thread(_folder_or_nothing, path)
        offer.answer.set_result((accept, path))

    async def _forget(self, folder: SyncFolder, *, keep_marker: bool) -> None:
        await self._stop(folder)
        await self._save()
        index = self._dir / f"{folder.folder_id}.sqlite"

        def clean() -> None:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{index}{suffix}")
            if not keep_marker:  # the folder may be synced again, as a new folder
                with contextlib.suppress(OSError):
                    (folder.root / MARKER).unlink()

        await asyncio.to_thread(clean)
        self._bus.publish(SyncFolderRemoved(folder.folder_id, folder.label))

    async def _wait_started(self) -> None:
        try:
            async with asyncio.timeout(10):
                await self._started.wait()
        except TimeoutError:
            raise UserError("folder sync is not running", code="not_ready") from None

    # ------------------------------------------------------------ offering

    async def _offer(self, peer_id: str, folder_id: str, label: str, name: str) -> SyncOfferAnswer:
        who = self._peer_name(peer_id)
        session = await self._peers.session(peer_id)
        grant = await self._client.capability(peer_id, SCOPE, folder_id)
        try:
            channel = await session.open_channel(
                StreamRole.SYNC, tokens=(grant.token,), resource=folder_id
            )
        except ChannelRefused as exc:
            raise UserError(f"{who} refused folder sync: {exc.message}", code="refused") from exc
        try:
            await channel.send(SyncOffer(folder_id, label, name))
            async with asyncio.timeout(OFFER_TIMEOUT):
                reply = await channel.receive()
        except TimeoutError:
            raise UserError(f"{who} did not answer the sync offer", code="no_answer") from None
        except (ChannelClosed, P2PError) as exc:
            raise UserError(
                f"the connection to {who} ended before it answered ({exc})", code="cut_off"
            ) from exc
        finally:
            channel.abort(ErrorCode.NO_ERROR, "done")
        if not isinstance(reply, SyncOfferAnswer):
            raise UserError(f"{who} answered the sync offer with nonsense", code="protocol")
        return reply

    # ------------------------------------------------------------ streams from peers

    async def _handle(self, channel: Channel) -> None:
        """A SYNC stream a peer opened: a setup offer, or a pull of one of our folders."""
        try:
            await self._dispatch(channel)
        except (ChannelClosed, P2PError, ConnectionError) as exc:
            log.debug("sync stream from %s ended: %s", channel.peer_id[:12], exc)
        except ProtocolError as exc:  # the stream is closed already, with the error's code
            log.warning("sync stream from %s broke the protocol: %s", channel.peer_id[:12], exc)

    async def _dispatch(self, channel: Channel) -> None:
        grant = channel.grant
        if (
            not isinstance(grant, Capability)
            or grant.scope != SCOPE
            or not channel.resource
            or grant.resource != channel.resource
        ):
            channel.abort(ErrorCode.NOT_ALLOWED, "a share:folder capability for this folder")
            return
        try:
            async with asyncio.timeout(FIRST_MESSAGE_TIMEOUT):
                first = await channel.receive()
        except TimeoutError:
            channel.abort(ErrorCode.CANCELLED, "nothing asked")
            return
        if isinstance(first, SyncOffer) and first.folder_id == channel.resource:
            await self._offered(channel, first)
        elif isinstance(first, Subscribe) and first.folder_id == channel.resource:
            await self._started.wait()
            folder = self._folders.get(first.folder_id)
            if folder is None or channel.peer_id not in folder.peers:
                log.info(
                    "refused a sync stream from %s: not a peer of that folder",
                    channel.peer_id[:12],
                )
                channel.abort(ErrorCode.NOT_ALLOWED, "not a peer of this folder")
                return
            if folder.config.paused:
                channel.abort(ErrorCode.GOING_AWAY, "paused")
                return
            # The peer pulls again (it resumed, restarted): our pull toward it may be backing
            # off after it went away; retry it now.
            folder.peer_online(channel.peer_id)
            await folder.serve(channel, first)
        else:
            channel.abort(
                ErrorCode.UNEXPECTED_MESSAGE, "a sync stream starts with an offer or a pull"
            )

    async def _offered(self, channel: Channel, offer: SyncOffer) -> None:
        peer_id = channel.peer_id
        await self._started.wait()
        existing = self._folders.get(offer.folder_id)
        if existing is not None:
            if peer_id not in existing.peers:  # a third device joins, through one of ours
                existing.add_peer(peer_id)
                await self._save()
            await channel.send(SyncOfferAnswer(True))
            return
        policy = self._auto_accept()
        own = policy in ("own", "") and await self._peer_user(peer_id) == self._own_user
        auto = policy == "all" or own or peer_id in self._always_accept()
        offer_id = secrets.token_hex(6)
        self._bus.publish(
            SyncFolderOffered(
                offer_id, offer.folder_id, peer_id, self._peer_name(peer_id), offer.label, auto
            )
        )
        accepted, path = auto, None
        if not auto and policy != "none":
            accepted, path = await self._ask(offer_id, offer, peer_id)
        if not accepted:
            await channel.send(SyncOfferAnswer(False, "declined"))
            return
        try:
            folder = await self._accept(offer, peer_id, path)
        except (UserError, OSError, RootMissing) as exc:
            why = exc.message if isinstance(exc, UserError) else str(exc)
            log.warning("could not accept the sync of %s: %s", offer.label, why)
            await channel.send(SyncOfferAnswer(False, f"cannot set it up there: {why}"[:200]))
            return
        await channel.send(SyncOfferAnswer(True))
        self._bus.publish(SyncFolderAdded(folder.folder_id, folder.label, str(folder.root)))

    async def _ask(self, offer_id: str, offer: SyncOffer, peer_id: str) -> tuple[bool, Path | None]:
        loop = asyncio.get_running_loop()
        pending = _Offer(
            SyncOfferInfo(
                offer_id=offer_id,
                folder_id=offer.folder_id,
                peer=peer_id,
                peer_name=self._peer_name(peer_id),
                label=offer.label,
                name=offer.name,
                expires_at=time.time() + ASK_TIMEOUT,
            ),
            loop.create_future(),
        )
        self._offers[offer_id] = pending
        try:
            async with asyncio.timeout(ASK_TIMEOUT):
                return await pending.answer
        except TimeoutError:
            return False, None
        finally:
            self._offers.pop(offer_id, None)

    async def _accept(self, offer: SyncOffer, peer_id: str, path: Path | None) -> SyncFolder:
        if path is None:
            root = self._sync_root()
            wanted = root / (_folder_name(offer.name) or f"folder-{offer.folder_id[:8]}")
            target = await asyncio.to_thread(_new_folder, root, wanted)
        else:
            target = path
            await asyncio.to_thread(target.mkdir, parents=True, exist_ok=True)
        if any(f.root == target for f in self._folders.values()):
            raise UserError(f"{target} is synced already, as another folder", code="in_use")
        await asyncio.to_thread(_claim, target, offer.folder_id)
        config = FolderConfig(
            folder_id=offer.folder_id,
            label=_label(offer.label),
            path=str(target),
            peers=[peer_id],
        )
        folder = self._start(config)
        await self._save()
        return folder


# ---------------------------------------------------------------- helpers


def _label(text: str) -> str:
    cleaned = "".join(ch for ch in text if ch.isprintable()).strip()
    return (cleaned or "folder")[:MAX_LABEL_LENGTH]


def _folder_name(text: str) -> str:
    """``text`` as one safe folder name ('' if it cannot be one): it comes from a peer."""
    name = unicodedata.normalize("NFC", text.strip())
    try:
        safe = safe_relative_path(name)
    except UnsafePath:
        return ""
    return name if len(safe.parts) == 1 and not name.startswith(".") else ""


def _existing_folder(path: Path) -> Path:
    """(Blocking) ``path`` made absolute; one clear UserError unless it is a folder."""
    root = Path(os.path.abspath(path.expanduser()))
    if not root.exists():
        raise UserError(f"{root}: no such folder", code="not_found")
    if not root.is_dir():
        raise UserError(f"{root} is a file: only folders can be synced", code="not_a_folder")
    return root


def _folder_or_nothing(path: Path) -> Path:
    """(Blocking) ``path`` made absolute; a folder there, or nothing yet (it will be made)."""
    target = Path(os.path.abspath(path.expanduser()))
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} is a file, not a folder", code="not_a_folder")
    return target


def _new_folder(root: Path, wanted: Path) -> Path:
    """(Blocking) Create a folder at ``wanted`` or, if taken, at the first free clash name."""
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        target = unique_destination(wanted)
        try:
            target.mkdir()
            return target
        except FileExistsError:
            continue
    raise UserError(f"cannot create a folder for {wanted.name} in {root}", code="name_clash")


def _claim(root: Path, folder_id: str) -> None:
    """(Blocking) Mark ``root`` as ``folder_id``'s (see scanner.ensure_marker)."""
    ensure_marker(root, folder_id)


def _write_atomically(path: Path, data: bytes) -> None:
    """(Blocking) Write ``data`` to ``path`` so that a crash leaves the old file or the new."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    with contextlib.suppress(OSError):
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
