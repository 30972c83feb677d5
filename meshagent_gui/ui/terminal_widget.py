"""A terminal widget: the host's screen model painted with QPainter, keyboard to xterm bytes.

The emulator is :class:`~meshagent_gui.core.terminal.screen.Screen` (avt, UTF-8 decoding and the
input modes avt does not keep), the same one the host shares. Painting: each screen line is
drawn into a backing image only when avt reports it changed (:meth:`Screen.feed` returns the
changed line numbers), and changes are presented at most once per frame
(:data:`FRAME_INTERVAL_MS`, stretched when drawing is slow), so a ``cat`` flood costs one
redraw of the screen per frame rather than one per chunk. The cursor and the selection are drawn
over the backing image in ``paintEvent`` so that moving them repaints nothing else. Nothing
runs while the screen is idle: the cursor does not blink (an idle app polls nothing).

Characters are placed on the cell grid: the font's advance is snapped to a whole-pixel cell with
letter spacing, and characters the monospace font lacks (CJK from a fallback font, emoji) are
drawn one by one at their cell, wide ones spanning two cells as avt lays them out.

The widget never answers the program (avt ignores queries; the core has already removed them
from a shared stream) and emits input only while not :attr:`~TerminalWidget.read_only`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from PySide6.QtCore import QEvent, QPoint, QPointF, QRect, QSize, Qt, QTimer, Signal
from PySide6.QtGui import (
    QClipboard,
    QColor,
    QFocusEvent,
    QFont,
    QFontDatabase,
    QFontMetricsF,
    QGuiApplication,
    QImage,
    QInputMethodEvent,
    QKeyEvent,
    QKeySequence,
    QMouseEvent,
    QPainter,
    QPaintEvent,
    QResizeEvent,
)
from PySide6.QtWidgets import QLabel, QMainWindow, QToolBar, QWidget

from meshagent_gui.core.protocol.terminal import MAX_COLS, MAX_ROWS
from meshagent_gui.core.terminal.screen import Color, Line, Pen, Screen

FRAME_INTERVAL_MS: Final = 16
"""Changes are presented at most this often (about 60 frames per second)."""
MAX_FRAME_INTERVAL_MS: Final = 100
MARGIN: Final = 4
"""Pixels around the cell grid."""
DEFAULT_FONT_POINTS: Final = 11.0

# ---------------------------------------------------------------- colours

DEFAULT_FOREGROUND: Final = QColor("#d8dee9")
DEFAULT_BACKGROUND: Final = QColor("#1b1e26")
CURSOR_COLOR: Final = QColor("#e5c07b")
SELECTION_COLOR: Final = QColor(97, 175, 239, 110)

# The 16 ANSI colours (a One Dark-like palette), then xterm's 6x6x6 cube and grey ramp.
ANSI_COLORS: Final = (
    "#2c313c",
    "#e06c75",
    "#98c379",
    "#e5c07b",
    "#61afef",
    "#c678dd",
    "#56b6c2",
    "#c8ccd4",
    "#5c6370",
    "#ff7b86",
    "#b5e890",
    "#ffd68a",
    "#7cc5ff",
    "#de9bf2",
    "#6fd3df",
    "#ffffff",
)
_CUBE_LEVELS: Final = (0, 95, 135, 175, 215, 255)


def _xterm_palette() -> tuple[QColor, ...]:
    colors = [QColor(name) for name in ANSI_COLORS]
    colors += [
        QColor(_CUBE_LEVELS[r], _CUBE_LEVELS[g], _CUBE_LEVELS[b])
        for r in range(6)
        for g in range(6)
        for b in range(6)
    ]
    colors += [QColor(8 + 10 * step, 8 + 10 * step, 8 + 10 * step) for step in range(24)]
    return tuple(colors)


PALETTE: Final = _xterm_palette()
"""The 256 indexed colours."""

# ---------------------------------------------------------------- keyboard

_CSI: Final = b"\x1b["
_SS3: Final = b"\x1bO"
# Keys whose xterm sequence ends in a letter: CSI <letter> (SS3 in application cursor mode for
# arrows/Home/End, always SS3 for F1-F4), CSI 1;<mod><letter> with modifiers.
_LETTER_KEYS: Final[dict[int, tuple[bytes, bool]]] = {
    Qt.Key.Key_Up: (b"A", True),
    Qt.Key.Key_Down: (b"B", True),
    Qt.Key.Key_Right: (b"C", True),
    Qt.Key.Key_Left: (b"D", True),
    Qt.Key.Key_Home: (b"H", True),
    Qt.Key.Key_End: (b"F", True),
    Qt.Key.Key_F1: (b"P", False),
    Qt.Key.Key_F2: (b"Q", False),
    Qt.Key.Key_F3: (b"R", False),
    Qt.Key.Key_F4: (b"S", False),
}
# Keys sent as CSI <number> ~ (CSI <number>;<mod> ~ with modifiers).
_TILDE_KEYS: Final[dict[int, bytes]] = {
    Qt.Key.Key_Insert: b"2",
    Qt.Key.Key_Delete: b"3",
    Qt.Key.Key_PageUp: b"5",
    Qt.Key.Key_PageDown: b"6",
    Qt.Key.Key_F5: b"15",
    Qt.Key.Key_F6: b"17",
    Qt.Key.Key_F7: b"18",
    Qt.Key.Key_F8: b"19",
    Qt.Key.Key_F9: b"20",
    Qt.Key.Key_F10: b"21",
    Qt.Key.Key_F11: b"23",
    Qt.Key.Key_F12: b"24",
}
# Ctrl with punctuation, as xterm sends it (Ctrl+letter is the letter's code & 0x1f).
_CONTROL_PUNCTUATION: Final[dict[int, bytes]] = {
    Qt.Key.Key_Space: b"\x00",
    Qt.Key.Key_At: b"\x00",
    Qt.Key.Key_2: b"\x00",
    Qt.Key.Key_BracketLeft: b"\x1b",
    Qt.Key.Key_3: b"\x1b",
    Qt.Key.Key_Backslash: b"\x1c",
    Qt.Key.Key_4: b"\x1c",
    Qt.Key.Key_BracketRight: b"\x1d",
    Qt.Key.Key_5: b"\x1d",
    Qt.Key.Key_AsciiCircum: b"\x1e",
    Qt.Key.Key_6: b"\x1e",
    Qt.Key.Key_Underscore: b"\x1f",
    Qt.Key.Key_Minus: b"\x1f",
    Qt.Key.Key_7: b"\x1f",
    Qt.Key.Key_Slash: b"\x1f",
    Qt.Key.Key_Question: b"\x7f",
    Qt.Key.Key_8: b"\x7f",
}
_MODIFIER_KEYS: Final = frozenset(
    {
        Qt.Key.Key_Shift,
        Qt.Key.Key_Control,
        Qt.Key.Key_Alt,
        Qt.Key.Key_Meta,
        Qt.Key.Key_AltGr,
        Qt.Key.Key_CapsLock,
        Qt.Key.Key_NumLock,
        Qt.Key.Key_ScrollLock,
        Qt.Key.Key_Super_L,
        Qt.Key.Key_Super_R,
    }
)
# On macOS Qt reports Command as Control and the Control key as Meta: a terminal wants the
# physical Control key.
_CTRL: Final = (
    Qt.KeyboardModifier.MetaModifier
    if sys.platform == "darwin"
    else Qt.KeyboardModifier.ControlModifier
)
_SHIFT: Final = Qt.KeyboardModifier.ShiftModifier
_ALT: Final = Qt.KeyboardModifier.AltModifier

BRACKETED_PASTE_START: Final = b"\x1b[200~"
BRACKETED_PASTE_END: Final = b"\x1b[201~"


def key_to_bytes(
    key: int, modifiers: Qt.KeyboardModifier, text: str, *, application_cursor: bool = False
) -> bytes:
    """The bytes xterm sends for a key press (empty when the key sends nothing)."""
    shift, alt, ctrl = bool(modifiers & _SHIFT), bool(modifiers & _ALT), bool(modifiers & _CTRL)
    modifier_code = 1 + shift + 2 * alt + 4 * ctrl
    if key in _MODIFIER_KEYS:
        return b""
    if key in _LETTER_KEYS:
        letter, cursor_key = _LETTER_KEYS[key]
        if modifier_code > 1:
            return _CSI + b"1;" + str(modifier_code).encode() + letter
        return (_SS3 if application_cursor or not cursor_key else _CSI) + letter
    if key in _TILDE_KEYS:
        number = _TILDE_KEYS[key]
        if modifier_code > 1:
            number += b";" + str(modifier_code).encode()
        return _CSI + number + b"~"
    prefix = b"\x1b" if alt else b""
    if key in (Qt.Key.Key_Return, Qt.Key.Key_Enter):
        return prefix + b"\r"
    if key == Qt.Key.Key_Backspace:
        return prefix + (b"\x08" if ctrl else b"\x7f")
    if key == Qt.Key.Key_Backtab or (key == Qt.Key.Key_Tab and shift):
        return _CSI + b"Z"
    if key == Qt.Key.Key_Tab:
        return prefix + b"\t"
    if key == Qt.Key.Key_Escape:
        return prefix + b"\x1b"
    if ctrl:
        if Qt.Key.Key_A <= key <= Qt.Key.Key_Z:
            return prefix + bytes([key - Qt.Key.Key_A + 1])
        if key in _CONTROL_PUNCTUATION:
            return prefix + _CONTROL_PUNCTUATION[key]
    if not text:
        return b""
    if not text.isprintable():  # a control character Qt derived: only meaningful with Ctrl
        return prefix + text.encode() if ctrl else b""
    return prefix + text.encode("utf-8", "replace")


def paste_bytes(text: str, *, bracketed: bool) -> bytes:
    """What a paste of ``text`` types: newlines as Enter, bracketed if the program asked.

    An end marker inside the text is removed, so a paste cannot leave bracketed mode early and
    have the rest run as typed commands.
    """
    data = text.replace("\r\n", "\r").replace("\n", "\r").encode("utf-8", "replace")
    if not bracketed:
        return data
    while BRACKETED_PASTE_END in data:
        data = data.replace(BRACKETED_PASTE_END, b"")
    return BRACKETED_PASTE_START + data + BRACKETED_PASTE_END


# ---------------------------------------------------------------- painting


@dataclass(frozen=True, slots=True)
class _Style:
    foreground: QColor
    background: QColor | None  # None: the default background, already painted
    font: int  # index into the font variants: 1 = bold, 2 = italic
    underline: bool
    strikethrough: bool


@dataclass(frozen=True, slots=True)
class _Run:
    """Cells drawn with one style: ``on_grid`` text is drawn at once (the font's advance is the
    cell width); otherwise it is one character placed at its cell (CJK, emoji, fallback)."""

    col: int
    cells: int
    text: str
    style: _Style
    on_grid: bool


_BOLD: Final = 1
_ITALIC: Final = 2


class TerminalWidget(QWidget):
    """Shows a ``cols`` x ``rows`` terminal fed with :meth:`feed`; typing emits
    :attr:`input_ready` unless :attr:`read_only`."""

    input_ready = Signal(bytes)
    """Bytes the user typed or pasted, for the program."""
    screen_size_changed = Signal(int, int)
    """The emulator's size changed (cols, rows): the widget's size hint changed with it."""
    fitting_size_changed = Signal(int, int)
    """The number of cells that fit in the widget changed (cols, rows)."""

    def __init__(
        self,
        cols: int = 80,
        rows: int = 24,
        parent: QWidget | None = None,
        *,
        font: QFont | None = None,
    ) -> None:
        super().__init__(parent)
        self._emulator = Screen(cols, rows)
        self._read_only = False
        self._dirty: set[int] = set(range(rows))
        self._backing = QImage()
        self._shown_cursor: QRect | None = None
        self._selection: tuple[tuple[int, int], tuple[int, int]] | None = None
        self._anchor = (0, 0)
        self._selecting = False
        self._fitting: tuple[int, int] | None = None
        self._in_font: dict[str, bool] = {}
        self._fonts: list[QFont] = []
        self._cell = QSize(1, 1)
        self._ascent = 0.0
        self._underline_y = 0.0
        self._strike_y = 0.0
        self._frame = QTimer(self)
        self._frame.setSingleShot(True)
        self._frame.setInterval(FRAME_INTERVAL_MS)
        self._frame.timeout.connect(self._present)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.setAttribute(Qt.WidgetAttribute.WA_OpaquePaintEvent)
        self.setAttribute(Qt.WidgetAttribute.WA_InputMethodEnabled)
        self.setCursor(Qt.CursorShape.IBeamCursor)
        self.set_terminal_font(font or default_font())

    # ------------------------------------------------------------ public API

    @property
    def read_only(self) -> bool:
        return self._read_only

    @read_only.setter
    def read_only(self, value: bool) -> None:
        if value != self._read_only:
            self._read_only = value
            self._update_cursor()

    @property
    def screen_size(self) -> tuple[int, int]:
        size = self._emulator.size
        return size.cols, size.rows

    @property
    def cursor_position(self) -> tuple[int, int]:
        """(col, row) of the cursor."""
        return self._emulator.cursor

    @property
    def cell_size(self) -> QSize:
        return QSize(self._cell)

    @property
    def bracketed_paste(self) -> bool:
        return self._emulator.bracketed_paste

    def text(self) -> list[str]:
        """The visible lines as text (a wide character once)."""
        return self._emulator.text()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Parse program output; the screen is repainted at the next frame."""
        changed = self._emulator.feed(bytes(data))
        if changed:
            self._dirty.update(changed)
            if self._selection is not None and self._selection_touches(changed):
                self._selection = None
        self._schedule_frame()

    def reset(self, cols: int, rows: int) -> None:
        """A blank terminal of this size (a snapshot follows)."""
        self._emulator = Screen(cols, rows)
        self._screen_changed()

    def resize_screen(self, cols: int, rows: int) -> None:
        """The program's terminal changed size: reflow as a terminal would."""
        if (cols, rows) != self.screen_size:
            self._emulator.resize(cols, rows)  # checks the size
            self._screen_changed()

    def cells_fitting(self, size: QSize) -> tuple[int, int]:
        """How many cells fit in a widget of ``size`` pixels."""
        cols = (size.width() - 2 * MARGIN) // self._cell.width()
        rows = (size.height() - 2 * MARGIN) // self._cell.height()
        return max(1, min(cols, MAX_COLS)), max(1, min(rows, MAX_ROWS))

    def pixel_size(self, cols: int, rows: int) -> QSize:
        """The widget size that shows ``cols`` x ``rows`` cells exactly."""
        return QSize(
            cols * self._cell.width() + 2 * MARGIN, rows * self._cell.height() + 2 * MARGIN
        )

    def cell_rect(self, col: int, row: int) -> QRect:
        """Where a cell is painted, in widget coordinates."""
        return QRect(
            MARGIN + col * self._cell.width(),
            MARGIN + row * self._cell.height(),
            self._cell.width(),
            self._cell.height(),
        )

    def set_terminal_font(self, font: QFont) -> None:
        base = QFont(font)
        base.setKerning(False)
        base.setStyleStrategy(QFont.StyleStrategy.PreferAntialias)
        metrics = QFontMetricsF(base)
        advance = metrics.horizontalAdvance("M")
        self._cell = QSize(max(1, round(advance)), max(1, math.ceil(metrics.lineSpacing())))
        self._ascent = metrics.ascent() + (self._cell.height() - metrics.lineSpacing()) / 2
        self._underline_y = self._ascent + max(1.0, metrics.underlinePos())
        self._strike_y = self._ascent - metrics.strikeOutPos()
        self._fonts = []
        for variant in range(4):
            variant_font = QFont(base)
            variant_font.setBold(bool(variant & _BOLD))
            variant_font.setItalic(bool(variant & _ITALIC))
            spacing = self._cell.width() - QFontMetricsF(variant_font).horizontalAdvance("M")
            variant_font.setLetterSpacing(QFont.SpacingType.AbsoluteSpacing, spacing)
            self._fonts.append(variant_font)
        self._in_font.clear()
        super().setFont(base)
        self._screen_changed()

    def selected_text(self) -> str:
        if self._selection is None:
            return ""
        (start_col, start_row), (end_col, end_row) = self._selection
        lines = self._emulator.lines()
        out = []
        for row in range(start_row, end_row + 1):
            first = start_col if row == start_row else 0
            last = end_col if row == end_row else len(lines[row]) - 1
            out.append(_cells_text(lines[row], first, last).rstrip())
        return "\n".join(out)

    def clear_selection(self) -> None:
        if self._selection is not None:
            self._selection = None
            self.update()

    def copy(self) -> None:
        text = self.selected_text()
        if text:
            QGuiApplication.clipboard().setText(text)

    def paste(self, text: str | None = None) -> None:
        """Type the clipboard (or ``text``), bracketed when the program enabled it."""
        if self._read_only:
            return
        if text is None:
            text = QGuiApplication.clipboard().text()
        if text:
            self.input_ready.emit(paste_bytes(text, bracketed=self.bracketed_paste))

    # ------------------------------------------------------------ Qt overrides

    def sizeHint(self) -> QSize:
        cols, rows = self.screen_size
        return self.pixel_size(cols, rows)

    def minimumSizeHint(self) -> QSize:
        return self.pixel_size(1, 1)

    def event(self, event: QEvent) -> bool:
        # Keys the program wants (Ctrl+W, Alt+F, ...) must not trigger the window's shortcuts.
        if (
            event.type() == QEvent.Type.ShortcutOverride
            and isinstance(event, QKeyEvent)
            and not self._read_only
            and self._local_action(event) is None
            and key_to_bytes(event.key(), event.modifiers(), event.text())
        ):
            event.accept()
            return True
        return super().event(event)

    def focusNextPrevChild(self, next: bool) -> bool:
        return False  # Tab is a key for the program, not focus navigation

    def keyPressEvent(self, event: QKeyEvent) -> None:
        action = self._local_action(event)
        if action == "copy":
            self.copy()
            return
        if action == "paste":
            self.paste()
            return
        if self._read_only:
            event.ignore()
            return
        data = key_to_bytes(
            event.key(),
            event.modifiers(),
            event.text(),
            application_cursor=self._emulator.application_cursor_keys,
        )
        if data:
            self.clear_selection()
            self.input_ready.emit(data)
        else:
            event.ignore()

    def inputMethodEvent(self, event: QInputMethodEvent) -> None:
        committed = event.commitString()
        if committed and not self._read_only:
            self.input_ready.emit(committed.encode("utf-8", "replace"))
        event.accept()

    def inputMethodQuery(self, query: Qt.InputMethodQuery) -> object:
        if query == Qt.InputMethodQuery.ImCursorRectangle:
            return self.cell_rect(*self.cursor_position)
        return super().inputMethodQuery(query)

    def focusInEvent(self, event: QFocusEvent) -> None:
        super().focusInEvent(event)
        self._update_cursor()

    def focusOutEvent(self, event: QFocusEvent) -> None:
        super().focusOutEvent(event)
        self._update_cursor()

    def mousePressEvent(self, event: QMouseEvent) -> None:
        if event.button() == Qt.MouseButton.LeftButton:
            cell = self._cell_at(event.position().toPoint())
            self._anchor = cell
            self._selection = (cell, cell)
            self._selecting = True
            self.update()
        elif event.button() == Qt.MouseButton.MiddleButton:
            clipboard = QGuiApplication.clipboard()
            if clipboard.supportsSelection():
                self.paste(clipboard.text(QClipboard.Mode.Selection))
        super().mousePressEvent(event)

    def mouseMoveEvent(self, event: QMouseEvent) -> None:
        if self._selecting:
            self._selection = _ordered(self._anchor, self._cell_at(event.position().toPoint()))
            self.update()

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:
        if event.button() == Qt.MouseButton.LeftButton and self._selecting:
            self._selecting = False
            if self._selection is not None and self._selection[0] == self._selection[1]:
                self._selection = None  # a click, not a selection
                self.update()
            clipboard = QGuiApplication.clipboard()
            if self._selection is not None and clipboard.supportsSelection():
                clipboard.setText(self.selected_text(), QClipboard.Mode.Selection)

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        fitting = self.cells_fitting(event.size())
        if fitting != self._fitting:
            self._fitting = fitting
            self.fitting_size_changed.emit(*fitting)

    def paintEvent(self, event: QPaintEvent) -> None:
        self._render_dirty()
        painter = QPainter(self)
        try:
            painter.fillRect(event.rect(), DEFAULT_BACKGROUND)
            painter.drawImage(QPoint(MARGIN, MARGIN), self._backing)
            self._paint_selection(painter)
            self._paint_cursor(painter)
        finally:
            painter.end()

    # ------------------------------------------------------------ internals

    def _local_action(self, event: QKeyEvent) -> str | None:
        """Copy and paste keys, handled here rather than sent to the program."""
        if event.matches(QKeySequence.StandardKey.Copy) and self._selection is not None:
            return "copy"
        modifiers = event.modifiers()
        ctrl_shift = _CTRL | _SHIFT
        if modifiers & ctrl_shift == ctrl_shift and not modifiers & _ALT:
            if event.key() == Qt.Key.Key_C:
                return "copy"
            if event.key() == Qt.Key.Key_V:
                return "paste"
        if event.key() == Qt.Key.Key_Insert and modifiers & _SHIFT:
            return "paste"
        return None

    def _cell_at(self, point: QPoint) -> tuple[int, int]:
        cols, rows = self.screen_size
        col = (point.x() - MARGIN) // self._cell.width()
        row = (point.y() - MARGIN) // self._cell.height()
        return max(0, min(col, cols - 1)), max(0, min(row, rows - 1))

    def _selection_touches(self, rows: Iterable[int]) -> bool:
        assert self._selection is not None
        first, last = self._selection[0][1], self._selection[1][1]
        return any(first <= row <= last for row in rows)

    def _screen_changed(self) -> None:
        cols, rows = self.screen_size
        self._dirty = set(range(rows))
        self._selection = None
        self._backing = QImage()  # rebuilt at the new size on the next paint
        self.updateGeometry()
        self.update()
        self.screen_size_changed.emit(cols, rows)

    def _schedule_frame(self) -> None:
        if not self._frame.isActive():
            self._frame.start()

    def _present(self) -> None:
        """Once per frame: ask Qt to repaint what changed since the last frame."""
        width = self._cell.width() * self.screen_size[0]
        for row in self._dirty:
            self.update(
                QRect(MARGIN, MARGIN + row * self._cell.height(), width, self._cell.height())
            )
        self._update_cursor()

    def _update_cursor(self) -> None:
        if self._shown_cursor is not None:
            self.update(self._shown_cursor)
        self.update(self.cell_rect(*self.cursor_position).adjusted(0, 0, self._cell.width(), 0))

    def _ensure_backing(self) -> None:
        cols, rows = self.screen_size
        ratio = self.devicePixelRatioF()
        width, height = cols * self._cell.width(), rows * self._cell.height()
        if (
            self._backing.isNull()
            or self._backing.devicePixelRatioF() != ratio
            or self._backing.deviceIndependentSize().toSize() != QSize(width, height)
        ):
            self._backing = QImage(
                max(1, math.ceil(width * ratio)),
                max(1, math.ceil(height * ratio)),
                QImage.Format.Format_RGB32,
            )
            self._backing.setDevicePixelRatio(ratio)
            self._dirty = set(range(rows))

    def _render_dirty(self) -> None:
        self._ensure_backing()
        if not self._dirty:
            return
        started = time.perf_counter()
        lines = self._emulator.lines()
        painter = QPainter(self._backing)
        try:
            painter.setRenderHint(QPainter.RenderHint.TextAntialiasing)
            for row in sorted(self._dirty):
                if row < len(lines):
                    self._render_line(painter, row, lines[row])
        finally:
            painter.end()
        self._dirty.clear()
        # A slow machine or a huge screen: fewer frames rather than a frozen window.
        spent_ms = (time.perf_counter() - started) * 1000
        self._frame.setInterval(
            int(min(MAX_FRAME_INTERVAL_MS, max(FRAME_INTERVAL_MS, 2 * spent_ms)))
        )

    def _render_line(self, painter: QPainter, row: int, line: Line) -> None:
        cell_width, cell_height = self._cell.width(), self._cell.height()
        top = row * cell_height
        painter.fillRect(0, top, len(line) * cell_width, cell_height, DEFAULT_BACKGROUND)
        baseline = top + self._ascent
        for run in self._runs(line):
            left = run.col * cell_width
            width = run.cells * cell_width
            style = run.style
            if style.background is not None:
                painter.fillRect(left, top, width, cell_height, style.background)
            if run.text.strip():
                painter.setFont(self._fonts[style.font])
                painter.setPen(style.foreground)
                if run.on_grid:
                    painter.drawText(QPointF(left, baseline), run.text)
                else:
                    painter.save()
                    painter.setClipRect(left, top, width, cell_height)
                    painter.drawText(
                        QRect(left, top, width, cell_height), Qt.AlignmentFlag.AlignCenter, run.text
                    )
                    painter.restore()
            if style.underline:
                painter.fillRect(
                    QRect(left, int(top + self._underline_y), width, 1), style.foreground
                )
            if style.strikethrough:
                painter.fillRect(QRect(left, int(top + self._strike_y), width, 1), style.foreground)

    def _runs(self, line: Line) -> list[_Run]:
        runs: list[_Run] = []
        text: list[str] = []
        start = 0
        pen: Pen | None = None
        style: _Style | None = None
        for col, cell in enumerate(line.cells):
            width = cell.width
            if width == 0:  # the right half of a wide character
                continue
            cell_pen = cell.pen
            if style is None or cell_pen != pen:
                if text and style is not None:
                    runs.append(_Run(start, col - start, "".join(text), style, True))
                text, start = [], col
                pen, style = cell_pen, self._style(cell_pen)
            char = cell.char
            if width > 1 or (char > "\x7f" and not self._has_glyph(char)):
                if text:
                    runs.append(_Run(start, col - start, "".join(text), style, True))
                    text = []
                runs.append(_Run(col, width, char, style, False))
                start = col + width
            else:
                text.append(char)
        if text and style is not None:
            runs.append(_Run(start, len(text), "".join(text), style, True))
        return runs

    def _has_glyph(self, char: str) -> bool:
        known = self._in_font.get(char)
        if known is None:
            known = self._in_font[char] = QFontMetricsF(self._fonts[0]).inFontUcs4(ord(char))
        return known

    def _style(self, pen: Pen) -> _Style:
        bold = pen.bold
        foreground = DEFAULT_FOREGROUND if pen.foreground is None else _color(pen.foreground, bold)
        background = None if pen.background is None else _color(pen.background, False)
        if pen.inverse:
            foreground, background = background or DEFAULT_BACKGROUND, foreground
        if pen.faint:
            base = background or DEFAULT_BACKGROUND
            foreground = QColor(
                (foreground.red() + base.red()) // 2,
                (foreground.green() + base.green()) // 2,
                (foreground.blue() + base.blue()) // 2,
            )
        return _Style(
            foreground,
            background,
            (_BOLD if bold else 0) | (_ITALIC if pen.italic else 0),
            pen.underline,
            pen.strikethrough,
        )

    def _paint_selection(self, painter: QPainter) -> None:
        if self._selection is None:
            return
        (start_col, start_row), (end_col, end_row) = self._selection
        cols = self.screen_size[0]
        for row in range(start_row, end_row + 1):
            first = start_col if row == start_row else 0
            last = end_col if row == end_row else cols - 1
            rect = self.cell_rect(first, row)
            rect.setRight(self.cell_rect(last, row).right())
            painter.fillRect(rect, SELECTION_COLOR)

    def _paint_cursor(self, painter: QPainter) -> None:
        col, row = self._emulator.cursor
        cols, rows = self.screen_size
        if not self._emulator.cursor_visible or not (0 <= col < cols and 0 <= row < rows):
            self._shown_cursor = None
            return
        cell = self._emulator.lines()[row][col]
        rect = self.cell_rect(col, row)
        if cell.width == 2:
            rect.setWidth(2 * self._cell.width())
        self._shown_cursor = rect
        if self.hasFocus() and not self._read_only:
            painter.fillRect(rect, CURSOR_COLOR)
            if cell.char.strip():
                style = self._style(cell.pen)
                painter.setFont(self._fonts[style.font])
                painter.setPen(DEFAULT_BACKGROUND)
                painter.drawText(rect, Qt.AlignmentFlag.AlignCenter, cell.char)
        else:
            painter.setPen(CURSOR_COLOR)
            painter.drawRect(rect.adjusted(0, 0, -1, -1))


def default_font() -> QFont:
    font = QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont)
    font.setStyleHint(QFont.StyleHint.Monospace)
    font.setFixedPitch(True)
    font.setPointSizeF(DEFAULT_FONT_POINTS)
    return font


def _color(color: Color, brighten: bool) -> QColor:
    if isinstance(color, Color.Indexed):
        index = color[0]
        if brighten and index < 8:  # xterm's "bold is bright"
            index += 8
        return PALETTE[index]
    assert isinstance(color, Color.RGB)
    return QColor(color[0], color[1], color[2])


def _cells_text(line: Line, first: int, last: int) -> str:
    cells = line.cells
    return "".join(cell.char for cell in cells[first : last + 1] if cell.width)


def _ordered(a: tuple[int, int], b: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Selection ends in reading order (row first)."""
    return (a, b) if (a[1], a[0]) <= (b[1], b[0]) else (b, a)


def add_session_labels(window: QMainWindow, toolbar: QToolBar) -> tuple[QLabel, QLabel]:
    """A terminal window's two lines of words: who is in control (on ``toolbar``, which is
    added to ``window``) and the session's status (in the status bar). Plain text: the names
    in them come from peers."""
    control = QLabel()
    control.setTextFormat(Qt.TextFormat.PlainText)
    control.setContentsMargins(8, 0, 8, 0)
    toolbar.addWidget(control)
    window.addToolBar(toolbar)
    status = QLabel()
    status.setTextFormat(Qt.TextFormat.PlainText)
    window.statusBar().addWidget(status, 1)
    return control, status
