"""The device identity: a private key and a self-signed X.509 certificate.

The device id is the SHA-256 fingerprint of the certificate (DER), lowercase hex; it is what the
server registers at enrolment and what peers pin on the QUIC connection. ``short_id`` is a
readable form for people (``ABCD-EFGH-IJKL-MNOP``). The private key lives in the SecretStore;
the certificate (public) is a file in the data dir.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshagent_gui.errors import UserError
from meshagent_gui.secrets import SecretStore

PRIVATE_KEY_SECRET: Final = "device.private_key"
# ECDSA P-256: the one key type every TLS 1.3 stack we use (qh3, aioquic) accepts for both roles.
_CURVE: Final = ec.SECP256R1()
_VALIDITY: Final = dt.timedelta(days=20 * 365)


def fingerprint(cert_der: bytes) -> str:
    return hashlib.sha256(cert_der).hexdigest()


def short_id(device_id: str) -> str:
    """Four groups of base32 from the fingerprint: enough to tell devices apart by eye."""
    text = base64.b32encode(bytes.fromhex(device_id)[:10]).decode("ascii")
    return "-".join(text[i : i + 4] for i in range(0, 16, 4))


@dataclass(frozen=True)
class Identity:
    certificate_pem: bytes
    private_key_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.certificate_pem)

    @property
    def certificate_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def device_id(self) -> str:
        return fingerprint(self.certificate_der)

    @property
    def short_id(self) -> str:
        return short_id(self.device_id)

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.private_key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise UserError("the stored device key is not an EC key", code="identity_invalid")
        return key

    def sign(self, message: bytes) -> bytes:
        """ECDSA-SHA256 over ``message`` with the device key (DER): proves we hold the key."""
        return self.private_key().sign(message, ec.ECDSA(hashes.SHA256()))


def generate(common_name: str, *, now: dt.datetime | None = None) -> Identity:
    key = ec.generate_private_key(_CURVE)
    start = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(days=1)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64] or "meshagent")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Identity(
        certificate_pem=cert.public_bytes(serialization.Encoding.PEM),
        private_key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def load_or_create(cert_file: Path, secrets: SecretStore, common_name: str) -> Identity:
    """Load the device identity, creating it on first run (key to the SecretStore first)."""
    key_pem = secrets.get(PRIVATE_KEY_SECRET)
    if key_pem is not None and cert_file.exists():
        identity = Identity(cert_file.read_bytes(), key_pem.encode("ascii"))
        _check_pair(identity, cert_file)
        return identity
    if key_pem is not None or cert_file.exists():
        raise UserError(
            f"the device identity is incomplete ({'key' if key_pem is None else 'certificate'}"
            f" missing; certificate file {cert_file}). Move the home folder aside to start"
            " over as a new device.",
            code="identity_incomplete",
        )
    identity = generate(common_name)
    secrets.set(PRIVATE_KEY_SECRET, identity.private_key_pem.decode("ascii"))
    tmp = cert_file.with_suffix(".tmp")
    tmp.write_bytes(identity.certificate_pem)
    os.replace(tmp, cert_file)
    return identity


def _check_pair(identity: Identity, cert_file: Path) -> None:
    try:
        matches = identity.certificate.public_key() == identity.private_key().public_key()
    except ValueError as exc:
        raise UserError(
            f"{cert_file} is not a valid certificate: {exc}", code="identity_invalid"
        ) from exc
    if not matches:
        raise UserError(
            f"{cert_file} does not belong to the stored device key", code="identity_invalid"
        )
