"""Browser peers at the server: enrolment by fingerprint, origins, the web page, WebSocket
tickets and share links (REST in process; the sockets through a real server)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from meshagent_gui.core.mesh.types import API_PREFIX
from meshagent_gui.server import web_page
from meshagent_gui.server.app import ServerState, create_app
from meshagent_gui.server.store import MAX_OPEN_LINKS, NewDevice
from meshagent_gui.server.tickets import MAX_TICKETS_PER_DEVICE, TicketBook
from tests.unit.server.conftest import (
    PASSWORD,
    Enrolled,
    FakeClock,
    add_user,
    enroll,
    make_certificate,
    proof,
)
from tests.unit.server.test_app import assert_error
from tests.unit.server.test_hub import WAIT, Agent, Mesh, presence, start_mesh


def fingerprint() -> str:
    """A browser's device id: what RTCCertificate.getFingerprints() gives, as 64 hex digits."""
    return hashlib.sha256(os.urandom(32)).hexdigest()


async def enroll_browser(
    client: httpx.AsyncClient, user: str = "ann", *, print_: str | None = None
) -> Enrolled:
    body = {"username": user, "password": PASSWORD, "device_name": "Firefox on desk"}
    response = await client.post(
        "/enroll/browser", json=body | {"fingerprint": print_ or fingerprint()}
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    return Enrolled(
        device_id=answer["device_id"],
        user=answer["user"],
        access_token=answer["access_token"],
        refresh_token=answer["refresh_token"],
        certificate=make_certificate(),  # unused: a browser has none the server sees
    )


# ---------------------------------------------------------------- enrolment


async def test_a_browser_enrols_by_fingerprint_and_is_a_device(
    client: httpx.AsyncClient, state: ServerState
) -> None:
    add_user(state, "ann")
    laptop = await enroll(client, user="ann")
    print_ = fingerprint()
    browser = await enroll_browser(client, print_=print_)
    assert browser.device_id == print_ and browser.user == "ann"
    listed = (await client.get("/devices", headers=laptop.auth)).json()["devices"]
    assert [(d["id"], d["platform"]) for d in listed] == [(print_, "browser")]
    # Tokens and refresh as for any device; a capability toward the agent, bound to the print.
    grant = await client.post(
        "/capabilities",
        json={"aud": laptop.device_id, "scope": "p2p:connect"},
        headers=browser.auth,
    )
    assert grant.status_code == 200, grant.text
    refreshed = await client.post("/token/refresh", json={"refresh_token": browser.refresh_token})
    assert refreshed.status_code == 200
    # The same page enrolling again (a reload that lost its tokens) keeps its id.
    again = await enroll_browser(client, print_=print_)
    assert again.device_id == print_


async def test_browser_enrolment_with_a_join_code(
    client: httpx.AsyncClient, state: ServerState
) -> None:
    add_user(state, "ann")
    code, _ = state.db.store.create_join_code(user="ann", room=None, now=state.clock())
    body = {"join_code": code, "device_name": "tablet", "fingerprint": fingerprint()}
    answer = await client.post("/enroll/browser", json=body)
    assert answer.status_code == 200 and answer.json()["user"] == "ann"
    assert_error(await client.post("/enroll/browser", json=body), 401, "join_code_used")


@pytest.mark.parametrize(
    "bad",
    ["", "AB" * 32, "ab" * 31, "ab" * 33, ":".join(["ab"] * 32), "zz" * 32, None, 12],
)
async def test_garbage_fingerprints_are_refused(
    client: httpx.AsyncClient, state: ServerState, bad: object
) -> None:
    add_user(state, "ann")
    body = {"username": "ann", "password": PASSWORD, "device_name": "x", "fingerprint": bad}
    assert_error(await client.post("/enroll/browser", json=body), 422, "invalid_request")


async def test_a_browser_cannot_take_over_an_agents_id(
    client: httpx.AsyncClient, state: ServerState
) -> None:
    """No proof of possession for browsers, so the fingerprint of an enrolled agent (public to
    its peers) is refused: its sessions are not revoked, nor its platform changed."""
    add_user(state, "ann")
    add_user(state, "eve")
    laptop = await enroll(client, user="ann")
    for user in ("ann", "eve"):
        body = {"username": user, "password": PASSWORD, "device_name": "x"}
        taken = await client.post("/enroll/browser", json=body | {"fingerprint": laptop.device_id})
        assert_error(taken, 403, "forbidden")
    assert (await client.get("/rooms", headers=laptop.auth)).status_code == 200
    assert state.db.store.device(laptop.device_id).platform == "linux"  # type: ignore[union-attr]
    # Nor can another user take over a browser's id.
    browser = await enroll_browser(client, "ann")
    body = {"username": "eve", "password": PASSWORD, "device_name": "x"}
    taken = await client.post("/enroll/browser", json=body | {"fingerprint": browser.device_id})
    assert_error(taken, 403, "forbidden")


async def test_wrong_passwords_are_rate_limited_like_enroll(
    client: httpx.AsyncClient, state: ServerState
) -> None:
    add_user(state, "ann")
    body = {
        "username": "ann",
        "password": "wrong",
        "device_name": "x",
        "fingerprint": fingerprint(),
    }
    for _ in range(3):  # the test limiter allows 3 failures
        assert_error(await client.post("/enroll/browser", json=body), 401, "invalid_credentials")
    right = body | {"password": PASSWORD}
    assert_error(await client.post("/enroll/browser", json=right), 429, "rate_limited")


# ---------------------------------------------------------------- origins


async def test_pages_of_other_sites_are_refused(
    client: httpx.AsyncClient, state: ServerState
) -> None:
    add_user(state, "ann")
    laptop = await enroll(client, user="ann")
    evil = {"Origin": "https://evil.example"}
    body = {
        "username": "ann",
        "password": PASSWORD,
        "device_name": "x",
        "fingerprint": fingerprint(),
    }
    assert_error(
        await client.post("/enroll/browser", json=body, headers=evil), 403, "forbidden_origin"
    )
    assert_error(await client.get("/devices", headers=laptop.auth | evil), 403, "forbidden_origin")
    assert_error(
        await client.post("/ws/ticket", headers=laptop.auth | evil), 403, "forbidden_origin"
    )
    for origin in (
        "null",
        "http://mesh.test.evil.example",
        "https://mesh.test",
        "http://mesh.test:81",
    ):
        refused = await client.get("/info", headers={"Origin": origin})
        assert_error(refused, 403, "forbidden_origin")
    # The server's own pages, and clients that send no Origin (agents), pass.
    own = await client.post("/enroll/browser", json=body, headers={"Origin": "http://mesh.test"})
    assert own.status_code == 200, own.text
    assert (await client.get("/devices", headers=laptop.auth)).status_code == 200
    assert "access-control-allow-origin" not in own.headers  # no CORS for anybody by default


async def test_an_allowed_origin_passes_with_cors(tmp_path: Path, clock: FakeClock) -> None:
    state = ServerState.open(
        tmp_path / "data", clock=clock, allowed_origins=["https://app.example"]
    )
    try:
        transport = httpx.ASGITransport(app=create_app(state))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://mesh.test" + API_PREFIX
        ) as client:
            origin = {"Origin": "https://app.example"}
            info = await client.get("/info", headers=origin)
            assert info.status_code == 200
            assert info.headers["access-control-allow-origin"] == "https://app.example"
            preflight = await client.options(
                "/devices",
                headers=origin
                | {
                    "Access-Control-Request-Method": "GET",
                    "Access-Control-Request-Headers": "authorization",
                },
            )
            assert preflight.status_code == 200
            assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
            assert "access-control-allow-credentials" not in preflight.headers
            other = await client.get("/info", headers={"Origin": "https://other.example"})
            assert_error(other, 403, "forbidden_origin")
    finally:
        state.close()


# ---------------------------------------------------------------- the page


@pytest.fixture
def web_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "web"
    (folder / "js").mkdir(parents=True)
    (folder / "index.html").write_text("<!doctype html><title>Mesh</title>")
    (folder / "js" / "app.js").write_text("export {};")
    (folder / "js" / "zip.wasm").write_bytes(b"\0asm\1\0\0\0")
    (folder / ".hidden").write_text("no")
    (tmp_path / "secret.txt").write_text("outside")
    monkeypatch.setattr(web_page, "WEB_DIR", folder)
    return folder


async def test_the_page_is_served_with_types_and_policy(
    client: httpx.AsyncClient, web_dir: Path
) -> None:
    root = "http://mesh.test"
    home = await client.get(root + "/")
    assert home.status_code == 307 and home.headers["location"] == "/app/"
    index = await client.get(root + "/app/")
    assert index.status_code == 200 and index.text.startswith("<!doctype html>")
    assert index.headers["content-type"] == "text/html; charset=utf-8"
    policy = index.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "connect-src 'self' ws: wss:" in policy
    assert "'wasm-unsafe-eval'" in policy and " 'unsafe-eval'" not in policy
    assert index.headers["cache-control"] == "no-cache"
    assert index.headers["x-content-type-options"] == "nosniff"
    assert index.headers["referrer-policy"] == "no-referrer"
    assert "set-cookie" not in index.headers
    script = await client.get(root + "/app/js/app.js")
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    wasm = await client.get(root + "/app/js/zip.wasm")
    assert wasm.headers["content-type"] == "application/wasm"
    link_page = await client.get(root + "/s/abcDEF123")
    assert link_page.status_code == 200 and link_page.text == index.text
    assert link_page.headers["content-security-policy"] == policy
    head = await client.head(root + "/app/js/app.js")
    assert head.status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/app/.hidden",
        "/app/%2e%2e/secret.txt",
        "/app/js/%2e%2e/%2e%2e/secret.txt",
        "/app/nope.js",
        "/app/..%2fsecret.txt",
        "/app/js%5c..%5c..%5csecret.txt",
    ],
)
async def test_nothing_outside_the_page_is_served(
    client: httpx.AsyncClient, web_dir: Path, path: str
) -> None:
    response = await client.get("http://mesh.test" + path)
    assert response.status_code == 404, (path, response.text)
    assert "outside" not in response.text


async def test_a_server_without_the_page_says_so(
    client: httpx.AsyncClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(web_page, "WEB_DIR", tmp_path / "missing")
    response = await client.get("http://mesh.test/app/")
    assert_error(response, 404, "not_found")
    assert "not installed" in response.json()["message"]


# ---------------------------------------------------------------- tickets (the book itself)


def test_tickets_are_single_use_bound_and_bounded(state: ServerState) -> None:
    store = state.db.store
    add_user(state, "ann")
    principals = []
    for name in ("a", "b"):
        cert = make_certificate(name)
        device = NewDevice(cert.fingerprint, name, "linux", cert.pem)
        enrolment = store.enroll_user_device("ann", device, now=state.clock())
        principal = store.authenticate(enrolment.tokens.access_token, now=state.clock())
        assert principal is not None
        principals.append(principal)
    book = TicketBook(ttl=30, capacity=20)
    first = book.issue(principals[0], 100.0)
    assert book.redeem(first, 100.0) == principals[0]
    assert book.redeem(first, 100.0) is None  # spent
    late = book.issue(principals[1], 100.0)
    assert book.redeem(late, 130.0) is None  # expired
    assert book.redeem("garbage", 100.0) is None
    flood = [book.issue(principals[0], 200.0) for _ in range(1000)]
    assert len(book) == MAX_TICKETS_PER_DEVICE  # the oldest went
    assert book.redeem(flood[0], 200.0) is None
    assert book.redeem(flood[-1], 200.0) == principals[0]
    for _ in range(100):
        book.issue(principals[1], 200.0)
    assert len(book) <= 20


async def test_ticket_needs_a_token(client: httpx.AsyncClient) -> None:
    assert_error(await client.post("/ws/ticket"), 401, "unauthorized")
    bad = {"Authorization": "Bearer mesh_at_forged"}
    assert_error(await client.post("/ws/ticket", headers=bad), 401, "unauthorized")


# ---------------------------------------------------------------- share links (REST)


async def make_link(client: httpx.AsyncClient, sender: Enrolled, **body: object) -> dict[str, str]:
    response = await client.post(
        "/links", json={"name": "photos.zip", "size": 1234} | body, headers=sender.auth
    )
    assert response.status_code == 200, response.text
    link: dict[str, str] = response.json()
    assert link["path"] == "/s/" + link["link_id"]
    return link


async def claim(
    client: httpx.AsyncClient, link: dict[str, str], *, secret: str | None = None
) -> httpx.Response:
    body = {"secret": secret or link["secret"], "fingerprint": fingerprint()}
    return await client.post(f"/links/{link['link_id']}/claim", json=body)


async def test_a_link_is_claimed_once_and_its_guest_reaches_the_sender_only(
    client: httpx.AsyncClient, state: ServerState
) -> None:
    add_user(state, "ann")
    laptop = await enroll(client, user="ann", name="laptop")
    phone = await enroll(client, user="ann", name="phone")
    link = await make_link(client, laptop)
    claimed = await claim(client, link)
    assert claimed.status_code == 200, claimed.text
    answer = claimed.json()
    assert (answer["sender"], answer["sender_name"]) == (laptop.device_id, "laptop")
    assert (answer["name"], answer["size"]) == ("photos.zip", 1234)
    assert "refresh_token" not in answer
    guest = {"Authorization": f"Bearer {answer['access_token']}"}
    assert_error(await claim(client, link), 409, "link_claimed")

    # The guest: its sender in /devices, a socket ticket, and nothing else.
    listed = (await client.get("/devices", headers=guest)).json()["devices"]
    assert [(d["id"], d["platform"]) for d in listed] == [(laptop.device_id, "linux")]
    assert (await client.post("/ws/ticket", headers=guest)).status_code == 200
    for method, path, body in (
        ("POST", "/capabilities", {"aud": laptop.device_id, "scope": "p2p:connect"}),
        ("POST", "/capabilities", {"aud": phone.device_id, "scope": "share:file"}),
        ("GET", "/rooms", None),
        ("POST", "/rooms", {"name": "mine"}),
        ("POST", "/join-codes", {}),
        ("POST", "/links", {"name": "x", "size": 1}),
        ("PATCH", "/devices/self", {"name": "renamed"}),
        ("POST", "/rooms/join", {"code": "AAAA-AAAA-AAAA-AAAA"}),
        ("POST", "/turn/credentials", None),
    ):
        refused = await client.request(method, path, json=body, headers=guest)
        assert_error(refused, 403, "forbidden")
    # The sender may connect and send to its guest; nothing more, and nobody else may.
    toward = {"aud": answer["device_id"]}
    for scope in ("p2p:connect", "share:file", "share:folder"):
        grant = await client.post(
            "/capabilities", json=toward | {"scope": scope}, headers=laptop.auth
        )
        assert grant.status_code == 200, grant.text
        assert grant.json()["room"] is None
    terminal = toward | {"scope": "terminal:view"}
    assert_error(
        await client.post("/capabilities", json=terminal, headers=laptop.auth), 403, "not_allowed"
    )
    other = toward | {"scope": "p2p:connect"}
    assert_error(
        await client.post("/capabilities", json=other, headers=phone.auth), 404, "unknown_device"
    )
    # The claim and the grants toward the guest are in the sender's own audit log.
    log = (await client.get("/rooms/@ann/audit", headers=laptop.auth)).json()["entries"]
    about_guest = {(e["kind"], e["subject"], e["actor_device"]) for e in log}
    assert ("link.claimed", laptop.device_id, answer["device_id"]) in about_guest
    assert ("capability.granted", answer["device_id"], laptop.device_id) in about_guest
    # The guest is in nobody's device list.
    assert answer["device_id"] not in {
        d["id"] for d in (await client.get("/devices", headers=phone.auth)).json()["devices"]
    }


async def test_wrong_secrets_unknown_and_expired_links(
    client: httpx.AsyncClient, state: ServerState, clock: FakeClock
) -> None:
    add_user(state, "ann")
    laptop = await enroll(client, user="ann")
    link = await make_link(client, laptop, ttl=60)
    clock.advance(61)
    assert_error(await claim(client, link), 410, "link_expired")  # not a guess: not counted
    assert_error(await claim(client, link, secret="guessed"), 404, "link_unknown")
    unknown = link | {"link_id": "nope"}
    assert_error(await claim(client, unknown), 404, "link_unknown")
    assert_error(await claim(client, link, secret="guessed again"), 404, "link_unknown")
    # Three wrong secrets from this address: even the right one waits now.
    fresh = await make_link(client, laptop)
    assert_error(await claim(client, fresh), 429, "rate_limited")


async def test_link_bodies_are_checked(client: httpx.AsyncClient, state: ServerState) -> None:
    add_user(state, "ann")
    laptop = await enroll(client, user="ann")
    for body in (
        {"name": "", "size": 1},
        {"name": "x", "size": -1},
        {"name": "x", "size": 1, "ttl": 5},
        {"name": "x" * 300, "size": 1},
        {"name": "x", "size": 1, "ttl": 10**9},
        {"name": "x", "size": 2**70},
    ):
        assert_error(
            await client.post("/links", json=body, headers=laptop.auth), 422, "invalid_request"
        )
    assert_error(await client.post("/links", json={"name": "x", "size": 1}), 401, "unauthorized")
    link = await make_link(client, laptop)
    garbage = {"secret": link["secret"], "fingerprint": "not-hex"}
    assert_error(
        await client.post(f"/links/{link['link_id']}/claim", json=garbage), 422, "invalid_request"
    )
    # A guest cannot claim under an enrolled device's id.
    taken = {"secret": link["secret"], "fingerprint": laptop.device_id}
    assert_error(await client.post(f"/links/{link['link_id']}/claim", json=taken), 403, "forbidden")


async def test_a_flood_of_links_is_bounded(client: httpx.AsyncClient, state: ServerState) -> None:
    add_user(state, "ann")
    laptop = await enroll(client, user="ann")
    for _ in range(MAX_OPEN_LINKS):
        await make_link(client, laptop)
    refused = await client.post("/links", json={"name": "x", "size": 1}, headers=laptop.auth)
    assert_error(refused, 429, "rate_limited")


async def test_old_links_and_their_guests_are_deleted(
    client: httpx.AsyncClient, state: ServerState, clock: FakeClock
) -> None:
    add_user(state, "ann")
    laptop = await enroll(client, user="ann")
    link = await make_link(client, laptop, ttl=60)
    guest = (await claim(client, link)).json()
    clock.advance(60 + 3600 + 1)
    refreshed = await client.post("/token/refresh", json={"refresh_token": laptop.refresh_token})
    laptop = Enrolled(
        laptop.device_id, "ann", refreshed.json()["access_token"], "", laptop.certificate
    )
    await make_link(client, laptop)  # housekeeping happens here
    assert state.db.store.device(guest["device_id"]) is None
    token = guest["access_token"]
    assert_error(
        await client.get("/devices", headers={"Authorization": f"Bearer {token}"}),
        401,
        "unauthorized",
    )


# ---------------------------------------------------------------- the sockets (a real server)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    async for running in start_mesh(tmp_path):
        yield running


def ticket_url(mesh: Mesh, ticket: str) -> str:
    return f"{mesh.ws_url}?ticket={ticket}"


async def new_ticket(mesh: Mesh, device: Enrolled) -> str:
    response = await mesh.http.post("/ws/ticket", headers=device.auth)
    assert response.status_code == 200, response.text
    assert response.json()["expires_in"] == int(mesh.server.state.tickets.ttl)
    ticket: str = response.json()["ticket"]
    return ticket


async def closed_code(url: str, **kwargs: object) -> int | None:
    async with connect(url, open_timeout=WAIT, **kwargs) as ws:  # type: ignore[arg-type]
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(WAIT):
                await ws.recv()
    return closed.value.rcvd.code if closed.value.rcvd else None


async def test_a_ticket_opens_one_socket_of_its_device(mesh: Mesh) -> None:
    await mesh.user("ann")
    laptop = await mesh.device("ann", "laptop")
    browser = await enroll_browser(mesh.http)
    ticket = await new_ticket(mesh, browser)
    origin = {"Origin": mesh.server.url}
    async with connect(
        ticket_url(mesh, ticket), open_timeout=WAIT, additional_headers=origin
    ) as ws:
        async with asyncio.timeout(WAIT):
            hello = json.loads(await ws.recv())
        assert hello["type"] == "hello" and hello["device_id"] == browser.device_id
        async with mesh.online(laptop) as agent:
            assert agent.hello["online"] == [browser.device_id]
        # Spent: the same ticket opens nothing more, even while its socket lives.
        assert await closed_code(ticket_url(mesh, ticket)) == 4401
        # The socket is the ticket's device's: another device's token cannot renew it.
        await ws.send(json.dumps({"type": "auth", "access_token": laptop.access_token}))
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(WAIT):
                while True:
                    await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    for garbage in ("", "x", "A" * 5000, "%00", ticket + "x"):
        assert await closed_code(ticket_url(mesh, garbage)) == 4401


async def test_expired_and_revoked_tickets_open_nothing(mesh: Mesh) -> None:
    await mesh.user("ann")
    browser = await enroll_browser(mesh.http)
    mesh.server.state.tickets.ttl = 0.0  # expired as soon as issued
    assert await closed_code(ticket_url(mesh, await new_ticket(mesh, browser))) == 4401
    mesh.server.state.tickets.ttl = 30.0
    ticket = await new_ticket(mesh, browser)
    again = await enroll_browser(mesh.http, print_=browser.device_id)  # revokes the old session
    assert await closed_code(ticket_url(mesh, ticket)) == 4401
    async with connect(ticket_url(mesh, await new_ticket(mesh, again)), open_timeout=WAIT) as ws:
        async with asyncio.timeout(WAIT):
            assert json.loads(await ws.recv())["device_id"] == browser.device_id


async def test_a_socket_from_another_site_is_refused(mesh: Mesh) -> None:
    await mesh.user("ann")
    browser = await enroll_browser(mesh.http)
    ticket = await new_ticket(mesh, browser)
    with pytest.raises(InvalidStatus) as refused:
        async with connect(
            ticket_url(mesh, ticket),
            open_timeout=WAIT,
            additional_headers={"Origin": "https://evil.example"},
        ):
            pass
    assert refused.value.response.status_code == 403
    # Agents' header-authenticated sockets from a foreign origin are refused the same way.
    with pytest.raises(InvalidStatus):
        async with connect(
            mesh.ws_url,
            open_timeout=WAIT,
            additional_headers=browser.auth | {"Origin": "https://evil.example"},
        ):
            pass


async def test_a_guest_and_its_sender_see_and_signal_each_other_only(mesh: Mesh) -> None:
    await mesh.user("ann")
    laptop = await mesh.device("ann", "laptop")
    phone = await mesh.device("ann", "phone")
    async with mesh.online(laptop) as sender, mesh.online(phone) as other:
        link = await make_link(mesh.http, laptop)
        answer = (await claim(mesh.http, link)).json()
        told = await sender.receive_until(lambda f: f.get("kind") == "link.claimed")
        assert told["data"] == {
            "link_id": link["link_id"],
            "guest": answer["device_id"],
            "name": "photos.zip",
        }
        guest_auth = {"Authorization": f"Bearer {answer['access_token']}"}
        response = await mesh.http.post("/ws/ticket", headers=guest_auth)
        url = ticket_url(mesh, response.json()["ticket"])
        async with connect(url, open_timeout=WAIT) as ws:
            guest = Agent(ws, Enrolled(answer["device_id"], "", "", "", make_certificate()))
            hello = await guest.receive()
            assert hello["online"] == [laptop.device_id]
            await sender.receive_until(presence(guest, True))
            await guest.send(type="signal", to=laptop.device_id, payload={"webrtc": "answer"})
            relayed = await sender.receive_until(lambda f: f["type"] == "signal")
            assert relayed["from"] == guest.id
            await sender.send(type="signal", to=guest.id, payload={"webrtc": "offer"})
            assert (await guest.receive())["from"] == laptop.device_id
            # Nobody else reaches the guest, and the guest reaches nobody else.
            await guest.send(type="signal", to=phone.device_id, payload={})
            refused = await guest.receive()
            assert (refused["type"], refused["error"]) == ("error", "not_allowed")
            await other.send(type="signal", to=guest.id, payload={})
            refused = await other.receive_until(lambda f: f["type"] == "error")
            assert refused["error"] == "not_allowed"
            await guest.send(type="announce", kind="x", data={}, rooms=["@ann"])
            refused = await guest.receive()
            assert refused["error"] == "not_allowed"
            # Nor has it a relay socket (its token in a header, as a non-browser could send).
            relay_url = mesh.ws_url.removesuffix("/ws") + "/relay"
            assert await closed_code(relay_url, additional_headers=guest_auth) == 1008
        await sender.receive_until(presence(guest, False))


async def test_the_sender_can_ask_whether_its_link_was_claimed(
    client: httpx.AsyncClient, state: ServerState
) -> None:
    add_user(state, "ann")
    laptop = await enroll(client, user="ann", name="laptop")
    phone = await enroll(client, user="ann", name="phone")
    link = await make_link(client, laptop)
    status = await client.get(f"/links/{link['link_id']}", headers=laptop.auth)
    assert status.status_code == 200 and status.json()["guest"] is None
    answer = (await claim(client, link)).json()
    status = await client.get(f"/links/{link['link_id']}", headers=laptop.auth)
    assert status.json()["guest"] == answer["device_id"]
    # Another device of the same user, and the guest itself, learn nothing.
    other = await client.get(f"/links/{link['link_id']}", headers=phone.auth)
    assert_error(other, 404, "link_unknown")
    guest = {"Authorization": f"Bearer {answer['access_token']}"}
    assert_error(await client.get(f"/links/{link['link_id']}", headers=guest), 403, "forbidden")


async def test_devices_cannot_claim_the_browser_platforms(
    client: httpx.AsyncClient, state: ServerState
) -> None:
    add_user(state, "ann")
    for platform in ("browser", "guest"):
        cert = make_certificate()
        body = {"username": "ann", "password": PASSWORD, "device_name": "x", "platform": platform}
        body |= {"certificate": cert.pem} | await proof(client, cert)
        assert_error(await client.post("/enroll", json=body), 422, "invalid_request")


async def test_the_sender_withdraws_an_unclaimed_link(
    client: httpx.AsyncClient, state: ServerState
) -> None:
    add_user(state, "ann")
    laptop = await enroll(client, user="ann", name="laptop")
    link = await make_link(client, laptop)
    withdrawn = await client.delete(f"/links/{link['link_id']}", headers=laptop.auth)
    assert withdrawn.status_code == 200 and withdrawn.json() == {"status": "withdrawn"}
    assert_error(await claim(client, link), 410, "link_expired")
    again = await client.delete(f"/links/{link['link_id']}", headers=laptop.auth)
    assert again.status_code == 200  # idempotent: a retried cancel is no error
    log = (await client.get("/rooms/@ann/audit", headers=laptop.auth)).json()["entries"]
    withdrawals = [e for e in log if e["kind"] == "link.withdrawn"]
    assert [(e["actor_device"], e["subject"], e["detail"]) for e in withdrawals] == [
        (laptop.device_id, laptop.device_id, {"link": link["link_id"], "name": "photos.zip"})
    ]
    # It no longer counts among the device's open links.
    for _ in range(MAX_OPEN_LINKS):
        await make_link(client, laptop)


async def test_only_the_sender_withdraws_and_only_before_the_claim(
    client: httpx.AsyncClient, state: ServerState
) -> None:
    add_user(state, "ann")
    add_user(state, "bob")
    laptop = await enroll(client, user="ann", name="laptop")
    phone = await enroll(client, user="ann", name="phone")
    stranger = await enroll(client, user="bob")
    link = await make_link(client, laptop)
    path = f"/links/{link['link_id']}"
    # Another device, even of the same user, hears what a missing link says: no oracle.
    for other in (phone, stranger):
        assert_error(await client.delete(path, headers=other.auth), 404, "link_unknown")
    assert_error(await client.delete("/links/nope", headers=stranger.auth), 404, "link_unknown")
    assert_error(await client.delete(path), 401, "unauthorized")
    answer = (await claim(client, link)).json()  # the refusals above left it claimable
    guest = {"Authorization": f"Bearer {answer['access_token']}"}
    assert_error(await client.delete(path, headers=guest), 403, "forbidden")
    assert_error(await client.delete(path, headers=laptop.auth), 409, "link_claimed")
    log = (await client.get("/rooms/@ann/audit", headers=laptop.auth)).json()["entries"]
    assert "link.withdrawn" not in {e["kind"] for e in log}


@pytest.mark.parametrize(
    "link_id", ["x" * 5000, "%00", "%2E%2E", "ünïcode", "'; DROP TABLE links; --", "%20"]
)
async def test_garbage_link_ids_are_unknown(
    client: httpx.AsyncClient, state: ServerState, link_id: str
) -> None:
    add_user(state, "ann")
    laptop = await enroll(client, user="ann")
    link = await make_link(client, laptop)
    assert_error(await client.delete(f"/links/{link_id}", headers=laptop.auth), 404, "link_unknown")
    assert (await claim(client, link)).status_code == 200  # and the real link is untouched
