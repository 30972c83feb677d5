"""The data plane: authenticated QUIC connections between agents over our own UDP endpoint."""

from meshagent_gui.core.p2p.connection import ConnectionState, ConnectionStats, PeerConnection
from meshagent_gui.core.p2p.endpoint import (
    Authorizer,
    Endpoint,
    EndpointSettings,
    StunHandler,
    is_stun,
)
from meshagent_gui.core.p2p.engine import (
    DEFAULT_ENGINE,
    ENGINE_ENV,
    ENGINES,
    EngineError,
    TransportSettings,
    engine_name,
)
from meshagent_gui.core.p2p.errors import (
    CloseCode,
    CloseInfo,
    ConnectionClosedError,
    EndpointClosedError,
    P2PError,
    PeerAuthenticationError,
    StreamClosedError,
    StreamLimitError,
    StreamResetError,
    Unauthorized,
)
from meshagent_gui.core.p2p.streams import INITIAL_CREDIT, PeerStream
from meshagent_gui.core.p2p.udp import SocketBuffers

__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "ENGINE_ENV",
    "INITIAL_CREDIT",
    "Authorizer",
    "CloseCode",
    "CloseInfo",
    "ConnectionClosedError",
    "ConnectionState",
    "ConnectionStats",
    "Endpoint",
    "EndpointClosedError",
    "EndpointSettings",
    "EngineError",
    "P2PError",
    "PeerAuthenticationError",
    "PeerConnection",
    "PeerStream",
    "SocketBuffers",
    "StreamClosedError",
    "StreamLimitError",
    "StreamResetError",
    "StunHandler",
    "TransportSettings",
    "Unauthorized",
    "engine_name",
    "is_stun",
]
