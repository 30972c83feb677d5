"""Per-user Gotify notifications: checked targets, never blocking, bounded per user."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from meshagent_gui.server.notify import (
    PER_USER_BURST,
    NotifySettingsError,
    UserNotifier,
    check_target,
)
from meshagent_gui.server.store import AsyncStore, Store
from tests.unit.server.conftest import FakeClock


@pytest.fixture
def db(tmp_path: Path) -> AsyncStore:
    store = Store.open(tmp_path / "data")
    for user in ("ann", "bob"):
        store.create_user(user, None, now=0.0)
        store.set_notify(user, "https://gotify.example/", f"token-{user}")
    return AsyncStore(store)


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/",  # cloud metadata: link-local
        "http://[fe80::1]/",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "gopher://gotify.example/",
        "https://user:pass@gotify.example/",
        "https://gotify.example/?token=x",
    ],
)
async def test_targets_the_server_will_not_post_to(url: str) -> None:
    with pytest.raises(NotifySettingsError):
        await check_target(url, None)


async def test_targets_are_normalised_and_tokens_checked() -> None:
    assert await check_target("https://g.example/sub", "tok") == "https://g.example/sub/"
    assert await check_target("http://127.0.0.1:8080", None) == "http://127.0.0.1:8080/"
    with pytest.raises(NotifySettingsError):
        await check_target("https://g.example/", "has space")


async def test_each_user_gets_a_burst_then_is_rate_limited(db: AsyncStore) -> None:
    sent: list[tuple[str | None, str]] = []

    def gotify(request: httpx.Request) -> httpx.Response:
        sent.append((request.headers.get("X-Gotify-Key"), json.loads(request.content)["title"]))
        return httpx.Response(200, json={"id": len(sent)})

    clock = FakeClock(0.0)
    notifier = UserNotifier(db, transport=httpx.MockTransport(gotify), clock=clock)
    try:
        for n in range(int(PER_USER_BURST) + 5):
            notifier.notify("ann", f"t{n}", "m")
        notifier.notify("bob", "for bob", "m")
        notifier.notify("nobody", "no settings", "m")  # no target: nothing is sent
        await notifier.drain()
        assert sum(key == "token-ann" for key, _ in sent) == PER_USER_BURST
        assert ("token-bob", "for bob") in sent
        clock.advance(60)
        notifier.notify("ann", "a minute later", "m")
        await notifier.drain()
        assert sent[-1] == ("token-ann", "a minute later")
    finally:
        db.close()


async def test_in_flight_posts_are_bounded(db: AsyncStore) -> None:
    notifier = UserNotifier(
        db,
        transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"id": 1})),
        max_in_flight=1,
    )
    try:
        notifier.notify("ann", "first", "m")
        notifier.notify("bob", "dropped", "m")  # the first is still in flight
        assert len(notifier._tasks) == 1
        await notifier.aclose()
    finally:
        db.close()
