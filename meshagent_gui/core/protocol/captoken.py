"""Offline verification of capability tokens (docs/server-api.md, "Capability tokens").

A capability token is a JWT signed by the Mesh Server with Ed25519 (``alg: EdDSA``, header
``typ: mesh-cap+jwt`` and ``kid``). The target device checks it without asking the server, with
the keys it pinned at enrolment: header first (so no signature work is spent on, and no
algorithm is chosen by, an attacker's header), then the signature with the ``kid``'s key and
EdDSA only, then the claims, and last the ``jti`` replay cache, which records the token only once
every other check has passed.

Sans-IO: the caller passes ``now`` (seconds since the epoch) and owns any refetch of ``/keys``
(:class:`UnknownKey` carries the ``kid`` for that).
"""

from __future__ import annotations

import base64
import binascii
import heapq
import json
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from jwt.types import Options

JWT_TYPE: Final = "mesh-cap+jwt"
ALGORITHM: Final = "EdDSA"
MAX_LIFETIME: Final = 300.0
DEFAULT_LEEWAY: Final = 10.0
DEFAULT_REPLAY_CAPACITY: Final = 100_000
# Far above any real token (a few hundred bytes); refuses oversized input before decoding it.
MAX_TOKEN_LENGTH: Final = 8192
BINDING_CLAIM: Final = "x5t#S256"

# RFC 7515 4.1.9: a media type compares case-insensitively and may omit "application/".
_ACCEPTED_TYPES: Final = frozenset({JWT_TYPE, "application/" + JWT_TYPE})
# Unpadded base64url, canonical length (a length of 4n+1 cannot come from any bytes).
_BASE64URL: Final = re.compile(r"(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2,3})?")
_FINGERPRINT_BYTES: Final = 32
_ED25519_KEY_BYTES: Final = 32

# Time and audience checks are ours (with ``now`` and our leeway); PyJWT only checks the signature
# and decodes the JSON.
_SIGNATURE_ONLY: Final[Options] = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
    "require": [],
}


# ---------------------------------------------------------------- errors


class TokenError(Exception):
    """A capability token was refused. ``code`` is stable; the message is one sentence.

    Messages never quote the token: it is a credential and logs must not hold it.
    """

    code: ClassVar[str] = "invalid_token"
    default_message: ClassVar[str] = "The capability token is invalid."

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)


class Malformed(TokenError):
    code = "malformed"
    default_message = "The capability token is not a well-formed JWT."


class BadType(TokenError):
    code = "bad_type"
    default_message = f"The token is not a capability token (typ is not {JWT_TYPE})."


class BadAlgorithm(TokenError):
    code = "bad_algorithm"
    default_message = "The capability token is not signed with EdDSA."


class UnknownKey(TokenError):
    """The ``kid`` names no pinned key: the caller may refetch ``/keys`` once and retry."""

    code = "unknown_key"
    default_message = "The capability token is signed with a key this device does not know."

    def __init__(self, kid: str, message: str | None = None) -> None:
        self.kid = kid
        super().__init__(message)


class BadSignature(TokenError):
    code = "bad_signature"
    default_message = "The capability token's signature is not valid."


class WrongIssuer(TokenError):
    code = "wrong_issuer"
    default_message = "The capability token was issued by another server."


class WrongAudience(TokenError):
    code = "wrong_audience"
    default_message = "The capability token was issued for another device."


class WrongHolder(TokenError):
    code = "wrong_holder"
    default_message = "The capability token belongs to another device than the peer."


class WrongBinding(TokenError):
    code = "wrong_binding"
    default_message = "The capability token is bound to another certificate than the peer's."


class Expired(TokenError):
    code = "expired"
    default_message = "The capability token has expired."


class NotYetValid(TokenError):
    code = "not_yet_valid"
    default_message = "The capability token is not valid yet."


class Replayed(TokenError):
    code = "replayed"
    default_message = "The capability token was already used."


class ReplayCacheFull(TokenError):
    """Fail closed: the cache cannot remember one more token without forgetting a live one."""

    code = "replay_cache_full"
    default_message = "Too many capability tokens are in use; try again in a few minutes."


class WrongScope(TokenError):
    code = "wrong_scope"
    default_message = "The capability token does not allow this action."


class WrongResource(TokenError):
    code = "wrong_resource"
    default_message = "The capability token is for another resource."


class WrongRoom(TokenError):
    """The token's room is not one the resource was shared in (a role held in another room)."""

    code = "wrong_room"
    default_message = "The capability token was granted in a room this resource is not shared in."


class LifetimeTooLong(TokenError):
    code = "lifetime_too_long"
    default_message = (
        f"The capability token lives longer than the {MAX_LIFETIME:.0f} seconds allowed."
    )


# ---------------------------------------------------------------- values


@dataclass(frozen=True)
class Capability:
    """What a verified token allows: ``holder`` may do ``scope`` on ``resource`` at ``target``.

    ``room`` is the room whose role granted it ("" from servers that predate rooms in tokens).
    """

    issuer: str
    holder: str
    target: str
    scope: str
    resource: str
    issued_at: float
    not_before: float
    expires_at: float
    jti: str
    room: str = ""


def check_room(capability: Capability, rooms: Collection[str]) -> None:
    """Refuse a capability granted in none of ``rooms`` (where the resource was shared).

    Without this, an owner role in a room the resource was never shared in would open it.
    """
    if capability.room not in rooms:
        raise WrongRoom


def _fingerprint_bytes(device_id_hex: str) -> bytes:
    try:
        raw = bytes.fromhex(device_id_hex)
    except (ValueError, TypeError):
        raw = b""
    if len(raw) != _FINGERPRINT_BYTES:
        raise ValueError("A device id is the SHA-256 fingerprint of its certificate, in hex.")
    return raw


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def certificate_binding(device_id_hex: str) -> str:
    """The ``cnf`` ``x5t#S256`` value (RFC 8705) for a device id (its certificate's SHA-256)."""
    return _b64url(_fingerprint_bytes(device_id_hex))


def public_key_from_jwk_x(x: str) -> Ed25519PublicKey:
    """The Ed25519 public key of an OKP JWK's ``x`` (base64url, no padding; RFC 8037)."""
    try:
        raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
    except (ValueError, binascii.Error) as err:
        raise ValueError("The JWK 'x' is not base64url.") from err
    # Canonical form only, so one key has one spelling.
    if len(raw) != _ED25519_KEY_BYTES or _b64url(raw) != x:
        raise ValueError("The JWK 'x' is not a 32-byte Ed25519 public key in base64url.")
    return Ed25519PublicKey.from_public_bytes(raw)


# ---------------------------------------------------------------- replay cache


class ReplayCache:
    """The ``jti`` of every accepted token, each kept until the token can no longer be accepted.

    Memory is bounded by ``capacity``. Entries leave in the order they expire (a heap), when
    :meth:`prune` or :meth:`remember` sees ``now`` past them. When the cache is full of entries
    that are still live, :meth:`remember` refuses the new token (:class:`ReplayCacheFull`) rather
    than forget one: forgetting a live ``jti`` would let its token be replayed until it expires,
    while refusing only costs availability, and heals by itself as entries expire (at most the
    token lifetime plus leeway later). Filling the cache takes server-signed tokens for this very
    device, bound to the presenters' certificates, so it points at a misbehaving server or peer.
    """

    def __init__(self, capacity: int = DEFAULT_REPLAY_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("The replay cache capacity must be at least 1.")
        self.capacity = capacity
        self._until: dict[str, float] = {}
        self._by_expiry: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._until)

    def __contains__(self, jti: object) -> bool:
        return jti in self._until

    def prune(self, now: float) -> int:
        """Forget the entries whose time ended before ``now``; return how many were forgotten."""
        forgotten = 0
        while self._by_expiry and self._by_expiry[0][0] < now:
            _, jti = heapq.heappop(self._by_expiry)
            del self._until[jti]
            forgotten += 1
        return forgotten

    def remember(self, jti: str, *, until: float, now: float) -> None:
        """Record ``jti`` until ``until``; refuse it if it was seen or the cache is full."""
        self.prune(now)
        if jti in self._until:
            raise Replayed
        if len(self._until) >= self.capacity:
            raise ReplayCacheFull
        self._until[jti] = until
        heapq.heappush(self._by_expiry, (until, jti))


# ---------------------------------------------------------------- verifier


def _unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header of a compact JWS, decoded strictly and cheaply, before any signature work.

    Only the header segment is decoded (PyJWT's own loader would decode all three, and then
    again for the signature check).
    """
    # Compact JWS is ASCII; anything else (lone surrogates included) never reaches PyJWT.
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH or not token.isascii():
        raise Malformed
    segments = token.split(".")
    if len(segments) != 3 or not _BASE64URL.fullmatch(segments[0]):
        raise Malformed
    try:
        header = json.loads(base64.urlsafe_b64decode(segments[0] + "=" * (-len(segments[0]) % 4)))
    except (ValueError, RecursionError) as err:
        raise Malformed from err
    if not isinstance(header, dict):
        raise Malformed
    return header


def _string_claim(claims: Mapping[str, Any], name: str, *, default: str | None = None) -> str:
    value = claims.get(name, default)
    if not isinstance(value, str):
        raise Malformed(f"The capability token's '{name}' claim is missing or not a string.")
    return value


def _time_claim(claims: Mapping[str, Any], name: str) -> float:
    value = claims.get(name)
    # bool is an int in Python; NaN or infinity would slip through every comparison.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Malformed(f"The capability token's '{name}' claim is missing or not a number.")
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds):
        raise Malformed(f"The capability token's '{name}' claim is not a finite number.")
    return seconds


class CapabilityVerifier:
    """Checks capability tokens presented to this device (``device_id``), offline.

    ``keys`` maps each pinned ``kid`` to the server's Ed25519 public key. Tokens may be off by
    ``leeway`` seconds of clock skew at either end of their validity.
    """

    def __init__(
        self,
        *,
        issuer: str,
        device_id: str,
        keys: Mapping[str, Ed25519PublicKey],
        leeway: float = DEFAULT_LEEWAY,
        replay_capacity: int = DEFAULT_REPLAY_CAPACITY,
    ) -> None:
        _fingerprint_bytes(device_id)
        if not (math.isfinite(leeway) and leeway >= 0):
            raise ValueError("The leeway must be a finite, non-negative number of seconds.")
        self.issuer = issuer
        self.device_id = device_id
        self.leeway = leeway
        self.replay_cache = ReplayCache(replay_capacity)
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._jwt = jwt.PyJWT(options=_SIGNATURE_ONLY)
        self.set_keys(keys)

    def set_keys(self, keys: Mapping[str, Ed25519PublicKey]) -> None:
        """Replace the pinned keys (after a refetch of ``/keys``)."""
        for kid, key in keys.items():
            if not isinstance(key, Ed25519PublicKey):
                raise TypeError(f"The key {kid!r} is not an Ed25519 public key.")
        self._keys = dict(keys)

    def verify(
        self,
        token: str,
        *,
        now: float,
        peer_id: str,
        scope: str,
        resource: str | None = None,
        replay_cache: ReplayCache | None = None,
        rooms: Collection[str] | None = None,
    ) -> Capability:
        """Return what ``token`` allows, presented by the authenticated ``peer_id`` for ``scope``.

        ``resource`` is checked when given, and so is ``rooms`` (the token's room must be one of
        them). Raises a :class:`TokenError` subclass on refusal; only an accepted token is
        recorded in the replay cache: ``replay_cache`` when given, else
        the verifier's own. A separate cache lets one token be checked for an earlier step (a
        signalling offer, once) and still be presented once where the verifier's cache guards.
        """
        binding = certificate_binding(peer_id)
        header = _unverified_header(token)
        key = self._key_for(header)
        claims = self._signed_claims(token, key, header)
        capability = self._capability(claims)
        self._check_parties(capability, claims, peer_id=peer_id, binding=binding)
        self._check_times(capability, now=now)
        if capability.scope != scope:
            raise WrongScope
        if resource is not None and capability.resource != resource:
            raise WrongResource
        if rooms is not None:
            check_room(capability, rooms)
        cache = self.replay_cache if replay_cache is None else replay_cache
        cache.remember(capability.jti, until=capability.expires_at + self.leeway, now=now)
        return capability

    def _key_for(self, header: Mapping[str, Any]) -> Ed25519PublicKey:
        """Check the header before any signature work, and pick the key by its ``kid``."""
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYPES:
            raise BadType
        if header.get("alg") != ALGORITHM:
            raise BadAlgorithm
        # We understand no JWS extension, so any critical one (and unencoded payloads) is refused.
        if "crit" in header or "b64" in header:
            raise Malformed("The capability token uses a JWS extension this device does not know.")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Malformed("The capability token names no signing key (kid).")
        key = self._keys.get(kid)
        if key is None:
            raise UnknownKey(kid)
        return key

    def _signed_claims(
        self, token: str, key: Ed25519PublicKey, header: Mapping[str, Any]
    ) -> dict[str, Any]:
        try:
            decoded = self._jwt.decode_complete(token, key=key, algorithms=[ALGORITHM])
        except jwt.InvalidSignatureError as err:
            raise BadSignature from err
        except jwt.InvalidAlgorithmError as err:
            raise BadAlgorithm from err
        except jwt.PyJWTError as err:
            raise Malformed from err
        # Both parses read the same bytes; this makes sure the header we checked is the signed one.
        if decoded["header"] != header:
            raise Malformed
        claims: dict[str, Any] = decoded["payload"]
        return claims

    @staticmethod
    def _capability(claims: Mapping[str, Any]) -> Capability:
        jti = _string_claim(claims, "jti")
        if not jti:
            raise Malformed("The capability token has an empty 'jti' claim.")
        return Capability(
            issuer=_string_claim(claims, "iss"),
            holder=_string_claim(claims, "sub"),
            target=_string_claim(claims, "aud"),
            scope=_string_claim(claims, "scope"),
            resource=_string_claim(claims, "res", default=""),
            issued_at=_time_claim(claims, "iat"),
            not_before=_time_claim(claims, "nbf"),
            expires_at=_time_claim(claims, "exp"),
            jti=jti,
            room=_string_claim(claims, "room", default=""),
        )

    def _check_parties(
        self, capability: Capability, claims: Mapping[str, Any], *, peer_id: str, binding: str
    ) -> None:
        if capability.issuer != self.issuer:
            raise WrongIssuer
        if capability.target != self.device_id:
            raise WrongAudience
        if capability.holder != peer_id:
            raise WrongHolder
        confirmation = claims.get("cnf")
        if not isinstance(confirmation, dict) or confirmation.get(BINDING_CLAIM) != binding:
            raise WrongBinding

    def _check_times(self, capability: Capability, *, now: float) -> None:
        if capability.expires_at - capability.issued_at > MAX_LIFETIME:
            raise LifetimeTooLong
        if now > capability.expires_at + self.leeway:
            raise Expired
        # A token issued in the future could outlive MAX_LIFETIME from now: refuse it like nbf.
        if max(capability.not_before, capability.issued_at) > now + self.leeway:
            raise NotYetValid
