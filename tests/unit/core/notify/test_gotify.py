"""GotifyClient against a loopback Gotify (tests/fakes/gotify.py) and replayed answers."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from meshagent_gui.core.notify.gotify import GotifyClient, GotifyError, validate_url
from meshagent_gui.errors import UserError
from tests.fakes.gotify import CLIENT_TOKEN, FakeApp, FakeGotify


@pytest.fixture
def gotify() -> Iterator[FakeGotify]:
    with FakeGotify() as server:
        yield server


def client_for(server: FakeGotify, token: str | None = None, retries: int = 2) -> GotifyClient:
    chosen = server.app_token if token is None else token
    return GotifyClient(server.url, chosen, retries=retries, backoff=0.001, timeout=5.0)


def replaying(status: int, body: bytes, headers: dict[str, str] | None = None) -> Any:
    """A transport that answers every request the same way, counting the requests."""
    calls: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(status, content=body, headers=headers)

    transport = httpx.MockTransport(answer)
    transport.calls = calls  # type: ignore[attr-defined]
    return transport


# --- sending ---------------------------------------------------------------------------------


async def test_send_posts_the_message_with_the_token_in_the_header(gotify: FakeGotify) -> None:
    async with client_for(gotify) as client:
        message_id = await client.send(
            "Backup", "**done**", priority=7, extras={"client::display": {"contentType": "x"}}
        )

    assert message_id == 1
    [stored] = gotify.messages
    assert stored["title"] == "Backup"
    assert stored["message"] == "**done**"
    assert stored["priority"] == 7
    assert stored["appid"] == 1
    assert stored["extras"] == {"client::display": {"contentType": "x"}}
    [request] = gotify.requests
    assert request.method == "POST"
    assert request.target == "/message"  # the token never rides in the URL
    assert request.headers["x-gotify-key"] == gotify.app_token
    assert "authorization" not in request.headers
    assert request.headers["content-type"] == "application/json"


async def test_click_url_becomes_gotify_notification_extras(gotify: FakeGotify) -> None:
    caller_extras = {"client::notification": {"bigImageUrl": "https://img"}}
    async with client_for(gotify) as client:
        await client.send("T", "M", click_url="https://mesh.example/t/1", extras=caller_extras)

    assert gotify.messages[0]["extras"] == {
        "client::notification": {
            "bigImageUrl": "https://img",
            "click": {"url": "https://mesh.example/t/1"},
        }
    }
    assert caller_extras == {"client::notification": {"bigImageUrl": "https://img"}}


async def test_defaults_and_ids(gotify: FakeGotify) -> None:
    async with client_for(gotify) as client:
        first = await client.send("one", "1")
        second = await client.send("two", "2")

    assert (first, second) == (1, 2)
    assert [m["priority"] for m in gotify.messages] == [5, 5]
    assert "extras" not in gotify.messages[0]
    assert json.loads(gotify.requests[0].body) == {"title": "one", "message": "1", "priority": 5}


async def test_token_with_trailing_newline_is_trimmed(gotify: FakeGotify) -> None:
    async with client_for(gotify, token=gotify.app_token + "\n") as client:
        assert await client.send("T", "M") == 1


async def test_gotify_behind_a_sub_path() -> None:
    with FakeGotify(prefix="/gotify") as server:
        for url in (server.url, server.url + "/"):
            async with GotifyClient(url, server.app_token, retries=2, backoff=0.001) as client:
                await client.send("T", "M")
                assert await client.version() == "2.6.3"
        assert len(server.messages) == 2


# --- refusals --------------------------------------------------------------------------------


async def test_unknown_token_is_401_and_not_retried(gotify: FakeGotify) -> None:
    async with client_for(gotify, token="Anot-a-token") as client:
        with pytest.raises(GotifyError) as caught:
            await client.send("T", "M")

    assert caught.value.code == "gotify_unauthorized"
    assert caught.value.status == 401
    assert str(caught.value).startswith(
        "Gotify refused the application token (401) — check gotify.token"
    )
    assert isinstance(caught.value, UserError)
    assert len(gotify.requests) == 1
    assert gotify.messages == []


async def test_client_token_is_refused_like_real_gotify(gotify: FakeGotify) -> None:
    # gotify/server's auth tests: a client token on an app-token endpoint is 401, not 403.
    async with client_for(gotify, token=CLIENT_TOKEN) as client:
        with pytest.raises(GotifyError) as caught:
            await client.send("T", "M")

    assert caught.value.code == "gotify_unauthorized"
    assert "not a client token" in str(caught.value)


async def test_403_names_the_cause_and_gotify_description() -> None:
    body = (
        b'{"error":"Forbidden","errorCode":403,'
        b'"errorDescription":"you are not allowed to access this api"}'
    )
    transport = replaying(403, body)
    async with GotifyClient(
        "https://g.example", "Atok", transport=transport, retries=2, backoff=0.001
    ) as client:
        with pytest.raises(GotifyError) as caught:
            await client.send("T", "M")

    assert caught.value.code == "gotify_forbidden"
    assert "(403: you are not allowed to access this api)" in str(caught.value)
    assert "application token" in str(caught.value)
    assert len(transport.calls) == 1


async def test_empty_message_is_400_with_gotify_description(gotify: FakeGotify) -> None:
    async with client_for(gotify) as client:
        with pytest.raises(GotifyError) as caught:
            await client.send("T", "")

    assert caught.value.code == "gotify_bad_request"
    assert str(caught.value) == "Gotify rejected the message (400): Field 'message' is required"
    assert len(gotify.requests) == 1


async def test_missing_token_fails_before_any_request(gotify: FakeGotify) -> None:
    async with client_for(gotify, token="  ") as client:
        with pytest.raises(GotifyError) as caught:
            await client.send("T", "M")

    assert caught.value.code == "gotify_no_token"
    assert gotify.requests == []


def test_token_that_cannot_go_in_a_header_is_refused() -> None:
    with pytest.raises(GotifyError) as caught:
        GotifyClient("https://g.example", "A tok")
    assert caught.value.code == "gotify_bad_token"


async def test_a_url_that_is_not_gotify_is_named(gotify: FakeGotify) -> None:
    async with GotifyClient(
        gotify.url + "/wrong", gotify.app_token, retries=2, backoff=0.001
    ) as client:
        with pytest.raises(GotifyError) as caught:
            await client.send("T", "M")

    assert caught.value.code == "gotify_unexpected_response"
    assert "404" in str(caught.value)
    assert "gotify.url" in str(caught.value)


async def test_redirect_is_reported_not_followed() -> None:
    transport = replaying(301, b"", {"Location": "https://gotify.example/message"})
    async with GotifyClient("http://gotify.example", "Atok", transport=transport) as client:
        with pytest.raises(GotifyError) as caught:
            await client.send("T", "M")

    assert caught.value.code == "gotify_unexpected_response"
    assert "https://gotify.example/message" in str(caught.value)
    assert len(transport.calls) == 1


async def test_200_that_is_not_a_gotify_message() -> None:
    transport = replaying(200, b"<html>welcome</html>")
    async with GotifyClient(
        "http://g.example", "Atok", transport=transport, retries=2, backoff=0.001
    ) as client:
        with pytest.raises(GotifyError) as caught:
            await client.send("T", "M")
    assert caught.value.code == "gotify_unexpected_response"


# --- retries ---------------------------------------------------------------------------------


async def test_500_is_retried_until_it_passes(gotify: FakeGotify) -> None:
    gotify.fail_next(2)
    async with client_for(gotify, retries=3) as client:
        assert await client.send("T", "M") == 1

    assert len(gotify.requests) == 3
    assert len(gotify.messages) == 1


async def test_dropped_connections_are_retried(gotify: FakeGotify) -> None:
    gotify.drop_next(2)
    async with client_for(gotify, retries=2) as client:
        assert await client.send("T", "M") == 1
    assert len(gotify.requests) == 3


async def test_persistent_500_gives_up_with_server_error(gotify: FakeGotify) -> None:
    gotify.fail_next(100, status=503)
    async with client_for(gotify, retries=2) as client:
        with pytest.raises(GotifyError) as caught:
            await client.send("T", "M")

    assert caught.value.code == "gotify_server_error"
    assert caught.value.status == 503
    assert "503 Service Unavailable: fake failure (tried 3 times)" in str(caught.value)
    assert len(gotify.requests) == 3


async def test_persistent_dropped_connections_give_up_as_unreachable(gotify: FakeGotify) -> None:
    gotify.drop_next(100)
    async with client_for(gotify, retries=2) as client:
        with pytest.raises(GotifyError) as caught:
            await client.send("T", "M")

    assert caught.value.code == "gotify_unreachable"
    assert "(tried 3 times)" in str(caught.value)
    assert len(gotify.requests) == 3


async def test_server_down_is_unreachable() -> None:
    with FakeGotify() as server:
        url, token = server.url, server.app_token
    async with GotifyClient(url, token, retries=2, backoff=0.001) as client:
        with pytest.raises(GotifyError) as caught:
            await client.send("T", "M")
        with pytest.raises(GotifyError) as version_caught:
            await client.version()

    assert caught.value.code == "gotify_unreachable"
    assert f"cannot reach Gotify at {url}/" in str(caught.value)
    assert version_caught.value.code == "gotify_unreachable"
    assert "(tried once)" in str(version_caught.value)


async def test_proxy_html_error_page_is_summarised() -> None:
    page = b"<html><body><h1>502 Bad Gateway</h1>" + b"x" * 2000 + b"</body></html>"
    transport = replaying(502, page, {"Content-Type": "text/html"})
    async with GotifyClient(
        "https://g.example", "Atok", transport=transport, retries=1, backoff=0
    ) as client:
        with pytest.raises(GotifyError) as caught:
            await client.send("T", "M")

    assert caught.value.code == "gotify_server_error"
    assert len(str(caught.value)) < 500
    assert len(transport.calls) == 2


async def test_timeouts_are_retried_then_unreachable() -> None:
    def too_slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("read timed out", request=request)

    async with GotifyClient(
        "https://g.example",
        "Atok",
        transport=httpx.MockTransport(too_slow),
        retries=2,
        backoff=0.001,
    ) as client:
        with pytest.raises(GotifyError) as caught:
            await client.send("T", "M")
    assert caught.value.code == "gotify_unreachable"
    assert "timed out" in str(caught.value)


# --- version and URL checks ------------------------------------------------------------------


async def test_version_needs_no_token(gotify: FakeGotify) -> None:
    async with GotifyClient(gotify.url, "") as client:
        assert await client.version() == "2.6.3"
    [request] = gotify.requests
    assert request.target == "/version"
    assert "x-gotify-key" not in request.headers


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("", "not set"),
        ("gotify.example.com", "http:// or https://"),
        ("ftp://gotify.example.com", "http:// or https://"),
        ("https://", "no host"),
        ("https://gotify.example.com/?token=Asecret", "without '?...'"),
        ("https://me:pw@gotify.example.com", "user name or password"),
        ("gotify.example.com/?token=Asecret", "http:// or https://"),
    ],
)
def test_bad_urls_are_explained(url: str, expected: str) -> None:
    with pytest.raises(GotifyError) as caught:
        validate_url(url)
    assert caught.value.code == "gotify_bad_url"
    assert expected in str(caught.value)
    assert "Asecret" not in str(caught.value)


def test_good_urls_keep_their_path() -> None:
    assert str(validate_url(" https://h.example/gotify ")) == "https://h.example/gotify/"
    assert str(validate_url("http://127.0.0.1:8080")) == "http://127.0.0.1:8080/"


# --- secrecy ---------------------------------------------------------------------------------


async def test_token_never_reaches_logs_or_errors(
    gotify: FakeGotify, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gotify.drop_next(1)
    gotify.fail_next(1)
    async with client_for(gotify) as client:
        await client.send("T", "M")
        assert gotify.app_token not in repr(client)
    async with client_for(gotify, token="Awrong-secret") as client:
        with pytest.raises(GotifyError) as caught:
            await client.send("T", "M")

    assert "retrying" in caplog.text
    assert gotify.app_token not in caplog.text
    assert "Awrong-secret" not in caplog.text
    assert "Awrong-secret" not in str(caught.value)


# --- the fake keeps to Gotify's contract ------------------------------------------------------


def test_fake_accepts_the_three_token_carriers_and_refuses_others(gotify: FakeGotify) -> None:
    with httpx.Client(base_url=gotify.url) as http:
        ok = [
            http.post("/message", params={"token": gotify.app_token}, json={"message": "q"}),
            http.post(
                "/message", headers={"X-Gotify-Key": gotify.app_token}, json={"message": "h"}
            ),
            http.post(
                "/message",
                headers={"Authorization": f"bearer {gotify.app_token}"},
                json={"message": "b"},
            ),
        ]
        no_token = http.post("/message", json={"message": "m"})
        user_login = http.post("/message", auth=("admin", "admin"), json={"message": "m"})
        client_token = http.post(
            "/message", headers={"X-Gotify-Key": gotify.client_token}, json={"message": "m"}
        )

    assert [r.status_code for r in ok] == [200, 200, 200]
    assert [m["message"] for m in gotify.messages] == ["q", "h", "b"]
    assert no_token.status_code == client_token.status_code == 401
    assert no_token.json() == {
        "error": "Unauthorized",
        "errorCode": 401,
        "errorDescription": (
            "you need to provide a valid access token or user credentials to access this api"
        ),
    }
    assert user_login.status_code == 403
    assert user_login.json()["errorDescription"] == "you are not allowed to access this api"


def test_fake_binds_like_gin() -> None:
    apps = {"Aapp": FakeApp(7, "Backups", default_priority=3)}
    with FakeGotify(apps=apps) as server, httpx.Client(base_url=server.url) as http:
        key = {"X-Gotify-Key": "Aapp"}
        stored = http.post("/message", headers=key, json={"message": "m", "title": "  "}).json()
        wrong_type = http.post("/message", headers=key, json={"message": "m", "priority": "x"})
        no_message = http.post("/message", headers=key, json={"title": "t"})
        form = http.post("/message?priority=2", headers=key, data={"message": "f"}).json()
        elsewhere = http.get("/application", headers=key)

    assert stored["title"] == "Backups"
    assert stored["priority"] == 3
    assert stored["appid"] == 7
    assert set(stored) == {"id", "appid", "message", "title", "priority", "date"}
    assert wrong_type.status_code == 400
    assert wrong_type.json()["errorDescription"] == (
        "json: cannot unmarshal string into Go struct field MessageExternal.priority of type int"
    )
    assert no_message.json()["errorDescription"] == "Field 'message' is required"
    assert (form["message"], form["priority"]) == ("f", 2)
    assert elsewhere.status_code == 404
    assert elsewhere.json()["errorDescription"] == "page not found"
