"""The WebRTC dial path: signalling through the Mesh Server's WebSocket, and the session
handshake over a :class:`~.webrtc.DataChannelConnection`.

The frames ride in ``signal`` frames (relayed by the server between devices that share a room,
exactly like the QUIC path's offers), tagged ``webrtc``:

- ``webrtc.offer`` ``{webrtc: "offer", attempt, sdp, token}``: the dialer's SDP offer and its
  ``p2p:connect`` token for the callee (the one its session Hello presents next);
- ``webrtc.answer`` ``{webrtc: "answer", attempt, sdp}``;
- ``webrtc.candidate`` ``{webrtc: "candidate", attempt, candidate, sdpMid?, sdpMLineIndex?}``:
  a trickled ICE candidate (``candidate`` empty: end of candidates). Browsers trickle; aiortc
  puts all of an agent's candidates in its SDP, so an agent sends none but takes them.

The callee checks the offer's token offline before anything else (the same check and the same
one-offer-per-token cache as a QUIC offer): no peer connection is made, no answer sent and no
ICE packet leaves for an offer without one. The offer's DTLS fingerprint must be its sender's
device id; after DTLS the certificate the peer presented must be too (``PEER_ID_MISMATCH``), and
the session handshake then checks the token's ``sub`` and ``cnf`` against it. ICE candidates
follow the QUIC path's rules (:class:`~.webrtc.CandidateBudget`).

When the server has TURN, every peer connection is also given the TURN server with the relay
link's current credentials, so an agent's SDP carries a ``typ relay`` candidate: ICE prefers
host and reflexive pairs and falls back to it only where no direct path exists. A share-link
guest gets no TURN credentials of its own; the agent's relayed candidate is its way through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Final, Protocol

import msgspec

from meshagent_gui.core.mesh.client import MeshError
from meshagent_gui.core.mesh.types import TurnCredentials
from meshagent_gui.core.protocol.handshake import Validator
from meshagent_gui.core.protocol.messages import BASE_REGISTRY
from meshagent_gui.core.protocol.registry import MessageRegistry

from . import auth
from .candidates import MAX_PEER_CANDIDATES
from .errors import CloseCode, P2PError, Unauthorized
from .session import HandshakeRefusedError, MeshSession

# aiortc (through .webrtc) is imported on first use, not at import: it is a tenth of an
# agent's start-up, and most agents never see a browser.
if TYPE_CHECKING:
    from aiortc import RTCSessionDescription
    from aiortc.rtcdtlstransport import RTCCertificate

    from .webrtc import CandidateBudget, DataChannelConnection, WebRTCSettings

log = logging.getLogger(__name__)

WEBRTC_KEY: Final = "webrtc"
ANSWER_TIMEOUT: Final = 10.0
CONNECT_TIMEOUT: Final = 15.0  # ICE + DTLS + SCTP, then the session handshake
MAX_SDP_CHARS: Final = 32 * 1024
MAX_ATTEMPTS: Final = 8  # WebRTC connections being set up toward us at once

AttemptId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Sdp = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_SDP_CHARS)]


class RtcOffer(
    msgspec.Struct, frozen=True, kw_only=True, tag_field=WEBRTC_KEY, tag="offer", omit_defaults=True
):
    attempt: AttemptId
    sdp: Sdp
    token: str | None = None


class RtcAnswer(msgspec.Struct, frozen=True, kw_only=True, tag_field=WEBRTC_KEY, tag="answer"):
    attempt: AttemptId
    sdp: Sdp


class RtcCandidate(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    tag_field=WEBRTC_KEY,
    tag="candidate",
    omit_defaults=True,
):
    attempt: AttemptId
    candidate: Annotated[str, msgspec.Meta(max_length=512)] = ""
    sdpMid: Annotated[str, msgspec.Meta(max_length=32)] | None = None  # the W3C names
    sdpMLineIndex: Annotated[int, msgspec.Meta(ge=0, le=64)] | None = None


RtcSignal = RtcOffer | RtcAnswer | RtcCandidate


def decode_rtc_signal(payload: object) -> RtcSignal:
    """A ``webrtc`` signal's payload as its type; ValueError for anything else."""
    try:
        signal: RtcSignal = msgspec.convert(payload, RtcSignal)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from None
    return signal


def encode_rtc_signal(signal: RtcSignal) -> dict[str, object]:
    body: dict[str, object] = msgspec.to_builtins(signal)
    return body


# ---------------------------------------------------------------------- the session on top


async def dial_session(
    conn: DataChannelConnection,
    *,
    tokens: Sequence[str],
    validate: Validator,
    registry: MessageRegistry = BASE_REGISTRY,
    timeout: float = CONNECT_TIMEOUT,
) -> MeshSession:
    """Dialer: wait for the verified WebRTC connection, then the session handshake."""
    await conn.wait_connected(timeout)
    async with asyncio.timeout(timeout):
        return await MeshSession.dial(conn, tokens=tokens, validate=validate, registry=registry)


async def accept_session(
    conn: DataChannelConnection,
    *,
    validator: Callable[[str], Validator],
    registry: MessageRegistry = BASE_REGISTRY,
    timeout: float = CONNECT_TIMEOUT,
) -> MeshSession:
    """Listener: verify the peer's DTLS certificate, run the session handshake on its first
    stream with ``validator(peer id)``, then admit its other streams.

    Raises :class:`Unauthorized` (the connection is closed with its code) when refused."""
    peer_id = await conn.wait_connected(timeout)
    try:
        async with asyncio.timeout(timeout):
            first = await conn.wait_first_stream()
            conn.hand_first_stream(first)
            mesh = await MeshSession.accept(
                conn, first, validate=validator(peer_id), registry=registry
            )
    except Unauthorized as exc:
        conn.close(exc.code, exc.reason)
        raise
    except TimeoutError:
        conn.close(CloseCode.AUTH_TIMEOUT, "no session handshake in time")
        raise
    conn.establish()
    return mesh


# ---------------------------------------------------------------------- signalling


class SignalLink(Protocol):
    """What the dial path needs of the server link (:class:`~..mesh.link.MeshLink` is one)."""

    async def signal(self, to: str, payload: dict[str, Any]) -> None: ...


@dataclass
class _Attempt:
    """One WebRTC connection being set up, and the candidates its peer may trickle into it."""

    peer_id: str
    conn: DataChannelConnection
    budget: CandidateBudget
    answer: asyncio.Future[RtcAnswer] | None = None
    described: bool = False  # the remote description is set: candidates go straight in
    early: list[RtcCandidate] = field(default_factory=list)


class WebRTCPeers:
    """Dials peers over WebRTC and answers their WebRTC offers; sessions go to ``adopt``.

    Everything it needs of the rest of the data plane is handed in, so that the peer manager
    (which owns it) is the only module that knows both paths.
    """

    def __init__(
        self,
        *,
        credentials: Callable[[], auth.DeviceCredentials],
        link: SignalLink,
        stun: Callable[[], Awaitable[tuple[str, int] | None]],
        admit_offer: Callable[[str, object], Awaitable[bool]],
        validator: Callable[[str], Validator],
        adopt: Callable[[MeshSession, str], bool],
        local_addresses: Callable[[], Collection[str]],
        turn: Callable[[], TurnCredentials | None] = lambda: None,
        relay_only: Callable[[], bool] = lambda: False,
        registry: MessageRegistry = BASE_REGISTRY,
        settings: WebRTCSettings | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        answer_timeout: float = ANSWER_TIMEOUT,
    ) -> None:
        self._credentials = credentials
        self._link = link
        self._stun = stun
        self._admit_offer = admit_offer
        self._validator = validator
        self._adopt = adopt
        self._local_addresses = local_addresses
        self._turn = turn  # the relay link's current TURN credentials, if the server has TURN
        self._relay_only = relay_only  # direct paths blocked (tests): the TURN candidate alone
        self.registry = registry
        self._settings = settings
        self.connect_timeout = connect_timeout
        self.answer_timeout = answer_timeout
        self._certificate: RTCCertificate | None = None
        self._attempts: dict[tuple[str, str], _Attempt] = {}
        self._accepting = 0

    @property
    def device_id(self) -> str:
        return self._credentials().device_id

    @property
    def settings(self) -> WebRTCSettings:
        if self._settings is None:
            from .webrtc import WebRTCSettings

            self._settings = WebRTCSettings()
        return self._settings

    def _cert(self) -> RTCCertificate:
        from .webrtc import rtc_certificate

        if self._certificate is None:
            self._certificate = rtc_certificate(self._credentials())
        return self._certificate

    async def _new_connection(self, peer_id: str, *, dialer: bool) -> DataChannelConnection:
        from .webrtc import DataChannelConnection, new_peer_connection

        stun = await self._stun()
        return DataChannelConnection(
            new_peer_connection(
                self._cert(), stun=stun, turn=self._turn(), relay_only=self._relay_only()
            ),
            is_dialer=dialer,
            expected_peer_id=peer_id,
            settings=self.settings,
        )

    # ------------------------------------------------------------ dialing

    async def dial(self, peer_id: str, token: str) -> MeshSession:
        """A WebRTC session with ``peer_id``, presenting ``token`` (its ``p2p:connect``)."""
        from aiortc import RTCSessionDescription

        from .webrtc import CandidateBudget

        conn = await self._new_connection(peer_id, dialer=True)
        attempt_id = secrets.token_hex(8)
        attempt = _Attempt(peer_id, conn, CandidateBudget(self._local_addresses()))
        attempt.answer = asyncio.get_running_loop().create_future()
        self._attempts[(peer_id, attempt_id)] = attempt
        try:
            pc = conn.pc
            await pc.setLocalDescription(await pc.createOffer())  # gathers every candidate
            offer = RtcOffer(attempt=attempt_id, sdp=pc.localDescription.sdp, token=token)
            await self._link.signal(peer_id, encode_rtc_signal(offer))
            answer = await asyncio.wait_for(attempt.answer, self.answer_timeout)
            await self._describe(attempt, RTCSessionDescription(answer.sdp, "answer"))
            mesh = await dial_session(
                conn,
                tokens=(token,),
                validate=self._validator(peer_id),
                registry=self.registry,
                timeout=self.connect_timeout,
            )
        except BaseException:
            await conn.aclose()
            raise
        finally:
            self._attempts.pop((peer_id, attempt_id), None)
        return mesh

    # ------------------------------------------------------------ answering

    async def on_signal(self, sender: str, payload: Mapping[str, Any]) -> None:
        """Act on one ``webrtc`` signal from ``sender`` (whom the server vouches for)."""
        kind = payload.get(WEBRTC_KEY)
        if kind not in ("offer", "answer", "candidate"):
            return  # a kind a newer peer speaks
        try:
            signal = decode_rtc_signal(payload)
        except ValueError as exc:
            log.debug("ignored a malformed webrtc %s from %s: %s", kind, sender[:12], exc)
            return
        match signal:
            case RtcOffer():
                await self._on_offer(sender, signal)
            case RtcAnswer():
                attempt = self._attempts.get((sender, signal.attempt))
                waiting = attempt.answer if attempt is not None else None
                if waiting is not None and not waiting.done():
                    waiting.set_result(signal)
            case RtcCandidate():
                await self._on_candidate(sender, signal)

    async def _on_offer(self, sender: str, offer: RtcOffer) -> None:
        from aiortc import RTCSessionDescription

        from .webrtc import CandidateBudget, sdp_fingerprints

        if not await self._admit_offer(sender, offer.token):
            return  # nothing at all goes out for an offer without a good token
        if sdp_fingerprints(offer.sdp) != {sender}:
            # What DTLS will prove must be the sender: refuse early what cannot pass later.
            log.info("ignored a webrtc offer from %s: its fingerprint is not its id", sender[:12])
            return
        key = (sender, offer.attempt)
        if self._accepting >= MAX_ATTEMPTS or key in self._attempts:
            log.info("ignored a webrtc offer from %s: too many at once", sender[:12])
            return
        self._accepting += 1
        conn: DataChannelConnection | None = None
        try:
            conn = await self._new_connection(sender, dialer=False)
            attempt = _Attempt(sender, conn, CandidateBudget(self._local_addresses()))
            self._attempts[key] = attempt
            await self._describe(attempt, RTCSessionDescription(offer.sdp, "offer"))
            pc = conn.pc
            await pc.setLocalDescription(await pc.createAnswer())
            answer = RtcAnswer(attempt=offer.attempt, sdp=pc.localDescription.sdp)
            await self._link.signal(sender, encode_rtc_signal(answer))
            mesh = await accept_session(
                conn,
                validator=self._validator,
                registry=self.registry,
                timeout=self.connect_timeout,
            )
        except (P2PError, MeshError, TimeoutError, ValueError) as exc:
            log.info("webrtc connection from %s failed: %s", sender[:12], exc)
            if conn is not None:
                await conn.aclose()
            return
        except BaseException:
            if conn is not None:
                await conn.aclose()
            raise
        finally:
            self._accepting -= 1
            self._attempts.pop(key, None)
        if not self._adopt(mesh, sender):
            await conn.aclose()

    async def _describe(self, attempt: _Attempt, description: RTCSessionDescription) -> None:
        """Set the peer's SDP with the candidates we refuse left out, then what it trickled."""
        description.sdp = attempt.budget.filter_sdp(description.sdp)
        await attempt.conn.pc.setRemoteDescription(description)
        attempt.described = True
        early, attempt.early = attempt.early, []
        for candidate in early:
            await self._add_candidate(attempt, candidate)

    async def _on_candidate(self, sender: str, signal: RtcCandidate) -> None:
        attempt = self._attempts.get((sender, signal.attempt))
        if attempt is None:
            return
        if not attempt.described:
            if len(attempt.early) < 2 * MAX_PEER_CANDIDATES:
                attempt.early.append(signal)
            return
        await self._add_candidate(attempt, signal)

    async def _add_candidate(self, attempt: _Attempt, signal: RtcCandidate) -> None:
        if not signal.candidate:
            return  # end of candidates: aioice needs no word of it
        from .webrtc import parse_candidate

        candidate = parse_candidate(signal.candidate)
        if candidate is None or not attempt.budget.admit(candidate):
            return
        candidate.sdpMid = signal.sdpMid
        candidate.sdpMLineIndex = signal.sdpMLineIndex
        if signal.sdpMid is None and signal.sdpMLineIndex is None:
            candidate.sdpMLineIndex = 0  # one data section: the first m-line
        with contextlib.suppress(ValueError, AttributeError):
            await attempt.conn.pc.addIceCandidate(candidate)


__all__ = [
    "WEBRTC_KEY",
    "HandshakeRefusedError",
    "RtcAnswer",
    "RtcCandidate",
    "RtcOffer",
    "WebRTCPeers",
    "accept_session",
    "decode_rtc_signal",
    "dial_session",
    "encode_rtc_signal",
]
