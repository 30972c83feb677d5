"""What a MeshSession needs of a connection, so the one session protocol runs on either
transport: QUIC (:class:`~.connection.PeerConnection`) or WebRTC DataChannels
(:class:`~.webrtc.DataChannelConnection`). Both hand out :class:`~.streams.PeerStream` objects
(bytes in order, receive credit, send backpressure); only where the bytes go differs.
"""

from __future__ import annotations

from typing import Protocol

from .engine import Address
from .errors import CloseInfo
from .streams import PeerStream


class TransportStats(Protocol):
    """Counters of a connection, for status displays (QUIC: UDP datagrams; WebRTC: DTLS)."""

    @property
    def bytes_sent(self) -> int: ...
    @property
    def bytes_received(self) -> int: ...
    @property
    def datagrams_sent(self) -> int: ...
    @property
    def datagrams_received(self) -> int: ...
    @property
    def smoothed_rtt(self) -> float | None: ...


class Transport(Protocol):
    """An authenticated connection to one peer device, carrying bidirectional streams."""

    @property
    def peer_id(self) -> str:
        """The verified device id of the peer (the SHA-256 of the certificate it proved)."""
        ...

    @property
    def remote_address(self) -> Address: ...

    @property
    def is_closed(self) -> bool: ...

    async def open_stream(self) -> PeerStream: ...

    async def accept_stream(self) -> PeerStream: ...

    async def ping(self, timeout: float = 5.0) -> float: ...

    def close(self, code: int = 0, reason: str = "") -> None: ...

    async def wait_closed(self) -> CloseInfo: ...

    def stats(self) -> TransportStats: ...
