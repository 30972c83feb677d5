"""Helpers for the reference-server tests: device certificates, a cheap password hasher, a
store, and the app driven in-process through httpx (test_hub.py runs real servers)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import itertools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import argon2
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshagent_gui.core.mesh.types import API_PREFIX, enroll_proof_message
from meshagent_gui.server.app import ServerState, create_app
from meshagent_gui.server.limits import FailureLimiter
from meshagent_gui.server.passwords import Passwords
from meshagent_gui.server.store import NewDevice, Store

PASSWORD = "correct horse battery"


@dataclass(frozen=True)
class DeviceCertificate:
    pem: str
    fingerprint: str  # the device id: sha256(DER), lowercase hex
    key: ec.EllipticCurvePrivateKey

    @property
    def der(self) -> bytes:
        return x509.load_pem_x509_certificate(self.pem.encode()).public_bytes(
            serialization.Encoding.DER
        )


_serial = itertools.count(1)


def make_certificate(name: str = "device") -> DeviceCertificate:
    """A fresh self-signed ECDSA P-256 certificate, as an agent makes for itself."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(next(_serial))
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    der = certificate.public_bytes(serialization.Encoding.DER)
    pem = certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
    return DeviceCertificate(pem=pem, fingerprint=hashlib.sha256(der).hexdigest(), key=key)


async def proof(client: httpx.AsyncClient, cert: DeviceCertificate) -> dict[str, str]:
    """``nonce`` and ``signature`` for enrolling ``cert``: a fresh challenge, signed."""
    server_id = (await client.get("/info")).json()["server_id"]
    nonce = (await client.post("/enroll/challenge")).json()["nonce"]
    message = enroll_proof_message(server_id, nonce, cert.der)
    signature = cert.key.sign(message, ec.ECDSA(hashes.SHA256()))
    return {"nonce": nonce, "signature": base64.urlsafe_b64encode(signature).decode().rstrip("=")}


def new_device(name: str = "laptop") -> NewDevice:
    cert = make_certificate(name)
    return NewDevice(id=cert.fingerprint, name=name, platform="linux", certificate=cert.pem)


def cheap_passwords() -> Passwords:
    """Real argon2id with the smallest cost, so tests stay fast."""
    return Passwords(argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST))


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(tmp_path / "data")
    yield opened
    opened.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state(tmp_path: Path, clock: FakeClock) -> Iterator[ServerState]:
    opened = ServerState.open(
        tmp_path / "data",
        passwords=cheap_passwords(),
        limiter=FailureLimiter(max_failures=3, window=60.0),
        clock=clock,
    )
    yield opened
    opened.close()


@pytest.fixture
async def client(state: ServerState) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(state))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://mesh.test" + API_PREFIX
    ) as c:
        yield c


def add_user(state: ServerState, name: str, *, admin: bool = False) -> None:
    state.db.store.create_user(name, state.passwords.hash(PASSWORD), admin=admin, now=state.clock())


@dataclass(frozen=True)
class Enrolled:
    device_id: str
    user: str
    access_token: str
    refresh_token: str
    certificate: DeviceCertificate

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


async def enroll(
    client: httpx.AsyncClient,
    *,
    user: str | None = None,
    join_code: str | None = None,
    name: str = "laptop",
    certificate: DeviceCertificate | None = None,
) -> Enrolled:
    cert = certificate or make_certificate(name)
    body: dict[str, Any] = {"device_name": name, "platform": "linux", "certificate": cert.pem}
    if join_code is not None:
        body["join_code"] = join_code
    else:
        body |= {"username": user, "password": PASSWORD}
    response = await client.post("/enroll", json=body | await proof(client, cert))
    assert response.status_code == 200, response.text
    answer = response.json()
    return Enrolled(
        device_id=answer["device_id"],
        user=answer["user"],
        access_token=answer["access_token"],
        refresh_token=answer["refresh_token"],
        certificate=cert,
    )
