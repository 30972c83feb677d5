"""Desktop toasts: one more sink of the core's NotificationRouter (the rules that drive Gotify
decide here too). Without a system tray it shows in the main window's status line."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from PySide6.QtWidgets import QSystemTrayIcon

from meshagent_gui.core.notify.router import Notification

log = logging.getLogger(__name__)

SHOWN_FOR_MS: Final = 6000
_URGENT: Final = 7  # Gotify priorities 7+ are the loud ones


class ToastSink:
    """A NotificationSink showing QSystemTrayIcon messages."""

    def __init__(
        self,
        tray: QSystemTrayIcon | None,
        without_tray: Callable[[Notification], None] | None = None,
    ) -> None:
        self.tray = tray
        self.without_tray = without_tray
        self.shown: list[Notification] = []  # what was shown, newest last (tests, "recent")

    def __repr__(self) -> str:
        return "ToastSink()"

    async def deliver(self, notification: Notification) -> None:
        self.shown = [*self.shown[-49:], notification]
        tray = self.tray
        if tray is None or not tray.isVisible() or not QSystemTrayIcon.supportsMessages():
            log.info("notification: %s: %s", notification.title, notification.message)
            if self.without_tray is not None:
                self.without_tray(notification)
            return
        icon = (
            QSystemTrayIcon.MessageIcon.Warning
            if notification.priority >= _URGENT
            else QSystemTrayIcon.MessageIcon.Information
        )
        tray.showMessage(notification.title, notification.message, icon, SHOWN_FOR_MS)
