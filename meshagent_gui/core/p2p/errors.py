"""Why a connection or stream ended: reason codes on the wire and exceptions in the API."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class CloseCode(IntEnum):
    """Application error codes we put in CONNECTION_CLOSE (frame type 0x1d).

    The layers above may close with their own codes from 0x100 up.
    """

    NO_ERROR = 0x00
    SHUTDOWN = 0x01
    PEER_ID_MISMATCH = 0x10  # the listener's certificate is not the device we dialed
    AUTH_FAILED = 0x11  # the dialer's proof is invalid (impersonation, bad signature)
    AUTH_TIMEOUT = 0x12  # no proof, or no verdict, in time
    UNAUTHORIZED = 0x13  # the application refused the peer (token check on the first stream)
    PROTOCOL_ERROR = 0x14  # a malformed control record or a stream we do not allow
    FLOW_CONTROL_ERROR = 0x15  # the peer wrote past the credit we gave it
    EARLY_DATA_REFUSED = 0x16  # 0-RTT was accepted somehow; we never act on it
    BUSY = 0x17  # too many connections waiting to be accepted
    INTERNAL_ERROR = 0x1F


@dataclass(frozen=True)
class CloseInfo:
    """How a connection ended.

    ``application`` is False when QUIC itself closed it (a transport error, a TLS alert such as
    a pinned-fingerprint mismatch on qh3, or the idle timeout); ``code`` is then a QUIC
    transport error code.
    """

    code: int
    reason: str
    by_peer: bool
    application: bool

    def describe(self) -> str:
        who = "peer" if self.by_peer else "local"
        name = CloseCode(self.code).name if self.application and self.code in _CODES else None
        label = name or f"0x{self.code:x}"
        return f"{who} {'application' if self.application else 'transport'} close {label}: " + (
            self.reason or "-"
        )


_CODES = frozenset(int(code) for code in CloseCode)


class P2PError(Exception):
    """Base class of the data plane's errors."""


class ConnectionClosedError(P2PError):
    def __init__(self, info: CloseInfo) -> None:
        super().__init__(info.describe())
        self.info = info


class PeerAuthenticationError(ConnectionClosedError):
    """The connection ended before both ends were authenticated (or was refused)."""


class StreamResetError(P2PError):
    """The peer reset the stream (or asked us to stop sending on it)."""

    def __init__(self, stream_id: int, error_code: int, *, direction: str) -> None:
        super().__init__(f"stream {stream_id} {direction} reset by peer (code 0x{error_code:x})")
        self.stream_id = stream_id
        self.error_code = error_code


class StreamClosedError(P2PError):
    """A write after write_eof()/reset(), or a read after stop_reading()."""


class EndpointClosedError(P2PError):
    pass


class StreamLimitError(P2PError):
    """The peer allows no more concurrent streams right now (100 on qh3, 128 on aioquic)."""


class Unauthorized(P2PError):
    """Raised by an ``authorize`` hook to refuse a peer with a specific code and reason."""

    def __init__(self, reason: str, code: int = CloseCode.UNAUTHORIZED) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
