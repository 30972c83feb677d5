"""One authenticated connection per peer pair, found through signalling, shared by all services.

Setting up a connection to a peer (the dialer's side):

1. gather our candidates (host addresses, and the server-reflexive one from the server's STUN),
   ask the server for a ``p2p:connect`` capability token, and signal an *offer* carrying both;
2. the peer checks the token offline (the sender must hold ``p2p:connect`` for it), then
   answers with its candidates and starts punching toward ours at once;
3. we dial every candidate of the peer at the same time (our QUIC Initials punch our NAT): the
   first that authenticates wins;
4. if no direct path works within ``direct_timeout``, we dial the peer's relay address: through
   the deployment's TURN server when both sides hold an allocation (the offer and answer carry
   a ``turn`` candidate, the relayed address), else (or if that fails) through the Mesh
   Server's WebSocket relay; either way the same end-to-end encrypted QUIC packets;
5. a relayed connection keeps trying to upgrade: every ``upgrade_interval`` the dialer retries
   the direct race, and a direct connection that authenticates replaces the relayed one (which
   drains: its open channels finish on it).

Both sides may dial at once; the connection dialed by the smaller device id wins, and a direct
connection always beats a relayed one.

Signalling hygiene (the callee's side): any device sharing a room with us can send us a signal,
so an offer is hostile input until its token checks out. Before that, nothing goes out: no
answer, no STUN query, no punch. The offer's token is recorded in a cache of its own, so each
token buys one offer and is still good once at the QUIC handshake that follows (where the
verifier's own replay cache takes it). Of the offer's candidates at most 16 are read, loopback
ones only from a peer on this machine, and punching sends a few spaced packets per candidate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from aioice import stun

from meshagent_gui.core.bus import EventBus
from meshagent_gui.core.events import PathChanged, PeerWentOffline, SignalReceived
from meshagent_gui.core.mesh.client import MeshClient, MeshError
from meshagent_gui.core.mesh.link import MeshLink
from meshagent_gui.core.mesh.types import CapabilityGrant
from meshagent_gui.core.protocol.captoken import (
    CapabilityVerifier,
    ReplayCache,
    TokenError,
    UnknownKey,
)
from meshagent_gui.core.protocol.errors import ErrorCode
from meshagent_gui.core.protocol.handshake import Refusal, Validator
from meshagent_gui.core.protocol.messages import BASE_REGISTRY, Hello, StreamRole
from meshagent_gui.core.protocol.registry import MessageRegistry
from meshagent_gui.errors import UserError

from .candidates import (
    Candidate,
    canonical_ip,
    gather,
    nat_type_guess,
    own_addresses,
    peer_candidates,
)
from .connection import PeerConnection
from .endpoint import Endpoint, relay_address, relay_peer
from .errors import P2PError
from .relay import RelayLink
from .session import Channel, ChannelClosed, HandshakeRefusedError, MeshSession
from .signals import SIGNAL_KEY, Answer, Offer, decode_signal, encode_signal
from .streams import PeerStream
from .webrtc_peers import WEBRTC_KEY, WebRTCPeers

log = logging.getLogger(__name__)

CONNECT_SCOPE: Final = "p2p:connect"
ANSWER_TIMEOUT: Final = 5.0
# Punching: each round sends one tiny STUN request to every candidate, PUNCH_SPACING apart, so
# an offer costs at most 16 candidates x 4 rounds = 64 datagrams, spread over two seconds. The
# first round opens our NAT before the dialer's QUIC Initials arrive; the others cover losses.
PUNCH_SCHEDULE: Final = (0.0, 0.25, 1.0, 2.0)
PUNCH_SPACING: Final = 0.005
# Offers remembered by token id (one offer per token); a full cache refuses, never forgets.
OFFER_CACHE: Final = 4096
# An offer signed with a key we do not know refetches the server's keys at most this often.
OFFER_KEY_REFETCH: Final = 30.0
DRAIN_CHECK: Final = 5.0
PROBE_TIMEOUT: Final = 1.5
TURN_DIAL_TIMEOUT: Final = 5.0  # then the WebSocket relay is tried
# Test-only: while this file exists, direct candidates are not tried (the loopback stand-in for
# a firewall that drops UDP between the agents; the netns tests use real iptables instead).
BLOCK_DIRECT_ENV: Final = "MESHAGENT_TEST_BLOCK_DIRECT"

PathKind = Literal["direct", "relay"]
ServiceHandler = Callable[[Channel], Awaitable[None]]
Admit = Callable[[str, Hello], object | None]  # (peer id, the stream's Hello) -> grant or None


@dataclass(frozen=True)
class Service:
    """A kind of stream peers may open toward us: which scopes admit it, who handles it."""

    role: StreamRole
    scopes: tuple[str, ...]
    handle: ServiceHandler
    admit: Admit | None = None
    """A grant the service issued itself on an earlier stream (a tunnel's ticket), looked up
    before the tokens are verified: the grant, or None to check the tokens as usual."""


@dataclass(frozen=True)
class PathInfo:
    kind: PathKind
    local: str
    remote: str


class PeerUnreachable(UserError):
    pass


class PeerManager:
    def __init__(
        self,
        *,
        endpoint: Endpoint,
        link: MeshLink,
        client: MeshClient,
        verifier: CapabilityVerifier,
        bus: EventBus,
        relay: RelayLink,
        refetch_keys: Callable[[], Awaitable[None]],
        direct_timeout: float = 3.0,
        upgrade_interval: float = 30.0,
        include_loopback: bool = True,
        registry: MessageRegistry = BASE_REGISTRY,
        local_addresses: Callable[[], Collection[str]] = own_addresses,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.endpoint = endpoint
        self.registry = registry  # every service's messages: one registry per connection
        self.relay = relay
        self._link = link
        self._client = client
        self._verifier = verifier
        self._bus = bus
        self._refetch_keys = refetch_keys
        self.direct_timeout = direct_timeout
        self.upgrade_interval = upgrade_interval
        self._include_loopback = include_loopback
        self._local_addresses = local_addresses  # this machine's, for the same-host rule
        self._clock = clock  # token times are wall-clock seconds
        self._sleep = sleep  # paces punching; tests pass a fake
        self._offers = ReplayCache(OFFER_CACHE)
        self._offer_keys_fetched_at = float("-inf")
        self._sessions: dict[str, MeshSession] = {}
        self._dialed_by: dict[MeshSession, str] = {}
        self._draining: set[MeshSession] = set()
        self._dialing: dict[str, asyncio.Future[MeshSession]] = {}
        self._upgrading: set[str] = set()
        self._answers: dict[str, tuple[str, asyncio.Future[list[Candidate]]]] = {}
        self._webrtc_only: set[str] = set()  # browsers and share-link guests: no QUIC endpoint
        self._services: dict[StreamRole, Service] = {}
        self._stun_server: tuple[str, int] | None = None
        self.nat: str = "unknown"  # a rough guess from STUN: open / cone / symmetric / unknown
        self._tasks: asyncio.TaskGroup | None = None
        # The second transport (browsers, and agents asked to): same tokens, same services.
        self.webrtc = WebRTCPeers(
            credentials=lambda: self.endpoint.credentials,
            link=link,
            stun=self._stun,
            admit_offer=self._offer_admitted,
            validator=self._validator,
            adopt=lambda mesh, dialer: self._adopt(mesh, dialer=dialer),
            local_addresses=local_addresses,
            turn=lambda: self.relay.turn_credentials,
            relay_only=_direct_blocked,
            registry=registry,
        )

    # ------------------------------------------------------------ public API

    def register(self, service: Service) -> None:
        self._services[service.role] = service

    async def session(self, peer_id: str, *, timeout: float = 20.0) -> MeshSession:
        """The live session with ``peer_id``, dialing it if there is none."""
        current = self._sessions.get(peer_id)
        if current is not None and not current.closed.is_set():
            # A peer that died without a word (kill -9, cable) looks alive until the idle
            # timeout: one round trip tells, before a service builds on a dead connection.
            try:
                await current.connection.ping(timeout=PROBE_TIMEOUT)
                return current
            except (TimeoutError, P2PError):
                log.info("connection to %s is dead; dialing again", peer_id[:12])
                current.close(ErrorCode.GOING_AWAY, "peer stopped answering")
                self._sessions.pop(peer_id, None)
        pending = self._dialing.get(peer_id)
        if pending is None:
            dial = self._dial_webrtc if peer_id in self._webrtc_only else self._dial
            pending = asyncio.ensure_future(dial(peer_id))
            self._dialing[peer_id] = pending
            pending.add_done_callback(lambda _: self._dialing.pop(peer_id, None))
        return await asyncio.wait_for(asyncio.shield(pending), timeout)

    def use_webrtc(self, peer_id: str) -> None:
        """Reach ``peer_id`` over WebRTC from now on (a browser, or a share link's guest: they
        have no other transport); :meth:`session` then dials it that way."""
        self._webrtc_only.add(peer_id)

    async def webrtc_session(self, peer_id: str, *, timeout: float = 20.0) -> MeshSession:
        """The live session with ``peer_id``, dialing it over WebRTC if there is none."""
        self.use_webrtc(peer_id)
        return await self.session(peer_id, timeout=timeout)

    async def _dial_webrtc(self, peer_id: str) -> MeshSession:
        if peer_id not in self._link.online:
            raise PeerUnreachable(
                "that device is offline (not connected to the Mesh Server)", code="peer_offline"
            )
        grant = await self._client.capability(peer_id, CONNECT_SCOPE)
        try:
            mesh = await self.webrtc.dial(peer_id, grant.token)
        except HandshakeRefusedError as exc:
            raise PeerUnreachable(f"the peer refused this device: {exc}", code="refused") from exc
        except TimeoutError as exc:
            raise PeerUnreachable(
                "the browser did not answer over WebRTC (page closed, or no path)",
                code="peer_unreachable",
            ) from exc
        if not self._adopt(mesh, dialer=self.endpoint.device_id):
            return self._sessions[peer_id]
        return mesh

    def path_of(self, session: MeshSession) -> PathInfo:
        conn = session.connection
        remote = conn.remote_address
        if _over_webrtc(conn):
            return PathInfo("direct", "webrtc", f"webrtc {_fmt(remote)}")
        peer = relay_peer(remote)
        kind: PathKind = "relay" if peer is not None else "direct"
        local = self.endpoint.local_address
        if peer is None:
            described = _fmt(remote)
        else:
            described = "TURN relay" if self.relay.turn_carries(peer) else "server relay"
        return PathInfo(kind, f"{local[0]}:{local[1]}", described)

    def sessions(self) -> dict[str, MeshSession]:
        return {pid: s for pid, s in self._sessions.items() if not s.closed.is_set()}

    # ------------------------------------------------------------ running

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            tasks.create_task(self.relay.run(), name="p2p-relay")
            tasks.create_task(self._accept_loop(), name="p2p-accept")
            tasks.create_task(self._signal_loop(), name="p2p-signals")
            tasks.create_task(self._maintain(), name="p2p-maintain")

    async def authorize(self, conn: PeerConnection, first: PeerStream) -> bool:
        """The endpoint's hook: the connection handshake, with our capability checks."""
        mesh = await MeshSession.accept(
            conn, first, validate=self._validator(conn.peer_id), registry=self.registry
        )
        return self._adopt(mesh, dialer=conn.peer_id)

    async def _accept_loop(self) -> None:
        async for _ in self.endpoint.incoming():
            pass  # sessions were adopted in authorize(); QUIC-level accept just drains

    # ------------------------------------------------------------ validation

    def _validator(self, peer_id: str) -> Validator:
        return capability_validator(
            self._verifier,
            peer_id,
            {role: service.scopes for role, service in self._services.items()},
            on_unknown_key=lambda: self._spawn(self._refetch_keys(), "p2p-refetch-keys"),
            admits={r: s.admit for r, s in self._services.items() if s.admit is not None},
        )

    # ------------------------------------------------------------ dialing

    async def _dial(self, peer_id: str) -> MeshSession:
        if peer_id not in self._link.online:
            raise PeerUnreachable(
                "that device is offline (not connected to the Mesh Server)", code="peer_offline"
            )
        token_task = asyncio.ensure_future(self._client.capability(peer_id, CONNECT_SCOPE))
        try:
            conn = await self._direct(peer_id, token_task)
            if conn is None:
                conn = await self._relayed(peer_id)
            token = (await token_task).token
        finally:
            token_task.cancel()
        try:
            mesh = await MeshSession.dial(
                conn, tokens=(token,), validate=self._validator(peer_id), registry=self.registry
            )
        except HandshakeRefusedError as exc:
            raise PeerUnreachable(f"the peer refused this device: {exc}", code="refused") from exc
        if not self._adopt(mesh, dialer=self.endpoint.device_id):
            return self._sessions[peer_id]  # the peer's own dial won the tie
        return mesh

    async def _direct(
        self, peer_id: str, grant: asyncio.Future[CapabilityGrant]
    ) -> PeerConnection | None:
        """Offer/answer through the server, then race every direct candidate of the peer.

        The offer carries ``grant``'s token (the one the QUIC handshake presents next): the
        peer acts on no offer without it. Both sides' TURN relayed addresses travel in the
        same exchange (``turn`` candidates), also when direct paths are blocked.
        """
        blocked = _direct_blocked()
        if blocked and self.relay.turn_address() is None:
            return None
        attempt = secrets.token_hex(8)
        answer: asyncio.Future[list[Candidate]] = asyncio.get_running_loop().create_future()
        self._answers[attempt] = (peer_id, answer)
        try:
            ours = [] if blocked else await self._candidates()  # the token request runs meanwhile
            ours += self._turn_candidates()
            offer = Offer(attempt=attempt, candidates=_wire(ours), token=(await grant).token)
            await self._link.signal(peer_id, encode_signal(offer))
            theirs = await asyncio.wait_for(answer, ANSWER_TIMEOUT)
        except (TimeoutError, MeshError):
            return None
        finally:
            self._answers.pop(attempt, None)
        self._learn_turn(peer_id, theirs)
        return None if blocked else await self._race(peer_id, theirs)

    def _turn_candidates(self) -> list[Candidate]:
        relayed = self.relay.turn_address()
        if relayed is None:
            return []
        try:
            return [Candidate("turn", canonical_ip(str(relayed[0])), int(relayed[1]))]
        except ValueError:
            return []

    def _learn_turn(self, peer_id: str, candidates: list[Candidate]) -> None:
        """Reach ``peer_id``'s relay address through TURN when it signalled a relayed address
        (and we hold an allocation); its first, as it sends one."""
        for candidate in candidates:
            if candidate.kind == "turn":
                self.relay.add_turn_peer(peer_id, (candidate.address, candidate.port))
                return

    async def _race(self, peer_id: str, candidates: list[Candidate]) -> PeerConnection | None:
        targets = [c for c in candidates if c.direct]
        if not targets:
            return None
        attempts = [
            asyncio.ensure_future(
                self.endpoint.connect((c.address, c.port), peer_id, timeout=self.direct_timeout)
            )
            for c in targets
        ]
        winner: PeerConnection | None = None
        try:
            for finished in asyncio.as_completed(attempts):
                try:
                    winner = await finished
                    break
                except (P2PError, TimeoutError, OSError) as exc:
                    log.debug("direct attempt to %s failed: %s", peer_id[:12], exc)
        finally:
            for attempt in attempts:
                if not attempt.done():
                    attempt.cancel()
                elif winner is not None and not attempt.cancelled() and not attempt.exception():
                    other = attempt.result()
                    if other is not winner:
                        other.close(reason="another path won")
            await asyncio.gather(*attempts, return_exceptions=True)
        return winner

    async def _relayed(self, peer_id: str) -> PeerConnection:
        """Through TURN when signalling set it up, else (or when that fails) the server relay."""
        if self.relay.turn_carries(peer_id):
            try:
                return await self.endpoint.connect(
                    relay_address(peer_id), peer_id, timeout=TURN_DIAL_TIMEOUT
                )
            except (P2PError, TimeoutError) as exc:
                log.info("TURN to %s failed (%s); using the server relay", peer_id[:12], exc)
                self.relay.forget_turn_peer(peer_id)
        try:
            await self.relay.wait_connected(10.0)
            return await self.endpoint.connect(relay_address(peer_id), peer_id, timeout=10.0)
        except (P2PError, TimeoutError) as exc:
            raise PeerUnreachable(
                "no path to that device, neither direct nor through the relay"
                f" ({exc or 'timeout'})",
                code="peer_unreachable",
            ) from exc

    async def _stun(self) -> tuple[str, int] | None:
        """The server's STUN responder (host, port), asked of ``/info`` once."""
        if self._stun_server is None:
            with contextlib.suppress(MeshError):
                info = await self._client.info()
                if info.stun_port:
                    host = _url_host(self._client.url)
                    self._stun_server = (host, info.stun_port)
        return self._stun_server

    async def _candidates(self) -> list[Candidate]:
        await self._stun()
        candidates = await gather(
            self.endpoint, self._stun_server, include_loopback=self._include_loopback
        )
        reflexive = [c for c in candidates if c.kind == "srflx"]
        if reflexive and self._stun_server is not None:
            self.nat = nat_type_guess(
                [c for c in candidates if c.kind == "host"],
                {self._stun_server: (reflexive[0].address, reflexive[0].port)},
            )
        return candidates

    # ------------------------------------------------------------ answering

    async def _signal_loop(self) -> None:
        with self._bus.subscribed() as events:
            async for event in events:
                if isinstance(event, SignalReceived) and SIGNAL_KEY in event.payload:
                    self._spawn(self.on_signal(event.sender, event.payload), "p2p-signal")
                elif isinstance(event, SignalReceived) and WEBRTC_KEY in event.payload:
                    handle = self.webrtc.on_signal(event.sender, event.payload)
                    self._spawn(handle, "p2p-webrtc-signal")
                elif isinstance(event, PeerWentOffline) and event.device_id in self._sessions:
                    self._spawn(self._probe(event.device_id), "p2p-probe")

    async def _probe(self, peer_id: str) -> None:
        """The server lost the peer: if it also stopped answering us, drop the connection now
        (its services reconnect) rather than at the idle timeout."""
        mesh = self._sessions.get(peer_id)
        if mesh is None or mesh.closed.is_set():
            return
        try:
            await mesh.connection.ping(timeout=PROBE_TIMEOUT)
        except (TimeoutError, P2PError):
            log.info("peer %s stopped answering; closing its connection", peer_id[:12])
            mesh.close(ErrorCode.GOING_AWAY, "peer stopped answering")

    async def on_signal(self, sender: str, payload: Mapping[str, Any]) -> None:
        """Act on one p2p signal from ``sender`` (whom the server vouches for, nothing more).

        An answer completes our pending offer to that same sender. An offer is acted on only
        once its token shows that ``sender`` holds ``p2p:connect`` for us; until then not one
        packet goes out because of it, not even the answer.
        """
        kind = payload.get(SIGNAL_KEY)
        if kind not in ("offer", "answer"):
            return  # a kind a newer peer speaks
        try:
            signal = decode_signal(payload)
        except ValueError as exc:
            log.debug("ignored a malformed p2p %s from %s: %s", kind, sender[:12], exc)
            return
        if isinstance(signal, Answer):
            self._on_answer(sender, signal)
        else:
            await self._on_offer(sender, signal)

    def _on_answer(self, sender: str, answer: Answer) -> None:
        pending = self._answers.get(answer.attempt)
        if pending is None or pending[0] != sender or pending[1].done():
            return
        candidates = peer_candidates(answer.candidates, own=self._local_addresses())
        pending[1].set_result(candidates)

    async def _on_offer(self, sender: str, offer: Offer) -> None:
        candidates = peer_candidates(offer.candidates, own=self._local_addresses())
        if not await self._offer_admitted(sender, offer.token):
            return
        direct = [] if _direct_blocked() else await self._candidates()
        self._learn_turn(sender, candidates)  # before answering: its packets may follow at once
        with contextlib.suppress(MeshError):
            answer = Answer(
                attempt=offer.attempt, candidates=_wire(direct + self._turn_candidates())
            )
            await self._link.signal(sender, encode_signal(answer))
        if direct:
            await self._punch(candidates)

    async def _offer_admitted(self, sender: str, token: object) -> bool:
        """Whether ``token`` is ``sender``'s live ``p2p:connect`` for us, not offered before."""
        problem = "no capability token"
        if isinstance(token, str):
            try:
                self._check_offer_token(sender, token)
                return True
            except UnknownKey:
                problem = "unknown_key"
                if await self._refetch_keys_for_offer():
                    return await self._offer_admitted(sender, token)
            except TokenError as exc:
                problem = exc.code
            except ValueError:
                problem = "the sender is not a device id"
        log.info("ignored a p2p offer from %s: %s", sender[:12], problem)
        return False

    def _check_offer_token(self, sender: str, token: str) -> None:
        # Our own cache, not the verifier's: the handshake presents this same token next.
        self._verifier.verify(
            token,
            now=self._clock(),
            peer_id=sender,
            scope=CONNECT_SCOPE,
            replay_cache=self._offers,
        )

    async def _refetch_keys_for_offer(self) -> bool:
        """Refetch the server's keys unless done lately; True when a retry may now succeed."""
        now = asyncio.get_running_loop().time()
        if now - self._offer_keys_fetched_at < OFFER_KEY_REFETCH:
            return False
        self._offer_keys_fetched_at = now
        try:
            await self._refetch_keys()
        except (MeshError, OSError) as exc:
            log.info("could not refetch the server's keys: %s", exc)
            return False
        return True

    async def _punch(self, candidates: list[Candidate]) -> None:
        """Open our NAT toward the dialer: tiny STUN requests to its candidates, paced."""
        targets = [c for c in candidates if c.direct]
        loop = asyncio.get_running_loop()
        started = loop.time()
        for at in PUNCH_SCHEDULE:
            await self._sleep(max(0.0, started + at - loop.time()))
            for index, candidate in enumerate(targets):
                if index:
                    await self._sleep(PUNCH_SPACING)
                probe = stun.Message(
                    message_method=stun.Method.BINDING,
                    message_class=stun.Class.REQUEST,
                    transaction_id=secrets.token_bytes(12),
                )
                with contextlib.suppress(OSError, P2PError):
                    self.endpoint.send_datagram(bytes(probe), (candidate.address, candidate.port))

    # ------------------------------------------------------------ bookkeeping

    def _adopt(self, mesh: MeshSession, *, dialer: str) -> bool:
        """Make ``mesh`` the peer's session unless a better one exists; False if closed."""
        peer_id = mesh.peer_id
        self._dialed_by[mesh] = dialer
        current = self._sessions.get(peer_id)
        if current is not None and not current.closed.is_set():
            new_kind, old_kind = self.path_of(mesh).kind, self.path_of(current).kind
            new_wins = (new_kind, old_kind) == ("direct", "relay") or (
                new_kind == old_kind and dialer < self._dialed_by.get(current, dialer)
            )
            if not new_wins:
                mesh.close(ErrorCode.NO_ERROR, "duplicate connection")
                return False
            self._draining.add(current)
        self._sessions[peer_id] = mesh
        self._spawn(self._serve_channels(mesh), "p2p-channels")
        path = self.path_of(mesh)
        log.info("peer %s: %s path (%s)", peer_id[:12], path.kind, path.remote)
        self._bus.publish(PathChanged(peer_id, path.kind, path.local, path.remote))
        return True

    async def _serve_channels(self, mesh: MeshSession) -> None:
        while True:
            try:
                channel = await mesh.accept_channel()
            except ChannelClosed:
                return
            service = self._services.get(channel.role)
            if service is None:
                channel.abort(ErrorCode.UNKNOWN_ROLE)
                continue
            self._spawn(service.handle(channel), f"p2p-service-{channel.role.name.lower()}")

    async def _maintain(self) -> None:
        """Close drained sessions, forget dead ones, and try to upgrade relayed ones."""
        next_upgrade = time.monotonic() + self.upgrade_interval
        with contextlib.suppress(MeshError, OSError, P2PError, TimeoutError):
            await self._link.wait_connected(30)
            await self._candidates()  # learns the NAT guess for doctor
        while True:
            await asyncio.sleep(min(DRAIN_CHECK, self.upgrade_interval))
            for old in list(self._draining):
                if old.closed.is_set() or not old.has_open_channels():
                    old.close(ErrorCode.NO_ERROR, "replaced by a better path")
                    self._draining.discard(old)
                    self._dialed_by.pop(old, None)
            for peer_id, mesh in list(self._sessions.items()):
                if mesh.closed.is_set():
                    del self._sessions[peer_id]
                    self._dialed_by.pop(mesh, None)
            if time.monotonic() >= next_upgrade:
                next_upgrade = time.monotonic() + self.upgrade_interval
                for peer_id, mesh in list(self._sessions.items()):
                    mine = self._dialed_by.get(mesh) == self.endpoint.device_id
                    relayed = self.path_of(mesh).kind == "relay"
                    if mine and relayed and peer_id not in self._upgrading:
                        self._upgrading.add(peer_id)
                        self._spawn(self._upgrade(peer_id), "p2p-upgrade")

    async def _upgrade(self, peer_id: str) -> None:
        try:
            await self._try_upgrade(peer_id)
        finally:
            self._upgrading.discard(peer_id)

    async def _try_upgrade(self, peer_id: str) -> None:
        """A fresh offer: a direct path if one works now, and either way both sides learn each
        other's current TURN relayed address (allocations are renewed every few minutes)."""
        grant = asyncio.ensure_future(self._client.capability(peer_id, CONNECT_SCOPE))
        try:
            conn = await self._direct(peer_id, grant)
            if conn is None:
                return
            try:
                mesh = await MeshSession.dial(
                    conn,
                    tokens=((await grant).token,),
                    validate=self._validator(peer_id),
                    registry=self.registry,
                )
            except (MeshError, HandshakeRefusedError, P2PError) as exc:
                log.info("upgrade to a direct path failed: %s", exc)
                conn.close(reason="upgrade failed")
                return
        finally:
            grant.cancel()
        self._adopt(mesh, dialer=self.endpoint.device_id)

    def _spawn(self, coroutine: Awaitable[Any], name: str) -> None:
        if self._tasks is None:
            raise RuntimeError("the peer manager is not running")
        self._tasks.create_task(_logged(coroutine, name), name=name)

    async def aclose(self) -> None:
        for mesh in [*self._sessions.values(), *self._draining]:
            await mesh.aclose()
            if _over_webrtc(mesh.connection):  # its peer connection's teardown too
                await mesh.connection.aclose()  # type: ignore[attr-defined]


def _over_webrtc(conn: object) -> bool:
    # aiortc is loaded on first use (webrtc_peers.py): no WebRTC module, no such connection.
    webrtc = sys.modules.get(f"{__package__}.webrtc")
    return webrtc is not None and isinstance(conn, webrtc.DataChannelConnection)


def capability_validator(
    verifier: CapabilityVerifier,
    peer_id: str,
    service_scopes: Mapping[StreamRole, Sequence[str]],
    *,
    on_unknown_key: Callable[[], None],
    clock: Callable[[], float] = time.time,
    admits: Mapping[StreamRole, Admit] | None = None,
) -> Validator:
    """Checks each Hello from ``peer_id``: a capability token for the stream's role.

    The connection (CONTROL) needs ``p2p:connect``; a service stream needs one of its service's
    scopes, for the resource the Hello names. Refusals carry the token error's code.
    """

    def validate(hello: Hello) -> object:
        if hello.role is StreamRole.CONTROL:
            scopes: Sequence[str] = (CONNECT_SCOPE,)
        elif hello.role in service_scopes:
            scopes = service_scopes[hello.role]
        else:
            raise Refusal(ErrorCode.UNKNOWN_ROLE, f"no {hello.role.name.lower()} service")
        admit = (admits or {}).get(hello.role)
        if admit is not None and (granted := admit(peer_id, hello)) is not None:
            return granted
        problem = "no capability token"
        for token in hello.tokens:
            for scope in scopes:
                try:
                    return verifier.verify(
                        token,
                        now=clock(),
                        peer_id=peer_id,
                        scope=scope,
                        resource=hello.resource or None,
                    )
                except UnknownKey:
                    on_unknown_key()
                    problem = "token signed with a key we do not know yet; try again"
                except TokenError as exc:
                    problem = exc.code
        raise Refusal(ErrorCode.BAD_TOKEN, problem)

    return validate


async def _logged(coroutine: Awaitable[Any], name: str) -> None:
    """A helper task's failure is logged, never allowed to take the whole manager down."""
    try:
        await coroutine
    except (UserError, P2PError, TimeoutError, ConnectionError) as exc:
        log.info("%s: %s", name, exc)
    except Exception:
        log.exception("%s failed", name)


def _direct_blocked() -> bool:
    flag = os.environ.get(BLOCK_DIRECT_ENV)
    return bool(flag) and Path(flag).exists()  # type: ignore[arg-type]


def _wire(candidates: list[Candidate]) -> list[object]:
    return [c.to_wire() for c in candidates]


def _fmt(addr: tuple[Any, ...]) -> str:
    host = str(addr[0]).removeprefix("::ffff:")
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"


def _url_host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or "127.0.0.1"
