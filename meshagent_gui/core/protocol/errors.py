"""Error codes of the P2P protocol and the exceptions that carry them.

One code space serves every place a reason travels: ``HandshakeRefused.code``, ``Error.code``,
``Close.code``, QUIC stream resets and QUIC application CONNECTION_CLOSE codes. A peer reading
one of these never has to guess which table a number comes from. docs/protocol.md lists them.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final, Self

# QUIC application error codes are variable-length integers (RFC 9000 §16): below 2**62.
MAX_WIRE_CODE: Final = (1 << 62) - 1


class WireIntEnum(IntEnum):
    """An IntEnum that accepts values it does not know (sent by a newer peer).

    An unknown value becomes a pseudo-member named ``UNKNOWN_<value>`` instead of failing the
    whole message: a receiver then treats it like the generic code of its range.
    """

    @classmethod
    def _missing_(cls, value: object) -> Self | None:
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_WIRE_CODE:
            member = int.__new__(cls, value)
            member._name_ = f"UNKNOWN_{value:#x}"
            member._value_ = value
            return member
        return None

    @property
    def known(self) -> bool:
        return self._name_ in type(self).__members__


class ErrorCode(WireIntEnum):
    """Why something ended. Ranges: 0x00-0x0f general, 0x10-0x1f framing and state,
    0x20-0x2f handshake refusals, 0x100-0x1ff transfer, 0x200-0x2ff terminal, 0x300-0x3ff sync."""

    NO_ERROR = 0x00
    PROTOCOL_ERROR = 0x01
    INTERNAL_ERROR = 0x02
    CANCELLED = 0x03
    GOING_AWAY = 0x04

    UNSUPPORTED_FRAME_VERSION = 0x10
    UNKNOWN_MESSAGE_TYPE = 0x11
    FRAME_TOO_LARGE = 0x12
    BAD_FLAGS = 0x13
    BAD_MESSAGE = 0x14
    TRUNCATED = 0x15
    UNEXPECTED_MESSAGE = 0x16
    BUFFER_LIMIT_EXCEEDED = 0x17

    UNSUPPORTED_VERSION = 0x20
    BAD_TOKEN = 0x21
    NOT_ALLOWED = 0x22
    HANDSHAKE_TIMEOUT = 0x23
    UNKNOWN_ROLE = 0x24
    TOO_MANY_STREAMS = 0x25
    DUPLICATE_CONTROL_STREAM = 0x26
    REFUSED = 0x27


class ProtocolError(Exception):
    """The peer broke the protocol (garbage, oversize frame, message out of order, ...).

    The decoder that raised it stays broken: feeding it more data raises the same error again.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class LocalProtocolError(ProtocolError):
    """Our own side asked for something the protocol forbids (a bug in the caller).

    Raised before any state changes, so the connection is still usable.
    """
