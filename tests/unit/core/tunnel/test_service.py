"""Forwards and the exposing side over a real QUIC session on 127.0.0.1 (in process), with a real
TCP echo service: data both ways, half-close, refusals, the allow-list, the budget, hostile
streams and a dead session. Tokens are stand-ins: "room:<name>" grants a capability of that room
(the token checks themselves are captoken's and the peer manager's, tested there)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from meshagent_gui import identity
from meshagent_gui.core.mesh.client import MeshClient
from meshagent_gui.core.mesh.link import MeshLink
from meshagent_gui.core.p2p import Endpoint, PeerConnection, PeerStream
from meshagent_gui.core.p2p.peers import PeerManager, Service
from meshagent_gui.core.p2p.session import ChannelClosed, MeshSession
from meshagent_gui.core.protocol.captoken import Capability
from meshagent_gui.core.protocol.errors import ErrorCode
from meshagent_gui.core.protocol.messages import Hello, StreamRole
from meshagent_gui.core.protocol.tunnel import (
    TUNNEL_REGISTRY,
    Connected,
    ConnectionBudget,
    Data,
    Target,
    TicketBook,
    TunnelErrorCode,
)
from meshagent_gui.core.tunnel.exposure import Exposure, parse_rules
from meshagent_gui.core.tunnel.service import (
    TOKEN_POOL,
    Forward,
    TunnelEvent,
    TunnelService,
    code_name,
    refusal_text,
)
from meshagent_gui.errors import UserError

TIMEOUT = 10.0


def grant_for(hello: Hello) -> object:
    """The listener's validator: "room:<name>" tokens are capabilities granted in <name>."""
    token = hello.tokens[0] if hello.tokens else ""
    if not token.startswith("room:"):
        raise ValueError("bad token")
    return Capability(
        issuer="server",
        holder="alice",
        target="bob",
        scope="tunnel:connect",
        resource=hello.resource,
        issued_at=0,
        not_before=0,
        expires_at=1e12,
        jti=os.urandom(8).hex(),
        room=token.removeprefix("room:"),
    )


@dataclass
class StubPeers:
    """The slice of PeerManager the tunnel service uses."""

    sessions: list[MeshSession] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)

    def register(self, service: Service) -> None:
        self.services.append(service)

    async def session(self, peer_id: str) -> MeshSession:
        if not self.sessions or self.sessions[-1].closed.is_set():
            raise UserError(f"cannot reach {peer_id}", code="unreachable")
        return self.sessions[-1]


@dataclass
class StubClient:
    room: str = "@ann"
    refuse: bool = False
    asked: int = 0

    async def capability(self, target: str, scope: str, resource: str, ttl: int) -> Any:
        self.asked += 1
        if self.refuse:
            from meshagent_gui.core.mesh.client import MeshError

            raise MeshError("You may not.", code="not_allowed")

        @dataclass
        class Grant:
            token: str

        return Grant(f"room:{self.room}")


@dataclass
class World:
    exposing: TunnelService
    forwarding: TunnelService
    client: StubClient
    peers: StubPeers
    rules: list[Exposure]
    echo_port: int
    events: list[TunnelEvent]
    dial: Callable[[], Any]

    async def forward(self, target: str | None = None) -> Forward:
        return await self.forwarding.forward(
            "bob-id",
            "bob",
            Target("127.0.0.1", self.echo_port) if target is None else _target(target),
            on_event=self.events.append,
        )


def _target(text: str) -> Target:
    from meshagent_gui.core.protocol.tunnel import parse_target

    return parse_target(text)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF; a first line "count" instead answers the byte count after EOF."""
    with contextlib.suppress(ConnectionError):
        await _echo(reader, writer)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    first = await reader.read(6)
    if first == b"count\n":
        total = 0
        while chunk := await reader.read(65536):
            total += len(chunk)
        writer.write(f"got {total}\n".encode())
    else:
        writer.write(first)
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def world(
    alice: identity.Identity, bob: identity.Identity, *, per_peer: int = 64, idle: float = 0.0
) -> AsyncIterator[World]:
    echo_server = await asyncio.start_server(echo, "127.0.0.1", 0)
    echo_port = echo_server.sockets[0].getsockname()[1]
    rules = parse_rules(f"127.0.0.1:{echo_port}")
    serving: set[asyncio.Task[None]] = set()
    exposing_peers = StubPeers()
    exposing = TunnelService(
        peers=cast(PeerManager, exposing_peers),
        client=cast(MeshClient, None),
        own_user="ann",
        rules=lambda: rules,
        peer_name=lambda _: "alice",
        idle_timeout=lambda: idle,
        budget=ConnectionBudget(per_peer=per_peer, total=1024),
    )

    async def serve_channels(mesh: MeshSession) -> None:
        while True:
            try:
                channel = await mesh.accept_channel()
            except ChannelClosed:
                return
            task = asyncio.create_task(exposing.serve(channel))
            serving.add(task)
            task.add_done_callback(serving.discard)

    admit = exposing.service().admit
    assert admit is not None

    async def authorize(conn: PeerConnection, first: PeerStream) -> bool:
        def validate(hello: Hello) -> object:  # as the peer manager's: a ticket, else a token
            return admit(conn.peer_id, hello) or grant_for(hello)

        mesh = await MeshSession.accept(conn, first, validate=validate, registry=TUNNEL_REGISTRY)
        serving.add(asyncio.create_task(serve_channels(mesh)))
        return True

    listener = Endpoint(bob, engine="qh3", authorize=authorize)
    dialer = Endpoint(alice, engine="qh3")
    await listener.start("127.0.0.1", 0)
    await dialer.start("127.0.0.1", 0)
    peers = StubPeers()

    async def dial() -> MeshSession:
        conn = await dialer.connect(("127.0.0.1", listener.local_address[1]), bob.device_id)
        mesh = await MeshSession.dial(
            conn, tokens=("room:@ann",), validate=grant_for, registry=TUNNEL_REGISTRY
        )
        peers.sessions.append(mesh)
        return mesh

    await dial()
    client = StubClient()
    forwarding = TunnelService(
        peers=cast(PeerManager, peers),
        client=cast(MeshClient, client),
        own_user="ann",
        rules=list,
        peer_name=lambda _: "bob",
        idle_timeout=lambda: idle,
    )
    assert [s.role for s in exposing_peers.services] == [StreamRole.TUNNEL]
    try:
        yield World(exposing, forwarding, client, peers, rules, echo_port, [], dial)
    finally:
        for forward in list(forwarding.forwards):
            await forward.aclose()
        for task in list(serving):
            task.cancel()
        await asyncio.gather(*serving, return_exceptions=True)
        for mesh in peers.sessions:
            await mesh.aclose()
        await dialer.close()
        await listener.close()
        echo_server.close()


async def connect(forward: Forward) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", forward.port)


async def echoed(
    forward: Forward, line: bytes = b"hello\n"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection through ``forward`` that has carried ``line`` there and back."""
    reader, writer = await connect(forward)
    writer.write(line)
    assert await asyncio.wait_for(reader.readexactly(len(line)), TIMEOUT) == line
    return reader, writer


async def test_bulk_data_both_ways_arrives_whole(
    alice: identity.Identity, bob: identity.Identity
) -> None:
    async with world(alice, bob) as w:
        forward = await w.forward()
        reader, writer = await connect(forward)
        payload = os.urandom(8 * 1024 * 1024)

        async def send() -> None:
            for offset in range(0, len(payload), 100_000):
                writer.write(payload[offset : offset + 100_000])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        received = await asyncio.wait_for(reader.read(-1), TIMEOUT * 3)  # until the echo's FIN
        await sender
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        writer.close()
        closed = await _event(w, "closed")
        assert closed.bytes_sent == closed.bytes_received == len(payload)
        assert closed.reason == "no_error"


async def test_half_close_carries_the_request_end_and_the_answer_after_it(
    alice: identity.Identity, bob: identity.Identity
) -> None:
    async with world(alice, bob) as w:
        forward = await w.forward()
        reader, writer = await connect(forward)
        writer.write(b"count\n" + b"x" * 100_000)
        writer.write_eof()  # our half only: the answer must still come back
        assert await asyncio.wait_for(reader.read(-1), TIMEOUT) == b"got 100000\n"
        writer.close()


async def test_many_concurrent_connections_each_get_their_own_bytes(
    alice: identity.Identity, bob: identity.Identity
) -> None:
    async with world(alice, bob) as w:
        forward = await w.forward()

        async def one(number: int) -> bool:
            reader, writer = await connect(forward)
            data = number.to_bytes(4, "big") * 20_000
            writer.write(data)
            writer.write_eof()
            back = await reader.read(-1)
            writer.close()
            return back == data

        results = await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(40))), TIMEOUT * 3)
        assert all(results)


async def test_later_connections_ride_the_ticket_not_the_server(
    alice: identity.Identity, bob: identity.Identity
) -> None:
    async with world(alice, bob) as w:
        forward = await w.forward()
        for number in range(6):
            _, writer = await echoed(forward, b"%05d\n" % number)
            writer.close()
        assert w.client.asked <= 1 + TOKEN_POOL  # the first connection's, and the pool's
        assert len(w.exposing.tickets) == 1
        # The exposing side forgets its tickets (a restart): the forward falls back to a token.
        w.exposing.tickets = TicketBook()
        asked = w.client.asked
        _, writer = await echoed(forward, b"again\n")
        writer.close()
        assert w.client.asked > asked and len(w.exposing.tickets) == 1


async def test_a_refusing_target_resets_the_client_and_says_why(
    alice: identity.Identity, bob: identity.Identity
) -> None:
    async with world(alice, bob) as w:
        with contextlib.closing(__import__("socket").socket()) as probe:
            probe.bind(("127.0.0.1", 0))
            closed_port = probe.getsockname()[1]
        w.rules.append(Exposure(Target("127.0.0.1", closed_port)))
        forward = await w.forward(f"127.0.0.1:{closed_port}")
        reader, writer = await connect(forward)
        assert await _ended(reader) == b""
        refused = await _event(w, "refused")
        assert refused.reason == TunnelErrorCode.TARGET_REFUSED.name.lower()
        assert (
            refused.message
            == f"bob could not connect to 127.0.0.1:{closed_port}: connection refused"
        )
        writer.close()


@pytest.mark.parametrize(
    ("rule", "room"),
    [
        (None, "@ann"),  # not exposed at all
        ("{port}@team", "@ann"),  # exposed to a room the token does not come from
        ("{port}@device:" + "ab" * 32, "@ann"),  # exposed to another device
        ("{port}", "team"),  # own devices only; a token of a room does not do
    ],
)
async def test_only_an_exposed_target_for_this_peer_and_room_is_reached(
    alice: identity.Identity, bob: identity.Identity, rule: str | None, room: str
) -> None:
    async with world(alice, bob) as w:
        w.rules.clear()
        target = f"127.0.0.1:{w.echo_port}"
        if rule is not None:
            w.rules.extend(parse_rules(rule.format(port=target)))
        w.client.room = room
        forward = await w.forward()
        reader, writer = await connect(forward)
        assert await _ended(reader) == b""
        refused = await _event(w, "refused")
        assert refused.reason == "not_exposed"
        hint = f"(on it: meshagent expose {w.echo_port})"
        assert refused.message == f"bob does not expose {target} to this device {hint}"
        writer.close()


async def test_a_forward_without_the_right_fails_before_it_listens(
    alice: identity.Identity, bob: identity.Identity
) -> None:
    async with world(alice, bob) as w:
        w.client.refuse = True
        with pytest.raises(UserError) as refused:
            await w.forward()
        assert "no room you share with it gives you tunnel:connect" in refused.value.message
        assert not w.forwarding.forwards


async def test_a_flood_of_connections_gets_the_budget_and_no_more(
    alice: identity.Identity, bob: identity.Identity
) -> None:
    async with world(alice, bob, per_peer=4) as w:
        forward = await w.forward()
        held = [await connect(forward) for _ in range(10)]
        for _, writer in held:
            writer.write(b"ping\n")
        answers = await asyncio.gather(*(_ended(r, 5) for r, _ in held))
        assert sorted(answers) == [b""] * 6 + [b"ping\n"] * 4
        assert [e.reason for e in w.events if e.event == "refused"] == ["too_many_connections"] * 6
        assert w.exposing.budget.held() == 4
        for _, writer in held:
            writer.close()
        await _until(lambda: w.exposing.budget.held() == 0)
        reader, writer = await connect(forward)  # places came back
        writer.write(b"again\n")
        assert await _ended(reader, 6) == b"again\n"
        writer.close()


async def test_hostile_streams_are_ended_and_serve_nothing(
    alice: identity.Identity, bob: identity.Identity
) -> None:
    async with world(alice, bob) as w:
        mesh = w.peers.sessions[-1]
        target = f"127.0.0.1:{w.echo_port}"
        # Connected toward the exposing side: not its to receive.
        channel = await mesh.open_channel(StreamRole.TUNNEL, tokens=["room:@ann"], resource=target)
        assert isinstance(await channel.receive(), Connected)
        await channel.send(Connected())
        with pytest.raises(ChannelClosed) as ended:
            while True:
                await asyncio.wait_for(channel.receive(), TIMEOUT)
        assert ended.value.code is ErrorCode.UNEXPECTED_MESSAGE
        # A target that is not host:port, and no token at all.
        for tokens, resource in ((["room:@ann"], "no such:target"), ([], target)):
            with pytest.raises(ChannelClosed):
                odd = await mesh.open_channel(StreamRole.TUNNEL, tokens=tokens, resource=resource)
                await asyncio.wait_for(odd.receive(), TIMEOUT)
        assert w.exposing.budget.held() == 0
        # The session still carries honest connections.
        honest = await mesh.open_channel(StreamRole.TUNNEL, tokens=["room:@ann"], resource=target)
        assert isinstance(await honest.receive(), Connected)
        await honest.send(Data(b"still fine"))
        reply = await asyncio.wait_for(honest.receive(), TIMEOUT)
        assert isinstance(reply, Data) and bytes(reply.data) == b"still fine"


async def test_a_dead_session_resets_its_connections_and_the_forward_redials(
    alice: identity.Identity, bob: identity.Identity
) -> None:
    async with world(alice, bob) as w:
        forward = await w.forward()
        reader, writer = await echoed(forward)
        w.peers.sessions[-1].close(ErrorCode.GOING_AWAY, "gone")  # the path died
        assert await _ended(reader) == b""
        writer.close()
        await w.dial()  # what the peer manager does for the next connection
        _, writer = await echoed(forward, b"again\n")
        writer.close()


async def test_an_idle_connection_is_reset_on_both_sides(
    alice: identity.Identity, bob: identity.Identity
) -> None:
    async with world(alice, bob, idle=0.3) as w:
        forward = await w.forward()
        reader, writer = await echoed(forward)
        assert await _ended(reader) == b""  # then silence: the idle timer ends it
        closed = await _event(w, "closed")
        assert closed.reason == "idle_timeout"
        writer.close()


# ---------------------------------------------------------------- helpers


async def _ended(reader: asyncio.StreamReader, limit: int = 0) -> bytes:
    """What arrives until the connection ends (EOF or reset)."""
    data = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(65536), TIMEOUT):
            data += chunk
            if limit and len(data) >= limit:
                break
    return data


async def _event(w: World, kind: str) -> TunnelEvent:
    await _until(lambda: any(e.event == kind for e in w.events))
    return next(e for e in w.events if e.event == kind)


async def _until(probe: Callable[[], bool]) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not probe():
            await asyncio.sleep(0.01)


def test_the_peer_managers_validator_takes_a_ticket_before_the_tokens(
    bob: identity.Identity,
) -> None:
    from meshagent_gui.core.p2p.peers import capability_validator
    from meshagent_gui.core.protocol.captoken import CapabilityVerifier
    from meshagent_gui.core.protocol.handshake import Refusal
    from meshagent_gui.core.protocol.messages import SUPPORTED_VERSIONS

    service = TunnelService(
        peers=cast(PeerManager, StubPeers()),
        client=cast(MeshClient, None),
        own_user="ann",
        rules=list,
        peer_name=str,
        wall_clock=lambda: 1000.0,
    )
    alice = "a1" * 32  # a device id: the SHA-256 of its certificate, in hex
    grant = grant_for(Hello(SUPPORTED_VERSIONS, StreamRole.TUNNEL, ("room:@ann",), "h:1"))
    ticket = service.tickets.issue(alice, "h:1", grant, expires_at=2000.0, now=1000.0)
    admit = service.service().admit
    assert admit is not None
    validate = capability_validator(
        CapabilityVerifier(issuer="server", device_id=bob.device_id, keys={}),
        alice,
        {StreamRole.TUNNEL: ("tunnel:connect",)},
        on_unknown_key=lambda: None,
        admits={StreamRole.TUNNEL: admit},
    )

    def hello(token: str, resource: str = "h:1") -> Hello:
        return Hello(SUPPORTED_VERSIONS, StreamRole.TUNNEL, (token,), resource)

    assert validate(hello(ticket)) is grant
    for refused in (hello(ticket, "h:2"), hello(ticket + "x"), hello("not a token")):
        with pytest.raises(Refusal) as caught:
            validate(refused)
        assert caught.value.code is ErrorCode.BAD_TOKEN


# ---------------------------------------------------------------- announcements


@dataclass
class RecordingLink:
    """Stands in for the MeshLink: what was announced (by key) and withdrawn."""

    standing: dict[str, tuple[str, dict[str, Any], list[str] | None]] = field(default_factory=dict)
    withdrawn: list[str] = field(default_factory=list)

    async def announce(
        self, kind: str, data: dict[str, Any], *, key: str | None = None, rooms: list[str] | None
    ) -> None:
        assert key is not None
        self.standing[key] = (kind, data, rooms)

    async def withdraw(self, key: str) -> None:
        self.withdrawn.append(key)
        self.standing.pop(key, None)


def announcing_service(
    rules: list[Exposure], link: RecordingLink, bus: Any = None
) -> TunnelService:
    return TunnelService(
        peers=cast(PeerManager, StubPeers()),
        client=cast(MeshClient, None),
        own_user="ann",
        rules=lambda: rules,
        peer_name=lambda device_id: f"name-{device_id[:4]}",
        link=cast(MeshLink, link),
        bus=bus,
    )


async def test_exposed_ports_are_announced_per_room_and_withdrawn_when_unexposed() -> None:
    rules = parse_rules(f"22,localhost:8080@team,localhost:5432@team,9000@device:{'b' * 64}")
    link = RecordingLink()
    service = announcing_service(rules, link)
    await service.announce_exposed()
    assert link.standing == {
        "tunnel.exposed:@own": ("tunnel.exposed", {"room": "", "targets": ["localhost:22"]}, None),
        "tunnel.exposed:team": (
            "tunnel.exposed",
            {"room": "team", "targets": ["localhost:8080", "localhost:5432"]},
            ["team"],
        ),
    }  # a one-device rule is not announced: no room stands for it
    rules[:] = parse_rules("22")
    await service.announce_exposed()
    assert link.withdrawn == ["tunnel.exposed:team"]
    assert list(link.standing) == ["tunnel.exposed:@own"]
    assert {(t.kind, t.target, t.audience) for t in service.listing()} == {
        ("exposed", "localhost:22", "your own devices")
    }


async def test_peers_announcements_are_listed_and_garbage_is_ignored() -> None:
    from meshagent_gui.core.bus import EventBus
    from meshagent_gui.core.events import (
        AnnouncementReceived,
        PeerWentOffline,
    )

    bus = EventBus()
    service = announcing_service([], RecordingLink(), bus)
    box, other = "b" * 64, "c" * 64
    task = asyncio.create_task(service.run())
    await asyncio.sleep(0)
    events = [
        AnnouncementReceived("tunnel.exposed", box, {"room": "", "targets": ["22", "h:5432"]}),
        AnnouncementReceived("tunnel.exposed", box, {"room": "team", "targets": ["22"]}),
        # hostile or malformed: no room, targets not a list, unreadable targets, a flood
        AnnouncementReceived("tunnel.exposed", other, {"targets": ["22"]}),
        AnnouncementReceived("tunnel.exposed", other, {"room": "x", "targets": "22"}),
        AnnouncementReceived(
            "tunnel.exposed", other, {"room": "y", "targets": [None, "no port", *["1"] * 500]}
        ),
        AnnouncementReceived("tunnel.exposed", None, {"room": "", "targets": ["80"]}),
    ]
    for event in events:
        bus.publish(event)
    for _ in range(20):
        await asyncio.sleep(0)
    assert service.announced_by(box) == ["localhost:22", "h:5432"]
    assert service.announced_by(other) == ["localhost:1"]
    assert service.announced_by("d" * 64) is None
    available = {(t.device_id, t.target, t.audience) for t in service.listing()}
    assert (box, "localhost:22", "room team") in available
    bus.publish(AnnouncementReceived("tunnel.exposed.ended", box, {"room": ""}))
    bus.publish(PeerWentOffline(other, "other"))
    for _ in range(20):
        await asyncio.sleep(0)
    assert service.announced_by(box) == ["localhost:22"]
    assert service.announced_by(other) is None
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_stop_ends_what_the_listing_names_and_nothing_else(
    alice: identity.Identity, bob: identity.Identity
) -> None:
    async with world(alice, bob) as w:
        forward = await w.forward()
        reader, writer = await echoed(forward)
        [served] = [t for t in w.exposing.listing() if t.kind == "served"]
        for garbage in ("", "served:", "served:999", "served:-1", "nope:1", "forward:1.2.3.4:5"):
            assert not await w.exposing.stop(garbage) and not await w.forwarding.stop(garbage)
        assert not await w.exposing.stop(f"exposed:127.0.0.1:{w.echo_port}")  # nobody saves
        # A connection a peer holds here: reset at both ends, the forward says why.
        assert await w.exposing.stop(served.id)
        assert await _ended(reader) == b""
        closed = await _event(w, "closed")
        assert closed.reason == "connection_reset"
        assert not [t for t in w.exposing.listing() if t.kind == "served"]
        writer.close()
        # A forward: it stops listening and says so to its command (``closed``).
        [info] = w.forwarding.listing()
        assert await w.forwarding.stop(info.id)
        assert forward.closed.is_set() and not w.forwarding.listing()
        with pytest.raises(OSError):
            await connect(forward)


def test_a_refusal_names_session_codes_as_well_as_tunnel_codes() -> None:
    target = Target("localhost", 22)
    assert code_name(TunnelErrorCode.TARGET_REFUSED) == "target_refused"
    assert code_name(ErrorCode.BAD_TOKEN) == "bad_token"  # not unknown_0x21
    assert code_name(0x4FF) == "unknown_0x4ff"  # a newer peer's code
    assert refusal_text("bob", target, ErrorCode.BAD_TOKEN, "expired") == (
        "bob refused the tunnel's capability token (expired)"
    )
    ended = refusal_text("bob", target, ErrorCode.CANCELLED)
    assert ended == "bob ended the connection (cancelled)"
