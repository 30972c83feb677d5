"""The session messages every stream uses, the stream roles, and the type-code plan.

Type codes are 16 bits, handed out by range so that each module adds its messages with
``BASE_REGISTRY.extended([...])`` without touching the framer or this file:

============== ====================================================
0x0000         never valid (a zeroed stream fails fast)
0x0001-0x00ff  session: handshake, close, error (this module)
0x0100-0x01ff  file and folder transfer
0x0200-0x02ff  terminal share
0x0300-0x03ff  folder sync
0x0400-0x04ff  TCP tunnels
0x0500-0xffff  unassigned
============== ====================================================

Field bounds (``msgspec.Meta``) are enforced as a peer's message is decoded, so a handler only
ever sees well-typed, bounded values. Tokens are kept out of ``repr`` (logs must never show them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Final

import msgspec

from meshagent_gui.core.protocol.errors import ErrorCode, WireIntEnum
from meshagent_gui.core.protocol.framing import KiB
from meshagent_gui.core.protocol.registry import MessageRegistry, control_message

PROTOCOL_VERSION: Final = 1
SUPPORTED_VERSIONS: Final[tuple[int, ...]] = (PROTOCOL_VERSION,)

SESSION_TYPES: Final = range(0x0001, 0x0100)
TRANSFER_TYPES: Final = range(0x0100, 0x0200)
TERMINAL_TYPES: Final = range(0x0200, 0x0300)
SYNC_TYPES: Final = range(0x0300, 0x0400)
TUNNEL_TYPES: Final = range(0x0400, 0x0500)

MAX_TOKENS: Final = 8
MAX_TOKEN_LENGTH: Final = 4 * KiB
MAX_RESOURCE_LENGTH: Final = 256
MAX_REASON_LENGTH: Final = 1 * KiB
MAX_HELLO_PAYLOAD: Final = 48 * KiB


class StreamRole(WireIntEnum):
    """What a stream carries; named in the Hello that opens it."""

    CONTROL = 0
    TRANSFER = 1
    TERMINAL = 2
    SYNC = 3
    TUNNEL = 4


Version = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]
Token = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TOKEN_LENGTH)]
Reason = Annotated[str, msgspec.Meta(max_length=MAX_REASON_LENGTH)]


@dataclass(frozen=True, slots=True)
class Hello:
    """First message of every stream, from the side that opened it.

    On the connection's first stream (role CONTROL) it is the connection handshake; on the
    others it names the stream's role and carries the tokens that authorise it.
    """

    versions: Annotated[tuple[Version, ...], msgspec.Meta(min_length=1, max_length=16)]
    role: StreamRole
    tokens: Annotated[tuple[Token, ...], msgspec.Meta(max_length=MAX_TOKENS)] = field(
        default=(), repr=False
    )
    resource: Annotated[str, msgspec.Meta(max_length=MAX_RESOURCE_LENGTH)] = ""


@dataclass(frozen=True, slots=True)
class HandshakeAccepted:
    version: Version


@dataclass(frozen=True, slots=True)
class HandshakeRefused:
    code: ErrorCode
    message: Reason = ""
    versions: Annotated[tuple[Version, ...], msgspec.Meta(max_length=16)] = ()
    """The refusing side's versions, so that an UNSUPPORTED_VERSION peer can tell the user."""


@dataclass(frozen=True, slots=True)
class Close:
    """Graceful end of the sender's direction: it sends nothing after this."""

    code: ErrorCode = ErrorCode.NO_ERROR
    message: Reason = ""


@dataclass(frozen=True, slots=True)
class Error:
    """The sender gives up on the stream (both directions); it sends nothing after this."""

    code: ErrorCode
    message: Reason = ""


HELLO: Final = 0x0001
HANDSHAKE_ACCEPTED: Final = 0x0002
HANDSHAKE_REFUSED: Final = 0x0003
CLOSE: Final = 0x0004
ERROR: Final = 0x0005

HANDSHAKE_TYPES: Final = frozenset({HELLO, HANDSHAKE_ACCEPTED, HANDSHAKE_REFUSED})

BASE_REGISTRY: Final = MessageRegistry(
    [
        control_message(HELLO, Hello, max_payload=MAX_HELLO_PAYLOAD),
        control_message(HANDSHAKE_ACCEPTED, HandshakeAccepted),
        control_message(HANDSHAKE_REFUSED, HandshakeRefused),
        control_message(CLOSE, Close),
        control_message(ERROR, Error),
    ]
)
