"""watchdog's observer for a synced folder (macOS, Windows; Linux reads inotify itself).

Imported only where it is used: watchdog and its threads cost ~2 MB that a Linux agent saves.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Final

from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    EventsLostEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

# Opens and read-only closes are left out: the scanner's own reads would trigger rescans.
_EVENTS: Final[list[type[FileSystemEvent]]] = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    FileMovedEvent,
    DirMovedEvent,
    FileModifiedEvent,
    FileAttribEvent,
    DirAttribEvent,
    FileClosedEvent,
    EventsLostEvent,
]

PathsSeen = Callable[[list[str | bytes] | None], None]
"""Called on an observer thread with an event's paths; None when events were lost."""


class _Handler(FileSystemEventHandler):
    def __init__(self, seen: PathsSeen) -> None:
        self._seen = seen

    def dispatch(self, event: FileSystemEvent) -> None:  # observer thread
        if isinstance(event, EventsLostEvent):
            self._seen(None)
        elif not isinstance(event, DirModifiedEvent):
            # Parents' "modified" events (one per create/delete) are dropped: they would make
            # the scanner walk a whole folder for one file.
            self._seen([event.src_path, event.dest_path] if event.dest_path else [event.src_path])


def start(root: Path, seen: PathsSeen) -> BaseObserver:
    """(Blocking: adds a watch per folder) An observer reporting changes under ``root``."""
    observer = Observer()
    try:
        observer.schedule(_Handler(seen), str(root), recursive=True, event_filter=_EVENTS)
        observer.start()
    except BaseException:
        stop(observer)
        raise
    return observer


def alive(observer: BaseObserver) -> bool:
    if not observer.is_alive():
        return False
    # An emitter stops by itself when the root is deleted; the observer thread lives on.
    return all(emitter.is_alive() for emitter in tuple(observer.emitters))


def stop(observer: BaseObserver) -> None:
    """Stop and join (blocking: the caller runs it off the loop)."""
    observer.stop()
    if observer.is_alive():
        observer.join()
