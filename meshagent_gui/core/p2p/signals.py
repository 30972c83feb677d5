"""The p2p signals two agents exchange through the server: an offer and its answer, as types.

A signal is hostile input (any device sharing a room can send one): :func:`decode_signal` turns
its JSON object into an :class:`Offer` or an :class:`Answer`, or refuses it with one
``ValueError``; the caller ignores it with a debug line. Bounds are checked here, before any
state changes: the attempt id is short text, the token (if any) is text, the candidates are a
list. Each candidate is read later, and only the first ``MAX_PEER_CANDIDATES`` of them
(``candidates.peer_candidates``), so that one malformed entry from a newer peer costs only
itself.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

SIGNAL_KEY: Final = "p2p"
MAX_ATTEMPT_CHARS: Final = 64

AttemptId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ATTEMPT_CHARS)]


class Offer(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field=SIGNAL_KEY, tag="offer"
):
    """The dialer's candidates and the ``p2p:connect`` token its handshake presents next."""

    attempt: AttemptId
    candidates: list[object]
    token: str | None = None


class Answer(msgspec.Struct, frozen=True, kw_only=True, tag_field=SIGNAL_KEY, tag="answer"):
    """The callee's candidates, for the offer of the same ``attempt``."""

    attempt: AttemptId
    candidates: list[object]


Signal = Offer | Answer


def decode_signal(payload: object) -> Signal:
    """A p2p signal's payload as an :class:`Offer` or an :class:`Answer`; ValueError else."""
    try:
        signal: Signal = msgspec.convert(payload, Signal)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from None
    return signal


def encode_signal(signal: Signal) -> dict[str, object]:
    """The JSON object of a signal, for ``MeshLink.signal``."""
    body: dict[str, object] = msgspec.to_builtins(signal)
    return body
