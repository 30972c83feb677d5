"""The application handshake and stream state machines, two sessions in memory, time passed in."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshagent_gui.core.protocol.errors import ErrorCode, LocalProtocolError
from meshagent_gui.core.protocol.handshake import (
    HANDSHAKE_DISPOSITIONS,
    INCOMING_BY_STATE,
    SESSION_TRANSITIONS,
    STREAM_TRANSITIONS,
    TERMINAL_STREAM_STATES,
    CloseConnection,
    HandshakeFailed,
    MessageReceived,
    Refusal,
    ResetStream,
    Session,
    SessionClosed,
    SessionEstablished,
    SessionLimits,
    SessionState,
    Side,
    StopSending,
    StreamAccepted,
    StreamClosed,
    StreamFailed,
    StreamRefused,
    StreamState,
    WriteStream,
)
from meshagent_gui.core.protocol.messages import (
    Close,
    HandshakeAccepted,
    HandshakeRefused,
    Hello,
    StreamRole,
)
from meshagent_gui.core.protocol.registry import MessageStream

from .pair import (
    TEST_REGISTRY,
    Chunk,
    InFlight,
    Note,
    RecordingValidator,
    SessionPair,
    sent_by,
    writes,
)

D, L = Side.DIALER, Side.LISTENER


def established(pair: SessionPair) -> int:
    control = pair.start("good")
    events = pair.run()
    assert isinstance(events[D][0], SessionEstablished)
    assert isinstance(events[L][0], SessionEstablished)
    return control


def open_accepted(pair: SessionPair, side: Side = D, role: StreamRole = StreamRole.TRANSFER) -> int:
    stream = pair.open(side, role, "good")
    events = pair.run()
    assert [type(e) for e in events[D]] == [StreamAccepted]
    assert [type(e) for e in events[L]] == [StreamAccepted]
    return stream


def decoded(item: InFlight) -> list[object]:
    assert isinstance(item.command, WriteStream)
    return MessageStream(TEST_REGISTRY).receive_data(bytes(item.command.data))


# ------------------------------------------------------------------ the connection handshake


def test_handshake_accepted_gives_both_sides_the_session() -> None:
    pair = SessionPair()
    control = pair.start("good", "second")
    events = pair.run()

    assert events[D] == [SessionEstablished(1, control, None)]
    assert events[L] == [SessionEstablished(1, control, "grant:good")]
    assert pair.dialer.state is pair.listener.state is SessionState.ESTABLISHED
    assert pair.dialer.version == pair.listener.version == 1
    validator = pair.validators[L]
    assert isinstance(validator, RecordingValidator)
    (hello,) = validator.seen
    assert hello.role is StreamRole.CONTROL
    assert hello.tokens == ("good", "second")
    assert pair.dialer.next_deadline() is None
    assert pair.listener.next_deadline() is None


def test_bad_token_is_refused_with_a_code_and_closes_the_connection() -> None:
    pair = SessionPair()
    pair.start("forged")
    pair.collect()
    pair.deliver()  # the Hello reaches the listener
    pair.collect()
    refusal, close = pair.in_flight
    # The peer learns the code, never the local detail of why the validator failed.
    assert decoded(refusal) == [HandshakeRefused(ErrorCode.BAD_TOKEN, "token rejected", (1,))]
    assert isinstance(refusal.command, WriteStream) and refusal.command.end_stream
    assert close.command == CloseConnection(ErrorCode.BAD_TOKEN, "token rejected")
    events = pair.run()

    assert events[L] == [
        HandshakeFailed(ErrorCode.BAD_TOKEN, "ValueError: signature does not verify", False)
    ]
    assert events[D] == [HandshakeFailed(ErrorCode.BAD_TOKEN, "token rejected", True)]
    assert pair.dialer.state is pair.listener.state is SessionState.CLOSED


def test_refusal_arrives_through_the_close_code_when_its_frame_is_lost() -> None:
    pair = SessionPair()
    control = pair.start("forged")
    pair.deliver()
    pair.collect()
    pair.drop(lambda item: writes(item, control))  # QUIC may drop stream data at close
    events = pair.run()
    assert events[D] == [HandshakeFailed(ErrorCode.BAD_TOKEN, "token rejected", True)]


def test_validator_chooses_the_refusal_code() -> None:
    def not_allowed(hello: Hello) -> object:
        raise Refusal(ErrorCode.NOT_ALLOWED, "scope share:file needed")

    pair = SessionPair(listener_validate=not_allowed)
    pair.start("good")
    events = pair.run()
    assert events[D] == [
        HandshakeFailed(ErrorCode.NOT_ALLOWED, "scope share:file needed", by_peer=True)
    ]


@pytest.mark.parametrize(
    ("dialer", "listener", "agreed"),
    [((1,), (1,), 1), ((1, 2), (1, 2), 2), ((1, 2), (1,), 1), ((2, 1), (1, 2, 3), 2)],
)
def test_versions_negotiate_to_the_highest_common(
    dialer: tuple[int, ...], listener: tuple[int, ...], agreed: int
) -> None:
    pair = SessionPair(dialer_versions=dialer, listener_versions=listener)
    control = pair.start("good")
    events = pair.run()
    assert events[D] == [SessionEstablished(agreed, control, None)]
    stream = pair.open(D, StreamRole.SYNC, "good")
    events = pair.run()
    assert events[D] == [StreamAccepted(stream, StreamRole.SYNC, "", False, None)]


def test_wrong_version_is_refused_with_the_versions_we_speak() -> None:
    pair = SessionPair(dialer_versions=(2, 3))
    pair.start("good")
    pair.deliver()
    pair.collect()
    assert decoded(pair.in_flight[0]) == [
        HandshakeRefused(ErrorCode.UNSUPPORTED_VERSION, "no common protocol version", (1,))
    ]
    events = pair.run()
    assert [e.code for e in events[D] if isinstance(e, HandshakeFailed)] == [
        ErrorCode.UNSUPPORTED_VERSION
    ]
    validator = pair.validators[L]
    assert isinstance(validator, RecordingValidator) and validator.seen == []


def test_listener_times_out_a_dialer_that_never_says_hello() -> None:
    pair = SessionPair(now=100.0, limits=SessionLimits(handshake_timeout=10.0))
    assert pair.listener.next_deadline() == 110.0
    assert pair.advance(9.9) == {D: [], L: []}
    pair.listener.handle_timer(pair.now)
    assert pair.listener.commands_to_send() == []

    events = pair.sessions[L].handle_timer(110.0)
    assert events == [HandshakeFailed(ErrorCode.HANDSHAKE_TIMEOUT, "handshake timed out", False)]
    assert pair.listener.commands_to_send() == [
        CloseConnection(ErrorCode.HANDSHAKE_TIMEOUT, "handshake timed out")
    ]
    assert pair.listener.next_deadline() is None


def test_a_hello_that_trickles_in_too_slowly_times_out() -> None:
    pair = SessionPair(limits=SessionLimits(handshake_timeout=5.0))
    pair.start("good")
    pair.deliver(split=lambda data: [data[:3]])  # only three bytes of the frame ever arrive
    pair.in_flight.clear()
    assert pair.take_events() == {D: [], L: []}
    events = pair.advance(5.0)
    assert [type(e) for e in events[L]] == [HandshakeFailed]
    assert events[D] == [HandshakeFailed(ErrorCode.HANDSHAKE_TIMEOUT, "handshake timed out", False)]


def test_a_hello_arriving_after_the_deadline_is_not_accepted() -> None:
    pair = SessionPair(limits=SessionLimits(handshake_timeout=5.0))
    pair.start("good")
    pair.now = 5.0  # no timer fired yet: the late data itself must find the deadline passed
    events = pair.run()
    assert events[L] == [HandshakeFailed(ErrorCode.HANDSHAKE_TIMEOUT, "handshake timed out", False)]
    validator = pair.validators[L]
    assert isinstance(validator, RecordingValidator) and validator.seen == []


def test_dialer_times_out_a_listener_that_never_answers() -> None:
    pair = SessionPair(now=0.0, limits=SessionLimits(handshake_timeout=3.0))
    assert pair.dialer.next_deadline() is None  # no timer before it starts
    pair.start("good")
    pair.in_flight.clear()  # the Hello is lost
    assert pair.dialer.next_deadline() == 3.0
    events = pair.advance(3.0)
    assert events[D] == [HandshakeFailed(ErrorCode.HANDSHAKE_TIMEOUT, "handshake timed out", False)]


def test_connection_lost_during_the_handshake_fails_it() -> None:
    pair = SessionPair()
    pair.start("good")
    events = pair.dialer.connection_lost(ErrorCode.GOING_AWAY, "idle timeout", now=1.0)
    assert events == [HandshakeFailed(ErrorCode.GOING_AWAY, "idle timeout", by_peer=True)]
    assert pair.dialer.connection_lost(0, "again", now=2.0) == []
    # A code from outside our space (or out of range) still becomes an ErrorCode.
    other = SessionPair()
    other.start("good")
    (event,) = other.dialer.connection_lost(1 << 70, "odd", now=1.0)
    assert isinstance(event, HandshakeFailed) and event.code is ErrorCode.PROTOCOL_ERROR


# ------------------------------------------------------------------ streams before the handshake


def test_stream_overtaking_the_control_stream_is_held_then_validated() -> None:
    pair = SessionPair()
    control = pair.start("good")
    transfer = pair.open(D, StreamRole.TRANSFER, "good", resource="file-7")
    pair.dialer.send(transfer, Note("pipelined"))  # acted on only after acceptance
    pair.collect()

    pair.deliver(lambda item: writes(item, transfer))  # QUIC delivered stream 4 first
    assert pair.take_events() == {D: [], L: []}
    assert pair.listener.stream_state(transfer) is StreamState.HELD
    validator = pair.validators[L]
    assert isinstance(validator, RecordingValidator) and validator.seen == []

    events = pair.run()
    assert events[L] == [
        SessionEstablished(1, control, "grant:good"),
        StreamAccepted(transfer, StreamRole.TRANSFER, "file-7", True, "grant:good"),
        MessageReceived(transfer, Note("pipelined")),
    ]
    assert [hello.role for hello in validator.seen] == [StreamRole.CONTROL, StreamRole.TRANSFER]
    assert events[D] == [
        SessionEstablished(1, control, None),
        StreamAccepted(transfer, StreamRole.TRANSFER, "file-7", False, None),
    ]


def test_answer_overtaking_the_control_answer_is_held_by_the_dialer() -> None:
    pair = SessionPair()
    control = pair.start("good")
    transfer = pair.open(D, StreamRole.TRANSFER, "good")
    pair.deliver()
    pair.collect()
    pair.deliver(lambda item: item.sender is L and writes(item, transfer))
    assert pair.dialer.stream_state(transfer) is StreamState.HELD
    assert pair.take_events()[D] == []
    events = pair.run()
    assert events[D] == [
        SessionEstablished(1, control, None),
        StreamAccepted(transfer, StreamRole.TRANSFER, "", False, None),
    ]


def test_held_streams_die_with_a_refused_handshake_unvalidated() -> None:
    pair = SessionPair()
    pair.start("forged")
    transfer = pair.open(D, StreamRole.TRANSFER, "good")
    pair.deliver(lambda item: writes(item, transfer))
    events = pair.run()
    validator = pair.validators[L]
    assert isinstance(validator, RecordingValidator)
    assert [hello.role for hello in validator.seen] == [StreamRole.CONTROL]
    assert [type(e) for e in events[L]] == [HandshakeFailed]
    assert events[D] == [
        HandshakeFailed(ErrorCode.BAD_TOKEN, "token rejected", True),
        StreamFailed(transfer, ErrorCode.BAD_TOKEN, "token rejected", True),
    ]


def test_too_many_held_streams_are_refused() -> None:
    pair = SessionPair(limits=SessionLimits(max_held_streams=2))
    pair.start("good")
    streams = [pair.open(D, StreamRole.TRANSFER, "good") for _ in range(3)]
    pair.deliver(lambda item: item.sender is D and not writes(item, 0))
    assert [pair.listener.stream_state(s) for s in streams] == [
        StreamState.HELD,
        StreamState.HELD,
        StreamState.REFUSED,
    ]
    events = pair.run()
    refused = [e for e in events[D] if isinstance(e, StreamRefused)]
    assert refused == [
        StreamRefused(
            streams[2],
            StreamRole.TRANSFER,
            ErrorCode.TOO_MANY_STREAMS,
            "too many streams before handshake",
            True,
        )
    ]
    accepted = [e.stream_id for e in events[D] if isinstance(e, StreamAccepted)]
    assert accepted == streams[:2]


def test_a_held_stream_that_keeps_sending_breaks_the_bound() -> None:
    pair = SessionPair(limits=SessionLimits(max_held_bytes=1000))
    pair.start("good")
    transfer = pair.open(D, StreamRole.TRANSFER, "good")
    for _ in range(3):
        pair.dialer.send(transfer, Chunk(0, b"abcd", False, b"x" * 400))
    pair.collect()
    pair.deliver(lambda item: writes(item, transfer))
    events = pair.run()
    assert events[L] == [
        HandshakeFailed(ErrorCode.BUFFER_LIMIT_EXCEEDED, "held stream 4 overflowed", False)
    ]


def test_listener_may_not_open_streams_before_it_accepted() -> None:
    pair = SessionPair()
    with pytest.raises(LocalProtocolError):
        pair.listener.open_stream(1, StreamRole.TERMINAL, now=0.0)
    assert pair.listener.commands_to_send() == []


def test_listener_opened_stream_is_validated_by_the_dialer() -> None:
    pair = SessionPair(dialer_validate=RecordingValidator(good=frozenset({"view"})))
    established(pair)
    terminal = pair.open(L, StreamRole.TERMINAL, "view", resource="session-1")
    events = pair.run()
    assert events[D] == [
        StreamAccepted(terminal, StreamRole.TERMINAL, "session-1", True, "grant:view")
    ]
    refused = pair.open(L, StreamRole.TERMINAL, "stolen")
    events = pair.run()
    assert [(e.stream_id, e.code) for e in events[L] if isinstance(e, StreamRefused)] == [
        (refused, ErrorCode.BAD_TOKEN)
    ]
    assert len(events[L]) == 1


def test_a_second_control_stream_is_refused_and_the_session_survives() -> None:
    pair = SessionPair()
    established(pair)
    stream = pair.next_stream_id(D)
    rogue = MessageStream(TEST_REGISTRY).send(Hello((1,), StreamRole.CONTROL, ("good",)))
    pair.inject(D, WriteStream(stream, rogue))  # behind the dialer session's back
    pair.deliver()
    pair.collect()
    (refusal, stop) = pair.drop(sent_by(L))
    assert decoded(refusal)[0] == HandshakeRefused(
        ErrorCode.DUPLICATE_CONTROL_STREAM, "duplicate_control_stream", (1,)
    )
    assert stop.command == StopSending(stream, ErrorCode.DUPLICATE_CONTROL_STREAM)
    assert pair.take_events()[L] == [
        StreamRefused(
            stream,
            StreamRole.CONTROL,
            ErrorCode.DUPLICATE_CONTROL_STREAM,
            "duplicate_control_stream",
            False,
        )
    ]
    assert pair.listener.state is SessionState.ESTABLISHED


def test_unknown_role_from_a_newer_peer_is_refused() -> None:
    pair = SessionPair()
    established(pair)
    stream = pair.open(D, StreamRole(9), "good")
    events = pair.run()
    (refused,) = events[D]
    assert isinstance(refused, StreamRefused) and refused.code is ErrorCode.UNKNOWN_ROLE
    assert refused.stream_id == stream
    assert not refused.role.known


def test_a_stream_refusal_leaves_the_connection_and_other_streams_alone() -> None:
    pair = SessionPair()
    established(pair)
    good = open_accepted(pair)
    bad = pair.open(D, StreamRole.TRANSFER, "expired")
    events = pair.run()
    assert events[D] == [
        StreamRefused(bad, StreamRole.TRANSFER, ErrorCode.BAD_TOKEN, "token rejected", True)
    ]
    pair.dialer.send(good, Note("still here"))
    assert pair.run()[L] == [MessageReceived(good, Note("still here"))]
    # Both sides forget the refused stream once both directions are finished.
    assert pair.dialer.stream_state(bad) is None
    assert pair.listener.stream_state(bad) is None


# ------------------------------------------------------------------ stream life


def test_messages_flow_both_ways_and_bulk_data_is_not_copied_into_frames() -> None:
    pair = SessionPair()
    established(pair)
    stream = open_accepted(pair)
    payload = b"\x00\x01" * 5000
    pair.dialer.send(stream, Chunk(4096, b"hash", True, payload))
    head, data = pair.dialer.commands_to_send()
    assert isinstance(data, WriteStream) and data.data is payload  # handed on as is
    assert isinstance(head, WriteStream) and len(head.data) == 8 + 12
    pair.inject(D, head)
    pair.inject(D, data)
    pair.listener.send(stream, Note("ack", (4096,)))
    events = pair.run()
    assert events[L] == [MessageReceived(stream, Chunk(4096, b"hash", True, payload))]
    assert events[D] == [MessageReceived(stream, Note("ack", (4096,)))]


def test_graceful_close_is_a_two_way_handshake() -> None:
    pair = SessionPair()
    established(pair)
    stream = open_accepted(pair)
    pair.dialer.close_stream(stream, ErrorCode.NO_ERROR, "done")
    assert pair.dialer.stream_state(stream) is StreamState.CLOSING_LOCAL
    with pytest.raises(LocalProtocolError):
        pair.dialer.send(stream, Note("too late"))
    events = pair.run()
    assert events[L] == [StreamClosed(stream, ErrorCode.NO_ERROR, "done")]
    assert pair.listener.stream_state(stream) is StreamState.CLOSING_REMOTE
    pair.listener.send(stream, Note("last words"))  # the other direction is still open
    pair.listener.close_stream(stream)
    events = pair.run()
    assert events[D] == [
        MessageReceived(stream, Note("last words")),
        StreamClosed(stream, ErrorCode.NO_ERROR, ""),
    ]
    assert pair.dialer.stream_state(stream) is None
    assert pair.listener.stream_state(stream) is None


def test_abort_sends_an_error_and_ends_both_directions() -> None:
    pair = SessionPair()
    established(pair)
    stream = open_accepted(pair)
    pair.listener.abort_stream(stream, ErrorCode.CANCELLED, "user cancelled")
    assert pair.listener.stream_state(stream) is StreamState.CLOSED
    events = pair.run()
    assert events[D] == [StreamFailed(stream, ErrorCode.CANCELLED, "user cancelled", True)]
    assert events[L] == []
    assert pair.dialer.stream_state(stream) is None
    assert pair.listener.stream_state(stream) is None
    with pytest.raises(LocalProtocolError):
        pair.listener.abort_stream(stream, ErrorCode.CANCELLED)


def test_aborting_a_stream_still_waiting_for_its_answer_resets_it() -> None:
    pair = SessionPair()
    established(pair)
    stream = pair.open(D, StreamRole.TRANSFER, "good")
    pair.in_flight.clear()
    pair.dialer.abort_stream(stream, ErrorCode.CANCELLED)
    assert pair.dialer.commands_to_send() == [
        ResetStream(stream, ErrorCode.CANCELLED),
        StopSending(stream, ErrorCode.CANCELLED),
    ]
    assert pair.dialer.stream_state(stream) is StreamState.REFUSED


def test_fin_without_close_is_a_truncation() -> None:
    pair = SessionPair()
    established(pair)
    stream = open_accepted(pair)
    pair.inject(D, WriteStream(stream, b"", end_stream=True))
    events = pair.run()
    assert events[L] == [
        StreamFailed(stream, ErrorCode.TRUNCATED, "stream ended without Close", True)
    ]
    assert pair.listener.state is SessionState.ESTABLISHED


def test_peer_reset_and_stop_sending_fail_the_stream() -> None:
    pair = SessionPair()
    established(pair)
    first = open_accepted(pair)
    second = open_accepted(pair)
    pair.inject(D, ResetStream(first, ErrorCode.CANCELLED))
    pair.inject(D, StopSending(second, ErrorCode(0x1234)))
    events = pair.run()
    assert events[L] == [
        StreamFailed(first, ErrorCode.CANCELLED, "reset by peer", True),
        StreamFailed(second, ErrorCode(0x1234), "peer stopped reading", True),
    ]
    assert pair.listener.state is SessionState.ESTABLISHED


def test_unanswered_stream_times_out_for_its_opener() -> None:
    pair = SessionPair(limits=SessionLimits(handshake_timeout=2.0))
    established(pair)
    stream = pair.open(D, StreamRole.TRANSFER, "good")
    pair.in_flight.clear()
    events = pair.dialer.handle_timer(2.0)
    assert events == [
        StreamRefused(stream, StreamRole.TRANSFER, ErrorCode.HANDSHAKE_TIMEOUT, "no answer", False)
    ]
    assert pair.dialer.commands_to_send() == [
        ResetStream(stream, ErrorCode.HANDSHAKE_TIMEOUT),
        StopSending(stream, ErrorCode.HANDSHAKE_TIMEOUT),
    ]


def test_a_peer_stream_without_hello_is_dropped_silently_after_the_timeout() -> None:
    pair = SessionPair(limits=SessionLimits(handshake_timeout=2.0))
    established(pair)
    pair.inject(D, WriteStream(8, b"\x01\x00"))  # two bytes of a header, then nothing
    assert pair.run() == {D: [], L: []}
    assert pair.listener.next_deadline() == 2.0
    assert pair.listener.handle_timer(2.0) == []
    assert pair.listener.commands_to_send() == [
        ResetStream(8, ErrorCode.HANDSHAKE_TIMEOUT),
        StopSending(8, ErrorCode.HANDSHAKE_TIMEOUT),
    ]


def test_garbage_on_a_stream_closes_the_connection_with_a_code() -> None:
    pair = SessionPair()
    established(pair)
    stream = open_accepted(pair)
    pair.inject(D, WriteStream(stream, b"\x07" * 64))
    events = pair.run()
    assert [(type(e), getattr(e, "code", None)) for e in events[L]] == [
        (SessionClosed, ErrorCode.UNSUPPORTED_FRAME_VERSION),
        (StreamFailed, ErrorCode.UNSUPPORTED_FRAME_VERSION),
    ]
    assert [type(e) for e in events[D]] == [SessionClosed, StreamFailed]
    assert pair.closed_by is L


def test_a_message_out_of_order_closes_the_connection() -> None:
    pair = SessionPair()
    established(pair)
    stream = open_accepted(pair)
    again = MessageStream(TEST_REGISTRY).send(Hello((1,), StreamRole.TRANSFER, ("good",)))
    pair.inject(D, WriteStream(stream, again))
    events = pair.run()
    closed = events[L][0]
    assert isinstance(closed, SessionClosed) and closed.code is ErrorCode.UNEXPECTED_MESSAGE


def test_close_on_the_control_stream_ends_the_session() -> None:
    pair = SessionPair()
    control = established(pair)
    stream = open_accepted(pair)
    pair.inject(D, WriteStream(control, MessageStream(TEST_REGISTRY).send(Close()), True))
    events = pair.run()
    assert events[L] == [
        SessionClosed(ErrorCode.NO_ERROR, "control stream closed", True),
        StreamFailed(stream, ErrorCode.NO_ERROR, "control stream closed", True),
    ]
    assert events[D][0] == SessionClosed(ErrorCode.NO_ERROR, "control stream closed", True)


def test_connection_lost_fails_every_open_stream() -> None:
    pair = SessionPair()
    established(pair)
    first = open_accepted(pair)
    second = open_accepted(pair, side=L, role=StreamRole.TERMINAL)
    events = pair.listener.connection_lost(ErrorCode.GOING_AWAY, "idle", now=1.0)
    assert events == [
        SessionClosed(ErrorCode.GOING_AWAY, "idle", True),
        StreamFailed(first, ErrorCode.GOING_AWAY, "idle", True),
        StreamFailed(second, ErrorCode.GOING_AWAY, "idle", True),
    ]


def test_local_close_emits_no_events_and_stops_everything() -> None:
    pair = SessionPair()
    established(pair)
    stream = open_accepted(pair)
    pair.dialer.close(ErrorCode.GOING_AWAY, "quitting")
    assert pair.dialer.commands_to_send() == [CloseConnection(ErrorCode.GOING_AWAY, "quitting")]
    assert pair.dialer.receive_data(stream, b"anything", False, now=1.0) == []
    with pytest.raises(LocalProtocolError):
        pair.dialer.send(stream, Note("x"))
    pair.dialer.close()  # twice is harmless


def test_local_misuse_raises_and_changes_nothing() -> None:
    pair = SessionPair()
    control = established(pair)
    stream = open_accepted(pair)
    with pytest.raises(LocalProtocolError):
        pair.dialer.send(stream, Close())  # the session sends those
    with pytest.raises(LocalProtocolError):
        pair.dialer.send(99, Note("nowhere"))
    with pytest.raises(LocalProtocolError):
        pair.dialer.close_stream(control)  # close() ends the connection
    with pytest.raises(LocalProtocolError):
        pair.dialer.open_stream(stream, StreamRole.SYNC, now=0.0)  # id in use
    with pytest.raises(LocalProtocolError):
        pair.dialer.open_stream(40, StreamRole.CONTROL, now=0.0)
    with pytest.raises(LocalProtocolError):
        pair.dialer.start(44, now=0.0)
    with pytest.raises(LocalProtocolError):  # a token over the bound fails here, not at the peer
        pair.dialer.open_stream(48, StreamRole.SYNC, tokens=("x" * 5000,), now=0.0)
    assert pair.dialer.stream_state(48) is None
    with pytest.raises(LocalProtocolError):
        pair.dialer.send(stream, object())  # not registered
    assert pair.dialer.commands_to_send() == []
    pair.dialer.send(stream, Note("fine"))
    assert pair.run()[L] == [MessageReceived(stream, Note("fine"))]


def test_session_needs_the_session_messages_in_its_registry() -> None:
    from meshagent_gui.core.protocol.registry import MessageRegistry

    with pytest.raises(ValueError, match="session messages"):
        Session(Side.DIALER, validate=RecordingValidator(), now=0.0, registry=MessageRegistry())


def test_dialer_rejects_acceptance_of_a_version_it_never_offered() -> None:
    pair = SessionPair()
    control = pair.start("good")
    pair.in_flight.clear()
    forged = MessageStream(TEST_REGISTRY).send(HandshakeAccepted(7))
    pair.inject(L, WriteStream(control, forged))
    events = pair.run()
    assert events[D] == [HandshakeFailed(ErrorCode.UNSUPPORTED_VERSION, "accepted as v7", False)]


def test_a_stream_hello_for_another_version_is_refused() -> None:
    pair = SessionPair(dialer_versions=(1, 2), listener_versions=(1, 2))
    established(pair)  # version 2
    stream = pair.next_stream_id(D)
    stale = MessageStream(TEST_REGISTRY).send(Hello((1,), StreamRole.SYNC, ("good",)))
    pair.inject(D, WriteStream(stream, stale))
    pair.deliver()
    assert pair.take_events()[L] == [
        StreamRefused(
            stream, StreamRole.SYNC, ErrorCode.UNSUPPORTED_VERSION, "stream version differs", False
        )
    ]


def test_a_stream_from_the_listener_before_the_dialer_spoke_is_a_violation() -> None:
    pair = SessionPair()
    hello = MessageStream(TEST_REGISTRY).send(Hello((1,), StreamRole.TERMINAL, ("good",)))
    events = pair.dialer.receive_data(1, hello, False, now=0.0)
    assert [(type(e), e.code) for e in events if isinstance(e, HandshakeFailed)] == [
        (HandshakeFailed, ErrorCode.UNEXPECTED_MESSAGE)
    ]
    assert pair.dialer.state is SessionState.CLOSED


@pytest.mark.parametrize(
    ("command", "code", "by_peer"),
    [
        (ResetStream(0, ErrorCode.INTERNAL_ERROR), ErrorCode.INTERNAL_ERROR, True),
        (WriteStream(0, b"", end_stream=True), ErrorCode.TRUNCATED, False),
    ],
)
def test_losing_the_control_stream_ends_the_session(
    command: ResetStream | WriteStream, code: ErrorCode, by_peer: bool
) -> None:
    pair = SessionPair()
    established(pair)
    stream = open_accepted(pair)
    pair.inject(D, command)
    events = pair.run()
    assert [type(e) for e in events[L]] == [SessionClosed, StreamFailed]
    closed = events[L][0]
    assert isinstance(closed, SessionClosed)
    assert (closed.code, closed.by_peer) == (code, by_peer)
    assert events[L][1] == StreamFailed(stream, code, closed.message, by_peer)


# ------------------------------------------------------------------ the tables themselves


def test_tables_cover_every_state_and_terminal_states_are_final() -> None:
    assert set(INCOMING_BY_STATE) == set(StreamState)
    for stream_state, _ in STREAM_TRANSITIONS:
        assert stream_state not in TERMINAL_STREAM_STATES
    reachable = {StreamState.OPENED} | set(STREAM_TRANSITIONS.values())
    assert reachable == set(StreamState)
    for _, session_state, _ in SESSION_TRANSITIONS:
        assert session_state is not SessionState.CLOSED
    for _, session_state, _ in HANDSHAKE_DISPOSITIONS:
        assert session_state in (SessionState.AWAITING_HANDSHAKE, SessionState.ESTABLISHED)


# ------------------------------------------------------------------ any split, same events


@st.composite
def splitters(draw: st.DrawFn) -> object:
    cuts = draw(st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=8))

    def split(data: bytes) -> list[bytes]:
        pieces, start, index = [], 0, 0
        while start < len(data):
            size = cuts[index % len(cuts)]
            pieces.append(data[start : start + size])
            start += size
            index += 1
        return pieces

    return split


def scripted_conversation(split: object) -> dict[Side, list[object]]:
    pair = SessionPair()
    pair.start("good")
    transfer = pair.open(D, StreamRole.TRANSFER, "good", resource="r")
    pair.dialer.send(transfer, Chunk(0, b"abcd", False, b"a" * 300))
    pair.dialer.send(transfer, Note("offer", (1, 2, 3)))
    events = pair.run(split=split)  # type: ignore[arg-type]
    pair.dialer.send(transfer, Chunk(300, b"efgh", True, b""))
    pair.dialer.close_stream(transfer)
    pair.listener.send(transfer, Note("ok"))
    pair.listener.close_stream(transfer)
    later = pair.run(split=split)  # type: ignore[arg-type]
    return {side: [*events[side], *later[side]] for side in Side}


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(splitters())
def test_any_split_of_the_streams_gives_the_same_events(split: object) -> None:
    assert scripted_conversation(split) == scripted_conversation(None)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.booleans(),
    st.lists(
        st.tuples(
            st.sampled_from([0, 1, 4, 5, 8]),
            st.one_of(
                st.binary(max_size=80),
                st.sampled_from(
                    [
                        MessageStream(TEST_REGISTRY).send(Hello((1,), StreamRole.TRANSFER, ("x",))),
                        MessageStream(TEST_REGISTRY).send(Hello((1,), StreamRole.CONTROL, ("x",))),
                        MessageStream(TEST_REGISTRY).send(Close()),
                        MessageStream(TEST_REGISTRY).send(Note("n")),
                    ]
                ),
            ),
            st.booleans(),
        ),
        max_size=12,
    ),
)
def test_hostile_bytes_never_escape_the_session(
    handshake_first: bool, writes_: list[tuple[int, bytes, bool]]
) -> None:
    """Whatever a peer sends, on whichever streams, the session answers with events and
    commands, never an exception; once closed, it stays closed and quiet."""
    pair = SessionPair(listener_validate=lambda hello: "ok")
    if handshake_first:
        established(pair)
    listener = pair.listener
    for stream_id, data, end in writes_:
        listener.receive_data(stream_id, data, end, now=pair.now)
        listener.commands_to_send()
        listener.handle_timer(pair.now + 1)
    if listener.state is SessionState.CLOSED:
        assert listener.receive_data(0, b"more", False, now=pair.now) == []
        assert listener.commands_to_send() == []
