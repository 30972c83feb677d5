"""One logging setup for every entry point, with a redaction filter in front of every handler.

Secrets must never reach a log: known secret values (registered by the SecretStore when it hands
one out) and anything shaped like one (JWTs, bearer tokens, Authorization / X-Gotify-Key
headers, ``token=`` / ``password=`` query and form fields) are replaced by ``[REDACTED]``.
Redaction runs on the fully formatted record, exception text included, so no path around it
(``%s`` args, f-strings, ``extra``, tracebacks) leaks.

The log file is the owner's alone: its folder is created 0700 and the file (and every file
rotation starts) 0600, whatever the umask; a log an older version left 0644 is tightened when
opened. Logs name peers, paths and servers even when redaction holds.
"""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
import re
import sys
import threading
from pathlib import Path
from typing import Final, TextIO

REDACTED: Final = "[REDACTED]"

_PATTERNS: Final = [
    # JWT / JWS compact form (header.payload.signature, base64url, header starts with '{"').
    re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"),
    # Header-style secrets: keep the name, drop the value up to the end of the field.
    re.compile(
        r"(?i)(?P<keep>(?:authorization|x-gotify-key|proxy-authorization|cookie|set-cookie)"
        r"""["']?\s*[:=]\s*["']?)(?:(?:bearer|basic|token)\s+)?[^\s"',;}]+"""
    ),
    # Bearer tokens on their own.
    re.compile(r"(?i)(?P<keep>\bbearer\s+)[A-Za-z0-9._~+/=-]+"),
    # key=value in query strings, forms, JSON-ish dumps and reprs.
    re.compile(
        r"""(?i)(?P<keep>\b(?:access_token|refresh_token|token|password|passwd|secret|join_code|"""
        r"""api_key|apikey|private_key)["']?\s*[=:]\s*["']?)[^\s&"',;}]+"""
    ),
    # PEM private keys, whole.
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"),
]

_known_lock = threading.Lock()
_known: set[str] = set()
_MIN_SECRET_LEN: Final = 6


def register_secret(value: str | None) -> None:
    """Remember a secret value so that it is redacted wherever it appears."""
    if value and len(value) >= _MIN_SECRET_LEN:
        with _known_lock:
            _known.add(value)
            # PEM keys are also logged line by line by some libraries.
            if "\n" in value:
                _known.update(
                    line for line in value.splitlines() if len(line) >= 16 and "-----" not in line
                )


def redact(text: str) -> str:
    with _known_lock:
        known = sorted(_known, key=len, reverse=True)
    for value in known:
        if value in text:
            text = text.replace(value, REDACTED)
    for pattern in _PATTERNS:
        text = pattern.sub(_replacement, text)
    return text


def _replacement(match: re.Match[str]) -> str:
    keep = match.groupdict().get("keep")
    return f"{keep}{REDACTED}" if keep else REDACTED


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever sys.stderr is now (it may be replaced after setup, e.g. by pytest)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


class OwnerOnlyFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log file that only its owner can read or write."""

    def _open(self) -> io.TextIOWrapper:
        # FileHandler opens with the umask's mode (often 0644); rollover reopens through here.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)  # Windows
        fd = os.open(self.baseFilename, flags, 0o600)
        try:
            if os.name == "posix":
                os.fchmod(fd, 0o600)  # a file created earlier keeps its mode otherwise
            # Always append (the only mode a rotating handler uses) and the fd is O_APPEND.
            return open(fd, "a", encoding=self.encoding, errors=self.errors)
        except BaseException:
            os.close(fd)
            raise


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


LOG_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup(log_file: Path | None = None, *, verbose: bool = False, stderr: bool = True) -> None:
    """Configure the root logger once: a rotating file (full detail) and stderr (warnings).

    Every handler gets the redacting formatter, so no secret reaches any sink.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    formatter = RedactingFormatter(LOG_FORMAT)
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            file_handler = OwnerOnlyFileHandler(
                log_file, maxBytes=5_000_000, backupCount=3, encoding="utf-8"
            )
        except OSError:
            file_handler = None
        if file_handler is not None:
            file_handler.setFormatter(formatter)
            root.addHandler(file_handler)
    if stderr:
        console = _StderrHandler()
        console.setLevel(logging.DEBUG if verbose else logging.WARNING)
        console.setFormatter(RedactingFormatter("meshagent: %(levelname)s: %(message)s"))
        root.addHandler(console)
    # Libraries that log request lines and frames at INFO/DEBUG: keep them out of INFO logs.
    for noisy in ("httpx", "httpcore", "websockets", "uvicorn.access", "hpack", "quic", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
