"""Filesystem events of a synced folder as settled batches of names.

On Linux, inotify is read on the event loop itself (:mod:`.inotify`: no thread, no object per
event); elsewhere watchdog's observer threads hand each event to the loop
(``call_soon_threadsafe``). The loop gathers names until ``settle`` seconds pass without a new
event, but never holds a batch more than ``max_delay`` after its first event (a file written
without pause for minutes still syncs as it goes). ``None`` instead of a batch means "events
were lost: rescan everything" (the kernel queue overflowed, too many names at once, the root
went away, the observer died and was restarted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import unicodedata
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver

from . import inotify
from .ignore import STATE_DIR

log = logging.getLogger(__name__)

MAX_PENDING: Final = 20_000
"""More distinct names than this in one batch: a full rescan is cheaper than a name-by-name one."""
HEALTH_INTERVAL: Final = 2.0
"""How often an idle watcher checks that its observer threads are still alive."""
MAX_RESTART_DELAY: Final = 60.0
WATCHER_ENV: Final = "MESHAGENT_SYNC_WATCHER"
"""Set to ``watchdog`` to use watchdog on Linux too (the default there reads inotify itself)."""

_RESCAN: Final = inotify.RESCAN
"""Stands for "rescan all" among the names an event reports."""


class FolderWatcher:
    """Changes under ``root``, in settled batches of relative NFC names (see the module doc).

    ``async with FolderWatcher(root) as watcher: async for names in watcher.changes(): ...``
    """

    def __init__(
        self,
        root: Path,
        *,
        settle: float = 0.1,
        max_delay: float = 1.0,
        use_inotify: bool | None = None,
    ) -> None:
        self._root = root
        if use_inotify is None:
            # The environment's switch back to watchdog: an escape hatch, and for measuring.
            use_inotify = inotify.available() and os.environ.get(WATCHER_ENV) != "watchdog"
        self._use_inotify = use_inotify
        self._inotify: inotify.InotifySource | None = None
        self._prefix = os.path.join(str(root), "")
        self._settle = settle
        self._max_delay = max_delay
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observer: BaseObserver | None = None
        self._pending: set[str] = set()
        self._inbox: list[str | object] = []  # from the observer's threads, not yet added
        self._inbox_lock = threading.Lock()
        self._overflow = False
        self._first = 0.0
        self._last = 0.0
        self._wake = asyncio.Event()
        self._closed = False

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._closed = False
        await self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._closed = True
        self._wake.set()
        await self._stop()

    async def _start(self) -> None:
        """Watch the root: one inotify watch per folder below it, a walk, so off the loop. A
        source started while the watcher was being closed is stopped again at once."""
        assert self._loop is not None
        if self._use_inotify:
            source = await asyncio.to_thread(self._start_inotify)
            if self._closed:
                source.close()
                return
            source.attach(self._loop)
            self._inotify = source
        else:
            observer = await asyncio.to_thread(self._start_observer)
            if self._closed:
                await asyncio.to_thread(_stop_observer, observer)
                return
            self._observer = observer

    async def _stop(self) -> None:
        source, self._inotify = self._inotify, None
        if source is not None:
            source.close()
        observer, self._observer = self._observer, None
        if observer is not None:
            await asyncio.to_thread(_stop_observer, observer)

    def _start_inotify(self) -> inotify.InotifySource:
        source = inotify.InotifySource(self._root, self._add)
        source.start()
        return source

    def _start_observer(self) -> BaseObserver:
        from . import watchdog_source  # imported only where used (its ~2 MB)

        return watchdog_source.start(self._root, self._from_thread)

    # ----------------------------------------------------------------- events (any thread)

    def _from_thread(self, paths: list[str | bytes] | None) -> None:
        loop = self._loop
        if loop is None or self._closed:
            return
        names = self._names(paths)
        if not names:
            return
        # Names gather here; the loop is woken once per burst, not once per event (a pull of
        # thousands of files makes as many events, each a trip through the self-pipe).
        with self._inbox_lock:
            wake = not self._inbox
            self._inbox.extend(names)
        if wake:
            # RuntimeError: the loop closed under us, nothing is listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._inbox_lock:
            names, self._inbox = self._inbox, []
        self._add(names)

    def _names(self, paths: list[str | bytes] | None) -> list[str | object]:
        if paths is None:
            return [_RESCAN]
        names: list[str | object] = []
        for path in paths:
            name = self._relative(os.fsdecode(path))
            if name is None:
                names.append(_RESCAN)  # the root itself (deleted, moved): look at everything
            elif name and STATE_DIR not in name.split("/"):
                names.append(name)
        return names

    def _relative(self, path: str) -> str | None:
        """``path``'s NFC name under the root; None for the root itself, "" for outside."""
        if not path.startswith(self._prefix):
            return None if path.rstrip(os.sep) == self._prefix.rstrip(os.sep) else ""
        name = path[len(self._prefix) :]
        if os.sep != "/":
            name = name.replace(os.sep, "/")
        return unicodedata.normalize("NFC", name.strip("/"))

    # ----------------------------------------------------------------- the loop's side

    def _add(self, names: list[str | object]) -> None:
        assert self._loop is not None
        now = self._loop.time()
        if not self._pending and not self._overflow:
            self._first = now
        self._last = now
        for name in names:
            if isinstance(name, str) and not self._overflow:
                self._pending.add(name)
            else:
                self._overflow = True
        if len(self._pending) > MAX_PENDING:
            self._overflow = True
        if self._overflow:
            self._pending.clear()
        self._wake.set()

    async def changes(self) -> AsyncIterator[set[str] | None]:
        """Settled batches of changed names (NFC, relative, '/'-separated), or None for
        "rescan everything". Ends when the watcher is closed."""
        if self._loop is None:
            raise RuntimeError("use FolderWatcher as an async context manager first")
        loop = self._loop
        restart_delay = HEALTH_INTERVAL
        while not self._closed:
            if not self._pending and not self._overflow:
                self._wake.clear()
                try:
                    # asyncio.timeout, not wait_for: 3.11's wait_for may swallow a cancel that
                    # lands as the event is set, and the folder's task then never stops.
                    async with asyncio.timeout(HEALTH_INTERVAL):
                        await self._wake.wait()
                except TimeoutError:
                    if not self._observer_alive():
                        restarted = await self._restart()
                        yield None  # events may have been lost meanwhile
                        restart_delay = HEALTH_INTERVAL if restarted else restart_delay
                        if not restarted:
                            await asyncio.sleep(restart_delay)
                            restart_delay = min(restart_delay * 2, MAX_RESTART_DELAY)
                continue
            # Settle: until `settle` passed since the last event, or `max_delay` since the first.
            while not self._closed:
                deadline = min(self._last + self._settle, self._first + self._max_delay)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._wake.wait()
            if self._closed:
                return
            batch: set[str] | None = None if self._overflow else self._pending
            self._pending = set()
            self._overflow = False
            yield batch

    def _observer_alive(self) -> bool:
        if self._use_inotify:
            return self._inotify is not None and self._inotify.alive
        from . import watchdog_source

        return self._observer is not None and watchdog_source.alive(self._observer)

    async def _restart(self) -> bool:
        """A new observer for a dead one (root deleted and made again, watch limit reached)."""
        await self._stop()
        if self._closed:
            return False
        try:
            await self._start()
        except OSError as exc:
            log.warning("cannot watch %s: %s", self._root, exc)
            return False
        return not self._closed


def _stop_observer(observer: BaseObserver) -> None:
    from . import watchdog_source

    watchdog_source.stop(observer)
