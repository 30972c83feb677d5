"""The screen model: snapshots repaint a fresh terminal exactly; the tracker skips floods safely."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from meshagent_gui.core.terminal.screen import (
    SNAPSHOT_PREAMBLE,
    TRACKED_MODES,
    Screen,
    ScreenTracker,
)

CSI = "\x1b["


def screen_of(data: bytes | str, cols: int = 40, rows: int = 10) -> Screen:
    screen = Screen(cols, rows)
    screen.feed(data.encode() if isinstance(data, str) else data)
    return screen


def replayed(screen: Screen) -> Screen:
    """A fresh screen of the same size fed the snapshot."""
    size = screen.size
    return screen_of(screen.snapshot(), size.cols, size.rows)


def cells(screen: Screen) -> list[list[tuple[str, object, object, bool, bool, bool]]]:
    """Every cell as it looks: character, colours, bold, inverse, underline."""
    rows = []
    for line in screen.lines():
        row = []
        for cell in line.cells:
            pen = cell.pen
            colours = (_colour(pen.foreground), _colour(pen.background))
            row.append((cell.char, *colours, pen.bold, pen.inverse, pen.underline))
        rows.append(row)
    return rows


def _colour(colour: object) -> object:
    return repr(colour)  # Color.RGB(1, 2, 3), Color.Indexed(9) or None


def assert_same_screen(a: Screen, b: Screen) -> None:
    assert a.text() == b.text()
    assert a.cursor == b.cursor
    assert cells(a) == cells(b)


def test_text_colours_and_wide_characters() -> None:
    screen = screen_of(f"plain {CSI}31mred{CSI}0m 漢字 🙂 end\r\nline 2", cols=30, rows=3)
    assert screen.text()[0].rstrip() == "plain red 漢字 🙂 end"
    assert screen.text()[1].rstrip() == "line 2"
    assert screen.cursor == (6, 1)
    # Split anywhere, UTF-8 included, the result is the same.
    data = f"plain {CSI}31mred{CSI}0m 漢字 🙂 end\r\nline 2".encode()
    split = Screen(30, 3)
    for byte in data:
        split.feed(bytes([byte]))
    assert_same_screen(screen, split)


def test_a_snapshot_taken_inside_an_alternate_screen_keeps_the_primary_behind_it() -> None:
    shell = "".join(f"$ line {i}\r\n" for i in range(12)) + "$ vim"
    vim = f"{CSI}?1049h{CSI}H{CSI}2J{CSI}1;1H{CSI}38;5;130m  1 {CSI}0mdef f(): 漢字{CSI}5;3H"
    screen = screen_of(shell + vim)
    copy = replayed(screen)
    assert_same_screen(screen, copy)
    assert copy.text()[0].startswith("  1 def f(): 漢字")
    # vim exits: both show the shell again, as it was.
    for each in (screen, copy):
        each.feed(f"{CSI}?1049l".encode())
    assert_same_screen(screen, copy)
    assert copy.text()[-1].startswith("$ vim")


def test_scroll_regions_origin_mode_and_pending_wrap_survive_a_snapshot() -> None:
    data = (
        f"{CSI}3;7r{CSI}3;1H"
        + "".join(f"{CSI}3{i % 8}mregion {i}{CSI}m\r\n" for i in range(12))
        + f"{CSI}?6h{CSI}2;1Hrelative"
        + f"{CSI}10;1H"
        + "x" * 40  # the cursor waits past the last column
    )
    screen = screen_of(data)
    copy = replayed(screen)
    assert_same_screen(screen, copy)
    # The same next bytes do the same thing on both (margins, origin mode, wrap pending).
    for each in (screen, copy):
        each.feed(f"wrapped{CSI}1;1Htop\n\n\n\n\n\n\nscrolls".encode())
    assert_same_screen(screen, copy)


def test_snapshot_starts_by_resetting_whatever_the_terminal_was_doing() -> None:
    dirty = screen_of(f"{CSI}?1049h{CSI}5;8r{CSI}41mjunk everywhere{CSI}?25l\x1b(0")
    clean = screen_of("hello")
    dirty.feed(clean.snapshot())
    assert_same_screen(dirty, clean)
    assert clean.snapshot().startswith(SNAPSHOT_PREAMBLE)


def test_input_modes_avt_does_not_keep_are_restored() -> None:
    screen = screen_of(f"{CSI}?1000h{CSI}?1006h{CSI}?2004h\x1b={CSI}?1000l")
    tail = screen.snapshot()[len(SNAPSHOT_PREAMBLE) :]
    assert b"\x1b[?1006h" in tail and b"\x1b[?2004h" in tail and tail.endswith(b"\x1b=")
    assert b"\x1b[?1000h" not in tail
    screen.feed(b"\x1bc")  # a full reset forgets them
    assert b"\x1b[?2004h" not in screen.snapshot()[len(SNAPSHOT_PREAMBLE) :]


def test_a_mode_change_split_between_feeds_is_still_seen() -> None:
    screen = Screen(40, 10)
    screen.feed(b"abc\x1b[?20")
    screen.feed(b"04h")
    assert b"\x1b[?2004h" in screen.snapshot()[len(SNAPSHOT_PREAMBLE) :]


def test_resize_and_eight_bit_csi_in_avt_dumps_become_seven_bit() -> None:
    screen = screen_of(f"{CSI}44mblue{CSI}0m")
    screen.resize(60, 20)
    assert (screen.size.cols, screen.size.rows) == (60, 20)
    snapshot = screen.snapshot()
    assert "\x9b".encode() not in snapshot and b"\x9b" not in snapshot


def test_feed_reports_the_lines_it_changed() -> None:
    screen = Screen(20, 5)
    assert screen.feed(b"hello") == [0]  # not every line, though the terminal is fresh
    assert sorted(screen.feed(b"\r\nworld\r\n\r\nlast")) == [1, 3]
    assert screen.feed(b"\xe6\xbc") == []  # half a character: nothing drawn yet
    # Non-ASCII text: the line above is reported too (a wide character may have wrapped from
    # it, blanking its last cell, which avt does not report).
    assert screen.feed(b"\xa2") == [2, 3]
    assert screen.feed(b"") == []
    assert screen.text()[3].rstrip() == "last漢"


def test_bracketed_paste_follows_the_program_split_or_combined_and_resets() -> None:
    screen = Screen(40, 10)
    assert not screen.bracketed_paste
    screen.feed(b"prompt \x1b[?20")
    assert not screen.bracketed_paste
    screen.feed(b"04h$ ")
    assert screen.bracketed_paste
    screen.feed(b"\x1b[?1;2004l")
    assert not screen.bracketed_paste
    screen.feed(b"\x1b[?1000;2004h")
    assert screen.bracketed_paste
    screen.feed(b"\x1bc")
    assert not screen.bracketed_paste


def test_cursor_visibility_cursor_keys_and_cells_for_painting() -> None:
    screen = screen_of(f"{CSI}?25l{CSI}?1h{CSI}1m漢x", cols=8, rows=2)
    assert not screen.cursor_visible and screen.application_cursor_keys
    assert screen.cursor == (3, 0)
    lines = screen.lines()
    assert [len(line) for line in lines] == [8, 8]
    wide, right_half, x = lines[0].cells[:3]
    assert (wide.char, wide.width, right_half.width, x.char, x.pen.bold) == ("漢", 2, 0, "x", True)
    screen.feed(f"{CSI}?25h{CSI}?1l".encode())
    assert screen.cursor_visible and not screen.application_cursor_keys


# Input mode changes among other output, applied in order by a plain model of a terminal.
_ModeChange = tuple[str, tuple[int, ...], bool]
_mode_changes: st.SearchStrategy[_ModeChange] = st.one_of(
    st.tuples(
        st.just("dec"),
        st.lists(
            st.sampled_from([*TRACKED_MODES, 1, 25, 1049, 12004, 200]), min_size=1, max_size=3
        ).map(tuple),
        st.booleans(),
    ),
    st.tuples(st.just("keypad"), st.just(()), st.booleans()),
    st.tuples(st.just("reset"), st.just(()), st.just(False)),
    st.tuples(
        st.sampled_from(["text", f"{CSI}31m", f"{CSI}?25l", "\x1b[2J"]), st.just(()), st.just(False)
    ),
)


def _mode_stream(changes: list[_ModeChange]) -> tuple[bytes, frozenset[int], bool]:
    """The bytes, then the modes left on and the keypad mode, applying changes in order."""
    out, modes, keypad = [], dict[int, bool](), False
    for kind, params, on in changes:
        if kind == "dec":
            out.append(f"{CSI}?{';'.join(map(str, params))}{'h' if on else 'l'}")
            modes.update((mode, on) for mode in params if mode in TRACKED_MODES)
        elif kind == "keypad":
            out.append("\x1b=" if on else "\x1b>")
            keypad = on
        elif kind == "reset":
            out.append("\x1bc")
            modes, keypad = {}, False
        else:
            out.append(kind)
    return "".join(out).encode(), frozenset(m for m, on in modes.items() if on), keypad


@settings(max_examples=200, deadline=None)
@given(st.lists(_mode_changes, max_size=30), st.data())
def test_input_modes_end_as_applied_in_order_however_the_output_is_split(
    changes: list[_ModeChange], data: st.DataObject
) -> None:
    stream, modes, keypad = _mode_stream(changes)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    screen = Screen(40, 10)
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        screen.feed(stream[start:end])
    assert (screen.input_modes, screen.keypad_application) == (modes, keypad)
    assert screen.bracketed_paste == (2004 in modes)


def test_a_mode_change_fed_a_byte_at_a_time_is_seen() -> None:
    screen = Screen(40, 10)
    for byte in b"\x1b[?1000;2004h":
        screen.feed(bytes([byte]))
    assert screen.input_modes == {1000, 2004}


# A grammar of what full-screen programs write.
_pieces = st.one_of(
    st.text(alphabet="abcXYZ 漢字🙂é-", min_size=1, max_size=12),
    st.sampled_from(["\r\n", "\n", "\r", "\t", "\x08", "\x1b7", "\x1b8", "\x1bM", "\x1bD"]),
    st.builds(lambda r, c: f"{CSI}{r};{c}H", st.integers(1, 12), st.integers(1, 42)),
    st.builds(lambda n: f"{CSI}{n}m", st.sampled_from([0, 1, 4, 7, 31, 42, 93, 22, 27])),
    st.builds(lambda n: f"{CSI}38;5;{n}m", st.integers(0, 255)),
    st.builds(lambda r, g, b: f"{CSI}48;2;{r};{g};{b}m", *[st.integers(0, 255)] * 3),
    st.builds(lambda t, b: f"{CSI}{t};{b}r", st.integers(1, 5), st.integers(5, 10)),
    st.sampled_from(
        [
            *(f"{CSI}{s}" for s in ("r", "?1049h", "?1049l", "2J", "K", "1J", "2L", "M", "3@")),
            *(f"{CSI}{s}" for s in ("2P", "4X", "S", "2T", "?6h", "?6l", "?7l", "?7h", "4h")),
            *(f"{CSI}{s}" for s in ("4l", "?25l", "?25h", "3g")),
            *("\x1b(0", "\x1b(B", "\x0e", "\x0f", "\x1bH"),
        ]
    ),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_pieces, max_size=60), st.lists(_pieces, max_size=10))
def test_a_snapshot_reproduces_the_screen_and_what_comes_after(
    before: list[str], after: list[str]
) -> None:
    """For any program output, a fresh terminal fed the snapshot shows the same screen, and
    keeps showing the same screen as more output arrives (modes, margins, pen carried over)."""
    screen = screen_of("".join(before))
    copy = replayed(screen)
    assert_same_screen(screen, copy)
    tail = "".join(after).encode()
    screen.feed(tail)
    copy.feed(tail)
    assert_same_screen(screen, copy)


@settings(max_examples=150, deadline=None)
@given(st.lists(_pieces, max_size=40), st.lists(_pieces, min_size=1, max_size=10))
@example(before=[], after=["\x1b[1m", "\x1b[1;40H", "字"])  # found by CI: a wide char wraps
def test_lines_feed_does_not_report_are_unchanged(before: list[str], after: list[str]) -> None:
    """The widget repaints only the reported lines: any other line must look the same."""
    screen = screen_of("".join(before))
    old = cells(screen)
    changed = screen.feed("".join(after).encode())
    new = cells(screen)
    assert [row for row in range(len(new)) if new[row] != old[row] and row not in changed] == []


# ---------------------------------------------------------------- tracker


def test_the_tracker_parses_only_when_asked_and_in_slices() -> None:
    tracker = ScreenTracker(40, 10)
    tracker.append(b"hello\r\n")
    tracker.append(b"world")
    assert tracker.pending_bytes == 12 and tracker.offset == 0
    assert tracker.screen.text()[0].strip() == ""  # nothing parsed on append
    assert tracker.work(3)  # more left
    assert tracker.offset == 3
    assert not tracker.work(100)
    assert tracker.offset == tracker.stream_offset == 12
    assert tracker.screen.text()[1].startswith("world")


def test_resizes_apply_in_stream_order() -> None:
    tracker = ScreenTracker(40, 10)
    tracker.append(b"x" * 30)
    tracker.resize(20, 5)
    tracker.append(b"\r\nafter")
    assert (tracker.size.cols, tracker.size.rows) == (20, 5)
    assert tracker.screen.size.cols == 40  # not parsed yet
    snapshot = tracker.snapshot()
    assert (snapshot.cols, snapshot.rows, snapshot.offset) == (20, 5, 37)


def test_a_flood_past_the_backlog_is_skipped_and_the_screen_recovers() -> None:
    tracker = ScreenTracker(40, 10, max_backlog=4096)
    lines = [f"line {i:05d} {CSI}3{i % 8}mcoloured{CSI}0m\r\n".encode() for i in range(2000)]
    for line in lines:
        tracker.append(line)
    assert tracker.skips >= 1 and tracker.skipped_bytes > 0
    assert tracker.pending_bytes <= 4096
    snapshot = tracker.snapshot()
    total = sum(len(line) for line in lines)
    assert snapshot.offset == total  # skipped bytes still count
    # The screen shows the last lines exactly, as a terminal fed everything would.
    reference = screen_of(b"".join(lines))
    assert tracker.screen.text() == reference.text()
    assert_same_screen(tracker.screen, reference)


def test_a_skip_resumes_at_a_line_start_not_inside_a_sequence() -> None:
    tracker = ScreenTracker(40, 10, max_backlog=64)
    tracker.append(b"a" * 100)  # skipped whole
    tracker.append(b"9;1H half a sequence\r\nclean line")
    tracker.catch_up()
    assert tracker.screen.text()[0].startswith("clean line")
