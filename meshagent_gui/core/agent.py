"""The agent: composition of the core services behind one async API and one event stream.

``meshagent up`` and the tray app both run exactly this. Other ``meshagent`` commands reach it
through the local IPC endpoint; when none runs they use the same methods in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import platformdirs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from meshagent_gui import __version__
from meshagent_gui.build_info import is_newer
from meshagent_gui.config import Config, parse_rate
from meshagent_gui.context import Context
from meshagent_gui.errors import UserError

from .bus import EventBus
from .events import (
    AnnouncementReceived,
    InvitationReceived,
    NewerAgentAnnounced,
    PeerCameOnline,
    ServerConnected,
)
from .ipc import AgentLock, Handler, IpcServer, IpcStream, Route, StreamHandler, StreamRoute
from .ipc_types import (
    AnswerParams,
    AnswerReply,
    CancelParams,
    CancelReply,
    ClientParams,
    ConfigChangedParams,
    ConfigChangedReply,
    DeviceView,
    FolderInfo,
    NoParams,
    P2PStatus,
    PeerStatus,
    PingParams,
    PingReply,
    PingTry,
    SendParams,
    SendProgress,
    SendReply,
    SentItem,
    SocketBuffers,
    StatusReply,
    SyncAddParams,
    SyncAnswerParams,
    SyncFolderParams,
    SyncOfferInfo,
    TerminalOpenParams,
    TerminalShareParams,
    TerminalViewParams,
    TransferInfo,
    TransfersParams,
    pick_device,
)
from .mesh.client import Enrollment, MeshClient, MeshError
from .mesh.enroll import require_enrollment
from .mesh.link import MeshLink
from .mesh.types import GUEST_PLATFORM, WEBRTC_PLATFORMS, Device, PublicKey
from .notify.gotify import GotifyClient
from .notify.router import GotifySink, NotificationRouter, NotificationSink
from .p2p.endpoint import Endpoint
from .p2p.engine import ENGINE_ENV
from .p2p.errors import P2PError
from .p2p.peers import PeerManager
from .p2p.relay import RelayLink
from .protocol.captoken import (
    Capability,
    CapabilityVerifier,
    UnknownKey,
    public_key_from_jwk_x,
)
from .protocol.messages import BASE_REGISTRY
from .protocol.sync import SYNC_REGISTRY
from .protocol.terminal import TERMINAL_REGISTRY
from .protocol.transfer import TRANSFER_REGISTRY
from .protocol.tunnel import TUNNEL_REGISTRY, ConnectionBudget
from .share.links import LinkReady, share_link
from .share.service import TransferService
from .sync.service import SyncService
from .terminal.bridge import share_console, view_console
from .terminal.service import TerminalService
from .tunnel.bridge import tunnel_handlers, tunnel_streams
from .tunnel.exposure import Exposure, format_rules, parse_rules
from .tunnel.service import TunnelService

# A token naming an unknown key makes us refetch the server's keys, at most this often, so
# that garbage key ids cannot turn peers into a flood of requests to the server.
KEY_REFETCH_INTERVAL = 30.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrontEnd:
    """What a front end running the agent in its own process (the desktop app) plugs into it.

    Given at construction: a front end composes an :class:`Agent`, it does not subclass one, and
    it follows the agent through its public API and its event bus."""

    show: Callable[[], None] | None = None
    """Bring the front end's window forward; when set, the agent serves the ``show`` IPC request
    (a second launch of the app asks the running one to come to the front)."""
    notification_sinks: Sequence[NotificationSink] = ()
    """Where notifications go besides Gotify (the app's desktop toasts)."""


class Agent:
    def __init__(
        self, ctx: Context, enrollment: Enrollment, *, front_end: FrontEnd | None = None
    ) -> None:
        self.ctx = ctx
        self.enrollment = enrollment
        self.front_end = front_end or FrontEnd()
        self.bus = EventBus()
        self.client = MeshClient(enrollment.url, secrets=ctx.secrets, user=enrollment.user)
        self._names: dict[str, str] = {}
        self._known: list[Device] = []
        self.link = MeshLink(
            self.client,
            self.bus,
            reconnect_max=float(ctx.config["server.reconnect_max"]),
            device_name=lambda device_id: self._names.get(device_id, device_id[:12]),
        )
        self.started_at = time.time()
        # Front ends add theirs (desktop toasts); Gotify joins when it is configured.
        self.notification_sinks: list[NotificationSink] = list(self.front_end.notification_sinks)
        self.verifier = CapabilityVerifier(
            issuer=enrollment.server_id,
            device_id=enrollment.device_id,
            keys=_verifying_keys(enrollment.keys),
        )
        self._keys_fetched_at = float("-inf")
        config = ctx.config
        self.endpoint = Endpoint(
            ctx.identity,
            engine=os.environ.get(ENGINE_ENV) or str(config["p2p.engine"]),
            # late-bound: the peer manager is built next, around this endpoint
            authorize=lambda conn, first: self.peers.authorize(conn, first),  # noqa: PLW0108
        )
        self.peers = PeerManager(
            endpoint=self.endpoint,
            link=self.link,
            client=self.client,
            verifier=self.verifier,
            bus=self.bus,
            relay=RelayLink(
                self.client, self.endpoint, reconnect_max=float(config["server.reconnect_max"])
            ),
            refetch_keys=self._refetch_keys,
            direct_timeout=float(config["p2p.direct_timeout"]),
            upgrade_interval=float(config["p2p.upgrade_interval"]),
            registry=AGENT_REGISTRY,
        )
        self.transfers = TransferService(
            peers=self.peers,
            client=self.client,
            bus=self.bus,
            downloads=self.downloads_dir,
            data_dir=ctx.paths.data_dir,
            own_user=enrollment.user,
            peer_user=self._peer_user,
            peer_name=lambda device_id: self._names.get(device_id, device_id[:12]),
            auto_accept=lambda: str(config["transfer.auto_accept"]),
            always_accept=lambda: always_accepted(config),
            global_rate=lambda: parse_rate(str(config["transfer.rate_limit"])),
        )
        self.terminals = TerminalService(
            peers=self.peers,
            link=self.link,
            client=self.client,
            bus=self.bus,
            verify=self.verify_capability,
            own_user=enrollment.user,
            peer_user=self._peer_user,
            peer_name=lambda device_id: self._names.get(device_id, device_id[:12]),
            device_name=lambda: str(config["device.name"]) or "this device",
            allow_open=lambda: str(config["terminal.allow_open"]),
        )
        self.sync = self._build_sync(ctx, enrollment)
        self.tunnels = TunnelService(
            peers=self.peers,
            client=self.client,
            own_user=enrollment.user,
            rules=lambda: parse_rules(str(config["tunnel.expose"])),
            peer_name=self.name_of,
            link=self.link,
            bus=self.bus,
            save_rules=self._save_tunnel_rules,
            idle_timeout=lambda: float(config["tunnel.idle_timeout"]),
            budget=ConnectionBudget(per_peer=int(config["tunnel.max_connections"]), total=1024),
        )

    async def _save_tunnel_rules(self, rules: list[Exposure]) -> None:
        """The app stopped exposing a target: the setting `meshagent expose` edits, saved."""
        self.ctx.config.set("tunnel.expose", format_rules(rules))
        await asyncio.to_thread(self.ctx.config.save)

    def _build_sync(self, ctx: Context, enrollment: Enrollment) -> SyncService:
        config = ctx.config
        return SyncService(
            peers=self.peers,
            client=self.client,
            bus=self.bus,
            data_dir=ctx.paths.data_dir,
            device_id=enrollment.device_id,
            own_user=enrollment.user,
            peer_user=self._peer_user,
            peer_name=self.name_of,
            auto_accept=lambda: str(config["sync.auto_accept"]),
            always_accept=lambda: always_accepted(config),
            sync_root=self.sync_root,
            versions_days=lambda: float(config["sync.versions_days"]),
            rescan_interval=lambda: float(config["sync.rescan_interval"]),
            device_name=lambda: ctx.device_name,
        )

    def sync_root(self) -> Path:
        """Where folders accepted for sync land: ``sync.dir``, else <home>/sync, else ~/Mesh."""
        configured = str(self.ctx.config["sync.dir"])
        if configured:
            return Path(configured).expanduser()
        if self.ctx.paths.home is not None:
            return self.ctx.paths.home / "sync"
        return Path.home() / "Mesh"

    async def sync_add(self, path: str, device: str, *, remote_name: str = "") -> FolderInfo:
        """``meshagent sync DIR --with DEVICE``: offer the folder to the device, then sync it."""
        target = await self.resolve_device(device)
        return await self.sync.add(Path(path), target.id, remote_name=remote_name)

    @classmethod
    def from_context(cls, ctx: Context, *, front_end: FrontEnd | None = None) -> Agent:
        return cls(ctx, require_enrollment(ctx), front_end=front_end)

    # ------------------------------------------------------------ API (also served over IPC)

    async def devices(self) -> list[DeviceView]:
        try:
            devices = await self.client.devices()
        except MeshError as exc:
            if exc.code not in ("server_unreachable", "server_timeout") or not self._known:
                raise
            # The server is away: what we knew, with nobody online (we cannot tell).
            return [DeviceView.of(d, False) for d in self._known]
        self._known = devices
        self._names.update({d.id: d.name for d in devices})
        for device in devices:
            if device.platform in WEBRTC_PLATFORMS:  # a browser: no QUIC endpoint to dial
                self.peers.use_webrtc(device.id)
        if self.link.state == "online":
            return [DeviceView.of(d, d.id in self.link.online) for d in devices]
        return [DeviceView.of(d, d.online) for d in devices]

    def downloads_dir(self) -> Path:
        configured = str(self.ctx.config["downloads.dir"])
        if configured:
            folder = Path(configured).expanduser()
        elif self.ctx.paths.home is not None:
            folder = self.ctx.paths.home / "downloads"
        else:
            folder = Path(platformdirs.user_downloads_dir())
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def name_of(self, device_id: str) -> str:
        """A device's name as its owner gave it (the short id until the device list is in)."""
        return self._names.get(device_id, device_id[:12])

    async def _peer_user(self, device_id: str) -> str | None:
        for device in self._known or await self.client.devices():
            if device.id == device_id:
                return device.user
        return None

    async def send(
        self,
        paths: list[str],
        device: str,
        *,
        rate: str = "",
        wait: bool = False,
        link: bool = False,
        link_ttl: int | None = None,
    ) -> AsyncIterator[SendProgress | SendReply]:
        """Send files and folders; yields progress, then the reply (the items sent).

        ``link``: to no device but whoever opens a one-time share link (core/share/links.py);
        the link's URL comes first, as progress, until someone opens it."""
        if link:
            guest = ""
            async for step in share_link(self.client, self.bus, [Path(p) for p in paths], link_ttl):
                if isinstance(step, LinkReady):
                    yield SendProgress(
                        transfer_id="",
                        done=0,
                        total=0,
                        rate=0.0,
                        eta=None,
                        link_url=step.url,
                        link_expires_at=step.expires_at,
                    )
                else:
                    guest = step.guest
                    # Before the send starts: the app's row follows this peer's events.
                    yield SendProgress(
                        transfer_id="", done=0, total=0, rate=0.0, eta=None, link_guest=guest
                    )
            self.peers.use_webrtc(guest)
            self._names[guest] = "the link's recipient"
            target = DeviceView(guest, self._names[guest], "", GUEST_PLATFORM, True, None, "none")
            wait = True  # the guest's page comes online just after its claim
        else:
            target = await self.resolve_device(device)
        queue: asyncio.Queue[SendProgress] = asyncio.Queue()
        task = asyncio.create_task(
            self.transfers.send(
                [Path(p) for p in paths],
                target.id,
                rate=parse_rate(rate),
                wait=wait,
                folders_as_zip=target.platform in WEBRTC_PLATFORMS,
                on_progress=queue.put_nowait,
            )
        )
        getter: asyncio.Future[SendProgress] | None = None
        try:
            while not task.done():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            items = task.result()
        finally:
            task.cancel()
            if getter is not None:
                # Cancelled mid-wait (the caller hung up): the reader ends with us, or the
                # garbage collector finds it pending ("Task was destroyed but it is pending").
                getter.cancel()
        yield SendReply(device=target.name, items=[SentItem(**vars(item)) for item in items])

    async def resolve_device(self, text: str) -> DeviceView:
        """A device by name (any case), full id, id prefix or short id; one clear error else."""
        return pick_device(await self.devices(), text)

    async def ping(self, device: str, count: int = 4, interval: float = 1.0) -> PingReply:
        """Connect to a device (direct, else relay) and measure round trips over QUIC."""
        target = await self.resolve_device(device)
        started = time.monotonic()
        session = await self.peers.session(target.id)
        setup = time.monotonic() - started
        tries: list[PingTry] = []
        for attempt in range(count):
            if attempt:
                await asyncio.sleep(interval)
            path = self.peers.path_of(session)
            try:
                rtt = await session.connection.ping(timeout=5.0)
            except (TimeoutError, P2PError) as exc:
                tries.append(PingTry(seq=attempt + 1, path=path.kind, error=str(exc) or "timeout"))
                continue
            tries.append(
                PingTry(
                    seq=attempt + 1,
                    path=path.kind,
                    local=path.local,
                    remote=path.remote,
                    rtt_ms=round(rtt * 1000, 3),
                )
            )
            session = self.peers.sessions().get(target.id, session)  # it may have upgraded
        return PingReply(
            device=target.name, device_id=target.id, setup_ms=setup * 1000, tries=tries
        )

    def p2p_status(self) -> P2PStatus:
        buffers = self.endpoint.socket_buffers
        peers = []
        for peer_id, session in self.peers.sessions().items():
            stats = session.connection.stats()
            path = self.peers.path_of(session)
            peers.append(
                PeerStatus(
                    device_id=peer_id,
                    name=self._names.get(peer_id, peer_id[:12]),
                    path=path.kind,
                    remote=path.remote,
                    rtt_ms=None if stats.smoothed_rtt is None else stats.smoothed_rtt * 1000,
                    bytes_sent=stats.bytes_sent,
                    bytes_received=stats.bytes_received,
                    datagrams_sent=stats.datagrams_sent,
                    datagrams_received=stats.datagrams_received,
                )
            )
        return P2PStatus(
            engine=self.endpoint.engine_name,
            io=self.endpoint.io_name,
            local="{}:{}".format(*self.endpoint.local_address[:2]),
            buffers=SocketBuffers(
                requested=buffers.requested,
                receive=buffers.receive_usable,
                send=buffers.send_usable,
                forced=buffers.receive_forced,
            ),
            relay=self.peers.relay.state,
            nat=self.peers.nat,
            peers=peers,
        )

    async def status(self) -> StatusReply:
        return StatusReply(
            p2p=self.p2p_status(),
            device_id=self.enrollment.device_id,
            device_name=self.ctx.device_name,
            user=self.enrollment.user,
            server=self.enrollment.url,
            link=self.link.state,
            session_id=self.link.session_id,
            clock_skew=self.link.clock_skew,
            last_error=self.link.last_error,
            connects=self.link.connects,
            online_peers=sorted(self.link.online),
            uptime=time.time() - self.started_at,
        )

    async def request_capability(self, target: str, scope: str, resource: str = "") -> str:
        """A capability token from the server for `scope` on `target` (the peer verifies it)."""
        return (await self.client.capability(target, scope, resource)).token

    async def verify_capability(
        self,
        token: str,
        *,
        peer_id: str,
        scope: str,
        resource: str | None = None,
        rooms: Collection[str] | None = None,
    ) -> Capability:
        """Check a peer's token offline; an unknown key id refetches the server's keys once."""

        def verify() -> Capability:
            return self.verifier.verify(
                token, now=time.time(), peer_id=peer_id, scope=scope, resource=resource, rooms=rooms
            )

        try:
            return verify()
        except UnknownKey:
            if time.monotonic() - self._keys_fetched_at < KEY_REFETCH_INTERVAL:
                raise
        await self._refetch_keys()
        return verify()

    async def _refetch_keys(self) -> None:
        self._keys_fetched_at = time.monotonic()
        keys = await self.client.keys()
        self.verifier.set_keys(_verifying_keys(keys))
        self.enrollment.keys = keys
        await asyncio.to_thread(self.enrollment.save, self.ctx.paths.data_dir)
        log.info("refetched the server's signing keys (%d)", len(keys))

    def ipc_handlers(self) -> dict[str, Handler]:
        """The IPC methods; each one's params arrive decoded into its type (core/ipc_types)."""

        async def devices(_: NoParams) -> list[DeviceView]:
            return await self.devices()

        async def status(_: NoParams) -> StatusReply:
            return await self.status()

        async def ping(params: PingParams) -> PingReply:
            return await self.ping(params.device, params.count)

        def send(params: SendParams) -> AsyncIterator[SendProgress | SendReply]:
            return self.send(
                params.paths,
                params.device,
                rate=params.rate or "",
                wait=params.wait,
                link=params.link,
                link_ttl=params.link_ttl,
            )

        async def transfers(params: TransfersParams) -> list[TransferInfo]:
            running = self.transfers.listing()
            if not params.all:
                return running
            return [*await asyncio.to_thread(self.transfers.history.records), *running]

        async def answer(params: AnswerParams) -> AnswerReply:
            folder = Path(params.to) if params.to else None  # the command made it absolute
            if folder is not None and not folder.is_absolute():
                raise UserError(f"--to needs an absolute folder, not {params.to!r}", code="usage")
            offer = await self.transfers.answer_offer(params.transfer_id, params.accept, folder)
            where = str(folder or self.downloads_dir()) if params.accept else ""
            return AnswerReply(transfer_id=offer.transfer_id, accepted=params.accept, to=where)

        async def cancel(params: CancelParams) -> CancelReply:
            await self.transfers.cancel(params.transfer_id)
            return CancelReply(cancelled=params.transfer_id)

        async def config_changed(params: ConfigChangedParams) -> ConfigChangedReply:
            # `meshagent config set` saved the file: take it in, say if this key needs a restart.
            await asyncio.to_thread(reload_settings, self.ctx.config)
            if params.key == "tunnel.expose":
                await self.tunnels.announce_exposed()  # the rooms learn what is reachable now
            return ConfigChangedReply(live=applies_live(params.key))

        async def client(params: ClientParams) -> Any:
            # `meshagent rooms ...`: through our client, so one process uses the refresh token
            return await self.client.call(params.method, dict(params.args))

        return {
            **self._sync_handlers(),
            **tunnel_handlers(self.tunnels),
            "devices": Route(NoParams, devices),
            "status": Route(NoParams, status),
            "ping": Route(PingParams, ping),
            "send": Route(SendParams, send),
            "transfers": Route(TransfersParams, transfers),
            "answer": Route(AnswerParams, answer),
            "cancel": Route(CancelParams, cancel),
            "config_changed": Route(ConfigChangedParams, config_changed),
            "client": Route(ClientParams, client),
            **self._front_end_handlers(),
        }

    def _sync_handlers(self) -> dict[str, Handler]:
        """``meshagent sync ...``: folder sync lives in the running agent only."""
        sync = self.sync

        async def add(params: SyncAddParams) -> FolderInfo:
            return await self.sync_add(params.path, params.device, remote_name=params.remote_name)

        async def folders(_: NoParams) -> list[FolderInfo]:
            return sync.folders()

        async def pause(params: SyncFolderParams) -> FolderInfo:
            return await sync.pause(params.folder)

        async def resume(params: SyncFolderParams) -> FolderInfo:
            return await sync.resume(params.folder)

        async def remove(params: SyncFolderParams) -> dict[str, str]:
            folder = sync.find(params.folder)
            await sync.remove(folder.folder_id)
            return {"removed": folder.folder_id, "label": folder.label, "path": str(folder.root)}

        async def offers(_: NoParams) -> list[SyncOfferInfo]:
            return sync.offers()

        async def answer(params: SyncAnswerParams) -> dict[str, bool]:
            path = Path(params.path) if params.path else None
            await sync.answer_offer(params.offer_id, params.accept, path=path)
            return {"accepted": params.accept}

        return {
            "sync.add": Route(SyncAddParams, add),
            "sync.list": Route(NoParams, folders),
            "sync.pause": Route(SyncFolderParams, pause),
            "sync.resume": Route(SyncFolderParams, resume),
            "sync.remove": Route(SyncFolderParams, remove),
            "sync.offers": Route(NoParams, offers),
            "sync.answer": Route(SyncAnswerParams, answer),
        }

    def ipc_streams(self) -> dict[str, StreamHandler]:
        """Attached requests: consoles of ``meshagent terminal share|view``."""

        async def resolve(text: str) -> tuple[str, str]:
            device = await self.resolve_device(text)
            return device.id, device.name

        async def share(params: TerminalShareParams, stream: IpcStream) -> None:
            await share_console(self.terminals, params, stream)

        async def view(params: TerminalViewParams, stream: IpcStream) -> None:
            await view_console(self.terminals, resolve, params, stream)

        async def open_shell(params: TerminalOpenParams, stream: IpcStream) -> None:
            view = TerminalViewParams(device=params.device, control=True, size=params.size)
            await view_console(self.terminals, resolve, view, stream, opening=True)

        return {
            "terminal.share": StreamRoute(TerminalShareParams, share),
            "terminal.view": StreamRoute(TerminalViewParams, view),
            "terminal.open": StreamRoute(TerminalOpenParams, open_shell),
            **tunnel_streams(self.tunnels, resolve),
        }

    # ------------------------------------------------------------ running

    async def run(self, *, on_ready: Callable[[], Awaitable[None] | None] | None = None) -> None:
        """Run until cancelled: server link, IPC endpoint and the event consumers."""
        lock = AgentLock(self.ctx.paths.lock_file)
        lock.acquire()
        ipc = IpcServer(self.ctx.paths.ipc_path, self.ipc_handlers(), self.ipc_streams())
        gotify = self._gotify_client()
        sinks = [*self.notification_sinks, *([GotifySink(gotify)] if gotify else [])]
        router = NotificationRouter(self.ctx.config, sinks, device_name=self.name_of)
        try:
            await ipc.start()
            await self._start_endpoint()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.link.run(), name="mesh-link")
                tasks.create_task(self.peers.run(), name="p2p")
                tasks.create_task(self._follow_events(), name="agent-events")
                tasks.create_task(self.terminals.run(), name="terminal-announcements")
                tasks.create_task(self.tunnels.run(), name="tunnel-announcements")
                tasks.create_task(self.sync.run(), name="sync")
                tasks.create_task(self._notify(router), name="agent-notify")
                tasks.create_task(self._tidy_partials(), name="tidy-partials")
                if on_ready is not None:
                    result = on_ready()
                    if result is not None:
                        await result
        finally:
            await ipc.close()
            await self.peers.aclose()
            await self.endpoint.close()
            self.transfers.close()
            await self.client.aclose()
            if gotify is not None:
                await gotify.aclose()
            lock.release()

    async def _tidy_partials(self) -> None:
        """Partial files of receives abandoned for ``transfer.partial_days``: removed once, at
        start (a receive resumed meanwhile keeps its own: it touched them)."""
        days = float(self.ctx.config["transfer.partial_days"])
        if days > 0:
            try:
                folder = await asyncio.to_thread(self.downloads_dir)
            except OSError as exc:
                log.warning("no downloads folder to tidy: %s", exc)
                return
            await self.transfers.remove_stale_partials(folder, days * 86400)

    def _front_end_handlers(self) -> dict[str, Handler]:
        """The IPC requests the front end answers (``show``), when it has them."""
        show = self.front_end.show
        if show is None:
            return {}

        async def shown(_: NoParams) -> dict[str, bool]:
            show()
            return {"shown": True}

        return {"show": Route(NoParams, shown)}

    async def _start_endpoint(self) -> None:
        port = int(self.ctx.config["p2p.port"])
        try:
            await self.endpoint.start("0.0.0.0", port)
        except OSError as exc:
            raise UserError(
                f"cannot open UDP port {port} for peer connections: {exc.strerror or exc}"
                " (meshagent config set p2p.port N)",
                code="p2p_port",
            ) from exc

    def _gotify_client(self) -> GotifyClient | None:
        url = str(self.ctx.config["gotify.url"])
        token = self.ctx.secrets.get("gotify.token")
        if not url or not token:
            return None
        try:
            return GotifyClient(url, token)
        except UserError as exc:
            log.warning("Gotify notifications are off: %s", exc.message)
            return None

    async def _notify(self, router: NotificationRouter) -> None:
        with self.bus.subscribed() as events:
            async for event in events:
                await router.handle(event)

    async def _follow_events(self) -> None:
        told: str | None = None  # the newer release the user was told of (once per version)
        with self.bus.subscribed() as events:
            async for event in events:
                if isinstance(event, ServerConnected):
                    told = await self._tell_of_newer_agent(told)
                if isinstance(event, AnnouncementReceived) and event.kind == "room.invited":
                    self._invited(event.data)
                # Names come from REST: refresh when a stranger appears or rooms change.
                stranger = isinstance(event, PeerCameOnline) and event.device_id not in self._names
                moved = isinstance(event, AnnouncementReceived) and event.kind.startswith("room.")
                if stranger or moved:
                    with contextlib.suppress(UserError):
                        await self.devices()

    async def _tell_of_newer_agent(self, told: str | None) -> str | None:
        """Log and publish it when the server announces a release newer than this agent."""
        with contextlib.suppress(MeshError):
            announced = (await self.client.info()).agent_version
            if announced is not None and announced != told and is_newer(announced):
                log.warning(
                    "Mesh Agent %s is available (this is %s): install it to update",
                    announced[:64],
                    __version__,
                )
                self.bus.publish(NewerAgentAnnounced(announced[:64], __version__))
                return announced
        return told

    def _invited(self, data: dict[str, Any]) -> None:
        room, role, by = (str(data.get(k) or "")[:64] for k in ("room", "role", "invited_by"))
        if not room:
            return
        log.info("%s invites you to room %s as %s", by or "someone", room, role or "member")
        self.bus.publish(InvitationReceived(room, role or "member", by))


AGENT_REGISTRY = TRANSFER_REGISTRY.extended(
    spec
    for registry in (TERMINAL_REGISTRY, SYNC_REGISTRY, TUNNEL_REGISTRY)
    for spec in registry.specs
    if spec.code not in BASE_REGISTRY.codes
)
"""Every message an agent speaks on its peer streams: transfers, terminals, folder sync, tunnels."""


LIVE_SETTINGS: Final = frozenset(
    {
        "transfer.rate_limit",
        "transfer.auto_accept",
        "transfer.always_accept",
        "downloads.dir",
        "tunnel.expose",
        "tunnel.idle_timeout",
        "terminal.allow_open",
    }
)
"""Settings a running agent reads each time it uses them (through its one Config object), so a
change reaches it at once; ``notify.*`` too. The others are read once, at start."""


def applies_live(name: str) -> bool:
    """Whether a running agent applies a new value of ``name`` without a restart."""
    return name in LIVE_SETTINGS or name.startswith("notify.")


def reload_settings(config: Config) -> None:
    """(Blocking) take in what was saved to ``config``'s file since it was loaded, in place:
    the services hold this object and read a live setting when they use it."""
    fresh = Config.load(config.path)
    for name in list(config):
        if config.is_set(name) and not fresh.is_set(name):
            config.unset(name)
    for name in fresh:
        if fresh.is_set(name):
            config.set(name, fresh[name])


def always_accepted(config: Config) -> frozenset[str]:
    """Devices whose offers are accepted without asking (``transfer.always_accept``)."""
    text = str(config["transfer.always_accept"])
    return frozenset(part.strip() for part in text.split(",") if part.strip())


def allow_always(config: Config, device_id: str) -> None:
    """Add ``device_id`` to ``transfer.always_accept`` and save the config."""
    config.set("transfer.always_accept", ",".join(sorted(always_accepted(config) | {device_id})))
    config.save()


def _verifying_keys(keys: list[PublicKey]) -> dict[str, Ed25519PublicKey]:
    return {key.kid: public_key_from_jwk_x(key.x) for key in keys}
