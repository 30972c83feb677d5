"""Recording a shared terminal as an asciicast v2 file, written by a thread of its own."""

from __future__ import annotations

import asyncio
import codecs
import json
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from queue import SimpleQueue
from typing import IO


class AsciicastRecorder:
    """Writes an asciicast v2 file (header line, then ``[time, "o", text]`` and ``"r"`` lines).

    Only output and resizes are recorded, never input (passwords are typed blind, not echoed).
    The file is written by a thread: :meth:`output` only queues.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        cols: int,
        rows: int,
        title: str | None = None,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self._started = clock()
        header: dict[str, object] = {
            "version": 2,
            "width": cols,
            "height": rows,
            "timestamp": int(wall_clock()),
        }
        if env:
            header["env"] = {key: env[key] for key in ("TERM", "SHELL") if key in env}
        if title:
            header["title"] = title
        self._queue: SimpleQueue[tuple[float, str, bytes | str] | None] = SimpleQueue()
        self._queue.put((0.0, "header", json.dumps(header)))
        self._backlog = 0
        self._lock = threading.Lock()
        self._drained: list[Callable[[], None]] = []
        self._threshold = 0
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._write_loop, name="asciicast", daemon=True)
        self._thread.start()

    @property
    def backlog_bytes(self) -> int:
        with self._lock:
            return self._backlog

    def output(self, data: bytes) -> None:
        with self._lock:
            self._backlog += len(data)
        self._queue.put((self._clock() - self._started, "o", data))

    def resize(self, cols: int, rows: int) -> None:
        self._queue.put((self._clock() - self._started, "r", f"{cols}x{rows}"))

    def when_below(self, threshold: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the writer thread) once the backlog is under ``threshold``."""
        with self._lock:
            if self._backlog < threshold:
                ready = True
            else:
                ready = False
                self._drained.append(callback)
                self._threshold = threshold
        if ready:
            callback()

    async def aclose(self) -> None:
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    def _write_loop(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        file: IO[str] | None = None
        try:
            file = self.path.open("w", encoding="utf-8")
            while (item := self._queue.get()) is not None:
                at, kind, payload = item
                if isinstance(payload, str) and kind == "header":
                    file.write(payload + "\n")
                    continue
                if kind == "o":
                    assert isinstance(payload, bytes)
                    text = decoder.decode(payload)
                    with self._lock:
                        self._backlog -= len(payload)
                        callbacks = self._take_drained()
                    for callback in callbacks:
                        callback()
                    if not text:
                        continue
                    payload = text
                file.write(json.dumps([round(at, 6), kind, payload], ensure_ascii=False) + "\n")
            tail = decoder.decode(b"", final=True)
            if tail:
                file.write(json.dumps([round(self._clock() - self._started, 6), "o", tail]) + "\n")
        except OSError as exc:
            self.error = exc
            while self._queue.get() is not None:  # keep taking, so nobody waits on us
                pass
        finally:
            if file is not None:
                file.close()
            with self._lock:
                self._backlog = 0
                callbacks = self._take_drained(force=True)
            for callback in callbacks:
                callback()

    def _take_drained(self, *, force: bool = False) -> list[Callable[[], None]]:
        if self._drained and (force or self._backlog < self._threshold):
            callbacks, self._drained = self._drained, []
            return callbacks
        return []
