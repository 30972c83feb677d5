"""A small asyncio client for a Gotify server's message API.

Gotify's contract (gotify/server ``router/router.go``, ``api/message.go``, ``auth/``):

* ``POST /message`` needs an *application* token, sent here in the ``X-Gotify-Key`` header
  (never as ``?token=``, which would end up in proxy and server logs). The JSON body is
  ``{"title", "message", "priority", "extras"}``; ``message`` is required and non-empty. The
  answer is the stored message: ``{"id", "appid", "message", "title", "priority", "date", ...}``.
* Errors come as ``{"error": "Unauthorized", "errorCode": 401, "errorDescription": "..."}``.
  401: unknown token (a *client* token is unknown here too); 403: valid credentials that may
  not send (e.g. a user login); 400: a bad body (``Field 'message' is required``).
* ``GET /version`` needs no authentication: ``{"version", "commit", "buildDate"}``.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Final, Self

import httpx

from meshagent_gui.errors import UserError

log = logging.getLogger(__name__)

APP_KEY_HEADER: Final = "X-Gotify-Key"
NOTIFICATION_EXTRAS: Final = "client::notification"
_MAX_DESCRIPTION: Final = 300


class GotifyError(UserError):
    """Gotify could not take a message; ``code`` says why, ``status`` is the HTTP status if any."""

    def __init__(self, message: str, *, code: str, status: int | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status


class _RetryableError(Exception):
    """One attempt failed in a way that may pass (network trouble, 5xx)."""

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def validate_url(url: str) -> httpx.URL:
    """Check that ``url`` can be a Gotify base URL (http/https, a host, no query or fragment)."""
    text = url.strip()
    if not text:
        raise GotifyError(
            "gotify.url is not set (meshagent config set gotify.url https://gotify.example.com)",
            code="gotify_bad_url",
        )
    try:
        parsed = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise GotifyError(f"gotify.url is not a URL: {exc}", code="gotify_bad_url") from exc
    # Messages show the URL without query or credentials: a pasted ?token= must not be echoed.
    shown = str(parsed.copy_with(query=None, fragment=None, userinfo=b""))
    if parsed.userinfo:
        raise GotifyError(
            "gotify.url must not contain a user name or password", code="gotify_bad_url"
        )
    if parsed.scheme not in {"http", "https"}:
        raise GotifyError(
            f"gotify.url {shown!r} must start with http:// or https://", code="gotify_bad_url"
        )
    if not parsed.host:
        raise GotifyError(f"gotify.url {shown!r} has no host name", code="gotify_bad_url")
    if parsed.query or parsed.fragment:
        raise GotifyError(
            f"gotify.url must be the server's base address, like {shown},"
            " without '?...' or '#...' (the token belongs in gotify.token)",
            code="gotify_bad_url",
        )
    # Keep a sub-path (Gotify behind a reverse proxy at /gotify) and make it end in "/"
    # so that relative endpoints resolve under it.
    path = parsed.path if parsed.path.endswith("/") else parsed.path + "/"
    return parsed.copy_with(path=path)


def _clean_token(token: str) -> str:
    # Pasted tokens often carry a trailing newline; anything else unprintable cannot go in a header.
    cleaned = token.strip()
    if any(not (0x21 <= ord(ch) <= 0x7E) for ch in cleaned):
        raise GotifyError(
            "gotify.token contains spaces or characters that are not printable ASCII",
            code="gotify_bad_token",
        )
    return cleaned


class GotifyClient:
    """Sends messages to one Gotify application.

    ``retries`` is how many times a failed attempt is repeated (so ``retries=3`` means at most 4
    attempts); only network errors and 5xx answers are retried, after ``backoff * 2**n`` seconds
    with jitter. A POST whose answer was lost may therefore arrive twice: fine for notifications.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        if retries < 0 or backoff < 0 or timeout <= 0:
            raise ValueError("retries and backoff must be >= 0 and timeout > 0")
        self.base_url = validate_url(url)
        self._token = _clean_token(token)
        self._retries = retries
        self._backoff = backoff
        self._random = random.Random()
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            transport=transport,
            timeout=timeout,
            # A redirect would turn the POST into a GET and lose the message; report it instead.
            follow_redirects=False,
            headers={"Accept": "application/json"},
        )

    def __repr__(self) -> str:  # never show the token
        return f"GotifyClient({str(self.base_url)!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(
        self,
        title: str,
        message: str,
        *,
        priority: int = 5,
        click_url: str | None = None,
        extras: Mapping[str, Any] | None = None,
    ) -> int:
        """Post one message; return the id Gotify gave it. Raises :class:`GotifyError`."""
        if not self._token:
            raise GotifyError(
                "gotify.token is not set (create an application in Gotify's Apps page,"
                " then: meshagent config set gotify.token TOKEN)",
                code="gotify_no_token",
            )
        body: dict[str, Any] = {"title": title, "message": message, "priority": priority}
        merged = _with_click_url(extras, click_url)
        if merged:
            body["extras"] = merged
        answer = await self._with_retries(
            "POST", "message", json=body, headers={APP_KEY_HEADER: self._token}
        )
        message_id = answer.get("id")
        if not isinstance(message_id, int) or isinstance(message_id, bool):
            raise self._not_gotify("message")
        log.debug("Gotify stored message %d", message_id)
        return message_id

    async def version(self) -> str:
        """Ask ``GET /version`` once (no token needed): a quick reachability check for doctor."""
        answer = await self._with_retries("GET", "version", attempts=1)
        version = answer.get("version")
        if not isinstance(version, str):
            raise self._not_gotify("version")
        return version

    async def _with_retries(
        self,
        method: str,
        endpoint: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        attempts: int | None = None,
    ) -> dict[str, Any]:
        total = self._retries + 1 if attempts is None else attempts
        for attempt in range(total):
            try:
                return await self._attempt(method, endpoint, json=json, headers=headers)
            except _RetryableError as failure:
                if attempt + 1 < total:
                    delay = self._delay(attempt)
                    log.warning(
                        "Gotify %s /%s failed (%s); retrying in %.2fs",
                        method,
                        endpoint,
                        failure.reason,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    continue
                raise self._gave_up(failure, total) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _delay(self, attempt: int) -> float:
        # "Equal jitter": half of the exponential step is fixed, half random.
        step = self._backoff * 2.0**attempt
        return step / 2 + self._random.uniform(0, step / 2)

    async def _attempt(
        self,
        method: str,
        endpoint: str,
        *,
        json: Any,
        headers: Mapping[str, str] | None,
    ) -> dict[str, Any]:
        try:
            response = await self._http.request(method, endpoint, json=json, headers=headers)
        except httpx.TransportError as exc:
            # httpx error texts name the URL at most, never our headers.
            raise _RetryableError(_describe_transport_error(exc)) from exc
        status = response.status_code
        if status >= 500:
            raise _RetryableError(
                f"{status} {response.reason_phrase}: {_error_description(response)}",
                status=status,
            )
        if status == 200:
            try:
                answer = response.json()
            except ValueError:
                answer = None
            if not isinstance(answer, dict):
                raise self._not_gotify(endpoint)
            return answer
        raise self._refused(response)

    def _refused(self, response: httpx.Response) -> GotifyError:
        status = response.status_code
        description = _error_description(response)
        if status == 401:
            return GotifyError(
                "Gotify refused the application token (401) — check gotify.token"
                " (it must be an application token from Gotify's Apps page, not a client token)",
                code="gotify_unauthorized",
                status=status,
            )
        if status == 403:
            return GotifyError(
                f"Gotify forbids sending messages with these credentials (403: {description})"
                " — gotify.token must be an application token",
                code="gotify_forbidden",
                status=status,
            )
        if status == 400:
            return GotifyError(
                f"Gotify rejected the message (400): {description}",
                code="gotify_bad_request",
                status=status,
            )
        if 300 <= status < 400:
            target = response.headers.get("Location", "another address")
            return GotifyError(
                f"Gotify at {self.base_url} redirects to {target} ({status});"
                " set gotify.url to the final address",
                code="gotify_unexpected_response",
                status=status,
            )
        if status == 404:
            return GotifyError(
                f"{self.base_url} has no Gotify API here (404: {description})"
                " — is gotify.url the Gotify server's base address?",
                code="gotify_unexpected_response",
                status=status,
            )
        return GotifyError(
            f"Gotify answered {status} {response.reason_phrase}: {description}",
            code="gotify_unexpected_response",
            status=status,
        )

    def _gave_up(self, failure: _RetryableError, attempts: int) -> GotifyError:
        tries = "once" if attempts == 1 else f"{attempts} times"
        if failure.status is not None:
            return GotifyError(
                f"Gotify at {self.base_url} failed with {failure.reason} (tried {tries})",
                code="gotify_server_error",
                status=failure.status,
            )
        return GotifyError(
            f"cannot reach Gotify at {self.base_url}: {failure.reason} (tried {tries})",
            code="gotify_unreachable",
        )

    def _not_gotify(self, endpoint: str) -> GotifyError:
        return GotifyError(
            f"{self.base_url} answered /{endpoint} with something that is not Gotify's JSON"
            " — is gotify.url the Gotify server's base address?",
            code="gotify_unexpected_response",
        )


def _with_click_url(extras: Mapping[str, Any] | None, click_url: str | None) -> dict[str, Any]:
    merged: dict[str, Any] = copy.deepcopy(dict(extras)) if extras else {}
    if click_url is not None:
        notification = merged.setdefault(NOTIFICATION_EXTRAS, {})
        notification.setdefault("click", {})["url"] = click_url
    return merged


def _error_description(response: httpx.Response) -> str:
    """Gotify's ``errorDescription``, or a short excerpt of whatever a proxy sent instead."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("errorDescription"), str):
        text: str = body["errorDescription"]
    else:
        text = " ".join(response.text.split()) or response.reason_phrase or "no details"
    return text if len(text) <= _MAX_DESCRIPTION else text[:_MAX_DESCRIPTION] + "…"


def _describe_transport_error(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return str(exc) or type(exc).__name__
