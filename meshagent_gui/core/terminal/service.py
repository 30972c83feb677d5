"""Terminal share over the mesh: the host's sessions and the viewer's client.

Host: :meth:`TerminalService.share` spawns the command on a PTY around a
:class:`~meshagent_gui.core.terminal.host.TerminalHost`; :meth:`SharedTerminal.run` announces the
session into the rooms the user chose (default: their personal room, i.e. their own devices; a
standing ``terminal.session`` announcement, withdrawn at the end) and serves every TERMINAL
stream a peer opens for it with a ``terminal:view`` or ``terminal:control`` capability granted
in one of those rooms: a role held in another room (say, one the peer owns and added us to)
opens nothing here.

Control is decided in two places. The **server** decides who *may* control: a viewer asks it
for a ``terminal:control`` capability (the room's ACL; a ``viewer`` role gets 403) and sends
that token in its ControlRequest. The **host** decides who *does*: its policy (automatic for
the sharing user's own devices with ``allow_control``) or its user (a console y/n, a GUI
prompt), and it alone serialises grants, so there is exactly one controller even when the
server is unreachable. A token is checked when the stream opens and when control is asked for;
a session outlives its tokens. Every change of controller is reported to the server (its audit
and the rooms' ``terminal.control`` event), in order, from a task of its own: the PTY never
waits for the server.

Viewer: :meth:`TerminalService.view` opens the stream, with a capability asked for in a room
the announcement came through; :meth:`TerminalView.events` yields the viewer events of
:mod:`~meshagent_gui.core.protocol.terminal` with output already filtered (no terminal query
answers, no clipboard writes), and resumes from its offset after a dropped connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

import msgspec

from meshagent_gui.core.bus import EventBus
from meshagent_gui.core.events import AnnouncementReceived, ControlRequested
from meshagent_gui.core.mesh.announced import PeerAnnouncements
from meshagent_gui.core.mesh.client import MeshClient, MeshError
from meshagent_gui.core.mesh.link import MeshLink
from meshagent_gui.core.mesh.types import CapabilityGrant, personal_room
from meshagent_gui.core.p2p.errors import P2PError
from meshagent_gui.core.p2p.peers import PeerManager, Service
from meshagent_gui.core.p2p.session import Channel, ChannelClosed
from meshagent_gui.core.protocol.captoken import Capability, TokenError, check_room
from meshagent_gui.core.protocol.errors import ErrorCode, ProtocolError
from meshagent_gui.core.protocol.messages import StreamRole
from meshagent_gui.core.protocol.terminal import (
    ControlRelease,
    ControlRequest,
    Join,
    OutputReceived,
    Resize,
    ScreenReplaced,
    SessionEnded,
    ViewerEvent,
    ViewerStream,
    check_size,
    input_parts,
)
from meshagent_gui.core.terminal.host import (
    AsciicastRecorder,
    HostControlChanged,
    HostEvent,
    TerminalHost,
    TooManyViewers,
    Viewer,
)
from meshagent_gui.core.terminal.pty import ExitStatus, Pty
from meshagent_gui.core.terminal.sanitize import OutputSanitizer
from meshagent_gui.core.terminal.spawn import spawn_pty
from meshagent_gui.errors import UserError

log = logging.getLogger(__name__)

VIEW_SCOPE: Final = "terminal:view"
CONTROL_SCOPE: Final = "terminal:control"
OPEN_SCOPE: Final = "terminal:open"
"""``terminal open``: a new shell on one of the caller's own devices (no room role grants it)."""
OPENED_GRACE: Final = 30.0
"""An opened shell outlives its last viewer this long (a viewer reconnecting after a path
change finds it), then it is hung up."""
ANNOUNCE_KIND: Final = "terminal.session"
JOIN_TIMEOUT: Final = 10.0
CONSENT_TIMEOUT: Final = 60.0
RECONNECT_WINDOW: Final = 30.0
"""How long a viewer keeps trying to get back to a session after its connection dropped."""
DISCOVERY_WAIT: Final = 2.0
"""After connecting, how long the server may take to replay the room's announcements."""
REPORT_TIMEOUT: Final = 5.0
"""How long one control report to the server may take before it is given up (and logged)."""
REPORT_BACKLOG: Final = 64
"""Control reports waiting for the server; in a flood the oldest go, the newest is told."""


class SessionAnnouncement(msgspec.Struct, frozen=True, kw_only=True):
    """The body of a shared session's standing announcement (``ANNOUNCE_KIND``), as sent.

    Read back leniently by :func:`_read_announcement`: a peer of another version may
    send less, and what it sends is checked there field by field."""

    session_id: str
    title: str
    cols: int
    rows: int
    allow_control: bool
    started_at: float


@dataclass(frozen=True)
class AnnouncedSession:
    """A terminal session a peer shares (from its standing announcement)."""

    device_id: str
    session_id: str
    title: str
    cols: int
    rows: int
    allow_control: bool
    started_at: float
    rooms: tuple[str, ...] = ()
    """The announcement's rooms that we are in: capabilities are asked for in these."""


@dataclass(frozen=True)
class ControlAsk:
    """A viewer asks the host's user for control."""

    session_id: str
    device_id: str
    device_name: str


Consent = Callable[[ControlAsk], Awaitable[bool]]
Verify = Callable[..., Awaitable[Capability]]
PeerUser = Callable[[str], Awaitable[str | None]]


class SharedTerminal:
    """One shared PTY: run it with :meth:`run`; the front end sets the callbacks first."""

    def __init__(
        self,
        service: TerminalService,
        session_id: str,
        title: str,
        pty: Pty,
        *,
        allow_control: bool,
        recorder: AsciicastRecorder | None,
        rooms: tuple[str, ...],
    ) -> None:
        self.service = service
        self.session_id = session_id
        self.title = title
        self.allow_control = allow_control
        self.rooms = rooms
        """Where it is announced; only a capability granted in one of these opens it."""
        self.started_at = time.time()
        self.console_output: Callable[[bytes], None] | None = None
        """The sharing user's own console (bytes as they come from the PTY)."""
        self.consent: Consent | None = None
        """Asks the sharing user about a control request; None: only the policy decides."""
        self.on_event: Callable[[HostEvent], None] | None = None
        self.host = TerminalHost(
            pty,
            auto_grant=False,
            recorder=recorder,
            console_output=self._to_console,
            on_event=self._event,
        )
        self._asking = asyncio.Lock()  # one prompt at a time: the user answers them in turn
        self._devices: dict[str, str] = {}  # party -> device id, of the viewers attached now
        # Controllers (device ids, None: the host) for the server, in order.
        self._reports: deque[str | None] = deque(maxlen=REPORT_BACKLOG)
        self._reports_waiting = asyncio.Event()
        self._reported: str | None = None
        self._ended = False
        self.hang_up_when_abandoned = False
        """A shell opened by ``terminal open``: hung up OPENED_GRACE after its last viewer left
        (whichever stream that was: the opener's, or a reconnect's)."""

    async def run(self) -> ExitStatus:
        """Announce the session and share it until the command exits (or cancellation)."""
        self.service._shared[self.session_id] = self
        # Not awaited: it finishes its backlog (bounded by REPORT_TIMEOUT each) after we end.
        self.service._spawn(self._report_controls(), "terminal-control-reports")
        try:
            with contextlib.suppress(MeshError):
                await self.service._link.announce(
                    ANNOUNCE_KIND,
                    msgspec.to_builtins(self.describe()),
                    key=self._key,
                    rooms=list(self.rooms),
                )  # offline: the link sends it when it connects (standing announcement)
            return await self.host.run()
        finally:
            self.service._shared.pop(self.session_id, None)
            if self._reported is not None:
                self._report(None)  # nobody controls a session that has ended
            self._ended = True
            self._reports_waiting.set()
            with contextlib.suppress(MeshError):
                await self.service._link.withdraw(self._key)

    def describe(self) -> SessionAnnouncement:
        cols, rows = self.host.size
        return SessionAnnouncement(
            session_id=self.session_id,
            title=self.title,
            cols=cols,
            rows=rows,
            allow_control=self.allow_control,
            started_at=self.started_at,
        )

    def stop(self) -> None:
        """End the session: hang up the command; :meth:`run` then returns."""
        self.host.close()

    def revoke_control(self) -> None:
        self.host.revoke_control()

    @property
    def _key(self) -> str:
        return f"{ANNOUNCE_KIND}:{self.session_id}"

    def _to_console(self, data: bytes) -> None:
        if self.console_output is not None:
            self.console_output(data)

    def _event(self, event: HostEvent) -> None:
        if isinstance(event, HostControlChanged):
            self._report(None if event.controller is None else self._devices.get(event.controller))
        if self.on_event is not None:
            self.on_event(event)

    def _report(self, controller: str | None) -> None:
        if len(self._reports) == self._reports.maxlen:
            log.warning("control of %s changes faster than the server hears it", self.session_id)
        self._reports.append(controller)
        self._reported = controller
        self._reports_waiting.set()

    async def _report_controls(self) -> None:
        """Tell the server each change of controller, in order, until the session has ended
        and every change is told."""
        while self._reports or not self._ended:
            if not self._reports:
                self._reports_waiting.clear()
                await self._reports_waiting.wait()
                continue
            controller = self._reports.popleft()
            try:
                async with asyncio.timeout(REPORT_TIMEOUT):
                    await self.service._client.report_terminal_control(
                        self.session_id, controller, list(self.rooms)
                    )
            except (MeshError, TimeoutError) as exc:
                log.info("the server did not hear who controls %s: %s", self.session_id, exc)

    def _party(self, name: str) -> str:
        """A name everyone can read in "X is in control": the device's, made unique among the
        viewers attached now (a viewer that reconnects gets its plain name back)."""
        taken = {viewer.party for viewer in self.host.viewers}
        party, number = name, 1
        while party in taken:
            number += 1
            party = f"{name} ({number})"
        return party

    # ------------------------------------------------------------ one viewer's stream

    async def serve(self, channel: Channel, grant: Capability) -> None:
        try:
            await self._serve_viewer(channel, grant)
        finally:
            if self.hang_up_when_abandoned and not self.host.viewers:
                name = f"terminal-abandoned-{self.session_id}"
                self.service._spawn(self._hang_up_if_abandoned(), name)

    async def _hang_up_if_abandoned(self) -> None:
        await asyncio.sleep(OPENED_GRACE)
        if not self.host.viewers and not self._ended:
            self.stop()

    async def _serve_viewer(self, channel: Channel, grant: Capability) -> None:
        try:
            async with asyncio.timeout(JOIN_TIMEOUT):
                join = await channel.receive()
        except TimeoutError:
            channel.abort(ErrorCode.HANDSHAKE_TIMEOUT, "no Join")
            return
        if not isinstance(join, Join):
            channel.abort(ErrorCode.UNEXPECTED_MESSAGE, "the stream must start with Join")
            return
        name = self.service._peer_name(channel.peer_id)
        try:
            viewer = self.host.attach(
                self._party(name),
                can_control=grant.scope in (CONTROL_SCOPE, OPEN_SCOPE),
                from_offset=join.from_offset,
                cols=join.cols,
                rows=join.rows,
            )
        except TooManyViewers as exc:
            channel.abort(ErrorCode.REFUSED, f"too many viewers ({exc})")
            return
        self._devices[viewer.party] = channel.peer_id
        try:
            async with asyncio.TaskGroup() as tasks:
                pump = tasks.create_task(self._pump(viewer, channel), name="terminal-pump")
                reader = tasks.create_task(self._read(viewer, channel), name="terminal-read")
                await pump  # after Ended: the viewer has everything
                reader.cancel()
        except* ChannelClosed as group:
            log.info("viewer %s left: %s", viewer.party, group.exceptions[0])
        except* ProtocolError as group:
            error = group.exceptions[0]
            assert isinstance(error, ProtocolError)
            log.warning("viewer %s broke the protocol: %s", viewer.party, error)
            channel.abort(error.code, str(error))
        finally:
            self.host.detach(viewer)
            self._devices.pop(viewer.party, None)

    async def _pump(self, viewer: Viewer, channel: Channel) -> None:
        async for message in viewer:
            await channel.send(message)
        await channel.close()

    async def _read(self, viewer: Viewer, channel: Channel) -> None:
        while True:
            message = await channel.receive()
            if isinstance(message, ControlRequest):
                await self._control_requested(viewer, channel, message)
            else:
                self.host.receive(viewer, message)

    async def _control_requested(
        self, viewer: Viewer, channel: Channel, request: ControlRequest
    ) -> None:
        peer = channel.peer_id
        if request.token and not viewer.can_control:
            try:
                await self.service._verify(
                    request.token,
                    peer_id=peer,
                    scope=CONTROL_SCOPE,
                    resource=self.session_id,
                    rooms=self.rooms,
                )
                self.host.allow_control(viewer)
            except TokenError as exc:
                self.host.deny_control(viewer, f"the control capability was refused: {exc}")
                return
        if not viewer.can_control:
            self.host.deny_control(viewer, "no terminal:control capability")
            return
        name = self.service._peer_name(peer)
        self.service._bus.publish(ControlRequested(self.session_id, peer, name))
        own = await self.service._peer_user(peer) == self.service._own_user
        if self.allow_control and own:
            self.host.request_control(viewer)  # first come: a second asker is told who won
            return
        if self.consent is None:
            self.host.deny_control(viewer, "the host does not hand out control")
            return
        async with self._asking:
            if viewer.closed or self.host.controller == viewer.party:
                return
            try:
                async with asyncio.timeout(CONSENT_TIMEOUT):
                    allowed = await self.consent(ControlAsk(self.session_id, peer, name))
            except TimeoutError:
                allowed = False
            if viewer.closed:
                return
            if allowed:
                self.host.grant_control(viewer)  # demotes whoever had it
            else:
                self.host.deny_control(viewer, "the host declined")


def _read_announcement(event: AnnouncementReceived, sender: str) -> AnnouncedSession | None:
    """A peer's session announcement, read leniently (a peer of another version may add or
    omit fields); None if it is malformed."""
    data = event.data
    session_id = data.get("session_id")
    if not isinstance(session_id, str) or not session_id:
        return None
    try:
        return AnnouncedSession(
            sender,
            session_id,
            str(data.get("title", ""))[:200],
            int(data.get("cols", 80)),
            int(data.get("rows", 24)),
            bool(data.get("allow_control", False)),
            float(data.get("started_at", time.time())),
            event.rooms,
        )
    except (TypeError, ValueError):
        log.info("ignored a malformed terminal announcement from %s", sender[:12])
        return None


class TerminalService:
    """The agent's terminal sessions (hosted here) and the peers' (announced to us)."""

    def __init__(
        self,
        *,
        peers: PeerManager,
        link: MeshLink,
        client: MeshClient,
        bus: EventBus,
        verify: Verify,
        own_user: str,
        peer_user: PeerUser,
        peer_name: Callable[[str], str],
        device_name: Callable[[], str],
        allow_open: Callable[[], str] = lambda: "off",
    ) -> None:
        self._peers = peers
        self._allow_open = allow_open
        self._link = link
        self._client = client
        self._bus = bus
        self._verify = verify
        self._own_user = own_user
        self._peer_user = peer_user
        self._peer_name = peer_name
        self._device_name = device_name
        self._shared: dict[str, SharedTerminal] = {}
        self._announced = PeerAnnouncements(ANNOUNCE_KIND, "session_id", _read_announcement)
        self._announcements_changed = asyncio.Event()
        self._background: set[asyncio.Task[object]] = set()
        peers.register(
            Service(StreamRole.TERMINAL, (CONTROL_SCOPE, VIEW_SCOPE, OPEN_SCOPE), self._serve)
        )

    # ------------------------------------------------------------ hosting

    def share(
        self,
        command: Sequence[str] | None = None,
        *,
        allow_control: bool = False,
        record: Path | None = None,
        cols: int = 80,
        rows: int = 24,
        title: str | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        rooms: Sequence[str] | None = None,
        session_id: str | None = None,
    ) -> SharedTerminal:
        """Start ``command`` (default: the user's shell) on a PTY, ready to :meth:`run`.

        ``rooms``: where to announce it (default: the user's own devices only); see
        :meth:`check_rooms` for a clear error about a room the user is not in.
        """
        try:
            check_size(cols, rows)
        except ValueError as exc:
            raise UserError(str(exc), code="usage") from exc
        if record is not None:
            try:
                record.open("wb").close()  # the recorder's thread opens it: fail here, clearly
            except OSError as exc:
                raise UserError(
                    f"cannot record to {record}: {exc.strerror or exc}", code="record"
                ) from exc
        try:
            pty = spawn_pty(command, cols=cols, rows=rows, cwd=cwd, env=env)
        except (OSError, ValueError) as exc:  # ptyprocess: FileNotFoundError, or bad argv
            what = command[0] if command else "the shell"
            raise UserError(f"cannot start {what}: {exc}", code="spawn") from exc
        recorder = None
        if record is not None:
            recorder = AsciicastRecorder(record, cols=cols, rows=rows, title=title)
        shown = " ".join(command) if command else "shell"
        return SharedTerminal(
            self,
            session_id or secrets.token_hex(4),
            title or f"{shown} on {self._device_name()}",
            pty,
            allow_control=allow_control,
            recorder=recorder,
            rooms=tuple(dict.fromkeys(rooms or [personal_room(self._own_user)])),
        )

    async def check_rooms(self, rooms: Sequence[str]) -> None:
        """One clear error for a room the user is not in, before sharing into it (the server
        would only refuse the announcement, which nobody would see). Offline: not checked."""
        try:
            mine = {room.name for room in await self._client.rooms()}
        except MeshError as exc:
            if exc.code in ("server_unreachable", "server_timeout"):
                return
            raise
        for room in rooms:
            if room not in mine:
                raise UserError(
                    f"you are not a member of room {room!r} (see meshagent rooms list)",
                    code="unknown_room",
                )

    def _spawn(self, coroutine: Awaitable[object], name: str) -> None:
        """A task nobody awaits, kept referenced until it ends."""
        task = asyncio.ensure_future(coroutine)
        task.set_name(name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @property
    def shared(self) -> dict[str, SharedTerminal]:
        return dict(self._shared)

    async def _serve(self, channel: Channel) -> None:
        grant = channel.grant
        if not isinstance(grant, Capability):
            channel.abort(ErrorCode.BAD_TOKEN, "no capability")
            return
        session_id = channel.resource
        if grant.scope == OPEN_SCOPE:
            await self._open(channel, grant)
            return
        shared = self._shared.get(session_id)
        if shared is None or (grant.resource and grant.resource != session_id):
            channel.abort(ErrorCode.REFUSED, f"no terminal session {session_id!r} here")
            return
        try:
            check_room(grant, shared.rooms)
        except TokenError as exc:
            channel.abort(ErrorCode.BAD_TOKEN, exc.message)
            return
        await shared.serve(channel, grant)

    async def _open(self, channel: Channel, grant: Capability) -> None:
        """``terminal open`` from one of our own devices: a new shell, shared with our own
        devices (control for them), the opener attached as its first viewer."""
        if self._allow_open() != "own":
            channel.abort(
                ErrorCode.REFUSED,
                "it does not allow opening a shell (on it: meshagent config set"
                " terminal.allow_open own)",
            )
            return
        own = personal_room(self._own_user)
        session_id = channel.resource
        if grant.room != own or await self._peer_user(channel.peer_id) != self._own_user:
            channel.abort(ErrorCode.NOT_ALLOWED, "a shell opens only for your own devices")
            return
        if not (len(session_id) == 8 and session_id.isalnum()) or session_id in self._shared:
            channel.abort(ErrorCode.REFUSED, "bad session id")
            return
        try:
            shared = self.share(
                None, allow_control=True, cwd=str(Path.home()), session_id=session_id
            )
        except UserError as exc:
            channel.abort(ErrorCode.REFUSED, exc.message)
            return
        log.info("opened a shell (%s) for %s", session_id, self._peer_name(channel.peer_id))
        shared.hang_up_when_abandoned = True
        self._spawn(shared.run(), f"terminal-opened-{session_id}")
        await shared.serve(channel, grant)

    # ------------------------------------------------------------ the peers' sessions

    def sessions(self, device_id: str | None = None) -> list[AnnouncedSession]:
        """Sessions the room's devices announced, newest first."""
        found = [
            s
            for s in self._announced.entries.values()
            if device_id is None or s.device_id == device_id
        ]
        return sorted(found, key=lambda s: s.started_at, reverse=True)

    async def wait_sessions(self, device_id: str, timeout: float = DISCOVERY_WAIT) -> None:
        """Until ``device_id`` has announced a session, or ``timeout``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not self.sessions(device_id):
                    self._announcements_changed.clear()
                    await self._announcements_changed.wait()

    async def run(self) -> None:
        """Follow the room's terminal announcements (owned by the agent's task group)."""
        with self._bus.subscribed() as events:
            async for event in events:
                if self._announced.follow(event):
                    self._announcements_changed.set()

    # ------------------------------------------------------------ viewing

    async def view(
        self,
        device_id: str,
        session_id: str | None = None,
        *,
        control: bool = False,
        cols: int = 0,
        rows: int = 0,
    ) -> TerminalView:
        """Connect to a session of ``device_id`` (its only or newest one when not named)."""
        await self.wait_sessions(device_id)
        found = {s.session_id: s for s in self.sessions(device_id)}  # newest first
        name = self._peer_name(device_id)
        if not found:
            raise UserError(f"{name} is not sharing a terminal", code="no_session")
        chosen = found.get(session_id or next(iter(found)))
        if chosen is None:
            raise UserError(
                f"{name} shares no terminal session {session_id!r}"
                f" (its sessions: {', '.join(found)})",
                code="no_session",
            )
        view = TerminalView(
            self, device_id, name, chosen.session_id, control, (cols, rows), chosen.rooms
        )
        await view.connect()
        return view

    async def open(self, device_id: str, *, cols: int = 0, rows: int = 0) -> TerminalView:
        """``terminal open``: a new shell on ``device_id`` (one of ours), in control of it."""
        name = self._peer_name(device_id)
        if await self._peer_user(device_id) != self._own_user:
            raise UserError(f"{name} is not one of your devices", code="not_allowed")
        view = TerminalView(self, device_id, name, secrets.token_hex(4), True, (cols, rows))
        view.opening = True
        await view.connect()
        view.opening = False  # a reconnect attaches to the shell it opened
        return view


@dataclass
class TerminalView:
    """A viewer's connection to one shared terminal (see the module docstring)."""

    service: TerminalService
    device_id: str
    device_name: str
    session_id: str
    control: bool = False
    console: tuple[int, int] = (0, 0)
    """Our console's size (0: unknown); it drives the PTY while we control."""
    rooms: tuple[str, ...] = ()
    """The rooms the session was announced into that we are in (empty: an older server)."""
    _stream: ViewerStream = field(default_factory=ViewerStream)
    _filter: OutputSanitizer = field(default_factory=OutputSanitizer)
    _channel: Channel | None = None
    _closed: bool = False
    opening: bool = False
    """Open a new shell (``terminal open``) instead of attaching to an announced session."""
    _early: list[object] = field(default_factory=list)  # read by connect, not shown yet

    @property
    def controller(self) -> str | None:
        return self._stream.controller

    @property
    def you_control(self) -> bool:
        return self._stream.you_control

    @property
    def size(self) -> tuple[int, int] | None:
        stream = self._stream
        return (stream.cols, stream.rows) if stream.cols and stream.rows else None

    async def connect(self) -> None:
        """Open (or reopen, resuming from our offset) the stream to the host."""
        service = self.service
        scope = OPEN_SCOPE if self.opening else CONTROL_SCOPE if self.control else VIEW_SCOPE
        try:
            session = await service._peers.session(self.device_id)
            grant = await self._capability(scope)
            channel = await session.open_channel(
                StreamRole.TERMINAL, tokens=(grant.token,), resource=self.session_id
            )
            await channel.send(self._stream.join(*self.console))
            if self.opening:  # the shell is started after the handshake: its first word tells
                async with asyncio.timeout(OPENED_GRACE):
                    self._early.append(await channel.receive())
        except MeshError as exc:
            if exc.code == "not_allowed" and self.opening:
                raise UserError(
                    f"you may not open a shell on {self.device_name}", code="not_allowed"
                ) from exc
            if exc.code == "not_allowed":
                raise UserError(
                    f"you may not {'control' if self.control else 'view'} terminals on"
                    f" {self.device_name} (your role in the room does not allow it)",
                    code="not_allowed",
                ) from exc
            raise
        except ChannelClosed as exc:
            raise UserError(
                f"{self.device_name} refused the terminal: {exc}", code="refused"
            ) from exc
        except (P2PError, TimeoutError) as exc:
            raise UserError(
                f"cannot reach {self.device_name}: {exc or 'timeout'}", code="unreachable"
            ) from exc
        self._channel = channel

    async def events(self) -> AsyncIterator[ViewerEvent]:
        """What to show, in order; ends after SessionEnded. Raises UserError when the host
        cannot be reached again within RECONNECT_WINDOW."""
        while not self._closed:
            channel = self._channel
            if channel is None:
                ended = await self._reconnect()
                if ended is not None:
                    yield ended
                    return
                continue
            try:
                message = self._early.pop(0) if self._early else await channel.receive()
            except ChannelClosed as exc:
                self._channel = None
                if exc.code is ErrorCode.REFUSED:
                    yield SessionEnded(None, None, "the host stopped sharing")
                    return
                log.info("terminal stream to %s dropped: %s", self.device_name, exc)
                continue
            try:
                events = self._stream.receive(message)
            except ProtocolError as exc:
                channel.abort(exc.code, str(exc))
                raise UserError(
                    f"{self.device_name} sent a malformed terminal stream: {exc}",
                    code="protocol",
                ) from exc
            for event in events:
                yield self._filtered(event)
                if isinstance(event, SessionEnded):
                    return

    def _filtered(self, event: ViewerEvent) -> ViewerEvent:
        if isinstance(event, ScreenReplaced):
            self._filter.reset()
        elif isinstance(event, OutputReceived):
            return replace(event, data=self._filter.feed(event.data))
        return event

    async def _reconnect(self) -> SessionEnded | None:
        deadline = time.monotonic() + RECONNECT_WINDOW
        delay = 0.25
        while True:
            try:
                await self.connect()
                return None
            except UserError as exc:
                if exc.code == "refused":
                    return SessionEnded(None, None, "the host stopped sharing")
                if time.monotonic() + delay > deadline:
                    raise UserError(
                        f"lost the connection to {self.device_name}: {exc.message}",
                        code="disconnected",
                    ) from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 4.0)

    async def send_input(self, data: bytes) -> None:
        """Keystrokes (the host drops them unless we control; dropped while reconnecting)."""
        channel = self._channel
        if channel is None:
            return
        with contextlib.suppress(ChannelClosed):
            for part in input_parts(data):
                await channel.send(part)

    async def resize(self, cols: int, rows: int) -> None:
        """Our console's size: it drives the PTY while we control."""
        self.console = (cols, rows)
        channel = self._channel
        if channel is not None:
            with contextlib.suppress(ChannelClosed, ValueError):
                await channel.send(Resize(cols, rows))

    async def request_control(self) -> None:
        """Ask the server for the right, then the host; the answer comes as an event."""
        token = ""
        if not self.control:
            try:
                grant = await self._capability(CONTROL_SCOPE)
            except MeshError as exc:
                if exc.code == "not_allowed":
                    raise UserError(
                        "your role in the room allows watching only", code="not_allowed"
                    ) from exc
                raise
            token = grant.token
        channel = self._channel
        if channel is None:
            raise UserError("not connected to the host right now", code="disconnected")
        with contextlib.suppress(ChannelClosed):
            await channel.send(ControlRequest(token))

    async def _capability(self, scope: str) -> CapabilityGrant:
        """A token from a room the session is shared in (the host takes no other): the first
        of them whose role allows ``scope``."""
        refused: MeshError | None = None
        rooms: list[str | None] = [*sorted(self.rooms)] or [None]
        for room in rooms:
            try:
                return await self.service._client.capability(
                    self.device_id, scope, self.session_id, room=room
                )
            except MeshError as exc:
                if exc.code not in ("not_allowed", "unknown_room"):
                    raise
                refused = exc
        assert refused is not None
        raise refused

    async def release_control(self) -> None:
        channel = self._channel
        if channel is not None:
            with contextlib.suppress(ChannelClosed):
                await channel.send(ControlRelease())

    async def aclose(self) -> None:
        self._closed = True
        channel, self._channel = self._channel, None
        if channel is not None:
            with contextlib.suppress(ChannelClosed, TimeoutError):
                async with asyncio.timeout(2):
                    await channel.close()
