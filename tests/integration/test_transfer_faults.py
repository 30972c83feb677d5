"""Issue 4 faults, each through real agents: nothing lost, one clear line, nothing outside."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

from meshagent_gui.context import Context
from meshagent_gui.core.agent import Agent
from meshagent_gui.core.p2p.peers import Service
from meshagent_gui.core.p2p.session import Channel, ChannelClosed
from meshagent_gui.core.protocol import transfer as tp
from meshagent_gui.core.protocol.messages import StreamRole

from .harness import AgentHome, Process, wait_until
from .test_transfer import CHUNK, _progress_of, downloads, random_file

T = TypeVar("T")


def _sending(sender: AgentHome, source: Path, tmp_path: Path, rate: str = "20M") -> Process:
    return Process(
        ["--home", str(sender.home), "send", str(source), "--to", "receiver", "--rate", rate],
        tmp_path / "logs" / f"send-{time.monotonic_ns()}.log",
        env=sender.env,
    )


def _in_process(
    home: Path, play: Callable[[Agent], Awaitable[T]], *, services: Sequence[Service] = ()
) -> T:
    """Run ``play`` against an agent of ``home`` started in this process (with its identity,
    and ``services`` in place of its own), so the test can speak for it."""

    async def run() -> T:
        agent = Agent.from_context(Context.open(home))
        for service in services:
            agent.peers.register(service)
        running = asyncio.create_task(agent.run())
        try:
            await agent.link.wait_connected(15)
            return await play(agent)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)

    env_before = dict(os.environ)
    try:
        return asyncio.run(run())
    finally:
        os.environ.clear()
        os.environ.update(env_before)


def _stderr(process: Process) -> str:
    process.proc.wait(60)
    return process.log_path.read_text(errors="replace")


def test_cancel_from_the_sender_keeps_the_partial(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sender, receiver = pair
    size = 100 * CHUNK
    source = random_file(tmp_path / "cancelled.bin", size)
    sending = _sending(sender, source, tmp_path)
    wait_until(lambda: _progress_of(receiver, "cancelled.bin") >= 10 * CHUNK, 30, "10 MiB in")
    os.killpg(sending.proc.pid, signal.SIGINT)  # Ctrl-C
    assert sending.proc.wait(30) != 0
    sending.stop()
    held = _progress_of(receiver, "cancelled.bin")
    time.sleep(1)
    assert _progress_of(receiver, "cancelled.bin") <= held + 2 * CHUNK  # it really stopped
    assert not (downloads(receiver) / "cancelled.bin").exists()
    out = sender.ok("send", str(source), "--to", "receiver", "--json")
    item = json.loads(out.splitlines()[-1])
    assert int(item["resumed_from"]) >= 10 * CHUNK
    assert (downloads(receiver) / "cancelled.bin").read_bytes() == source.read_bytes()


def test_a_file_changed_while_sending_is_detected(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sender, receiver = pair
    source = random_file(tmp_path / "moving.bin", 60 * CHUNK)
    sending = _sending(sender, source, tmp_path, rate="10M")
    wait_until(lambda: _progress_of(receiver, "moving.bin") >= 5 * CHUNK, 30, "5 MiB in")
    with open(source, "r+b") as handle:  # same size, new content and mtime
        handle.write(os.urandom(1024))
    os.utime(source, ns=(time.time_ns(), time.time_ns() + 10**9))
    errors = _stderr(sending)
    sending.stop()
    assert sending.proc.returncode != 0
    assert "changed while it was being sent" in errors and "Traceback" not in errors
    assert not (downloads(receiver) / "moving.bin").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_on_the_receiver(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sender, receiver = pair
    small = tmp_path / "small-disk"
    small.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)],
        check=False,
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        receiver.stop()
        receiver.ok("config", "set", "downloads.dir", str(small))
        receiver.up()
        wait_until(lambda: "receiver" in sender.online(), 5, "receiver back")
        source = random_file(tmp_path / "huge.bin", 20 * CHUNK)
        done = sender.cli("send", str(source), "--to", "receiver")
        assert done.returncode != 0
        assert "disk is full" in done.stderr and "Traceback" not in done.stderr
        assert not (small / "huge.bin").exists()
        log = (receiver.home / "state" / "meshagent.log").read_text()
        assert "Traceback" not in log
    finally:
        receiver.stop()
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_a_receiver_that_cancels_and_stops_reading_does_not_hang_the_sender(  # type: ignore[no-untyped-def]
    pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sender is blocked on flow control (the receiver reads nothing) when the receiver's
    Cancel comes, and the receiver never reads again: the Cancel alone must end the send.
    (What a receiver whose disk fills late in a fast transfer does.)"""
    sender, receiver = pair
    receiver.stop()  # we play the receiver ourselves, with its identity
    monkeypatch.setenv("MESHAGENT_SECRET_STORE", "file")
    source = random_file(tmp_path / "big.bin", 64 * CHUNK)

    async def cancel_then_stop_reading(channel: Channel) -> None:
        receiver_side = tp.TransferReceiver(transfer_id=channel.resource)
        while not any(
            isinstance(event, tp.OfferReceived)
            for event in receiver_side.receive(await channel.receive())
        ):
            pass
        for message in receiver_side.accept():
            await channel.send(message)
        await asyncio.sleep(1.5)  # read nothing: the sender fills the windows, then blocks
        await channel.send(receiver_side.cancel("no room left", tp.TransferErrorCode.DISK_FULL))
        await asyncio.Event().wait()  # and never read again

    async def send_to_it(agent: Agent) -> subprocess.CompletedProcess[str]:
        await asyncio.to_thread(
            wait_until, lambda: "receiver" in sender.online(), 10, "receiver back"
        )
        return await asyncio.to_thread(sender.cli, "send", str(source), "--to", "receiver")

    playing = Service(StreamRole.TRANSFER, ("share:file", "share:folder"), cancel_then_stop_reading)
    done = _in_process(receiver.home, send_to_it, services=(playing,))
    assert done.returncode != 0
    assert "the receiver cancelled: no room left" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "name", ["../escape.txt", "/etc/evil", "C:/win.txt", "\\\\host\\share\\x", "a/../../b"]
)
def test_a_hostile_sender_writes_nothing_outside(  # type: ignore[no-untyped-def]
    pair, tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sender, receiver = pair
    sender.stop()  # we play the sender ourselves, with its identity, speaking raw protocol
    monkeypatch.setenv("MESHAGENT_SECRET_STORE", "file")

    async def hostile(agent: Agent) -> str:
        device = await agent.resolve_device("receiver")
        session = await agent.peers.session(device.id)
        transfer_id = uuid.uuid4().hex
        token = await agent.request_capability(device.id, "share:folder", transfer_id)
        channel = await session.open_channel(
            StreamRole.TRANSFER, tokens=(token,), resource=transfer_id
        )
        entry = tp.Entry(name, "file", 5, 0o644, 0, bytes(16))
        await channel.send(tp.Offer(transfer_id, (entry,), 5, CHUNK))
        try:
            answer = await asyncio.wait_for(channel.receive(), 15)
        except ChannelClosed as refused:  # refused already by the protocol's path syntax
            return f"{refused.code.name}: {refused.message}"
        assert isinstance(answer, tp.Answer)
        if answer.accepted:  # never: but if it were, try to write
            await channel.send(tp.Chunk(0, 0, bytes(32), b"evil!"))
        with contextlib.suppress(ChannelClosed, TimeoutError):
            await asyncio.wait_for(channel.receive(), 5)
        return answer.reason

    reason = _in_process(sender.home, hostile)
    assert "unsafe name" in reason or "BAD_PATH" in reason, reason
    outside = [p for p in tmp_path.rglob("*") if p.name in {"escape.txt", "evil", "win.txt", "b"}]
    assert outside == []
    assert not downloads(receiver).exists() or list(downloads(receiver).iterdir()) == []


def test_cancel_from_the_receiver(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The receiver's UI cancels through the same agent API the IPC serves."""
    from meshagent_gui.core import ipc

    sender, receiver = pair
    source = random_file(tmp_path / "unwanted.bin", 100 * CHUNK)
    sending = _sending(sender, source, tmp_path)
    wait_until(lambda: _progress_of(receiver, "unwanted.bin") >= 5 * CHUNK, 30, "5 MiB in")
    socket_path = receiver.home / "state" / "agent.sock"
    [running] = asyncio.run(ipc.call(socket_path, "transfers"))
    assert running["direction"] == "receive" and running["name"] == "unwanted.bin"
    asyncio.run(ipc.call(socket_path, "cancel", {"transfer_id": running["transfer_id"]}))
    errors = _stderr(sending)
    sending.stop()
    assert sending.proc.returncode != 0
    assert "the receiver cancelled" in errors and "Traceback" not in errors
    assert not (downloads(receiver) / "unwanted.bin").exists()
    assert _progress_of(receiver, "unwanted.bin") >= 5 * CHUNK  # the partial is kept
