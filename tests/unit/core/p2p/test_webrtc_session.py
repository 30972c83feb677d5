"""The session protocol over WebRTC: the real handshake with server-signed tokens, a real
transfer between two transfer services, and the hostile cases (a DTLS certificate that is not
the token's holder, garbage on a stream, a flood into a channel nobody reads, offers that must
get no answer)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from meshagent_gui import identity
from meshagent_gui.core.bus import EventBus
from meshagent_gui.core.mesh.client import MeshClient
from meshagent_gui.core.mesh.types import CapabilityGrant
from meshagent_gui.core.p2p.errors import CloseCode, Unauthorized
from meshagent_gui.core.p2p.peers import PathInfo, PeerManager, Service, capability_validator
from meshagent_gui.core.p2p.session import (
    INBOX_BYTES,
    ChannelClosed,
    HandshakeRefusedError,
    MeshSession,
)
from meshagent_gui.core.p2p.webrtc import (
    DataChannelConnection,
    WebRTCSettings,
    new_peer_connection,
    rtc_certificate,
)
from meshagent_gui.core.p2p.webrtc_peers import (
    RtcAnswer,
    RtcOffer,
    WebRTCPeers,
    accept_session,
    decode_rtc_signal,
    dial_session,
    encode_rtc_signal,
)
from meshagent_gui.core.protocol.captoken import CapabilityVerifier, public_key_from_jwk_x
from meshagent_gui.core.protocol.errors import ErrorCode
from meshagent_gui.core.protocol.handshake import Validator
from meshagent_gui.core.protocol.messages import StreamRole
from meshagent_gui.core.protocol.registry import MessageRegistry
from meshagent_gui.core.protocol.transfer import TRANSFER_REGISTRY
from meshagent_gui.core.share.service import TransferService
from meshagent_gui.server.tokens import SigningKeys
from tests.unit.core.p2p.test_webrtc import TIMEOUT, loopback_only, negotiate
from tests.unit.core.protocol.pair import TEST_REGISTRY, Chunk

__all__ = ["loopback_only"]  # the autouse fixture: ICE on 127.0.0.1 only

ISSUER = "srv-test"
SHARE_SCOPES = {StreamRole.TRANSFER: ("share:file", "share:folder")}


@pytest.fixture
def keys(tmp_path: Path) -> SigningKeys:
    return SigningKeys.load_or_create(tmp_path / "keys.json")


def verifier_of(device: identity.Identity, keys: SigningKeys) -> CapabilityVerifier:
    return CapabilityVerifier(
        issuer=ISSUER,
        device_id=device.device_id,
        keys={k.kid: public_key_from_jwk_x(k.x) for k in keys.public_keys()},
    )


def token(
    keys: SigningKeys, holder: str, target: str, scope: str = "p2p:connect", resource: str = ""
) -> str:
    jwt, _ = keys.issue(
        issuer=ISSUER,
        holder=holder,
        target=target,
        scope=scope,
        resource=resource,
        now=time.time(),
    )
    return jwt


def validator_for(device: identity.Identity, keys: SigningKeys) -> tuple[CapabilityVerifier, Any]:
    verifier = verifier_of(device, keys)

    def make(peer_id: str) -> Validator:
        return capability_validator(verifier, peer_id, SHARE_SCOPES, on_unknown_key=lambda: None)

    return verifier, make


@asynccontextmanager
async def sessions(
    dialer_id: identity.Identity,
    listener_id: identity.Identity,
    keys: SigningKeys,
    *,
    presented: str | None = None,
    registry: MessageRegistry = TRANSFER_REGISTRY,
    settings: WebRTCSettings | None = None,
) -> AsyncIterator[tuple[MeshSession, MeshSession]]:
    """``dialer_id`` dials ``listener_id`` over WebRTC with a p2p:connect token (``presented``
    if given) and the real offline verifier on both sides: (dialer's, listener's) session."""
    dialer = DataChannelConnection(
        new_peer_connection(rtc_certificate(dialer_id)),
        is_dialer=True,
        expected_peer_id=listener_id.device_id,
        settings=settings,
    )
    listener = DataChannelConnection(
        new_peer_connection(rtc_certificate(listener_id)), is_dialer=False, settings=settings
    )
    _, dialer_validator = validator_for(dialer_id, keys)
    _, listener_validator = validator_for(listener_id, keys)
    connect = presented or token(keys, dialer_id.device_id, listener_id.device_id)
    try:
        await negotiate(dialer, listener)
        # Both ends to their own verdict (a TaskGroup would cancel one at the other's refusal).
        dialed, accepted = await asyncio.gather(
            dial_session(
                dialer,
                tokens=(connect,),
                validate=dialer_validator(listener_id.device_id),
                registry=registry,
            ),
            accept_session(listener, validator=listener_validator, registry=registry),
            return_exceptions=True,
        )
        failures = [e for e in (dialed, accepted) if isinstance(e, BaseException)]
        if failures:
            raise BaseExceptionGroup("the handshake failed", failures)
        assert isinstance(dialed, MeshSession) and isinstance(accepted, MeshSession)
        yield dialed, accepted
    finally:
        await asyncio.gather(dialer.aclose(), listener.aclose())


# ------------------------------------------------------------------ handshake and transfer


@dataclass
class SessionPeers:
    """What TransferService uses of a PeerManager, over real MeshSessions (one per peer)."""

    sessions: dict[str, MeshSession] = field(default_factory=dict)
    services: dict[StreamRole, Service] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def register(self, service: Service) -> None:
        self.services[service.role] = service

    async def session(self, peer_id: str) -> MeshSession:
        return self.sessions[peer_id]

    def path_of(self, session: MeshSession) -> PathInfo:
        return PathInfo("direct", "webrtc", "webrtc")

    async def serve(self, mesh: MeshSession) -> None:
        """As PeerManager._serve_channels: each accepted channel to its service."""
        while True:
            try:
                channel = await mesh.accept_channel()
            except ChannelClosed:
                return
            task = asyncio.ensure_future(self.services[channel.role].handle(channel))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)


@dataclass
class TokenClient:
    """The server's POST /capabilities, signed for real."""

    keys: SigningKeys
    holder: str

    async def capability(self, target: str, scope: str, resource: str = "") -> CapabilityGrant:
        jwt = token(self.keys, self.holder, target, scope, resource)
        return CapabilityGrant(token=jwt, expires_at=time.time() + 60)


def transfer_service(
    device: identity.Identity, keys: SigningKeys, peers: SessionPeers, home: Path
) -> TransferService:
    downloads, data = home / "downloads", home / "data"
    downloads.mkdir(parents=True)
    data.mkdir()

    async def same_user(_: str) -> str | None:
        return "ann"

    return TransferService(
        peers=cast(PeerManager, peers),
        client=cast(MeshClient, TokenClient(keys, device.device_id)),
        bus=EventBus(),
        downloads=lambda: downloads,
        data_dir=data,
        own_user="ann",
        peer_user=same_user,
        peer_name=lambda peer: peer[:8],
        auto_accept=lambda: "own",
        global_rate=lambda: None,
    )


async def test_a_transfer_between_two_transfer_services_over_webrtc(
    alice: identity.Identity, bob: identity.Identity, keys: SigningKeys, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    (source / "folder" / "inner").mkdir(parents=True)
    big = os.urandom(2 * 1024 * 1024 + 123)
    (source / "folder" / "big.bin").write_bytes(big)
    for n in range(20):
        (source / "folder" / "inner" / f"small-{n}.txt").write_text(f"file {n}\n" * n)
    (source / "folder" / "empty.txt").write_bytes(b"")

    alice_peers, bob_peers = SessionPeers(), SessionPeers()
    sender = transfer_service(alice, keys, alice_peers, tmp_path / "alice")
    receiver = transfer_service(bob, keys, bob_peers, tmp_path / "bob")
    try:
        async with sessions(alice, bob, keys) as (ours, theirs):
            assert ours.peer_id == bob.device_id and theirs.peer_id == alice.device_id
            alice_peers.sessions[bob.device_id] = ours
            server = asyncio.create_task(bob_peers.serve(theirs))
            results = await asyncio.wait_for(sender.send([source / "folder"], bob.device_id), 60)
            assert [r.name for r in results] == ["folder"]
            arrived = tmp_path / "bob" / "downloads" / "folder"
            assert (arrived / "big.bin").read_bytes() == big
            for n in range(20):
                assert (arrived / "inner" / f"small-{n}.txt").read_text() == f"file {n}\n" * n
            assert (arrived / "empty.txt").read_bytes() == b""
            server.cancel()
    finally:
        sender.close()
        receiver.close()


async def test_a_peer_whose_dtls_certificate_is_not_the_tokens_holder_is_refused(
    alice: identity.Identity,
    bob: identity.Identity,
    mallory: identity.Identity,
    keys: SigningKeys,
) -> None:
    """Mallory holds a copy of Alice's token (holder alice, cnf = alice's fingerprint) and
    dials Bob with her own DTLS certificate: the token is bound to a certificate she does not
    hold, so the handshake is refused before any stream is accepted."""
    stolen = token(keys, alice.device_id, bob.device_id)
    with pytest.raises(ExceptionGroup) as failed:
        async with sessions(mallory, bob, keys, presented=stolen):
            pass
    kinds = {type(e) for e in failed.value.exceptions}
    assert kinds == {HandshakeRefusedError, Unauthorized}
    refusals = [e for e in failed.value.exceptions if isinstance(e, HandshakeRefusedError)]
    assert refusals and refusals[0].code is ErrorCode.BAD_TOKEN
    assert refusals[0].by_peer


# ------------------------------------------------------------------ garbage and floods


async def test_garbage_on_a_stream_closes_the_connection_with_the_protocol_error(
    alice: identity.Identity, bob: identity.Identity, keys: SigningKeys
) -> None:
    async with sessions(alice, bob, keys, registry=TEST_REGISTRY) as (ours, theirs):
        raw = await ours.connection.open_stream()  # bypasses our session: raw bytes
        await raw.write(b"\x07garbage that is no frame header at all")
        await asyncio.wait_for(theirs.closed.wait(), TIMEOUT)
        info = await asyncio.wait_for(ours.connection.wait_closed(), TIMEOUT)
        assert info.by_peer and info.code == ErrorCode.UNSUPPORTED_FRAME_VERSION
        await asyncio.wait_for(ours.closed.wait(), TIMEOUT)


async def test_a_flood_into_a_channel_nobody_reads_stalls_the_sender(
    alice: identity.Identity, bob: identity.Identity, keys: SigningKeys
) -> None:
    settings = WebRTCSettings(stream_window=1024 * 1024, max_unsent=256 * 1024)
    async with sessions(alice, bob, keys, registry=TEST_REGISTRY, settings=settings) as (
        ours,
        theirs,
    ):
        share = token(keys, alice.device_id, bob.device_id, "share:file", "t1")
        channel = await ours.open_channel(StreamRole.TRANSFER, tokens=(share,), resource="t1")
        incoming = await asyncio.wait_for(theirs.accept_channel(), TIMEOUT)
        piece = os.urandom(128 * 1024)
        sent = 0

        async def flood() -> None:
            nonlocal sent
            while True:
                await channel.send(Chunk(sent, b"abcd", False, piece))
                sent += len(piece)

        flooding = asyncio.create_task(flood())
        try:
            async with asyncio.timeout(30):  # until the sender stops getting anywhere
                while True:
                    before = sent
                    await asyncio.sleep(0.5)
                    if sent == before:
                        break
            assert not flooding.done()
            # held by the receiver: its inbox (bounded in bytes) and one stream window
            assert incoming.inbox_bytes <= INBOX_BYTES + len(piece)
            assert incoming.stream.buffered <= settings.stream_window + 64 * 1024
            assert sent <= INBOX_BYTES + 2 * settings.stream_window + settings.max_unsent
            # a reader that comes back gets every message in order
            first = await asyncio.wait_for(incoming.receive(), TIMEOUT)
            assert isinstance(first, Chunk) and first.offset == 0
        finally:
            flooding.cancel()


# ------------------------------------------------------------------ the signalling path


@dataclass
class Wire:
    """Two WebRTCPeers joined back to back: signals go straight to the other's on_signal."""

    peers: dict[str, WebRTCPeers] = field(default_factory=dict)
    sent: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    tamper: Any = None

    def link(self, me: str) -> Any:
        wire = self

        class Link:
            async def signal(self, to: str, payload: dict[str, Any]) -> None:
                if wire.tamper is not None:
                    payload = wire.tamper(payload)
                wire.sent.append((me, to, payload))
                task = asyncio.create_task(wire.peers[to].on_signal(me, payload))
                wire.tasks.add(task)
                task.add_done_callback(wire.tasks.discard)

        return Link()


def rtc_peers(
    device: identity.Identity, keys: SigningKeys, wire: Wire, adopted: list[MeshSession]
) -> WebRTCPeers:
    verifier, make_validator = validator_for(device, keys)
    offers: set[str] = set()

    async def admit(sender: str, offered: object) -> bool:
        if not isinstance(offered, str) or offered in offers:
            return False
        try:
            verifier.verify(
                offered,
                now=time.time(),
                peer_id=sender,
                scope="p2p:connect",
                replay_cache=verifier_of(device, keys).replay_cache,
            )
        except Exception:
            return False
        offers.add(offered)
        return True

    async def no_stun() -> None:
        return None

    def adopt(mesh: MeshSession, dialer: str) -> bool:
        adopted.append(mesh)
        return True

    peers = WebRTCPeers(
        credentials=lambda: device,
        link=wire.link(device.device_id),
        stun=no_stun,
        admit_offer=admit,
        validator=make_validator,
        adopt=adopt,
        local_addresses=frozenset,  # loopback only: every peer is on this machine
        registry=TRANSFER_REGISTRY,
        answer_timeout=2.0,
    )
    wire.peers[device.device_id] = peers
    return peers


async def test_an_offer_with_a_token_connects_through_the_signalling_path(
    alice: identity.Identity, bob: identity.Identity, keys: SigningKeys
) -> None:
    wire = Wire()
    adopted: list[MeshSession] = []
    dialer = rtc_peers(alice, keys, wire, [])
    rtc_peers(bob, keys, wire, adopted)
    mesh = await asyncio.wait_for(
        dialer.dial(bob.device_id, token(keys, alice.device_id, bob.device_id)), TIMEOUT
    )
    try:
        assert mesh.peer_id == bob.device_id
        kinds = [decode_rtc_signal(p) for _, _, p in wire.sent]
        assert [type(k) for k in kinds] == [RtcOffer, RtcAnswer]
        for _ in range(100):
            if adopted:
                break
            await asyncio.sleep(0.05)
        assert [m.peer_id for m in adopted] == [alice.device_id]
    finally:
        await mesh.aclose()
        for other in adopted:
            await other.aclose()


@pytest.mark.parametrize("problem", ["no-token", "someone-elses-token", "other-fingerprint"])
async def test_an_offer_that_does_not_check_out_gets_no_answer(
    alice: identity.Identity,
    bob: identity.Identity,
    mallory: identity.Identity,
    keys: SigningKeys,
    problem: str,
) -> None:
    """Nothing goes back (no answer, so no ICE packet either) for an offer without a token of
    its sender, or whose DTLS fingerprint is not its sender's device id."""
    wire = Wire()
    adopted: list[MeshSession] = []
    dialer = rtc_peers(alice, keys, wire, [])
    rtc_peers(bob, keys, wire, adopted)
    presented = token(keys, alice.device_id, bob.device_id)
    if problem == "someone-elses-token":
        presented = token(keys, mallory.device_id, bob.device_id)
    if problem == "other-fingerprint":
        # the offer claims mallory's certificate: what DTLS would show cannot be alice
        mallory_sdp = new_peer_connection(rtc_certificate(mallory))
        mallory_sdp.createDataChannel("x")
        await mallory_sdp.setLocalDescription(await mallory_sdp.createOffer())
        fake = mallory_sdp.localDescription.sdp
        await mallory_sdp.close()

        def swap(payload: dict[str, Any]) -> dict[str, Any]:
            return {**payload, "sdp": fake} if payload.get("webrtc") == "offer" else payload

        wire.tamper = swap

    with pytest.raises(TimeoutError):
        await dialer.dial(bob.device_id, "" if problem == "no-token" else presented)
    assert [to for _, to, _ in wire.sent] == [bob.device_id]  # the offer, no answer
    assert not adopted
    assert encode_rtc_signal(RtcAnswer(attempt="a", sdp="v=0")) == {
        "webrtc": "answer",
        "attempt": "a",
        "sdp": "v=0",
    }
    assert CloseCode.PEER_ID_MISMATCH  # the DTLS check itself: test_webrtc.py
