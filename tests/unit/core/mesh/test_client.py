"""The agent's REST client against the real reference app, in-process (httpx ASGI transport)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from meshagent_gui.context import Context
from meshagent_gui.core.mesh.client import (
    ACCESS_SECRET,
    REFRESH_SECRET,
    MeshClient,
    MeshError,
    normalize_url,
)
from meshagent_gui.core.mesh.enroll import enroll, require_enrollment
from meshagent_gui.server.app import ServerState, create_app
from meshagent_gui.server.limits import FailureLimiter
from tests.unit.server.conftest import FakeClock, add_user, cheap_passwords

URL = "http://mesh.test"


@pytest.fixture
def clock() -> FakeClock:
    import time

    return FakeClock(time.time())


@pytest.fixture
def state(tmp_path: Path, clock: FakeClock) -> Iterator[ServerState]:
    opened = ServerState.open(
        tmp_path / "server",
        passwords=cheap_passwords(),
        limiter=FailureLimiter(max_failures=3, window=60.0),
        clock=clock,
    )
    add_user(opened, "alice")
    yield opened
    opened.close()


@pytest.fixture
def transport(state: ServerState) -> httpx.ASGITransport:
    return httpx.ASGITransport(app=create_app(state))


@pytest.fixture
def ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Context:
    monkeypatch.setenv("MESHAGENT_SECRET_STORE", "file")
    return Context.open(tmp_path / "home")


@pytest.fixture
async def enrolled(
    ctx: Context, transport: httpx.ASGITransport, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[MeshClient]:
    real_init = MeshClient.__init__

    def with_transport(self: MeshClient, url: str, **kwargs: object) -> None:
        kwargs["transport"] = transport
        real_init(self, url, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(MeshClient, "__init__", with_transport)
    await enroll(ctx, URL, username="alice", password="correct horse battery", device_name="pc")
    async with MeshClient(URL, secrets=ctx.secrets) as client:
        yield client


async def test_enrolment_keeps_tokens_secret_and_pins_keys(
    ctx: Context, enrolled: MeshClient
) -> None:
    enrollment = require_enrollment(ctx)
    assert enrollment.device_id == ctx.identity.device_id
    assert enrollment.user == "alice"
    assert enrollment.keys and enrollment.keys[0].crv == "Ed25519"
    assert ctx.config["server.url"] == URL
    saved = (ctx.paths.data_dir / "enrollment.json").read_text()
    assert ctx.secrets.get(ACCESS_SECRET) not in saved
    assert await enrolled.devices() == []


async def test_expired_access_token_is_refreshed(
    ctx: Context, enrolled: MeshClient, clock: FakeClock
) -> None:
    before = ctx.secrets.get(ACCESS_SECRET)
    clock.advance(2 * 3600)
    assert await enrolled.devices() == []
    assert ctx.secrets.get(ACCESS_SECRET) != before


async def test_revoked_session_says_log_in_again(
    ctx: Context, enrolled: MeshClient, clock: FakeClock
) -> None:
    stolen = ctx.secrets.get(REFRESH_SECRET)
    await enrolled.refresh(ctx.secrets.get(ACCESS_SECRET))
    assert stolen is not None
    ctx.secrets.set(REFRESH_SECRET, stolen)  # replaying a spent refresh token revokes the session
    clock.advance(2 * 3600)
    with pytest.raises(MeshError, match="log in again"):
        await enrolled.devices()


async def test_capability_for_own_device_is_refused(ctx: Context, enrolled: MeshClient) -> None:
    with pytest.raises(MeshError) as refused:
        await enrolled.capability(ctx.identity.device_id, "share:file")
    assert refused.value.code in {"not_allowed", "unknown_device"}


async def test_not_a_mesh_server() -> None:
    def teapot(request: httpx.Request) -> httpx.Response:
        return httpx.Response(418, text="<html>no</html>")

    async with MeshClient(URL, transport=httpx.MockTransport(teapot)) as client:
        with pytest.raises(MeshError, match="is this a Mesh Server"):
            await client.info()


@pytest.mark.parametrize("bad", ["", "mesh.test", "ftp://x", "http://", "http://h:99999"])
def test_malformed_urls(bad: str) -> None:
    with pytest.raises(MeshError, match="malformed server URL"):
        normalize_url(bad)


def test_url_normalised() -> None:
    assert normalize_url(" https://h:8/base/ ") == "https://h:8/base"


_INFO = {"server_id": "s", "name": "m", "version": "1", "time": 0}


async def test_enrolment_signs_the_servers_nonce_with_the_device_key(ctx: Context) -> None:
    from cryptography.x509 import load_pem_x509_certificate

    from meshagent_gui.core.mesh.client import EnrollCredentials
    from meshagent_gui.server.proof import holds_key

    sent: list[dict[str, str]] = []

    def server(request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/api/v1")
        if path == "/info":
            return httpx.Response(200, json=_INFO | {"server_id": "srv-1"})
        if path == "/enroll/challenge":
            return httpx.Response(200, json={"nonce": "n-1", "expires_in": 120})
        sent.append(json.loads(request.content))
        return httpx.Response(401, json={"error": "invalid_proof", "message": "no"})

    credentials = EnrollCredentials(device_name="pc", platform="linux", join_code="AAAA")
    async with MeshClient(URL, transport=httpx.MockTransport(server)) as client:
        with pytest.raises(MeshError) as refused:
            await client.enroll(ctx.identity, credentials)
    assert refused.value.code == "invalid_proof"
    [body] = sent
    assert body["nonce"] == "n-1" and body["join_code"] == "AAAA" and "username" not in body
    certificate = load_pem_x509_certificate(body["certificate"].encode())
    assert holds_key(certificate, server_id="srv-1", nonce="n-1", signature=body["signature"])


async def test_a_server_without_challenges_is_refused(ctx: Context) -> None:
    from meshagent_gui.core.mesh.client import EnrollCredentials

    def old_server(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/info"):
            return httpx.Response(200, json=_INFO)
        return httpx.Response(404, json={"error": "not_found", "message": "Not Found"})

    credentials = EnrollCredentials(device_name="pc", platform="linux", join_code="AAAA")
    async with MeshClient(URL, transport=httpx.MockTransport(old_server)) as client:
        with pytest.raises(MeshError) as refused:
            await client.enroll(ctx.identity, credentials)
    assert refused.value.code == "server_too_old"
