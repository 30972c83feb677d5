"""The Tunnels window (issue 16): what this device exposes, the forwards it runs, the connections
peers hold through it, what peers announce to it, and the shells opened on it; Stop for each.

Rows come from the agent's ``tunnel.list`` (:meth:`TunnelService.listing`, the same answer
``meshagent tunnel list`` prints) and the terminal sessions this device hosts (a
``meshagent terminal open`` from another of your devices is one of them, as the terminal
share's host window shows its viewers). Stop is ``tunnel.stop`` (:meth:`TunnelService.stop`) or
the session's own stop. The window polls once a second while it is shown: tunnels change with
every connection, and a connection's byte counts are not events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QHideEvent, QShowEvent
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from meshagent_gui.core.agent import Agent
from meshagent_gui.units import human_size, plural

from .bridge import AgentBridge

REFRESH_MS: Final = 1000
SHELL_PREFIX: Final = "shell:"
COLUMNS: Final = ("What", "Device", "Target", "Details", "")

KIND_TEXT: Final = {
    "exposed": "Exposed here",
    "forward": "Forward",
    "served": "Connection in",
    "available": "Offered to you",
    "shell": "Shell here",
}
EMPTY_TEXT: Final = (
    "No tunnels. Expose a port of this device with `meshagent expose PORT`; reach one of "
    "another device with `meshagent forward LOCAL DEVICE:PORT`."
)


@dataclass(frozen=True)
class TunnelRow:
    """One line of the window; ``stop_id`` empty: nothing here to stop (a peer's offer)."""

    kind: str
    device: str
    target: str
    details: str
    stop_id: str


def tunnel_rows(agent: Agent) -> list[TunnelRow]:
    """Everything the window lists, in the agent's order, shells last."""
    rows: list[TunnelRow] = []
    for info in agent.tunnels.listing():
        if info.kind in ("forward", "served"):
            details = (
                f"{plural(info.connections, 'connection')}, "
                f"{human_size(info.bytes_sent)} out, {human_size(info.bytes_received)} in"
            )
            if info.listen:
                details = f"on {info.listen}; {details}"
        else:
            details = f"for {info.audience}" if info.audience else ""
        rows.append(
            TunnelRow(info.kind, info.device or "this device", info.target, details, info.id)
        )
    for session_id, shared in agent.terminals.shared.items():
        rows.append(
            TunnelRow(
                "shell",
                "this device",
                shared.title,
                plural(len(shared.host.viewers), "viewer"),
                f"{SHELL_PREFIX}{session_id}",
            )
        )
    return rows


class TunnelsWindow(QWidget):
    """The list and a Stop button per row; it reads the bridge's agent, owns no task."""

    def __init__(self, bridge: AgentBridge, parent: QWidget | None = None) -> None:
        super().__init__(parent, Qt.WindowType.Window)
        self.bridge = bridge
        self.rows: list[TunnelRow] = []
        self.setWindowTitle("Tunnels — Mesh Agent")
        self.resize(760, 360)
        layout = QVBoxLayout(self)
        self.empty = QLabel(EMPTY_TEXT)
        self.empty.setWordWrap(True)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.verticalHeader().hide()
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(3, QHeaderView.ResizeMode.Stretch)
        layout.addWidget(self.empty)
        layout.addWidget(self.table)
        self._timer = QTimer(self)
        self._timer.setInterval(REFRESH_MS)
        self._timer.timeout.connect(self.refresh)

    def showEvent(self, event: QShowEvent) -> None:
        self.refresh()
        self._timer.start()
        super().showEvent(event)

    def hideEvent(self, event: QHideEvent) -> None:
        self._timer.stop()
        super().hideEvent(event)

    def refresh(self) -> None:
        agent = self.bridge.agent
        rows = tunnel_rows(agent) if agent is not None else []
        self.empty.setVisible(not rows)
        self.table.setVisible(bool(rows))
        if rows == self.rows:
            return
        self.rows = rows
        self.table.setRowCount(len(rows))
        for number, row in enumerate(rows):
            texts = (KIND_TEXT.get(row.kind, row.kind), row.device, row.target, row.details)
            for column, text in enumerate(texts):
                self.table.setItem(number, column, QTableWidgetItem(text))
            if row.stop_id:
                button = QPushButton("Stop")
                button.setToolTip(_stop_tip(row.kind))
                button.clicked.connect(lambda _=False, row=row: self.stop(row))
                self.table.setCellWidget(number, len(COLUMNS) - 1, button)
            else:
                self.table.removeCellWidget(number, len(COLUMNS) - 1)

    def stop(self, row: TunnelRow) -> None:
        agent = self.bridge.agent
        if agent is None:
            return
        if row.stop_id.startswith(SHELL_PREFIX):
            shared = agent.terminals.shared.get(row.stop_id.removeprefix(SHELL_PREFIX))
            if shared is not None:
                shared.stop()
            return
        task = self.bridge.spawn(agent.tunnels.stop(row.stop_id), "tunnel-stop")
        task.add_done_callback(lambda _: self.refresh())


def _stop_tip(kind: str) -> str:
    return {
        "exposed": "Stop exposing it (peers can no longer reach it)",
        "forward": "Stop the forward and its connections",
        "served": "Reset this connection",
        "shell": "End the shell (its viewers see it end)",
    }.get(kind, "Stop")
