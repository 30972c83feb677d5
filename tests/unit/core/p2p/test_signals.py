"""The p2p signal decoder: any JSON is an Offer, an Answer, or one ValueError."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meshagent_gui.core.p2p.signals import (
    MAX_ATTEMPT_CHARS,
    SIGNAL_KEY,
    Answer,
    Offer,
    decode_signal,
    encode_signal,
)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=70),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=10,
)
NEAR_MISS = st.fixed_dictionaries(
    {SIGNAL_KEY: st.sampled_from(["offer", "answer", "other"]) | JSON},
    optional={"attempt": JSON, "candidates": JSON, "token": JSON},
)


@settings(max_examples=150, deadline=None)
@given(st.one_of(JSON, NEAR_MISS))
def test_any_json_is_a_signal_or_one_value_error(value: Any) -> None:
    try:
        signal = decode_signal(value)
    except ValueError:
        return
    assert isinstance(signal, Offer | Answer)
    assert 0 < len(signal.attempt) <= MAX_ATTEMPT_CHARS
    assert isinstance(signal.candidates, list)
    assert decode_signal(encode_signal(signal)) == signal


def test_the_wire_keeps_its_keys() -> None:
    candidate = {"kind": "host", "address": "192.0.2.1", "port": 4000}
    offer = Offer(attempt="a1", candidates=[candidate], token="jwt")
    assert encode_signal(offer) == {
        SIGNAL_KEY: "offer",
        "attempt": "a1",
        "candidates": [candidate],
        "token": "jwt",
    }
    assert encode_signal(Answer(attempt="a1", candidates=[])) == {
        SIGNAL_KEY: "answer",
        "attempt": "a1",
        "candidates": [],
    }
    # Extra keys from a newer peer are ignored; a missing token is an offer without one.
    assert decode_signal({**encode_signal(offer), "token": None, "new": 1}) == Offer(
        attempt="a1", candidates=[candidate]
    )
