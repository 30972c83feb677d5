"""The terminal widget: what it paints (pixels), what the emulator holds, the bytes keys send."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PySide6.QtCore import QPoint, Qt
from PySide6.QtGui import QColor, QGuiApplication, QImage, QPainter

from meshagent_gui.ui.terminal_widget import (
    BRACKETED_PASTE_END,
    BRACKETED_PASTE_START,
    CURSOR_COLOR,
    DEFAULT_BACKGROUND,
    PALETTE,
    TerminalWidget,
    key_to_bytes,
    paste_bytes,
)

NO = Qt.KeyboardModifier.NoModifier
CTRL = Qt.KeyboardModifier.ControlModifier
SHIFT = Qt.KeyboardModifier.ShiftModifier
ALT = Qt.KeyboardModifier.AltModifier

# A vim session, shortened: alternate screen, a coloured buffer, an inverse status line.
VIM_ENTER = (
    b"\x1b[?1049h\x1b[22;0;0t\x1b[?1h\x1b=\x1b[H\x1b[2J"
    b"\x1b[1;1H\x1b[38;5;130m  1 \x1b[m\x1b[31mdef\x1b[m \x1b[1;34mmain\x1b[m():"
    b"\x1b[2;1H\x1b[38;5;130m  2 \x1b[m  "
    b'\x1b[38;2;152;195;121mprint\x1b[m("\xe4\xb8\xad\xe6\x96\x87")'
    b"\x1b[3;1H\x1b[94m~                   \x1b[m"
    b"\x1b[4;1H\x1b[94m~                   \x1b[m"
    b"\x1b[6;1H\x1b[7m demo.py [+]        \x1b[m"
    b"\x1b[1;9H"
)
VIM_LEAVE = b"\x1b[?1049l\x1b[23;0;0t\x1b[?1l\x1b>"


@pytest.fixture
def widget(qtbot: Any) -> TerminalWidget:
    terminal = TerminalWidget(20, 6)
    qtbot.addWidget(terminal)
    terminal.resize(terminal.sizeHint())
    return terminal


def rendered(widget: TerminalWidget) -> QImage:
    return widget.grab().toImage()


def cell_color(image: QImage, widget: TerminalWidget, col: int, row: int) -> QColor:
    """The colour in the middle of a cell's left edge band (a background pixel even when a
    glyph is drawn: glyphs do not touch the cell's first pixel column)."""
    rect = widget.cell_rect(col, row)
    return image.pixelColor(QPoint(rect.left(), rect.center().y()))


def cell_colors(image: QImage, widget: TerminalWidget, col: int, row: int) -> set[str]:
    rect = widget.cell_rect(col, row)
    return {
        image.pixelColor(QPoint(x, y)).name()
        for x in range(rect.left(), rect.right() + 1)
        for y in range(rect.top(), rect.bottom() + 1)
    }


# ---------------------------------------------------------------- painting


def test_indexed_256_and_truecolor_backgrounds_are_painted_in_their_cells(
    widget: TerminalWidget,
) -> None:
    widget.feed(b"\x1b[41m  \x1b[48;5;21m  \x1b[48;2;10;200;30m  \x1b[m  ")

    image = rendered(widget)

    assert cell_color(image, widget, 0, 0) == PALETTE[1]
    assert cell_color(image, widget, 1, 0) == PALETTE[1]
    assert cell_color(image, widget, 2, 0) == QColor(0, 0, 255)  # cube entry 21
    assert cell_color(image, widget, 4, 0) == QColor(10, 200, 30)
    assert cell_color(image, widget, 6, 0) == DEFAULT_BACKGROUND
    assert cell_color(image, widget, 0, 1) == DEFAULT_BACKGROUND


def test_foreground_colour_bold_as_bright_and_inverse(widget: TerminalWidget) -> None:
    widget.feed(b"\x1b[31m\xe2\x96\x88\x1b[1m\xe2\x96\x88\x1b[m \x1b[7;32m \x1b[m")  # full blocks

    image = rendered(widget)

    assert PALETTE[1].name() in cell_colors(image, widget, 0, 0)
    assert PALETTE[9].name() in cell_colors(image, widget, 1, 0)  # bold red is bright red
    assert cell_color(image, widget, 3, 0) == PALETTE[2]  # inverse: the colour is the cell


def test_vim_alternate_screen_shows_its_buffer_then_gives_the_shell_back(
    widget: TerminalWidget,
) -> None:
    widget.feed(b"$ vim demo.py\r\n")
    widget.feed(VIM_ENTER)

    assert widget.text()[0].startswith("  1 def main():")
    assert widget.text()[1].startswith('  2   print("中文")')
    assert widget.text()[2].startswith("~")
    image = rendered(widget)
    # The status line is inverse video: default foreground as background.
    status = cell_color(image, widget, 5, 5)
    assert status != DEFAULT_BACKGROUND
    assert status.lightness() > 150
    assert PALETTE[1].name() in cell_colors(image, widget, 4, 0)  # "def" in red
    assert QColor(152, 195, 121).name() in cell_colors(image, widget, 8, 1)  # truecolor print

    widget.feed(VIM_LEAVE)

    assert widget.text()[0].rstrip() == "$ vim demo.py"
    assert all(not line.strip() for line in widget.text()[1:])
    image = rendered(widget)
    assert cell_color(image, widget, 5, 5) == DEFAULT_BACKGROUND


def test_a_wide_character_takes_two_cells(widget: TerminalWidget) -> None:
    widget.feed("中文x".encode())
    assert widget.cursor_position == (5, 0)
    widget.feed(b"\x1b[3;1H")  # the cursor out of the way

    assert widget.text()[0].startswith("中文x")
    image = rendered(widget)
    # Something is drawn for "x" in the fifth cell; nothing in the sixth.
    assert len(cell_colors(image, widget, 4, 0)) > 1
    assert cell_colors(image, widget, 5, 0) == {DEFAULT_BACKGROUND.name()}


def test_underline_is_drawn_under_blank_cells(widget: TerminalWidget) -> None:
    widget.feed(b"\x1b[4;33m   \x1b[m")

    image = rendered(widget)

    assert PALETTE[3].name() in cell_colors(image, widget, 1, 0)
    assert cell_colors(image, widget, 1, 1) == {DEFAULT_BACKGROUND.name()}


def test_cursor_is_a_block_when_typing_and_an_outline_when_read_only(
    widget: TerminalWidget, qtbot: Any
) -> None:
    widget.show()
    widget.activateWindow()
    widget.setFocus()
    qtbot.waitUntil(widget.hasFocus)
    widget.feed(b"ab")

    image = rendered(widget)
    assert image.pixelColor(widget.cell_rect(2, 0).center()) == CURSOR_COLOR

    widget.read_only = True
    image = rendered(widget)
    rect = widget.cell_rect(2, 0)
    assert image.pixelColor(rect.center()) == DEFAULT_BACKGROUND
    assert image.pixelColor(rect.topLeft()) == CURSOR_COLOR


def test_a_hidden_cursor_is_not_drawn(widget: TerminalWidget) -> None:
    widget.feed(b"\x1b[?25l")

    assert CURSOR_COLOR.name() not in cell_colors(rendered(widget), widget, 0, 0)


def test_only_changed_lines_are_redrawn_and_a_flood_is_one_frame(
    widget: TerminalWidget, qtbot: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    widget.show()
    rendered(widget)
    drawn: list[int] = []
    original = widget._render_line

    def render_line(painter: QPainter, row: int, line: Any) -> None:
        drawn.append(row)
        original(painter, row, line)

    monkeypatch.setattr(widget, "_render_line", render_line)

    widget.feed(b"\x1b[4;1Hchanged")
    rendered(widget)
    assert drawn == [3]

    drawn.clear()
    for _ in range(500):  # a flood: many chunks before the next frame
        widget.feed(b"\x1b[2;1Hline two \x1b[3;1Hline three")
    qtbot.waitUntil(lambda: len(drawn) >= 2)
    rendered(widget)
    assert sorted(drawn) == [1, 2]
    assert widget.text()[1].startswith("line two")


# ---------------------------------------------------------------- size


def test_resize_and_reset_change_the_screen_and_the_size_hint(
    widget: TerminalWidget, qtbot: Any
) -> None:
    widget.feed(b"hello")
    with qtbot.waitSignal(widget.screen_size_changed) as changed:
        widget.resize_screen(30, 8)
    assert changed.args == [30, 8]
    assert widget.screen_size == (30, 8)
    assert widget.sizeHint() == widget.pixel_size(30, 8)
    assert widget.text()[0].startswith("hello")

    widget.reset(10, 3)

    assert widget.screen_size == (10, 3)
    assert widget.text() == [" " * 10] * 3


def test_cells_fitting_follows_the_font_metrics(widget: TerminalWidget, qtbot: Any) -> None:
    cell = widget.cell_size
    assert cell.width() > 0 and cell.height() >= cell.width()
    widget.show()

    with qtbot.waitSignal(widget.fitting_size_changed) as fitting:
        widget.resize(widget.pixel_size(33, 7) + cell / 2)

    assert fitting.args == [33, 7]
    assert widget.cells_fitting(widget.size()) == (33, 7)


# ---------------------------------------------------------------- keyboard


@pytest.mark.parametrize(
    ("key", "modifiers", "text", "app_cursor", "expected"),
    [
        (Qt.Key.Key_Up, NO, "", False, b"\x1b[A"),
        (Qt.Key.Key_Up, NO, "", True, b"\x1bOA"),
        (Qt.Key.Key_Left, CTRL, "", False, b"\x1b[1;5D"),
        (Qt.Key.Key_Right, SHIFT | ALT, "", False, b"\x1b[1;4C"),
        (Qt.Key.Key_Home, NO, "", False, b"\x1b[H"),
        (Qt.Key.Key_End, NO, "", True, b"\x1bOF"),
        (Qt.Key.Key_PageUp, NO, "", False, b"\x1b[5~"),
        (Qt.Key.Key_PageDown, CTRL, "", False, b"\x1b[6;5~"),
        (Qt.Key.Key_Delete, NO, "", False, b"\x1b[3~"),
        (Qt.Key.Key_Insert, NO, "", False, b"\x1b[2~"),
        (Qt.Key.Key_F1, NO, "", False, b"\x1bOP"),
        (Qt.Key.Key_F4, NO, "", False, b"\x1bOS"),
        (Qt.Key.Key_F2, SHIFT, "", False, b"\x1b[1;2Q"),
        (Qt.Key.Key_F5, NO, "", False, b"\x1b[15~"),
        (Qt.Key.Key_F10, NO, "", False, b"\x1b[21~"),
        (Qt.Key.Key_F12, SHIFT, "", False, b"\x1b[24;2~"),
        (Qt.Key.Key_C, CTRL, "\x03", False, b"\x03"),
        (Qt.Key.Key_A, CTRL | SHIFT, "\x01", False, b"\x01"),
        (Qt.Key.Key_Space, CTRL, " ", False, b"\x00"),
        (Qt.Key.Key_BracketRight, CTRL, "\x1d", False, b"\x1d"),
        (Qt.Key.Key_X, ALT, "x", False, b"\x1bx"),
        (Qt.Key.Key_B, CTRL | ALT, "", False, b"\x1b\x02"),
        (Qt.Key.Key_Return, NO, "\r", False, b"\r"),
        (Qt.Key.Key_Enter, NO, "\r", False, b"\r"),
        (Qt.Key.Key_Backspace, NO, "\x08", False, b"\x7f"),
        (Qt.Key.Key_Backspace, ALT, "", False, b"\x1b\x7f"),
        (Qt.Key.Key_Tab, NO, "\t", False, b"\t"),
        (Qt.Key.Key_Backtab, SHIFT, "", False, b"\x1b[Z"),
        (Qt.Key.Key_Escape, NO, "\x1b", False, b"\x1b"),
        (Qt.Key.Key_A, SHIFT, "A", False, b"A"),
        (Qt.Key.Key_Eacute, NO, "é", False, "é".encode()),
        (Qt.Key.Key_Shift, SHIFT, "", False, b""),
        (Qt.Key.Key_Control, CTRL, "", False, b""),
    ],
)
def test_keys_send_xterm_bytes(
    key: Qt.Key, modifiers: Qt.KeyboardModifier, text: str, app_cursor: bool, expected: bytes
) -> None:
    assert key_to_bytes(key, modifiers, text, application_cursor=app_cursor) == expected


def test_typing_emits_bytes_and_follows_the_cursor_key_mode(
    widget: TerminalWidget, qtbot: Any
) -> None:
    typed: list[bytes] = []
    widget.input_ready.connect(typed.append)

    qtbot.keyClicks(widget, "ls")
    qtbot.keyClick(widget, Qt.Key.Key_Tab)  # not focus navigation
    qtbot.keyClick(widget, Qt.Key.Key_Return)
    qtbot.keyClick(widget, Qt.Key.Key_Up)
    widget.feed(b"\x1b[?1h")  # application cursor keys, as vim sets them
    qtbot.keyClick(widget, Qt.Key.Key_Up)
    qtbot.keyClick(widget, Qt.Key.Key_C, CTRL)

    assert typed == [b"l", b"s", b"\t", b"\r", b"\x1b[A", b"\x1bOA", b"\x03"]


def test_read_only_emits_nothing(widget: TerminalWidget, qtbot: Any) -> None:
    typed: list[bytes] = []
    widget.input_ready.connect(typed.append)
    widget.read_only = True

    qtbot.keyClicks(widget, "rm -rf /")
    qtbot.keyClick(widget, Qt.Key.Key_Return)
    widget.paste("echo pasted\n")
    QGuiApplication.clipboard().setText("from the clipboard")
    qtbot.keyClick(widget, Qt.Key.Key_V, CTRL | SHIFT)

    assert typed == []


def test_paste_is_bracketed_only_when_the_program_asked(widget: TerminalWidget, qtbot: Any) -> None:
    typed: list[bytes] = []
    widget.input_ready.connect(typed.append)
    QGuiApplication.clipboard().setText("echo one\necho two")

    qtbot.keyClick(widget, Qt.Key.Key_V, CTRL | SHIFT)
    widget.feed(b"\x1b[?2004h")
    qtbot.keyClick(widget, Qt.Key.Key_V, CTRL | SHIFT)
    widget.feed(b"\x1b[?20")  # a mode change split between two chunks
    widget.feed(b"04l")
    qtbot.keyClick(widget, Qt.Key.Key_Insert, SHIFT)

    assert typed == [
        b"echo one\recho two",
        b"\x1b[200~echo one\recho two\x1b[201~",
        b"echo one\recho two",
    ]
    widget.feed(b"\x1b[?2004h")
    assert widget.bracketed_paste
    widget.reset(40, 10)  # a new program's screen (a snapshot follows): not bracketed yet
    assert not widget.bracketed_paste


@given(st.text())
def test_a_bracketed_paste_cannot_end_early(text: str) -> None:
    data = paste_bytes(text, bracketed=True)

    assert data.startswith(BRACKETED_PASTE_START)
    assert data.endswith(BRACKETED_PASTE_END)
    body = data[len(BRACKETED_PASTE_START) : -len(BRACKETED_PASTE_END)]
    assert BRACKETED_PASTE_END not in body
    assert b"\n" not in body


def test_drag_selects_and_ctrl_shift_c_copies(widget: TerminalWidget, qtbot: Any) -> None:
    widget.feed(b"hello world\r\nsecond line")
    typed: list[bytes] = []
    widget.input_ready.connect(typed.append)

    qtbot.mousePress(widget, Qt.MouseButton.LeftButton, pos=widget.cell_rect(6, 0).center())
    qtbot.mouseMove(widget, widget.cell_rect(5, 1).center())
    qtbot.mouseRelease(widget, Qt.MouseButton.LeftButton, pos=widget.cell_rect(5, 1).center())
    qtbot.keyClick(widget, Qt.Key.Key_C, CTRL | SHIFT)

    assert widget.selected_text() == "world\nsecond"
    assert QGuiApplication.clipboard().text() == "world\nsecond"
    assert typed == []  # copying is not input
    image = rendered(widget)
    assert cell_color(image, widget, 7, 0) != DEFAULT_BACKGROUND  # highlighted
    assert cell_color(image, widget, 7, 1) == DEFAULT_BACKGROUND

    widget.feed(b"\x1b[1;1Hchanged")  # the selected text changed: the selection goes
    assert widget.selected_text() == ""
