"""The device list: who this device may reach, online or not, over a direct or relayed path.

Dropping files or folders on a device sends them to it (``files_dropped``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from PySide6.QtCore import (
    QAbstractListModel,
    QModelIndex,
    QObject,
    QPersistentModelIndex,
    QPoint,
    QRect,
    QSize,
    Qt,
    Signal,
)
from PySide6.QtGui import QColor, QDragEnterEvent, QDragMoveEvent, QDropEvent, QFont, QPainter
from PySide6.QtWidgets import (
    QAbstractItemView,
    QListView,
    QStyle,
    QStyledItemDelegate,
    QStyleOptionViewItem,
    QWidget,
)

AnyIndex = QModelIndex | QPersistentModelIndex
DeviceRole: Final = int(Qt.ItemDataRole.UserRole) + 1

_PLATFORM_LABELS: Final = {
    "linux": "Linux",
    "windows": "Windows",
    "darwin": "macOS",
    "browser": "web browser",
}
BROWSER: Final = "browser"  # a web page of the user's (docs/server-api.md, "Browsers")


@dataclass(frozen=True)
class DeviceEntry:
    id: str
    name: str
    user: str
    platform: str
    online: bool
    path: str  # "direct", "relay" or "" (no P2P connection yet)

    @property
    def is_browser(self) -> bool:
        return self.platform == BROWSER

    @property
    def label(self) -> str:
        """The name as lists show it: a browser says so (it takes files, hosts no terminal)."""
        return f"{self.name} (browser)" if self.is_browser else self.name

    @property
    def subtitle(self) -> str:
        parts = ["online" if self.online else "offline"]
        if self.online and self.path in ("direct", "relay"):
            parts.append(self.path)
        parts.append(_PLATFORM_LABELS.get(self.platform, self.platform or "unknown"))
        parts.append(self.user)
        return " · ".join(parts)


class DeviceListModel(QAbstractListModel):
    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._devices: list[DeviceEntry] = []

    def rowCount(self, parent: AnyIndex = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self._devices)

    def data(self, index: AnyIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        device = self._devices[index.row()]
        if role == Qt.ItemDataRole.DisplayRole:
            return device.label
        if role == Qt.ItemDataRole.ToolTipRole:
            return f"{device.label}\n{device.subtitle}\n{device.id}"
        if role == DeviceRole:
            return device
        return None

    def devices(self) -> list[DeviceEntry]:
        return list(self._devices)

    def set_devices(self, devices: list[DeviceEntry]) -> None:
        ordered = sorted(devices, key=lambda d: (not d.online, d.name.lower(), d.id))
        if [d.id for d in ordered] == [d.id for d in self._devices]:
            changed = [
                n for n, (a, b) in enumerate(zip(ordered, self._devices, strict=True)) if a != b
            ]
            self._devices = ordered
            for row in changed:
                self.dataChanged.emit(self.index(row), self.index(row))
            return
        self.beginResetModel()
        self._devices = ordered
        self.endResetModel()

    def names(self) -> dict[str, str]:
        return {d.id: d.name for d in self._devices}


class DeviceDelegate(QStyledItemDelegate):
    """Two lines per device: the name with a presence dot, then path, platform and owner."""

    def paint(self, painter: QPainter, option: QStyleOptionViewItem, index: AnyIndex) -> None:
        device: DeviceEntry = index.data(DeviceRole)
        painter.save()
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        rect = QRect(option.rect).adjusted(4, 2, -4, -2)
        selected = bool(option.state & QStyle.StateFlag.State_Selected)
        hovered = bool(option.state & QStyle.StateFlag.State_MouseOver)
        if selected or hovered:
            colour = option.palette.highlight().color()
            if not selected:
                colour.setAlpha(40)
            painter.setPen(Qt.PenStyle.NoPen)
            painter.setBrush(colour)
            painter.drawRoundedRect(rect, 8, 8)
        dot = QColor("#2ecc71") if device.online else QColor("#b0b7c0")
        painter.setPen(Qt.PenStyle.NoPen)
        painter.setBrush(dot)
        painter.drawEllipse(QPoint(rect.left() + 16, rect.center().y()), 6, 6)
        text = option.palette.highlightedText() if selected else option.palette.text()
        name_font = QFont(option.font)
        name_font.setBold(True)
        painter.setFont(name_font)
        painter.setPen(text.color())
        top = QRect(rect.left() + 32, rect.top() + 6, rect.width() - 40, rect.height() // 2 - 4)
        painter.drawText(
            top, Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter, device.label
        )
        sub_font = QFont(option.font)
        sub_font.setPointSizeF(max(7.0, option.font.pointSizeF() * 0.88))
        painter.setFont(sub_font)
        sub_colour = QColor(text.color())
        sub_colour.setAlpha(170)
        painter.setPen(sub_colour)
        bottom = QRect(top.left(), rect.center().y() + 1, top.width(), rect.height() // 2 - 6)
        painter.drawText(
            bottom, Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter, device.subtitle
        )
        painter.restore()

    def sizeHint(self, option: QStyleOptionViewItem, index: AnyIndex) -> QSize:
        return QSize(220, max(52, option.fontMetrics.height() * 3 + 8))


def local_paths(event: QDropEvent | QDragEnterEvent | QDragMoveEvent) -> list[str]:
    """The local files and folders a drag carries (remote URLs are not ours to send)."""
    mime = event.mimeData()
    if mime is None or not mime.hasUrls():
        return []
    return [url.toLocalFile() for url in mime.urls() if url.isLocalFile() and url.toLocalFile()]


class DeviceListView(QListView):
    """The device list; files dropped on a row go to that device."""

    files_dropped = Signal(list, str)  # paths, device id

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setItemDelegate(DeviceDelegate(self))
        self.setAcceptDrops(True)
        self.setDragDropMode(QAbstractItemView.DragDropMode.DropOnly)
        self.setDropIndicatorShown(True)
        self.setMouseTracking(True)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.setUniformItemSizes(True)
        self.setSpacing(2)

    def device_at(self, position: QPoint) -> DeviceEntry | None:
        index = self.indexAt(position)
        return index.data(DeviceRole) if index.isValid() else None

    def selected_device(self) -> DeviceEntry | None:
        indexes = self.selectedIndexes()
        return indexes[0].data(DeviceRole) if indexes else None

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if local_paths(event):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dragMoveEvent(self, event: QDragMoveEvent) -> None:
        device = self.device_at(event.position().toPoint())
        if local_paths(event) and device is not None:
            self.setCurrentIndex(self.indexAt(event.position().toPoint()))
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event: QDropEvent) -> None:
        device = self.device_at(event.position().toPoint())
        paths = local_paths(event)
        if device is None or not paths:
            event.ignore()
            return
        event.acceptProposedAction()
        self.files_dropped.emit(paths, device.id)
