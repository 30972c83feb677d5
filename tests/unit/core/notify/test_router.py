"""The notification router: its rule table, priorities (-1 = off) and sink isolation."""

from __future__ import annotations

import asyncio
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshagent_gui.config import KEYS, Config
from meshagent_gui.core.events import (
    ControlRequested,
    NewerAgentAnnounced,
    PeerCameOnline,
    PeerWentOffline,
    ServerConnected,
    TransferCompleted,
    TransferFailed,
    TransferOutcome,
)
from meshagent_gui.core.notify.gotify import GotifyClient, GotifyError
from meshagent_gui.core.notify.router import (
    RULES,
    GotifySink,
    Notification,
    NotificationRouter,
    NotificationSink,
    human_size,
)
from tests.fakes.gotify import FakeGotify

COMPLETED = TransferCompleted("t1", "report.pdf", "laptop", 12_345_678, 2.0)
FAILED = TransferFailed("t2", "video.mkv", "desktop", "peer went away")
CONTROL = ControlRequested("s1", "dev-9", "Ana's phone")
ONLINE = PeerCameOnline("dev-1", "laptop")
OFFLINE = PeerWentOffline("dev-1", "laptop")


class Recorder:
    def __init__(self) -> None:
        self.received: list[Notification] = []

    async def deliver(self, notification: Notification) -> None:
        self.received.append(notification)


class Broken:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def deliver(self, notification: Notification) -> None:
        raise self.error


class Stuck:
    async def deliver(self, notification: Notification) -> None:
        await asyncio.Event().wait()


def test_every_rule_has_a_config_key() -> None:
    for rule in RULES.values():
        key = KEYS[rule.config_key]
        assert key.kind is int
        assert not key.secret


def test_defaults_from_config(tmp_path: Path) -> None:
    router = NotificationRouter(Config(tmp_path / "config.toml"), [])

    routed = {type(e).__name__: router.route(e) for e in (COMPLETED, FAILED, CONTROL)}
    assert {name: n.priority for name, n in routed.items() if n} == {
        "TransferCompleted": 4,
        "TransferFailed": 7,
        "ControlRequested": 8,
    }
    # Presence is noisy: off unless asked for.
    assert router.route(ONLINE) is None
    assert router.route(OFFLINE) is None


def test_priorities_override_and_minus_one_switches_off() -> None:
    router = NotificationRouter(
        {"notify.peer_online": 2, "notify.transfer_completed": -1, "notify.transfer_failed": 0},
        [],
    )

    online = router.route(ONLINE)
    assert online is not None
    assert (online.kind, online.title, online.priority) == ("peer_online", "laptop is online", 2)
    assert router.route(COMPLETED) is None
    failed = router.route(FAILED)
    assert failed is not None
    assert failed.priority == 0


def test_config_changes_apply_to_the_next_event(tmp_path: Path) -> None:
    config = Config(tmp_path / "config.toml")
    router = NotificationRouter(config, [])
    assert router.route(ONLINE) is None
    config.set("notify.peer_online", 5)
    routed = router.route(ONLINE)
    assert routed is not None
    assert routed.priority == 5


def test_unknown_events_are_ignored() -> None:
    router = NotificationRouter({}, [])
    assert router.route(ServerConnected("https://mesh", "sess", 0.0)) is None
    assert router.route(object()) is None


@pytest.mark.parametrize(("raw", "expected"), [("6", 6), ("high", None), (2.5, None), (True, None)])
def test_bad_priority_values_are_off_and_logged(
    raw: Any, expected: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    router = NotificationRouter({"notify.transfer_failed": raw}, [])
    routed = router.route(FAILED)
    assert (routed.priority if routed else None) == expected
    assert ("notify.transfer_failed must be a whole number" in caplog.text) == (expected is None)


def test_wording() -> None:
    router = NotificationRouter({f"notify.{rule.kind}": 5 for rule in RULES.values()}, [])

    def words(event: object) -> tuple[str, str]:
        routed = router.route(event)
        assert routed is not None
        return routed.title, routed.message

    assert words(COMPLETED) == (
        "Transfer complete",
        "report.pdf with laptop: 12.3 MB in 2.0 s (6.2 MB/s).",
    )
    assert words(FAILED) == ("Transfer failed", "video.mkv with desktop: peer went away")
    assert words(CONTROL) == (
        "Terminal control requested",
        "Ana's phone asks to control your terminal (session s1).",
    )
    assert words(ONLINE) == ("laptop is online", "Device laptop joined the mesh.")
    assert words(OFFLINE) == ("laptop is offline", "Device laptop left the mesh.")
    slow = TransferCompleted("t3", "a", "b", 999, 3725.0)
    assert words(slow)[1] == "a with b: 999 B in 1 h 02 min (0 B/s)."
    instant = TransferCompleted("t4", "a", "b", 0, 0.0)
    assert words(instant)[1] == "a with b: 0 B in 0.0 s."
    assert words(NewerAgentAnnounced("0.3.0", "0.2.1")) == (
        "Mesh Agent 0.3.0 is available",
        "This is 0.2.1: install the new release to update.",
    )


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (1_500_000, "1.5 MB"), (10**15, "1000.0 TB")],
)
def test_human_size(size: int, text: str) -> None:
    assert human_size(size) == text


@given(st.text(), st.text())
def test_peer_supplied_names_cannot_break_the_layout(name: str, peer: str) -> None:
    router = NotificationRouter({"notify.transfer_failed": 1}, [])
    routed = router.route(TransferFailed("t", name, peer, "x\x1b[31m\nforged line"))
    assert routed is not None
    for text in (routed.title, routed.message):
        assert not any(unicodedata.category(ch).startswith("C") for ch in text)
        assert len(text) < 700


async def test_every_sink_gets_it_even_when_others_fail(caplog: pytest.LogCaptureFixture) -> None:
    first, last = Recorder(), Recorder()
    sinks: list[NotificationSink] = [
        first,
        Broken(RuntimeError("toast backend crashed")),
        Broken(GotifyError("Gotify refused the application token (401)", code="x")),
        Stuck(),
        last,
    ]
    router = NotificationRouter({}, sinks, sink_timeout=0.05)

    await router.handle(FAILED)

    assert (
        [n.kind for n in first.received] == [n.kind for n in last.received] == ["transfer_failed"]
    )
    assert "toast backend crashed" in caplog.text  # with its traceback
    assert "Gotify refused the application token (401)" in caplog.text
    assert "no answer within" in caplog.text


async def test_switched_off_events_reach_no_sink() -> None:
    recorder = Recorder()
    router = NotificationRouter({"notify.transfer_completed": -1}, [recorder])
    await router.handle(COMPLETED)
    await router.handle(object())
    assert recorder.received == []


async def test_gotify_sink_end_to_end(tmp_path: Path) -> None:
    with FakeGotify() as gotify:
        async with GotifyClient(gotify.url, gotify.app_token, retries=0) as client:
            router = NotificationRouter(Config(tmp_path / "c.toml"), [GotifySink(client)])
            await router.handle(FAILED)
            await router.handle(ONLINE)  # off by default

    [stored] = gotify.messages
    assert stored["title"] == "Transfer failed"
    assert stored["message"] == "video.mkv with desktop: peer went away"
    assert stored["priority"] == 7
    assert "extras" not in stored


async def test_gotify_sink_with_click_url_and_unreachable_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with FakeGotify() as gotify:
        async with GotifyClient(gotify.url, gotify.app_token, retries=0) as client:
            await GotifySink(client).deliver(Notification("k", "T", "M", 3, "https://mesh/x"))
        url, token = gotify.url, gotify.app_token
    assert gotify.messages[0]["extras"] == {
        "client::notification": {"click": {"url": "https://mesh/x"}}
    }

    async with GotifyClient(url, token, retries=1, backoff=0.001) as client:
        router = NotificationRouter({}, [GotifySink(client)])
        await router.handle(FAILED)  # must not raise
    assert "cannot reach Gotify" in caplog.text
    assert token not in caplog.text


def test_devices_are_named_and_a_cancel_is_not_a_failure() -> None:
    """Events carry the peer's 64-hex device id; people know the device by its name."""
    peer = "ab" * 32
    names = {peer: "laptop"}
    router = NotificationRouter(
        {"notify.transfer_completed": 4, "notify.transfer_failed": 7},
        [],
        device_name=lambda device_id: names.get(device_id, device_id[:12]),
    )
    done = router.route(TransferCompleted("t", "a.txt", peer, 2000, 1.0))
    assert done is not None and done.message.startswith("a.txt with laptop: ")
    cancelled = TransferOutcome.CANCELLED
    mine = router.route(TransferFailed("t", "a.txt", peer, "cancelled by the receiver", cancelled))
    assert mine is not None and mine.title == "Transfer cancelled"
    assert mine.message == "a.txt with laptop: cancelled by the receiver"
    theirs = router.route(
        TransferFailed("t", "a.txt", peer, "the sender cancelled: stop", cancelled)
    )
    assert theirs is not None and theirs.title == "Transfer cancelled"
    failed = router.route(TransferFailed("t", "a.txt", "cd" * 32, "disk full"))
    assert failed is not None and failed.title == "Transfer failed"
    assert failed.message == "a.txt with cdcdcdcdcdcd: disk full"  # unknown: the short id
    unnamed = NotificationRouter({"notify.transfer_failed": 7}, [])
    fallback = unnamed.route(TransferFailed("t", "a.txt", peer, "disk full"))
    assert fallback is not None and peer not in fallback.message


@pytest.mark.parametrize(
    ("outcome", "reason", "title"),
    [
        (TransferOutcome.DECLINED, "declined: declined by the user", "Transfer declined"),
        (
            TransferOutcome.INTERRUPTED,
            "interrupted: this device stopped; the sender resumes when it is back",
            "Transfer interrupted (will resume)",
        ),
        (TransferOutcome.FAILED, "failed: No space left on device", "Transfer failed"),
        # The outcome decides, not words in the reason (a file may be named "cancelled.txt").
        (TransferOutcome.FAILED, "cannot write cancelled.txt", "Transfer failed"),
    ],
)
def test_a_transfer_that_ends_unfinished_is_titled_by_its_outcome(
    outcome: TransferOutcome, reason: str, title: str
) -> None:
    router = NotificationRouter({"notify.transfer_failed": 7}, [])
    routed = router.route(TransferFailed("t", "a.txt", "ab" * 32, reason, outcome))
    assert routed is not None and routed.title == title
    assert routed.message.endswith(reason)
