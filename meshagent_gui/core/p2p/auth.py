"""How the listener learns, and checks, who dialed it.

Neither QUIC engine lets a listener ask for a client certificate (see engine.py), so the dialer
proves its identity on the control stream, after TLS has authenticated the listener:

1. the listener sends a fresh 32-byte nonce (CHALLENGE);
2. the dialer signs ``CONTEXT | listener id | dialer id | nonce`` with its device key and sends
   its certificate, its claimed id and the signature (PROOF);
3. the listener checks that the certificate's SHA-256 is the claimed id and that the signature
   verifies with the certificate's key, then answers ACCEPTED.

Why this is bound to the connection: the nonce is fresh per connection and only travels inside
this TLS session; the listener id in the signed message stops a listener M that a victim dials
from replaying the victim's proof to a third device (the victim signs "to M", not "to L"); and
the dialer only ever signs after it has pinned the listener's certificate.
"""

from __future__ import annotations

import os
from typing import Final, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from meshagent_gui.core.p2p.control import NONCE_SIZE, Proof
from meshagent_gui.identity import fingerprint

CONTEXT: Final = b"meshagent p2p dialer proof v1\x00"


class AuthenticationError(Exception):
    """A PROOF that does not prove the claimed identity."""


class DeviceCredentials(Protocol):
    """What the endpoint needs of a device identity (``meshagent_gui.identity.Identity``)."""

    @property
    def certificate_pem(self) -> bytes: ...

    @property
    def private_key_pem(self) -> bytes: ...

    @property
    def device_id(self) -> str: ...


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def signed_message(listener_id: str, dialer_id: str, nonce: bytes) -> bytes:
    return CONTEXT + bytes.fromhex(listener_id) + bytes.fromhex(dialer_id) + nonce


def certificate_der(certificate_pem: bytes) -> bytes:
    cert = x509.load_pem_x509_certificate(certificate_pem)
    return cert.public_bytes(serialization.Encoding.DER)


def make_proof(credentials: DeviceCredentials, listener_id: str, nonce: bytes) -> Proof:
    key = serialization.load_pem_private_key(credentials.private_key_pem, password=None)
    message = signed_message(listener_id, credentials.device_id, nonce)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(message)
    else:
        raise AuthenticationError("the device key must be an EC or Ed25519 key")
    return Proof(
        claimed_id=credentials.device_id,
        certificate_der=certificate_der(credentials.certificate_pem),
        signature=signature,
    )


def verify_proof(proof: Proof, listener_id: str, nonce: bytes) -> str:
    """The dialer's device id, once ``proof`` is shown to be genuine."""
    if fingerprint(proof.certificate_der) != proof.claimed_id:
        raise AuthenticationError("the certificate's fingerprint is not the claimed device id")
    try:
        public_key = x509.load_der_x509_certificate(proof.certificate_der).public_key()
    except ValueError as exc:
        raise AuthenticationError(f"the certificate cannot be parsed: {exc}") from exc
    message = signed_message(listener_id, proof.claimed_id, nonce)
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(proof.signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(proof.signature, message)
        else:
            raise AuthenticationError("the certificate's key is neither EC nor Ed25519")
    except InvalidSignature as exc:
        raise AuthenticationError("the signature does not verify with the certificate") from exc
    return proof.claimed_id
