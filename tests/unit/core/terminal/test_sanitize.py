"""Viewer output filter and host input filter: queries and clipboard writes never get through."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshagent_gui.core.terminal.sanitize import OutputSanitizer, sanitize_input

ESC = b"\x1b"
ST = b"\x1b\\"


def clean(data: bytes) -> bytes:
    return OutputSanitizer().feed(data)


@pytest.mark.parametrize(
    "query",
    [
        b"\x1b[6n",  # cursor position
        b"\x1b[5n",
        b"\x1b[?6n",
        b"\x1b[?996n",  # colour scheme
        b"\x1b[c",  # DA1
        b"\x1b[0c",
        b"\x1b[>c",  # DA2
        b"\x1b[=c",  # DA3
        b"\x1b[x",  # DECREQTPARM
        b"\x1b[?2004$p",  # DECRQM
        b"\x1b[4$p",
        b"\x1b[>q",  # XTVERSION
        b"\x1b[>0q",
        b"\x1b[14t",  # window size in pixels
        b"\x1b[18t",
        b"\x1b[21t",  # the title (a classic injection)
        b"\x1b[8;100;200t",  # resize the viewer's window
        b"\x1b[3;0;0t",  # move it
        b"\x1b[?u",  # kitty keyboard flags
        b"\x1b[?1;1;0S",  # XTSMGRAPHICS
        b"\x1b[?4m",  # XTQMODKEYS
        b"\x1b[1;1;1;1;10;10*y",  # DECRQCRA: screen checksum
        b"\x1b[1$w",  # DECRQPSR
        b"\x1b[1'|",  # DECRQLP
        b"\x1bZ",  # DECID
        b"\x1b G",  # S8C1T: 8-bit answers
        b"\x05",  # ENQ
        b"\x1b]52;c;aGVsbG8=\x07",  # clipboard write, BEL
        b"\x1b]52;c;aGVsbG8=" + ST,  # clipboard write, ST
        b"\x1b]52;c;?" + ST,  # clipboard read: would send the viewer's clipboard
        b"\x1b]52;;" + b"A" * 100_000 + b"\x07",  # a big one
        b"\x1b]5522;type=write" + ST,  # kitty clipboard
        b"\x1b]1337;File=name=eA==;size=1:eA==\x07",  # iTerm2 download
        b"\x1b]5113;ac=send" + ST,  # kitty file transfer
        b"\x1b]10;?\x07",  # foreground colour query
        b"\x1b]11;?" + ST,
        b"\x1b]4;1;?\x07",  # palette query
        b"\x1b]12;?\x07",
        b"\x1b]99;;notify" + ST,
        b"\x1bP$qm" + ST,  # DECRQSS
        b"\x1bP+q544e" + ST,  # XTGETTCAP
        b"\x1bPtmux;\x1b\x1b]52;c;aGk=\x07" + ST,  # tmux passthrough of OSC 52
        b"\x1b_Ga=q,i=1;AAAA" + ST,  # kitty graphics query
        b"\x1b^privacy message" + ST,
        b"\x1bXstring" + ST,
        b"\xc2\x9b6n",  # C1 CSI
        b"\xc2\x9d52;c;aGk=\xc2\x9c",  # C1 OSC ... C1 ST
        b"\xc2\x90$qm\xc2\x9c",  # C1 DCS
    ],
)
def test_queries_and_side_effects_are_dropped(query: bytes) -> None:
    sanitizer = OutputSanitizer()
    assert sanitizer.feed(b"before" + query + b"after") == b"beforeafter"
    assert sanitizer.dropped_sequences >= 1


@pytest.mark.parametrize(
    "kept",
    [
        b"\x1b[31mred\x1b[0m",
        b"\x1b[38;2;1;2;3m\x1b[48;5;200m",
        b"\x1b[?1049h\x1b[?1049l",
        b"\x1b[?1000h\x1b[?1006h\x1b[?2004h\x1b[?1004h",
        b"\x1b[10;20r\x1b[5;1H\x1bM\x1b[2J\x1b[K",
        b"\x1b[22;0t\x1b[23;0t",  # title stack
        b"\x1b]0;my title\x07",
        b"\x1b]2;title with \xc3\xbcnicode" + ST,
        b"\x1b]8;id=1;https://example.com/a?b=c" + ST + b"link" + b"\x1b]8;;" + ST,
        b"\x1b]4;1;rgb:ff/00/00" + ST,
        b"\x1b]10;#ffffff\x07",
        b"\x1b]104\x07",
        b"\x1b]7;file://host/tmp" + ST,
        b"\x1b]133;A\x07",
        b"\x1b(0lqqk\x1b(B",
        b"\x1b7\x1b8\x1b=\x1b>\x1bc",
        b"\x1b[>4;2m\x1b[>1u\x1b[<u",
        b"plain text \xe6\xbc\xa2\xe5\xad\x97 \xf0\x9f\x99\x82 caf\xc3\xa9\r\n\t\x08\x07",
    ],
)
def test_ordinary_output_passes_unchanged(kept: bytes) -> None:
    sanitizer = OutputSanitizer()
    assert sanitizer.feed(kept) == kept
    assert sanitizer.dropped_sequences == 0


def test_c1_controls_become_seven_bit_and_invalid_utf8_becomes_replacement() -> None:
    assert clean(b"\xc2\x9b31mred") == b"\x1b[31mred"
    assert clean(b"\xc2\x85next") == b"\x1bEnext"  # NEL
    assert clean(b"a\x9b6nb") == b"a\xef\xbf\xbd6nb"  # a raw C1 byte is not UTF-8
    assert clean(b"\xff\xfe") == "\ufffd\ufffd".encode()
    assert clean(b"\xe6\xbc" + ESC + b"[1m") == "\ufffd".encode() + b"\x1b[1m"


def test_aborted_sequences_are_dropped_as_a_terminal_drops_them() -> None:
    assert clean(b"\x1b[3\x1b[1mX") == b"\x1b[1mX"  # ESC restarts
    assert clean(b"\x1b[3\x18X") == b"\x18X"  # CAN aborts
    assert clean(b"\x1b]0;t\x1b[1mX") == b"\x1b[1mX"  # ESC inside an OSC aborts it
    assert clean(b"\x1b[" + b"1;" * 100 + b"m" + b"X") == b"X"  # too long: dropped whole
    assert clean(b"\x1b[1\n2mX") == b"\n\x1b[12mX"  # C0 inside acts at once


def test_a_dcs_is_dropped_until_its_string_terminator_only() -> None:
    assert clean(b"\x1bPq#0;2;0;0;0\x07still sixel" + ST + b"after") == b"after"
    assert clean(b"\x1bPdata\x1b[31mX") == b"\x1b[31mX"  # ESC other than ST aborts it


def test_reset_forgets_a_half_read_sequence() -> None:
    sanitizer = OutputSanitizer()
    assert sanitizer.feed(b"\x1b]52;c;") == b""
    sanitizer.reset()
    assert sanitizer.feed(b"text") == b"text"


# Pieces a hostile stream is made of: every dangerous sequence, cut points inside them, and
# ordinary output.
PIECES = [
    b"\x1b",
    b"[",
    b"]",
    b"P",
    b"_",
    b"6n",
    b"52;c;",
    b"?",
    b"\x07",
    b"\\",
    b"\xc2",
    b"\x9b",
    b"\x9d",
    b"\x9c",
    b"\x90",
    b"\x05",
    b"\x18",
    b";",
    b"0",
    b"1",
    b"c",
    b"t",
    b"m",
    b"Z",
    b" G",
    b"text",
    b"\xe6\xbc\xa2",
    b"\x1b[6n",
    b"\x1b]52;c;?\x07",
    b"\x1b]0;title\x07",
    b"\x1b[31m",
    b"\x1bPtmux;",
]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from(PIECES), max_size=40),
    st.lists(st.integers(1, 50), min_size=1, max_size=20),
)
def test_no_split_of_a_hostile_stream_gets_anything_through(
    pieces: list[bytes], sizes: list[int]
) -> None:
    data = b"".join(pieces)
    whole = OutputSanitizer().feed(data)
    # Splitting anywhere gives the same output.
    sanitizer = OutputSanitizer()
    split = b""
    pos = 0
    index = 0
    while pos < len(data):
        size = sizes[index % len(sizes)]
        split += sanitizer.feed(data[pos : pos + size])
        pos += size
        index += 1
    assert split == whole
    # The output holds nothing the filter would drop (a second pass is the identity) and is
    # valid UTF-8 without C1 controls.
    again = OutputSanitizer()
    assert again.feed(whole) == whole and again.dropped_sequences == 0
    text = whole.decode("utf-8")
    assert not any(0x80 <= ord(ch) <= 0x9F for ch in text)
    assert not re.search(rb"\x1b\[[0-9;?>=]*[ncx]|\x1b\]52|\x1b[P_^X]|\x05", whole)


@pytest.mark.parametrize(
    ("typed", "reaches_the_pty"),
    [
        (b"ls -l\r", b"ls -l\r"),
        (b"\x1b[A\x1b[1;5C\x1bOP\x1b[15~", b"\x1b[A\x1b[1;5C\x1bOP\x1b[15~"),  # keys
        (b"\x1b[<0;10;5M\x1b[<0;10;5m", b"\x1b[<0;10;5M\x1b[<0;10;5m"),  # SGR mouse
        (b"\x1b[200~pasted\x1b[201~", b"\x1b[200~pasted\x1b[201~"),
        (b"\x1b[I\x1b[O", b"\x1b[I\x1b[O"),  # focus events
        (b"\x1b[97;5u", b"\x1b[97;5u"),  # kitty key
        (b"\x1b[1;2R", b"\x1b[1;2R"),  # Shift+F3, or a cursor report: cannot tell
        (b"\x03\x05\x1bx", b"\x03\x05\x1bx"),  # Ctrl+C, Ctrl+E, Alt+x
        (b"a\x1b[?62;22cb", b"ab"),  # DA1 answer
        (b"\x1b[>1;10;0c", b""),  # DA2 answer
        (b"\x1b[?2004;1$y", b""),  # DECRPM
        (b"\x1b[4;1$y", b""),
        (b"\x1b[0n", b""),  # DSR OK
        (b"\x1b[8;24;80t", b""),  # window size report
        (b"\x1b[?1u", b""),  # kitty flags
        (b"x\x1b]11;rgb:0000/0000/0000\x1b\\y", b"xy"),  # colour answer
        (b"\x1b]52;c;c2VjcmV0\x07", b""),  # a clipboard answer
        (b"\x1bP1$r0m\x1b\\", b""),  # DECRQSS answer
        (b"\x1bP>|xterm(390)\x1b\\", b""),  # XTVERSION answer
        (b"\x1b]unterminated", b"\x1b]unterminated"),  # Alt+] then text: a key
    ],
)
def test_the_host_drops_terminal_answers_from_input(typed: bytes, reaches_the_pty: bytes) -> None:
    assert sanitize_input(typed) == reaches_the_pty
