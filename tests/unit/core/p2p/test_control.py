from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshagent_gui.core.p2p import control
from meshagent_gui.core.p2p.control import (
    MAX_PAYLOAD,
    Accepted,
    Challenge,
    ControlProtocolError,
    Credit,
    Proof,
    RecordDecoder,
)

ids = st.binary(min_size=32, max_size=32).map(bytes.hex)
records = st.one_of(
    st.binary(min_size=32, max_size=32).map(Challenge),
    st.builds(
        Proof,
        claimed_id=ids,
        certificate_der=st.binary(min_size=1, max_size=600),
        signature=st.binary(min_size=1, max_size=120),
    ),
    st.just(Accepted()),
    st.builds(Credit, st.integers(0, 2**62 - 1), st.integers(0, 2**62 - 1)),
)


@given(st.lists(records, max_size=8), st.data())
def test_any_split_of_the_stream_decodes_to_the_same_records(
    sent: list[control.Record], data: st.DataObject
) -> None:
    wire = b"".join(control.encode(record) for record in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    decoder = RecordDecoder()
    received: list[control.Record] = []
    start = 0
    for cut in [*cuts, len(wire)]:
        received += decoder.feed(wire[start:cut])
        start = cut
    assert received == sent
    assert decoder.pending == 0


@given(st.binary(max_size=2000))
def test_garbage_gives_records_or_a_protocol_error_and_bounded_memory(garbage: bytes) -> None:
    decoder = RecordDecoder()
    try:
        for start in range(0, len(garbage), 7):
            decoder.feed(garbage[start : start + 7])
    except ControlProtocolError:
        return
    assert decoder.pending <= MAX_PAYLOAD + 3


def test_oversized_record_is_refused_from_its_header() -> None:
    with pytest.raises(ControlProtocolError, match="too large"):
        RecordDecoder().feed(b"\x04\xff\xff")


def test_unknown_record_type_is_a_protocol_error() -> None:
    with pytest.raises(ControlProtocolError, match="unknown"):
        RecordDecoder().feed(b"\x7f\x00\x00")


def test_encoder_refuses_malformed_records() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        control.encode(Challenge(b"short"))
    with pytest.raises(ValueError, match="device id"):
        control.encode(Proof("abcd", b"cert", b"sig"))
