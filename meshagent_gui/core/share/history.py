"""Finished transfers, either direction, kept in the data dir: ``meshagent transfers --all``.

One JSON object a line (``transfers.jsonl``), appended as each transfer ends; only the last
:data:`KEEP` are kept. The file is rewritten (atomically) only once it holds a tenth more than
that, so an append stays one small write. A line that does not decode (a crash mid-write, a
hand edit) is skipped, never fatal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Final

import msgspec

from meshagent_gui.core.ipc_types import TransferInfo

log = logging.getLogger(__name__)

KEEP: Final = 1000

_decoder = msgspec.json.Decoder(TransferInfo)


class TransferHistory:
    """The finished transfers of this device, oldest first. Blocking: call off the loop."""

    def __init__(self, path: Path, keep: int = KEEP) -> None:
        self.path = path
        self.keep = keep
        self._lines: int | None = None  # counted on first use
        self._lock = threading.Lock()  # appends come from several disk threads

    def add(self, record: TransferInfo) -> None:
        line = msgspec.json.encode(record) + b"\n"
        with self._lock:
            try:
                if self._lines is None:
                    self._lines = len(self._read_lines())
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "ab") as handle:
                    handle.write(line)
                self._lines += 1
                if self._lines > self.keep + max(1, self.keep // 10):
                    self._trim()
            except OSError as exc:  # history is a convenience: never fail a transfer over it
                log.warning("could not record the transfer in %s: %s", self.path, exc)

    def records(self) -> list[TransferInfo]:
        """The last :attr:`keep` finished transfers, oldest first."""
        with self._lock:
            found: list[TransferInfo] = []
            for line in self._read_lines():
                with contextlib.suppress(msgspec.DecodeError):
                    found.append(_decoder.decode(line))
            return found[-self.keep :]

    def _read_lines(self) -> list[bytes]:
        try:
            return [line for line in self.path.read_bytes().splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    def _trim(self) -> None:
        kept = self._read_lines()[-self.keep :]
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_bytes(b"".join(line + b"\n" for line in kept))
        os.replace(temporary, self.path)
        self._lines = len(kept)
