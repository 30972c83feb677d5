"""What peers announce to us of one kind (their shared terminal sessions, their exposed
tunnels), as a table kept current from the event bus.

An announcement of the kind sets its entry, keyed by (sender, the announcement's key field);
``<kind>.ended`` drops it; a device going offline drops its entries; a reconnect to the server
drops all, since the server replays the announcements that still stand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from meshagent_gui.core.events import (
    AnnouncementReceived,
    Event,
    PeerWentOffline,
    ServerConnected,
)

V = TypeVar("V")


class PeerAnnouncements(Generic[V]):
    """``entries``: (sender, key) -> what ``read`` made of the announcement (None: ignored)."""

    def __init__(
        self,
        kind: str,
        key_field: str,
        read: Callable[[AnnouncementReceived, str], V | None],
    ) -> None:
        self.kind = kind
        self._key_field = key_field
        self._read = read
        self.entries: dict[tuple[str, str], V] = {}

    def follow(self, event: Event) -> bool:
        """Bring the table up to date with ``event``; False if it is about no announcement."""
        match event:
            case AnnouncementReceived(sender=sender) if sender:
                self._announcement(event, sender)
            case PeerWentOffline(device_id=device_id):
                for key in [k for k in self.entries if k[0] == device_id]:
                    del self.entries[key]
            case ServerConnected():
                self.entries.clear()
            case _:
                return False
        return True

    def _announcement(self, event: AnnouncementReceived, sender: str) -> None:
        key = event.data.get(self._key_field)
        if not isinstance(key, str):
            return
        if event.kind == f"{self.kind}.ended":
            self.entries.pop((sender, key), None)
        elif event.kind == self.kind:
            value = self._read(event, sender)
            if value is not None:
                self.entries[(sender, key)] = value
