from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshagent_gui.config import parse_rate
from meshagent_gui.core.share.ratelimit import TokenBucket
from meshagent_gui.errors import UserError


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("5M", 5e6),
        ("500K", 5e5),
        ("1.5G", 1.5e9),
        ("5Mi", 5 * 2**20),
        ("2MB/s", 2e6),
        ("", None),
        ("0", None),
        ("4096", 4096.0),
    ],
)
def test_parse_rate(text: str, rate: float | None) -> None:
    assert parse_rate(text) == rate


@given(st.text(max_size=12))
def test_parse_rate_never_crashes(text: str) -> None:
    try:
        value = parse_rate(text)
    except UserError:
        return
    assert value is None or value >= 1024


async def test_bucket_paces_with_the_loop_clock() -> None:
    """Measured on the event loop's own clock: 1 MB at 4 MB/s takes about 0.25 s."""
    loop = asyncio.get_running_loop()
    bucket = TokenBucket(4e6)
    start = loop.time()
    for _ in range(16):
        await bucket.take(65536)
    took = loop.time() - start
    expected = (16 * 65536 - bucket.burst) / 4e6
    assert expected * 0.9 <= took <= expected + 0.5
