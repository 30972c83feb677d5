"""Single-use WebSocket tickets: how a browser authenticates ``GET /ws`` without a header.

A page cannot set ``Authorization`` on a WebSocket, and an access token in a URL would end up
in logs and history. So the page trades its token (in a header, ``POST /ws/ticket``) for a
ticket that opens one socket of that same device within 30 seconds and is then spent. Tickets
live in memory only (a server restart spends them all) and are kept as hashes; a device holds
at most a few at once and the book as a whole is bounded, oldest forgotten first, so a flood
of requests costs the server a fixed amount of memory.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from meshagent_gui.core.mesh.types import WS_TICKET_TTL
from meshagent_gui.server.store import Principal, secret_hash

MAX_TICKETS_PER_DEVICE: Final = 8
MAX_TICKETS: Final = 10_000


@dataclass(frozen=True)
class _Ticket:
    principal: Principal
    expires_at: float


class TicketBook:
    def __init__(
        self,
        *,
        ttl: float = WS_TICKET_TTL,
        per_device: int = MAX_TICKETS_PER_DEVICE,
        capacity: int = MAX_TICKETS,
    ) -> None:
        self.ttl = ttl
        self._per_device = per_device
        self._capacity = capacity
        self._tickets: OrderedDict[str, _Ticket] = OrderedDict()  # hash -> ticket, oldest first
        self._by_device: dict[str, list[str]] = {}  # device -> its tickets' hashes, oldest first

    def __len__(self) -> int:
        return len(self._tickets)

    def issue(self, principal: Principal, now: float) -> str:
        """A new ticket for ``principal``'s device; its oldest ones go beyond the per-device cap."""
        self._drop_expired(now)
        mine = self._by_device.setdefault(principal.device_id, [])
        while len(mine) >= self._per_device:
            self._forget(mine[0])
        while len(self._tickets) >= self._capacity:
            self._forget(next(iter(self._tickets)))
        ticket = secrets.token_urlsafe(32)
        hashed = secret_hash(ticket)
        self._tickets[hashed] = _Ticket(principal, now + self.ttl)
        self._by_device.setdefault(principal.device_id, []).append(hashed)
        return ticket

    def redeem(self, ticket: str, now: float) -> Principal | None:
        """The principal the ticket was issued to, once; None if unknown, spent or expired."""
        found = self._forget(secret_hash(ticket))
        if found is None or found.expires_at <= now:
            return None
        return found.principal

    def _drop_expired(self, now: float) -> None:
        while self._tickets:
            oldest = next(iter(self._tickets.values()))
            if oldest.expires_at > now:
                return
            self._forget(next(iter(self._tickets)))

    def _forget(self, hashed: str) -> _Ticket | None:
        found = self._tickets.pop(hashed, None)
        if found is not None:
            device = found.principal.device_id
            mine = self._by_device[device]
            mine.remove(hashed)  # at most MAX_TICKETS_PER_DEVICE long
            if not mine:
                del self._by_device[device]
        return found
