"""Which core events become notifications, how they read, and where they go.

The rules are data (:data:`RULES`): an event type, the ``notify.<kind>`` config key that holds its
Gotify priority (``-1``, or any negative number, switches it off) and a function that words it.
Events without a rule are ignored, so the core can grow new events freely.
"""

from __future__ import annotations

import asyncio
import logging
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, Protocol, TypeVar

from meshagent_gui.config import KEYS
from meshagent_gui.core.events import (
    ControlRequested,
    NewerAgentAnnounced,
    PeerCameOnline,
    PeerWentOffline,
    SyncConflict,
    SyncFailed,
    TransferCompleted,
    TransferFailed,
    TransferOutcome,
)
from meshagent_gui.core.notify.gotify import GotifyClient
from meshagent_gui.errors import UserError
from meshagent_gui.units import human_size

log = logging.getLogger(__name__)

OFF: Final = -1
_MAX_FIELD: Final = 200


@dataclass(frozen=True)
class Notification:
    """One notification, ready for any sink (Gotify, desktop toast)."""

    kind: str
    title: str
    message: str
    priority: int
    click_url: str | None = None


class NotificationSink(Protocol):
    """Somewhere notifications go. ``deliver`` may raise; the router logs and carries on."""

    async def deliver(self, notification: Notification) -> None: ...


E = TypeVar("E")
NameOf = Callable[[str], str]  # a device id -> the name people know it by


def _short_id(device_id: str) -> str:
    # What `meshagent devices` shows when no name is known: never all 64 hex digits.
    return device_id[:12]


@dataclass(frozen=True)
class NotificationRule(Generic[E]):
    """How one event type notifies: its kind (``notify.<kind>``) and its wording."""

    kind: str
    words: Callable[[E, NameOf], tuple[str, str]]  # event, device namer -> (title, message)

    @property
    def config_key(self) -> str:
        return f"notify.{self.kind}"


def _clean(text: str) -> str:
    # Names come from peers: drop control characters (newlines, escapes) and cap the length.
    kept = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text)
    kept = " ".join(kept.split())
    return kept if len(kept) <= _MAX_FIELD else kept[: _MAX_FIELD - 1] + "…"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _peer_online(event: PeerCameOnline, _: NameOf) -> tuple[str, str]:
    return f"{_clean(event.name)} is online", f"Device {_clean(event.name)} joined the mesh."


def _peer_offline(event: PeerWentOffline, _: NameOf) -> tuple[str, str]:
    return f"{_clean(event.name)} is offline", f"Device {_clean(event.name)} left the mesh."


def _transfer_completed(event: TransferCompleted, name_of: NameOf) -> tuple[str, str]:
    detail = f"{human_size(event.size)} in {_duration(event.seconds)}"
    if event.seconds > 0:
        detail += f" ({human_size(round(event.size / event.seconds))}/s)"
    return (
        "Transfer complete",
        f"{_clean(event.name)} with {_clean(name_of(event.peer))}: {detail}.",
    )


# A TransferFailed's title, by the outcome the core set: a cancel, a declined offer or a pause
# of this device is no failure.
_FAILED_TITLES: Final = {
    TransferOutcome.FAILED: "Transfer failed",
    TransferOutcome.CANCELLED: "Transfer cancelled",
    TransferOutcome.DECLINED: "Transfer declined",
    TransferOutcome.INTERRUPTED: "Transfer interrupted (will resume)",
}


def _transfer_failed(event: TransferFailed, name_of: NameOf) -> tuple[str, str]:
    return (
        _FAILED_TITLES[event.outcome],
        f"{_clean(event.name)} with {_clean(name_of(event.peer))}: {_clean(event.reason)}",
    )


def _control_requested(event: ControlRequested, _: NameOf) -> tuple[str, str]:
    return (
        "Terminal control requested",
        f"{_clean(event.device_name)} asks to control your terminal"
        f" (session {_clean(event.session_id)}).",
    )


def _sync_conflict(event: SyncConflict, _: NameOf) -> tuple[str, str]:
    return (
        f"Sync conflict in {_clean(event.label)}",
        f"{_clean(event.name)} was changed here and on {_clean(event.peer_name)}: this"
        f" device's version is kept as {_clean(event.conflict_name)}.",
    )


def _sync_failed(event: SyncFailed, _: NameOf) -> tuple[str, str]:
    return f"Sync of {_clean(event.label)} stopped", _clean(event.message)


def _update_available(event: NewerAgentAnnounced, _: NameOf) -> tuple[str, str]:
    return (
        f"Mesh Agent {_clean(event.version)} is available",
        f"This is {_clean(event.current)}: install the new release to update.",
    )


RULES: Final[Mapping[type, NotificationRule[Any]]] = {
    SyncConflict: NotificationRule("sync_conflict", _sync_conflict),
    SyncFailed: NotificationRule("sync_failed", _sync_failed),
    NewerAgentAnnounced: NotificationRule("update_available", _update_available),
    TransferCompleted: NotificationRule("transfer_completed", _transfer_completed),
    TransferFailed: NotificationRule("transfer_failed", _transfer_failed),
    ControlRequested: NotificationRule("control_requested", _control_requested),
    PeerWentOffline: NotificationRule("peer_offline", _peer_offline),
    PeerCameOnline: NotificationRule("peer_online", _peer_online),
}


class NotificationRouter:
    """Turns events into notifications and hands them to every sink.

    ``priorities`` maps ``notify.<kind>`` to a priority; the :class:`~meshagent_gui.config.Config`
    itself fits, and is read on every event so that settings changes apply at once. A missing key
    falls back to its default in :data:`meshagent_gui.config.KEYS`. ``device_name`` names the
    device ids events carry (a transfer's peer); by default the short id.
    """

    def __init__(
        self,
        priorities: Mapping[str, Any],
        sinks: Sequence[NotificationSink],
        *,
        sink_timeout: float = 60.0,
        device_name: NameOf = _short_id,
    ) -> None:
        self._priorities = priorities
        self._sinks = tuple(sinks)
        self._sink_timeout = sink_timeout
        self._device_name = device_name

    def route(self, event: object) -> Notification | None:
        """The notification ``event`` should raise, or None (no rule, or switched off)."""
        rule = RULES.get(type(event))
        if rule is None:
            return None
        priority = self._priority(rule.config_key)
        if priority is None:
            return None
        title, message = rule.words(event, self._device_name)
        return Notification(rule.kind, title, message, priority)

    async def handle(self, event: object) -> None:
        """Route ``event`` and deliver it; never raises because a sink failed."""
        notification = self.route(event)
        if notification is not None:
            await self.deliver(notification)

    async def deliver(self, notification: Notification) -> None:
        """Give ``notification`` to every sink at once; one sink's failure spares the others."""
        async with asyncio.TaskGroup() as group:
            for sink in self._sinks:
                group.create_task(self._deliver_to(sink, notification))

    async def _deliver_to(self, sink: NotificationSink, notification: Notification) -> None:
        try:
            async with asyncio.timeout(self._sink_timeout):
                await sink.deliver(notification)
        except UserError as exc:
            log.warning("%s notification not delivered by %r: %s", notification.kind, sink, exc)
        except TimeoutError:
            log.warning(
                "%s notification not delivered by %r: no answer within %.0fs",
                notification.kind,
                sink,
                self._sink_timeout,
            )
        except Exception:
            log.exception("%s notification not delivered by %r", notification.kind, sink)

    def _priority(self, config_key: str) -> int | None:
        default = KEYS[config_key].default if config_key in KEYS else OFF
        raw = self._priorities.get(config_key, default)
        priority = _whole_number(raw)
        if priority is None:
            log.warning("%s must be a whole number (priority, -1 = off), not %r", config_key, raw)
            return None
        return None if priority < 0 else priority


def _whole_number(raw: object) -> int | None:
    # TOML gives ints; a hand-edited file may give "5", which is still meant as a priority.
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        return None
    try:
        return int(raw)
    except ValueError:
        return None


class GotifySink:
    """Delivers notifications to Gotify with the notification's priority."""

    def __init__(self, client: GotifyClient) -> None:
        self._client = client

    def __repr__(self) -> str:
        return f"GotifySink({self._client!r})"

    async def deliver(self, notification: Notification) -> None:
        await self._client.send(
            notification.title,
            notification.message,
            priority=notification.priority,
            click_url=notification.click_url,
        )
