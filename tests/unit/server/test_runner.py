"""Starting and stopping the server, TLS, and the operator functions behind the CLI."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import signal
import ssl
import sys
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from meshagent_gui.core.mesh.types import API_PREFIX
from meshagent_gui.errors import UserError
from meshagent_gui.server.runner import (
    ServerSettings,
    add_user,
    create_join_code,
    rotate_key,
    serve_forever,
    start_server,
)
from tests.unit.server.conftest import make_certificate, proof

WAIT = 10.0


def tls_files(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "example.org", "::"])
async def test_non_loopback_without_tls_is_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(UserError, match="without TLS") as refused:
        await start_server(ServerSettings(data_dir=tmp_path, host=host))
    assert refused.value.code == "insecure_bind"
    assert not (tmp_path / "server.sqlite3").exists()


async def test_tls_needs_both_files(tmp_path: Path) -> None:
    cert, _ = tls_files(tmp_path)
    with pytest.raises(UserError, match="both"):
        await start_server(ServerSettings(data_dir=tmp_path, tls_cert=cert))


async def test_serves_over_tls(tmp_path: Path) -> None:
    cert, key = tls_files(tmp_path)
    server = await start_server(
        ServerSettings(data_dir=tmp_path / "data", tls_cert=cert, tls_key=key)
    )
    try:
        assert server.url.startswith("https://127.0.0.1:")
        trust = ssl.create_default_context(cafile=str(cert))
        async with httpx.AsyncClient(verify=trust, timeout=WAIT) as http:
            response = await http.get(server.url + API_PREFIX + "/info")
        assert response.status_code == 200
    finally:
        await server.stop()


async def test_stop_closes_websockets_and_frees_the_port(tmp_path: Path) -> None:
    server = await start_server(ServerSettings(data_dir=tmp_path))
    code, _ = create_join_code(tmp_path)
    cert = make_certificate()
    body = {"join_code": code, "device_name": "pc", "certificate": cert.pem}
    async with httpx.AsyncClient(base_url=server.url + API_PREFIX, timeout=WAIT) as http:
        body |= await proof(http, cert)
        token = (await http.post("/enroll", json=body)).json()["access_token"]
    ws_url = "ws" + server.url.removeprefix("http") + API_PREFIX + "/ws"
    async with connect(ws_url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        await ws.recv()  # hello
        await server.stop()
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(WAIT):
                await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(timeout=WAIT) as http:
            await http.get(server.url + API_PREFIX + "/info")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
async def test_serve_forever_stops_on_sigterm(tmp_path: Path) -> None:
    urls: list[str] = []

    def ready(url: str) -> None:
        urls.append(url)
        os.kill(os.getpid(), signal.SIGTERM)  # handled by serve_forever from now on

    async with asyncio.timeout(WAIT):
        await serve_forever(ServerSettings(data_dir=tmp_path), ready)
    assert urls and urls[0].startswith("http://127.0.0.1:")


def test_add_user_refusals(tmp_path: Path) -> None:
    add_user(tmp_path, "ann", "long enough password", admin=True)
    with pytest.raises(UserError, match="already exists") as exists:
        add_user(tmp_path, "ann", "long enough password")
    assert exists.value.code == "user_exists"
    with pytest.raises(UserError, match="not a valid user name"):
        add_user(tmp_path, "Ann Smith", "long enough password")
    with pytest.raises(UserError, match="at least"):
        add_user(tmp_path, "bob", "short")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="Cannot open"):
        add_user(blocker / "data", "bob", "long enough password")


def test_create_join_code(tmp_path: Path) -> None:
    code, expires_at = create_join_code(tmp_path, ttl=120)
    assert len(code) == 19 and expires_at > 0
    with pytest.raises(UserError, match="no user") as unknown:
        create_join_code(tmp_path, user="nobody")
    assert unknown.value.code == "unknown_user"
    with pytest.raises(UserError, match="lifetime"):
        create_join_code(tmp_path, ttl=0)


async def test_rotate_key_is_picked_up_by_a_running_server(tmp_path: Path) -> None:
    server = await start_server(ServerSettings(data_dir=tmp_path))
    try:
        new_kid = await asyncio.to_thread(rotate_key, tmp_path)
        async with httpx.AsyncClient(timeout=WAIT) as http:
            keys = (await http.get(server.url + API_PREFIX + "/keys")).json()["keys"]
        assert {k["kid"]: k["status"] for k in keys}[new_kid] == "active"
        assert sorted(k["status"] for k in keys) == ["active", "retired"]
    finally:
        await server.stop()


def test_rotate_key_in_an_unusable_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="Cannot rotate"):
        rotate_key(blocker / "data")
