"""The agent's local IPC requests and replies, as types: decoded and checked once, at the edge.

The wire stays JSON objects with these field names (:mod:`meshagent_gui.core.ipc` frames them),
so a ``meshagent`` command and a running agent of this version agree. Every request names a
method; :data:`REQUESTS` gives the type of its ``params``. The server decodes a request's params
into that type before the handler runs: a frame of the wrong shape is one ``bad_request`` error
naming the field, never a ``KeyError`` inside a handler. Unknown fields are ignored (a newer
command may add some).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

import msgspec

if TYPE_CHECKING:
    from collections.abc import Sequence

    from meshagent_gui.core.mesh.types import Device

Cells = Annotated[int, msgspec.Meta(ge=1, le=1000)]
"""A console's columns or rows."""


class Params(msgspec.Struct, frozen=True, kw_only=True):
    """A request's parameters (the base of every kind)."""


class NoParams(Params, frozen=True, kw_only=True):
    """``devices``, ``status``: nothing to say."""


class PingParams(Params, frozen=True, kw_only=True):
    device: str
    count: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 4


class SendParams(Params, frozen=True, kw_only=True, omit_defaults=True):
    # omit_defaults: a plain send is the same JSON as before the share-link fields came.
    paths: list[str]
    device: str
    rate: str | None = None
    wait: bool = False
    link: bool = False  # no device: a one-time share link, sent to whoever opens it
    link_ttl: Annotated[int, msgspec.Meta(ge=30, le=86400)] | None = None


class CancelParams(Params, frozen=True, kw_only=True):
    transfer_id: str


class TransfersParams(Params, frozen=True, kw_only=True):
    """``transfers``: running ones and offers waiting for an answer; ``all``: the history too.
    (An older command sends no field: the same list as before.)"""

    all: bool = False


class AnswerParams(Params, frozen=True, kw_only=True):
    """``answer``: accept or decline an offer waiting for this device's answer; ``transfer_id``
    may be a unique prefix, ``to`` a folder (absolute) to save it in instead of the downloads."""

    transfer_id: str
    accept: bool
    to: str = ""


class ConfigChangedParams(Params, frozen=True, kw_only=True):
    key: str = ""


class ClientParams(Params, frozen=True, kw_only=True):
    """One named MeshClient call (``client.NAMED_CALLS``), made with the agent's refresh token."""

    method: str
    args: dict[str, Any] = {}  # the named call's keyword arguments: its schema is the client's


class TerminalShareParams(Params, frozen=True, kw_only=True):
    command: list[str] | None = None
    allow_control: bool = False
    record: str = ""
    size: tuple[Cells, Cells] | None = None
    cwd: str | None = None
    env: dict[str, str] | None = None
    rooms: list[str] | None = None


class TerminalViewParams(Params, frozen=True, kw_only=True):
    device: str = ""
    session: str = ""
    control: bool = False
    size: tuple[Cells, Cells] | None = None


class SyncAddParams(Params, frozen=True, kw_only=True):
    """``sync DIR --with DEVICE [--remote-dir NAME]``: ``path`` absolute."""

    path: str
    device: str
    remote_name: str = ""


class SyncFolderParams(Params, frozen=True, kw_only=True):
    """``sync pause|resume|remove FOLDER``: a folder id, an id prefix or a label."""

    folder: str


class SyncAnswerParams(Params, frozen=True, kw_only=True):
    """``sync accept|decline ID [--to DIR]``: ``path`` where the folder goes (absolute)."""

    offer_id: str
    accept: bool
    path: str = ""


class TunnelForwardParams(Params, frozen=True, kw_only=True):
    """``forward [BIND:]LOCAL_PORT DEVICE:[HOST:]PORT``: ``target`` is ``[HOST:]PORT``."""

    device: str
    target: str
    bind: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0


class TunnelStopParams(Params, frozen=True, kw_only=True):
    """Stop one tunnel that ``tunnel.list`` names by ``id``."""

    id: Annotated[str, msgspec.Meta(max_length=300)]


class TerminalOpenParams(Params, frozen=True, kw_only=True):
    """``terminal open DEVICE``: a new shell there, this console attached in control."""

    device: str
    size: tuple[Cells, Cells] | None = None


REQUESTS: Final[dict[str, type[Params]]] = {
    "devices": NoParams,
    "status": NoParams,
    "transfers": TransfersParams,
    "answer": AnswerParams,
    "ping": PingParams,
    "send": SendParams,
    "cancel": CancelParams,
    "config_changed": ConfigChangedParams,
    "client": ClientParams,
    "terminal.share": TerminalShareParams,
    "terminal.view": TerminalViewParams,
    "sync.add": SyncAddParams,
    "sync.list": NoParams,
    "sync.pause": SyncFolderParams,
    "sync.resume": SyncFolderParams,
    "sync.remove": SyncFolderParams,
    "sync.offers": NoParams,
    "sync.answer": SyncAnswerParams,
    "tunnel.forward": TunnelForwardParams,
    "tunnel.list": NoParams,
    "terminal.open": TerminalOpenParams,
}
"""Each agent method's params type (``show`` of the desktop app takes :class:`NoParams`)."""


# ------------------------------------------------------------------ replies


class PingTry(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One round trip; ``error`` set (and no addresses, no ``rtt_ms``) when it failed."""

    seq: int
    path: str
    local: str | None = None
    remote: str | None = None
    rtt_ms: float | None = None
    error: str | None = None


class PingReply(msgspec.Struct, frozen=True, kw_only=True):
    device: str
    device_id: str
    setup_ms: float
    tries: list[PingTry]


class CancelReply(msgspec.Struct, frozen=True, kw_only=True):
    cancelled: str


class ConfigChangedReply(msgspec.Struct, frozen=True, kw_only=True):
    live: bool = False


class SentItem(msgspec.Struct, frozen=True, kw_only=True):
    """One top-level item of a send, as ``send --json`` prints it: the fields of
    ``share.sending.ItemResult`` (kept apart so that this module imports no service)."""

    name: str
    bytes: int
    sent: int = 0
    resumed_from: int = 0
    blake3: str | None = None
    seconds: float = 0.0
    path: str = ""
    attempts: int = 1
    last_resumed_from: int = 0
    last_sent: int = 0


class SendReply(msgspec.Struct, frozen=True, kw_only=True):
    device: str
    items: list[SentItem]


class SendProgress(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A progress line of ``send`` (unknown fields ignored): bytes verified of ``total``, the
    smoothed rate (B/s) and ETA (s); ``waiting_for`` (only then on the wire) names the receiver
    the send waits for to come back."""

    transfer_id: str
    done: int
    total: int
    rate: float
    eta: float | None
    waiting_for: str | None = None
    answer_from: str | None = None
    """Set while the offer waits for the receiver (named here) to accept it."""
    link_url: str | None = None
    """``send --link``: the share link to hand out; repeated while nobody has opened it."""
    link_expires_at: float | None = None
    """With ``link_url``: when the link expires (Unix time)."""
    link_guest: str | None = None
    """``send --link``: the device id of whoever opened the link, said once before the send."""


SHORT_ID: Final = 8  # hex digits of a transfer id shown to people (any unique prefix works)


class TransferInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A transfer as ``transfers`` lists it: running, waiting for an answer, or (``--all``, and
    each line of the history file) finished. The first five fields are the original reply."""

    transfer_id: str
    direction: str  # "send" or "receive"
    peer: str  # the peer's device id
    name: str
    total: int
    state: str = "running"
    """running; offered (waits for this device's answer); asking (waits for the peer's);
    or how it ended: completed, failed, cancelled, declined, interrupted."""
    peer_name: str = ""
    names: list[str] = []  # the top-level files and folders
    done: int = 0  # bytes verified so far
    started: float = 0.0  # Unix time: offered, or the send began
    ended: float | None = None
    reason: str = ""  # why it ended unfinished
    where: str = ""  # where it landed (a receive)


class AnswerReply(msgspec.Struct, frozen=True, kw_only=True):
    transfer_id: str
    accepted: bool
    to: str = ""  # the folder it lands in, when accepted


class FolderPeerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One peer of a synced folder. ``needed_*``: what we still have to pull from it; the
    counters (since this agent started) show what moved: a rename moves no block."""

    device_id: str
    name: str
    connected: bool = False
    needed_files: int = 0
    needed_bytes: int = 0
    fetched_blocks: int = 0
    fetched_bytes: int = 0
    served_blocks: int = 0
    served_bytes: int = 0


class FolderInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A synced folder as ``sync list`` shows it; ``state`` is a ``FolderState`` value."""

    folder_id: str
    label: str
    path: str
    state: str
    paused: bool = False
    error: str = ""
    files: int = 0
    bytes: int = 0
    conflicts: int = 0
    """Files named ``*.sync-conflict-*`` in the folder (both contents kept)."""
    last_change: float | None = None
    """Epoch seconds of the last change scanned or applied here (since this agent started)."""
    peers: list[FolderPeerInfo] = []


class SyncOfferInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A peer's offer to sync a folder, waiting for this device's answer (``sync offers``)."""

    offer_id: str
    folder_id: str
    peer: str
    peer_name: str
    label: str
    name: str
    expires_at: float


class SocketBuffers(msgspec.Struct, frozen=True, kw_only=True):
    """The UDP socket's buffers (bytes): asked for, granted, and whether forced past the cap."""

    requested: int
    receive: int
    send: int
    forced: bool


class PeerStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One open peer session as ``status`` reports it."""

    device_id: str
    name: str
    path: str
    remote: str
    rtt_ms: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    datagrams_sent: int = 0
    datagrams_received: int = 0


class P2PStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The data plane: QUIC engine, socket, relay, NAT guess and the open peer sessions."""

    engine: str
    io: str
    local: str
    buffers: SocketBuffers
    relay: str
    nat: str
    peers: list[PeerStatus]


class StatusReply(msgspec.Struct, frozen=True, kw_only=True):
    """The agent's answer to ``status``."""

    p2p: P2PStatus
    device_id: str
    device_name: str
    user: str
    server: str
    link: str
    session_id: str | None = None
    clock_skew: float | None = None
    last_error: str | None = None
    connects: int = 0
    online_peers: list[str]
    uptime: float


class ShareOpened(msgspec.Struct, frozen=True, kw_only=True):
    """The agent's ``ok`` to ``terminal.share``."""

    session_id: str = ""
    title: str = ""
    rooms: tuple[str, ...] | None = None


class ViewOpened(msgspec.Struct, frozen=True, kw_only=True):
    """The agent's ``ok`` to ``terminal.view``."""

    session_id: str = ""
    device: str = ""
    size: tuple[int, int] | None = None


# ------------------------------------------------------------------ agent events to a console


class AgentFrame(msgspec.Struct, frozen=True, kw_only=True, tag_field="event"):
    """A JSON frame from the agent to an attached console: ``{"event": <tag>, ...}``.

    The defaults make the console's reading lenient (a field missing is its default); every
    field is still sent (``ControlFrame.reason`` only by a host)."""


class ControlRequestFrame(AgentFrame, frozen=True, kw_only=True, tag="control_request"):
    """A viewer asks the host's user for control; the console answers ``consent`` ``id``."""

    id: int = 0
    name: str = ""


class ControlRequestClosedFrame(
    AgentFrame, frozen=True, kw_only=True, tag="control_request_closed"
):
    id: int = 0


class ViewerJoinedFrame(AgentFrame, frozen=True, kw_only=True, tag="viewer_joined"):
    name: str = ""


class ViewerLeftFrame(AgentFrame, frozen=True, kw_only=True, tag="viewer_left"):
    name: str = ""


class ControlFrame(AgentFrame, frozen=True, kw_only=True, tag="control"):
    """Control changed hands (``controller`` None: the host); ``reason`` only to a host."""

    controller: str | None = None
    reason: str | msgspec.UnsetType = msgspec.UNSET
    you: bool = False


class RefusedFrame(AgentFrame, frozen=True, kw_only=True, tag="refused"):
    reason: str = ""


class ErrorFrame(AgentFrame, frozen=True, kw_only=True, tag="error"):
    message: str = ""


class EndedFrame(AgentFrame, frozen=True, kw_only=True, tag="ended"):
    exit_code: int | None = None
    signal: int | None = None
    message: str = ""


class ScreenFrame(AgentFrame, frozen=True, kw_only=True, tag="screen"):
    cols: int = 0
    rows: int = 0


class SizeFrame(AgentFrame, frozen=True, kw_only=True, tag="size"):
    cols: int = 0
    rows: int = 0


AgentEvent = (
    ControlRequestFrame
    | ControlRequestClosedFrame
    | ViewerJoinedFrame
    | ViewerLeftFrame
    | ControlFrame
    | RefusedFrame
    | ErrorFrame
    | EndedFrame
    | ScreenFrame
    | SizeFrame
)
"""Every frame the agent sends an attached console."""


def agent_event(frame: object) -> AgentEvent | None:
    """An agent's JSON frame, typed; None (ignored) when unknown or malformed."""
    try:
        event: AgentEvent = msgspec.convert(frame, AgentEvent)
    except msgspec.ValidationError:
        return None
    return event


# ------------------------------------------------------------------ console frames


class ConsoleFrame(msgspec.Struct, frozen=True, kw_only=True):
    """A JSON frame from an attached console to the agent (see ``core/terminal/bridge``).

    Exactly the fields the console sent are set; the others keep their defaults.
    """

    resize: tuple[Cells, Cells] | None = None
    consent: int | None = None
    allow: bool = False
    revoke: bool = False
    stop: bool = False
    control: Literal["request", "release"] | None = None


def console_frame(frame: object) -> ConsoleFrame | None:
    """A console's JSON frame, typed; None (ignored, as an unknown frame) when malformed."""
    try:
        return msgspec.convert(frame, ConsoleFrame)
    except msgspec.ValidationError:
        return None


@dataclass(frozen=True)
class DeviceView:
    """A device as shown to the user (devices --json, the tray's device list)."""

    id: str
    name: str
    user: str
    platform: str
    online: bool
    last_seen: float | None
    path: str  # direct / relay / none: filled by the P2P layer once it knows

    @classmethod
    def of(cls, device: Device, online: bool) -> DeviceView:
        return cls(
            device.id, device.name, device.user, device.platform, online, device.last_seen, "none"
        )


def pick_device(devices: Sequence[DeviceView], text: str) -> DeviceView:
    """A device by name (any case), full id, id prefix or short id; one clear error else."""
    from meshagent_gui.errors import UserError
    from meshagent_gui.identity import short_id  # cryptography: only when asked

    wanted = text.strip().lower()
    for matches in (
        [d for d in devices if d.name.lower() == wanted or d.id == wanted],
        [d for d in devices if len(wanted) >= 4 and d.id.startswith(wanted)],
        [d for d in devices if short_id(d.id).lower().startswith(wanted) and len(wanted) >= 4],
    ):
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            names = ", ".join(f"{d.name} ({short_id(d.id)})" for d in matches)
            raise UserError(f"{text!r} matches several devices: {names}", code="ambiguous")
    raise UserError(
        f"no device {text!r} shares a room with this one (see meshagent devices)",
        code="unknown_device",
    )
