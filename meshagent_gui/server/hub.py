"""The WebSocket hub: presence, signal relay, room-scoped announcements, room events.

Built for thousands of connections in one process: everything a frame needs is in memory
(device -> connection, user -> online devices, user -> rooms, room -> members), so a presence
change costs one serialisation plus one queue append per online peer. Room membership comes
from the database once per user and is then kept current by :meth:`Hub.membership_changed`.

Each connection has a bounded outbox drained by its own writer task; a client that lets live
traffic fill it up is disconnected instead of growing the server's memory. What a stranger in
a shared room can make the hub send is bounded so that it can never get a reader closed: the
standing announcements of one device (count and bytes), the announcements per second of one
device, and the replay a connection receives on connect (cut off with ``replay_truncated``,
never a close).

A socket lives only as long as its session: :meth:`Hub.close_sessions` closes it (4403) when
the session is revoked, and a sweep closes it when the access token it was opened with
expires (4401), unless the agent renewed it in-band with an ``auth`` frame. The sweep also
asks the database which sessions still exist, so a revocation nobody reported still closes
the socket within one sweep interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Protocol

from pydantic import ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect

from meshagent_gui.core.mesh.types import (
    CLOSE_REVOKED,
    CLOSE_UNAUTHORIZED,
    WS_MESSAGE,
    Announce,
    Auth,
    Presence,
    ServerEvent,
    ServerHello,
    Signal,
    Withdraw,
    WsError,
    dump_ws,
)
from meshagent_gui.server.store import (
    AsyncStore,
    MembershipChange,
    Principal,
    Store,
    personal_room,
)

log = logging.getLogger(__name__)

CLOSE_REPLACED: Final = 4409  # another connection of the same device took over
CLOSE_TOO_SLOW: Final = 1008  # the outbox overflowed with live traffic
CLOSE_TOO_BIG: Final = 1009
RESERVED_KIND_PREFIX: Final = "room."
ENDED_SUFFIX: Final = ".ended"
_LOAD_ATTEMPTS: Final = 3


@dataclass(frozen=True)
class HubLimits:
    max_frame_bytes: int = 64 * 1024
    max_queued_bytes: int = 1024 * 1024  # per connection
    # Replay never fills more than this of an outbox, so live frames still fit behind it.
    max_replay_bytes: int = 512 * 1024
    max_standing: int = 16  # standing announcements per device
    max_standing_bytes: int = 64 * 1024  # their summed len(json(data)) per device
    max_recipients: int = 256  # entries in an announcement's ``to``
    frames_per_second: float = 50.0
    frame_burst: float = 200.0
    # The fan-out budget of one device: what its announcements can push into each reader.
    announce_per_second: float = 5.0
    announce_burst: float = 20.0
    announce_bytes_per_second: float = 64 * 1024
    announce_burst_bytes: float = 256 * 1024
    close_timeout: float = 5.0
    sweep_interval: float = 2.0  # how often expiry and revocation are checked


class RateAllowance:
    """A token bucket that answers at once (take or refuse), with the time passed in; the
    agent's share.ratelimit.TokenBucket is the other kind, one that waits."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self._rate, self._burst = rate, burst
        self._tokens, self._stamp = burst, now

    def _refill(self, now: float) -> None:
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def take(self, now: float, amount: float = 1.0) -> bool:
        if self.available(now) < amount:
            return False
        self._tokens -= amount
        return True

    def available(self, now: float) -> float:
        self._refill(now)
        return self._tokens

    def full(self, now: float) -> bool:
        self._refill(now)
        return self._tokens >= self._burst


class BucketTable:
    """One token bucket per device, kept across reconnects (a new socket is no fresh budget).

    Buckets of devices without a socket are forgotten once they have refilled: forgetting a
    full bucket changes nothing, so memory stays bounded by the devices actually active.
    """

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, RateAllowance] = {}

    def bucket(self, device_id: str, now: float) -> RateAllowance:
        bucket = self._buckets.get(device_id)
        if bucket is None:
            bucket = self._buckets[device_id] = RateAllowance(self.rate, self.burst, now)
        return bucket

    def take(self, device_id: str, now: float, amount: float = 1.0) -> bool:
        return self.bucket(device_id, now).take(now, amount)

    def prune(self, now: float, keep: Collection[str]) -> None:
        idle = [d for d, b in self._buckets.items() if d not in keep and b.full(now)]
        for device_id in idle:
            del self._buckets[device_id]

    def __len__(self) -> int:
        return len(self._buckets)


class SessionSockets(Protocol):
    """Sockets bound to sessions (the hub's and the relay's), closed by the sweep."""

    def session_ids(self) -> set[str]: ...
    def close_sessions(self, session_ids: Collection[str], code: int) -> None: ...
    def close_expired(self, now: float) -> None: ...
    def prune(self, now: float) -> None: ...


@dataclass(frozen=True)
class _Standing:
    key: str
    kind: str
    data: dict[str, Any]
    to: frozenset[str] | None
    rooms: frozenset[str]
    size: int  # len(json(data)): what counts toward the device's standing bytes

    def addressed_to(self, device_id: str) -> bool:
        return self.to is None or device_id in self.to


class Connection:
    """One agent's WebSocket: identity, session, standing announcements and the bounded outbox."""

    def __init__(self, principal: Principal, limits: HubLimits) -> None:
        self.device_id = principal.device_id
        self.user = principal.user
        self.auth_session = principal.session_id
        self.expires_at = principal.access_expires_at
        self.guest_of = principal.guest_of  # a share link's guest reaches this device only
        self.session_id = secrets.token_hex(8)  # this connection's id, told in ``hello``
        self.standing: dict[str, _Standing] = {}
        self._limits = limits
        self._outbox: deque[str] = deque()
        self._queued_bytes = 0
        self._wakeup = asyncio.Event()
        self._close: tuple[int, str] | None = None
        self._writer: asyncio.Task[None] | None = None

    @property
    def closing(self) -> bool:
        return self._close is not None

    @property
    def standing_bytes(self) -> int:
        return sum(announcement.size for announcement in self.standing.values())

    def push(self, frame: str) -> None:
        """Queue a live frame; a client too slow to take it is disconnected, not buffered for."""
        if self._close is not None:
            return
        if self._outbox and self._queued_bytes + len(frame) > self._limits.max_queued_bytes:
            log.warning("dropping device %s: it does not read its frames", self.device_id[:12])
            self._close = (CLOSE_TOO_SLOW, "too slow")
            if self._writer is not None:
                # It is probably stuck in a send that will never finish.
                self._writer.cancel()
            return
        self._append(frame)

    def push_replay(self, frame: str) -> bool:
        """Queue a replayed frame if it fits the replay share of the outbox; never closes."""
        if self._close is not None:
            return True  # nothing to cut off: the connection is going away
        if self._queued_bytes + len(frame) > self._limits.max_replay_bytes:
            return False
        self._append(frame)
        return True

    def _append(self, frame: str) -> None:
        self._outbox.append(frame)
        self._queued_bytes += len(frame)
        self._wakeup.set()

    def close(self, code: int, reason: str) -> None:
        if self._close is None:
            self._close = (code, reason)
            self._outbox.clear()  # a closed session gets nothing more, not even queued frames
            self._queued_bytes = 0
            self._wakeup.set()

    async def write_loop(self, websocket: WebSocket) -> None:
        self._writer = asyncio.current_task()
        try:
            while self._close is None:
                if not self._outbox:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                frame = self._outbox.popleft()
                self._queued_bytes -= len(frame)
                await websocket.send_text(frame)
                # send_text rarely suspends: yield so one full outbox cannot hold the loop, and
                # so a vanished client's disconnect is seen before we write on into a dead socket.
                await asyncio.sleep(0)
            code, reason = self._close
            async with asyncio.timeout(self._limits.close_timeout):
                await websocket.close(code, reason)
        except (WebSocketDisconnect, TimeoutError, RuntimeError, OSError):
            # Gone already, or will not take the close frame: the handler's end closes it.
            pass


class _Replay:
    """Replay into one connection, cut off (once, with an error frame) when it stops fitting."""

    def __init__(self, recipient: Connection) -> None:
        self.recipient = recipient
        self.truncated = False

    def push(self, frame: str) -> None:
        if self.truncated:
            return
        if not self.recipient.push_replay(frame):
            self.truncated = True
            log.info("replay to %s truncated", self.recipient.device_id[:12])
            self.recipient.push(
                _error(
                    "replay_truncated",
                    "Too many standing announcements to replay; some were left out.",
                )
            )


class Hub:
    def __init__(
        self,
        db: AsyncStore,
        *,
        heartbeat_interval: float = 10.0,
        limits: HubLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self.heartbeat_interval = heartbeat_interval
        self.clock = clock  # public: the server's tests move it
        self.limits = limits or HubLimits()
        self._connections: dict[str, Connection] = {}
        self._online_by_user: dict[str, dict[str, Connection]] = {}
        # Membership cache: loaded per user from the store, then kept current by
        # membership_changed (every change bumps the generation, so a load that raced a change
        # is not cached).
        self._rooms_of: dict[str, frozenset[str]] = {}
        self._members: dict[str, frozenset[str]] = {}
        self._peers: dict[str, frozenset[str]] = {}
        self.generation = 0
        # Sessions renewed in-band (``auth``): the relay's sockets of that session live on too.
        self._renewed: dict[str, float] = {}
        # Share links: sender device -> its guests online now (they share no room with it).
        self._guests: dict[str, set[str]] = {}
        self._holders: list[SessionSockets] = [self]
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def limits(self) -> HubLimits:
        return self._limits

    @limits.setter
    def limits(self, limits: HubLimits) -> None:
        """New limits (tests tighten them); the per-device budgets start over."""
        self._limits = limits
        self._frames = BucketTable(limits.frames_per_second, limits.frame_burst)
        self._announcements = BucketTable(limits.announce_per_second, limits.announce_burst)
        self._announced_bytes = BucketTable(
            limits.announce_bytes_per_second, limits.announce_burst_bytes
        )

    # ------------------------------------------------------------ queries

    def is_online(self, device_id: str) -> bool:
        return device_id in self._connections

    def connection(self, device_id: str) -> Connection | None:
        return self._connections.get(device_id)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def rooms_of(self, user: str) -> frozenset[str]:
        """The rooms ``user`` is a member of (cached; the members of each are cached too)."""
        cached = self._rooms_of.get(user)
        if cached is not None:
            return cached
        for _ in range(_LOAD_ATTEMPTS):
            generation = self.generation
            records = await self._db.call(Store.rooms_of, user)
            rooms = frozenset(record.name for record in records)
            if generation == self.generation:  # no membership change while we read
                self._rooms_of[user] = rooms
                for record in records:
                    self._members[record.name] = frozenset(record.members)
                return rooms
        return rooms  # changes keep racing: use the freshest read, uncached

    def members_of(self, room: str) -> frozenset[str]:
        """Members of a room some online member has; empty for a room nobody loaded."""
        return self._members.get(room, frozenset())

    async def peer_users(self, user: str) -> frozenset[str]:
        """Users sharing at least one room with ``user`` (``user`` included)."""
        cached = self._peers.get(user)
        if cached is not None:
            return cached
        generation = self.generation
        rooms = await self.rooms_of(user)
        peers = frozenset({user}).union(*(self.members_of(room) for room in rooms))
        if generation == self.generation:
            self._peers[user] = peers
        return peers

    def _linked(self, connection: Connection) -> list[Connection]:
        """The online devices ``connection`` sees through a share link, not a room."""
        if connection.guest_of is not None:
            ids: Iterable[str] = (connection.guest_of,)
        else:
            ids = self._guests.get(connection.device_id, ())
        return [peer for peer in map(self._connections.get, ids) if peer is not None]

    def renewed_until(self, session_id: str) -> float | None:
        return self._renewed.get(session_id)

    def _online_devices(self, users: Iterable[str], exclude: str) -> Iterator[Connection]:
        for user in users:
            for device_id, connection in self._online_by_user.get(user, {}).items():
                if device_id != exclude:
                    yield connection

    def _audience(
        self, rooms: Iterable[str], members_of: Callable[[str], frozenset[str]]
    ) -> dict[str, list[str]]:
        """user -> the rooms (sorted) of ``rooms`` that user is in."""
        audience: dict[str, list[str]] = {}
        for room in sorted(rooms):
            for user in members_of(room):
                audience.setdefault(user, []).append(room)
        return audience

    # ------------------------------------------------------------ connection lifecycle

    async def serve(self, websocket: WebSocket, principal: Principal) -> None:
        """Run one accepted, authenticated WebSocket until either side ends it."""
        connection = Connection(principal, self.limits)
        try:
            await self._attach(connection, principal)
            self.ensure_sweeper()
            async with asyncio.TaskGroup() as tasks:
                reader = tasks.create_task(self._read_loop(connection, websocket))
                writer = tasks.create_task(connection.write_loop(websocket))
                # Whichever ends first ends the other: the connection is over.
                reader.add_done_callback(lambda _: writer.cancel())
                writer.add_done_callback(lambda _: reader.cancel())
        finally:
            await self._detach(connection)

    async def _attach(self, connection: Connection, principal: Principal) -> None:
        await self.rooms_of(connection.user)
        peers = await self.peer_users(connection.user)
        now = self.clock()
        device_id = connection.device_id
        previous = self._connections.get(device_id)
        self._connections[device_id] = connection
        self._online_by_user.setdefault(connection.user, {})[device_id] = connection
        if connection.guest_of is not None:
            self._guests.setdefault(connection.guest_of, set()).add(device_id)
        if previous is not None:
            self._end_standing(previous)
            previous.close(CLOSE_REPLACED, "replaced by a newer connection")
        linked = self._linked(connection)
        online = [*self._online_devices(peers, device_id), *linked]
        connection.push(
            dump_ws(
                ServerHello(
                    device_id=device_id,
                    session_id=connection.session_id,
                    server_time=now,
                    heartbeat_interval=self.heartbeat_interval,
                    online=[peer.device_id for peer in online],
                    access_expires_at=principal.access_expires_at,
                )
            )
        )
        replay = _Replay(connection)
        for peer in online:
            for announcement in peer.standing.values():
                self._replay_one(peer, announcement, replay)
        if previous is None:
            presence = dump_ws(Presence(device_id=device_id, online=True, at=now))
            for peer in online:
                peer.push(presence)
        await self._touch(device_id, now)

    async def _detach(self, connection: Connection) -> None:
        device_id = connection.device_id
        if self._connections.get(device_id) is not connection:
            return  # replaced: the newer connection owns presence now
        peers = await self.peer_users(connection.user)
        if self._connections.get(device_id) is not connection:
            return
        now = self.clock()
        del self._connections[device_id]
        devices = self._online_by_user[connection.user]
        del devices[device_id]
        if not devices:
            del self._online_by_user[connection.user]
        self._end_standing(connection)
        presence = dump_ws(Presence(device_id=device_id, online=False, at=now))
        for peer in [*self._online_devices(peers, device_id), *self._linked(connection)]:
            peer.push(presence)
        if connection.guest_of is not None:
            guests = self._guests.get(connection.guest_of, set())
            guests.discard(device_id)
            if not guests:
                self._guests.pop(connection.guest_of, None)
        await self._touch(device_id, now)

    async def _touch(self, device_id: str, now: float) -> None:
        try:
            await self._db.call(Store.touch_device, device_id, now=now)
        except Exception:  # last_seen is a courtesy; never let it break a connection
            log.warning("could not record last_seen for %s", device_id[:12], exc_info=True)

    # ------------------------------------------------------------ frames from the agent

    async def _read_loop(self, connection: Connection, websocket: WebSocket) -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if connection.closing:
                continue  # the writer is closing; read on until the client's close arrives
            text = message.get("text")
            if text is None:
                connection.push(_error("bad_message", "Frames must be JSON text."))
                continue
            if len(text) > self.limits.max_frame_bytes:
                connection.close(CLOSE_TOO_BIG, "frame too big")
                continue
            if not self._frames.take(connection.device_id, self.clock()):
                connection.push(_error("rate_limited", "Too many frames; slow down."))
                continue
            try:
                frame = WS_MESSAGE.validate_json(text)
            except ValidationError as exc:
                connection.push(_error("bad_message", _first_problem(exc)))
                continue
            await self._dispatch(connection, frame)

    async def _dispatch(self, connection: Connection, frame: object) -> None:
        if isinstance(frame, Signal):
            await self._relay_signal(connection, frame)
        elif isinstance(frame, Announce):
            await self._announce(connection, frame)
        elif isinstance(frame, Withdraw):
            self._withdraw(connection, frame.key)
        elif isinstance(frame, Auth):
            await self._renew(connection, frame.access_token)
        else:
            kind = getattr(frame, "type", "?")
            connection.push(_error("bad_message", f"Agents do not send {kind!r} frames."))

    async def _renew(self, connection: Connection, access_token: str) -> None:
        """An ``auth`` frame: the socket now lives as long as this (fresh) token."""
        principal = await self._db.call(Store.authenticate, access_token, now=self.clock())
        if principal is None or principal.device_id != connection.device_id:
            connection.close(CLOSE_UNAUTHORIZED, "unauthorized")
            return
        connection.auth_session = principal.session_id
        connection.expires_at = principal.access_expires_at
        self._renewed[principal.session_id] = principal.access_expires_at

    async def _relay_signal(self, connection: Connection, frame: Signal) -> None:
        target_id = frame.to
        if target_id is None:
            connection.push(_error("bad_message", "A signal needs 'to'."))
            return
        peers = await self.peer_users(connection.user)
        target = self._connections.get(target_id)
        if target is None:
            connection.push(
                _error("device_offline", "That device is not online.", device_id=target_id)
            )
        elif not self._may_signal(connection, target, peers):
            connection.push(
                _error("not_allowed", "You share no room with that device.", device_id=target_id)
            )
        else:
            relayed = Signal.model_validate(
                {"from": connection.device_id, "payload": frame.payload}
            )
            target.push(dump_ws(relayed))

    @staticmethod
    def _may_signal(sender: Connection, target: Connection, peers: frozenset[str]) -> bool:
        """Devices signal each other when they share a room; a share link's guest and its sender
        only each other (a guest is in no room; nobody else may reach it)."""
        if sender.device_id == target.device_id:
            return False
        if sender.guest_of is not None or target.guest_of is not None:
            return sender.guest_of == target.device_id or target.guest_of == sender.device_id
        return target.user in peers

    async def _announce(self, connection: Connection, frame: Announce) -> None:
        problem = self._check_announce(frame)
        if problem is not None:
            connection.push(_error("bad_message", problem))
            return
        rooms = await self._announce_rooms(connection.user, frame.rooms)
        if rooms is None:
            connection.push(_error("not_allowed", "You can only announce into your own rooms."))
            return
        size = len(json.dumps(frame.data, separators=(",", ":")))
        refusal = self._check_standing(connection, frame.key, size)
        if refusal is None and not self._within_budget(connection, size):
            refusal = ("rate_limited", "Too many announcements; slow down.")
        if refusal is not None:
            connection.push(_error(*refusal))
            return
        announcement = _Standing(
            key=frame.key or "",
            kind=frame.kind,
            data=frame.data,
            to=None if frame.to is None else frozenset(frame.to),
            rooms=rooms,
            size=size,
        )
        if frame.key is not None:
            connection.standing[frame.key] = announcement
        self._fan_out(connection.device_id, announcement, frame.kind, frame.key)

    def _check_announce(self, frame: Announce) -> str | None:
        if frame.kind.startswith(RESERVED_KIND_PREFIX) or frame.kind.endswith(ENDED_SUFFIX):
            return f"The kind {frame.kind!r} is reserved."
        if frame.to is not None and len(frame.to) > self.limits.max_recipients:
            return "Too many recipients in 'to'."
        return None

    async def _announce_rooms(self, user: str, asked: list[str] | None) -> frozenset[str] | None:
        """The rooms to announce into, or None when the user is not in one of them."""
        if asked is None:
            return frozenset({personal_room(user)})
        wanted = frozenset(asked)
        if not wanted <= await self.rooms_of(user):
            # The cache may predate a room this user just created: read once more.
            self._rooms_of.pop(user, None)
            if not wanted <= await self.rooms_of(user):
                return None
        return wanted

    def _check_standing(
        self, connection: Connection, key: str | None, size: int
    ) -> tuple[str, str] | None:
        if key is None:
            return None
        replaced = connection.standing.get(key)
        count = len(connection.standing) + (replaced is None)
        total = connection.standing_bytes + size - (replaced.size if replaced else 0)
        if count > self.limits.max_standing:
            return ("rate_limited", "Too many standing announcements.")
        if total > self.limits.max_standing_bytes:
            return ("too_large", "Standing announcements too large in total; withdraw some.")
        return None

    def _within_budget(self, connection: Connection, size: int) -> bool:
        now = self.clock()
        count = self._announcements.bucket(connection.device_id, now)
        volume = self._announced_bytes.bucket(connection.device_id, now)
        cost = min(size, self.limits.announce_burst_bytes)  # a big one still passes, eventually
        # Both are checked before either is charged, so a refusal costs nothing.
        if count.available(now) < 1 or volume.available(now) < cost:
            return False
        return count.take(now) and volume.take(now, cost)

    def _fan_out(self, sender_id: str, announcement: _Standing, kind: str, key: str | None) -> None:
        frames: dict[tuple[str, ...], str] = {}
        audience = self._audience(announcement.rooms, self.members_of)
        for user, rooms in audience.items():
            for peer in self._online_devices((user,), sender_id):
                if announcement.addressed_to(peer.device_id):
                    peer.push(_cached_frame(frames, kind, sender_id, announcement, key, rooms))

    def _withdraw(self, connection: Connection, key: str) -> None:
        announcement = connection.standing.pop(key, None)
        if announcement is not None:  # withdrawing twice is harmless
            self._send_ended(connection.device_id, announcement, self.members_of)

    def _send_ended(
        self,
        sender_id: str,
        announcement: _Standing,
        members_of: Callable[[str], frozenset[str]],
        only_users: Collection[str] | None = None,
    ) -> None:
        frames: dict[tuple[str, ...], str] = {}
        kind = announcement.kind + ENDED_SUFFIX
        for user, rooms in self._audience(announcement.rooms, members_of).items():
            if only_users is not None and user not in only_users:
                continue
            for peer in self._online_devices((user,), sender_id):
                if announcement.addressed_to(peer.device_id):
                    peer.push(
                        _cached_frame(
                            frames, kind, sender_id, announcement, announcement.key, rooms
                        )
                    )

    def _end_standing(self, connection: Connection) -> None:
        for announcement in connection.standing.values():
            self._send_ended(connection.device_id, announcement, self.members_of)
        connection.standing.clear()

    def _replay_one(self, sender: Connection, announcement: _Standing, replay: _Replay) -> None:
        recipient = replay.recipient
        rooms = sorted(r for r in announcement.rooms if recipient.user in self.members_of(r))
        if rooms and announcement.addressed_to(recipient.device_id):
            replay.push(
                _event_frame(
                    announcement.kind, sender.device_id, announcement, announcement.key, rooms
                )
            )

    # ------------------------------------------------------------ server events

    def user_event(self, user: str, kind: str, data: dict[str, Any]) -> None:
        """A server event (no ``from``) to every online device of ``user``."""
        frame = dump_ws(ServerEvent(kind=kind, data=data))
        for connection in self._online_by_user.get(user, {}).values():
            connection.push(frame)

    def device_event(self, device_id: str, kind: str, data: dict[str, Any]) -> None:
        """A server event (no ``from``) to one device, if it is online."""
        connection = self._connections.get(device_id)
        if connection is not None:
            connection.push(dump_ws(ServerEvent(kind=kind, data=data)))

    def room_event(self, rooms: Iterable[str], kind: str, data: dict[str, Any]) -> None:
        """A server event to the online devices of the members of ``rooms``.

        Each device gets it once, with ``rooms`` = those of the rooms its user is in. A room
        none of whose members is online is not in the cache, and has nobody to tell.
        """
        frames: dict[tuple[str, ...], str] = {}
        for user, user_rooms in self._audience(set(rooms), self.members_of).items():
            key = tuple(user_rooms)
            frame = frames.get(key)
            if frame is None:
                frame = frames[key] = dump_ws(ServerEvent(kind=kind, data=data, rooms=user_rooms))
            for connection in self._online_by_user.get(user, {}).values():
                connection.push(frame)

    # ------------------------------------------------------------ room membership

    def membership_changed(self, change: MembershipChange) -> None:
        """A user joined a room, changed role, or left it (``role`` None): tell and reconcile.

        Members get a ``room.*`` event; devices that now share a room see each other (presence,
        then the standing announcements now visible to them); devices that no longer do get
        ``<kind>.ended`` for what they can no longer see, then presence offline.
        """
        room, user = change.room, change.user
        before = self._members_before(change)
        kind = _change_kind(change, before)
        self._apply_change(change)
        event = dump_ws(
            ServerEvent(
                kind=kind, data={"room": room, "user": user, "role": change.role}, rooms=[room]
            )
        )
        for member in change.members | {user}:
            for connection in self._online_by_user.get(member, {}).values():
                connection.push(event)
        if change.role is None:
            self._reconcile(change, before)
            self._presence_between(user, change.no_longer_shared, online=False)
        else:
            self._presence_between(user, change.newly_shared, online=True)
            self._reconcile(change, before)

    def _members_before(self, change: MembershipChange) -> frozenset[str]:
        cached = self._members.get(change.room)
        if cached is not None:
            return cached
        if change.role is None:
            return change.members | {change.user}
        known = self._rooms_of.get(change.user)
        if known is not None and change.room in known:
            return change.members  # a role change
        return change.members - {change.user}

    def _apply_change(self, change: MembershipChange) -> None:
        room, user = change.room, change.user
        self.generation += 1
        self._peers.clear()
        if change.members:
            self._members[room] = change.members
        else:
            self._members.pop(room, None)  # the room is gone with its last member
        rooms = self._rooms_of.get(user)
        if rooms is not None:
            self._rooms_of[user] = rooms - {room} if change.role is None else rooms | {room}
        for member in change.members - {user}:
            # Members cached before the room reached this hub (made by the CLI, say) learn it.
            known = self._rooms_of.get(member)
            if known is not None and room not in known:
                self._rooms_of[member] = known | {room}

    def room_created(self, room: str, owner: str) -> None:
        """A new room whose only member is its owner: nobody else to tell, but keep the cache."""
        self.generation += 1
        self._peers.pop(owner, None)
        self._members[room] = frozenset({owner})
        known = self._rooms_of.get(owner)
        if known is not None:
            self._rooms_of[owner] = known | {room}

    def _reconcile(self, change: MembershipChange, before: frozenset[str]) -> None:
        """Announcements into the changed room: replay to who now sees them, end for who not."""
        room = change.room

        def members_before(name: str) -> frozenset[str]:
            return before if name == room else self.members_of(name)

        for sender in list(self._online_devices(before | change.members | {change.user}, "")):
            for key, announcement in list(sender.standing.items()):
                if room not in announcement.rooms:
                    continue
                now_in = announcement
                if change.role is None and sender.user == change.user:
                    # Its announcer left the room: the announcement leaves it too.
                    now_in = _without_room(announcement, room)
                old = self._audience(announcement.rooms, members_before)
                new = self._audience(now_in.rooms, self.members_of)
                self._send_ended(sender.device_id, announcement, members_before, old.keys() - new)
                self._replay_to(sender, now_in, new.keys() - old.keys())
                if now_in.rooms:
                    sender.standing[key] = now_in
                else:
                    del sender.standing[key]

    def _replay_to(self, sender: Connection, announcement: _Standing, users: set[str]) -> None:
        for recipient in self._online_devices(users, sender.device_id):
            self._replay_one(sender, announcement, _Replay(recipient))

    def _presence_between(self, user: str, others: frozenset[str], *, online: bool) -> None:
        if not others:
            return
        now = self.clock()
        mine = list(self._online_by_user.get(user, {}).values())
        theirs = list(self._online_devices(others - {user}, ""))
        for a in mine:
            for b in theirs:
                a.push(dump_ws(Presence(device_id=b.device_id, online=online, at=now)))
                b.push(dump_ws(Presence(device_id=a.device_id, online=online, at=now)))

    # ------------------------------------------------------------ socket lifetime

    def add_session_sockets(self, holder: SessionSockets) -> None:
        """Let the sweep also close ``holder``'s sockets (the relay registers itself)."""
        self._holders.append(holder)

    def session_ids(self) -> set[str]:
        return {connection.auth_session for connection in self._connections.values()}

    def close_sessions(self, session_ids: Collection[str], code: int = CLOSE_REVOKED) -> None:
        """Close every socket of these sessions now (4403: revoked)."""
        wanted = set(session_ids)
        for connection in list(self._connections.values()):
            if connection.auth_session in wanted:
                log.info("closing %s: session revoked", connection.device_id[:12])
                connection.close(code, "session revoked")

    def close_expired(self, now: float) -> None:
        for connection in list(self._connections.values()):
            if connection.expires_at <= now:
                connection.close(CLOSE_UNAUTHORIZED, "access token expired")

    def prune(self, now: float) -> None:
        online = self._connections.keys()
        for table in (self._frames, self._announcements, self._announced_bytes):
            table.prune(now, online)

    def ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(
                self._sweep_loop(), name="hub-session-sweep"
            )

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.limits.sweep_interval)
            if not any(holder.session_ids() for holder in self._holders):
                self._renewed.clear()
                return  # the next socket starts it again
            try:
                await self.sweep()
            except Exception:  # the next sweep tries again; sockets must not outlive this loop
                log.warning("socket sweep failed", exc_info=True)

    def stop(self) -> None:
        """The server is shutting down: no more sweeps (callable from any thread)."""
        sweeper = self._sweeper
        if sweeper is not None and not sweeper.done():
            with contextlib.suppress(RuntimeError):  # its loop is closed: nothing runs anyway
                sweeper.get_loop().call_soon_threadsafe(sweeper.cancel)

    async def sweep(self) -> None:
        """Close sockets whose session is gone (4403) or whose token expired (4401)."""
        ids = set().union(*(holder.session_ids() for holder in self._holders))
        live = await self._db.call(Store.live_sessions, ids) if ids else frozenset()
        now = self.clock()
        for holder in self._holders:
            holder.close_sessions(ids - live, CLOSE_REVOKED)
            holder.close_expired(now)
            holder.prune(now)
        self._renewed = {s: t for s, t in self._renewed.items() if s in live and t > now}


def _change_kind(change: MembershipChange, before: frozenset[str]) -> str:
    if change.role is None:
        return "room.member_removed"
    return "room.role_changed" if change.user in before else "room.member_added"


def _without_room(announcement: _Standing, room: str) -> _Standing:
    return _Standing(
        key=announcement.key,
        kind=announcement.kind,
        data=announcement.data,
        to=announcement.to,
        rooms=announcement.rooms - {room},
        size=announcement.size,
    )


def _event_frame(
    kind: str, sender: str, announcement: _Standing, key: str | None, rooms: list[str]
) -> str:
    # ``from`` is a Python keyword: the field is set by its alias.
    return dump_ws(
        ServerEvent.model_validate(
            {"kind": kind, "from": sender, "data": announcement.data, "key": key, "rooms": rooms}
        )
    )


def _cached_frame(
    frames: dict[tuple[str, ...], str],
    kind: str,
    sender: str,
    announcement: _Standing,
    key: str | None,
    rooms: list[str],
) -> str:
    """One serialisation per distinct ``rooms`` among the recipients of one fan-out."""
    cache_key = tuple(rooms)
    frame = frames.get(cache_key)
    if frame is None:
        frame = frames[cache_key] = _event_frame(kind, sender, announcement, key, rooms)
    return frame


def _error(code: str, message: str, *, device_id: str | None = None) -> str:
    return dump_ws(WsError(error=code, message=message, device_id=device_id))


def _first_problem(exc: ValidationError) -> str:
    problem = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in problem["loc"])
    return f"Bad frame: {where}: {problem['msg']}" if where else f"Bad frame: {problem['msg']}"
