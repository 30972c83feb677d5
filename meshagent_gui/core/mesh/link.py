"""The agent's one WebSocket to the Mesh Server, kept up for as long as the agent runs.

Reconnects with capped exponential backoff and jitter; after each reconnect it rebuilds
presence from ``hello`` and re-sends its standing announcements, so peers see the same state
as before the break. Incoming frames become core events on the bus.

The server closes the socket when the access token it was opened with expires (4401) or the
session is revoked (4403). So the link refreshes the token before ``hello.access_expires_at``
and hands every new token to the server in-band (an ``auth`` frame): the socket, presence and
standing announcements live on across refreshes. A revoked session whose refresh is refused
ends in one clear reason, :data:`~.authed_socket.ENROL_AGAIN`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Final, Literal

from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from meshagent_gui.core.bus import EventBus
from meshagent_gui.core.events import (
    AnnouncementReceived,
    PeerCameOnline,
    PeerWentOffline,
    ServerConnected,
    ServerDisconnected,
    SignalReceived,
)
from meshagent_gui.units import plural

from .authed_socket import ENROL_AGAIN, refreshable, run_authed_socket
from .backoff import Backoff
from .client import MeshClient, MeshError, ws_url
from .types import (
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

log = logging.getLogger(__name__)

CLOSE_REPLACED: Final = 4409  # a newer connection of this same device took over
OPEN_TIMEOUT: Final = 10.0
REFRESH_AT: Final = 0.8  # of the token's remaining lifetime
MIN_REFRESH_DELAY: Final = 1.0
LinkState = Literal["offline", "connecting", "online"]


class MeshLink:
    def __init__(
        self,
        client: MeshClient,
        bus: EventBus,
        *,
        reconnect_max: float = 30.0,
        device_name: Callable[[str], str] | None = None,
    ) -> None:
        self._client = client
        self._bus = bus
        self._backoff = Backoff(cap=reconnect_max)
        self._device_name = device_name or (lambda device_id: device_id[:12])
        self._ws: ClientConnection | None = None
        self._standing: dict[str, Announce] = {}
        self._connected = asyncio.Event()
        self.state: LinkState = "offline"
        self.online: set[str] = set()
        self.session_id: str | None = None
        self.clock_skew: float | None = None
        self.last_error: str | None = None
        self.connects = 0
        self._token_lifetime: float | None = None  # from hello: until the server closes us
        self._told_enrol_again = False
        self._background: set[asyncio.Task[None]] = set()
        client.token_listeners.append(self._on_new_token)

    # ------------------------------------------------------------ API for the core

    async def wait_connected(self, timeout: float) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def signal(self, to: str, payload: dict[str, Any]) -> None:
        await self._send(dump_ws(Signal(to=to, payload=payload)))

    async def announce(
        self,
        kind: str,
        data: dict[str, Any],
        *,
        to: list[str] | None = None,
        key: str | None = None,
        rooms: list[str] | None = None,
    ) -> None:
        """Tell devices about something: into ``rooms`` (None: this user's own devices only),
        narrowed to the devices ``to``; with ``key`` it stands until withdrawn."""
        message = Announce(kind=kind, data=data, to=to, key=key, rooms=rooms)
        if key is not None:
            self._standing[key] = message
        if self._ws is not None:
            await self._send(dump_ws(message))

    async def withdraw(self, key: str) -> None:
        if self._standing.pop(key, None) is not None and self._ws is not None:
            await self._send(dump_ws(Withdraw(key=key)))

    async def _send(self, text: str) -> None:
        ws = self._ws
        if ws is None:
            raise MeshError("not connected to the Mesh Server", code="offline")
        try:
            await asyncio.wait_for(ws.send(text), OPEN_TIMEOUT)
        except (ConnectionClosed, TimeoutError) as exc:
            raise MeshError("the connection to the Mesh Server dropped", code="offline") from exc

    # ------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Stay connected until cancelled."""
        while True:
            reason = await self._session()
            self._went_offline()
            delay = self._backoff.next_delay()
            if reason.startswith(f"closed ({CLOSE_REPLACED})"):
                # Two agents with one identity would steal the connection from each other.
                reason = "replaced by another agent running with this device's identity"
                delay = self._backoff.cap
            if reason == ENROL_AGAIN:
                # Nothing changes until someone enrols this device again: say it once, loudly.
                delay = self._backoff.cap
                if not self._told_enrol_again:
                    self._told_enrol_again = True
                    log.warning("Mesh Server: %s", reason)
            self.last_error = reason
            log.info("server connection lost (%s); retrying in %.1fs", reason, delay)
            self._bus.publish(ServerDisconnected(self._client.url, reason, delay))
            await asyncio.sleep(delay)

    async def _session(self) -> str:
        """One connection from open to close; returns why it ended."""
        self.state = "connecting"
        return await run_authed_socket(
            self._client,
            ws_url(self._client.url),
            self._serve,
            on_refresh_error=self._note_error,
            open_timeout=OPEN_TIMEOUT,
            close_timeout=2,
            max_size=2**16,
            ping_interval=10,
            ping_timeout=10,
        )

    def _note_error(self, message: str) -> None:
        self.last_error = message

    async def _serve(self, ws: ClientConnection) -> str:
        self._ws = ws
        renewal: asyncio.Task[None] | None = None
        try:
            async for raw in ws:
                self._handle(raw)
                if self.state == "connecting" and self.session_id is not None:
                    await self._resume()
                    if self._token_lifetime is not None:
                        renewal = asyncio.create_task(
                            self._keep_token_fresh(self._token_lifetime), name="mesh-token"
                        )
        except ConnectionClosed as exc:
            if refreshable(exc):
                raise  # run_authed_socket refreshes the token and tries again
            return f"closed ({exc.rcvd.code})" if exc.rcvd else "connection dropped"
        finally:
            self._ws = None
            if renewal is not None:
                renewal.cancel()
        return "closed by the server"

    async def _keep_token_fresh(self, remaining: float) -> None:
        """Refresh before the server closes this socket (4401); the new token goes in-band."""
        while True:
            await asyncio.sleep(max(remaining * REFRESH_AT, MIN_REFRESH_DELAY))
            try:
                await self._client.refresh(self._client.access_token)  # -> _on_new_token
            except MeshError as exc:
                # The socket closes at expiry; the reconnect then says what is wrong.
                log.warning("cannot refresh the session: %s", exc.message)
                self.last_error = exc.message
                return
            expires = self._client.access_expires_at
            remaining = expires - time.time() if expires is not None else remaining

    def _on_new_token(self, token: str) -> None:
        """Whoever refreshed (this link, a REST call), the open socket gets the new token."""
        if self._ws is None:
            return
        task = asyncio.get_running_loop().create_task(self._send_auth(token))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_auth(self, token: str) -> None:
        with contextlib.suppress(MeshError):  # dropped: the reconnect uses the new token
            await self._send(dump_ws(Auth(access_token=token)))

    async def _resume(self) -> None:
        self.state = "online"
        self._backoff.reset()
        self._told_enrol_again = False
        log.info("connected to %s (%s online)", self._client.url, plural(len(self.online), "peer"))
        for message in list(self._standing.values()):
            # Inside the session: a drop here ends it like any other (ConnectionClosed).
            assert self._ws is not None
            await asyncio.wait_for(self._ws.send(dump_ws(message)), OPEN_TIMEOUT)
        self._connected.set()
        self._bus.publish(
            ServerConnected(self._client.url, self.session_id or "", self.clock_skew or 0.0)
        )

    def _went_offline(self) -> None:
        self.state = "offline"
        self.session_id = None
        self._connected.clear()
        for device_id in sorted(self.online):
            self._bus.publish(PeerWentOffline(device_id, self._device_name(device_id)))
        self.online.clear()

    def _handle(self, raw: str | bytes) -> None:
        try:
            message = WS_MESSAGE.validate_json(raw)
        except ValidationError:
            log.warning("ignored a malformed frame from the server")
            return
        match message:
            case ServerHello():
                self.session_id = message.session_id
                self._token_lifetime = (
                    None
                    if message.access_expires_at is None
                    else message.access_expires_at - message.server_time
                )
                self.clock_skew = message.server_time - time.time()
                self.connects += 1
                now_online = set(message.online)
                for device_id in sorted(self.online - now_online):
                    self._bus.publish(PeerWentOffline(device_id, self._device_name(device_id)))
                for device_id in sorted(now_online - self.online):
                    self._bus.publish(PeerCameOnline(device_id, self._device_name(device_id)))
                self.online = now_online
            case Presence(device_id=device_id, online=True):
                if device_id not in self.online:
                    self.online.add(device_id)
                    self._bus.publish(PeerCameOnline(device_id, self._device_name(device_id)))
            case Presence(device_id=device_id, online=False):
                if device_id in self.online:
                    self.online.discard(device_id)
                    self._bus.publish(PeerWentOffline(device_id, self._device_name(device_id)))
            case Signal():
                self._bus.publish(SignalReceived(message.from_ or "", message.payload))
            case ServerEvent():
                self._bus.publish(
                    AnnouncementReceived(
                        message.kind, message.from_, message.data, tuple(message.rooms)
                    )
                )
            case WsError():
                log.warning("the server refused a frame: %s (%s)", message.message, message.error)
            case _:
                log.debug("ignored %s frame", message.type)
