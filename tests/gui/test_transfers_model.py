"""The transfer table: events folded into rows, repaints coalesced to the changed cells."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QModelIndex, Qt

from meshagent_gui.core.events import (
    TransferCompleted,
    TransferFailed,
    TransferOffered,
    TransferOutcome,
    TransferProgressed,
    TransferWaiting,
)
from meshagent_gui.ui.transfers import Column, State, TransferTableModel


def progressed(
    done: int, transfer_id: str = "t1", direction: str = "receive"
) -> TransferProgressed:
    return TransferProgressed(transfer_id, direction, "peer-1", "movie.mkv", done, 1000, 50.0, 3.0)


def test_progress_at_full_speed_is_coalesced_to_changed_cells(qtbot: Any) -> None:
    model = TransferTableModel(flush_interval=0.05)
    model.apply(progressed(0))  # the new row
    changes: list[tuple[int, int, int]] = []
    model.dataChanged.connect(
        lambda first, last, *_: changes.append((first.row(), first.column(), last.column()))
    )
    model.flush()
    changes.clear()
    flushes = model.flushes
    for done in range(1, 1001):
        model.apply(progressed(done))
    assert changes == []  # nothing repaints until the timer fires
    qtbot.waitUntil(lambda: bool(changes), timeout=2000)
    assert model.flushes == flushes + 1
    assert changes == [(0, Column.PROGRESS, Column.ETA)]
    row = model.row_at(0)
    assert row.done == 1000 and row.state is State.RUNNING
    assert model.data(model.index(0, Column.PROGRESS)) == "100 %"


def test_rows_follow_the_transfer_state_table(qtbot: Any) -> None:
    model = TransferTableModel()
    offer = TransferOffered("t2", "peer-2", "laptop", ("a.txt", "b.txt"), 2, 2048, False)
    row = model.apply(offer)
    assert row is not None and row.state is State.ASKING and row.name == "a.txt and 1 more"
    model.apply(progressed(10, "t2"))
    assert row.state is State.RUNNING
    model.apply(TransferCompleted("t2", "a.txt", "peer-2", 2048, 1.0))
    assert row.state is State.DONE and row.fraction == 1.0
    model.apply(progressed(20, "t2"))  # a late report changes nothing
    assert row.state is State.DONE
    failed = model.apply(progressed(5, "t3"))
    assert failed is not None
    model.apply(
        TransferFailed("t3", "x", "peer-1", "cancelled by the sender", TransferOutcome.CANCELLED)
    )
    assert failed.state is State.CANCELLED
    assert not failed.can_resume  # a receive: the sender resumes
    model.clear_finished()
    assert model.rowCount(QModelIndex()) == 0


def test_a_send_started_here_claims_its_transfer_id(qtbot: Any) -> None:
    model = TransferTableModel()
    row = model.add_send(["/tmp/x/report.pdf"], "peer-1", "desk")
    assert row.transfer_id is None and row.name == "report.pdf"
    model.apply(progressed(100, "t9", direction="send"))
    assert row.transfer_id == "t9" and model.rowCount(QModelIndex()) == 1
    model.happen(row, "failed", error="cut off")
    assert row.can_resume
    assert model.happen(row, "restarted") and row.state is State.STARTING and row.done == 0


def _state_text(model: TransferTableModel, row: int = 0) -> str:
    text = model.data(model.index(row, Column.STATE))
    assert isinstance(text, str)
    return text


def test_a_declined_offer_reads_declined_not_failed(qtbot: Any) -> None:
    model = TransferTableModel()
    offer = TransferOffered("t4", "peer-2", "laptop", ("a.txt",), 1, 10, False)
    row = model.apply(offer)
    assert row is not None
    reason = "declined: no answer within 90 s"
    model.apply(TransferFailed("t4", "a.txt", "peer-2", reason, TransferOutcome.DECLINED))
    assert row.state is State.DECLINED and not row.can_cancel
    assert _state_text(model) == "Declined"
    assert model.data(model.index(0, Column.STATE), Qt.ItemDataRole.ToolTipRole) == reason


def test_an_interrupted_receive_reads_will_resume(qtbot: Any) -> None:
    model = TransferTableModel()
    row = model.apply(progressed(5, "t5"))
    assert row is not None
    reason = "interrupted: this device stopped; the sender resumes when it is back"
    model.apply(TransferFailed("t5", "movie.mkv", "peer-1", reason, TransferOutcome.INTERRUPTED))
    assert row.state is State.INTERRUPTED and not row.can_cancel
    assert _state_text(model) == "Interrupted (will resume)"
    model.clear_finished()
    assert model.rowCount(QModelIndex()) == 0


def test_a_failure_is_told_by_its_outcome_not_its_words(qtbot: Any) -> None:
    model = TransferTableModel()
    row = model.apply(progressed(5, "t6"))
    assert row is not None
    model.apply(TransferFailed("t6", "x", "peer-1", "cannot write cancelled.txt"))
    assert row.state is State.FAILED
    assert _state_text(model) == "Failed: cannot write cancelled.txt"


def test_a_send_whose_receiver_went_away_waits_for_it_by_name(qtbot: Any) -> None:
    model = TransferTableModel()
    row = model.add_send(["/tmp/x/report.pdf"], "peer-1", "peer-1")
    model.apply(progressed(100, "t7", direction="send"))
    waiting = model.apply(TransferWaiting("t7", "peer-1", "desk"))
    assert waiting is row and row.state is State.PEER_AWAY and row.can_cancel
    assert _state_text(model) == "Waiting for desk to come back"
    model.apply(progressed(200, "t7", direction="send"))  # it came back: the send goes on
    assert row.state is State.RUNNING
    model.apply(TransferWaiting("t7", "peer-1", "desk"))
    model.happen(row, "failed", error="gave up: the receiver stayed unreachable")
    assert row.state is State.FAILED and row.can_resume


def test_a_send_that_waits_before_its_first_progress_claims_its_row(qtbot: Any) -> None:
    model = TransferTableModel()
    row = model.add_send(["/tmp/x/report.pdf"], "peer-1", "peer-1")
    assert model.apply(TransferWaiting("t8", "peer-1", "desk")) is row
    assert row.transfer_id == "t8" and model.rowCount(QModelIndex()) == 1
    assert _state_text(model) == "Waiting for desk to come back"
