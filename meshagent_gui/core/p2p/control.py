"""Records on the endpoint's control streams (sans-IO: bytes in, records out).

Each side of a connection opens its first unidirectional stream as its control stream (the
dialer's is stream 2, the listener's stream 3) and writes records on it::

    record = type (1 byte) | payload length (2 bytes, big endian) | payload

    0x01 CHALLENGE  listener -> dialer   nonce (32 bytes)
    0x02 PROOF      dialer -> listener   claimed device id (32 bytes, raw SHA-256)
                                         | certificate length (2 bytes) | certificate (DER)
                                         | signature (the rest; see auth.py)
    0x03 ACCEPTED   listener -> dialer   empty: the proof was verified
    0x04 CREDIT     both ways            stream id (8 bytes) | limit (8 bytes): the sender of
                                         the record may now receive data on that stream up to
                                         byte offset ``limit`` (streams.py)

Records are at most :data:`MAX_PAYLOAD` bytes; anything else is a protocol error that closes
the connection. The application's own protocol never sees these streams.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

MAX_PAYLOAD: Final = 4096
NONCE_SIZE: Final = 32
DEVICE_ID_SIZE: Final = 32
_HEADER: Final = struct.Struct(">BH")
_CREDIT: Final = struct.Struct(">QQ")
_CERT_LENGTH: Final = struct.Struct(">H")


class RecordType(IntEnum):
    CHALLENGE = 0x01
    PROOF = 0x02
    ACCEPTED = 0x03
    CREDIT = 0x04


class ControlProtocolError(ValueError):
    """The peer wrote something on its control stream that is not a valid record."""


@dataclass(frozen=True)
class Challenge:
    nonce: bytes


@dataclass(frozen=True)
class Proof:
    claimed_id: str
    certificate_der: bytes
    signature: bytes


@dataclass(frozen=True)
class Accepted:
    pass


@dataclass(frozen=True)
class Credit:
    stream_id: int
    limit: int


Record = Challenge | Proof | Accepted | Credit


def _frame(record_type: RecordType, payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"control record too large: {len(payload)} bytes")
    return _HEADER.pack(record_type, len(payload)) + payload


def encode(record: Record) -> bytes:
    match record:
        case Challenge(nonce):
            if len(nonce) != NONCE_SIZE:
                raise ValueError("a challenge nonce is 32 bytes")
            return _frame(RecordType.CHALLENGE, nonce)
        case Proof(claimed_id, certificate_der, signature):
            claimed = bytes.fromhex(claimed_id)
            if len(claimed) != DEVICE_ID_SIZE:
                raise ValueError("a device id is a SHA-256 fingerprint (64 hex digits)")
            payload = (
                claimed + _CERT_LENGTH.pack(len(certificate_der)) + certificate_der + signature
            )
            return _frame(RecordType.PROOF, payload)
        case Accepted():
            return _frame(RecordType.ACCEPTED, b"")
        case Credit(stream_id, limit):
            return _frame(RecordType.CREDIT, _CREDIT.pack(stream_id, limit))
    raise TypeError(f"not a control record: {record!r}")


def _decode(record_type: int, payload: bytes) -> Record:
    if record_type == RecordType.CHALLENGE:
        if len(payload) != NONCE_SIZE:
            raise ControlProtocolError("CHALLENGE must carry a 32-byte nonce")
        return Challenge(payload)
    if record_type == RecordType.PROOF:
        head = DEVICE_ID_SIZE + _CERT_LENGTH.size
        if len(payload) < head:
            raise ControlProtocolError("PROOF is truncated")
        (cert_length,) = _CERT_LENGTH.unpack_from(payload, DEVICE_ID_SIZE)
        if cert_length == 0 or head + cert_length >= len(payload):
            raise ControlProtocolError("PROOF has a bad certificate length")
        return Proof(
            claimed_id=payload[:DEVICE_ID_SIZE].hex(),
            certificate_der=payload[head : head + cert_length],
            signature=payload[head + cert_length :],
        )
    if record_type == RecordType.ACCEPTED:
        if payload:
            raise ControlProtocolError("ACCEPTED carries no payload")
        return Accepted()
    if record_type == RecordType.CREDIT:
        if len(payload) != _CREDIT.size:
            raise ControlProtocolError("CREDIT must carry 16 bytes")
        stream_id, limit = _CREDIT.unpack(payload)
        return Credit(stream_id, limit)
    raise ControlProtocolError(f"unknown control record type 0x{record_type:02x}")


class RecordDecoder:
    """Incremental decoder: feed any split of the stream, get whole records back.

    Holds at most one partial record (header + :data:`MAX_PAYLOAD` bytes), so a peer cannot
    make it buffer more than that.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Record]:
        buffer = self._buffer
        buffer += data
        records: list[Record] = []
        offset = 0
        while len(buffer) - offset >= _HEADER.size:
            record_type, length = _HEADER.unpack_from(buffer, offset)
            if length > MAX_PAYLOAD:
                raise ControlProtocolError(f"control record of {length} bytes is too large")
            end = offset + _HEADER.size + length
            if end > len(buffer):
                break
            records.append(_decode(record_type, bytes(buffer[offset + _HEADER.size : end])))
            offset = end
        del buffer[:offset]
        return records

    @property
    def pending(self) -> int:
        return len(self._buffer)
