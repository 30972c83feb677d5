"""Sends and receives through two transfer services joined by in-memory channels (fakes.py):
how a transfer ends, what the receiver remembers, and a receiver that stops and comes back."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from meshagent_gui.core.events import (
    TransferCompleted,
    TransferFailed,
    TransferOutcome,
    TransferWaiting,
)
from meshagent_gui.core.ipc_types import SendProgress
from meshagent_gui.core.share.service import CHUNK_SIZE, TransferError

from .fakes import FakeNetwork, Side, closing, make_service, wait_for
from .faulty_disk import FaultyDisk

SENDER, RECEIVER = "sender-device", "receiver-device"


def _terminal_events(side: Side) -> list[TransferCompleted | TransferFailed]:
    return [e for e in side.events.events if isinstance(e, TransferCompleted | TransferFailed)]


async def _receive_ended(side: Side, count: int = 1) -> None:
    await wait_for(lambda: len(_terminal_events(side)) >= count, "the receive to end")
    await wait_for(lambda: not side.service.active, "the receive to leave the active list")


# ------------------------------------------------------------------ ends of a receive


async def test_a_finished_receive_leaves_the_active_list_with_one_completed_event(
    tmp_path: Path,
) -> None:
    network = FakeNetwork()
    sender = make_service(network, SENDER, tmp_path / "s")
    receiver = make_service(network, RECEIVER, tmp_path / "r")
    source = tmp_path / "note.txt"
    source.write_bytes(b"hello")
    with closing(sender, receiver):
        [item] = await sender.service.send([source], RECEIVER)
        assert item.sent == 5
        await _receive_ended(receiver)
        assert receiver.service.active == {}
        [completed] = _terminal_events(receiver)
        assert isinstance(completed, TransferCompleted) and completed.name == "note.txt"
        assert (receiver.downloads / "note.txt").read_bytes() == b"hello"


async def test_a_declined_offer_ends_with_one_failure_and_leaves_the_active_list(
    tmp_path: Path,
) -> None:
    network = FakeNetwork()
    sender = make_service(network, SENDER, tmp_path / "s")
    receiver = make_service(network, RECEIVER, tmp_path / "r")
    receiver.service._auto_accept = lambda: "none"

    async def stranger(_: str) -> str | None:
        return "bob"

    receiver.service._peer_user = stranger
    source = tmp_path / "note.txt"
    source.write_bytes(b"hello")
    with closing(sender, receiver):
        with pytest.raises(TransferError, match="declined"):
            await sender.service.send([source], RECEIVER)
        await _receive_ended(receiver)
        [failed] = _terminal_events(receiver)
        assert isinstance(failed, TransferFailed) and "declined" in failed.reason
        assert failed.outcome is TransferOutcome.DECLINED


@pytest.mark.parametrize(
    "fault",
    [
        PermissionError(13, "Permission denied", "/downloads"),
        OSError(5, "Input/output error"),
        RuntimeError("a bug"),
    ],
    ids=["permission", "io-error", "bug"],
)
async def test_a_receive_that_fails_in_an_unforeseen_way_still_ends_once_and_tells_the_sender(
    tmp_path: Path, fault: Exception
) -> None:
    """An OSError (the downloads folder cannot be made) or a bug: the UI's row ends with one
    TransferFailed, the transfer leaves the active list, and the sender hears of it."""
    network = FakeNetwork()

    def downloads() -> Path:
        raise fault

    sender = make_service(network, SENDER, tmp_path / "s")
    receiver = make_service(network, RECEIVER, tmp_path / "r", downloads=downloads)
    source = tmp_path / "note.txt"
    source.write_bytes(b"hello")
    with closing(sender, receiver):
        with pytest.raises(TransferError, match="the receiver failed"):
            await asyncio.wait_for(sender.service.send([source], RECEIVER), 10)
        await _receive_ended(receiver)
        [failed] = _terminal_events(receiver)
        assert isinstance(failed, TransferFailed)
        assert str(fault.args[-1]) in failed.reason
        assert failed.outcome is TransferOutcome.FAILED


@pytest.mark.parametrize("late", [False, True], ids=["midway", "at-the-rename"])
async def test_a_full_disk_ends_both_sides_with_one_clear_line_and_the_resend_resumes(
    tmp_path: Path, late: bool
) -> None:
    """The receiver's disk fills midway through the data, or when the last step renames the
    file into place: the sender hears "the disk is full", the receiver's row ends once, the
    partial is kept, and once there is room a resend brings only what is missing."""
    network = FakeNetwork()
    disk = FaultyDisk()
    sender = make_service(network, SENDER, tmp_path / "s")
    receiver = make_service(network, RECEIVER, tmp_path / "r", disk=disk)
    source = _random_file(tmp_path / "big.bin", 8 * CHUNK_SIZE + 10)
    if late:
        disk.fault("rename_exclusive")
    else:
        disk.fault("pwrite", after_bytes=3 * CHUNK_SIZE + CHUNK_SIZE // 2)
    with closing(sender, receiver):
        with pytest.raises(TransferError, match="the disk is full"):
            await asyncio.wait_for(sender.service.send([source], RECEIVER), 10)
        await _receive_ended(receiver)
        [failed] = _terminal_events(receiver)
        assert isinstance(failed, TransferFailed) and "the disk is full" in failed.reason
        assert disk.failures >= 1  # overlapping chunk writes may each find the disk full
        assert not (receiver.downloads / "big.bin").exists()
        kept = source.stat().st_size if late else 3 * CHUNK_SIZE  # 3.5 chunks fitted
        assert _verified(receiver) == (9 if late else 3) * CHUNK_SIZE

        disk.heal()
        [item] = await asyncio.wait_for(sender.service.send([source], RECEIVER), 10)
        assert item.resumed_from == kept
        assert (receiver.downloads / "big.bin").read_bytes() == source.read_bytes()


async def test_a_receive_cut_off_ends_once_and_leaves_the_active_list(tmp_path: Path) -> None:
    network = FakeNetwork()
    sender = make_service(network, SENDER, tmp_path / "s")
    receiver = make_service(network, RECEIVER, tmp_path / "r")
    sender.service.reconnect_window = 0  # give up at once: this test is about the receiver
    source = _random_file(tmp_path / "big.bin", 20 * CHUNK_SIZE)
    with closing(sender, receiver):
        sending = asyncio.create_task(sender.service.send([source], RECEIVER))
        channel = await network.held_channel(2)
        channel.end_both()
        with pytest.raises(TransferError):
            await sending
        await _receive_ended(receiver)
        [failed] = _terminal_events(receiver)
        assert isinstance(failed, TransferFailed)


# ------------------------------------------------------------------ a resend after a clash


async def test_resending_after_a_name_clash_is_recognised_every_time(tmp_path: Path) -> None:
    """The receiver has an unrelated ``a.txt``: the first send lands as ``a (1).txt``, and
    every send after it finds that copy (it once alternated: skip, ``a (2).txt``, skip...)."""
    network = FakeNetwork()
    sender = make_service(network, SENDER, tmp_path / "s")
    receiver = make_service(network, RECEIVER, tmp_path / "r")
    (receiver.downloads / "a.txt").write_bytes(b"the receiver's own, unrelated file")
    source = tmp_path / "a.txt"
    source.write_bytes(b"the sender's")
    with closing(sender, receiver):
        [first] = await sender.service.send([source], RECEIVER)
        assert first.sent == len(b"the sender's")
        for attempt in range(4):
            [again] = await sender.service.send([source], RECEIVER)
            assert (again.sent, again.resumed_from) == (0, len(b"the sender's")), attempt
        await _receive_ended(receiver, 5)
    assert sorted(p.name for p in receiver.downloads.iterdir()) == ["a (1).txt", "a.txt"]
    assert (receiver.downloads / "a (1).txt").read_bytes() == b"the sender's"


async def test_a_big_file_resent_after_a_clash_is_recognised_too(tmp_path: Path) -> None:
    network = FakeNetwork()
    sender = make_service(network, SENDER, tmp_path / "s")
    receiver = make_service(network, RECEIVER, tmp_path / "r")
    (receiver.downloads / "big.bin").write_bytes(b"unrelated")
    source = _random_file(tmp_path / "big.bin", 3 * CHUNK_SIZE + 5)
    with closing(sender, receiver):
        for _ in range(3):
            await sender.service.send([source], RECEIVER)
    assert sorted(p.name for p in receiver.downloads.iterdir()) == ["big (1).bin", "big.bin"]


# ------------------------------------------------------------------ a receiver that stops


async def test_a_receiver_stopped_cleanly_is_waited_for_and_the_send_resumes(
    tmp_path: Path,
) -> None:
    """Ctrl-C on the receiving agent is not a cancel: the sender says it waits for the
    receiver, and when the receiver is back the send resumes where it was."""
    network = FakeNetwork()
    sender = make_service(network, SENDER, tmp_path / "s")
    receiver = make_service(network, RECEIVER, tmp_path / "r")
    size = 12 * CHUNK_SIZE
    source = _random_file(tmp_path / "big.bin", size)
    updates: list[SendProgress] = []
    with closing(sender, receiver):
        sending = asyncio.create_task(
            sender.service.send([source], RECEIVER, on_progress=updates.append)
        )
        channel = await network.held_channel(4)
        await wait_for(lambda: _verified(receiver) >= 3 * CHUNK_SIZE, "3 chunks on disk")
        channel.release()
        await network.stop(RECEIVER)  # a clean stop: its tasks cancelled, then cut off
        await wait_for(lambda: sender.events.of(TransferWaiting), "the sender to wait")
        assert not sending.done()
        [waiting] = sender.events.of(TransferWaiting)
        assert waiting.peer_name == f"name-of-{RECEIVER}"
        assert any(u.waiting_for == f"name-of-{RECEIVER}" for u in updates)
        [interrupted] = receiver.events.of(TransferFailed)
        assert "cancel" not in interrupted.reason and not receiver.events.of(TransferCompleted)
        assert interrupted.outcome is TransferOutcome.INTERRUPTED

        network.start(RECEIVER)
        back = make_service(network, RECEIVER, tmp_path / "r")  # the agent started again
        with closing(back):
            [item] = await asyncio.wait_for(sending, 20)
    assert (back.downloads / "big.bin").read_bytes() == source.read_bytes()
    assert item.attempts == 2 and item.last_resumed_from >= 3 * CHUNK_SIZE


async def test_an_explicit_cancel_by_the_receiver_still_cancels_the_send(tmp_path: Path) -> None:
    network = FakeNetwork()
    sender = make_service(network, SENDER, tmp_path / "s")
    receiver = make_service(network, RECEIVER, tmp_path / "r")
    source = _random_file(tmp_path / "big.bin", 12 * CHUNK_SIZE)
    with closing(sender, receiver):
        sending = asyncio.create_task(sender.service.send([source], RECEIVER))
        channel = await network.held_channel(2)
        [transfer_id] = receiver.service.active
        await receiver.service.cancel(transfer_id)
        channel.release()
        with pytest.raises(TransferError, match="the receiver cancelled"):
            await asyncio.wait_for(sending, 10)
        await _receive_ended(receiver)
        [cancelled] = _terminal_events(receiver)
        assert cancelled.reason == "cancelled by the receiver"  # type: ignore[union-attr]
        assert cancelled.outcome is TransferOutcome.CANCELLED  # type: ignore[union-attr]


# ------------------------------------------------------------------ helpers


def _random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def _verified(side: Side) -> int:
    """Bytes of chunks the receiver has verified and recorded in its partials' state files
    (a table of one blake3 per chunk after a 128-byte header; zeros for chunks not there)."""
    total = 0
    for state in side.downloads.glob("*.meshpart.state"):
        table = state.read_bytes()[128:]
        digests = (table[i : i + 32] for i in range(0, len(table), 32))
        total += sum(CHUNK_SIZE for digest in digests if digest != bytes(32))
    return total
