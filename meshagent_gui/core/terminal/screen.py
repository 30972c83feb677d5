"""The host's model of the shared screen: feed it bytes, get bytes that repaint a terminal.

The emulator is asciinema's ``avt`` (Rust) through ``pyavt``, chosen by measurement against
pyte, pyghostty (libghostty-vt) and vt100wasm on recorded vim, less, htop and top sessions and
synthetic streams (alternate screen, 256 colours and truecolor, CJK and emoji, scroll regions),
with tmux as the reference terminal. avt is exact on all of them, and its dump restores the
primary screen *behind* an alternate-screen program (so a viewer who joined while vim was open
gets the shell back when vim exits); pyte crashes on vim's output and has no alternate screen;
libghostty's formatter loses the primary screen and ships no Windows wheel; vt100wasm drops
strikethrough and is slower. The figures are in the README.

avt parses 25-30 MB/s on one core and holds the GIL while it does, while ``cat`` through a PTY
reaches about 100 MB/s here. So the screen is never on the hot path: :class:`ScreenTracker`
queues the output (O(1) per chunk) and the host parses it a slice per event-loop turn. In a
flood (the emulator a quarter of its bound behind) the host stops parsing until the output
pauses, and past the bound the tracker skips the oldest output, resuming at the next line
start. A snapshot first parses whatever is queued (at most the bound, 1 MiB: about 35 ms), so
it is exact, except after a skip, where it is exact for the lines printed since: for a flood
of text, the whole screen. Modes a program switched inside skipped output can be missed.
"""

from __future__ import annotations

import codecs
import re
from collections import deque
from dataclasses import dataclass
from typing import Final

# avt's public package; mypy reads its types from pyavt's stubs (the `avt` override in
# pyproject.toml). Color, Line and Pen are re-exported: what a front end reads off a Screen to
# paint it, so nothing else in meshagent_gui depends on pyavt's layout.
from avt import Color, Line, Pen, Vt

from meshagent_gui.core.protocol.terminal import check_size

__all__ = [
    "BRACKETED_PASTE_MODE",
    "CANCEL",
    "DEFAULT_MAX_BACKLOG",
    "SNAPSHOT_PREAMBLE",
    "TRACKED_MODES",
    "Color",
    "Line",
    "Pen",
    "Screen",
    "ScreenSnapshot",
    "ScreenTracker",
    "WindowSize",
]

DEFAULT_MAX_BACKLOG: Final = 1024 * 1024

# What a snapshot sends before the dump, so that it repaints any terminal, whatever state a
# previous program left it in: primary screen, soft reset (margins, origin, pen, charsets,
# insert mode, visible cursor), the modes avt restores only when they are not the default,
# the input modes avt does not track, then home and clear.
SNAPSHOT_PREAMBLE: Final = (
    b"\x1b[?1049l\x1b[!p\x1b[?7h\x1b[20l\x1b[?1l\x1b>\x1b[4l\x1b[?6l\x1b[r\x1b[0m"
    b"\x1b(B\x1b)B\x0f\x1b[?25h"
    b"\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1004l\x1b[?1005l\x1b[?1006l\x1b[?1015l\x1b[?2004l"
    b"\x1b[H\x1b[2J"
)

# Input modes a program sets that avt does not keep (mouse reporting, focus events, bracketed
# paste, application keypad): tracked here so a snapshot turns them back on in the viewer.
BRACKETED_PASTE_MODE: Final = 2004
TRACKED_MODES: Final = frozenset({1000, 1002, 1003, 1004, 1005, 1006, 1015, BRACKETED_PASTE_MODE})
# Only the DEC mode changes that name a tracked mode match (programs such as vim hide and show
# the cursor around every redraw), and the literal ``ESC [ ?`` prefix lets the regex engine skip
# the colour sequences in between: escape-dense output costs a third of a match-every-escape
# pattern. A false match (``?12004h``) is harmless: its parameters are checked one by one.
_TRACKED_ALTERNATIVES: Final = b"|".join(str(mode).encode() for mode in sorted(TRACKED_MODES))
_TRACKED_MODE_CHANGE: Final = re.compile(
    rb"\x1b\[\?([0-9;]*(?:" + _TRACKED_ALTERNATIVES + rb")[0-9;]*)([hl])"
)
_KEYPAD_OR_RESET: Final = re.compile(rb"\x1b([=>c])")  # DECKPAM, DECKPNM, RIS
_MODE_TAIL: Final = 32  # a mode change split between two slices is still seen

CANCEL: Final = "\x18"  # CAN: aborts a sequence the emulator was in the middle of


@dataclass(frozen=True, slots=True)
class WindowSize:
    cols: int
    rows: int

    def __post_init__(self) -> None:
        check_size(self.cols, self.rows)


@dataclass(frozen=True, slots=True)
class ScreenSnapshot:
    """``data`` repaints a ``cols`` x ``rows`` terminal to show every output byte before
    ``offset``."""

    offset: int
    cols: int
    rows: int
    data: bytes


class Screen:
    """One avt terminal, fed bytes (UTF-8 decoded incrementally, split anywhere), plus the input
    modes avt does not keep. The host's model of the shared screen and the widget's emulator."""

    def __init__(self, cols: int, rows: int) -> None:
        check_size(cols, rows)
        self._vt = Vt(cols, rows, scrollback_limit=0)
        # A fresh avt reports every line changed on its first feed: take that report now, so
        # that feed's changed lines are only the ones the output touched.
        self._vt.feed_str("")
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._modes: dict[int, bool] = {}
        self._keypad_application = False
        self._tail = b""

    @property
    def size(self) -> WindowSize:
        cols, rows = self._vt.size
        return WindowSize(cols, rows)

    @property
    def cursor(self) -> tuple[int, int]:
        """(col, row) of the cursor."""
        cursor = self._vt.cursor
        return cursor.col, cursor.row

    @property
    def cursor_visible(self) -> bool:
        return self._vt.cursor.visible

    @property
    def application_cursor_keys(self) -> bool:
        """The program asked for SS3 arrow keys (DECCKM), as vim and less do."""
        return self._vt.cursor_key_app_mode

    @property
    def bracketed_paste(self) -> bool:
        """The program asked for pastes wrapped in ``ESC [200~`` ... ``ESC [201~``."""
        return self._modes.get(BRACKETED_PASTE_MODE, False)

    @property
    def input_modes(self) -> frozenset[int]:
        """The :data:`TRACKED_MODES` the program has set."""
        return frozenset(mode for mode, on in self._modes.items() if on)

    @property
    def keypad_application(self) -> bool:
        """The program asked for application keypad keys (DECKPAM)."""
        return self._keypad_application

    def feed(self, data: bytes) -> list[int]:
        """Parse ``data``; the indexes of the visible lines it may have changed (every line
        it changed; with non-ASCII text, also the line above each)."""
        text = self._decoder.decode(data)
        changed: list[int] = self._vt.feed_str(text)[0] if text else []
        if changed and not text.isascii():
            # A wide character that does not fit at the end of a line wraps, and avt blanks
            # that last cell (in the current pen) without reporting its line: the line above
            # each reported one may have changed too. (Finding out which would mean reading
            # the lines back, ~100 us; repainting one more line costs less.)
            changed = sorted({*changed, *(row - 1 for row in changed if row > 0)})
        self._track_modes(data)
        return changed

    def resize(self, cols: int, rows: int) -> None:
        check_size(cols, rows)
        self._vt.resize(cols, rows)

    def resynchronise(self) -> None:
        """Bytes were skipped: drop a half-decoded character and abort a half-parsed sequence."""
        self._decoder.reset()
        self._vt.feed_str(CANCEL)
        self._tail = b""

    def lines(self) -> list[Line]:
        """The visible rows, as avt's lines of cells (for painting)."""
        return self._vt.view()

    def text(self) -> list[str]:
        """The visible rows as text (wide characters once, trailing blanks kept)."""
        return [line.text for line in self._vt.view()]

    def snapshot(self) -> bytes:
        """Bytes that make a fresh terminal of this size show this screen (and the primary
        screen behind an alternate one), with cursor, pen, margins, tab stops and modes."""
        # avt writes 8-bit CSI (U+009B); terminals in UTF-8 mode want the 7-bit form. A cell
        # never holds a C1 control, so the replacement cannot touch text.
        dump = self._vt.dump().replace("\x9b", "\x1b[").encode("utf-8")
        modes = b"".join(f"\x1b[?{mode}h".encode() for mode, on in self._modes.items() if on)
        keypad = b"\x1b=" if self._keypad_application else b""
        return SNAPSHOT_PREAMBLE + dump + modes + keypad

    def _track_modes(self, data: bytes) -> None:
        # Changes in the tail were applied with the previous slice: applying them again, before
        # the newer ones, leaves the same end state (set, reset and RIS are idempotent).
        scan = self._tail + data if self._tail else data
        self._tail = scan[-_MODE_TAIL:]  # not data's: slices of a byte or two happen
        if b"\x1b" not in scan:
            return
        singles = _KEYPAD_OR_RESET.findall(scan)
        if b"c" in singles:  # RIS, a full reset: what came before it no longer matters
            self._modes.clear()
            self._keypad_application = False
            scan = scan[scan.rfind(b"\x1bc") + 2 :]
            singles = _KEYPAD_OR_RESET.findall(scan)
        # Keypad and DEC modes are independent: for each, the last change wins.
        if singles:
            self._keypad_application = singles[-1] == b"="
        for params, action in _TRACKED_MODE_CHANGE.findall(scan):
            on = action == b"h"
            for param in params.split(b";"):
                if param.isdigit() and int(param) in TRACKED_MODES:
                    self._modes[int(param)] = on


class ScreenTracker:
    """A :class:`Screen` kept up to date with a stream that may outrun it.

    :meth:`append` and :meth:`resize` are O(1) and never parse (the PTY reader calls them);
    :meth:`work` parses a bounded slice (the host calls it when the loop is idle);
    :meth:`snapshot` parses whatever is queued, then dumps. Past ``max_backlog`` queued bytes the
    oldest are skipped (counted in :attr:`skipped_bytes`) and parsing resumes after the next
    newline, where a flood of text is back in a plain state.
    """

    def __init__(self, cols: int, rows: int, *, max_backlog: int = DEFAULT_MAX_BACKLOG) -> None:
        self.screen = Screen(cols, rows)
        self.max_backlog = max_backlog
        self._backlog: deque[bytes | WindowSize] = deque()
        self._backlog_bytes = 0
        self._offset = 0  # the stream offset the screen reflects (parsed or skipped)
        self._resync = False
        self.skipped_bytes = 0
        self.skips = 0

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def stream_offset(self) -> int:
        """The offset after everything appended."""
        return self._offset + self._backlog_bytes

    @property
    def pending_bytes(self) -> int:
        return self._backlog_bytes

    @property
    def size(self) -> WindowSize:
        """The size at the end of the stream (the screen itself may still be behind)."""
        for item in reversed(self._backlog):
            if isinstance(item, WindowSize):
                return item
        return self.screen.size

    def append(self, data: bytes) -> None:
        if not data:
            return
        self._backlog.append(data)
        self._backlog_bytes += len(data)
        if self._backlog_bytes > self.max_backlog:
            self._skip_oldest(self.max_backlog // 2)

    def resize(self, cols: int, rows: int) -> None:
        self._backlog.append(WindowSize(cols, rows))

    def work(self, budget: int) -> bool:
        """Parse up to ``budget`` queued bytes; True while more is queued."""
        while self._backlog and budget > 0:
            item = self._backlog.popleft()
            if isinstance(item, WindowSize):
                self.screen.resize(item.cols, item.rows)
                continue
            if len(item) > budget:
                self._backlog.appendleft(item[budget:])
                item = item[:budget]
            self._backlog_bytes -= len(item)
            budget -= len(item)
            self._feed(item)
        return bool(self._backlog)

    def catch_up(self) -> None:
        while self.work(1 << 30):
            pass

    def snapshot(self, *, tail: int | None = None) -> ScreenSnapshot:
        """The screen after everything appended. ``tail``: parse at most that many of the
        queued bytes, skipping the older ones (a picture during a flood, not an exact one)."""
        if tail is not None and self._backlog_bytes > tail:
            self._skip_oldest(tail)
        self.catch_up()
        size = self.screen.size
        return ScreenSnapshot(self._offset, size.cols, size.rows, self.screen.snapshot())

    def _feed(self, data: bytes) -> None:
        if self._resync:
            newline = data.find(b"\n")
            skipped = len(data) if newline < 0 else newline + 1
            self.skipped_bytes += skipped
            self._offset += skipped
            data = data[skipped:]
            if newline < 0:
                return
            self._resync = False
            self.screen.resynchronise()
        self.screen.feed(data)
        self._offset += len(data)

    def _skip_oldest(self, keep: int) -> None:
        while self._backlog_bytes > keep:
            item = self._backlog.popleft()
            if isinstance(item, WindowSize):  # sizes are never skipped, only applied early
                self.screen.resize(item.cols, item.rows)
                continue
            self._backlog_bytes -= len(item)
            self._offset += len(item)
            self.skipped_bytes += len(item)
        if not self._resync:
            self.skips += 1
        self._resync = True
