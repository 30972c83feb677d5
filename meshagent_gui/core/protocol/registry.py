"""Message type registry and codecs: typed messages <-> frame payloads.

Each message class is registered once with a 16-bit type code and a codec. Modules add their
own messages by extending a registry (``BASE_REGISTRY.extended([...])``); the framer never
changes. Two codecs cover every message so far (docs/protocol.md explains the choice, measured):

- :class:`ControlCodec`: MessagePack via msgspec, a map of field names, validated against the
  dataclass's type hints (``Annotated[..., msgspec.Meta(...)]`` bounds included) as it decodes.
  For the rare messages (handshake, offers, close); fields are added, never removed or retyped.
- :class:`StructCodec`: a fixed ``struct`` layout for the metadata, boolean fields as frame
  flags, then an optional raw data field that is a zero-copy slice of the payload. For the hot
  and bulk messages (file chunks, terminal output, acknowledgements).
"""

from __future__ import annotations

import dataclasses
import operator
import struct
import typing
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from enum import IntEnum
from typing import Any, Final, Generic, Protocol, TypeVar

import msgspec

from meshagent_gui.core.protocol.errors import ErrorCode, LocalProtocolError, ProtocolError
from meshagent_gui.core.protocol.framing import (
    FLAG_IGNORABLE,
    FRAME_VERSION,
    HEADER,
    MAX_LENGTH_FIELD,
    MAX_TYPE_CODE,
    TYPE_FLAGS,
    BytesLike,
    FrameDecoder,
    FrameLimits,
    FrameRule,
)

M = TypeVar("M")

_ENCODER: Final = msgspec.msgpack.Encoder()
_pack_header: Final = HEADER.pack
# What a codec may raise on a hostile payload; all become ProtocolError(BAD_MESSAGE).
_DECODE_ERRORS: Final = (msgspec.DecodeError, ValueError, TypeError, struct.error, OverflowError)


class MessageCodec(Protocol[M]):
    flags_mask: int
    """Type-specific flag bits this codec sets or reads (within 0x7f)."""

    def encode(self, message: M) -> tuple[int, bytes, BytesLike]:
        """``(flags, head, data)``: the payload is ``head + data`` (``data`` may be empty)."""
        ...

    def decode(self, flags: int, payload: memoryview) -> M: ...


class ControlCodec(Generic[M]):
    """MessagePack map of the dataclass's fields, strictly typed on decode (msgspec).

    Encoding decodes the result once more: a field out of its bounds fails here, as a
    LocalProtocolError, rather than at the peer (which would close the connection). Control
    messages are rare, and the check costs about a microsecond.
    """

    flags_mask = 0

    def __init__(self, cls: type[M]) -> None:
        self._decoder: msgspec.msgpack.Decoder[M] = msgspec.msgpack.Decoder(cls)

    def encode(self, message: M) -> tuple[int, bytes, BytesLike]:
        payload = _ENCODER.encode(message)
        self._decoder.decode(payload)
        return 0, payload, b""

    def decode(self, flags: int, payload: memoryview) -> M:
        return self._decoder.decode(payload)


class StructCodec(Generic[M]):
    """A fixed big-endian struct of some fields, bool fields as flag bits, then raw data.

    ``StructCodec(Chunk, "!IQ32s", ("file", "offset", "digest"), data="data",
    flags={"last": 0x01})`` encodes ``Chunk(file, offset, digest, last, data)`` as
    ``pack(file, offset, digest)`` followed by the data bytes, with flag bit 0x01 = ``last``.
    Fields whose type is an IntEnum are converted on decode (an unknown value raises unless the
    enum accepts it, see :class:`~meshagent_gui.core.protocol.errors.WireIntEnum`).
    """

    def __init__(
        self,
        cls: type[M],
        layout: str,
        fields: Sequence[str],
        *,
        data: str | None = None,
        flags: Mapping[str, int] | None = None,
    ) -> None:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} is not a dataclass")
        if not layout.startswith("!"):
            raise ValueError("struct layouts are big-endian: start them with '!'")
        self._make: Callable[..., M] = cls
        self._struct = struct.Struct(layout)
        self._fields = tuple(fields)
        self._data = data
        self._flags = dict(flags or {})
        for bit in self._flags.values():
            if bit.bit_count() != 1 or bit & ~TYPE_FLAGS:
                raise ValueError(f"flag {bit:#x} is not one bit within {TYPE_FLAGS:#x}")
        self.flags_mask = sum(self._flags.values())
        if len(set(self._flags.values())) != len(self._flags):
            raise ValueError("two fields share a flag bit")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        covered = [*self._fields, *self._flags, *([data] if data else [])]
        if sorted(covered) != sorted(names):
            raise ValueError(f"{cls.__name__}: layout covers {covered}, fields are {names}")
        if len(self._fields) != len(self._struct.unpack(bytes(self._struct.size))):
            raise ValueError(f"{cls.__name__}: layout {layout!r} does not match {self._fields}")
        # How to build the constructor's positional arguments from (struct values, flags, data).
        plan: list[tuple[str, Any, Any]] = []
        for name in names:
            if name in self._flags:
                plan.append(("flag", self._flags[name], None))
            elif name == data:
                plan.append(("data", None, None))
            else:
                hint = hints.get(name)
                is_enum = isinstance(hint, type) and issubclass(hint, IntEnum)
                plan.append(("value", self._fields.index(name), hint if is_enum else None))
        self._plan = tuple(plan)
        # The common shapes (struct fields in order, then maybe data) skip the plan.
        self._simple = (
            not self._flags
            and names == [*self._fields, *([data] if data else [])]
            and all(convert is None for _, _, convert in plan)
        )
        self._size = self._struct.size
        self._pack = self._struct.pack
        self._unpack = self._struct.unpack_from
        self._get = operator.attrgetter(*self._fields) if self._fields else None
        self._single = len(self._fields) == 1

    @property
    def head_size(self) -> int:
        """Bytes of metadata before the data field."""
        return self._struct.size

    def encode(self, message: M) -> tuple[int, bytes, BytesLike]:
        if self._get is None:
            head = b""
        elif self._single:
            head = self._pack(self._get(message))
        else:
            head = self._pack(*self._get(message))
        flags = 0
        for name, bit in self._flags.items():
            if getattr(message, name):
                flags |= bit
        body: BytesLike = getattr(message, self._data) if self._data else b""
        return flags, head, body

    def decode(self, flags: int, payload: memoryview) -> M:
        size = self._size
        if self._data is None:
            if len(payload) != size:
                raise ValueError(f"payload of {len(payload)} bytes for a {size}-byte layout")
            if self._simple:
                return self._make(*self._unpack(payload))
        elif len(payload) < size:
            raise ValueError(f"payload of {len(payload)} bytes for a {size}-byte layout")
        elif self._simple:
            return self._make(*self._unpack(payload), payload[size:])
        values = self._unpack(payload)
        args: list[Any] = []
        for kind, index, convert in self._plan:
            if kind == "flag":
                args.append(bool(flags & index))
            elif kind == "data":
                args.append(payload[size:])
            else:
                value = values[index]
                args.append(convert(value) if convert is not None else value)
        return self._make(*args)


@dataclasses.dataclass(frozen=True, slots=True)
class MessageSpec(Generic[M]):
    code: int
    cls: type[M]
    codec: MessageCodec[M]
    bulk: bool = False
    """Bulk messages (data frames) get the bulk payload cap; others the control cap."""
    max_payload: int | None = None
    """A fixed cap for this type that overrides the limits (e.g. a small one for Hello)."""
    ignorable: bool = False
    """Sent with FLAG_IGNORABLE: a peer that does not know the type skips it."""


def control_message(
    code: int, cls: type[M], *, max_payload: int | None = None, ignorable: bool = False
) -> MessageSpec[M]:
    return MessageSpec(code, cls, ControlCodec(cls), max_payload=max_payload, ignorable=ignorable)


def struct_message(
    code: int,
    cls: type[M],
    layout: str,
    fields: Sequence[str],
    *,
    data: str | None = None,
    flags: Mapping[str, int] | None = None,
    bulk: bool | None = None,
    max_payload: int | None = None,
    ignorable: bool = False,
) -> MessageSpec[M]:
    """A hand-laid-out message; it is bulk (bulk cap) when it carries a data field."""
    codec = StructCodec(cls, layout, fields, data=data, flags=flags)
    is_bulk = data is not None if bulk is None else bulk
    return MessageSpec(code, cls, codec, is_bulk, max_payload, ignorable)


class MessageRegistry:
    """An immutable map between type codes and message classes."""

    def __init__(self, specs: Iterable[MessageSpec[Any]] = ()) -> None:
        self._by_code: dict[int, MessageSpec[Any]] = {}
        self._by_class: dict[type, MessageSpec[Any]] = {}
        for spec in specs:
            if not 0 < spec.code <= MAX_TYPE_CODE:
                raise ValueError(f"type code {spec.code:#x} out of range")
            if spec.code in self._by_code:
                raise ValueError(f"type code {spec.code:#06x} registered twice")
            if spec.cls in self._by_class:
                raise ValueError(f"{spec.cls.__name__} registered twice")
            self._by_code[spec.code] = spec
            self._by_class[spec.cls] = spec

    def extended(self, specs: Iterable[MessageSpec[Any]]) -> MessageRegistry:
        return MessageRegistry([*self._by_code.values(), *specs])

    @property
    def codes(self) -> frozenset[int]:
        return frozenset(self._by_code)

    @property
    def specs(self) -> tuple[MessageSpec[Any], ...]:
        return tuple(self._by_code.values())

    def spec_for_code(self, code: int) -> MessageSpec[Any] | None:
        return self._by_code.get(code)

    def spec_for(self, message: object) -> MessageSpec[Any]:
        spec = self._by_class.get(type(message))
        if spec is None:
            raise LocalProtocolError(
                ErrorCode.UNKNOWN_MESSAGE_TYPE, f"{type(message).__name__} is not registered"
            )
        return spec

    def code_of(self, cls: type) -> int:
        return self._by_class[cls].code

    def frame_rules(self, limits: FrameLimits) -> dict[int, FrameRule]:
        rules: dict[int, FrameRule] = {}
        for code, spec in self._by_code.items():
            default = limits.max_bulk_payload if spec.bulk else limits.max_control_payload
            cap = spec.max_payload if spec.max_payload is not None else default
            rules[code] = FrameRule(min(cap, MAX_LENGTH_FIELD), spec.codec.flags_mask)
        return rules


class MessageStream:
    """Framing for one stream: ``send(message) -> bytes``, ``receive_data(bytes) -> messages``.

    Sans-IO like h11: it never reads or writes anything itself. ``feed`` + ``next_message``
    decode one message at a time so that a caller can change :attr:`allowed` between messages.
    """

    def __init__(
        self,
        registry: MessageRegistry,
        limits: FrameLimits | None = None,
        *,
        rules: Mapping[int, FrameRule] | None = None,
    ) -> None:
        self._registry = registry
        self._limits = limits or FrameLimits()
        self._rules = rules if rules is not None else registry.frame_rules(self._limits)
        self._decoder = FrameDecoder(
            self._rules, max_ignorable_payload=self._limits.max_control_payload
        )
        # Per-type entries looked up once per message on the hot path.
        self._outgoing: dict[type, tuple[int, Callable[[Any], Any], int, int]] = {}
        self._incoming: dict[int, tuple[Callable[[int, memoryview], Any], str]] = {}
        for spec in registry.specs:
            extra = FLAG_IGNORABLE if spec.ignorable else 0
            cap = self._rules[spec.code].max_payload
            self._outgoing[spec.cls] = (spec.code, spec.codec.encode, cap, extra)
            self._incoming[spec.code] = (spec.codec.decode, spec.cls.__name__)

    @property
    def allowed(self) -> Collection[int] | None:
        return self._decoder.allowed

    @allowed.setter
    def allowed(self, codes: Collection[int] | None) -> None:
        self._decoder.allowed = codes

    @property
    def buffered_bytes(self) -> int:
        return self._decoder.buffered_bytes

    def send(self, message: object) -> bytes:
        head, data = self.send_parts(message)
        return head + data if data else head

    def send_parts(self, message: object) -> tuple[bytes, BytesLike]:
        """``(frame header + metadata, data)``: write both to avoid copying a large data field."""
        entry = self._outgoing.get(type(message))
        if entry is None:
            raise LocalProtocolError(
                ErrorCode.UNKNOWN_MESSAGE_TYPE, f"{type(message).__name__} is not registered"
            )
        code, encode, cap, extra_flags = entry
        try:
            flags, head, data = encode(message)
        except (struct.error, TypeError, ValueError, msgspec.MsgspecError) as exc:
            raise LocalProtocolError(ErrorCode.BAD_MESSAGE, f"cannot encode: {exc}") from exc
        length = len(head) + (len(data) if type(data) is bytes else memoryview(data).nbytes)
        if length > cap:
            raise LocalProtocolError(
                ErrorCode.FRAME_TOO_LARGE, f"{type(message).__name__} of {length} bytes (cap {cap})"
            )
        return _pack_header(FRAME_VERSION, flags | extra_flags, code, length) + head, data

    def feed(self, data: BytesLike) -> None:
        self._decoder.receive_data(data)

    def next_message(self) -> object | None:
        frame = self._decoder.next_frame()
        if frame is None:
            return None
        entry = self._incoming.get(frame.type_code)
        if entry is None:  # the rules came from another registry: a caller bug, not the peer's
            raise LocalProtocolError(ErrorCode.UNKNOWN_MESSAGE_TYPE, f"{frame.type_code:#06x}")
        decode, name = entry
        try:
            message: object = decode(frame.flags, frame.payload)
        except _DECODE_ERRORS as exc:
            error = ProtocolError(ErrorCode.BAD_MESSAGE, f"bad {name} payload: {exc}")
            self._decoder.fail(error)
            raise error from exc
        return message

    def receive_data(self, data: BytesLike) -> list[object]:
        """Feed bytes and return every message they complete."""
        self.feed(data)
        messages: list[object] = []
        while (message := self.next_message()) is not None:
            messages.append(message)
        return messages

    def end_of_stream(self) -> None:
        self._decoder.end_of_stream()

    def discard(self) -> None:
        self._decoder.discard()
