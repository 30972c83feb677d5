"""Signalling hygiene: an offer makes this agent send packets only when its sender holds a
``p2p:connect`` token for us, and then only a few, paced, to at most 16 candidates.

The agent under attack is Bob. The signal path is the real PeerManager with the real offline
verifier and server-signed tokens; only the network edges are fakes that count what goes out:
every UDP datagram (the endpoint) and every signal (the server link). No wall clock: punching
is paced through an injected sleep that records the delays instead of waiting.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from meshagent_gui import identity
from meshagent_gui.core.bus import EventBus
from meshagent_gui.core.mesh.client import MeshError
from meshagent_gui.core.mesh.types import CapabilityGrant
from meshagent_gui.core.p2p.candidates import Candidate
from meshagent_gui.core.p2p.engine import Address
from meshagent_gui.core.p2p.peers import (
    PUNCH_SCHEDULE,
    SIGNAL_KEY,
    PeerManager,
    PeerUnreachable,
    capability_validator,
)
from meshagent_gui.core.protocol.captoken import CapabilityVerifier, public_key_from_jwk_x
from meshagent_gui.core.protocol.messages import SUPPORTED_VERSIONS, Hello, StreamRole
from meshagent_gui.server.tokens import SigningKeys

ISSUER = "srv-test"
OWN = frozenset({"192.0.2.2"})  # Bob's machine, for the same-host rule
OUR_PORT = 5000
DIALER_TOKEN = "the-token-the-server-gave-bob"  # what Bob's fake client gets as a dialer


@dataclass
class FakeEndpoint:
    """Bob's QUIC endpoint: records every datagram and every dial instead of sending it."""

    device_id: str
    local_address: Address = ("192.0.2.2", OUR_PORT)
    sent: list[Address] = field(default_factory=list)
    dialed: list[Address] = field(default_factory=list)

    def send_datagram(self, data: bytes, addr: Address) -> None:
        self.sent.append(addr)

    async def connect(self, addr: Address, peer_id: str, *, timeout: float) -> Any:
        self.dialed.append(addr)
        raise TimeoutError("fake endpoint dials nothing")


@dataclass
class FakeLink:
    """The server link: records signals; ``reply`` answers an offer the way a peer would."""

    online: set[str] = field(default_factory=set)
    signals: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    reply: Any = None

    async def signal(self, to: str, payload: dict[str, Any]) -> None:
        self.signals.append((to, payload))
        if self.reply is not None:
            await self.reply(to, payload)


class FakeClient:
    url = "http://127.0.0.1:1"

    def __init__(self, token: str) -> None:
        self.token = token

    async def info(self) -> Any:
        raise MeshError("no server in this test", code="offline")

    async def capability(self, target: str, scope: str) -> CapabilityGrant:
        return CapabilityGrant(token=self.token, expires_at=time.time() + 60)


@dataclass
class FakeRelay:
    """The relay link: no WebSocket relay; a TURN allocation when ``relayed`` is set, and the
    peers' relayed addresses signalling taught it."""

    relayed: Address | None = None
    learned: dict[str, Address] = field(default_factory=dict)

    async def wait_connected(self, timeout: float) -> None:
        raise TimeoutError("no relay in this test")

    def turn_address(self) -> Address | None:
        return self.relayed

    def add_turn_peer(self, device_id: str, relayed: Address) -> None:
        if self.relayed is not None:
            self.learned[device_id] = relayed

    def forget_turn_peer(self, device_id: str) -> None:
        self.learned.pop(device_id, None)

    def turn_carries(self, device_id: str) -> bool:
        return device_id in self.learned


class Pacer:
    """The injected sleep: records each delay, waits for none."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


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
    keys: SigningKeys, holder: str, target: str, *, scope: str = "p2p:connect", age: float = 0.0
) -> str:
    jwt, _ = keys.issue(
        issuer=ISSUER,
        holder=holder,
        target=target,
        scope=scope,
        resource="",
        now=time.time() - age,
    )
    return jwt


@dataclass
class Bob:
    manager: PeerManager
    endpoint: FakeEndpoint
    link: FakeLink
    pacer: Pacer
    verifier: CapabilityVerifier
    refetches: list[None]
    relay: FakeRelay


@pytest.fixture
def bob_agent(bob: identity.Identity, keys: SigningKeys) -> Bob:
    endpoint = FakeEndpoint(bob.device_id)
    link = FakeLink()
    pacer = Pacer()
    verifier = verifier_of(bob, keys)
    refetches: list[None] = []
    relay = FakeRelay()

    async def refetch() -> None:
        refetches.append(None)

    manager = PeerManager(
        endpoint=endpoint,  # type: ignore[arg-type]
        link=link,  # type: ignore[arg-type]
        client=FakeClient(DIALER_TOKEN),  # type: ignore[arg-type]
        verifier=verifier,
        bus=EventBus(),
        relay=relay,  # type: ignore[arg-type]
        refetch_keys=refetch,
        local_addresses=lambda: OWN,
        sleep=pacer,
    )
    return Bob(manager, endpoint, link, pacer, verifier, refetches, relay)


def offer(candidates: list[Candidate], jwt: str | None, attempt: str = "a1") -> dict[str, Any]:
    payload: dict[str, Any] = {
        SIGNAL_KEY: "offer",
        "attempt": attempt,
        "candidates": [c.to_wire() for c in candidates],
    }
    if jwt is not None:
        payload["token"] = jwt
    return payload


LOOPBACK = [Candidate("host", "127.0.0.1", port) for port in range(40000, 40032)]
REMOTE = [Candidate("host", "198.51.100.7", 4000), Candidate("srflx", "203.0.113.9", 4001)]


async def test_a_hostile_offer_makes_the_agent_send_nothing(
    bob_agent: Bob,
    alice: identity.Identity,
    bob: identity.Identity,
    mallory: identity.Identity,
    keys: SigningKeys,
    tmp_path: Path,
) -> None:
    carol = identity.generate("carol")
    other_server = SigningKeys.load_or_create(tmp_path / "other-server-keys.json")
    hostile = {
        "no token": None,
        "garbage token": "eyJhbGciOiJub25lIn0.e30.",
        "a token for another audience": token(keys, mallory.device_id, carol.device_id),
        "an expired token": token(keys, mallory.device_id, bob.device_id, age=600),
        "someone else's token": token(keys, alice.device_id, bob.device_id),
        "another scope": token(keys, mallory.device_id, bob.device_id, scope="share:file"),
        "another server's key": token(other_server, mallory.device_id, bob.device_id),
    }
    for what, jwt in hostile.items():
        await bob_agent.manager.on_signal(mallory.device_id, offer(LOOPBACK, jwt))
        await bob_agent.manager.on_signal(mallory.device_id, offer(REMOTE, jwt))
        assert bob_agent.endpoint.sent == [], what
        assert bob_agent.link.signals == [], what  # not even an answer
    assert len(bob_agent.refetches) == 1  # an unknown key refetches once, not per offer


async def test_loopback_candidates_from_another_host_get_no_packet(
    bob_agent: Bob, bob: identity.Identity, mallory: identity.Identity, keys: SigningKeys
) -> None:
    """Even a peer holding a valid token cannot aim our packets at our own loopback."""
    jwt = token(keys, mallory.device_id, bob.device_id)
    await bob_agent.manager.on_signal(mallory.device_id, offer(LOOPBACK, jwt))
    assert bob_agent.endpoint.sent == []
    [(to, answer)] = bob_agent.link.signals
    assert (to, answer[SIGNAL_KEY], answer["attempt"]) == (mallory.device_id, "answer", "a1")


async def test_an_honest_offer_is_answered_and_punched_paced(
    bob_agent: Bob, alice: identity.Identity, bob: identity.Identity, keys: SigningKeys
) -> None:
    jwt = token(keys, alice.device_id, bob.device_id)
    await bob_agent.manager.on_signal(alice.device_id, offer(REMOTE, jwt))
    [(to, answer)] = bob_agent.link.signals
    assert to == alice.device_id
    assert answer == {
        SIGNAL_KEY: "answer",
        "attempt": "a1",
        "candidates": [Candidate("host", "192.0.2.2", OUR_PORT).to_wire()],
    }
    targets = [(c.address, c.port) for c in REMOTE]
    assert bob_agent.endpoint.sent == targets * len(PUNCH_SCHEDULE)  # a few each
    assert sum(bob_agent.pacer.delays) >= PUNCH_SCHEDULE[-1]  # spread over seconds
    assert all(d > 0 for d in bob_agent.pacer.delays[1:])  # never two datagrams at once

    # The offer did not spend the token: the QUIC handshake that follows still takes it once.
    validate = capability_validator(bob_agent.verifier, alice.device_id, {}, on_unknown_key=list)
    assert validate(Hello(SUPPORTED_VERSIONS, StreamRole.CONTROL, tokens=(jwt,)))
    # But each token buys one offer.
    await bob_agent.manager.on_signal(alice.device_id, offer(REMOTE, jwt, attempt="a2"))
    assert len(bob_agent.link.signals) == 1
    assert len(bob_agent.endpoint.sent) == len(targets) * len(PUNCH_SCHEDULE)


async def test_at_most_sixteen_candidates_are_punched(
    bob_agent: Bob, alice: identity.Identity, bob: identity.Identity, keys: SigningKeys
) -> None:
    many = [Candidate("srflx", "203.0.113.9", port) for port in range(2000, 2032)]
    await bob_agent.manager.on_signal(
        alice.device_id, offer(many, token(keys, alice.device_id, bob.device_id))
    )
    assert set(bob_agent.endpoint.sent) == {(c.address, c.port) for c in many[:16]}
    assert len(bob_agent.endpoint.sent) == 16 * len(PUNCH_SCHEDULE)


async def test_loopback_is_punched_for_a_peer_on_this_host(
    bob_agent: Bob, alice: identity.Identity, bob: identity.Identity, keys: SigningKeys
) -> None:
    here = [Candidate("host", "192.0.2.2", 6000), Candidate("host", "127.0.0.1", 6000)]
    await bob_agent.manager.on_signal(
        alice.device_id, offer(here, token(keys, alice.device_id, bob.device_id))
    )
    assert set(bob_agent.endpoint.sent) == {("192.0.2.2", 6000), ("127.0.0.1", 6000)}


async def test_the_dialer_offers_its_token_and_heeds_only_its_peers_answer(
    bob_agent: Bob, alice: identity.Identity, mallory: identity.Identity
) -> None:
    """Bob dials Alice: the offer carries the token the handshake will present; an answer
    from anyone but Alice (here Mallory, who learnt the attempt id) is ignored."""
    manager, link = bob_agent.manager, bob_agent.link
    link.online.add(alice.device_id)

    async def reply(to: str, payload: dict[str, Any]) -> None:
        bait = {**payload, SIGNAL_KEY: "answer", "candidates": [REMOTE[0].to_wire()]}
        await manager.on_signal(mallory.device_id, bait)
        await manager.on_signal(alice.device_id, {**payload, SIGNAL_KEY: "answer"})

    link.reply = reply
    with pytest.raises(PeerUnreachable):
        await manager.session(alice.device_id, timeout=5)
    [(to, sent)] = link.signals
    assert (to, sent[SIGNAL_KEY], sent["token"]) == (alice.device_id, "offer", DIALER_TOKEN)
    # Alice's answer echoed our own candidates back: dialed; Mallory's bait: never.
    assert bob_agent.endpoint.dialed == [("192.0.2.2", OUR_PORT)]


async def test_a_malformed_offer_is_ignored_before_its_token_is_read(
    bob_agent: Bob,
    alice: identity.Identity,
    bob: identity.Identity,
    keys: SigningKeys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A signal of the wrong shape is dropped at the edge with a debug line: no answer, no
    packet, and its token is not spent (the honest offer after it still goes through)."""
    jwt = token(keys, alice.device_id, bob.device_id)
    good = offer(REMOTE, jwt)
    malformed = [
        {**good, "attempt": "x" * 65},
        {**good, "attempt": ""},
        {**good, "attempt": 7},
        {**good, "candidates": {"kind": "host"}},
        {**good, "token": ["not", "text"]},
        {SIGNAL_KEY: "offer", "token": jwt},
    ]
    with caplog.at_level("DEBUG", logger="meshagent_gui.core.p2p.peers"):
        for payload in malformed:
            await bob_agent.manager.on_signal(alice.device_id, payload)
    assert bob_agent.link.signals == []
    assert bob_agent.endpoint.sent == []
    assert sum("malformed p2p offer" in r.getMessage() for r in caplog.records) == len(malformed)
    await bob_agent.manager.on_signal(alice.device_id, {SIGNAL_KEY: "newer-kind"})  # not ours
    await bob_agent.manager.on_signal(alice.device_id, good)
    assert [answer[SIGNAL_KEY] for _, answer in bob_agent.link.signals] == ["answer"]


# ------------------------------------------------------------------ TURN candidates

BOB_RELAYED: Address = ("203.0.113.50", 50001)
ALICE_TURN = Candidate("turn", "203.0.113.50", 50002)


async def test_a_hostile_offer_teaches_no_turn_address(
    bob_agent: Bob, bob: identity.Identity, mallory: identity.Identity, keys: SigningKeys
) -> None:
    """Without a token for us, a relayed address in an offer is not even read."""
    bob_agent.relay.relayed = BOB_RELAYED
    for jwt in (None, "garbage", token(keys, mallory.device_id, bob.device_id, age=600)):
        await bob_agent.manager.on_signal(mallory.device_id, offer([ALICE_TURN], jwt))
    assert bob_agent.relay.learned == {} and bob_agent.link.signals == []


async def test_an_honest_offer_trades_turn_addresses_and_punches_no_relay(
    bob_agent: Bob, alice: identity.Identity, bob: identity.Identity, keys: SigningKeys
) -> None:
    bob_agent.relay.relayed = BOB_RELAYED
    jwt = token(keys, alice.device_id, bob.device_id)
    await bob_agent.manager.on_signal(alice.device_id, offer([*REMOTE, ALICE_TURN], jwt))
    assert bob_agent.relay.learned == {alice.device_id: (ALICE_TURN.address, ALICE_TURN.port)}
    [(_, answer)] = bob_agent.link.signals
    assert Candidate("turn", *BOB_RELAYED).to_wire() in answer["candidates"]
    # Our socket never sends to a relayed address (the TURN server does, from our allocation).
    assert set(bob_agent.endpoint.sent) == {(c.address, c.port) for c in REMOTE}


async def test_garbage_turn_candidates_are_skipped(
    bob_agent: Bob, alice: identity.Identity, bob: identity.Identity, keys: SigningKeys
) -> None:
    bob_agent.relay.relayed = BOB_RELAYED
    garbage: list[object] = [
        {"kind": "turn", "address": "203.0.113.50", "port": 0},
        {"kind": "turn", "address": "203.0.113.50", "port": 70000},
        {"kind": "turn", "address": "fe80::1", "port": 3478},
        {"kind": "turn", "address": "224.0.0.1", "port": 3478},
        {"kind": "turn", "address": "not an address", "port": 3478},
        {"kind": "turn", "address": ["203.0.113.50"], "port": 3478},
    ]
    payload = offer([], token(keys, alice.device_id, bob.device_id))
    payload["candidates"] = garbage
    await bob_agent.manager.on_signal(alice.device_id, payload)
    assert bob_agent.relay.learned == {}
    assert len(bob_agent.link.signals) == 1  # still answered: the offer itself was honest


async def test_without_an_allocation_no_turn_candidate_is_offered(
    bob_agent: Bob, alice: identity.Identity, bob: identity.Identity, keys: SigningKeys
) -> None:
    jwt = token(keys, alice.device_id, bob.device_id)
    await bob_agent.manager.on_signal(alice.device_id, offer([ALICE_TURN], jwt))
    [(_, answer)] = bob_agent.link.signals
    assert all(c["kind"] != "turn" for c in answer["candidates"])
    assert bob_agent.relay.learned == {}
