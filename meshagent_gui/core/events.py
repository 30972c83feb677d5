"""What the core tells its front ends (tray app, CLI): past-tense facts as frozen dataclasses.

The core publishes them on :class:`meshagent_gui.core.bus.EventBus`; the UI and the
notification router subscribe. Never put secrets or file/terminal contents in an event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar


@dataclass(frozen=True)
class Event:
    """Base class of every core event."""

    lossy: ClassVar[bool] = False
    """True for a running state (progress) of which only the newest matters: a subscriber that
    has not read one yet gets the newer one in its place (the bus keeps one per
    :attr:`subject`). Every other event reaches every subscriber, however far behind."""

    @property
    def subject(self) -> object:
        """What a lossy event is about: a newer lossy event with the same subject replaces it."""
        return type(self)


@dataclass(frozen=True)
class ServerConnected(Event):
    url: str
    session_id: str
    clock_skew: float


@dataclass(frozen=True)
class ServerDisconnected(Event):
    url: str
    reason: str
    retry_in: float


@dataclass(frozen=True)
class NewerAgentAnnounced(Event):
    """The server announced an agent release newer than ours (no self-update: the user installs)."""

    version: str
    current: str


@dataclass(frozen=True)
class PeerCameOnline(Event):
    device_id: str
    name: str


@dataclass(frozen=True)
class PeerWentOffline(Event):
    device_id: str
    name: str


@dataclass(frozen=True)
class SignalReceived(Event):
    sender: str
    payload: dict[str, Any] = field(hash=False)


@dataclass(frozen=True)
class AnnouncementReceived(Event):
    """An ``event`` frame from the server: room membership, terminal sessions, share offers."""

    kind: str
    sender: str | None
    data: dict[str, Any] = field(hash=False)
    rooms: tuple[str, ...] = ()
    """The announcement's rooms that we are in (the ones to ask capabilities in)."""


@dataclass(frozen=True)
class TransferCompleted(Event):
    transfer_id: str
    name: str
    peer: str
    size: int
    seconds: float
    where: str = ""
    """Where it landed: the one file, the one top folder, or the folder the items are in."""


class TransferOutcome(StrEnum):
    """How an unfinished transfer ended: set where :class:`TransferFailed` is published, so that
    front ends word it without parsing the reason."""

    FAILED = "failed"
    """An error: the disk, the network, the other end's refusal."""
    CANCELLED = "cancelled"
    """Someone (either side) cancelled it."""
    DECLINED = "declined"
    """The receiver declined the offer (its user, or its policy)."""
    INTERRUPTED = "interrupted"
    """This device stopped mid-receive: a pause; the sender resumes when it is back."""


@dataclass(frozen=True)
class TransferFailed(Event):
    """A transfer ended unfinished; :attr:`outcome` says how, :attr:`reason` says why in words."""

    transfer_id: str
    name: str
    peer: str
    reason: str
    outcome: TransferOutcome = TransferOutcome.FAILED


@dataclass(frozen=True)
class ControlRequested(Event):
    session_id: str
    device_id: str
    device_name: str


@dataclass(frozen=True)
class PathChanged(Event):
    """The connection to a peer now runs over ``kind`` (direct or relay)."""

    device_id: str
    kind: str
    local: str
    remote: str


@dataclass(frozen=True)
class TransferOffered(Event):
    """A peer offers files; the UI answers with Agent.answer_offer (unless auto-accepted)."""

    transfer_id: str
    peer: str
    peer_name: str
    names: tuple[str, ...]
    files: int
    total: int
    auto_accepted: bool


@dataclass(frozen=True)
class TransferAccepted(Event):
    transfer_id: str
    peer: str


@dataclass(frozen=True)
class TransferProgressed(Event):
    lossy: ClassVar[bool] = True

    transfer_id: str
    direction: str  # "send" or "receive"
    peer: str
    name: str
    done: int
    total: int
    rate: float  # bytes per second, smoothed
    eta: float | None  # seconds

    @property
    def subject(self) -> object:
        return (TransferProgressed, self.direction, self.transfer_id)


@dataclass(frozen=True)
class InvitationReceived(Event):
    """A room owner invited this device's user; nothing changes until the user accepts."""

    room: str
    role: str
    by: str


@dataclass(frozen=True)
class TransferWaiting(Event):
    """A send lost its receiver (stopped, restarted, cut off) and waits for it to come back."""

    transfer_id: str
    peer: str
    peer_name: str


# ------------------------------------------------------------------ folder sync (docs/sync.md)


@dataclass(frozen=True)
class SyncFolderOffered(Event):
    """A peer asks to sync a folder with us; the UI answers with ``Agent.sync.answer_offer``
    (unless auto-accepted, then this only tells)."""

    offer_id: str
    folder_id: str
    peer: str
    peer_name: str
    label: str
    auto_accepted: bool


@dataclass(frozen=True)
class SyncFolderAdded(Event):
    folder_id: str
    label: str
    path: str


@dataclass(frozen=True)
class SyncFolderRemoved(Event):
    """This device stopped syncing the folder (its files stay on disk)."""

    folder_id: str
    label: str


@dataclass(frozen=True)
class SyncStateChanged(Event):
    """A folder's state (``core.protocol.sync.FolderState``: starting, scanning, idle, syncing,
    paused, error); ``detail`` says why in words (the error, the files left)."""

    folder_id: str
    label: str
    state: str
    detail: str = ""


@dataclass(frozen=True)
class SyncConflict(Event):
    """Both sides changed ``name``; ours lost and was kept as ``conflict_name`` (both synced)."""

    folder_id: str
    label: str
    name: str
    conflict_name: str
    peer_name: str


@dataclass(frozen=True)
class SyncFailed(Event):
    """A folder stopped syncing because of an error (root gone, disk full); retried later."""

    folder_id: str
    label: str
    message: str


@dataclass(frozen=True)
class SyncFileChanged(Event):
    """A peer's change to ``name`` was applied here (lossy: for activity views)."""

    lossy: ClassVar[bool] = True

    folder_id: str
    label: str
    name: str
    peer_name: str
    deleted: bool

    @property
    def subject(self) -> object:
        return (SyncFileChanged, self.folder_id)


@dataclass(frozen=True)
class SyncPeerConnected(Event):
    """A sync stream with ``device_id`` for the folder is up (we pull from it, or it from us):
    the peer shows as connected. Published once per change, not per stream."""

    folder_id: str
    label: str
    device_id: str
    peer_name: str


@dataclass(frozen=True)
class SyncPeerDisconnected(Event):
    """The last sync stream with ``device_id`` for the folder ended (either way)."""

    folder_id: str
    label: str
    device_id: str
    peer_name: str
