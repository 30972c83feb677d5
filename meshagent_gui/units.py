"""How quantities read to people: the one size formatter every front end and log line uses."""

from __future__ import annotations


def human_size(size: int) -> str:
    """Bytes in decimal units, as file managers show them: 999 B, 1.2 kB, 3.4 MB."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def human_seconds(seconds: float) -> str:
    """A duration as a person says it: 0.4 s, 90 s, 2 min 05 s, 1 h 03 min."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def plural(count: int, word: str, words: str = "") -> str:
    """``1 peer``, ``2 peers`` (``words``: an irregular plural)."""
    return f"{count} {word if count == 1 else words or word + 's'}"
