"""TCP tunnels over the peer session: the exposing side (serves TUNNEL streams) and forwards.

**Exposing** (:meth:`TunnelService.serve`, the TUNNEL service the peer manager calls): the
stream arrived with a valid ``tunnel:connect`` token for its resource (the peer manager's
validator checked it); here the target must match one of the owner's rules
(:mod:`.exposure`, nothing by default) for this peer and token's room, the connection budget
must have a place, and the target must accept; then ``Connected`` and the pipe.

**Forwarding** (:class:`Forward`, ``meshagent forward``): a listening socket on this machine;
each accepted TCP connection becomes its own TUNNEL stream to the device (one connection per
stream, so one slow connection never stalls another: each stream has its own credit). Every
stream needs a fresh token (tokens are single-use), so a small pool is kept filled ahead of
need, and the exposing side answers the first stream with a ticket that stands for the same
capability on later streams to the same target until it expires (:class:`TicketBook`): a new
connection then costs one QUIC round trip, not a server's. The session is looked up per
connection, so a forward outlives peer restarts and path changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import msgspec

from meshagent_gui.core.bus import EventBus
from meshagent_gui.core.events import AnnouncementReceived
from meshagent_gui.core.mesh.announced import PeerAnnouncements
from meshagent_gui.core.mesh.client import MeshClient, MeshError
from meshagent_gui.core.mesh.link import MeshLink
from meshagent_gui.core.p2p.errors import P2PError
from meshagent_gui.core.p2p.peers import PeerManager, Service
from meshagent_gui.core.p2p.session import Channel, ChannelClosed, ChannelRefused
from meshagent_gui.core.protocol.captoken import Capability
from meshagent_gui.core.protocol.errors import ErrorCode
from meshagent_gui.core.protocol.messages import Hello, StreamRole
from meshagent_gui.core.protocol.tunnel import (
    MAX_DATA,
    TICKET_PREFIX,
    TUNNEL_SCOPE,
    Connected,
    ConnectionBudget,
    Target,
    TicketBook,
    TunnelEnd,
    TunnelErrorCode,
    TunnelInput,
    TunnelProtocolError,
    parse_target,
)
from meshagent_gui.errors import UserError

from .exposure import Exposure, find
from .pump import Pipe, reset_tcp, wire_code

log = logging.getLogger(__name__)

CONNECT_TIMEOUT: Final = 10.0
"""Seconds the exposing side gives the target to accept (then TARGET_UNREACHABLE)."""
READ_BUFFER: Final = MAX_DATA
"""asyncio's stream buffer (default 64 KiB): one TCP read can then fill a whole Data frame."""
TOKEN_POOL: Final = 2
TICKET_MARGIN: Final = 30.0
"""A ticket is not used in its last seconds (the stream may take that long to arrive)."""
TOKEN_TTL: Final = 300
TOKEN_FRESH_FOR: Final = 240.0
"""A pooled token is used only this long after it was fetched (it lives TOKEN_TTL on the server's
clock; the margin covers skew and the time to reach the peer)."""
MAX_LOCAL_CONNECTIONS: Final = 256
"""Connections one forward carries at once; more are reset at once (the peer's budget is
smaller by default anyway)."""

REFUSAL_WORDS: Final[dict[TunnelErrorCode, str]] = {
    TunnelErrorCode.NOT_EXPOSED: "does not expose {target} to this device"
    " (on it: meshagent expose {port})",
    TunnelErrorCode.TARGET_REFUSED: "could not connect to {target}: connection refused",
    TunnelErrorCode.TARGET_UNREACHABLE: "could not reach {target}",
    TunnelErrorCode.TOO_MANY_CONNECTIONS: "refused the connection: too many at once",
    TunnelErrorCode.BAD_TARGET: "cannot read the target {target}",
    TunnelErrorCode.IDLE_TIMEOUT: "closed the connection: idle too long",
}


def refusal_text(device: str, target: Target, code: int, message: str = "") -> str:
    """One line for the user: why ``device`` refused or ended a connection to ``target``."""
    words = REFUSAL_WORDS.get(TunnelErrorCode(code))
    if words is None:
        if code == ErrorCode.BAD_TOKEN:
            return f"{device} refused the tunnel's capability token ({message or 'bad token'})"
        if code == ErrorCode.UNKNOWN_ROLE:
            return f"{device} does not take tunnels (an older version)"
        return f"{device} ended the connection ({message or code_name(code)})"
    return f"{device} " + words.format(target=target, port=target.port)


def code_name(code: int) -> str:
    """``target_refused``, ``bad_token``: a tunnel code's name, else the session's."""
    tunnel = TunnelErrorCode(code)
    return (tunnel if tunnel.known else ErrorCode(code)).name.lower()


class TunnelEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What happened to a forward's connection (``meshagent forward --json`` prints these)."""

    event: str  # opened | closed | refused | error
    connection: int = 0
    target: str = ""
    bytes_sent: int = 0
    bytes_received: int = 0
    reason: str = ""
    message: str = ""


class ForwardOpened(msgspec.Struct, frozen=True, kw_only=True):
    """The agent's ``ok`` to ``tunnel.forward``: where it listens, and toward what."""

    listen: str
    port: int
    device: str
    device_id: str
    target: str
    announced: list[str] | None = None
    """What the device announces as exposed to us (None: it announced nothing we heard)."""


ANNOUNCE_KIND: Final = "tunnel.exposed"
"""The standing announcement of what this device exposes, one per room (`data`: ``room``, ''
for the personal room, and ``targets``). Rules for one device (``@device:ID``) are not
announced: a room is the server's unit of delivery, and that device's user may share several."""
MAX_ANNOUNCED: Final = 64  # targets read from one peer's announcement (a flood stays bounded)


class TunnelInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One active tunnel end, for ``tunnel list`` and the app."""

    kind: str  # forward | served | exposed (ours, ``audience``) | available (a peer's, to us)
    id: str = ""  # what ``tunnel.stop`` names (empty: nothing to stop, a peer's announcement)
    device: str
    device_id: str
    target: str
    audience: str = ""
    listen: str = ""
    connections: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass
class _Served:
    peer_id: str
    target: Target
    end: TunnelEnd
    channel: Channel
    writer: asyncio.StreamWriter
    task: asyncio.Task[None]
    stopped: bool = False

    def reset(self) -> None:
        """Stopped by this device's user: both ends reset, as when the target vanished, and the
        pipe ended (its own reads would only see our half of the reset)."""
        self.stopped = True
        self.channel.abort(wire_code(TunnelErrorCode.CONNECTION_RESET), "stopped on the device")
        reset_tcp(self.writer)
        self.task.cancel()


SaveRules = Callable[[list[Exposure]], Awaitable[None]]


class TunnelService:
    """This device's tunnels: the ones peers open toward it and the ones it forwards."""

    def __init__(
        self,
        *,
        peers: PeerManager,
        client: MeshClient,
        own_user: str,
        rules: Callable[[], Sequence[Exposure]],
        peer_name: Callable[[str], str],
        link: MeshLink | None = None,
        bus: EventBus | None = None,
        save_rules: SaveRules | None = None,
        idle_timeout: Callable[[], float] = lambda: 0.0,
        budget: ConnectionBudget | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.peers = peers
        self.client = client
        self.own_user = own_user
        self._rules = rules
        self._peer_name = peer_name
        self._idle_timeout = idle_timeout
        self.budget = budget or ConnectionBudget(per_peer=64, total=256)
        self._clock = clock
        self._wall_clock = wall_clock  # tokens' times are the server's wall clock
        self.tickets = TicketBook()
        self._served: dict[int, _Served] = {}
        self._ids = itertools.count(1)
        self.forwards: set[Forward] = set()
        self._link = link
        self._bus = bus
        self._save_rules = save_rules
        self._announced_rooms: set[str] = set()  # the rooms our standing announcements are in
        self._announced = PeerAnnouncements(ANNOUNCE_KIND, "room", _read_announcement)
        peers.register(self.service())

    def service(self) -> Service:
        return Service(StreamRole.TUNNEL, (TUNNEL_SCOPE,), self.serve, admit=self._admit)

    def _admit(self, peer_id: str, hello: Hello) -> object | None:
        """A ticket in place of a token (the peer manager's validator asks first)."""
        if len(hello.tokens) == 1 and hello.tokens[0].startswith(TICKET_PREFIX):
            return self.tickets.admit(peer_id, hello.resource, hello.tokens[0], self._wall_clock())
        return None

    def rules(self) -> Sequence[Exposure]:
        try:
            return self._rules()
        except ValueError as exc:
            log.warning("tunnel.expose is not readable, nothing is exposed: %s", exc)
            return ()

    # ------------------------------------------------------------ the exposing side

    async def serve(self, channel: Channel) -> None:
        """A peer's TUNNEL stream (its token already checked for the stream's resource)."""
        grant, peer = channel.grant, channel.peer_id
        if not isinstance(grant, Capability):
            channel.abort(ErrorCode.BAD_TOKEN, "no capability")
            return
        try:
            target = parse_target(channel.resource)
        except ValueError as exc:
            channel.abort(wire_code(TunnelErrorCode.BAD_TARGET), str(exc))
            return
        rule = find(self.rules(), target, grant, peer, self.own_user)
        if rule is None:
            log.info("tunnel to %s refused for %s: not exposed", target, peer[:12])
            channel.abort(wire_code(TunnelErrorCode.NOT_EXPOSED), f"{target} is not exposed")
            return
        if not self.budget.admit(peer):
            channel.abort(wire_code(TunnelErrorCode.TOO_MANY_CONNECTIONS), "too many connections")
            return
        try:
            await self._connect_and_pipe(channel, target, grant)
        finally:
            self.budget.release(peer)

    async def _connect_and_pipe(self, channel: Channel, target: Target, grant: Capability) -> None:
        end = TunnelEnd(opener=False, now=self._clock(), idle_timeout=self._idle_timeout())
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_connection(
                    target.host, target.port, limit=READ_BUFFER
                )
        except ConnectionRefusedError:
            code = TunnelErrorCode.TARGET_REFUSED
        except (OSError, TimeoutError) as exc:
            log.info("tunnel target %s unreachable: %s", target, exc)
            code = TunnelErrorCode.TARGET_UNREACHABLE
        else:
            code = TunnelErrorCode.NO_ERROR
        if code is not TunnelErrorCode.NO_ERROR:
            end.handle(TunnelInput.TARGET_FAILED, self._clock())
            channel.abort(wire_code(code), code.name.lower())
            return
        end.handle(TunnelInput.TARGET_CONNECTED, self._clock())
        number = next(self._ids)
        task = asyncio.current_task()
        assert task is not None
        served = self._served[number] = _Served(channel.peer_id, target, end, channel, writer, task)
        try:
            now = self._wall_clock()
            ticket = self.tickets.issue(
                channel.peer_id, channel.resource, grant, grant.expires_at, now
            )
            try:
                await channel.send(Connected(ticket, self.tickets.expires_in(ticket, now)))
            except ChannelClosed:
                reset_tcp(writer)
                return
            try:
                reason = await Pipe(channel, reader, writer, end, clock=self._clock).run()
            except asyncio.CancelledError:
                if not served.stopped:
                    raise
                reason = TunnelErrorCode.CONNECTION_RESET  # stopped here: not a cancellation
            log.debug("tunnel %s for %s ended: %s", target, channel.peer_id[:12], reason.name)
        finally:
            del self._served[number]

    # ------------------------------------------------------------ announcements

    async def announce_exposed(self) -> None:
        """Announce the allow-list, one standing announcement per room its rules name (again
        after each change of ``tunnel.expose``); withdraw the rooms that no rule names now."""
        if self._link is None:
            return
        by_room: dict[str, list[str]] = {}
        for rule in self.rules():
            if not rule.device:
                by_room.setdefault(rule.room, []).append(str(rule.target))
        with contextlib.suppress(MeshError):  # offline: the link sends standing ones on connect
            for room in self._announced_rooms - by_room.keys():
                await self._link.withdraw(_announce_key(room))
            self._announced_rooms = set(by_room)
            for room, targets in by_room.items():
                await self._link.announce(
                    ANNOUNCE_KIND,
                    {"room": room, "targets": targets},
                    key=_announce_key(room),
                    rooms=[room] if room else None,
                )

    async def run(self) -> None:
        """Announce what we expose, then follow what peers announce to us (owned by the agent's
        task group)."""
        await self.announce_exposed()
        if self._bus is None:
            return
        with self._bus.subscribed() as events:
            async for event in events:
                self._announced.follow(event)

    @property
    def available(self) -> dict[tuple[str, str], tuple[str, ...]]:
        """(device, room) -> the targets it announces to us there."""
        return self._announced.entries

    def announced_by(self, device_id: str) -> list[str] | None:
        """The targets ``device_id`` announces to us (None: no announcement from it)."""
        per_room = [ts for (d, _), ts in self.available.items() if d == device_id]
        if not per_room:
            return None
        return list(dict.fromkeys(t for targets in per_room for t in targets))

    # ------------------------------------------------------------ forwards

    async def forward(
        self,
        device_id: str,
        device_name: str,
        target: Target,
        *,
        bind: str = "127.0.0.1",
        port: int = 0,
        on_event: Callable[[TunnelEvent], None] = lambda _: None,
    ) -> Forward:
        """Start forwarding ``bind:port`` to ``target`` on the device; one clear UserError when
        this device may not (no ``tunnel:connect`` from the server) or the port is taken."""
        forward = Forward(self, device_id, device_name, target, on_event=on_event)
        await forward.start(bind, port)
        self.forwards.add(forward)
        return forward

    def listing(self) -> list[TunnelInfo]:
        served = [
            TunnelInfo(
                kind="served",
                id=f"served:{number}",
                device=self._peer_name(s.peer_id),
                device_id=s.peer_id,
                target=str(s.target),
                connections=1,
                bytes_sent=s.end.bytes_in,
                bytes_received=s.end.bytes_out,
            )
            for number, s in self._served.items()
        ]
        exposed = [
            TunnelInfo(
                kind="exposed",
                id=f"exposed:{rule}",
                device="",
                device_id="",
                target=str(rule.target),
                audience=rule.audience,
            )
            for rule in self.rules()
        ]
        available = [
            TunnelInfo(
                kind="available",
                device=self._peer_name(device_id),
                device_id=device_id,
                target=target,
                audience=f"room {room}" if room else "your own devices",
            )
            for (device_id, room), targets in self.available.items()
            for target in targets
        ]
        return [*(f.info() for f in self.forwards), *served, *exposed, *available]

    async def stop(self, tunnel_id: str) -> bool:
        """Stop what :meth:`listing` names ``tunnel_id``: a forward (its command ends too), a
        connection a peer holds here (reset), an exposed target (unexposed, announced so).
        False: nothing by that id (it ended meanwhile)."""
        kind, _, name = tunnel_id.partition(":")
        if kind == "forward":
            for forward in [f for f in self.forwards if f.listen == name]:
                await forward.aclose()
                return True
        elif kind == "served" and name.isdigit() and (served := self._served.get(int(name))):
            served.reset()
            return True
        elif kind == "exposed" and self._save_rules is not None:
            rules = list(self.rules())
            kept = [rule for rule in rules if str(rule) != name]
            if len(kept) < len(rules):
                await self._save_rules(kept)
                await self.announce_exposed()
                return True
        return False


class TokenPool:
    """Fresh single-use tokens for one (device, target), fetched ahead of need."""

    def __init__(
        self, fetch: Callable[[], Awaitable[str]], *, size: int, clock: Callable[[], float]
    ) -> None:
        self._fetch = fetch
        self._size = size
        self._clock = clock
        self._tokens: deque[tuple[float, str]] = deque()
        self._refilling: asyncio.Task[None] | None = None

    async def take(self) -> str:
        now = self._clock()
        while self._tokens:
            fetched_at, token = self._tokens.popleft()
            if now - fetched_at < TOKEN_FRESH_FOR:
                self._refill()
                return token
        token = await self._fetch()
        self._refill()
        return token

    def put(self, token: str) -> None:
        self._tokens.append((self._clock(), token))

    def _refill(self) -> None:
        if self._refilling is None or self._refilling.done():
            self._refilling = asyncio.create_task(self._top_up(), name="tunnel-tokens")

    async def _top_up(self) -> None:
        with contextlib.suppress(UserError, MeshError, OSError):
            while len(self._tokens) < self._size:
                self.put(await self._fetch())

    def close(self) -> None:
        if self._refilling is not None:
            self._refilling.cancel()


@dataclass(eq=False)
class Forward:
    """``meshagent forward``: a local listening socket whose connections go to ``target`` on
    the device, each as its own TUNNEL stream."""

    service: TunnelService
    device_id: str
    device_name: str
    target: Target
    on_event: Callable[[TunnelEvent], None] = lambda _: None
    listen: str = ""
    connections: dict[int, TunnelEnd] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    _server: asyncio.Server | None = None
    _numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _tokens: TokenPool | None = None
    _ticket: tuple[str, float] | None = None  # (ticket, good until: our wall clock)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, bind: str, port: int) -> None:
        service = self.service
        clock = service._clock
        self._tokens = TokenPool(self._fetch_token, size=TOKEN_POOL, clock=clock)
        # The first token now: no right to tunnel there is one clear error before we listen.
        self._tokens.put(await self._fetch_token())
        try:
            self._server = await asyncio.start_server(self._accepted, bind, port, limit=READ_BUFFER)
        except OSError as exc:
            self._tokens.close()
            raise UserError(
                f"cannot listen on {bind}:{port}: {exc.strerror or exc}", code="forward_port"
            ) from exc
        sockname = self._server.sockets[0].getsockname()
        self.listen = f"{sockname[0]}:{sockname[1]}"

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    async def _fetch_token(self) -> str:
        try:
            grant = await self.service.client.capability(
                self.device_id, TUNNEL_SCOPE, str(self.target), ttl=TOKEN_TTL
            )
        except MeshError as exc:
            if exc.code == "not_allowed":
                raise UserError(
                    f"you may not open tunnels to {self.device_name}: no room you share with it"
                    " gives you tunnel:connect",
                    code="not_allowed",
                ) from exc
            raise
        return grant.token

    def info(self) -> TunnelInfo:
        return TunnelInfo(
            kind="forward",
            id=f"forward:{self.listen}",
            device=self.device_name,
            device_id=self.device_id,
            target=str(self.target),
            listen=self.listen,
            connections=len(self.connections),
            bytes_sent=self.bytes_sent + sum(e.bytes_out for e in self.connections.values()),
            bytes_received=self.bytes_received + sum(e.bytes_in for e in self.connections.values()),
        )

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if len(self.connections) >= MAX_LOCAL_CONNECTIONS:
                reset_tcp(writer)
                self.on_event(TunnelEvent(event="refused", reason="too_many_connections"))
                return
            await self._carry(reader, writer, next(self._numbers))
        except asyncio.CancelledError:
            reset_tcp(writer)  # the forward stopped: the top of this connection's task
        finally:
            self._tasks.discard(task)

    async def _carry(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
    ) -> None:
        clock = self.service._clock
        target = str(self.target)
        end = TunnelEnd(opener=True, now=clock(), idle_timeout=self.service._idle_timeout())
        try:
            channel = await self._open(target)
        except (UserError, MeshError, P2PError, ChannelClosed, OSError, TimeoutError) as exc:
            reset_tcp(writer)
            self.on_event(_refused(self, number, exc))
            return
        self.connections[number] = end
        try:
            try:
                first = await channel.receive()
                end.message(first, clock())
                if isinstance(first, Connected) and first.ticket.startswith(TICKET_PREFIX):
                    self._ticket = (
                        first.ticket,
                        self.service._wall_clock() + first.ticket_expires_in - TICKET_MARGIN,
                    )
            except ChannelClosed as exc:
                end.handle(TunnelInput.PEER_RESET, clock())
                reset_tcp(writer)
                self.on_event(_refused(self, number, exc))
                return
            except TunnelProtocolError as exc:
                channel.abort(exc.code, exc.message)
                reset_tcp(writer)
                self.on_event(TunnelEvent(event="error", connection=number, message=str(exc)))
                return
            self.on_event(TunnelEvent(event="opened", connection=number, target=target))
            reason = await Pipe(channel, reader, writer, end, clock=clock).run()
            self.on_event(
                TunnelEvent(
                    event="closed",
                    connection=number,
                    target=target,
                    bytes_sent=end.bytes_out,
                    bytes_received=end.bytes_in,
                    reason=reason.name.lower(),
                )
            )
        finally:
            del self.connections[number]
            self.bytes_sent += end.bytes_out
            self.bytes_received += end.bytes_in

    async def _open(self, target: str) -> Channel:
        assert self._tokens is not None
        session = await self.service.peers.session(self.device_id)
        ticket = self._ticket
        if ticket is not None and self.service._wall_clock() < ticket[1]:
            try:
                return await session.open_channel(
                    StreamRole.TUNNEL, tokens=[ticket[0]], resource=target
                )
            except ChannelRefused as exc:
                if exc.code != ErrorCode.BAD_TOKEN:
                    raise
                # The peer forgot it (it restarted): a token then, and a new ticket.
        if self._ticket is ticket:
            self._ticket = None
        token = await self._tokens.take()
        return await session.open_channel(StreamRole.TUNNEL, tokens=[token], resource=target)

    async def aclose(self) -> None:
        """Stop listening and end every connection this forward carries."""
        if self._server is not None:
            self._server.close()
        if self._tokens is not None:
            self._tokens.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.service.forwards.discard(self)
        self.closed.set()


def _refused(forward: Forward, number: int, exc: BaseException) -> TunnelEvent:
    if isinstance(exc, ChannelClosed):
        reason = code_name(int(exc.code))
        message = refusal_text(forward.device_name, forward.target, int(exc.code), exc.message)
        if not isinstance(exc, ChannelRefused) and not exc.by_peer:
            message = f"the connection to {forward.device_name} closed"
    elif isinstance(exc, UserError):
        reason, message = exc.code, exc.message
    else:
        reason, message = "unreachable", f"cannot reach {forward.device_name}: {exc}"
    return TunnelEvent(event="refused", connection=number, reason=reason, message=message)


def _read_announcement(event: AnnouncementReceived, _sender: str) -> tuple[str, ...] | None:
    """The targets of a peer's tunnel announcement that parse (at most MAX_ANNOUNCED)."""
    targets = event.data.get("targets")
    if not isinstance(targets, list):
        return None
    readable = []
    for text in targets[:MAX_ANNOUNCED]:
        with contextlib.suppress(ValueError):
            if isinstance(text, str):
                readable.append(str(parse_target(text)))
    return tuple(readable)


def _announce_key(room: str) -> str:
    return f"{ANNOUNCE_KIND}:{room or '@own'}"
