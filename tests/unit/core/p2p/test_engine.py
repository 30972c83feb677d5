from __future__ import annotations

import pytest

from meshagent_gui import identity
from meshagent_gui.core.p2p.engine import (
    ENGINE_ENV,
    EngineConnection,
    EngineError,
    TlsCredentials,
    TransportSettings,
    create_engine,
    engine_name,
)


def test_qh3_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENGINE_ENV, raising=False)
    assert engine_name() == "qh3"


def test_the_environment_selects_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENGINE_ENV, "AIOQUIC")
    assert engine_name() == "aioquic"
    assert engine_name("qh3") == "qh3"  # an explicit choice wins


def test_an_unknown_engine_is_a_clear_error() -> None:
    with pytest.raises(EngineError, match="unknown QUIC engine 'quiche'"):
        engine_name("quiche")


def test_windows_follow_bandwidth_times_rtt() -> None:
    settings = TransportSettings.for_path(100e6, 0.1)
    assert settings.stream_window == 20_000_000
    assert settings.connection_window == 80_000_000
    assert TransportSettings.for_path(1e6, 0.001).stream_window == 1024 * 1024


class Recorder:
    def __init__(self) -> None:
        self.handshakes: list[bool] = []
        self.data: list[tuple[int, bytes, bool]] = []

    def on_handshake_completed(self, early_data_accepted: bool) -> None:
        self.handshakes.append(early_data_accepted)

    def on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self.data.append((stream_id, data, end_stream))

    def on_stream_reset(self, stream_id: int, error_code: int) -> None: ...
    def on_stop_sending(self, stream_id: int, error_code: int) -> None: ...
    def on_connection_id_issued(self, connection_id: bytes) -> None: ...
    def on_connection_id_retired(self, connection_id: bytes) -> None: ...
    def on_ping_acknowledged(self, uid: int) -> None: ...
    def on_terminated(self, error_code: int, frame_type: int | None, reason: str) -> None: ...


def sent(connection: EngineConnection, now: float) -> list[bytes]:
    return [payload for payloads, _ in connection.datagrams_to_send(now) for payload in payloads]


def test_both_engines_look_the_same_in_memory(
    engine: str, alice: identity.Identity, bob: identity.Identity
) -> None:
    """A handshake and 0.5-RTT stream data through the adapter, no sockets, time passed in."""
    server_engine = create_engine(
        TlsCredentials(alice.certificate_pem, alice.private_key_pem), name=engine
    )
    client_engine = create_engine(
        TlsCredentials(bob.certificate_pem, bob.private_key_pem), name=engine
    )
    now = 100.0
    server_addr, client_addr = ("127.0.0.1", 1), ("127.0.0.1", 2)
    client = client_engine.create_client()
    client.connect(server_addr, now)
    first_flight = sent(client, now)
    odcid = first_flight[0][6 : 6 + first_flight[0][5]]
    server = server_engine.create_server(odcid)
    server.receive_datagrams(first_flight, client_addr, now)
    control_stream = server.open_stream(unidirectional=True)
    server.send_stream_data(control_stream, b"challenge", False)
    client_events, server_events = Recorder(), Recorder()
    for _ in range(4):
        now += 0.001
        client.receive_datagrams(sent(server, now), server_addr, now)
        client.drain_events(client_events)
        server.receive_datagrams(sent(client, now), client_addr, now)
        server.drain_events(server_events)
    assert client_events.handshakes == [False]
    assert server_events.handshakes == [False]
    assert client_events.data == [(3, b"challenge", False)]
    assert client.peer_certificate_der() == alice.certificate_der
    assert server.peer_certificate_der() is None  # the dialer sends no certificate
