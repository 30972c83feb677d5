"""Terminal messages: round trips, bounds, hostile payloads; the viewer's offset bookkeeping."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshagent_gui.core.protocol.errors import ErrorCode, LocalProtocolError, ProtocolError
from meshagent_gui.core.protocol.framing import encode_header
from meshagent_gui.core.protocol.messages import TERMINAL_TYPES, Close
from meshagent_gui.core.protocol.registry import MessageStream
from meshagent_gui.core.protocol.terminal import (
    CONTROL_STATE,
    HOST_TO_VIEWER,
    INPUT,
    JOIN,
    MAX_INPUT_DATA,
    MAX_OUTPUT_DATA,
    MAX_SNAPSHOT_PART,
    OUTPUT,
    RESIZE,
    SNAPSHOT,
    TERMINAL_REGISTRY,
    VIEWER_TO_HOST,
    ControlChanged,
    ControlDenied,
    ControlRefused,
    ControlRelease,
    ControlRequest,
    ControlState,
    Ended,
    Input,
    Join,
    Output,
    OutputReceived,
    Resize,
    ScreenReplaced,
    SessionEnded,
    SizeChanged,
    Snapshot,
    ViewerStream,
    input_parts,
    snapshot_parts,
)


def roundtrip(message: object) -> object:
    (decoded,) = MessageStream(TERMINAL_REGISTRY).receive_data(
        MessageStream(TERMINAL_REGISTRY).send(message)
    )
    return decoded


def raw_frame(type_code: int, payload: bytes, flags: int = 0) -> bytes:
    return encode_header(type_code, flags, len(payload)) + payload


def expect_bad(data: bytes, code: ErrorCode = ErrorCode.BAD_MESSAGE) -> None:
    with pytest.raises(ProtocolError) as caught:
        MessageStream(TERMINAL_REGISTRY).receive_data(data)
    assert caught.value.code is code


def same(a: object, b: object) -> bool:
    """Equality with memoryview data compared as bytes."""
    if type(a) is not type(b):
        return False
    fields = a.__dataclass_fields__  # type: ignore[attr-defined]
    for name in fields:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, memoryview | bytes) and bytes(x) != bytes(y):
            return False
        if not isinstance(x, memoryview | bytes) and x != y:
            return False
    return True


@pytest.mark.parametrize(
    "message",
    [
        Join(),
        Join(12345, 200, 50),
        Output(0, b""),
        Output(2**63 - 1, b"\x1b[31mred\x1b[0m"),
        Output(7, b"x" * MAX_OUTPUT_DATA),
        Snapshot(10, 80, 24, True, b"\x1b[H\x1b[2Jhello"),
        Snapshot(0, 1000, 1000, False, b""),
        Input(b"ls -l\r"),
        Input(b"\x00" * MAX_INPUT_DATA),
        Resize(80, 24),
        Resize(1000, 1),
        ControlState(),
        ControlState("alice@laptop", 7, True),
        ControlRequest(),
        ControlRelease(),
        ControlDenied("bob is in control"),
        Ended(0),
        Ended(None, 9, "killed"),
    ],
)
def test_messages_round_trip(message: object) -> None:
    assert same(roundtrip(message), message)


def test_type_codes_are_the_terminal_range_and_directions_cover_them() -> None:
    ours = {code for code in TERMINAL_REGISTRY.codes if code in TERMINAL_TYPES}
    assert ours == HOST_TO_VIEWER | VIEWER_TO_HOST
    assert {RESIZE} == HOST_TO_VIEWER & VIEWER_TO_HOST


def test_output_data_is_a_zero_copy_slice_behind_an_eight_byte_offset() -> None:
    wire = MessageStream(TERMINAL_REGISTRY).send(Output(5, b"abc"))
    assert wire[8:16] == (5).to_bytes(8, "big") and wire[16:] == b"abc"
    (output,) = MessageStream(TERMINAL_REGISTRY).receive_data(wire)
    assert isinstance(output, Output) and isinstance(output.data, memoryview)
    assert output.data.obj is wire and output.end == 8


@pytest.mark.parametrize(
    "build",
    [
        lambda: Output(0, b"x" * (MAX_OUTPUT_DATA + 1)),
        lambda: Snapshot(0, 80, 24, True, b"x" * (MAX_SNAPSHOT_PART + 1)),
        lambda: Snapshot(0, 0, 24, True, b""),
        lambda: Snapshot(0, 80, 1001, True, b""),
        lambda: Input(b"x" * (MAX_INPUT_DATA + 1)),
        lambda: Resize(0, 24),
        lambda: Resize(80, 5000),
    ],
)
def test_out_of_bounds_messages_cannot_be_built(build: object) -> None:
    with pytest.raises(ValueError):
        build()  # type: ignore[operator]


def test_out_of_bounds_control_fields_fail_at_the_sender() -> None:
    stream = MessageStream(TERMINAL_REGISTRY)
    with pytest.raises(LocalProtocolError):
        stream.send(ControlState("x" * 300))
    with pytest.raises(LocalProtocolError):
        stream.send(Join(-1))


@pytest.mark.parametrize(
    ("code", "payload"),
    [
        (RESIZE, (0).to_bytes(2, "big") + (24).to_bytes(2, "big")),
        (RESIZE, (80).to_bytes(2, "big") + (60000).to_bytes(2, "big")),
        (RESIZE, b"\x00\x50"),
        (SNAPSHOT, (0).to_bytes(8, "big") + (0).to_bytes(2, "big") + (24).to_bytes(2, "big")),
        (OUTPUT, b"\x00\x01"),
        (JOIN, msgspec.msgpack.encode({"from_offset": -5})),
        (JOIN, msgspec.msgpack.encode({"cols": 70000})),
        (CONTROL_STATE, msgspec.msgpack.encode({"controller": "", "epoch": 1})),
        (CONTROL_STATE, msgspec.msgpack.encode({"epoch": -1})),
    ],
)
def test_hostile_payloads_are_bad_messages(code: int, payload: bytes) -> None:
    expect_bad(raw_frame(code, payload))


def test_oversized_frames_are_refused_on_the_header() -> None:
    expect_bad(encode_header(OUTPUT, 0, 8 + MAX_OUTPUT_DATA + 1), ErrorCode.FRAME_TOO_LARGE)
    expect_bad(encode_header(INPUT, 0, MAX_INPUT_DATA + 1), ErrorCode.FRAME_TOO_LARGE)


def test_session_messages_still_decode_on_a_terminal_stream() -> None:
    assert roundtrip(Close()) == Close()


def test_large_snapshots_and_pastes_are_cut_into_parts() -> None:
    data = bytes(range(256)) * 5000  # 1.28 MB
    parts = snapshot_parts(9, 80, 24, data, part_size=500_000)
    assert [p.final for p in parts] == [False, False, True]
    assert b"".join(bytes(p.data) for p in parts) == data
    assert snapshot_parts(0, 80, 24, b"") == [Snapshot(0, 80, 24, True, b"")]
    paste = b"y" * (2 * MAX_INPUT_DATA + 3)
    assert b"".join(bytes(p.data) for p in input_parts(paste)) == paste


# ---------------------------------------------------------------- ViewerStream


def written(events: Sequence[object]) -> bytes:
    return b"".join(bytes(e.data) for e in events if isinstance(e, OutputReceived))


def test_a_viewer_starts_with_a_snapshot_then_follows_the_offsets() -> None:
    viewer = ViewerStream()
    assert viewer.join(80, 24) == Join(None, 80, 24)
    events = viewer.receive(Snapshot(100, 80, 24, True, b"SCREEN"))
    assert events == [ScreenReplaced(80, 24, 100), OutputReceived(b"SCREEN")]
    assert written(viewer.receive(Output(100, b"abc"))) == b"abc"
    assert viewer.offset == 103 and viewer.join() == Join(103)
    # A replay from an older offset is trimmed to what is new.
    assert written(viewer.receive(Output(101, b"bcdef"))) == b"def"
    assert viewer.receive(Output(90, b"old")) == []
    assert viewer.receive(Resize(100, 30)) == [SizeChanged(100, 30)]
    assert (viewer.cols, viewer.rows) == (100, 30)


def test_gaps_and_out_of_order_messages_are_protocol_errors() -> None:
    viewer = ViewerStream()
    with pytest.raises(ProtocolError):
        viewer.receive(Output(0, b"before any snapshot"))
    viewer.receive(Snapshot(10, 80, 24, False, b"part1"))
    with pytest.raises(ProtocolError):
        viewer.receive(Output(10, b"inside a snapshot"))
    viewer = ViewerStream()
    viewer.receive(Snapshot(10, 80, 24, False, b"part1"))
    with pytest.raises(ProtocolError):
        viewer.receive(Snapshot(11, 80, 24, True, b"another snapshot's part"))
    viewer = ViewerStream()
    viewer.receive(Snapshot(10, 80, 24, True, b""))
    with pytest.raises(ProtocolError):
        viewer.receive(Output(11, b"a gap"))
    viewer.receive(Ended(0))
    with pytest.raises(ProtocolError):
        viewer.receive(Output(10, b"after the end"))
    with pytest.raises(ProtocolError):
        ViewerStream().receive(Input(b"not for a viewer"))


def test_multi_part_snapshots_replace_the_screen_once() -> None:
    viewer = ViewerStream()
    viewer.receive(Snapshot(0, 80, 24, True, b""))
    viewer.receive(Output(0, b"old"))
    events: list[object] = []
    for part in snapshot_parts(50, 120, 40, b"x" * 30, part_size=10):
        events += viewer.receive(part)
    assert events[0] == ScreenReplaced(120, 40, 50)
    assert sum(isinstance(e, ScreenReplaced) for e in events) == 1
    assert written(events) == b"x" * 30 and viewer.offset == 50


def test_control_states_apply_in_epoch_order_and_refusals_are_reported() -> None:
    viewer = ViewerStream()
    assert viewer.receive(ControlState("bob", 2, False)) == [ControlChanged("bob", False, 2)]
    assert viewer.receive(ControlState("me", 1, True)) == []  # stale
    assert viewer.controller == "bob" and not viewer.you_control
    assert viewer.receive(ControlState(None, 3)) == [ControlChanged(None, False, 3)]
    assert viewer.receive(ControlDenied("bob is in control")) == [
        ControlRefused("bob is in control")
    ]
    assert viewer.receive(Ended(None, 15, "bye")) == [SessionEnded(None, 15, "bye")]
    assert viewer.ended == SessionEnded(None, 15, "bye")


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=400),
    cuts=st.lists(st.integers(0, 400), max_size=12),
    replays=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 60)), max_size=6),
)
def test_any_chunking_with_replays_reconstructs_the_stream(
    data: bytes, cuts: list[int], replays: list[tuple[int, int]]
) -> None:
    """Output cut anywhere, interleaved with replays of already-sent ranges (as after a
    resume), is written to the console exactly once, in order."""
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    messages: list[Output] = []
    for start, end in itertools.pairwise(bounds):
        messages.append(Output(start, data[start:end]))
        for replay_start, length in replays:
            if replay_start < end:  # only ranges already sent can be replayed
                messages.append(
                    Output(replay_start, data[replay_start : min(end, replay_start + length)])
                )
    viewer = ViewerStream()
    console = written(viewer.receive(Snapshot(0, 80, 24, True, b"")))
    for message in messages:
        console += written(viewer.receive(message))
    assert console == data and viewer.offset == len(data)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_on_a_terminal_stream_is_always_a_protocol_error(garbage: bytes) -> None:
    for code in (OUTPUT, SNAPSHOT, INPUT, RESIZE, JOIN, CONTROL_STATE):
        with contextlib.suppress(ProtocolError):
            MessageStream(TERMINAL_REGISTRY).receive_data(raw_frame(code, garbage))
