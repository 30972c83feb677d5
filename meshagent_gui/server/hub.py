"""The WebSocket hub: presence, signal relay, announcements, room events.

Built for thousands of connections in one process: everything a frame needs is in memory
(device -> connection, user -> online devices, user -> users sharing a room), so a presence
change costs one serialisation plus one queue append per online peer. Peer sets come from the
database once per user and are dropped whenever a room membership changes.

Each connection has a bounded outbox drained by its own writer task; a client that lets it
fill up is disconnected instead of growing the server's memory.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from pydantic import ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect

from meshagent_gui.core.mesh.types import (
    WS_MESSAGE,
    Announce,
    Event,
    Hello,
    Presence,
    Signal,
    Withdraw,
    WsError,
    dump_ws,
)
from meshagent_gui.server.store import AsyncStore, MembershipChange, Principal, Store

log = logging.getLogger(__name__)

CLOSE_REPLACED: Final = 4409  # another connection of the same device took over
CLOSE_TOO_SLOW: Final = 1008  # the outbox overflowed
CLOSE_TOO_BIG: Final = 1009
RESERVED_KIND_PREFIX: Final = "room."
ENDED_SUFFIX: Final = ".ended"


@dataclass(frozen=True)
class HubLimits:
    max_frame_bytes: int = 64 * 1024
    max_queued_bytes: int = 1024 * 1024  # per connection
    max_standing: int = 64  # standing announcements per connection
    max_recipients: int = 256  # entries in an announcement's ``to``
    frames_per_second: float = 50.0
    frame_burst: float = 200.0
    close_timeout: float = 5.0


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        self._rate, self._burst = rate, burst
        self._tokens, self._stamp = burst, now

    def take(self, now: float, amount: float = 1.0) -> bool:
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens < amount:
            return False
        self._tokens -= amount
        return True


@dataclass(frozen=True)
class _Standing:
    key: str
    kind: str
    data: dict[str, Any]
    to: frozenset[str] | None

    def visible_to(self, device_id: str) -> bool:
        return self.to is None or device_id in self.to

    def frame(self, sender: str) -> str:
        return _event_frame(self.kind, sender, self.data, self.key)

    def ended_frame(self, sender: str) -> str:
        return _event_frame(self.kind + ENDED_SUFFIX, sender, self.data, self.key)


class Connection:
    """One agent's WebSocket: identity, standing announcements and the bounded outbox."""

    def __init__(self, principal: Principal, limits: HubLimits, now: float) -> None:
        self.device_id = principal.device_id
        self.user = principal.user
        self.session_id = secrets.token_hex(8)
        self.standing: dict[str, _Standing] = {}
        self.bucket = TokenBucket(limits.frames_per_second, limits.frame_burst, now)
        self._limits = limits
        self._outbox: deque[str] = deque()
        self._queued_bytes = 0
        self._wakeup = asyncio.Event()
        self._close: tuple[int, str] | None = None
        self._writer: asyncio.Task[None] | None = None

    @property
    def closing(self) -> bool:
        return self._close is not None

    def push(self, frame: str) -> None:
        """Queue a frame; a client too slow to take it is disconnected, not buffered for."""
        if self._close is not None:
            return
        if self._outbox and self._queued_bytes + len(frame) > self._limits.max_queued_bytes:
            log.warning("dropping device %s: it does not read its frames", self.device_id[:12])
            self._close = (CLOSE_TOO_SLOW, "too slow")
            if self._writer is not None:
                # It is probably stuck in a send that will never finish.
                self._writer.cancel()
            return
        self._outbox.append(frame)
        self._queued_bytes += len(frame)
        self._wakeup.set()

    def close(self, code: int, reason: str) -> None:
        if self._close is None:
            self._close = (code, reason)
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
        self.limits = limits or HubLimits()
        self._clock = clock
        self._connections: dict[str, Connection] = {}
        self._online_by_user: dict[str, dict[str, Connection]] = {}
        self._peers: dict[str, frozenset[str]] = {}
        self._peers_generation = 0

    # ------------------------------------------------------------ queries

    def is_online(self, device_id: str) -> bool:
        return device_id in self._connections

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def peer_users(self, user: str) -> frozenset[str]:
        cached = self._peers.get(user)
        if cached is not None:
            return cached
        generation = self._peers_generation
        peers = await self._db.call(Store.peer_users, user)
        if generation == self._peers_generation:  # no membership change while we read
            self._peers[user] = peers
        return peers

    def _online_peers(self, peers: frozenset[str], exclude: str) -> Iterator[Connection]:
        for user in peers:
            for device_id, connection in self._online_by_user.get(user, {}).items():
                if device_id != exclude:
                    yield connection

    # ------------------------------------------------------------ connection lifecycle

    async def serve(self, websocket: WebSocket, principal: Principal) -> None:
        """Run one accepted, authenticated WebSocket until either side ends it."""
        connection = Connection(principal, self.limits, self._clock())
        try:
            await self._attach(connection)
            async with asyncio.TaskGroup() as tasks:
                reader = tasks.create_task(self._read_loop(connection, websocket))
                writer = tasks.create_task(connection.write_loop(websocket))
                # Whichever ends first ends the other: the connection is over.
                reader.add_done_callback(lambda _: writer.cancel())
                writer.add_done_callback(lambda _: reader.cancel())
        finally:
            await self._detach(connection)

    async def _attach(self, connection: Connection) -> None:
        peers = await self.peer_users(connection.user)
        now = self._clock()
        device_id = connection.device_id
        previous = self._connections.get(device_id)
        self._connections[device_id] = connection
        self._online_by_user.setdefault(connection.user, {})[device_id] = connection
        if previous is not None:
            self._end_standing(previous, peers)
            previous.close(CLOSE_REPLACED, "replaced by a newer connection")
        online = list(self._online_peers(peers, device_id))
        connection.push(
            dump_ws(
                Hello(
                    device_id=device_id,
                    session_id=connection.session_id,
                    server_time=now,
                    heartbeat_interval=self.heartbeat_interval,
                    online=[peer.device_id for peer in online],
                )
            )
        )
        for peer in online:
            self._replay_standing(peer, connection)
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
        now = self._clock()
        del self._connections[device_id]
        devices = self._online_by_user[connection.user]
        del devices[device_id]
        if not devices:
            del self._online_by_user[connection.user]
        self._end_standing(connection, peers)
        presence = dump_ws(Presence(device_id=device_id, online=False, at=now))
        for peer in self._online_peers(peers, device_id):
            peer.push(presence)
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
            if not connection.bucket.take(self._clock()):
                connection.push(_error("rate_limited", "Too many frames; slow down."))
                continue
            try:
                frame = WS_MESSAGE.validate_json(text)
            except ValidationError as exc:
                connection.push(_error("bad_message", _first_problem(exc)))
                continue
            if isinstance(frame, Signal):
                await self._relay_signal(connection, frame)
            elif isinstance(frame, Announce):
                await self._announce(connection, frame)
            elif isinstance(frame, Withdraw):
                await self._withdraw(connection, frame.key)
            else:
                connection.push(_error("bad_message", f"Agents do not send {frame.type!r} frames."))

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
        elif target.user not in peers or target_id == connection.device_id:
            connection.push(
                _error("not_allowed", "You share no room with that device.", device_id=target_id)
            )
        else:
            relayed = Signal.model_validate(
                {"from": connection.device_id, "payload": frame.payload}
            )
            target.push(dump_ws(relayed))

    async def _announce(self, connection: Connection, frame: Announce) -> None:
        if frame.kind.startswith(RESERVED_KIND_PREFIX) or frame.kind.endswith(ENDED_SUFFIX):
            connection.push(_error("bad_message", f"The kind {frame.kind!r} is reserved."))
            return
        if frame.to is not None and len(frame.to) > self.limits.max_recipients:
            connection.push(_error("bad_message", "Too many recipients in 'to'."))
            return
        announcement = _Standing(
            key=frame.key or "",
            kind=frame.kind,
            data=frame.data,
            to=None if frame.to is None else frozenset(frame.to),
        )
        if frame.key is not None:
            full = len(connection.standing) >= self.limits.max_standing
            if full and frame.key not in connection.standing:
                connection.push(_error("rate_limited", "Too many standing announcements."))
                return
            connection.standing[frame.key] = announcement
        event = _event_frame(frame.kind, connection.device_id, frame.data, frame.key)
        peers = await self.peer_users(connection.user)
        for peer in self._online_peers(peers, connection.device_id):
            if announcement.visible_to(peer.device_id):
                peer.push(event)

    async def _withdraw(self, connection: Connection, key: str) -> None:
        announcement = connection.standing.pop(key, None)
        if announcement is None:
            return  # withdrawing twice is harmless
        peers = await self.peer_users(connection.user)
        ended = announcement.ended_frame(connection.device_id)
        for peer in self._online_peers(peers, connection.device_id):
            if announcement.visible_to(peer.device_id):
                peer.push(ended)

    def _end_standing(self, connection: Connection, peers: frozenset[str]) -> None:
        if not connection.standing:
            return
        recipients = list(self._online_peers(peers, connection.device_id))
        for announcement in connection.standing.values():
            ended = announcement.ended_frame(connection.device_id)
            for peer in recipients:
                if announcement.visible_to(peer.device_id):
                    peer.push(ended)
        connection.standing.clear()

    def _replay_standing(self, source: Connection, recipient: Connection) -> None:
        for announcement in source.standing.values():
            if announcement.visible_to(recipient.device_id):
                recipient.push(announcement.frame(source.device_id))

    # ------------------------------------------------------------ room membership

    def membership_changed(self, change: MembershipChange) -> None:
        """Tell the room about a new member, and introduce devices that can now see each other."""
        self._peers.clear()
        self._peers_generation += 1
        event = dump_ws(
            Event(
                kind="room.member_added",
                data={"room": change.room, "user": change.user, "role": change.role},
            )
        )
        for user in change.members | {change.user}:
            for connection in self._online_by_user.get(user, {}).values():
                connection.push(event)
        if not change.newly_shared:
            return
        now = self._clock()
        joiners = list(self._online_by_user.get(change.user, {}).values())
        for user in change.newly_shared:
            for other in self._online_by_user.get(user, {}).values():
                for joiner in joiners:
                    joiner.push(dump_ws(Presence(device_id=other.device_id, online=True, at=now)))
                    other.push(dump_ws(Presence(device_id=joiner.device_id, online=True, at=now)))
                    self._replay_standing(other, joiner)
                    self._replay_standing(joiner, other)


def _event_frame(kind: str, sender: str, data: dict[str, Any], key: str | None) -> str:
    # ``from`` is a Python keyword: the field is set by its alias.
    return dump_ws(Event.model_validate({"kind": kind, "from": sender, "data": data, "key": key}))


def _error(code: str, message: str, *, device_id: str | None = None) -> str:
    return dump_ws(WsError(error=code, message=message, device_id=device_id))


def _first_problem(exc: ValidationError) -> str:
    problem = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in problem["loc"])
    return f"Bad frame: {where}: {problem['msg']}" if where else f"Bad frame: {problem['msg']}"
