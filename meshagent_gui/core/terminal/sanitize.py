"""Filters that keep a viewer's terminal from answering the shared program or obeying its clipboard.

Which direction needs filtering
===============================

A shared program writes escape sequences meant for *a* terminal. Two kinds must never reach a
viewer's terminal:

* **queries** (cursor position DSR 6n, device attributes DA, mode reports DECRQM, colour queries
  ``OSC 10;?``, XTVERSION, DECRQSS/XTGETTCAP, window reports ``CSI 14t``/``21t``, ENQ, DECID,
  the DECRQCRA screen checksum, ...): the viewer's terminal would *type* its answer into the
  viewer's stdin, which the viewer forwards as Input while it controls the PTY. The program
  would then get a second (wrong: another window size, another font) answer after the host
  console's, or, with ``OSC 52;c;?``, the *viewer's clipboard contents*;
* **clipboard writes** (``OSC 52``, kitty's ``OSC 5522``) and other side effects on the viewer's
  machine (iTerm2 ``OSC 1337`` file downloads, kitty file transfer ``OSC 5113``, notifications,
  window moves and resizes ``CSI 1..9 t``, DCS passthrough such as ``ESC P tmux;`` that would
  reach the terminal *outside* a tmux the viewer runs in, 8-bit response mode ``ESC SP G``).

So the filter that matters is on the **output** path, host -> viewer, applied by the viewer just
before its console (:class:`OutputSanitizer`, snapshot bytes included). Filtering the answers
on the way back cannot work: by the time an answer exists the viewer's clipboard already left
its machine, and a cursor-position report (``CSI row;col R``) is byte for byte a modified F3
key. It runs on the viewer, not the host, because the viewer must not trust the host: a hostile
or compromised host would simply skip a host-side filter. The host keeps the raw stream (its
own console is the terminal that should answer, and the emulator ignores queries anyway).

The host adds a second, best-effort filter on the controller's Input (:func:`sanitize_input`):
it drops strings (OSC/DCS/APC/PM/SOS) and reports that no keyboard or mouse produces (``CSI ?``,
``CSI >``, ``CSI =`` prefixed, and ``n``/``t``/``x``/``$y`` finals), in case a viewer without
the output filter (an older or third-party client) answers anyway. Cursor position reports are
let through, since they cannot be told from modified F3. View-only parties never get this far:
the host drops all their input.

Allowed OSC numbers are a list, not a deny list: titles (0, 1, 2), palette and dynamic colours
*set* without ``?`` (4, 10-19, 104, 110-119), working directory (7), hyperlinks (8) and shell
prompt marks (133). DCS, SOS, PM and APC strings are dropped whole (Sixel and kitty graphics
included: images do not reach viewers). 8-bit C1 controls (UTF-8 encoded U+0080-U+009F) are
read as their 7-bit ESC forms, and invalid UTF-8 becomes U+FFFD, so a terminal that still
honours raw C1 bytes cannot be reached around the filter.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import Enum, auto
from typing import Final

ESC: Final = 0x1B
BEL: Final = 0x07
CAN: Final = 0x18
SUB: Final = 0x1A
ENQ: Final = 0x05
REPLACEMENT: Final = "\ufffd".encode()

MAX_CSI: Final = 64
"""A longer control sequence is malformed: dropped whole."""
MAX_KEPT_OSC: Final = 4096
"""An allowed OSC longer than this (a huge title, say) is dropped rather than buffered."""

ALLOWED_OSC: Final = frozenset(
    {0, 1, 2, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 104, 133} | set(range(110, 120))
)
_TITLE_STACK: Final = frozenset({22, 23})
_MAX_OSC_NUMBER: Final = 6

# Whole sequences as they usually come, each matched in one step; "lone" is an ESC or a C1
# control that starts none of them here (cut by the chunk's end, or odd): the state machine
# below takes over from it. ENQ asks for the answerback message.
_TOKEN: Final = re.compile(
    rb"(?P<csi>\x1b\[[<=>?]?[0-9;:]{0,60}[ -/]{0,2}[@-~])"
    rb"|(?P<osc>\x1b\](?:[^\x07\x18\x1a\x1b\xc2]|\xc2[^\x80-\x9f]){0,4096}(?:\x07|\x1b\\))"
    rb"|(?P<string>\x1b[P^_X](?:[^\x18\x1a\x1b\xc2]|\xc2[^\x80-\x9f])*\x1b\\)"
    rb"|(?P<esc>\x1b(?:[ -/]{1,3}[0-~]|[0-OQ-WYZ\\`-~]))"
    rb"|(?P<enq>\x05)"
    rb"|(?P<lone>\x1b|\xc2[\x80-\x9f])"
)
_SPECIAL: Final = re.compile(rb"[\x05\x1b\xc2]")
_DECISION_CACHE: Final = 4096
# Inside a kept or dropped string: where it may end (or be aborted).
# (A 0xC2 at the very end may start a C1 ST: it is held for the next chunk.)
_OSC_END: Final = re.compile(rb"[\x07\x18\x1a\x1b]|\xc2(?:[\x80-\x9f]|\Z)")
_STRING_END: Final = re.compile(rb"[\x18\x1a\x1b]|\xc2(?:[\x80-\x9f]|\Z)")
# C1 code point -> the final byte of its 7-bit form (ESC + byte).
_C1_INTRODUCERS: Final = {
    b"[": "csi",
    b"]": "osc",
    b"P": "dcs",
    b"X": "sos",
    b"^": "pm",
    b"_": "apc",
}


class _State(Enum):
    GROUND = auto()
    ESCAPE = auto()  # after ESC, collecting intermediates
    CSI = auto()  # collecting a control sequence
    CSI_IGNORE = auto()  # a malformed control sequence: drop through its final byte
    OSC = auto()  # an allowed-so-far OSC string, buffered
    OSC_ESC = auto()  # ESC seen inside a kept OSC: ST or an abort
    DISCARD = auto()  # a dropped string (OSC with a bad number, DCS, SOS, PM, APC)
    DISCARD_ESC = auto()  # ESC seen inside a dropped string


def _csi_is_query(prefix: bytes, params: bytes, intermediates: bytes, final: int) -> bool:
    """Control sequences that make a terminal answer, or act on the viewer's window."""
    f = chr(final)
    if f == "n":  # DSR and CPR requests, every form
        return True
    if f == "c" and not intermediates:  # DA1, DA2 (>), DA3 (=)
        return True
    if f == "x" and not prefix and not intermediates:  # DECREQTPARM
        return True
    if f == "t" and not prefix and not intermediates:
        # xterm window operations: 1-9 move/resize/raise the window, 11-21 report, 24+
        # resize it in lines. Only the title stack (22, 23) is harmless.
        first = params.split(b";", 1)[0]
        return not (first.isdigit() and int(first) in _TITLE_STACK)
    if prefix == b"?" and f in "uSm":  # kitty keyboard flags, XTSMGRAPHICS, XTQMODKEYS
        return True
    if prefix == b">" and f == "q":  # XTVERSION
        return True
    if intermediates == b"$" and f in "pwu":  # DECRQM, DECRQPSR, DECRQTSR
        return True
    if intermediates == b"*" and f == "y":  # DECRQCRA: a checksum of screen contents
        return True
    return intermediates == b"'" and f == "|"  # DECRQLP: locator position


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _osc_number_allowed(number: bytes) -> bool:
    return number.isdigit() and len(number) <= _MAX_OSC_NUMBER and int(number) in ALLOWED_OSC


def _osc_allowed(payload: bytes) -> bool:
    number, _, rest = payload.partition(b";")
    return _osc_number_allowed(number) and b"?" not in rest.split(b";")  # "10;?": a query


def _incomplete_tail(text: bytes) -> int:
    """How many bytes at the end of ``text`` begin a UTF-8 character that is not complete."""
    for back in range(1, min(3, len(text)) + 1):
        byte = text[-back]
        if byte < 0x80:
            return 0
        if byte > 0xF4 or 0xC0 <= byte < 0xC2:  # never part of UTF-8
            return 0
        if byte >= 0xC2:  # a lead byte: how long its character should be
            length = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return back if length > back else 0
    return 0


class OutputSanitizer:
    """Streaming filter for host -> viewer bytes (Output and Snapshot data), split anywhere.

    ``feed(data) -> bytes`` returns what may go to the viewer's terminal; a sequence cut by a
    chunk boundary is held until it completes. Call :meth:`reset` when a snapshot starts.
    Counters say what was dropped (tests and diagnostics; never the contents).
    """

    def __init__(self) -> None:
        self.dropped_sequences = 0
        self._keep: dict[bytes, bool] = {}
        self._handlers: dict[_State, Callable[[bytes, int, bytearray], int]] = {
            _State.GROUND: self._ground,
            _State.ESCAPE: self._escape,
            _State.CSI: self._csi,
            _State.CSI_IGNORE: self._csi,
            _State.OSC: self._osc,
            _State.OSC_ESC: self._string_esc,
            _State.DISCARD: self._discard,
            _State.DISCARD_ESC: self._string_esc,
        }
        self.reset()

    def reset(self) -> None:
        self._state = _State.GROUND
        self._seq = bytearray()  # the sequence being collected (kept or not yet decided)
        self._pending = b""  # an incomplete UTF-8 character or C1 lead byte at a chunk's end
        self._discard_on_bel = False

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        chunk = self._pending + bytes(data)
        self._pending = b""
        out = bytearray()
        pos = 0
        end = len(chunk)
        handlers = self._handlers
        while pos < end:
            pos = handlers[self._state](chunk, pos, out)
        return bytes(out)

    def _text(self, text: bytes, out: bytearray, *, at_end: bool) -> None:
        """Append text, each piece valid UTF-8 on its own (so no C1 control can form where
        two pieces meet)."""
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            cut = _incomplete_tail(text) if at_end else 0
            if cut:  # a character cut by the chunk's end waits for the rest
                self._pending = text[-cut:]
                text = text[:-cut]
            # Invalid bytes become U+FFFD, as a UTF-8 terminal shows them; raw C1 bytes thus
            # never reach a terminal that would still honour them.
            out += text.decode("utf-8", "replace").encode("utf-8")
            return
        out += text

    # ------------------------------------------------------------ ground: text, fast

    def _ground(self, chunk: bytes, pos: int, out: bytearray) -> int:
        keep = self._keep
        search = _SPECIAL.search
        token = _TOKEN.match
        text_from = pos
        while (special := search(chunk, pos)) is not None:
            start = special.start()
            match = token(chunk, start)
            if match is None:  # 0xC2 starting an ordinary character
                pos = start + 1
                continue
            if start > text_from:
                text = chunk[text_from:start]
                if text.isascii():
                    out += text
                else:
                    self._text(text, out, at_end=False)
            kind = match.lastgroup
            if kind == "lone":  # a sequence cut by the chunk's end, a C1 control, an oddity
                lone = match.group()
                if lone == b"\x1b":
                    self._enter_escape()
                else:
                    self._c1(lone[1] - 0x40, out)
                return match.end()
            sequence = match.group()
            decision = keep.get(sequence)
            if decision is None:
                decision = self._decide(kind, sequence)
                if len(keep) >= _DECISION_CACHE:
                    keep.clear()
                keep[sequence] = decision
            if decision:
                out += sequence
            else:
                self.dropped_sequences += 1
            pos = text_from = match.end()
        if text_from < len(chunk):
            self._text(chunk[text_from:], out, at_end=True)
        return len(chunk)

    def _decide(self, kind: str | None, sequence: bytes) -> bool:
        """Whether a whole sequence (a ``_TOKEN`` match) may reach the viewer's terminal."""
        if kind == "csi":
            body = sequence[2:-1]
            prefix = body[:1] if body[:1] in (b"<", b"=", b">", b"?") else b""
            rest = body[len(prefix) :]
            split = len(rest)
            while split and 0x20 <= rest[split - 1] <= 0x2F:
                split -= 1
            return not _csi_is_query(prefix, rest[:split], rest[split:], sequence[-1])
        if kind == "osc":
            payload = sequence[2:-1] if sequence.endswith(b"\x07") else sequence[2:-2]
            return len(sequence) <= MAX_KEPT_OSC and _osc_allowed(payload) and _is_utf8(payload)
        if kind == "esc":
            # DECID (ESC Z) asks for an answer; ESC SP G switches to 8-bit answers; a stray ST
            # (left by an aborted string) does nothing.
            return sequence not in (b"\x1bZ", b"\x1b G", b"\x1b\\")
        return False  # DCS, SOS, PM, APC strings; ENQ

    def _c1(self, final: int, out: bytearray) -> None:
        """An 8-bit C1 control, handled as ESC + its 7-bit final byte."""
        self._enter_escape()
        self._escape(bytes([final]), 0, out)

    def _enter_escape(self) -> None:
        self._state = _State.ESCAPE
        self._seq = bytearray(b"\x1b")

    # ------------------------------------------------------------ escape sequences

    def _escape(self, chunk: bytes, pos: int, out: bytearray) -> int:
        byte = chunk[pos]
        if byte == 0xC2:  # maybe a C1 control inside: needs the next byte
            return self._c1_inside(chunk, pos, out)
        if byte >= 0x7F:
            if byte == 0x7F:  # DEL is ignored inside sequences
                return pos + 1
            self._abort(out)  # not a sequence after all: the byte is text again
            return pos
        if byte == ESC:
            self._abort(out)
            self._enter_escape()
            return pos + 1
        if byte in (CAN, SUB):
            self._abort(out)
            out.append(byte)
            return pos + 1
        if byte < 0x20:  # C0 controls act at once, even inside a sequence
            if byte != ENQ:
                out.append(byte)
            return pos + 1
        if 0x20 <= byte <= 0x2F:  # intermediate
            self._seq.append(byte)
            if len(self._seq) > MAX_CSI:
                self._drop()
            return pos + 1
        if len(self._seq) == 1:
            kind = _C1_INTRODUCERS.get(bytes([byte]))
            if kind == "csi":
                self._seq.append(byte)
                self._state = _State.CSI
                return pos + 1
            if kind == "osc":
                self._seq.append(byte)
                self._state = _State.OSC
                return pos + 1
            if kind is not None:  # DCS, SOS, PM, APC: never passed on
                self._state = _State.DISCARD
                self._discard_on_bel = False
                self.dropped_sequences += 1
                return pos + 1
        self._seq.append(byte)
        sequence = bytes(self._seq)
        # DECID (ESC Z) asks for an answer; ESC SP G switches the terminal to 8-bit answers.
        if sequence in (b"\x1bZ", b"\x1b G"):
            self._drop()
        elif sequence == b"\x1b\\":  # a stray ST (left by an aborted string) does nothing
            self._state = _State.GROUND
        else:
            out += sequence
            self._state = _State.GROUND
        return pos + 1

    def _csi(self, chunk: bytes, pos: int, out: bytearray) -> int:
        byte = chunk[pos]
        if byte == 0xC2 or byte in (ESC, CAN, SUB):
            return self._escape(chunk, pos, out)
        if byte < 0x20:
            if byte != ENQ:
                out.append(byte)
            return pos + 1
        if byte >= 0x7F:
            if byte == 0x7F:
                return pos + 1
            self._abort(out)
            return pos
        if 0x40 <= byte <= 0x7E:  # final byte
            if self._state is _State.CSI_IGNORE:
                self._drop()
                return pos + 1
            self._seq.append(byte)
            self._finish_csi(out)
            return pos + 1
        self._seq.append(byte)
        if len(self._seq) > MAX_CSI:
            self._state = _State.CSI_IGNORE
        return pos + 1

    def _finish_csi(self, out: bytearray) -> None:
        if self._decide("csi", bytes(self._seq)):
            out += self._seq
            self._state = _State.GROUND
        else:
            self._drop()

    # ------------------------------------------------------------ strings

    def _osc(self, chunk: bytes, pos: int, out: bytearray) -> int:
        match = _OSC_END.search(chunk, pos)
        stop = match.start() if match else len(chunk)
        # Never buffer more than the cap, whatever the peer sends before a terminator.
        self._seq += chunk[pos : min(stop, pos + MAX_KEPT_OSC + 1)]
        if len(self._seq) > MAX_KEPT_OSC or not self._osc_prefix_allowed():
            self._discard_osc()
            return stop
        if match is None:
            return stop
        byte = chunk[stop]
        if byte == BEL:
            self._end_osc(b"\x07", out)
            return stop + 1
        if byte == ESC:
            self._state = _State.OSC_ESC
            return stop + 1
        if byte == 0xC2:
            return self._c1_inside(chunk, stop, out)
        self._abort(out)  # CAN, SUB
        out.append(byte)
        return stop + 1

    def _osc_prefix_allowed(self) -> bool:
        number, semicolon, _ = bytes(self._seq[2:]).partition(b";")
        if not semicolon:  # the number is still arriving
            return not number or (number.isdigit() and len(number) <= _MAX_OSC_NUMBER)
        return _osc_number_allowed(number)

    def _discard_osc(self) -> None:
        self._state = _State.DISCARD
        self._discard_on_bel = True
        self._seq = bytearray()
        self.dropped_sequences += 1

    def _end_osc(self, terminator: bytes, out: bytearray) -> None:
        payload = bytes(self._seq[2:])
        if _osc_allowed(payload) and _is_utf8(payload):
            out += self._seq
            out += terminator
        else:
            self.dropped_sequences += 1
        self._seq = bytearray()
        self._state = _State.GROUND

    def _discard(self, chunk: bytes, pos: int, out: bytearray) -> int:
        match = (_OSC_END if self._discard_on_bel else _STRING_END).search(chunk, pos)
        if match is None:
            return len(chunk)
        stop = match.start()
        byte = chunk[stop]
        if byte == BEL:  # only an OSC ends with BEL
            self._state = _State.GROUND
            return stop + 1
        if byte == ESC:
            self._state = _State.DISCARD_ESC
            return stop + 1
        if byte == 0xC2:
            return self._c1_inside(chunk, stop, out)
        self._state = _State.GROUND  # CAN, SUB end the string; the terminal sees neither
        out.append(byte)
        return stop + 1

    def _string_esc(self, chunk: bytes, pos: int, out: bytearray) -> int:
        """ESC inside a string: ``ESC \\`` is ST; any other ESC aborts the string."""
        byte = chunk[pos]
        if byte == 0x5C:
            if self._state is _State.OSC_ESC:
                self._end_osc(b"\x1b\\", out)
            else:
                self._state = _State.GROUND
            return pos + 1
        if self._state is _State.OSC_ESC:
            self.dropped_sequences += 1  # an OSC cut short: the terminal drops it too
        self._seq = bytearray()
        self._enter_escape()
        return self._escape(chunk, pos, out)

    def _c1_inside(self, chunk: bytes, pos: int, out: bytearray) -> int:
        """A 0xC2 byte inside a sequence: U+0080-U+009F are C1 controls (ST ends strings)."""
        if pos + 1 >= len(chunk):
            self._pending = chunk[pos:]
            return len(chunk)
        second = chunk[pos + 1]
        if not 0x80 <= second <= 0x9F:
            if self._state in (_State.OSC, _State.DISCARD):
                if self._state is _State.OSC:
                    self._seq += chunk[pos : pos + 2]
                return pos + 2  # an ordinary character inside a string
            self._abort(out)  # text inside a control sequence: the sequence is over
            return pos
        if second == 0x9C:  # ST
            if self._state is _State.OSC:
                self._end_osc(b"\x1b\\", out)
            else:
                if self._state is not _State.DISCARD:
                    self._drop()
                self._state = _State.GROUND
            return pos + 2
        if self._state is _State.OSC:
            self.dropped_sequences += 1
        elif self._state is not _State.DISCARD:
            self._abort(out)
        self._seq = bytearray()
        self._c1(second - 0x40, out)
        return pos + 2

    # ------------------------------------------------------------ endings

    def _drop(self) -> None:
        self.dropped_sequences += 1
        self._seq = bytearray()
        self._state = _State.GROUND

    def _abort(self, out: bytearray) -> None:
        """A sequence cut short by ESC, CAN or SUB: the terminal would drop it as well."""
        self._seq = bytearray()
        self._state = _State.GROUND


# ---------------------------------------------------------------- input (host side)

_INPUT_STRING: Final = re.compile(rb"\x1b[\]P^_X][^\x1b\x07]*(?:\x07|\x1b\\)")
_INPUT_CSI: Final = re.compile(rb"\x1b\[([<=>?]?)([0-9;:]*)([ -/]*)([@-~])")


def _input_csi(match: re.Match[bytes]) -> bytes:
    prefix, _, intermediates, final = match.groups()
    if prefix in (b"?", b">", b"="):  # reports: DA, DECXCPR, DECRPM, kitty flags, ...
        return b""
    if final in (b"n", b"t", b"x") and not intermediates:  # DSR, window and DECREPTPARM reports
        return b""
    if intermediates == b"$" and final == b"y":  # DECRPM (ANSI modes)
        return b""
    return match.group()


def sanitize_input(data: bytes | bytearray | memoryview) -> bytes:
    """Drop terminal answers from one Input message of the controller (best effort, see above).

    Per message, not streaming: an unterminated string or sequence at the end of a message is
    more likely a key (Alt+] is ``ESC ]``) than half an answer, so it passes.
    """
    raw = bytes(data)
    if b"\x1b" not in raw:
        return raw
    return _INPUT_CSI.sub(_input_csi, _INPUT_STRING.sub(b"", raw))
