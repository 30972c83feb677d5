"""Who gets in: capability tokens on the first stream, over real QUIC, with the real verifier."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from meshagent_gui import identity
from meshagent_gui.core.p2p import Endpoint, PeerConnection, PeerStream
from meshagent_gui.core.p2p.peers import capability_validator
from meshagent_gui.core.p2p.session import ChannelRefused, HandshakeRefusedError, MeshSession
from meshagent_gui.core.protocol.captoken import CapabilityVerifier, public_key_from_jwk_x
from meshagent_gui.core.protocol.errors import ErrorCode
from meshagent_gui.core.protocol.messages import StreamRole
from meshagent_gui.server.tokens import SigningKeys

TIMEOUT = 10.0
ISSUER = "srv-test"


@pytest.fixture
def keys(tmp_path: Path) -> SigningKeys:
    return SigningKeys.load_or_create(tmp_path / "keys.json")


def token(keys: SigningKeys, holder: str, target: str, *, age: float = 0.0) -> str:
    jwt, _ = keys.issue(
        issuer=ISSUER,
        holder=holder,
        target=target,
        scope="p2p:connect",
        resource="",
        now=time.time() - age,
    )
    return jwt


@asynccontextmanager
async def listener(
    bob: identity.Identity, keys: SigningKeys
) -> AsyncIterator[tuple[Endpoint, list[MeshSession]]]:
    verifier = CapabilityVerifier(
        issuer=ISSUER,
        device_id=bob.device_id,
        keys={k.kid: public_key_from_jwk_x(k.x) for k in keys.public_keys()},
    )
    admitted: list[MeshSession] = []

    async def authorize(conn: PeerConnection, first: PeerStream) -> bool:
        validate = capability_validator(
            verifier, conn.peer_id, {StreamRole.TRANSFER: ("share:file",)}, on_unknown_key=list
        )
        admitted.append(await MeshSession.accept(conn, first, validate=validate))
        return True

    endpoint = Endpoint(bob, authorize=authorize)
    await endpoint.start("127.0.0.1", 0)
    try:
        yield endpoint, admitted
    finally:
        await endpoint.close()


async def dial(me: Endpoint, target: Endpoint, target_id: str, jwt: str) -> MeshSession:
    conn = await me.connect(("127.0.0.1", target.local_address[1]), target_id)
    return await MeshSession.dial(conn, tokens=(jwt,), validate=lambda hello: None)


async def test_only_the_right_holder_with_a_live_token_gets_in(
    alice: identity.Identity, bob: identity.Identity, mallory: identity.Identity, keys: SigningKeys
) -> None:
    carol = identity.generate("carol")
    async with (
        listener(bob, keys) as (bob_ep, admitted),
        Endpoint(alice) as alice_ep,
        Endpoint(mallory) as mallory_ep,
    ):
        good = await asyncio.wait_for(
            dial(alice_ep, bob_ep, bob.device_id, token(keys, alice.device_id, bob.device_id)),
            TIMEOUT,
        )
        refusals = {
            "expired": (alice_ep, token(keys, alice.device_id, bob.device_id, age=600)),
            "for another device": (mallory_ep, token(keys, mallory.device_id, carol.device_id)),
            "someone else's": (mallory_ep, token(keys, alice.device_id, bob.device_id)),
            "forged": (mallory_ep, "eyJhbGciOiJub25lIn0.e30."),
        }
        for what, (ep, jwt) in refusals.items():
            with pytest.raises(HandshakeRefusedError) as refused:
                await asyncio.wait_for(dial(ep, bob_ep, bob.device_id, jwt), TIMEOUT)
            assert refused.value.code is ErrorCode.BAD_TOKEN, what
        # Garbage instead of a Hello: that connection dies, the good one does not notice.
        conn = await mallory_ep.connect(("127.0.0.1", bob_ep.local_address[1]), bob.device_id)
        stream = await conn.open_stream()
        await stream.write(b"\xff" * 64 + b"GET / HTTP/1.1\r\n\r\n")
        await asyncio.wait_for(conn.wait_closed(), TIMEOUT)
        assert len(admitted) == 1
        assert await good.connection.ping(timeout=TIMEOUT) < TIMEOUT
        # A service stream needs its own scope: a p2p:connect token does not open a transfer.
        with pytest.raises(ChannelRefused) as refused_stream:
            await asyncio.wait_for(
                good.open_channel(
                    StreamRole.TRANSFER, tokens=(token(keys, alice.device_id, bob.device_id),)
                ),
                TIMEOUT,
            )
        assert refused_stream.value.code is ErrorCode.BAD_TOKEN
        assert refused_stream.value.message == "wrong_scope"
