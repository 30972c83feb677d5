"""A STUN Binding responder (RFC 5389) on UDP: tells an agent its server-reflexive address.

Agents ask it from their own QUIC socket, so the answer is the public address and port that
their NAT gave that very socket: the candidate peers punch toward. Only Binding requests are
answered; everything else is dropped without a word (no amplification: the answer is never
larger than a few dozen bytes more than the request).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import cast

from aioice import stun

log = logging.getLogger(__name__)

STUN_MAGIC = b"\x21\x12\xa4\x42"
MAX_REQUEST = 548


def is_stun(datagram: bytes) -> bool:
    """STUN's first two bits are zero and it carries the magic cookie at offset 4 (RFC 5389)."""
    return len(datagram) >= 20 and datagram[0] < 2 and datagram[4:8] == STUN_MAGIC


def binding_response(request: bytes, address: tuple[str, int]) -> bytes | None:
    """The answer to a Binding request from ``address``, or None for anything else."""
    if not is_stun(request) or len(request) > MAX_REQUEST:
        return None
    try:
        message = stun.parse_message(request)
    except ValueError:
        return None
    if message.message_method != stun.Method.BINDING or message.message_class != stun.Class.REQUEST:
        return None
    answer = stun.Message(
        message_method=stun.Method.BINDING,
        message_class=stun.Class.RESPONSE,
        transaction_id=message.transaction_id,
    )
    answer.attributes["XOR-MAPPED-ADDRESS"] = (address[0], address[1])
    return bytes(answer)


class StunResponder(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.answered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        answer = binding_response(data, addr)
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, addr)
            self.answered += 1

    def error_received(self, exc: Exception) -> None:
        log.debug("STUN socket error: %s", exc)


async def start_stun(host: str, port: int) -> tuple[asyncio.DatagramTransport, int]:
    """Listen on (host, port) if free, else on any port; returns the transport and the port."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for wanted in (port, 0):
        try:
            transport, _ = await loop.create_datagram_endpoint(
                StunResponder, local_addr=(host, wanted), family=family
            )
        except OSError:
            continue
        bound = transport.get_extra_info("sockname")[1]
        return transport, int(bound)
    raise OSError(f"cannot bind a UDP port on {host}")
