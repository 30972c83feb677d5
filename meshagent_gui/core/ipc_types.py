"""The agent's local IPC requests and replies, as types: decoded and checked once, at the edge.

The wire stays JSON objects with these field names (:mod:`meshagent_gui.core.ipc` frames them),
so a ``meshagent`` command and a running agent of this version agree. Every request names a
method; :data:`REQUESTS` gives the type of its ``params``. The server decodes a request's params
into that type before the handler runs: a frame of the wrong shape is one ``bad_request`` error
naming the field, never a ``KeyError`` inside a handler. Unknown fields are ignored (a newer
command may add some).
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

Cells = Annotated[int, msgspec.Meta(ge=1, le=1000)]
"""A console's columns or rows."""


class Params(msgspec.Struct, frozen=True, kw_only=True):
    """A request's parameters (the base of every kind)."""


class NoParams(Params, frozen=True, kw_only=True):
    """``devices``, ``status``, ``transfers``: nothing to say."""


class PingParams(Params, frozen=True, kw_only=True):
    device: str
    count: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 4


class SendParams(Params, frozen=True, kw_only=True):
    paths: list[str]
    device: str
    rate: str | None = None
    wait: bool = False


class CancelParams(Params, frozen=True, kw_only=True):
    transfer_id: str


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


REQUESTS: Final[dict[str, type[Params]]] = {
    "devices": NoParams,
    "status": NoParams,
    "transfers": NoParams,
    "ping": PingParams,
    "send": SendParams,
    "cancel": CancelParams,
    "config_changed": ConfigChangedParams,
    "client": ClientParams,
    "terminal.share": TerminalShareParams,
    "terminal.view": TerminalViewParams,
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


class SendProgress(msgspec.Struct, frozen=True, kw_only=True):
    """A progress line of ``send`` (unknown fields ignored)."""

    done: int = 0
    total: int | None = None
    waiting_for: str | None = None


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
