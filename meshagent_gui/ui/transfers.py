"""The transfer list: a table model fed by core events at full speed, and its progress delegate;
and the history window of finished transfers.

Progress arrives once per verified chunk (hundreds per second on a fast link). The model keeps
the newest figures per row and tells the views about them at most every ``flush_interval``
seconds, for the changed cells only; an idle list runs no timer at all.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from PySide6.QtCore import (
    QAbstractTableModel,
    QModelIndex,
    QObject,
    QPersistentModelIndex,
    QRect,
    QSize,
    Qt,
    QTimer,
    QUrl,
)
from PySide6.QtGui import QColor, QDesktopServices, QPainter, QPalette, QPen
from PySide6.QtWidgets import (
    QAbstractItemView,
    QDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QStyle,
    QStyledItemDelegate,
    QStyleOptionViewItem,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from meshagent_gui.core.events import (
    TransferAccepted,
    TransferCompleted,
    TransferFailed,
    TransferOffered,
    TransferOutcome,
    TransferProgressed,
    TransferWaiting,
)
from meshagent_gui.core.ipc_types import TransferInfo
from meshagent_gui.units import human_size

AnyIndex = QModelIndex | QPersistentModelIndex


class State(enum.Enum):
    STARTING = "Starting"
    WAITING = "Waiting for answer"
    ASKING = "Needs your answer"
    RUNNING = "Transferring"
    DONE = "Done"
    FAILED = "Failed"
    CANCELLED = "Cancelled"
    DECLINED = "Declined"
    INTERRUPTED = "Interrupted (will resume)"
    PEER_AWAY = "Waiting for the device to come back"  # shown with the device's name


_UNDER_WAY: Final = (State.STARTING, State.WAITING, State.ASKING, State.RUNNING, State.PEER_AWAY)

# What each happening does to a row, as data: (state, happening) -> new state. A happening not in
# the table leaves the row alone (a late progress report after a cancel, a duplicate end).
TRANSITIONS: Final[dict[tuple[State, str], State]] = {
    **{(s, "offered"): State.ASKING for s in (State.STARTING, State.WAITING)},
    **{(s, "offered_auto"): State.RUNNING for s in (State.STARTING, State.WAITING)},
    **{(s, "accepted"): State.RUNNING for s in (State.STARTING, State.WAITING, State.ASKING)},
    **{(s, "progressed"): State.RUNNING for s in _UNDER_WAY},
    **{(s, "peer_away"): State.PEER_AWAY for s in (State.STARTING, State.WAITING, State.RUNNING)},
    **{(s, "completed"): State.DONE for s in _UNDER_WAY},
    **{(s, "failed"): State.FAILED for s in _UNDER_WAY},
    **{(s, "cancelled"): State.CANCELLED for s in _UNDER_WAY},
    **{(s, "interrupted"): State.INTERRUPTED for s in _UNDER_WAY},
    **{(s, "declined"): State.DECLINED for s in (State.STARTING, State.WAITING, State.ASKING)},
    **{(s, "restarted"): State.STARTING for s in (State.FAILED, State.CANCELLED)},
}
FINISHED: Final = frozenset(
    {State.DONE, State.FAILED, State.CANCELLED, State.DECLINED, State.INTERRUPTED}
)
# How a TransferFailed ends a row, by the outcome the core set where it published it.
_ENDINGS: Final = {
    TransferOutcome.FAILED: "failed",
    TransferOutcome.CANCELLED: "cancelled",
    TransferOutcome.DECLINED: "declined",
    TransferOutcome.INTERRUPTED: "interrupted",
}


class Column(enum.IntEnum):
    NAME = 0
    PEER = 1
    SIZE = 2
    PROGRESS = 3
    SPEED = 4
    ETA = 5
    STATE = 6


HEADERS: Final = ("Name", "Device", "Size", "Progress", "Speed", "ETA", "State")
ProgressRole: Final = int(Qt.ItemDataRole.UserRole) + 1
RowRole: Final = int(Qt.ItemDataRole.UserRole) + 2


@dataclass
class TransferRow:
    key: str
    direction: str  # "send" or "receive"
    name: str
    peer_id: str
    peer_name: str
    total: int = 0
    done: int = 0
    rate: float = 0.0
    eta: float | None = None
    state: State = State.STARTING
    error: str = ""
    transfer_id: str | None = None
    paths: tuple[str, ...] = ()  # what a resume sends again (sends only)
    link: bool = False  # sent to whoever opens a one-time share link (never resumed)
    started: float = field(default_factory=time.monotonic)

    @property
    def fraction(self) -> float:
        if self.state is State.DONE:
            return 1.0
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0

    @property
    def can_cancel(self) -> bool:
        return self.state not in FINISHED

    @property
    def can_resume(self) -> bool:
        # The sender resumes; a receiver keeps its partials and waits for the sender to retry.
        return self.direction == "send" and self.state in (State.FAILED, State.CANCELLED)


def format_eta(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return ""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class TransferTableModel(QAbstractTableModel):
    """Rows by key (a transfer id once known); coalesced repaints of the changed cells."""

    def __init__(self, parent: QObject | None = None, *, flush_interval: float = 0.1) -> None:
        super().__init__(parent)
        self._rows: list[TransferRow] = []
        self._by_transfer: dict[str, TransferRow] = {}
        self._dirty: dict[str, tuple[int, int]] = {}  # key -> (first column, last column)
        self._keys = itertools.count(1)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(round(flush_interval * 1000))
        self._timer.timeout.connect(self.flush)
        self.flushes = 0  # how often views were told (the benchmark counts them)

    # ------------------------------------------------------------ Qt model API

    def rowCount(self, parent: AnyIndex = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self._rows)

    def columnCount(self, parent: AnyIndex = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(HEADERS)

    def headerData(
        self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole
    ) -> Any:
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return HEADERS[section]
        return None

    def data(self, index: AnyIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        row = self._rows[index.row()]
        column = Column(index.column())
        if role == RowRole:
            return row
        if role == ProgressRole:
            return row.fraction
        if role == Qt.ItemDataRole.DisplayRole:
            return self._text(row, column)
        if role == Qt.ItemDataRole.ToolTipRole:
            if column is Column.STATE:  # whole, however narrow the column
                return self.state_text(row)
            if column is Column.NAME:
                arrow = "to" if row.direction == "send" else "from"
                return f"{row.name} {arrow} {row.peer_name}"
        if role == Qt.ItemDataRole.ForegroundRole and column is Column.STATE:
            return _STATE_COLOURS.get(row.state)
        if role == Qt.ItemDataRole.TextAlignmentRole and column in (
            Column.SIZE,
            Column.SPEED,
            Column.ETA,
        ):
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None

    @staticmethod
    def _text(row: TransferRow, column: Column) -> str:
        running = row.state is State.RUNNING
        match column:
            case Column.NAME:
                return ("↑ " if row.direction == "send" else "↓ ") + row.name
            case Column.PEER:
                return row.peer_name
            case Column.SIZE:
                return human_size(row.total) if row.total else ""
            case Column.PROGRESS:
                return f"{row.fraction * 100:.0f} %"
            case Column.SPEED:
                return f"{human_size(round(row.rate))}/s" if running and row.rate > 0 else ""
            case Column.ETA:
                return format_eta(row.eta) if running else ""
            case Column.STATE:
                if row.state in (State.DECLINED, State.INTERRUPTED):
                    return str(row.state.value)  # says it all; the reason is in the tooltip
                return TransferTableModel.state_text(row)
        raise AssertionError(column)  # pragma: no cover

    @staticmethod
    def state_text(row: TransferRow) -> str:
        """The row's state with its reason, whole (the tooltip, the window's detail line)."""
        if row.state is State.PEER_AWAY:
            return f"Waiting for {row.peer_name} to come back"
        if row.state in (State.DECLINED, State.INTERRUPTED):
            return row.error or str(row.state.value)  # the reason says it ("declined: ...")
        return f"{row.state.value}: {row.error}" if row.error else str(row.state.value)

    # ------------------------------------------------------------ rows

    def rows(self) -> list[TransferRow]:
        return list(self._rows)

    def row_at(self, index: int) -> TransferRow:
        return self._rows[index]

    def find(self, transfer_id: str) -> TransferRow | None:
        return self._by_transfer.get(transfer_id)

    def add(self, row: TransferRow) -> TransferRow:
        position = len(self._rows)
        self.beginInsertRows(QModelIndex(), position, position)
        self._rows.append(row)
        if row.transfer_id:
            self._by_transfer[row.transfer_id] = row
        self.endInsertRows()
        return row

    def add_send(
        self, paths: list[str], peer_id: str, peer_name: str, *, link: bool = False
    ) -> TransferRow:
        """A send the user started here (``link``: by a share link); its transfer id is learned
        from the first event."""
        names = [Path(p).name or p for p in paths]
        name = names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more"
        key = f"local-{next(self._keys)}"
        return self.add(
            TransferRow(key, "send", name, peer_id, peer_name, paths=tuple(paths), link=link)
        )

    def claim(self, row: TransferRow, transfer_id: str) -> None:
        row.transfer_id = transfer_id
        self._by_transfer[transfer_id] = row

    def unclaimed_send_to(self, peer_id: str) -> TransferRow | None:
        for row in self._rows:
            if (
                row.direction == "send"
                and row.transfer_id is None
                and row.peer_id == peer_id
                and row.state not in FINISHED
            ):
                return row
        return None

    def clear_finished(self) -> None:
        self.beginResetModel()
        self._rows = [r for r in self._rows if r.state not in FINISHED]
        self._by_transfer = {r.transfer_id: r for r in self._rows if r.transfer_id}
        self._dirty.clear()
        self.endResetModel()

    # ------------------------------------------------------------ changes

    def happen(self, row: TransferRow, happening: str, *, error: str = "") -> bool:
        """Apply ``happening`` through TRANSITIONS; False when it does not apply."""
        new = TRANSITIONS.get((row.state, happening))
        if new is None:
            return False
        row.state = new
        row.error = error
        if new is State.DONE:
            row.done = row.total
        if happening == "restarted":
            row.done, row.rate, row.eta, row.transfer_id = 0, 0.0, None, None
        self._changed(row, Column.NAME, Column.STATE, now=True)
        return True

    def progress(
        self, row: TransferRow, done: int, total: int, rate: float, eta: float | None
    ) -> None:
        first, last = Column.PROGRESS, Column.ETA
        if total != row.total:
            first = Column.SIZE
        if row.state is not State.RUNNING:
            last = Column.STATE
            new = TRANSITIONS.get((row.state, "progressed"))
            if new is None:
                return
            row.state = new
        row.done, row.total, row.rate, row.eta = done, total, rate, eta
        self._changed(row, first, last)

    def apply(self, event: object) -> TransferRow | None:
        """Fold one core event into the rows; the row it touched, if any."""
        match event:
            case TransferProgressed():
                row = self._row_for(event.transfer_id, event.direction, event.peer, event.name)
                if row.name == "" and event.name:
                    row.name = event.name
                self.progress(row, event.done, event.total, event.rate, event.eta)
                return row
            case TransferOffered():
                row = self._row_for(event.transfer_id, "receive", event.peer, _offer_title(event))
                row.peer_name, row.total = event.peer_name, event.total
                self.happen(row, "offered_auto" if event.auto_accepted else "offered")
                return row
            case TransferAccepted():
                found = self.find(event.transfer_id)
                if found is not None:
                    self.happen(found, "accepted")
                return found
            case TransferCompleted():
                found = self.find(event.transfer_id)
                if found is not None:
                    self.happen(found, "completed")
                return found
            case TransferFailed():
                found = self.find(event.transfer_id)
                if found is not None:
                    self.happen(found, _ENDINGS[event.outcome], error=event.reason)
                return found
            case TransferWaiting():  # only sends wait, perhaps before their first progress
                row = self._row_for(event.transfer_id, "send", event.peer, "")
                if event.peer_name:
                    row.peer_name = event.peer_name
                self.happen(row, "peer_away")
                return row
        return None

    def _row_for(self, transfer_id: str, direction: str, peer: str, name: str) -> TransferRow:
        row = self.find(transfer_id)
        if row is not None:
            return row
        if direction == "send" and (pending := self.unclaimed_send_to(peer)) is not None:
            self.claim(pending, transfer_id)
            return pending
        # A transfer this window did not start: a receive, or a send asked for over IPC.
        row = TransferRow(
            f"t-{transfer_id}", direction, name, peer, peer[:12], transfer_id=transfer_id
        )
        return self.add(row)

    def set_peer_names(self, names: dict[str, str]) -> None:
        for position, row in enumerate(self._rows):
            name = names.get(row.peer_id)
            if name and name != row.peer_name:
                row.peer_name = name
                self.dataChanged.emit(
                    self.index(position, Column.PEER), self.index(position, Column.PEER)
                )

    def _changed(self, row: TransferRow, first: Column, last: Column, *, now: bool = False) -> None:
        old = self._dirty.get(row.key)
        span = (first, last) if old is None else (min(old[0], first), max(old[1], last))
        self._dirty[row.key] = span
        if now:
            self.flush()
        elif not self._timer.isActive():
            self._timer.start()

    def flush(self) -> None:
        """Tell the views about every changed row, once each."""
        self._timer.stop()
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, {}
        self.flushes += 1
        positions = {row.key: n for n, row in enumerate(self._rows)}
        for key, (first, last) in dirty.items():
            position = positions.get(key)
            if position is not None:
                self.dataChanged.emit(self.index(position, first), self.index(position, last))


def _offer_title(event: TransferOffered) -> str:
    if not event.names:
        return f"{event.files} files"
    first = event.names[0]
    return first if len(event.names) == 1 else f"{first} and {len(event.names) - 1} more"


_STATE_COLOURS: Final = {
    State.DONE: QColor("#2e7d32"),
    State.FAILED: QColor("#c62828"),
    State.DECLINED: QColor("#c62828"),
    State.CANCELLED: QColor("#757575"),
    State.ASKING: QColor("#e65100"),
}


# Widest text each narrow column shows; the column is sized to it in the view's font.
_SAMPLES: Final = {
    Column.PEER: "laptop-ann",
    Column.SIZE: "999.9 MB",
    Column.SPEED: "99.9 MB/s",
    Column.ETA: "59 min 59 s",
    Column.STATE: "Waiting for answer",
}
NAME_MINIMUM: Final = 180  # px: "↓ holiday-photos-2024.zip" readable at the default size
PROGRESS_WIDTH: Final = 96


def fit_transfer_columns(table: QTableView) -> None:
    """Name takes the spare width; the other columns are as wide as their usual text (and may
    be dragged wider); long names and reasons elide in the middle, whole in the tooltip."""
    header = table.horizontalHeader()
    header.setStretchLastSection(False)
    header.setMinimumSectionSize(48)
    header.setSectionResizeMode(Column.NAME, QHeaderView.ResizeMode.Stretch)
    table.setTextElideMode(Qt.TextElideMode.ElideMiddle)
    metrics = table.fontMetrics()
    bold = header.fontMetrics()
    padding = 24  # the cell's margins and the header's padding
    for column in Column:
        if column is Column.NAME:
            continue
        header.setSectionResizeMode(column, QHeaderView.ResizeMode.Interactive)
        sample = _SAMPLES.get(column, "")
        text = metrics.horizontalAdvance(sample) if sample else PROGRESS_WIDTH - padding
        heading = bold.horizontalAdvance(HEADERS[column]) + 8
        table.setColumnWidth(column, max(text, heading) + padding)


_GROOVE: Final = QColor("#dfe5ea")  # the unfilled part: visible on white and selected rows
_GROOVE_EDGE: Final = QColor("#b9c3cc")


class ProgressDelegate(QStyledItemDelegate):
    """A rounded progress bar with the percentage, drawn (no widget per row)."""

    def paint(self, painter: QPainter, option: QStyleOptionViewItem, index: AnyIndex) -> None:
        if index.column() != Column.PROGRESS:
            super().paint(painter, option, index)
            return
        fraction = float(index.data(ProgressRole) or 0.0)
        row: TransferRow = index.data(RowRole)
        if option.state & QStyle.StateFlag.State_Selected:
            painter.fillRect(option.rect, option.palette.highlight())
        bar = QRect(option.rect).adjusted(6, 0, -6, 0)
        height = min(14, bar.height() - 8)
        bar.setTop(option.rect.center().y() - height // 2)
        bar.setHeight(height)
        painter.save()
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.setPen(QPen(_GROOVE_EDGE, 1))
        painter.setBrush(_GROOVE)
        painter.drawRoundedRect(bar, height / 2, height / 2)
        painter.setPen(Qt.PenStyle.NoPen)
        if fraction > 0:
            filled = QRect(bar)
            filled.setWidth(max(height, round(bar.width() * fraction)))
            colour = {
                State.DONE: QColor("#2e7d32"),
                State.FAILED: QColor("#c62828"),
                State.CANCELLED: QColor("#9e9e9e"),
            }.get(row.state, QColor("#2a9d8f"))
            painter.setBrush(colour)
            painter.drawRoundedRect(filled, height / 2, height / 2)
        painter.setPen(option.palette.color(QPalette.ColorRole.Text))
        font = painter.font()
        font.setPointSizeF(max(7.0, font.pointSizeF() * 0.85))
        painter.setFont(font)
        text_rect = QRect(bar)
        painter.drawText(text_rect, Qt.AlignmentFlag.AlignCenter, f"{fraction * 100:.0f} %")
        painter.restore()

    def sizeHint(self, option: QStyleOptionViewItem, index: AnyIndex) -> QSize:
        hint = super().sizeHint(option, index)
        if index.column() == Column.PROGRESS:
            hint.setWidth(max(hint.width(), PROGRESS_WIDTH))
        return hint


# ------------------------------------------------------------ history


class HistoryColumn(enum.IntEnum):
    WHEN = 0
    NAME = 1
    PEER = 2
    SIZE = 3
    RESULT = 4
    WHERE = 5


HISTORY_HEADERS: Final = ("When", "Name", "Device", "Size", "Result", "Where")
_RESULT_COLOURS: Final = {
    "completed": QColor("#2e7d32"),
    "failed": QColor("#c62828"),
    "declined": QColor("#c62828"),
    "cancelled": QColor("#757575"),
    "interrupted": QColor("#757575"),
}


def format_when(seconds: float, now: float | None = None) -> str:
    """A finish time as a person reads a list: the time today, else the date and time."""
    moment = time.localtime(seconds)
    today = time.localtime(now if now is not None else time.time())
    if moment[:3] == today[:3]:
        return time.strftime("%H:%M", moment)
    return time.strftime("%Y-%m-%d %H:%M", moment)


class HistoryTableModel(QAbstractTableModel):
    """Finished transfers (core/share/history.py, `meshagent transfers --all`), newest first."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._records: list[TransferInfo] = []

    def set_records(self, records: list[TransferInfo]) -> None:
        self.beginResetModel()
        self._records = sorted(records, key=lambda r: r.ended or r.started, reverse=True)
        self.endResetModel()

    def record_at(self, row: int) -> TransferInfo:
        return self._records[row]

    def rowCount(self, parent: AnyIndex = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self._records)

    def columnCount(self, parent: AnyIndex = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(HistoryColumn)

    def headerData(
        self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole
    ) -> Any:
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return HISTORY_HEADERS[section]
        return None

    def data(self, index: AnyIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        record = self._records[index.row()]
        column = HistoryColumn(index.column())
        if role == Qt.ItemDataRole.DisplayRole:
            return self._text(record, column)
        if role == Qt.ItemDataRole.ToolTipRole:
            if column is HistoryColumn.RESULT:
                return self.result_text(record)
            if column is HistoryColumn.NAME:
                return "\n".join(record.names) or record.name
            if column is HistoryColumn.WHERE:
                return record.where
        if role == Qt.ItemDataRole.ForegroundRole and column is HistoryColumn.RESULT:
            return _RESULT_COLOURS.get(record.state)
        if role == Qt.ItemDataRole.TextAlignmentRole and column is HistoryColumn.SIZE:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None

    @staticmethod
    def result_text(record: TransferInfo) -> str:
        return f"{record.state}: {record.reason}" if record.reason else record.state

    @staticmethod
    def _text(record: TransferInfo, column: HistoryColumn) -> str:
        match column:
            case HistoryColumn.WHEN:
                return format_when(record.ended or record.started)
            case HistoryColumn.NAME:
                arrow = "↑ " if record.direction == "send" else "↓ "
                names = record.names or [record.name]
                more = f" and {len(names) - 1} more" if len(names) > 1 else ""
                return arrow + names[0] + more
            case HistoryColumn.PEER:
                return record.peer_name or record.peer[:12]
            case HistoryColumn.SIZE:
                return human_size(record.total) if record.total else ""
            case HistoryColumn.RESULT:
                return record.state  # the reason is in the tooltip and the detail line
            case HistoryColumn.WHERE:
                return record.where
        raise AssertionError(column)  # pragma: no cover


LoadHistory = Callable[[], Awaitable[list[TransferInfo]]]


class HistoryWindow(QDialog):
    """Past transfers, either direction (what `meshagent transfers --all` lists); not modal.

    ``load`` reads the history off the loop; ``spawn`` runs it as a task the app owns."""

    def __init__(
        self,
        load: LoadHistory,
        spawn: Callable[[Coroutine[Any, Any, None], str], object],
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self._load = load
        self._spawn = spawn
        self.setWindowTitle("Transfer history")
        self.setObjectName("history")
        self.resize(900, 480)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(16, 14, 16, 12)
        self.model = HistoryTableModel(self)
        self.table = QTableView()
        self.table.setModel(self.model)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setShowGrid(False)
        self.table.setWordWrap(False)
        self.table.verticalHeader().hide()
        self.table.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        header = self.table.horizontalHeader()
        metrics = self.table.fontMetrics()
        for column, sample in (
            (HistoryColumn.WHEN, "2026-12-31 23:59"),
            (HistoryColumn.PEER, "laptop-ann"),
            (HistoryColumn.SIZE, "999.9 MB"),
            (HistoryColumn.RESULT, "interrupted"),
        ):
            header.resizeSection(column, metrics.horizontalAdvance(sample) + 24)
        header.resizeSection(HistoryColumn.NAME, 240)
        header.setStretchLastSection(True)
        self.table.selectionModel().selectionChanged.connect(self._selected)
        self.empty = QLabel("No finished transfers yet: sends and receives are listed here.")
        self.empty.setObjectName("subtitle")
        self.detail = QLabel()
        self.detail.setWordWrap(True)
        self.detail.setTextFormat(Qt.TextFormat.PlainText)
        self.detail.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        buttons = QHBoxLayout()
        self.open_button = QPushButton("Open folder")
        self.open_button.clicked.connect(self._open_selected)
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.clicked.connect(self.refresh)
        close = QPushButton("Close")
        close.clicked.connect(self.close)
        buttons.addWidget(self.open_button)
        buttons.addStretch(1)
        buttons.addWidget(self.refresh_button)
        buttons.addWidget(close)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.empty)
        layout.addWidget(self.detail)
        layout.addLayout(buttons)
        self._selected()

    def refresh(self) -> None:
        self._spawn(self.reload(), "ui-history")

    async def reload(self) -> None:
        self.model.set_records(await self._load())
        self.empty.setVisible(self.model.rowCount() == 0)
        self._selected()

    def selected(self) -> TransferInfo | None:
        rows = self.table.selectionModel().selectedRows()
        return self.model.record_at(rows[0].row()) if rows else None

    def folder_of(self, record: TransferInfo) -> Path | None:
        """Where a completed receive landed (its folder), if it is still there."""
        if record.direction != "receive" or record.state != "completed" or not record.where:
            return None
        where = Path(record.where)
        folder = where if where.is_dir() else where.parent
        return folder if folder.is_dir() else None

    def _selected(self) -> None:
        record = self.selected()
        self.open_button.setEnabled(record is not None and self.folder_of(record) is not None)
        if record is None:
            self.detail.clear()
            return
        arrow = "to" if record.direction == "send" else "from"
        names = ", ".join(record.names) or record.name
        text = f"{names} {arrow} {record.peer_name or record.peer[:12]}: "
        text += HistoryTableModel.result_text(record)
        if record.where:
            text += f" ({record.where})"
        self.detail.setText(text)

    def _open_selected(self) -> None:
        record = self.selected()
        folder = self.folder_of(record) if record is not None else None
        if folder is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder)))
