"""Messages, codecs, registry: typed round trips, bounds, zero-copy data, hostile payloads."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshagent_gui.core.protocol.errors import ErrorCode, LocalProtocolError, ProtocolError
from meshagent_gui.core.protocol.framing import FLAG_IGNORABLE, FrameLimits, encode_header
from meshagent_gui.core.protocol.messages import (
    BASE_REGISTRY,
    CLOSE,
    HELLO,
    MAX_TOKENS,
    SESSION_TYPES,
    TERMINAL_TYPES,
    TRANSFER_TYPES,
    Close,
    Error,
    HandshakeAccepted,
    HandshakeRefused,
    Hello,
    StreamRole,
)
from meshagent_gui.core.protocol.registry import (
    MessageRegistry,
    MessageStream,
    StructCodec,
    control_message,
    struct_message,
)

from .pair import TEST_REGISTRY, Chunk, Note


def roundtrip(message: object, registry: MessageRegistry = TEST_REGISTRY) -> object:
    (decoded,) = MessageStream(registry).receive_data(MessageStream(registry).send(message))
    return decoded


def raw_frame(type_code: int, payload: bytes, flags: int = 0) -> bytes:
    return encode_header(type_code, flags, len(payload)) + payload


def expect_error(code: ErrorCode, data: bytes, registry: MessageRegistry = TEST_REGISTRY) -> None:
    stream = MessageStream(registry)
    with pytest.raises(ProtocolError) as caught:
        stream.receive_data(data)
    assert caught.value.code is code
    with pytest.raises(ProtocolError):  # stays broken
        stream.receive_data(raw_frame(CLOSE, msgspec.msgpack.encode({"code": 0})))


@pytest.mark.parametrize(
    "message",
    [
        Hello((1, 2), StreamRole.CONTROL, ("a.b.c", "d.e.f"), "session-1"),
        Hello((1,), StreamRole.TERMINAL),
        HandshakeAccepted(1),
        HandshakeRefused(ErrorCode.BAD_TOKEN, "expired", (1,)),
        Close(),
        Close(ErrorCode.CANCELLED, "user said stop"),
        Error(ErrorCode.INTERNAL_ERROR, "disk full"),
        Note("ünïcødé", (0, 2**63 - 1)),
        Chunk(2**64 - 1, b"\x00\xff\x00\xff", True, b"data"),
        Chunk(0, b"abcd", False, b""),
    ],
)
def test_messages_round_trip(message: object) -> None:
    assert roundtrip(message) == message


def test_type_codes_follow_the_plan() -> None:
    assert BASE_REGISTRY.codes <= set(SESSION_TYPES)
    assert 0 not in TEST_REGISTRY.codes
    assert TEST_REGISTRY.code_of(Chunk) in TRANSFER_TYPES
    assert not set(TRANSFER_TYPES) & set(TERMINAL_TYPES)


def test_control_messages_are_msgpack_maps_of_their_fields() -> None:
    encoded = MessageStream(BASE_REGISTRY).send(Close(ErrorCode.CANCELLED, "x"))
    assert encoded[:8] == bytes.fromhex("01 00 0004 00000011")
    assert msgspec.msgpack.decode(encoded[8:]) == {"code": 3, "message": "x"}


def test_bulk_data_is_a_zero_copy_slice_and_metadata_a_fixed_layout() -> None:
    head, data = MessageStream(TEST_REGISTRY).send_parts(Chunk(7, b"hash", True, b"payload"))
    assert data == b"payload"
    assert head == bytes.fromhex("01 01 0110 00000013") + (7).to_bytes(8, "big") + b"hash"
    wire = head + data
    (chunk,) = MessageStream(TEST_REGISTRY).receive_data(wire)
    assert isinstance(chunk, Chunk) and isinstance(chunk.data, memoryview)
    assert chunk.data.obj is wire  # no copy of the data was made


def test_tokens_never_appear_in_repr() -> None:
    assert "secret-token" not in repr(Hello((1,), StreamRole.CONTROL, ("secret-token",)))


def test_unknown_codes_and_roles_from_a_newer_peer_still_decode() -> None:
    payload = msgspec.msgpack.encode({"code": 0x2A1, "message": "new"})
    (error,) = MessageStream(BASE_REGISTRY).receive_data(raw_frame(0x0005, payload))
    assert isinstance(error, Error)
    assert error.code == 0x2A1 and not error.code.known and error.code.name == "UNKNOWN_0x2a1"
    hello = roundtrip(Hello((1,), StreamRole(42)))
    assert isinstance(hello, Hello) and hello.role == 42 and not hello.role.known


def test_fields_added_by_a_newer_peer_are_ignored_and_missing_ones_defaulted() -> None:
    payload = msgspec.msgpack.encode({"code": 3, "extra": [1, 2], "more": {"x": 1}})
    (close,) = MessageStream(BASE_REGISTRY).receive_data(raw_frame(CLOSE, payload))
    assert close == Close(ErrorCode.CANCELLED, "")


@pytest.mark.parametrize(
    "fields",
    [
        {"versions": [1], "role": 0, "tokens": ["t"] * (MAX_TOKENS + 1)},
        {"versions": [1], "role": 0, "tokens": ["x" * 5000]},
        {"versions": [1], "role": 0, "tokens": [""]},
        {"versions": [], "role": 0},
        {"versions": [70000], "role": 0},
        {"versions": [1], "role": -1},
        {"versions": [1], "role": "control"},
        {"versions": [1], "role": True},
        {"versions": [1], "role": 0, "resource": "r" * 300},
        {"role": 0},
        [1, 0],
    ],
)
def test_hello_fields_out_of_bounds_are_bad_messages(fields: object) -> None:
    expect_error(ErrorCode.BAD_MESSAGE, raw_frame(HELLO, msgspec.msgpack.encode(fields)))


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xc1", b"\x80\x00", msgspec.msgpack.encode({"code": 0}) + b"\x00"],
)
def test_undecodable_control_payloads_are_bad_messages(payload: bytes) -> None:
    expect_error(ErrorCode.BAD_MESSAGE, raw_frame(CLOSE, payload))


def test_bulk_metadata_shorter_than_its_layout_is_a_bad_message() -> None:
    expect_error(ErrorCode.BAD_MESSAGE, raw_frame(0x0110, b"\x00" * 11))


def test_unknown_flag_bits_are_refused_on_the_header() -> None:
    expect_error(ErrorCode.BAD_FLAGS, raw_frame(0x0110, b"\x00" * 12, flags=0x02))


def test_sending_checks_bounds_and_registration_locally() -> None:
    stream = MessageStream(TEST_REGISTRY, FrameLimits(max_control_payload=100))
    with pytest.raises(LocalProtocolError) as caught:
        stream.send(Note("x" * 200))
    assert caught.value.code is ErrorCode.FRAME_TOO_LARGE
    with pytest.raises(LocalProtocolError) as caught:
        stream.send(Hello((1,), StreamRole.CONTROL, ("t",) * 9))
    assert caught.value.code is ErrorCode.BAD_MESSAGE
    with pytest.raises(LocalProtocolError):
        stream.send(Chunk(-1, b"abcd", False, b""))  # does not fit the struct
    with pytest.raises(LocalProtocolError) as caught:
        stream.send("not a message")
    assert caught.value.code is ErrorCode.UNKNOWN_MESSAGE_TYPE


def test_bulk_cap_applies_to_bulk_types_and_control_cap_to_others() -> None:
    limits = FrameLimits(max_control_payload=64, max_bulk_payload=1000)
    sender = MessageStream(TEST_REGISTRY, limits)
    sender.send(Chunk(0, b"abcd", False, b"x" * (1000 - 12)))
    with pytest.raises(LocalProtocolError):
        sender.send(Chunk(0, b"abcd", False, b"x" * (1000 - 11)))
    big = MessageStream(TEST_REGISTRY).send(Chunk(0, b"abcd", False, b"x" * 2000))
    receiver = MessageStream(TEST_REGISTRY, limits)
    with pytest.raises(ProtocolError) as caught:
        receiver.receive_data(big)
    assert caught.value.code is ErrorCode.FRAME_TOO_LARGE


# ------------------------------------------------------------------ the registry


@dataclass(frozen=True, slots=True)
class Hint:
    text: str


class Mode(enum.IntEnum):
    READ = 1
    WRITE = 2


@dataclass(frozen=True, slots=True)
class Grant:
    seq: int
    urgent: bool
    mode: Mode
    final: bool


def test_an_optional_message_is_skipped_by_a_peer_that_does_not_know_it() -> None:
    newer = BASE_REGISTRY.extended([control_message(0x0301, Hint, ignorable=True)])
    wire = MessageStream(newer).send(Hint("by the way")) + MessageStream(newer).send(Close())
    assert wire[1] & FLAG_IGNORABLE
    assert MessageStream(BASE_REGISTRY).receive_data(wire) == [Close()]
    assert MessageStream(newer).receive_data(wire) == [Hint("by the way"), Close()]


def test_struct_codec_maps_flags_enums_and_field_order() -> None:
    registry = BASE_REGISTRY.extended(
        [
            struct_message(
                0x0210, Grant, "!IB", ("seq", "mode"), flags={"urgent": 0x01, "final": 0x40}
            )
        ]
    )
    message = Grant(9, True, Mode.WRITE, True)
    wire = MessageStream(registry).send(message)
    assert wire == bytes.fromhex("01 41 0210 00000005 00000009 02")
    got = roundtrip(message, registry)
    assert got == message and isinstance(got, Grant) and got.mode is Mode.WRITE
    with pytest.raises(ProtocolError) as caught:  # an enum value it does not know
        MessageStream(registry).receive_data(raw_frame(0x0210, bytes.fromhex("00000009 07")))
    assert caught.value.code is ErrorCode.BAD_MESSAGE
    with pytest.raises(ProtocolError):  # no data field: the payload must fit exactly
        MessageStream(registry).receive_data(raw_frame(0x0210, bytes.fromhex("00000009 02 00")))


def test_registry_refuses_clashes_and_bad_layouts() -> None:
    with pytest.raises(ValueError, match="twice"):
        BASE_REGISTRY.extended([control_message(HELLO, Hint)])
    with pytest.raises(ValueError, match="twice"):
        BASE_REGISTRY.extended([control_message(0x0300, Close)])
    with pytest.raises(ValueError, match="range"):
        BASE_REGISTRY.extended([control_message(0x10000, Hint)])
    with pytest.raises(ValueError, match="covers"):
        StructCodec(Grant, "!I", ("seq",))
    with pytest.raises(ValueError, match="does not match"):
        StructCodec(Grant, "!IBB", ("seq", "mode"), flags={"urgent": 1, "final": 2})
    with pytest.raises(ValueError, match="big-endian"):
        StructCodec(Grant, "<IB", ("seq", "mode"), flags={"urgent": 1, "final": 2})
    with pytest.raises(ValueError, match="one bit"):
        StructCodec(Grant, "!IB", ("seq", "mode"), flags={"urgent": 3, "final": 4})
    with pytest.raises(ValueError, match="one bit"):
        StructCodec(Grant, "!IB", ("seq", "mode"), flags={"urgent": 0x80, "final": 4})
    with pytest.raises(ValueError, match="share"):
        StructCodec(Grant, "!IB", ("seq", "mode"), flags={"urgent": 1, "final": 1})
    with pytest.raises(TypeError):
        StructCodec(int, "!I", ("real",))
    assert MessageRegistry().codes == frozenset()


# ------------------------------------------------------------------ properties

messages = st.one_of(
    st.builds(
        Hello,
        st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=4).map(tuple),
        st.sampled_from(StreamRole),
        st.lists(st.text(min_size=1, max_size=40), max_size=3).map(tuple),
        st.text(max_size=40),
    ),
    st.builds(Close, st.sampled_from(ErrorCode), st.text(max_size=50)),
    st.builds(Error, st.sampled_from(ErrorCode), st.text(max_size=50)),
    st.builds(
        Chunk,
        st.integers(0, 2**64 - 1),
        st.binary(min_size=4, max_size=4),
        st.booleans(),
        st.binary(max_size=2000),
    ),
    st.builds(Note, st.text(max_size=100), st.lists(st.integers(0, 2**63 - 1)).map(tuple)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(messages, max_size=10), st.data())
def test_any_split_of_a_message_stream_decodes_to_the_same_messages(
    sent: list[object], data: st.DataObject
) -> None:
    wire = b"".join(MessageStream(TEST_REGISTRY).send(m) for m in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=16)))
    receiver = MessageStream(TEST_REGISTRY)
    got: list[object] = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        got.extend(receiver.receive_data(wire[start:end]))
    receiver.end_of_stream()
    assert got == sent


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(TEST_REGISTRY.codes)), st.integers(0, 0xFF), st.binary(max_size=300))
def test_any_payload_under_a_valid_header_is_a_message_or_a_protocol_error(
    code: int, flags: int, payload: bytes
) -> None:
    try:
        MessageStream(TEST_REGISTRY).receive_data(raw_frame(code, payload, flags))
    except ProtocolError as error:
        assert isinstance(error.code, ErrorCode)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=100), max_size=8))
def test_garbage_only_ever_raises_protocol_error(chunks: list[bytes]) -> None:
    receiver = MessageStream(TEST_REGISTRY)
    try:
        for chunk in chunks:
            receiver.receive_data(chunk)
        receiver.end_of_stream()
    except ProtocolError as error:
        assert isinstance(error.code, ErrorCode)
