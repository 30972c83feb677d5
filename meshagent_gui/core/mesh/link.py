"""The agent's one WebSocket to the Mesh Server, kept up for as long as the agent runs.

Reconnects with capped exponential backoff and jitter; after each reconnect it rebuilds
presence from ``hello`` and re-sends its standing announcements, so peers see the same state
as before the break. Incoming frames become core events on the bus.
"""

from __future__ import annotations

import asyncio
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

from .authed_socket import CLOSE_UNAUTHORIZED, run_authed_socket
from .backoff import Backoff
from .client import MeshClient, MeshError, ws_url
from .types import (
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

log = logging.getLogger(__name__)

CLOSE_REPLACED: Final = 4409  # a newer connection of this same device took over
OPEN_TIMEOUT: Final = 10.0
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
    ) -> None:
        message = Announce(kind=kind, data=data, to=to, key=key)
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
        try:
            async for raw in ws:
                self._handle(raw)
                if self.state == "connecting" and self.session_id is not None:
                    await self._resume()
        except ConnectionClosed as exc:
            if exc.rcvd and exc.rcvd.code == CLOSE_UNAUTHORIZED:
                raise
            return f"closed ({exc.rcvd.code})" if exc.rcvd else "connection dropped"
        finally:
            self._ws = None
        return "closed by the server"

    async def _resume(self) -> None:
        self.state = "online"
        self._backoff.reset()
        log.info("connected to %s (%d peers online)", self._client.url, len(self.online))
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
            case Hello():
                self.session_id = message.session_id
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
            case Event():
                self._bus.publish(AnnouncementReceived(message.kind, message.from_, message.data))
            case WsError():
                log.warning("the server refused a frame: %s (%s)", message.message, message.error)
            case _:
                log.debug("ignored %s frame", message.type)
