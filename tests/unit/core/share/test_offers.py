"""Issue 17 item 8: an offer from another user's device waits for an answer that any front end
(the app, `meshagent transfers accept|decline`) gives, may land where the answer says, and
ends with a clear message on the sender when nobody answers. Two services, in memory."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from meshagent_gui.core.events import TransferCompleted, TransferFailed, TransferOutcome
from meshagent_gui.core.ipc_types import SendProgress, TransferInfo
from meshagent_gui.core.share import sending
from meshagent_gui.core.share.history import TransferHistory
from meshagent_gui.core.share.service import TransferError
from meshagent_gui.errors import UserError

from .fakes import FakeNetwork, Side, closing, make_service, wait_for

SENDER, RECEIVER = "sender-device", "receiver-device"


def _strangers(network: FakeNetwork, tmp_path: Path) -> tuple[Side, Side]:
    """A sender and a receiver of different users: the receiver asks before accepting."""
    sender = make_service(network, SENDER, tmp_path / "s")
    receiver = make_service(network, RECEIVER, tmp_path / "r")

    async def bob(_: str) -> str | None:
        return "bob"

    receiver.service._peer_user = bob
    return sender, receiver


def _note(tmp_path: Path) -> Path:
    source = tmp_path / "report.txt"
    source.write_bytes(b"quarterly numbers")
    return source


async def _offer_waits(receiver: Side) -> str:
    await wait_for(lambda: receiver.service.offers, "the offer to wait for an answer")
    [transfer_id] = receiver.service.offers
    return transfer_id


async def test_a_waiting_offer_is_listed_and_accepted_by_a_prefix_of_its_id(
    tmp_path: Path,
) -> None:
    network = FakeNetwork()
    sender, receiver = _strangers(network, tmp_path)
    with closing(sender, receiver):
        sending_task = asyncio.create_task(sender.service.send([_note(tmp_path)], RECEIVER))
        transfer_id = await _offer_waits(receiver)
        [listed] = receiver.service.listing()
        assert listed.state == "offered" and listed.names == ["report.txt"]
        assert listed.total == 17 and listed.peer_name == f"name-of-{SENDER}"
        assert listed.started > 0
        await receiver.service.answer_offer(transfer_id[:8], True)
        [item] = await asyncio.wait_for(sending_task, 10)
        assert item.sent == 17
        assert (receiver.downloads / "report.txt").read_bytes() == b"quarterly numbers"


async def test_accept_to_a_folder_lands_there_and_says_where(tmp_path: Path) -> None:
    network = FakeNetwork()
    sender, receiver = _strangers(network, tmp_path)
    elsewhere = tmp_path / "chosen" / "folder"  # made by the answer
    with closing(sender, receiver):
        sending_task = asyncio.create_task(sender.service.send([_note(tmp_path)], RECEIVER))
        transfer_id = await _offer_waits(receiver)
        await receiver.service.answer_offer(transfer_id, True, elsewhere)
        await asyncio.wait_for(sending_task, 10)
        await wait_for(lambda: receiver.events.of(TransferCompleted), "the completed event")
        assert (elsewhere / "report.txt").read_bytes() == b"quarterly numbers"
        assert not (receiver.downloads / "report.txt").exists()
        [done] = receiver.events.of(TransferCompleted)
        assert done.where == str(elsewhere / "report.txt")


async def test_a_folder_that_cannot_be_used_is_one_error_and_the_offer_still_waits(
    tmp_path: Path,
) -> None:
    network = FakeNetwork()
    sender, receiver = _strangers(network, tmp_path)
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    with closing(sender, receiver):
        sending_task = asyncio.create_task(sender.service.send([_note(tmp_path)], RECEIVER))
        transfer_id = await _offer_waits(receiver)
        with pytest.raises(UserError, match="not a folder"):
            await receiver.service.answer_offer(transfer_id, True, a_file)
        assert transfer_id in receiver.service.offers
        await receiver.service.answer_offer(transfer_id, False)
        with pytest.raises(TransferError, match="declined"):
            await asyncio.wait_for(sending_task, 10)


async def test_an_unknown_or_ambiguous_id_is_one_clear_error(tmp_path: Path) -> None:
    network = FakeNetwork()
    _, receiver = _strangers(network, tmp_path)
    with closing(receiver), pytest.raises(UserError, match="no offer 'abcd' is waiting"):
        await receiver.service.answer_offer("abcd", True)


async def test_nobody_answering_is_a_timeout_the_sender_words_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not "declined by the user" (nobody declined): the receiver tells the sender it timed out
    (OFFER_TIMEOUT), and the sender says the receiver did not answer, naming it; meanwhile its
    progress said it waits for the receiver to accept."""
    monkeypatch.setattr(sending, "ASKING_AFTER", 0.05)
    network = FakeNetwork()
    sender, receiver = _strangers(network, tmp_path)
    receiver.service.ask_timeout = 0.5
    updates: list[SendProgress] = []
    with closing(sender, receiver):
        with pytest.raises(TransferError) as raised:
            await asyncio.wait_for(
                sender.service.send([_note(tmp_path)], RECEIVER, on_progress=updates.append), 10
            )
        assert raised.value.message == f"name-of-{RECEIVER} did not answer within 0.5 s"
        assert raised.value.code == "no_answer"
        assert {u.answer_from for u in updates} == {f"name-of-{RECEIVER}"}
        await wait_for(lambda: receiver.events.of(TransferFailed), "the receiver's end")
        [failed] = receiver.events.of(TransferFailed)
        assert failed.outcome is TransferOutcome.DECLINED and "no answer" in failed.reason
        assert not receiver.service.offers


async def test_finished_transfers_are_remembered_on_both_sides(tmp_path: Path) -> None:
    network = FakeNetwork()
    sender, receiver = _strangers(network, tmp_path)
    with closing(sender, receiver):
        sending_task = asyncio.create_task(sender.service.send([_note(tmp_path)], RECEIVER))
        await receiver.service.answer_offer(await _offer_waits(receiver), True)
        await asyncio.wait_for(sending_task, 10)
        declined = asyncio.create_task(sender.service.send([_note(tmp_path)], RECEIVER))
        await receiver.service.answer_offer(await _offer_waits(receiver), False)
        with pytest.raises(TransferError):
            await declined

        def states(side: Side) -> list[tuple[str, str]]:
            return [(r.direction, r.state) for r in side.service.history.records()]

        await wait_for(lambda: len(states(receiver)) == 2 and len(states(sender)) == 2, "history")
        assert states(sender) == [("send", "completed"), ("send", "declined")]
        assert states(receiver) == [("receive", "completed"), ("receive", "declined")]
        [arrived, _] = receiver.service.history.records()
        assert arrived.where == str(receiver.downloads / "report.txt")
        assert arrived.names == ["report.txt"] and arrived.total == 17
        assert arrived.peer_name == f"name-of-{SENDER}" and arrived.ended is not None


def test_the_history_keeps_the_last_records_and_skips_a_torn_line(tmp_path: Path) -> None:
    history = TransferHistory(tmp_path / "transfers.jsonl", keep=10)
    for n in range(25):
        history.add(TransferInfo(transfer_id=str(n), direction="send", peer="p", name="f", total=n))
    with open(history.path, "ab") as handle:
        handle.write(b'{"transfer_id": "torn", "dire')
    kept = TransferHistory(history.path, keep=10).records()
    assert [r.transfer_id for r in kept] == [str(n) for n in range(15, 25)]
    assert len(history.path.read_bytes().splitlines()) <= 12  # trimmed as it grew
