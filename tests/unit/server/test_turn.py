"""TURN credentials (server/turn.py): coturn's REST scheme, checked settings, a bounded rate."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest

from meshagent_gui.server.turn import (
    ISSUE_BURST,
    PRUNE_AT,
    TurnConfig,
    TurnConfigError,
    TurnIssuer,
)

SECRET = b"a shared secret of some length"
DEVICE = "ab" * 32


def test_credentials_follow_coturns_rest_scheme() -> None:
    issued = TurnConfig(("turn:turn.example.com:3478",), SECRET, ttl=600).mint(DEVICE, 1000.9)
    assert issued.username == f"1600:{DEVICE}"
    expected = hmac.new(SECRET, issued.username.encode(), hashlib.sha1).digest()
    assert base64.b64decode(issued.password) == expected
    assert issued.expires_at == 1600 and issued.urls == ["turn:turn.example.com:3478"]


@pytest.mark.parametrize(
    "urls",
    [(), ("http://turn.example.com",), ("turn:",), ("turn:host:3478?transport=sctp",),
     ("turn:host:3478\nX-Injected: 1",)],
)  # fmt: skip
def test_bad_turn_urls_are_refused(urls: tuple[str, ...]) -> None:
    with pytest.raises(TurnConfigError):
        TurnConfig(urls, SECRET)


def test_good_turn_urls_are_accepted() -> None:
    urls = (
        "turn:198.51.100.7:3478",
        "turns:turn.example.com:5349?transport=tcp",
        "turn:[2001:db8::1]",
    )
    assert TurnConfig(urls, SECRET).urls == urls


def test_a_short_secret_or_odd_lifetime_is_refused() -> None:
    with pytest.raises(TurnConfigError, match="secret"):
        TurnConfig(("turn:h",), b"short")
    with pytest.raises(TurnConfigError, match="live"):
        TurnConfig(("turn:h",), SECRET, ttl=10**6)


def test_the_secret_file_is_read_without_surrounding_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"  " + SECRET + b"\n")
    assert TurnConfig.load(["turn:h"], path).secret == SECRET
    with pytest.raises(TurnConfigError, match="cannot read"):
        TurnConfig.load(["turn:h"], tmp_path / "missing")


def test_a_device_asking_too_often_is_cut_off_and_others_are_not() -> None:
    issuer = TurnIssuer(TurnConfig(("turn:h",), SECRET))
    answers = [issuer.issue(DEVICE, 100.0) for _ in range(int(ISSUE_BURST) + 3)]
    assert answers[: int(ISSUE_BURST)] == [answers[0]] * int(ISSUE_BURST)
    assert answers[-1] is None
    assert issuer.issue("cd" * 32, 100.0) is not None  # another device has its own budget
    assert issuer.issue(DEVICE, 110.0) is not None  # and the budget refills


def test_a_flood_of_devices_leaves_only_a_bounded_table() -> None:
    issuer = TurnIssuer(TurnConfig(("turn:h",), SECRET))
    for index in range(10 * PRUNE_AT):  # each device asks once; their budgets refill meanwhile
        assert issuer.issue(f"{index:064x}", 100.0 + 30.0 * index) is not None
    assert len(issuer._buckets) <= PRUNE_AT
