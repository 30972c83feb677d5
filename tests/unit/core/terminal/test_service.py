"""The terminal service's stream handling with a real PTY and an in-memory channel: malformed
frames, control tokens and consent, rooms and control reports, announcements, and the viewer's
filtering and endings."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from meshagent_gui.core.bus import EventBus
from meshagent_gui.core.events import AnnouncementReceived, ControlRequested, ServerConnected
from meshagent_gui.core.mesh.client import MeshError
from meshagent_gui.core.mesh.types import CapabilityGrant, Room
from meshagent_gui.core.p2p.session import ChannelClosed
from meshagent_gui.core.protocol.captoken import Capability, Expired
from meshagent_gui.core.protocol.errors import ErrorCode
from meshagent_gui.core.protocol.terminal import (
    ControlDenied,
    ControlRelease,
    ControlRequest,
    ControlState,
    Ended,
    Input,
    Join,
    Output,
    OutputReceived,
    ScreenReplaced,
    SessionEnded,
    Snapshot,
)
from meshagent_gui.core.terminal import service as service_module
from meshagent_gui.core.terminal.service import (
    CONTROL_SCOPE,
    OPEN_SCOPE,
    VIEW_SCOPE,
    ControlAsk,
    SharedTerminal,
    TerminalService,
    TerminalView,
)
from meshagent_gui.errors import UserError

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="Unix PTYs")
TIMEOUT = 10


class FakeChannel:
    """One TERMINAL stream as the service sees it: what the peer sends, what we sent."""

    def __init__(self, peer_id: str = "peer-1", resource: str = "") -> None:
        self.peer_id = peer_id
        self.resource = resource
        self.grant: object = None
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self.sent: list[object] = []
        self.aborted: tuple[ErrorCode, str] | None = None
        self.closed = False
        self.arrived = asyncio.Event()

    async def receive(self) -> object:
        message = await self.inbox.get()
        if isinstance(message, ChannelClosed):
            raise message
        return message

    async def send(self, message: object) -> None:
        if self.aborted is not None:
            raise ChannelClosed(ErrorCode.CANCELLED, "aborted", by_peer=False)
        self.sent.append(message)
        self.arrived.set()

    async def close(self, code: ErrorCode = ErrorCode.NO_ERROR, message: str = "") -> None:
        self.closed = True

    def abort(self, code: ErrorCode, message: str = "") -> None:
        self.aborted = (code, message)
        self.inbox.put_nowait(ChannelClosed(code, message, by_peer=False))

    async def wait_sent(self, kind: type, *, count: int = 1) -> list[Any]:
        async with asyncio.timeout(TIMEOUT):
            while len(found := [m for m in self.sent if isinstance(m, kind)]) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return found


class FakePeers:
    def __init__(self) -> None:
        self.services: list[object] = []

    def register(self, service: object) -> None:
        self.services.append(service)


@dataclass
class FakeLink:
    announced: dict[str, dict[str, Any]] = field(default_factory=dict)
    rooms: dict[str, list[str] | None] = field(default_factory=dict)

    async def announce(
        self,
        kind: str,
        data: dict[str, Any],
        *,
        key: str | None = None,
        rooms: list[str] | None = None,
    ) -> None:
        assert key is not None
        self.announced[key] = data
        self.rooms[key] = rooms

    async def withdraw(self, key: str) -> None:
        self.announced.pop(key, None)


@dataclass
class FakeClient:
    """The server as the terminal service uses it: rooms, capabilities, control reports."""

    my_rooms: tuple[str, ...] = ("@ann", "team")
    granting: tuple[str, ...] = ("@ann", "team")  # rooms whose role allows what is asked
    reports: list[tuple[str, str | None, list[str]]] = field(default_factory=list)
    asked: list[str | None] = field(default_factory=list)
    stalled: bool = False
    reported: asyncio.Event = field(default_factory=asyncio.Event)

    async def rooms(self) -> list[Room]:
        return [Room(name=name, role="member") for name in self.my_rooms]

    async def capability(
        self, target: str, scope: str, resource: str = "", room: str | None = None
    ) -> CapabilityGrant:
        self.asked.append(room)
        if room not in self.granting:
            raise MeshError("not allowed", code="not_allowed")
        return CapabilityGrant(token=f"token-from-{room}", expires_at=2e9, room=room)

    async def report_terminal_control(
        self, session_id: str, controller_device: str | None, rooms: list[str]
    ) -> None:
        if self.stalled:
            await asyncio.Event().wait()  # a server that never answers
        self.reports.append((session_id, controller_device, rooms))
        self.reported.set()

    async def wait_reports(self, count: int) -> list[str | None]:
        async with asyncio.timeout(TIMEOUT):
            while len(self.reports) < count:
                self.reported.clear()
                await self.reported.wait()
        return [controller for _, controller, _ in self.reports]


def grant(scope: str, resource: str = "", room: str = "@ann") -> Capability:
    return Capability("iss", "peer-1", "me", scope, resource, 0, 0, 2e9, "jti", room)


def make_service(
    *,
    verify: Callable[..., Awaitable[Capability]] | None = None,
    peer_user: str = "ann",
    client: FakeClient | None = None,
    allow_open: str = "off",
) -> tuple[TerminalService, FakeLink, EventBus]:
    async def refuse(*_: Any, **__: Any) -> Capability:
        raise Expired("token expired")

    async def user_of(_: str) -> str:
        return peer_user

    link, bus = FakeLink(), EventBus()
    service = TerminalService(
        peers=FakePeers(),  # type: ignore[arg-type]
        link=link,  # type: ignore[arg-type]
        client=client or FakeClient(),  # type: ignore[arg-type]
        bus=bus,
        verify=verify or refuse,
        own_user="ann",
        peer_user=user_of,
        peer_name=lambda device_id: f"name-of-{device_id}",
        device_name=lambda: "laptop",
        allow_open=lambda: allow_open,
    )
    return service, link, bus


async def running(shared: SharedTerminal) -> asyncio.Task[Any]:
    task = asyncio.create_task(shared.run())
    async with asyncio.timeout(TIMEOUT):
        while shared.session_id not in shared.service.shared:
            await asyncio.sleep(0.01)
    return task


async def stop(shared: SharedTerminal, task: asyncio.Task[Any]) -> None:
    shared.stop()
    async with asyncio.timeout(TIMEOUT):
        await task


async def test_session_is_announced_while_it_runs_and_withdrawn_after() -> None:
    service, link, _ = make_service()
    shared = service.share([sys.executable, "-c", "import time; time.sleep(30)"], title="demo")
    task = await running(shared)
    assert [d["title"] for d in link.announced.values()] == ["demo"]
    await stop(shared, task)
    assert link.announced == {}
    assert service.shared == {}


async def test_a_stream_must_start_with_join() -> None:
    service, _, _ = make_service()
    shared = service.share(["cat"])
    task = await running(shared)
    channel = FakeChannel(resource=shared.session_id)
    channel.inbox.put_nowait(Input(b"x"))
    await shared.serve(channel, grant(VIEW_SCOPE))  # type: ignore[arg-type]
    assert channel.aborted is not None and channel.aborted[0] is ErrorCode.UNEXPECTED_MESSAGE
    assert shared.host.viewers == ()
    await stop(shared, task)


async def test_a_malformed_message_ends_only_that_viewer() -> None:
    service, _, _ = make_service()
    shared = service.share(["cat"])
    task = await running(shared)
    channel = FakeChannel(resource=shared.session_id)
    channel.inbox.put_nowait(Join())
    channel.inbox.put_nowait(Output(0, b"a viewer may not send output"))
    await shared.serve(channel, grant(VIEW_SCOPE))  # type: ignore[arg-type]
    assert channel.aborted is not None and channel.aborted[0] is ErrorCode.UNEXPECTED_MESSAGE
    assert shared.host.viewers == ()
    assert shared.host.status is None  # the session goes on
    await stop(shared, task)


async def test_view_only_input_is_dropped_and_a_bad_control_token_refused() -> None:
    service, _, _ = make_service()
    shared = service.share(["cat"])
    task = await running(shared)
    channel = FakeChannel(resource=shared.session_id)
    serving = asyncio.create_task(shared.serve(channel, grant(VIEW_SCOPE)))  # type: ignore[arg-type]
    channel.inbox.put_nowait(Join())
    await channel.wait_sent(ControlState)
    channel.inbox.put_nowait(Input(b"typed by a watcher\n"))
    channel.inbox.put_nowait(ControlRequest("expired.token.here"))
    [denied] = await channel.wait_sent(ControlDenied)
    assert "refused" in denied.reason and "expired" in denied.reason
    assert shared.host.dropped_input_bytes == len(b"typed by a watcher\n")
    assert shared.host.controller is None
    await stop(shared, task)
    await asyncio.wait_for(serving, TIMEOUT)
    assert isinstance(channel.sent[-1], Ended) and channel.closed


async def test_a_fresh_control_token_from_the_server_upgrades_a_watcher() -> None:
    checked: list[dict[str, Any]] = []

    async def verify(token: str, **claims: Any) -> Capability:
        checked.append({"token": token, **claims})
        return grant(CONTROL_SCOPE, claims["resource"])

    service, _, bus = make_service(verify=verify)
    shared = service.share(["cat"], allow_control=True)
    console = bytearray()
    shared.console_output = console.extend
    task = await running(shared)
    channel = FakeChannel(resource=shared.session_id)
    with bus.subscribed() as events:
        serving = asyncio.create_task(shared.serve(channel, grant(VIEW_SCOPE)))  # type: ignore[arg-type]
        channel.inbox.put_nowait(Join())
        channel.inbox.put_nowait(ControlRequest("good.token"))
        states = await channel.wait_sent(ControlState, count=2)
        assert states[-1].you and states[-1].controller == "name-of-peer-1"
        asked = await asyncio.wait_for(anext(aiter(events)), TIMEOUT)
        assert asked == ControlRequested(shared.session_id, "peer-1", "name-of-peer-1")
    assert checked == [
        {
            "token": "good.token",
            "peer_id": "peer-1",
            "scope": CONTROL_SCOPE,
            "resource": shared.session_id,
            "rooms": ("@ann",),  # a token from another room than the session's is refused
        }
    ]
    channel.inbox.put_nowait(Input(b"from the controller\n"))
    async with asyncio.timeout(TIMEOUT):
        while b"from the controller" not in console:
            await asyncio.sleep(0.02)
    await stop(shared, task)
    await asyncio.wait_for(serving, TIMEOUT)


@pytest.mark.parametrize("answer", [True, False])
async def test_another_users_device_gets_control_only_with_consent(answer: bool) -> None:
    service, _, _ = make_service(peer_user="bob")
    shared = service.share(["cat"], allow_control=True)
    asks: list[ControlAsk] = []

    async def consent(ask: ControlAsk) -> bool:
        asks.append(ask)
        return answer

    shared.consent = consent
    task = await running(shared)
    channel = FakeChannel(resource=shared.session_id)
    serving = asyncio.create_task(shared.serve(channel, grant(CONTROL_SCOPE)))  # type: ignore[arg-type]
    channel.inbox.put_nowait(Join())
    channel.inbox.put_nowait(ControlRequest())
    if answer:
        states = await channel.wait_sent(ControlState, count=2)
        assert states[-1].you
    else:
        [denied] = await channel.wait_sent(ControlDenied)
        assert denied.reason == "the host declined"
    assert asks == [ControlAsk(shared.session_id, "peer-1", "name-of-peer-1")]
    await stop(shared, task)
    await asyncio.wait_for(serving, TIMEOUT)


async def test_without_a_way_to_ask_the_host_refuses() -> None:
    service, _, _ = make_service(peer_user="bob")
    shared = service.share(["cat"])
    task = await running(shared)
    channel = FakeChannel(resource=shared.session_id)
    serving = asyncio.create_task(shared.serve(channel, grant(CONTROL_SCOPE)))  # type: ignore[arg-type]
    channel.inbox.put_nowait(Join())
    channel.inbox.put_nowait(ControlRequest())
    [denied] = await channel.wait_sent(ControlDenied)
    assert denied.reason == "the host does not hand out control"
    await stop(shared, task)
    await asyncio.wait_for(serving, TIMEOUT)


async def test_a_command_that_cannot_start_or_record_is_one_clear_error(tmp_path: Any) -> None:
    service, _, _ = make_service()
    with pytest.raises(UserError, match="cannot start no-such-program-here"):
        service.share(["no-such-program-here"])
    with pytest.raises(UserError, match="cannot record to"):
        service.share(["cat"], record=tmp_path / "missing" / "x.cast")


async def test_announcements_are_followed() -> None:
    service, _, bus = make_service()
    following = asyncio.create_task(service.run())
    await asyncio.sleep(0)
    data = {"session_id": "s1", "title": "bash on pc", "cols": 80, "rows": 24, "started_at": 1}
    bus.publish(AnnouncementReceived("terminal.session", "pc", data))
    await service.wait_sessions("pc", timeout=TIMEOUT)
    assert [s.title for s in service.sessions("pc")] == ["bash on pc"]
    bus.publish(AnnouncementReceived("terminal.session", "pc", {"session_id": 5}))  # malformed
    bus.publish(AnnouncementReceived("terminal.session.ended", "pc", data))
    bus.publish(AnnouncementReceived("terminal.session", "pc2", {**data, "session_id": "s2"}))
    await service.wait_sessions("pc2", timeout=TIMEOUT)
    assert service.sessions("pc") == []
    bus.publish(ServerConnected("url", "ws", 0.0))  # the server replays what still stands
    async with asyncio.timeout(TIMEOUT):
        while service.sessions():
            await asyncio.sleep(0.01)
    following.cancel()


# ---------------------------------------------------------------- rooms and control reports


async def test_a_session_goes_to_the_own_devices_unless_rooms_are_chosen() -> None:
    service, link, _ = make_service()
    mine = service.share(["cat"])
    shared = service.share(["cat"], rooms=["team", "ops", "team"])
    assert mine.rooms == ("@ann",) and shared.rooms == ("team", "ops")
    tasks = [await running(mine), await running(shared)]
    assert link.rooms == {mine._key: ["@ann"], shared._key: ["team", "ops"]}
    await stop(mine, tasks[0])
    await stop(shared, tasks[1])


async def test_a_stream_opened_with_a_token_from_another_room_is_refused() -> None:
    """An owner role in a room the session is not shared in (say, one a stranger made and
    added us to) opens nothing: the token's room must be one of the session's."""
    service, _, _ = make_service()
    shared = service.share(["cat"], rooms=["team"])
    task = await running(shared)
    for room in ("elsewhere", "@ann", ""):
        channel = FakeChannel(resource=shared.session_id)
        channel.grant = grant(CONTROL_SCOPE, shared.session_id, room=room)
        await service._serve(channel)  # type: ignore[arg-type]
        assert channel.aborted is not None and channel.aborted[0] is ErrorCode.BAD_TOKEN
        assert "room" in channel.aborted[1]
    assert shared.host.viewers == ()
    channel = FakeChannel(resource=shared.session_id)
    channel.grant = grant(VIEW_SCOPE, shared.session_id, room="team")
    serving = asyncio.create_task(service._serve(channel))  # type: ignore[arg-type]
    channel.inbox.put_nowait(Join())
    await channel.wait_sent(ControlState)
    assert channel.aborted is None and len(shared.host.viewers) == 1
    await stop(shared, task)
    await asyncio.wait_for(serving, TIMEOUT)


async def test_sharing_into_a_room_one_is_not_in_is_one_clear_error() -> None:
    service, _, _ = make_service(client=FakeClient(my_rooms=("@ann", "team")))
    await service.check_rooms(["team"])
    with pytest.raises(UserError, match="not a member of room 'ops'"):
        await service.check_rooms(["team", "ops"])


async def test_every_control_change_is_reported_to_the_server_in_order() -> None:
    client = FakeClient()
    service, _, _ = make_service(client=client, verify=None)
    shared = service.share(["cat"], allow_control=True, rooms=["team"])
    task = await running(shared)
    channel = FakeChannel(resource=shared.session_id)
    serving = asyncio.create_task(shared.serve(channel, grant(CONTROL_SCOPE, room="team")))  # type: ignore[arg-type]
    channel.inbox.put_nowait(Join())
    channel.inbox.put_nowait(ControlRequest())  # granted: ann's own device, allow_control
    assert await client.wait_reports(1) == ["peer-1"]
    channel.inbox.put_nowait(ControlRelease())
    assert await client.wait_reports(2) == ["peer-1", None]
    channel.inbox.put_nowait(ControlRequest())
    await client.wait_reports(3)
    shared.revoke_control()
    assert await client.wait_reports(4) == ["peer-1", None, "peer-1", None]
    channel.inbox.put_nowait(ControlRequest())
    await client.wait_reports(5)
    await stop(shared, task)  # the session ends with a controller: nobody controls it now
    assert await client.wait_reports(6) == ["peer-1", None, "peer-1", None, "peer-1", None]
    assert {(sid, tuple(rooms)) for sid, _, rooms in client.reports} == {
        (shared.session_id, ("team",))
    }
    await asyncio.wait_for(serving, TIMEOUT)


async def test_a_flood_of_control_changes_still_tells_the_server_the_newest() -> None:
    client = FakeClient()
    service, _, _ = make_service(client=client)
    shared = service.share(["cat"])
    task = await running(shared)
    flood = service_module.REPORT_BACKLOG + 10
    for number in range(flood):  # all before the reporter runs once
        shared._report(f"device-{number}")
    await stop(shared, task)
    told = await client.wait_reports(service_module.REPORT_BACKLOG + 1)
    assert told == [f"device-{n}" for n in range(10, flood)] + [None]


async def test_a_server_that_does_not_answer_never_holds_up_the_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(service_module, "REPORT_TIMEOUT", 0.2)
    client = FakeClient(stalled=True)
    service, _, _ = make_service(client=client)
    shared = service.share(["cat"], allow_control=True)
    console = bytearray()
    shared.console_output = console.extend
    task = await running(shared)
    channel = FakeChannel(resource=shared.session_id)
    serving = asyncio.create_task(shared.serve(channel, grant(CONTROL_SCOPE)))  # type: ignore[arg-type]
    channel.inbox.put_nowait(Join())
    channel.inbox.put_nowait(ControlRequest())
    await channel.wait_sent(ControlState, count=2)
    channel.inbox.put_nowait(Input(b"typed while the server hangs\n"))
    async with asyncio.timeout(TIMEOUT):
        while b"typed while the server hangs" not in console:
            await asyncio.sleep(0.02)
    await stop(shared, task)
    await asyncio.wait_for(serving, TIMEOUT)
    async with asyncio.timeout(TIMEOUT):  # each report gave up after REPORT_TIMEOUT
        while service._background:
            await asyncio.sleep(0.05)
    assert client.reports == []


# ---------------------------------------------------------------- the viewer's side


def viewer_of(channel: FakeChannel) -> TerminalView:
    service, _, _ = make_service()
    view = TerminalView(service, "host-id", "host", "s1")
    view._channel = channel  # type: ignore[assignment]
    return view


async def collect(events: AsyncIterator[Any]) -> list[Any]:
    return [event async for event in events]


async def test_the_viewer_filters_queries_and_clipboard_writes() -> None:
    channel = FakeChannel()
    view = viewer_of(channel)
    for message in (
        Snapshot(6, 80, 24, True, b"screen"),
        Output(6, b"a\x1b[6nb\x1b]52;c;ZXZpbA==\x07c"),  # a cursor query and an OSC 52 write
        Ended(0),
    ):
        channel.inbox.put_nowait(message)
    events = await asyncio.wait_for(collect(view.events()), TIMEOUT)
    assert isinstance(events[0], ScreenReplaced)
    shown = b"".join(bytes(e.data) for e in events if isinstance(e, OutputReceived))
    assert shown == b"screenabc"
    assert events[-1] == SessionEnded(0, None, "")


@pytest.mark.parametrize(
    ("rooms", "granting", "asked", "got"),
    [
        (("team", "ops"), ("ops",), ["ops"], "token-from-ops"),  # sorted: ops first
        (("zeta", "alpha"), ("zeta",), ["alpha", "zeta"], "token-from-zeta"),
        ((), (None,), [None], "token-from-None"),  # an older server: it picks
    ],
)
async def test_the_viewer_asks_in_the_rooms_the_session_came_through(
    rooms: tuple[str, ...], granting: tuple[Any, ...], asked: list[Any], got: str
) -> None:
    client = FakeClient(granting=granting)
    service, _, _ = make_service(client=client)
    view = TerminalView(service, "host-id", "host", "s1", rooms=rooms)
    assert (await view._capability(CONTROL_SCOPE)).token == got
    assert client.asked == asked


async def test_a_viewer_whose_rooms_allow_no_control_is_told_so() -> None:
    client = FakeClient(granting=())
    service, _, _ = make_service(client=client)
    view = TerminalView(service, "host-id", "host", "s1", rooms=("team",))
    view._channel = FakeChannel()  # type: ignore[assignment]
    with pytest.raises(UserError, match="allows watching only"):
        await view.request_control()
    assert client.asked == ["team"]  # never a room the session is not shared in


async def test_announced_rooms_are_kept_with_the_session() -> None:
    service, _, bus = make_service()
    following = asyncio.create_task(service.run())
    await asyncio.sleep(0)
    data = {"session_id": "s1", "title": "t", "cols": 80, "rows": 24, "started_at": 1}
    bus.publish(AnnouncementReceived("terminal.session", "pc", data, ("team",)))
    await service.wait_sessions("pc", timeout=TIMEOUT)
    assert service.sessions("pc")[0].rooms == ("team",)
    following.cancel()


async def test_a_malformed_stream_is_one_clear_error() -> None:
    channel = FakeChannel()
    view = viewer_of(channel)
    channel.inbox.put_nowait(Output(0, b"output before any snapshot"))
    with pytest.raises(UserError, match="malformed terminal stream"):
        await asyncio.wait_for(collect(view.events()), TIMEOUT)
    assert channel.aborted is not None


async def test_a_session_gone_from_the_host_ends_the_view() -> None:
    channel = FakeChannel()
    view = viewer_of(channel)
    channel.inbox.put_nowait(ChannelClosed(ErrorCode.REFUSED, "no session", by_peer=True))
    events = await asyncio.wait_for(collect(view.events()), TIMEOUT)
    assert events == [SessionEnded(None, None, "the host stopped sharing")]


async def test_two_viewers_of_one_device_get_distinct_names_and_a_returning_one_its_own() -> None:
    service, _, _ = make_service()
    shared = service.share(["cat"])
    task = await running(shared)
    channels = [FakeChannel(resource=shared.session_id) for _ in range(3)]
    serving = []
    for channel in channels[:2]:
        serving.append(asyncio.create_task(shared.serve(channel, grant(VIEW_SCOPE))))  # type: ignore[arg-type]
        channel.inbox.put_nowait(Join())
        await channel.wait_sent(ControlState)
    assert [v.party for v in shared.host.viewers] == ["name-of-peer-1", "name-of-peer-1 (2)"]
    channels[0].inbox.put_nowait(ChannelClosed(ErrorCode.NO_ERROR, "bye", by_peer=True))
    await asyncio.wait_for(serving[0], TIMEOUT)
    serving.append(asyncio.create_task(shared.serve(channels[2], grant(VIEW_SCOPE))))  # type: ignore[arg-type]
    channels[2].inbox.put_nowait(Join())
    await channels[2].wait_sent(ControlState)
    assert sorted(v.party for v in shared.host.viewers) == ["name-of-peer-1", "name-of-peer-1 (2)"]
    await stop(shared, task)
    await asyncio.wait_for(asyncio.gather(*serving[1:]), TIMEOUT)


async def test_an_opened_shell_is_hung_up_once_its_last_viewer_leaves_even_a_returning_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(service_module, "OPENED_GRACE", 0.0)
    service, _, _ = make_service(allow_open="own")

    def viewer() -> FakeChannel:
        channel = FakeChannel(resource="abcd1234")
        channel.inbox.put_nowait(Join())
        return channel

    opener = viewer()
    opener.grant = grant(OPEN_SCOPE)
    opening = asyncio.create_task(service._serve(opener))  # type: ignore[arg-type]
    await opener.wait_sent(Snapshot)
    (shared,) = service.shared.values()
    # The opener's stream ends while a reconnected viewer is attached: the shell stays.
    returning = viewer()
    staying = asyncio.create_task(shared.serve(returning, grant(OPEN_SCOPE)))  # type: ignore[arg-type]
    await returning.wait_sent(Snapshot)
    opener.inbox.put_nowait(ChannelClosed(ErrorCode.NO_ERROR, "", by_peer=True))
    await opening
    for _ in range(10):  # a hang-up check (with no grace here) would have run by now
        await asyncio.sleep(0)
    assert shared.session_id in service.shared
    # The returning viewer leaves too: nobody is left, so the shell is hung up.
    returning.inbox.put_nowait(ChannelClosed(ErrorCode.NO_ERROR, "", by_peer=True))
    await staying
    async with asyncio.timeout(TIMEOUT):
        while shared.session_id in service.shared:
            await asyncio.sleep(0.01)
