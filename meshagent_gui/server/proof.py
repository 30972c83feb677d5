"""Proof of possession at enrolment: single-use nonces, and the check of a device's signature.

A device certificate is public (every P2P peer sees it), so presenting one proves nothing. The
enrolling device fetches a nonce (``POST /enroll/challenge``) and signs
:func:`~meshagent_gui.core.mesh.types.enroll_proof_message` with the certificate's key; the
server redeems the nonce once and checks the signature against the certificate's public key.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections import OrderedDict
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from meshagent_gui.core.mesh.types import CHALLENGE_TTL, enroll_proof_message

# Outstanding nonces kept at most; a flood of challenges evicts the oldest (an honest device
# signs and sends its nonce within one round trip, long before thousands of others arrive).
MAX_CHALLENGES: Final = 10_000
_NONCE_BYTES: Final = 24
# A DER ECDSA P-521 signature is at most 139 bytes; anything longer is not worth decoding.
_MAX_SIGNATURE_BYTES: Final = 160


class ChallengeCache:
    """Single-use nonces that expire after ``ttl`` seconds; at most ``max_entries`` kept."""

    def __init__(self, ttl: int = CHALLENGE_TTL, max_entries: int = MAX_CHALLENGES) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        # nonce -> expiry; insertion order is expiry order because the ttl is fixed.
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def issue(self, now: float) -> str:
        self._forget_expired(now)
        while len(self._expiry) >= self.max_entries:
            self._expiry.popitem(last=False)
        nonce = secrets.token_urlsafe(_NONCE_BYTES)
        self._expiry[nonce] = now + self.ttl
        return nonce

    def redeem(self, nonce: str, now: float) -> bool:
        """True once for a nonce issued less than ``ttl`` ago; it is spent either way."""
        expires_at = self._expiry.pop(nonce, None)
        return expires_at is not None and now < expires_at

    def _forget_expired(self, now: float) -> None:
        while self._expiry:
            nonce, expires_at = next(iter(self._expiry.items()))
            if expires_at > now:
                return
            del self._expiry[nonce]


def decode_signature(text: str) -> bytes | None:
    """The bytes of a base64url signature (padding optional), or None if it is not one."""
    if len(text) > 2 * _MAX_SIGNATURE_BYTES:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw if 0 < len(raw) <= _MAX_SIGNATURE_BYTES else None


def holds_key(certificate: x509.Certificate, *, server_id: str, nonce: str, signature: str) -> bool:
    """Whether ``signature`` is the certificate key's signature over the enrolment proof."""
    raw = decode_signature(signature)
    if raw is None:
        return False
    message = enroll_proof_message(server_id, nonce, certificate.public_bytes(Encoding.DER))
    try:
        key = certificate.public_key()
    except ValueError:  # a key type cryptography cannot load
        return False
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return False  # agents make ECDSA P-256 keys; nothing else is a device key
    try:
        key.verify(raw, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
