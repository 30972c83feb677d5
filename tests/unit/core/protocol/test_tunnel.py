"""The tunnel protocol: messages, targets, the state table, both ends through real Sessions, and
the connection budget (no sockets, no clock)."""

from __future__ import annotations

import contextlib
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshagent_gui.core.protocol.errors import ErrorCode, ProtocolError
from meshagent_gui.core.protocol.framing import encode_header
from meshagent_gui.core.protocol.handshake import (
    MessageReceived,
    Side,
    StreamAccepted,
    StreamClosed,
    StreamFailed,
)
from meshagent_gui.core.protocol.messages import TUNNEL_TYPES, StreamRole
from meshagent_gui.core.protocol.registry import MessageStream
from meshagent_gui.core.protocol.tunnel import (
    CONNECTED,
    DATA,
    MAX_DATA,
    TUNNEL_REGISTRY,
    TUNNEL_TRANSITIONS,
    Connected,
    ConnectionBudget,
    Data,
    Target,
    TicketBook,
    TunnelAction,
    TunnelEnd,
    TunnelErrorCode,
    TunnelInput,
    TunnelProtocolError,
    TunnelState,
    format_target,
    parse_target,
)
from tests.unit.core.protocol.pair import SessionPair

A, In, S = TunnelAction, TunnelInput, TunnelState


def roundtrip(message: object) -> object:
    (decoded,) = MessageStream(TUNNEL_REGISTRY).receive_data(
        MessageStream(TUNNEL_REGISTRY).send(message)
    )
    return decoded


# ---------------------------------------------------------------- messages


def test_messages_round_trip_and_data_is_a_zero_copy_slice() -> None:
    assert roundtrip(Connected()) == Connected()
    wire = MessageStream(TUNNEL_REGISTRY).send(Data(b"hello"))
    assert len(wire) == 8 + 5  # the header, then the bytes: nothing else
    (data,) = MessageStream(TUNNEL_REGISTRY).receive_data(wire)
    assert isinstance(data, Data) and isinstance(data.data, memoryview)
    assert data.data.obj is wire and bytes(data.data) == b"hello"


def test_type_codes_are_the_tunnel_range() -> None:
    assert {CONNECTED, DATA} == {c for c in TUNNEL_REGISTRY.codes if c in TUNNEL_TYPES}
    assert int(StreamRole.TUNNEL) == 4
    assert all(int(code) in range(0x400, 0x500) or code < 0x100 for code in TunnelErrorCode)
    assert ErrorCode(int(TunnelErrorCode.NOT_EXPOSED)).name == "UNKNOWN_0x402"  # one code space


def test_a_data_frame_claiming_more_than_its_cap_costs_nothing() -> None:
    stream = MessageStream(TUNNEL_REGISTRY)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError) as caught:
            stream.receive_data(encode_header(DATA, 0, 0xFFFF_FFFF))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.code is ErrorCode.FRAME_TOO_LARGE
    assert peak < 64 * 1024
    with pytest.raises(ProtocolError):
        MessageStream(TUNNEL_REGISTRY).send(Data(b"x" * (MAX_DATA + 1)))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 0xFF))
def test_garbage_on_a_tunnel_stream_raises_nothing_but_a_protocol_error(
    garbage: bytes, flags: int
) -> None:
    for code in (CONNECTED, DATA):
        with contextlib.suppress(ProtocolError):
            MessageStream(TUNNEL_REGISTRY).receive_data(
                encode_header(code, flags, len(garbage)) + garbage
            )


# ---------------------------------------------------------------- targets


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("22", Target("localhost", 22)),
        ("localhost:8080", Target("localhost", 8080)),
        ("DB.Example.org:5432", Target("db.example.org", 5432)),
        ("127.0.0.1:1", Target("127.0.0.1", 1)),
        ("[::1]:65535", Target("::1", 65535)),
    ],
)
def test_targets_parse_and_print_back(text: str, target: Target) -> None:
    assert parse_target(text) == target
    assert parse_target(str(target)) == target


@pytest.mark.parametrize(
    "text",
    ["", "0", "65536", "-1", "x", "host:", ":22", "::1:22", "[::1]22", "[nope]:22", "a b:22",
     "host:22:33", "\u0661\u0662", "host/x:22", "-host:22", "a" * 300 + ":22"],
)  # fmt: skip
def test_bad_targets_are_one_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_target(text)


@given(st.text(max_size=80))
def test_any_text_is_a_target_or_a_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        target = parse_target(text)
        assert parse_target(format_target(target.host, target.port)) == target


# ---------------------------------------------------------------- the table


def test_the_table_is_consistent() -> None:
    states = {state for state, _ in TUNNEL_TRANSITIONS} | {
        after for after, _ in TUNNEL_TRANSITIONS.values()
    }
    assert states == set(TunnelState)
    for (state, event), (after, actions) in TUNNEL_TRANSITIONS.items():
        if state in (S.CLOSED, S.RESET):
            assert (after, actions) == (state, ()), "an ended connection does nothing more"
        if after is S.RESET and state is not S.RESET:
            # every way into RESET tells the other side, or was told by it
            assert A.SEND_ERROR in actions or event is In.PEER_RESET
            assert A.RESET_TCP in actions or event is In.TARGET_FAILED
        if A.SEND_DATA in actions:
            assert event is In.LOCAL_DATA
        if A.WRITE_TCP in actions:
            assert event is In.PEER_DATA
    for state in (S.OPEN, S.LOCAL_EOF, S.PEER_EOF):
        for event in (In.LOCAL_RESET, In.PEER_RESET, In.IDLE):
            assert TUNNEL_TRANSITIONS[state, event][0] is S.RESET


def test_half_close_both_ways_ends_closed() -> None:
    end = TunnelEnd(opener=True, now=0)
    assert end.handle(In.PEER_CONNECTED, 0) == ()
    assert end.handle(In.LOCAL_EOF, 1) == (A.SEND_CLOSE,)
    assert end.handle(In.PEER_DATA, 2, 10) == (A.WRITE_TCP,)  # the other direction still flows
    assert end.handle(In.PEER_EOF, 3) == (A.SHUT_TCP_WRITE, A.CLOSE_TCP)
    assert end.state is S.CLOSED and end.bytes_in == 10


@pytest.mark.parametrize(
    ("opener", "setup", "event"),
    [
        (True, [], In.PEER_DATA),  # data before Connected
        (False, [], In.PEER_CONNECTED),  # Connected toward the acceptor
        (True, [In.PEER_CONNECTED], In.PEER_CONNECTED),  # a second Connected
        (True, [In.PEER_CONNECTED, In.PEER_EOF], In.PEER_DATA),  # data after the peer's FIN
    ],
)
def test_a_peer_out_of_turn_is_a_protocol_error_that_changes_nothing(
    opener: bool, setup: list[TunnelInput], event: TunnelInput
) -> None:
    end = TunnelEnd(opener=opener, now=0)
    for step in setup:
        end.handle(step, 0)
    before = end.state
    with pytest.raises(TunnelProtocolError) as caught:
        end.handle(event, 1)
    assert caught.value.code is ErrorCode.UNEXPECTED_MESSAGE and end.state is before
    with pytest.raises(TunnelProtocolError):
        end.message(Connected() if event is In.PEER_CONNECTED else Data(b"x"), 1)


def test_our_own_mistakes_are_value_errors() -> None:
    with pytest.raises(ValueError):
        TunnelEnd(opener=True, now=0).handle(In.TARGET_CONNECTED, 0)
    with pytest.raises(ValueError):
        TunnelEnd(opener=False, now=0).handle(In.LOCAL_DATA, 0)


def test_the_idle_timer_resets_a_silent_connection_only() -> None:
    end = TunnelEnd(opener=False, now=0, idle_timeout=30)
    end.handle(In.TARGET_CONNECTED, 0)
    end.handle(In.LOCAL_DATA, 20, 5)
    assert end.deadline() == 50
    assert end.handle_timer(49) == ()
    assert end.handle_timer(50) == (A.SEND_ERROR, A.RESET_TCP)
    assert end.state is S.RESET and end.deadline() is None
    assert TunnelEnd(opener=True, now=0).deadline() is None  # 0: never


# ---------------------------------------------------------------- both ends, real Sessions


class Ends:
    """An opener and an acceptor over two real Sessions; TCP is what the actions say."""

    def __init__(self) -> None:
        self.pair = SessionPair(registry=TUNNEL_REGISTRY)
        self.pair.start("good")
        self.pair.run()
        self.sid = self.pair.open(Side.DIALER, StreamRole.TUNNEL, "good", resource="localhost:22")
        events = self.pair.run()[Side.LISTENER]
        assert any(isinstance(e, StreamAccepted) and e.resource == "localhost:22" for e in events)
        self.ends = {
            Side.DIALER: TunnelEnd(opener=True, now=0),
            Side.LISTENER: TunnelEnd(opener=False, now=0),
        }
        self.tcp: dict[Side, list[object]] = {Side.DIALER: [], Side.LISTENER: []}

    def do(self, side: Side, actions: tuple[TunnelAction, ...], payload: bytes = b"") -> None:
        session = self.pair.sessions[side]
        for action in actions:
            match action:
                case A.SEND_CONNECTED:
                    session.send(self.sid, Connected())
                case A.SEND_DATA:
                    session.send(self.sid, Data(payload))
                case A.SEND_CLOSE:
                    session.close_stream(self.sid)
                case A.SEND_ERROR:
                    session.abort_stream(self.sid, ErrorCode(int(TunnelErrorCode.CONNECTION_RESET)))
                case _:
                    self.tcp[side].append(action if action is not A.WRITE_TCP else payload)
        self.pair.collect()

    def local(self, side: Side, event: TunnelInput, payload: bytes = b"") -> None:
        self.do(side, self.ends[side].handle(event, 0, len(payload)), payload)

    def deliver(self) -> None:
        events = self.pair.run()
        for side, happened in events.items():
            for event in happened:
                end = self.ends[side]
                match event:
                    case MessageReceived(message=Data() as data):
                        self.do(side, end.message(data, 0), bytes(data.data))
                    case MessageReceived(message=message):
                        self.do(side, end.message(message, 0))
                    case StreamClosed(code=ErrorCode.NO_ERROR):
                        self.do(side, end.handle(In.PEER_EOF, 0))
                    case StreamClosed() | StreamFailed():
                        self.do(side, end.handle(In.PEER_RESET, 0))


def test_a_connection_through_two_sessions_half_closes_each_way() -> None:
    t = Ends()
    dialer, listener = Side.DIALER, Side.LISTENER
    t.local(listener, In.TARGET_CONNECTED)
    t.deliver()
    assert t.ends[dialer].state is S.OPEN
    t.local(dialer, In.LOCAL_DATA, b"GET / HTTP/1.0\r\n\r\n")
    t.local(dialer, In.LOCAL_EOF)  # the client half-closes: the request is complete
    t.deliver()
    assert t.tcp[listener] == [b"GET / HTTP/1.0\r\n\r\n", A.SHUT_TCP_WRITE]
    assert t.ends[listener].state is S.PEER_EOF
    t.local(listener, In.LOCAL_DATA, b"HTTP/1.0 200 OK\r\n\r\nhi")  # the answer still flows
    t.local(listener, In.LOCAL_EOF)
    t.deliver()
    assert t.tcp[dialer] == [b"HTTP/1.0 200 OK\r\n\r\nhi", A.SHUT_TCP_WRITE, A.CLOSE_TCP]
    assert t.ends[dialer].state is t.ends[listener].state is S.CLOSED


def test_a_reset_on_one_tcp_end_resets_the_other() -> None:
    t = Ends()
    t.local(Side.LISTENER, In.TARGET_CONNECTED)
    t.deliver()
    t.local(Side.DIALER, In.LOCAL_RESET)
    t.deliver()
    assert t.tcp[Side.DIALER] == [A.RESET_TCP]
    assert t.tcp[Side.LISTENER] == [A.RESET_TCP]
    assert t.ends[Side.DIALER].state is t.ends[Side.LISTENER].state is S.RESET


def test_a_refused_target_resets_the_client() -> None:
    t = Ends()
    t.local(Side.LISTENER, In.TARGET_FAILED)
    t.deliver()
    assert t.tcp[Side.DIALER] == [A.RESET_TCP] and t.ends[Side.DIALER].state is S.RESET


# ---------------------------------------------------------------- the budget


def test_the_budget_refuses_a_flood_per_peer_and_overall() -> None:
    budget = ConnectionBudget(per_peer=3, total=5)
    assert [budget.admit("mallory") for _ in range(10)] == [True] * 3 + [False] * 7
    assert budget.admit("ann") and budget.admit("ann") and not budget.admit("bob")  # total 5
    budget.release("mallory")
    assert budget.admit("bob") and budget.held() == 5 and budget.held("mallory") == 2
    with pytest.raises(ValueError):
        budget.release("nobody")
    with pytest.raises(ValueError):
        ConnectionBudget(per_peer=0, total=1)


# ---------------------------------------------------------------- tickets


def test_a_ticket_stands_for_its_grant_for_that_peer_and_target_until_it_expires() -> None:
    book = TicketBook(per_peer=2)
    grant = object()
    ticket = book.issue("alice", "localhost:22", grant, expires_at=100, now=0)
    assert ticket.startswith("tunnel-ticket:") and len(ticket) <= 128
    assert book.issue("alice", "localhost:22", grant, expires_at=100, now=1) == ticket  # reused
    assert book.admit("alice", "localhost:22", ticket, now=99) is grant
    assert book.expires_in(ticket, now=40) == 60
    assert book.admit("mallory", "localhost:22", ticket, now=1) is None  # another peer
    assert book.admit("alice", "localhost:5432", ticket, now=1) is None  # another target
    assert book.admit("alice", "localhost:22", ticket + "x", now=1) is None
    assert book.admit("alice", "localhost:22", ticket, now=100) is None  # expired: forgotten
    assert len(book) == 0


def test_a_peer_holds_a_bounded_number_of_tickets() -> None:
    book = TicketBook(per_peer=3)
    tickets = [book.issue("mallory", f"h:{n}", object(), 1e9, 0) for n in range(50)]
    kept = book.issue("alice", "h:1", object(), 1e9, 0)
    assert len(book) == 4
    assert [book.admit("mallory", f"h:{n}", t, 1) is not None for n, t in enumerate(tickets)] == [
        False
    ] * 47 + [True] * 3
    assert book.admit("alice", "h:1", kept, 1) is not None


def test_connected_carries_the_ticket_and_old_peers_decode_without_one() -> None:
    sent = Connected("tunnel-ticket:abc", 250.0)
    assert roundtrip(sent) == sent
    assert roundtrip(Connected()) == Connected("", 0.0)
    assert "abc" not in repr(sent)  # a credential: never in logs
    with pytest.raises(ProtocolError):
        MessageStream(TUNNEL_REGISTRY).send(Connected("x" * 200))
