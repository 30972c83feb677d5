"""The terminal host with real PTYs: control, input, snapshots, slow viewers, resume, recording."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from meshagent_gui.core.protocol.errors import ProtocolError
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
    Resize,
    ScreenReplaced,
    Snapshot,
    ViewerStream,
)
from meshagent_gui.core.terminal.host import (
    AsciicastRecorder,
    HostControlChanged,
    HostEvent,
    HostLimits,
    NotAllowed,
    TerminalHost,
    TooManyViewers,
    Viewer,
    ViewerClosed,
    ViewerFellBehind,
)
from meshagent_gui.core.terminal.pty import ExitStatus
from meshagent_gui.core.terminal.screen import Screen
from meshagent_gui.core.terminal.spawn import spawn_pty

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="Unix PTYs")

TIMEOUT = 15
PY = sys.executable


class Client:
    """A viewer's side: reads its Viewer through a ViewerStream into its own emulator."""

    def __init__(self, viewer: Viewer) -> None:
        self.viewer = viewer
        self.stream = ViewerStream()
        self.screen = Screen(80, 24)
        self.messages: list[object] = []
        self.console = bytearray()
        self.changed = asyncio.Event()

    async def run(self) -> None:
        async for message in self.viewer:
            self.take(message)

    def take(self, message: object) -> None:
        self.messages.append(message)
        for event in self.stream.receive(message):
            if isinstance(event, ScreenReplaced):
                self.screen = Screen(event.cols, event.rows)
                self.console.clear()
            elif isinstance(event, OutputReceived):
                self.screen.feed(bytes(event.data))
                self.console += bytes(event.data)
        self.changed.set()

    async def until(self, check: Callable[[], bool]) -> None:
        async with asyncio.timeout(TIMEOUT):
            while not check():
                self.changed.clear()
                await self.changed.wait()

    async def until_text(self, needle: str) -> None:
        await self.until(lambda: needle in "\n".join(self.screen.text()))

    def of_type(self, kind: type) -> list[object]:
        return [m for m in self.messages if isinstance(m, kind)]


class Session:
    def __init__(self, argv: list[str], cols: int = 80, rows: int = 24, **host_kw: object) -> None:
        self.events: list[HostEvent] = []
        self.host = TerminalHost(
            spawn_pty(argv, cols=cols, rows=rows),
            on_event=self.events.append,
            **host_kw,  # type: ignore[arg-type]
        )
        self.tasks: list[asyncio.Task[object]] = []
        self.run = asyncio.create_task(self.host.run())

    def client(self, party: str, **kw: object) -> Client:
        client = Client(self.host.attach(party, **kw))  # type: ignore[arg-type]
        self.tasks.append(asyncio.create_task(client.run()))
        return client

    async def finish(self) -> ExitStatus:
        async with asyncio.timeout(TIMEOUT):
            status = await self.run
            await asyncio.gather(*self.tasks)
        return status

    async def stop(self) -> None:
        if not self.run.done():
            self.run.cancel()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(self.run, *self.tasks, return_exceptions=True)


@pytest.fixture
async def sessions() -> AsyncIterator[Callable[..., Session]]:
    made: list[Session] = []

    def make(argv: list[str], **kw: object) -> Session:
        session = Session(argv, **kw)  # type: ignore[arg-type]
        made.append(session)
        return session

    yield make
    for session in made:
        await session.stop()


ECHO = ["sh", "-c", "echo hi; read x; echo got $x; read y; echo also $y"]


async def test_the_controllers_input_reaches_the_pty_and_a_watchers_is_dropped(
    sessions: Callable[..., Session],
) -> None:
    session = sessions(ECHO)
    host = session.host
    alice = session.client("alice", can_control=True)
    bob = session.client("bob")
    await alice.until_text("hi")
    host.receive(bob.viewer, Input(b"from-bob\r"))  # not in control: dropped
    assert bob.viewer.dropped_input_bytes == len(b"from-bob\r")
    host.receive(alice.viewer, ControlRequest())
    assert host.controller == "alice"
    host.receive(alice.viewer, Input(b"from-alice\r"))
    await alice.until_text("got from-alice")
    await bob.until_text("got from-alice")  # every viewer sees the output
    host.console_input(b"from-host\r")  # the host's console can always type
    await bob.until_text("also from-host")
    assert await session.finish() == ExitStatus(code=0)
    assert "from-bob" not in "\n".join(alice.screen.text())
    assert alice.of_type(Ended) == [Ended(0, None, "")]
    assert bob.messages[-1] == Ended(0, None, "")


async def test_two_requests_one_wins_the_other_is_told(sessions: Callable[..., Session]) -> None:
    session = sessions(ECHO)
    host = session.host
    alice = session.client("alice", can_control=True)
    bob = session.client("bob", can_control=True)
    carol = session.client("carol")  # view only
    host.receive(bob.viewer, ControlRequest())
    host.receive(alice.viewer, ControlRequest())
    host.receive(carol.viewer, ControlRequest())
    assert host.controller == "bob"
    await alice.until(lambda: bool(alice.of_type(ControlDenied)))
    await carol.until(lambda: bool(carol.of_type(ControlDenied)))
    assert alice.of_type(ControlDenied) == [ControlDenied("bob is in control")]
    await alice.until(lambda: alice.stream.controller == "bob")
    await bob.until(lambda: bob.stream.you_control)
    assert not alice.stream.you_control
    assert [e for e in session.events if isinstance(e, HostControlChanged)] == [
        HostControlChanged("bob", None, "granted")
    ]
    with pytest.raises(NotAllowed):
        host.grant_control(carol.viewer)


async def test_grant_demotes_revoke_and_release_return_control_to_the_host(
    sessions: Callable[..., Session],
) -> None:
    session = sessions(ECHO)
    host = session.host
    alice = session.client("alice", can_control=True)
    bob = session.client("bob", can_control=True)
    host.grant_control(alice.viewer)
    host.grant_control(bob.viewer)  # the host's decision: alice is demoted
    assert host.controller == "bob"
    assert not host.input(alice.viewer, b"demoted\r")
    host.revoke_control()
    assert host.controller is None
    assert not host.input(bob.viewer, b"revoked\r")
    host.grant_control(alice.viewer)
    host.receive(alice.viewer, ControlRelease())
    assert host.controller is None
    await alice.until(lambda: any(m.epoch == 5 for m in alice.of_type(ControlState)))
    assert alice.stream.controller is None and not alice.stream.you_control
    reasons = [e.reason for e in session.events if isinstance(e, HostControlChanged)]
    assert reasons == ["granted", "granted", "revoked", "granted", "released"]
    epochs = [m.epoch for m in alice.of_type(ControlState)]
    assert epochs == sorted(epochs) and epochs[-1] == host.control_epoch == 5
    # The controller leaving gives control back too.
    host.grant_control(bob.viewer)
    bob.viewer.close()
    assert host.controller is None


FULL_SCREEN = r"""
import sys
w = sys.stdout.write
w("".join(f"$ shell line {i}\r\n" for i in range(30)) + "$ vim file.py")
w("\x1b[?1049h\x1b[H\x1b[2J\x1b[?1000h\x1b[?2004h\x1b[3;20r")
for row in range(1, 24):
    w(f"\x1b[{row};1H\x1b[38;5;{row * 9}m{row:3d} \x1b[0mdef f{row}(): \x1b[1;31m漢字\x1b[0m 🙂")
w("\x1b[24;1H\x1b[7m-- INSERT --\x1b[0m\x1b[5;12H")
sys.stdout.flush()
sys.stdin.readline()
w("\x1b[?1049l")
sys.stdout.flush()
sys.stdin.readline()
"""


async def test_a_late_joiner_sees_the_full_screen_program_at_once(
    sessions: Callable[..., Session],
) -> None:
    session = sessions([PY, "-c", FULL_SCREEN])
    host = session.host
    early = session.client("early", can_control=True)
    await early.until_text("-- INSERT --")
    late = session.client("late")
    await late.until_text("-- INSERT --")
    first = late.messages[0]
    assert isinstance(first, Snapshot) and first.offset == host.offset
    reference = host.snapshot()
    assert reference.offset == host.offset
    # The late viewer's terminal shows what the host's emulator and the early viewer show.
    assert late.screen.text() == host.screen.screen.text() == early.screen.text()
    assert late.screen.cursor == early.screen.cursor == (11, 4)
    assert b"\x1b[?2004h" in bytes(first.data) and b"\x1b[?1000h" in bytes(first.data)
    # vim exits: the late viewer gets the shell back, as the early one does.
    host.console_input(b"\n")
    await late.until_text("$ vim file.py")
    await early.until_text("$ vim file.py")
    assert late.screen.text() == early.screen.text()


async def test_a_slow_viewer_never_holds_up_the_pty_or_other_viewers(
    sessions: Callable[..., Session],
) -> None:
    limits = HostLimits(viewer_queue_bytes=64 * 1024)
    script = "import sys\nfor i in range(20000): print(f'line {i:06d} ' + 'x' * 60)\n"
    session = sessions([PY, "-c", script], limits=limits)
    host = session.host
    fast = session.client("fast")
    slow = host.attach("slow")
    while slow.next_nowait() is not None:  # it takes its first screen, then never reads again
        pass
    status = await session.finish()  # the command ran to its end regardless
    assert status == ExitStatus(code=0)
    assert slow.queued_bytes <= limits.viewer_queue_bytes
    assert slow.resyncs >= 1
    assert any(isinstance(e, ViewerFellBehind) and e.party == "slow" for e in session.events)
    # The fast viewer got every byte, in order.
    assert fast.stream.offset == host.offset > 20000 * 70
    assert fast.screen.text() == host.screen.screen.text()
    # The slow one resumes with a fresh snapshot of the end state, then Ended.
    catch_up = Client(slow)
    await asyncio.wait_for(catch_up.run(), TIMEOUT)
    assert isinstance(catch_up.messages[0], Snapshot)
    assert catch_up.messages[0].offset == host.offset
    assert catch_up.screen.text() == host.screen.screen.text()
    assert catch_up.messages[-1] == Ended(0, None, "")


async def test_viewers_stand_back_during_a_flood_and_see_its_end(
    sessions: Callable[..., Session],
) -> None:
    # 16 MB as fast as the PTY goes, then a pause, then a last line.
    script = (
        "import sys, time\n"
        "line = b'flood ' + b'y' * 74 + b'\\n'\n"
        "sys.stdout.buffer.write(line * 200000); sys.stdout.flush()\n"
        "time.sleep(0.3); print('after the flood')\n"
    )
    session = sessions([PY, "-c", script])
    host = session.host
    viewers = [session.client(f"v{i}") for i in range(3)]
    assert await session.finish() == ExitStatus(code=0)
    for viewer in viewers:
        streamed = sum(len(m.data) for m in viewer.of_type(Output))  # type: ignore[attr-defined,misc]
        assert streamed < host.offset // 4  # most of the flood was never sent
        assert viewer.stream.offset == host.offset
        assert "after the flood" in "\n".join(viewer.screen.text())
        assert viewer.screen.text() == host.screen.screen.text()
        assert viewer.viewer.resyncs == 0  # held, not fallen behind


async def test_a_viewer_resumes_from_its_offset(sessions: Callable[..., Session]) -> None:
    session = sessions(ECHO)
    host = session.host
    first = session.client("alice", can_control=True)
    await first.until_text("hi")
    offset = first.stream.offset
    assert offset is not None
    first.viewer.close()
    host.console_input(b"while-away\r")
    await asyncio.sleep(0)  # let the shell answer
    async with asyncio.timeout(TIMEOUT):
        while host.offset < offset + len(b"while-away\r\ngot while-away\r\n"):
            await asyncio.sleep(0.01)
    again = Client(host.attach("alice", from_offset=offset))
    assert isinstance(again.viewer.next_nowait(), Resize)  # the size in force at the offset
    replay = again.viewer.next_nowait()
    assert isinstance(replay, Output) and replay.offset == offset
    assert b"got while-away" in bytes(replay.data)
    # From too far back (or the future), a snapshot instead.
    fresh = host.attach("bob", from_offset=host.offset + 100)
    assert isinstance(fresh.next_nowait(), Snapshot)


async def test_resume_replays_size_changes_in_order(sessions: Callable[..., Session]) -> None:
    session = sessions(ECHO, cols=80, rows=24)
    host = session.host
    watcher = session.client("w")
    await watcher.until_text("hi")
    start = host.offset
    host.console_input(b"a\r")
    await watcher.until_text("got a")
    middle = host.offset
    host.set_console_size(100, 30)
    host.console_input(b"b\r")
    await watcher.until_text("also b")
    again = host.attach("w2", from_offset=start)
    items = []
    while (message := again.next_nowait()) is not None:
        items.append(message)
    assert items[0] == Resize(80, 24)
    assert Resize(100, 30) in items
    resize_at = items.index(Resize(100, 30))
    before = [m for m in items[:resize_at] if isinstance(m, Output)]
    after = [m for m in items[resize_at:] if isinstance(m, Output)]
    assert before[0].offset == start and before[-1].end == middle == after[0].offset
    assert isinstance(items[-1], ControlState)
    # Resuming exactly where the size changed starts with the new size.
    assert host.attach("w3", from_offset=middle).next_nowait() == Resize(100, 30)


async def test_the_controllers_size_drives_the_pty_and_viewers_never_do(
    sessions: Callable[..., Session],
) -> None:
    session = sessions(["sh", "-c", "while read x; do stty size; done"], cols=80, rows=24)
    host = session.host
    alice = session.client("alice", can_control=True, cols=120, rows=40)
    bob = session.client("bob", cols=60, rows=20)
    host.receive(bob.viewer, Resize(50, 10))  # a viewer's size changes nothing
    assert host.size == (80, 24)
    host.grant_control(alice.viewer)  # the controller's console size applies at once
    assert host.size == (120, 40)
    host.receive(alice.viewer, Resize(100, 30))
    assert host.size == (100, 30)
    host.receive(alice.viewer, Input(b"\r"))
    await bob.until_text("30 100")
    assert (bob.stream.cols, bob.stream.rows) == (100, 30)
    host.revoke_control()  # back to the host console's size
    assert host.size == (80, 24)
    host.console_input(b"\r")
    await bob.until_text("24 80")


async def test_the_commands_exit_ends_the_session_with_its_code(
    sessions: Callable[..., Session],
) -> None:
    session = sessions(["sh", "-c", "echo bye; exit 42"])
    watcher = session.client("w")
    status = await session.finish()
    assert status == ExitStatus(code=42) and session.host.status == status
    assert watcher.messages[-1] == Ended(42, None, "")
    assert "bye" in "\n".join(watcher.screen.text())
    late = Client(session.host.attach("late"))  # joining after the end: screen, then Ended
    await asyncio.wait_for(late.run(), TIMEOUT)
    assert isinstance(late.messages[0], Snapshot) and late.messages[-1] == Ended(42, None, "")


async def test_stopping_the_host_tells_the_viewers(sessions: Callable[..., Session]) -> None:
    session = sessions(["sh", "-c", "echo up; sleep 30"])
    watcher = session.client("w")
    await watcher.until_text("up")
    session.run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await session.run
    await asyncio.wait_for(asyncio.gather(*session.tasks), TIMEOUT)
    assert watcher.messages[-1] == Ended(None, None, "the host stopped sharing")


async def test_the_host_closing_the_session_says_so_not_signal_1(
    sessions: Callable[..., Session],
) -> None:
    session = sessions(["sh", "-c", "echo up; sleep 30"])
    watcher = session.client("w")
    await watcher.until_text("up")
    session.host.close()  # Ctrl-] q, "Stop sharing": the command is hung up
    status = await asyncio.wait_for(session.run, TIMEOUT)
    await asyncio.wait_for(asyncio.gather(*session.tasks), TIMEOUT)
    assert status.signal is not None  # the command did die of the hang-up
    ended = watcher.messages[-1]
    assert isinstance(ended, Ended) and ended.message == "the host stopped sharing"


async def test_protocol_misuse_from_a_viewer_is_an_error(sessions: Callable[..., Session]) -> None:
    session = sessions(ECHO)
    viewer = session.host.attach("v")
    with pytest.raises(ProtocolError):
        session.host.receive(viewer, Join())
    with pytest.raises(ProtocolError):
        session.host.receive(viewer, Ended(0))


async def test_the_recording_is_a_valid_asciicast_v2_file(
    sessions: Callable[..., Session], tmp_path: Path
) -> None:
    path = tmp_path / "session.cast"
    recorder = AsciicastRecorder(path, cols=80, rows=24, env={"TERM": "xterm-256color"})
    session = sessions(
        ["sh", "-c", "printf 'caf\\303\\251 \\346\\274\\242\\n'; read x; echo got $x"],
        recorder=recorder,
    )
    watcher = session.client("w")
    await watcher.until_text("漢")
    session.host.set_console_size(100, 30)
    session.host.console_input(b"it\r")
    await session.finish()
    lines = path.read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])
    assert header["version"] == 2 and (header["width"], header["height"]) == (80, 24)
    assert header["env"] == {"TERM": "xterm-256color"} and isinstance(header["timestamp"], int)
    events = [json.loads(line) for line in lines[1:]]
    assert all(len(e) == 3 and isinstance(e[0], float) and e[1] in ("o", "r") for e in events)
    times = [e[0] for e in events]
    assert times == sorted(times)
    assert ["r", "100x30"] in [e[1:] for e in events]
    output = "".join(e[2] for e in events if e[1] == "o")
    assert "café 漢" in output and "got it" in output
    assert output.encode() == bytes(watcher.console) or output.endswith("got it\r\n")


async def test_queues_stay_bounded_and_detaching_ends_iteration(
    sessions: Callable[..., Session],
) -> None:
    limits = HostLimits(viewer_queue_bytes=4096, max_viewers=2)
    session = sessions(ECHO, limits=limits)
    host = session.host
    spammer = host.attach("spammer", can_control=True)
    host.grant_control(host.attach("holder", can_control=True))
    for _ in range(10_000):  # asks again and again, never reads its refusals
        host.receive(spammer, ControlRequest())
    assert spammer.queued_bytes <= limits.viewer_queue_bytes
    with pytest.raises(TooManyViewers):
        host.attach("third")
    spammer.close()
    assert [message async for message in spammer] == []
    with pytest.raises(ViewerClosed):
        await spammer.next()


async def test_a_resume_during_a_flood_gets_a_snapshot_not_a_gap(
    sessions: Callable[..., Session],
) -> None:
    script = (
        "import sys, time\n"
        "line = b'flood ' + b'y' * 74 + b'\\n'\n"
        "sys.stdout.buffer.write(line * 200000); sys.stdout.flush()\n"
        "time.sleep(0.3); print('after the flood')\n"
    )
    session = sessions([PY, "-c", script])
    host = session.host
    session.client("early")
    async with asyncio.timeout(TIMEOUT):
        while not host.flooding:
            await asyncio.sleep(0.001)
    late = session.client("late", from_offset=host.offset)  # inside the replay window
    assert await session.finish() == ExitStatus(code=0)
    assert isinstance(late.messages[0], Snapshot)  # nobody is streamed a flood: no replay
    assert late.stream.offset == host.offset
    assert late.screen.text() == host.screen.screen.text()


async def test_a_watcher_changes_nothing_and_its_flood_of_requests_is_paced(
    sessions: Callable[..., Session],
) -> None:
    session = sessions(ECHO)
    host = session.host
    alice = host.attach("alice", can_control=True)
    watcher = host.attach("watcher")
    host.grant_control(alice)
    epoch = host.control_epoch
    host.receive(watcher, ControlRelease())  # not its to give back
    assert not host.input(watcher, b"typed by a watcher\r")
    for _ in range(1000):
        host.receive(watcher, ControlRequest())
    assert host.controller == "alice" and host.control_epoch == epoch
    told = []
    while (message := watcher.next_nowait()) is not None:
        told.append(message)
    denied = [m for m in told if isinstance(m, ControlDenied)]
    assert denied[0] == ControlDenied("this viewer may only watch")
    assert len(denied) < 100  # told a few times, then only now and then
    assert watcher.resyncs == 0  # so its queue never overflowed
    with pytest.raises(NotAllowed):
        host.grant_control(watcher)
    watcher.can_control = True  # it showed a terminal:control capability later
    host.revoke_control()
    assert host.request_control(watcher) and host.controller == "watcher"
