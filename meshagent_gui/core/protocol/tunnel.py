"""TCP tunnel messages (type codes 0x0400-0x04ff) and one tunnelled connection's life, sans-IO.

One TUNNEL stream carries one TCP connection. The **opener** is the forwarding side (``meshagent
forward`` accepted a TCP connection on its local port); the **acceptor** is the exposing side,
which connects to the target and pipes. The stream's ``Hello`` names the target in ``resource``
(:func:`format_target`: ``host:port``) and carries a ``tunnel:connect`` capability for exactly
that resource. After the stream handshake:

* the acceptor checks the target against its owner's allow-list and its connection limits,
  connects, and answers :class:`Connected`; or ends the stream with ``Error`` and a
  :class:`TunnelErrorCode` (``NOT_EXPOSED``, ``TARGET_REFUSED``, ...). The opener sends nothing
  before ``Connected`` (like an SSH channel before its open confirmation);
* then :class:`Data` both ways, each direction ended as TCP ends it: a TCP FIN (half-close) is
  the session's ``Close`` (graceful end of the sender's direction: the other still flows), a TCP
  reset is ``Error(CONNECTION_RESET)``, an idle connection is ended with ``Error(IDLE_TIMEOUT)``.

:class:`TunnelEnd` is either side's state machine: the caller (``core/tunnel/pump.py``) feeds it
what happened (:class:`TunnelInput`, with ``now``) and carries out the :class:`TunnelAction`\\ s
it returns; the rules are one table, :data:`TUNNEL_TRANSITIONS`. A peer's message that the state
does not admit raises :class:`TunnelProtocolError` before anything changes.
:class:`ConnectionBudget` is the acceptor's limit on concurrent connections per peer and overall.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Annotated, Final

import msgspec

from meshagent_gui.core.protocol.errors import ErrorCode, ProtocolError, WireIntEnum
from meshagent_gui.core.protocol.framing import KiB
from meshagent_gui.core.protocol.messages import BASE_REGISTRY
from meshagent_gui.core.protocol.registry import control_message, struct_message

TUNNEL_SCOPE: Final = "tunnel:connect"
CONNECTED: Final = 0x0401
DATA: Final = 0x0402
MAX_DATA: Final = 256 * KiB
"""One Data frame: what one TCP read returns at most (large enough for bulk, small enough that
another stream's frame never waits behind a huge one)."""
DEFAULT_HOST: Final = "localhost"
MAX_HOST_LENGTH: Final = 253
TICKET_PREFIX: Final = "tunnel-ticket:"
MAX_TICKET_LENGTH: Final = 128
TICKETS_PER_PEER: Final = 8
MAX_TICKET_LIFE: Final = 3600.0
"""What Connected may say a ticket has left (tokens live 300 s at most; a bound, not a policy)."""


class TunnelErrorCode(WireIntEnum):
    """Why a tunnelled connection ended: the tunnel range 0x400-0x4ff of :class:`ErrorCode`'s
    one code space, plus the generic codes it uses, with the same numbers."""

    NO_ERROR = 0x00
    PROTOCOL_ERROR = 0x01
    INTERNAL_ERROR = 0x02
    CANCELLED = 0x03
    GOING_AWAY = 0x04
    UNEXPECTED_MESSAGE = 0x16
    TARGET_REFUSED = 0x400
    """The target refused the TCP connection (nothing listens there)."""
    TARGET_UNREACHABLE = 0x401
    """The target's name does not resolve, or it did not answer in time."""
    NOT_EXPOSED = 0x402
    """The device does not expose that target to this peer (its owner's allow-list)."""
    TOO_MANY_CONNECTIONS = 0x403
    """The acceptor's limit on concurrent connections (per peer or overall) is reached."""
    IDLE_TIMEOUT = 0x404
    CONNECTION_RESET = 0x405
    """A TCP end reset the connection (or vanished); the other end is reset too."""
    BAD_TARGET = 0x406
    """The Hello's resource is not ``host:port``."""


# ---------------------------------------------------------------- targets


@dataclass(frozen=True, slots=True, order=True)
class Target:
    """A TCP address on the exposing device: ``host`` as given (a name or an IP), ``port``."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_target(self.host, self.port)


_HOSTNAME: Final = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*\.?$"
)


def format_target(host: str, port: int) -> str:
    """``host:port``; an IPv6 address in brackets (``[::1]:22``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_target(text: str, *, default_host: str = DEFAULT_HOST) -> Target:
    """``PORT``, ``HOST:PORT`` or ``[IPV6]:PORT`` -> :class:`Target`; ValueError (one sentence)
    for anything else. Hosts are names (letters, digits, '-', '.') or IP addresses."""
    text = text.strip()
    host, port_text = default_host, text
    if text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"{text!r} is not [IPV6]:PORT")
        host, port_text = inside, rest[1:]
        _check_ip(host)
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"write an IPv6 address in brackets: [{host}]:{port_text}")
        _check_host(host)
    port = _port(port_text)
    return Target(host.lower(), port)


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{text!r} is not a port (1-65535)")
    return int(text)


def _check_ip(host: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IPv6 address") from None


def _check_host(host: str) -> None:
    if not _HOSTNAME.match(host):
        raise ValueError(f"{host!r} is not a host name or address")


# ---------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Connected:
    """Acceptor -> opener, once, first: the target accepted the TCP connection.

    ``ticket`` (may be empty) stands for the stream's capability on this peer's later streams
    to the same target, for ``ticket_expires_in`` seconds (what the token had left): the opener
    puts it in their Hello instead of a fresh single-use token (:class:`TicketBook`)."""

    ticket: Annotated[str, msgspec.Meta(max_length=MAX_TICKET_LENGTH)] = field(
        default="", repr=False
    )
    ticket_expires_in: Annotated[float, msgspec.Meta(ge=0, le=MAX_TICKET_LIFE)] = 0.0


@dataclass(frozen=True, slots=True)
class Data:
    """Bytes of the TCP connection, either way (zero copy on decode)."""

    data: bytes | memoryview


TUNNEL_REGISTRY: Final = BASE_REGISTRY.extended(
    [
        control_message(CONNECTED, Connected),
        struct_message(DATA, Data, "!", (), data="data", max_payload=MAX_DATA),
    ]
)


# ---------------------------------------------------------------- the state table


class TunnelState(Enum):
    CONNECTING = auto()
    """Opener: waiting for Connected. Acceptor: connecting to the target."""
    OPEN = auto()
    LOCAL_EOF = auto()
    """Our TCP end finished sending (we sent Close); the peer's direction still flows."""
    PEER_EOF = auto()
    """The peer's direction ended (we shut our TCP end's write side); ours still flows."""
    CLOSED = auto()
    """Both directions ended gracefully."""
    RESET = auto()
    """Ended by a reset, a refusal, an error or the idle timer."""


class TunnelInput(Enum):
    TARGET_CONNECTED = auto()  # acceptor: the TCP connect to the target succeeded
    TARGET_FAILED = auto()  # acceptor: it failed (refused, unreachable) or was not allowed
    PEER_CONNECTED = auto()  # opener: Connected arrived
    LOCAL_DATA = auto()  # bytes read from our TCP end
    PEER_DATA = auto()  # a Data message
    LOCAL_EOF = auto()  # our TCP end sent FIN
    PEER_EOF = auto()  # the peer's Close
    LOCAL_RESET = auto()  # our TCP end reset or vanished
    PEER_RESET = auto()  # the peer's Error, a stream reset, the connection lost
    IDLE = auto()  # nothing moved for the idle timeout


class TunnelAction(Enum):
    SEND_CONNECTED = auto()
    SEND_DATA = auto()  # pass the bytes read from TCP to the peer as Data
    WRITE_TCP = auto()  # write the Data's bytes to our TCP end
    SEND_CLOSE = auto()  # end our stream direction gracefully (Close)
    SHUT_TCP_WRITE = auto()  # half-close: FIN to our TCP end
    SEND_ERROR = auto()  # end the stream with Error(the reason the caller names)
    RESET_TCP = auto()  # abort our TCP end (RST)
    CLOSE_TCP = auto()  # both directions done: close our TCP end


_S, _I, _A = TunnelState, TunnelInput, TunnelAction
_ENDED = (_S.CLOSED, _S.RESET)
_LIVE = (_S.OPEN, _S.LOCAL_EOF, _S.PEER_EOF)
_LATE = (_I.LOCAL_DATA, _I.LOCAL_EOF, _I.LOCAL_RESET, _I.PEER_DATA, _I.PEER_RESET, _I.IDLE)

TUNNEL_TRANSITIONS: Final[
    dict[tuple[TunnelState, TunnelInput], tuple[TunnelState, tuple[TunnelAction, ...]]]
] = {
    (_S.CONNECTING, _I.TARGET_CONNECTED): (_S.OPEN, (_A.SEND_CONNECTED,)),
    (_S.CONNECTING, _I.TARGET_FAILED): (_S.RESET, (_A.SEND_ERROR,)),
    (_S.CONNECTING, _I.PEER_CONNECTED): (_S.OPEN, ()),
    (_S.CONNECTING, _I.LOCAL_RESET): (_S.RESET, (_A.SEND_ERROR, _A.RESET_TCP)),
    (_S.CONNECTING, _I.PEER_RESET): (_S.RESET, (_A.RESET_TCP,)),
    (_S.CONNECTING, _I.IDLE): (_S.RESET, (_A.SEND_ERROR, _A.RESET_TCP)),
    (_S.OPEN, _I.LOCAL_DATA): (_S.OPEN, (_A.SEND_DATA,)),
    (_S.OPEN, _I.PEER_DATA): (_S.OPEN, (_A.WRITE_TCP,)),
    (_S.OPEN, _I.LOCAL_EOF): (_S.LOCAL_EOF, (_A.SEND_CLOSE,)),
    (_S.OPEN, _I.PEER_EOF): (_S.PEER_EOF, (_A.SHUT_TCP_WRITE,)),
    (_S.LOCAL_EOF, _I.PEER_DATA): (_S.LOCAL_EOF, (_A.WRITE_TCP,)),
    (_S.LOCAL_EOF, _I.PEER_EOF): (_S.CLOSED, (_A.SHUT_TCP_WRITE, _A.CLOSE_TCP)),
    (_S.PEER_EOF, _I.LOCAL_DATA): (_S.PEER_EOF, (_A.SEND_DATA,)),
    (_S.PEER_EOF, _I.LOCAL_EOF): (_S.CLOSED, (_A.SEND_CLOSE, _A.CLOSE_TCP)),
    **{(state, _I.LOCAL_RESET): (_S.RESET, (_A.SEND_ERROR, _A.RESET_TCP)) for state in _LIVE},
    **{(state, _I.PEER_RESET): (_S.RESET, (_A.RESET_TCP,)) for state in _LIVE},
    **{(state, _I.IDLE): (_S.RESET, (_A.SEND_ERROR, _A.RESET_TCP)) for state in _LIVE},
    # Once ended, late news changes nothing: a reset crossing our Close, a timer that fired,
    # bytes or a FIN read from a TCP end we just reset, Data that was in flight when we reset.
    **{(state, i): (state, ()) for state in _ENDED for i in _LATE},
}
"""(state, input) -> (next state, actions in order). A pair not here is a protocol error when
the input came from the peer, and a bug in the caller otherwise."""

PEER_INPUTS: Final = frozenset({_I.PEER_CONNECTED, _I.PEER_DATA, _I.PEER_EOF, _I.PEER_RESET})
OPENER_ONLY: Final = frozenset({_I.PEER_CONNECTED})
ACCEPTOR_ONLY: Final = frozenset({_I.TARGET_CONNECTED, _I.TARGET_FAILED})


class TunnelProtocolError(ProtocolError):
    """The peer sent a tunnel message its state does not admit (Data before Connected, a
    second Connected, Connected toward the acceptor)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNEXPECTED_MESSAGE, message)


class TunnelEnd:
    """One side of one tunnelled connection. ``opener``: the forwarding side.

    ``idle_timeout`` (seconds, 0 = never) ends a connection on which nothing moved that long;
    the caller asks :meth:`deadline` and calls :meth:`handle_timer` at it.
    """

    __slots__ = ("_last_activity", "bytes_in", "bytes_out", "idle_timeout", "opener", "state")

    def __init__(self, *, opener: bool, now: float, idle_timeout: float = 0.0) -> None:
        self.opener = opener
        self.state = TunnelState.CONNECTING
        self.idle_timeout = idle_timeout
        self._last_activity = now
        self.bytes_in = 0  # from the peer, written to TCP
        self.bytes_out = 0  # read from TCP, sent to the peer

    @property
    def ended(self) -> bool:
        return self.state in _ENDED

    def handle(self, event: TunnelInput, now: float, size: int = 0) -> tuple[TunnelAction, ...]:
        """Apply ``event`` (``size``: the bytes of a LOCAL_DATA / PEER_DATA); the actions to
        carry out, in order. Raises :class:`TunnelProtocolError` for a peer's input the state
        does not admit, ValueError for the caller's; neither changes anything."""
        wrong_side = (event in OPENER_ONLY and not self.opener) or (
            event in ACCEPTOR_ONLY and self.opener
        )
        step = None if wrong_side else TUNNEL_TRANSITIONS.get((self.state, event))
        if step is None:
            text = f"{event.name.lower()} while {self.state.name.lower()}"
            if event in PEER_INPUTS:
                raise TunnelProtocolError(text)
            raise ValueError(text)
        self.state, actions = step
        if event is _I.PEER_DATA:
            self.bytes_in += size
        elif event is _I.LOCAL_DATA:
            self.bytes_out += size
        if event is not _I.IDLE:
            self._last_activity = now
        return actions

    def message(self, message: object, now: float) -> tuple[TunnelAction, ...]:
        """A tunnel message from the peer (the session handles Close and Error)."""
        if isinstance(message, Data):
            return self.handle(_I.PEER_DATA, now, len(message.data))
        if isinstance(message, Connected):
            return self.handle(_I.PEER_CONNECTED, now)
        raise TunnelProtocolError(f"{type(message).__name__} on a tunnel stream")

    def deadline(self) -> float | None:
        if self.idle_timeout <= 0 or self.ended:
            return None
        return self._last_activity + self.idle_timeout

    def handle_timer(self, now: float) -> tuple[TunnelAction, ...]:
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return ()
        return self.handle(_I.IDLE, now)


# ---------------------------------------------------------------- tickets


@dataclass(frozen=True, slots=True)
class _Ticket:
    peer_id: str
    resource: str
    grant: object
    expires_at: float


class TicketBook:
    """The acceptor's tickets: a capability that admitted one stream admits the same peer's
    later streams to the same target until it expires, without a new token from the server
    (tokens are single-use; a connection each would cost a server round trip each).

    A ticket never outlives its capability and never widens it (same peer, same target; the
    allow-list and the budget are checked on every stream anyway). At most ``per_peer`` live
    tickets per peer: issuing one more forgets that peer's oldest."""

    __slots__ = ("_by_grant", "_tickets", "per_peer")

    def __init__(self, *, per_peer: int = TICKETS_PER_PEER) -> None:
        self.per_peer = per_peer
        self._tickets: OrderedDict[str, _Ticket] = OrderedDict()
        self._by_grant: dict[int, str] = {}

    def issue(
        self, peer_id: str, resource: str, grant: object, expires_at: float, now: float
    ) -> str:
        """The ticket standing for ``grant`` (the same one again for a grant it admitted)."""
        self._forget_expired(now)
        known = self._by_grant.get(id(grant))
        if known is not None and known in self._tickets:
            return known
        mine = [t for t, entry in self._tickets.items() if entry.peer_id == peer_id]
        for oldest in mine[: max(0, len(mine) - self.per_peer + 1)]:
            self._drop(oldest)
        ticket = TICKET_PREFIX + secrets.token_urlsafe(24)
        self._tickets[ticket] = _Ticket(peer_id, resource, grant, expires_at)
        self._by_grant[id(grant)] = ticket
        return ticket

    def admit(self, peer_id: str, resource: str, ticket: str, now: float) -> object | None:
        """The grant ``ticket`` stands for, if it is live and was issued to this peer for this
        target; None otherwise (then the stream needs a token)."""
        entry = self._tickets.get(ticket)
        if entry is None or entry.peer_id != peer_id or entry.resource != resource:
            return None
        if now >= entry.expires_at:
            self._drop(ticket)
            return None
        return entry.grant

    def expires_in(self, ticket: str, now: float) -> float:
        entry = self._tickets.get(ticket)
        return 0.0 if entry is None else min(MAX_TICKET_LIFE, max(0.0, entry.expires_at - now))

    def __len__(self) -> int:
        return len(self._tickets)

    def _forget_expired(self, now: float) -> None:
        for ticket in [t for t, entry in self._tickets.items() if now >= entry.expires_at]:
            self._drop(ticket)

    def _drop(self, ticket: str) -> None:
        entry = self._tickets.pop(ticket)
        self._by_grant.pop(id(entry.grant), None)


# ---------------------------------------------------------------- limits


class ConnectionBudget:
    """Concurrent tunnelled connections an acceptor serves: at most ``per_peer`` for one peer
    and ``total`` overall. :meth:`admit` takes a place (False: refuse with
    TOO_MANY_CONNECTIONS), :meth:`release` gives it back."""

    __slots__ = ("_by_peer", "_count", "per_peer", "total")

    def __init__(self, *, per_peer: int, total: int) -> None:
        if per_peer < 1 or total < 1:
            raise ValueError("connection limits must be at least 1")
        self.per_peer = per_peer
        self.total = total
        self._by_peer: dict[str, int] = {}
        self._count = 0

    def admit(self, peer_id: str) -> bool:
        held = self._by_peer.get(peer_id, 0)
        if held >= self.per_peer or self._count >= self.total:
            return False
        self._by_peer[peer_id] = held + 1
        self._count += 1
        return True

    def release(self, peer_id: str) -> None:
        held = self._by_peer.get(peer_id, 0)
        if held <= 0:
            raise ValueError(f"no connection of {peer_id[:12]} to release")
        if held == 1:
            del self._by_peer[peer_id]
        else:
            self._by_peer[peer_id] = held - 1
        self._count -= 1

    def held(self, peer_id: str | None = None) -> int:
        return self._count if peer_id is None else self._by_peer.get(peer_id, 0)
