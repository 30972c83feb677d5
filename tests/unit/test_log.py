"""Secrets never reach a log, whatever path the record takes."""

from __future__ import annotations

import logging
import logging.handlers
import os
import stat
from pathlib import Path

import httpx
import pytest

from meshagent_gui import log as logsetup
from meshagent_gui.secrets import FileStore, SecretStore

JWT = (
    "eyJhbGciOiJFZERTQSIsInR5cCI6Im1lc2gtY2FwK2p3dCJ9."
    "eyJzdWIiOiJhYmMiLCJleHAiOjE3MDAwMDAwMDB9.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
)
OPAQUE = "opaque-SeCrEt-0123456789abcdef"
GOTIFY = "AbCdEfGhIjKl.Mn"
PASSWORD = "hunter2-correct-horse"


@pytest.fixture
def logged(tmp_path: Path, capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    log_file = tmp_path / "agent.log"
    logsetup.setup(log_file, verbose=True)

    def read() -> str:
        for handler in logging.getLogger().handlers:
            handler.flush()
        captured = capsys.readouterr()
        return log_file.read_text() + captured.err + captured.out

    yield read
    logsetup.setup(None, stderr=False)


def test_the_log_is_owner_only(tmp_path: Path) -> None:
    previous = os.umask(0o022)  # the usual umask, which made state/ 0755 and the log 0644
    try:
        log_file = tmp_path / "state" / "meshagent.log"
        logsetup.setup(log_file, stderr=False)
        logging.getLogger("meshagent_gui.test").warning("hello")
        assert stat.S_IMODE(log_file.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
        [handler] = logging.getLogger().handlers
        assert isinstance(handler, logging.handlers.RotatingFileHandler)
        handler.doRollover()  # a rotation starts a new file: owner-only too
        assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(log_file.with_name("meshagent.log.1").stat().st_mode) == 0o600
        # A log an older version left world-readable is tightened when it is opened.
        log_file.chmod(0o644)
        logsetup.setup(log_file, stderr=False)
        assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
    finally:
        os.umask(previous)
        logsetup.setup(None, stderr=False)


def test_every_log_path_is_redacted(logged, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store = SecretStore(FileStore(tmp_path / "s.json"), "file")
    store.set("server.access_token", OPAQUE)  # registered as a known secret
    logger = logging.getLogger("meshagent_gui.test")
    logger.info("token %s", JWT)
    logger.info(f"bare jwt {JWT} and opaque {OPAQUE}")
    logger.warning("headers: %r", {"Authorization": f"Bearer {OPAQUE}", "X-Gotify-Key": GOTIFY})
    logger.info("X-Gotify-Key: %s", GOTIFY)
    logger.info("GET https://gotify.example/message?token=%s&x=1", GOTIFY)
    logger.info("form password=%s&user=bob", PASSWORD)
    logger.info("json %s", '{"password": "%s", "refresh_token": "%s"}' % (PASSWORD, OPAQUE))
    logger.debug("authorization: bearer %s", OPAQUE)
    try:
        raise RuntimeError(f"failed with {OPAQUE} and {JWT}")
    except RuntimeError:
        logger.exception("with traceback")
    logger.info("extra", extra={"detail": OPAQUE})
    logger.error(
        "private key:\n%s", "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMG\n-----END PRIVATE KEY-----"
    )
    output = logged()
    for secret in (JWT, OPAQUE, GOTIFY, PASSWORD, "MIGHAgEAMBMG"):
        assert secret not in output
    assert output.count(logsetup.REDACTED) >= 10
    assert "with traceback" in output  # the record itself survives


async def test_httpx_request_log_is_redacted(logged) -> None:  # type: ignore[no-untyped-def]
    logging.getLogger("httpx").setLevel(logging.DEBUG)

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"ok": True})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        await client.post(
            f"http://gotify.test/message?token={GOTIFY}", headers={"X-Gotify-Key": GOTIFY}
        )
    output = logged()
    assert "gotify.test/message" in output
    assert GOTIFY not in output


def test_short_values_are_not_registered() -> None:
    logsetup.register_secret("ab")
    assert logsetup.redact("abc ab") == "abc ab"
