"""server/limits.py: the failure limiter's reservations, and the body cap on the real server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshagent_gui.server.limits import MAX_BODY_BYTES, FailureLimiter
from meshagent_gui.server.runner import RunningServer, ServerSettings, start_server

WAIT = 10.0


def test_a_reservation_counts_until_released() -> None:
    limiter = FailureLimiter(max_failures=2, window=60.0)
    first = limiter.reserve("a", now=0.0)
    second = limiter.reserve("a", now=0.0)
    assert first is not None and second is not None
    assert limiter.reserve("a", now=0.0) is None  # two in flight use up the attempts
    assert limiter.reserve("b", now=0.0) is not None  # per key
    first.release()
    first.release()  # idempotent: a second release frees nothing more
    third = limiter.reserve("a", now=1.0)
    assert third is not None
    assert limiter.reserve("a", now=1.0) is None


def test_failures_slide_out_of_the_window() -> None:
    limiter = FailureLimiter(max_failures=1, window=60.0)
    assert limiter.reserve("a", now=0.0) is not None  # kept: a failure
    assert limiter.blocked("a", now=59.0)
    assert limiter.reserve("a", now=60.0) is not None


def test_record_failure_without_a_reservation() -> None:
    limiter = FailureLimiter(max_failures=2, window=60.0)
    limiter.record_failure("a", now=0.0)
    limiter.record_failure("a", now=0.0)
    limiter.record_failure("a", now=0.0)  # beyond the limit: nothing more to count
    assert limiter.blocked("a", now=1.0)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running = await start_server(ServerSettings(data_dir=tmp_path / "data"))
    yield running
    await running.stop()


async def _exchange(server: RunningServer, request: bytes) -> tuple[bytes, bytes]:
    """Send ``request`` raw, read until the server closes: (status line, body)."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(WAIT):
            answer = await reader.read()  # to EOF: the server closes after a 413
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], body


def _post(extra_headers: bytes) -> bytes:
    return (
        b"POST /api/v1/enroll HTTP/1.1\r\nHost: mesh.test\r\n"
        b"Content-Type: application/json\r\n" + extra_headers + b"\r\n"
    )


async def test_the_real_server_refuses_a_300_mib_body_without_reading_it(
    server: RunningServer,
) -> None:
    # Only the headers are sent: the answer (and the close) come without a byte of the body.
    status, body = await _exchange(server, _post(b"Content-Length: 314572800\r\n"))
    assert status == b"HTTP/1.1 413 Request Entity Too Large"
    assert json.loads(body)["error"] == "too_large"


async def test_the_real_server_cuts_off_a_chunked_body_at_the_cap(server: RunningServer) -> None:
    chunk = 16 * 1024
    chunks = b"".join(b"%x\r\n" % chunk + b"x" * chunk + b"\r\n" for _ in range(5))
    assert len(chunks) > MAX_BODY_BYTES
    # The body never ends: the server must answer from what it counted, not wait for the rest.
    status, body = await _exchange(server, _post(b"Transfer-Encoding: chunked\r\n") + chunks)
    assert status == b"HTTP/1.1 413 Request Entity Too Large"
    assert json.loads(body)["error"] == "too_large"
