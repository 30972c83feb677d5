"""``send --link``: the URL first, then the guest once the server says the link was claimed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest

from meshagent_gui.core.bus import EventBus
from meshagent_gui.core.events import AnnouncementReceived
from meshagent_gui.core.mesh.client import MeshClient, MeshError
from meshagent_gui.core.mesh.types import LinkStatus, ShareLink
from meshagent_gui.core.share import links
from meshagent_gui.core.share.links import LinkClaimedBy, LinkReady, share_link
from meshagent_gui.errors import UserError


class FakeServer:
    """What share_link uses of a MeshClient."""

    url = "http://mesh.test:8765/"

    def __init__(self, ttl: float = 900.0, guest: str | None = None) -> None:
        self.ttl = ttl
        self.guest = guest  # what GET /links/{id} says
        self.asked: list[tuple[str, int, int | None]] = []
        self.status_calls = 0
        self.withdrawn: list[str] = []
        self.withdraw_answer: BaseException | None = None  # what DELETE /links/{id} raises

    async def create_link(self, name: str, size: int, ttl: int | None = None) -> ShareLink:
        self.asked.append((name, size, ttl))
        return ShareLink(
            link_id="L1", secret="s3cret", path="/s/L1", expires_at=time.time() + self.ttl
        )

    async def link_status(self, link_id: str) -> LinkStatus:
        self.status_calls += 1
        if self.guest == "error":
            raise MeshError("server away", code="server_unreachable")
        return LinkStatus(link_id=link_id, expires_at=0.0, guest=self.guest)

    async def withdraw_link(self, link_id: str) -> None:
        self.withdrawn.append(link_id)
        if self.withdraw_answer is not None:
            raise self.withdraw_answer


def claimed(link_id: str, guest: str, sender: str | None = None) -> AnnouncementReceived:
    return AnnouncementReceived("link.claimed", sender, {"link_id": link_id, "guest": guest})


async def test_the_url_then_the_guest(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.txt").write_text("hi")
    server, bus = FakeServer(), EventBus()
    steps = share_link(cast(MeshClient, server), bus, [folder], 120)
    first = await anext(steps)
    assert first == LinkReady("http://mesh.test:8765/s/L1#s3cret", first.expires_at)
    [(name, size, ttl)] = server.asked
    assert name == "photos.zip" and size > 2 and ttl == 120  # what the page will receive
    assert await anext(steps) == first  # said twice: the CLI shows the first at once
    bus.publish(claimed("L0", "other"))  # another link's
    bus.publish(claimed("L1", "forged", sender="a-peer"))  # a peer's announcement, not the server's
    bus.publish(claimed("L1", "guest-id"))
    assert await anext(steps) == LinkClaimedBy("guest-id")
    with pytest.raises(StopAsyncIteration):
        await anext(steps)
    assert server.withdrawn == []  # claimed: nothing to withdraw


async def test_a_missed_event_is_found_by_asking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(links, "HEARTBEAT", 0.01)
    (tmp_path / "f").write_text("x")
    server = FakeServer(guest="error")
    steps = share_link(cast(MeshClient, server), EventBus(), [tmp_path / "f"])
    await anext(steps)
    await anext(steps)
    assert isinstance(await anext(steps), LinkReady)  # the heartbeat; the server was away
    server.guest = "late-guest"
    got = await anext(steps)
    while isinstance(got, LinkReady):
        got = await anext(steps)
    assert got == LinkClaimedBy("late-guest") and server.status_calls >= 2


async def test_an_unopened_link_ends_with_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    steps = share_link(cast(MeshClient, FakeServer(ttl=-1)), EventBus(), [tmp_path / "f"])
    await anext(steps)
    await anext(steps)
    with pytest.raises(UserError) as refused:
        await anext(steps)
    assert refused.value.code == "link_expired"


async def test_one_item_per_link(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).write_text(name)
    steps = share_link(cast(MeshClient, FakeServer()), EventBus(), [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(UserError):
        await anext(steps)


async def wait_in(steps: AsyncIterator[LinkReady | LinkClaimedBy]) -> asyncio.Task[object]:
    """A task blocked in ``steps``, waiting for a claim (the URL was handed out)."""
    await anext(steps)
    await anext(steps)
    waiting = asyncio.create_task(anext(steps))
    await asyncio.sleep(0)  # it reaches the wait for the claim
    return waiting


@pytest.mark.parametrize(
    "answer",
    [None, MeshError("server away", code="server_unreachable")],
    ids=["withdrawn", "server-away"],
)
async def test_a_cancelled_send_withdraws_its_unclaimed_link(
    tmp_path: Path, answer: BaseException | None
) -> None:
    (tmp_path / "f").write_text("x")
    server = FakeServer()
    server.withdraw_answer = answer
    waiting = await wait_in(share_link(cast(MeshClient, server), EventBus(), [tmp_path / "f"]))
    waiting.cancel()  # Ctrl-C, or the app's "Cancel link"
    with pytest.raises(asyncio.CancelledError):  # the cancel goes on, whatever the server said
        await waiting
    assert server.withdrawn == ["L1"]


async def test_a_silent_server_does_not_hold_the_cancel_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(links, "WITHDRAW_TIMEOUT", 0.01)
    (tmp_path / "f").write_text("x")
    server = FakeServer()

    async def never_answers(link_id: str) -> None:
        server.withdrawn.append(link_id)
        await asyncio.Event().wait()

    monkeypatch.setattr(server, "withdraw_link", never_answers)
    waiting = await wait_in(share_link(cast(MeshClient, server), EventBus(), [tmp_path / "f"]))
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert server.withdrawn == ["L1"]


async def test_a_closed_send_withdraws_its_unclaimed_link(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    server = FakeServer()
    steps = share_link(cast(MeshClient, server), EventBus(), [tmp_path / "f"])
    await anext(steps)
    await steps.aclose()  # the caller stopped iterating (its own generator was closed)
    assert server.withdrawn == ["L1"]


async def test_a_cancel_while_withdrawing_still_cancels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "f").write_text("x")
    server, release, finished = FakeServer(), asyncio.Event(), asyncio.Event()

    async def slow_withdraw(link_id: str) -> None:
        server.withdrawn.append(link_id)
        await release.wait()
        finished.set()

    monkeypatch.setattr(server, "withdraw_link", slow_withdraw)
    waiting = await wait_in(share_link(cast(MeshClient, server), EventBus(), [tmp_path / "f"]))
    waiting.cancel()
    while not server.withdrawn:
        await asyncio.sleep(0)
    waiting.cancel()  # a second Ctrl-C: the send stops now; the withdraw goes on alone
    with pytest.raises(asyncio.CancelledError):
        await waiting
    release.set()
    await finished.wait()  # shielded: it was not cancelled with the send
