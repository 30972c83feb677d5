"""server/proof.py: enrolment nonces (single use, expiring, bounded) and the signature check."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import load_pem_x509_certificate

from meshagent_gui import identity
from meshagent_gui.core.mesh.types import enroll_proof_message
from meshagent_gui.server.proof import ChallengeCache, decode_signature, holds_key


def test_a_nonce_redeems_once_and_only_while_fresh() -> None:
    cache = ChallengeCache(ttl=120)
    nonce = cache.issue(now=0.0)
    assert cache.redeem(nonce, now=119.0)
    assert not cache.redeem(nonce, now=119.0)  # spent
    late = cache.issue(now=0.0)
    assert not cache.redeem(late, now=120.0)
    assert not cache.redeem("never-issued", now=0.0)


def test_the_cache_is_bounded_and_forgets_the_oldest() -> None:
    cache = ChallengeCache(ttl=120, max_entries=3)
    nonces = [cache.issue(now=float(i)) for i in range(5)]
    assert len(cache) == 3
    assert not cache.redeem(nonces[0], now=5.0) and not cache.redeem(nonces[1], now=5.0)
    assert cache.redeem(nonces[4], now=5.0)


def test_expired_nonces_are_dropped_when_new_ones_are_issued() -> None:
    cache = ChallengeCache(ttl=10, max_entries=100)
    for i in range(50):
        cache.issue(now=float(i))
    assert len(cache) <= 11


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_holds_key_accepts_the_device_key_and_nothing_else() -> None:
    device = identity.generate("pc")
    certificate = load_pem_x509_certificate(device.certificate_pem)
    message = enroll_proof_message("srv-1", "nonce", device.certificate_der)
    good = _b64(device.sign(message))
    assert holds_key(certificate, server_id="srv-1", nonce="nonce", signature=good)
    assert not holds_key(certificate, server_id="srv-2", nonce="nonce", signature=good)
    assert not holds_key(certificate, server_id="srv-1", nonce="other", signature=good)
    other = ec.generate_private_key(ec.SECP256R1()).sign(message, ec.ECDSA(hashes.SHA256()))
    assert not holds_key(certificate, server_id="srv-1", nonce="nonce", signature=_b64(other))
    for junk in ("", "%%%", "A" * 1000, _b64(b"\x30\x00")):
        assert not holds_key(certificate, server_id="srv-1", nonce="nonce", signature=junk)


def test_decode_signature_takes_base64url_with_or_without_padding() -> None:
    assert decode_signature("AQI") == b"\x01\x02"
    assert decode_signature("AQI=") == b"\x01\x02"
    assert decode_signature("not base64!") is None
