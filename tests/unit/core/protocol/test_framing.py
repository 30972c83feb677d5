"""Frame layer: exact layout, any split, garbage, caps checked before memory is spent."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshagent_gui.core.protocol.errors import ErrorCode, LocalProtocolError, ProtocolError
from meshagent_gui.core.protocol.framing import (
    FLAG_IGNORABLE,
    HEADER_SIZE,
    Frame,
    FrameDecoder,
    FrameRule,
    MiB,
    encode_header,
)

CONTROL, BULK, EMPTY = 0x0001, 0x0110, 0x0002
RULES = {
    CONTROL: FrameRule(max_payload=1024),
    BULK: FrameRule(max_payload=4 * MiB, flags_mask=0x03),
    EMPTY: FrameRule(max_payload=0),
}


def new_decoder() -> FrameDecoder:
    return FrameDecoder(RULES, max_ignorable_payload=1024)


def frame(type_code: int, payload: bytes, flags: int = 0) -> bytes:
    return encode_header(type_code, flags, len(payload)) + payload


def decode_all(decoder: FrameDecoder, *chunks: bytes) -> list[tuple[int, int, bytes]]:
    out: list[tuple[int, int, bytes]] = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        while (f := decoder.next_frame()) is not None:
            out.append((f.type_code, f.flags, bytes(f.payload)))
    return out


def expect_error(code: ErrorCode, *chunks: bytes) -> None:
    decoder = new_decoder()
    with pytest.raises(ProtocolError) as caught:
        decode_all(decoder, *chunks)
    assert caught.value.code is code
    # A broken decoder stays broken, with the same error, and holds no buffers.
    with pytest.raises(ProtocolError) as again:
        decoder.receive_data(b"\x01")
    assert again.value is caught.value
    assert decoder.buffered_bytes == 0


def test_header_layout_is_version_flags_type_length_big_endian() -> None:
    assert encode_header(0x0110, 0x81, 5) == bytes.fromhex("01 81 0110 00000005")
    assert HEADER_SIZE == 8


def test_encode_header_refuses_what_cannot_be_framed() -> None:
    for args in [(0, 0, 1), (0x10000, 0, 1), (1, 0x100, 1), (1, 0, 1 << 32), (1, 0, -1)]:
        with pytest.raises(LocalProtocolError):
            encode_header(*args)


def test_frames_in_one_chunk_are_zero_copy_views_of_it() -> None:
    data = frame(CONTROL, b"hello") + frame(BULK, b"x" * 100, flags=0x01) + frame(EMPTY, b"")
    decoder = new_decoder()
    decoder.receive_data(data)
    first, second, third = decoder.next_frame(), decoder.next_frame(), decoder.next_frame()
    assert decoder.next_frame() is None
    assert first == Frame(CONTROL, 0, memoryview(b"hello"))
    assert second is not None and second.flags == 0x01 and second.payload.obj is data
    assert second.payload.readonly
    assert third is not None and third.payload.nbytes == 0
    assert decoder.at_boundary and decoder.buffered_bytes == 0


def test_a_frame_spread_over_chunks_is_gathered_once_and_read_only() -> None:
    data = frame(BULK, bytes(range(256)) * 40)
    decoder = new_decoder()
    decoder.receive_data(data[:3])
    assert decoder.next_frame() is None
    decoder.receive_data(data[3:4000])
    assert decoder.next_frame() is None
    assert decoder.buffered_bytes == 4000 - HEADER_SIZE
    decoder.receive_data(data[4000:])
    got = decoder.next_frame()
    assert got is not None and bytes(got.payload) == data[HEADER_SIZE:]
    assert got.payload.readonly
    assert decoder.buffered_bytes == 0


def test_mutable_input_is_copied_so_the_caller_may_reuse_its_buffer() -> None:
    buffer = bytearray(frame(CONTROL, b"abc"))
    decoder = new_decoder()
    decoder.receive_data(buffer)
    buffer[HEADER_SIZE:] = b"zzz"
    got = decoder.next_frame()
    assert got is not None and bytes(got.payload) == b"abc"


def test_unknown_ignorable_frames_are_skipped_whatever_the_split() -> None:
    data = frame(0x7777, b"s" * 300, flags=FLAG_IGNORABLE) + frame(CONTROL, b"after")
    for cut in range(len(data) + 1):
        assert decode_all(new_decoder(), data[:cut], data[cut:]) == [(CONTROL, 0, b"after")]


def test_known_types_ignore_the_ignorable_flag() -> None:
    got = decode_all(new_decoder(), frame(CONTROL, b"x", flags=FLAG_IGNORABLE))
    assert got == [(CONTROL, 0, b"x")]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\x02" + frame(CONTROL, b"")[1:], ErrorCode.UNSUPPORTED_FRAME_VERSION),
        (bytes(8), ErrorCode.UNSUPPORTED_FRAME_VERSION),  # a zeroed stream fails at once
        (frame(0x7777, b"x"), ErrorCode.UNKNOWN_MESSAGE_TYPE),
        (frame(0x7777, b"x" * 2000, flags=FLAG_IGNORABLE), ErrorCode.FRAME_TOO_LARGE),
        (frame(CONTROL, b"x", flags=0x01), ErrorCode.BAD_FLAGS),
        (frame(BULK, b"x", flags=0x04), ErrorCode.BAD_FLAGS),
        (frame(CONTROL, b"x" * 1025), ErrorCode.FRAME_TOO_LARGE),
        (frame(EMPTY, b"x"), ErrorCode.FRAME_TOO_LARGE),
    ],
)
def test_bad_headers_are_protocol_errors_with_a_code(data: bytes, code: ErrorCode) -> None:
    expect_error(code, data)


def test_types_outside_the_allowed_set_are_unexpected() -> None:
    decoder = FrameDecoder(RULES, allowed={CONTROL})
    decoder.receive_data(frame(CONTROL, b"ok") + frame(BULK, b"no"))
    assert decoder.next_frame() is not None
    with pytest.raises(ProtocolError) as caught:
        decoder.next_frame()
    assert caught.value.code is ErrorCode.UNEXPECTED_MESSAGE


def test_allowed_may_change_between_frames() -> None:
    decoder = FrameDecoder(RULES, allowed={CONTROL})
    decoder.receive_data(frame(CONTROL, b"a") + frame(BULK, b"b"))
    assert decoder.next_frame() is not None
    decoder.allowed = {BULK}
    second = decoder.next_frame()
    assert second is not None and second.type_code == BULK


@pytest.mark.parametrize("cut", [1, HEADER_SIZE, HEADER_SIZE + 2])
def test_end_of_stream_inside_a_frame_is_a_truncation(cut: int) -> None:
    decoder = new_decoder()
    decode_all(decoder, frame(CONTROL, b"abcd")[:cut])
    with pytest.raises(ProtocolError) as caught:
        decoder.end_of_stream()
    assert caught.value.code is ErrorCode.TRUNCATED


def test_end_of_stream_at_a_boundary_is_fine() -> None:
    decoder = new_decoder()
    decode_all(decoder, frame(CONTROL, b"abcd"))
    decoder.end_of_stream()


def test_a_4_gib_length_is_refused_from_the_header_without_allocating() -> None:
    hostile = bytes.fromhex("01 00 0110 ffffffff") + b"\x00" * 64
    tracemalloc.start()
    try:
        expect_error(ErrorCode.FRAME_TOO_LARGE, hostile)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_a_claimed_length_within_the_cap_costs_only_what_arrived() -> None:
    claim = encode_header(BULK, 0, 4 * MiB)  # allowed, but the peer sends 1 KiB of it
    decoder = new_decoder()
    tracemalloc.start()
    try:
        decode_all(decoder, claim, b"y" * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoder.buffered_bytes == 1024
    assert peak < 64 * 1024


def test_discard_forgets_a_partial_frame() -> None:
    decoder = new_decoder()
    decode_all(decoder, frame(CONTROL, b"abcd")[:10])
    decoder.discard()
    assert decoder.at_boundary
    assert decode_all(decoder, frame(CONTROL, b"new")) == [(CONTROL, 0, b"new")]


# ------------------------------------------------------------------ properties

frames_strategy = st.lists(
    st.one_of(
        st.tuples(st.just(CONTROL), st.just(0), st.binary(max_size=1024)),
        st.tuples(st.just(BULK), st.integers(0, 3), st.binary(max_size=3000)),
        st.tuples(st.just(EMPTY), st.just(0), st.just(b"")),
    ),
    max_size=12,
)


@st.composite
def cut_points(draw: st.DrawFn, size: int) -> list[int]:
    return sorted(draw(st.lists(st.integers(0, size), max_size=20)))


@settings(max_examples=200, deadline=None)
@given(frames_strategy, st.data())
def test_any_split_of_the_stream_decodes_to_the_same_frames(
    frames: list[tuple[int, int, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(frame(t, p, f) for t, f, p in frames)
    cuts = data.draw(cut_points(len(stream)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    decoder = new_decoder()
    assert decode_all(decoder, *pieces) == [(t, f, p) for t, f, p in frames]
    decoder.end_of_stream()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=10))
def test_garbage_gives_frames_or_a_protocol_error_and_bounded_memory(chunks: list[bytes]) -> None:
    decoder = new_decoder()
    cap = max(rule.max_payload for rule in RULES.values())
    try:
        for chunk in chunks:
            decoder.receive_data(chunk)
            while decoder.next_frame() is not None:
                pass
            assert decoder.buffered_bytes <= cap + HEADER_SIZE
        decoder.end_of_stream()
    except ProtocolError as error:
        assert isinstance(error.code, ErrorCode)


@settings(max_examples=200, deadline=None)
@given(frames_strategy, st.binary(min_size=1, max_size=64))
def test_valid_frames_then_garbage_yield_the_frames_first(
    frames: list[tuple[int, int, bytes]], garbage: bytes
) -> None:
    stream = b"".join(frame(t, p, f) for t, f, p in frames)
    decoder = new_decoder()
    decoder.receive_data(stream + garbage)
    got = []
    try:
        while (f := decoder.next_frame()) is not None:
            got.append((f.type_code, f.flags, bytes(f.payload)))
        decoder.end_of_stream()
    except ProtocolError:
        pass
    assert got[: len(frames)] == [(t, f, p) for t, f, p in frames]
