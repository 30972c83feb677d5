"""The one object between the async core and the widgets (DESIGN §2).

It follows the agent's event bus and turns events into Qt signals and model updates, and it runs
the user's actions (send, cancel, resume, answer an offer) as tasks it owns and cancels on
shutdown. Widgets never touch the agent directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, Final

from PySide6.QtCore import QObject, Signal

from meshagent_gui.compose.onboarding import JoinCodeWithUrl, new_join_code
from meshagent_gui.context import Context
from meshagent_gui.core.agent import Agent, FrontEnd, allow_always
from meshagent_gui.core.events import (
    AnnouncementReceived,
    PathChanged,
    PeerCameOnline,
    PeerWentOffline,
    ServerConnected,
    ServerDisconnected,
    TransferAccepted,
    TransferCompleted,
    TransferFailed,
    TransferOffered,
    TransferProgressed,
    TransferWaiting,
)
from meshagent_gui.core.ipc_types import SendReply
from meshagent_gui.core.notify.router import NotificationSink
from meshagent_gui.errors import UserError

from .devices import DeviceEntry, DeviceListModel
from .resources import TrayState
from .transfers import State, TransferRow, TransferTableModel

log = logging.getLogger(__name__)

LINK_RECIPIENT: Final = "whoever opens the link"  # a share link's row names no device
# Device ids whose offers are accepted without asking ("Always accept from this device").
_TRANSFER_EVENTS: Final = (
    TransferProgressed,
    TransferOffered,
    TransferAccepted,
    TransferCompleted,
    TransferFailed,
    TransferWaiting,
)
_DEVICE_EVENTS: Final = (
    PeerCameOnline,
    PeerWentOffline,
    PathChanged,
    ServerConnected,
    ServerDisconnected,
)


# Why the link is down, in the words a user knows: the core's reasons are socket errors.
_LINK_REASONS: Final = (
    (("connect call failed", "errno 111", "refused", "unreachable"), "server unreachable"),
    (("name or service", "nodename", "getaddrinfo", "name resolution"), "server name not found"),
    (("timed out", "timeouterror"), "server not answering"),
    (("connection dropped", "closed by the server"), "the connection to the server dropped"),
)


def link_reason(reason: str | None) -> str:
    """A one-phrase reason for an offline link (MeshLink.last_error, ServerDisconnected)."""
    if not reason:
        return "not connected yet"
    lowered = reason.lower()
    for needles, words in _LINK_REASONS:
        if any(needle in lowered for needle in needles):
            return words
    return reason


class AgentBridge(QObject):
    """Signals for the widgets, actions for the user; owns every task it starts."""

    ready = Signal()
    link_changed = Signal(str)  # offline / connecting / online; also when the reason changes
    tray_state_changed = Signal(object)  # TrayState
    offer_received = Signal(object)  # TransferOffered that needs an answer
    join_code_changed = Signal(object)  # JoinCodeWithUrl
    error = Signal(str)  # one line for the status bar
    show_requested = Signal()
    event_received = Signal(object)  # every core event, for whoever cares
    link_shared = Signal(object, str, float)  # a share link's row, its URL, its expiry (Unix)

    def __init__(self, ctx: Context, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.ctx = ctx
        self.agent: Agent | None = None
        self.join_code: JoinCodeWithUrl | None = None
        self.transfers = TransferTableModel(self)
        self.devices = DeviceListModel(self)
        self.link_state = "offline"
        self.link_reason = link_reason(None)  # why it is offline
        self.link_retry_at: float | None = None  # time.monotonic() of the next attempt
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sends: dict[str, asyncio.Task[Any]] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self._refresh_again = False
        self._tray_state = TrayState.OFFLINE

    # ------------------------------------------------------------ wiring

    def make_agent(
        self, ctx: Context, *, notification_sinks: Sequence[NotificationSink] = ()
    ) -> Agent:
        """The factory handed to compose.onboarding.run_agent: the core's agent, with this app as
        its front end (a second launch's ``show`` request, the app's notification sinks)."""
        front_end = FrontEnd(show=self.show_requested.emit, notification_sinks=notification_sinks)
        return Agent.from_context(ctx, front_end=front_end)

    def attach(self, agent: Agent, join: JoinCodeWithUrl | None) -> None:
        """The agent runs: follow its events, load the devices."""
        self.agent = agent
        self.spawn(self._follow(agent), "ui-events")
        if join is not None:
            self.join_code = join
            self.join_code_changed.emit(join)
        self._set_link(agent.link.state, agent.link.last_error)
        self.refresh_devices()
        self.ready.emit()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, UserError):
            self.error.emit(exc.message)
        elif exc is not None:
            task.get_loop().call_exception_handler(
                {"message": f"task {task.get_name()} failed", "exception": exc, "task": task}
            )

    async def aclose(self) -> None:
        """Cancel every task; sends tell their receivers, who keep partials for a resume."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self.agent = None

    # ------------------------------------------------------------ events

    async def _follow(self, agent: Agent) -> None:
        with agent.bus.subscribed(maxsize=10_000) as events:
            async for event in events:
                self.handle(event)

    def handle(self, event: object) -> None:
        if isinstance(event, _TRANSFER_EVENTS):
            self.transfers.apply(event)
            if isinstance(event, TransferOffered) and not event.auto_accepted:
                self._offered(event)
        if isinstance(event, ServerConnected):
            self._set_link("online")
        elif isinstance(event, ServerDisconnected):
            self._set_link("offline", event.reason, retry_in=event.retry_in)
        if isinstance(event, _DEVICE_EVENTS) or (
            isinstance(event, AnnouncementReceived) and event.kind.startswith("room.")
        ):
            self.refresh_devices()
        self.event_received.emit(event)
        self._update_tray_state()

    def _offered(self, event: TransferOffered) -> None:
        self.offer_received.emit(event)  # devices in transfer.always_accept never get here

    def _set_link(self, state: str, reason: str | None = None, *, retry_in: float = 0.0) -> None:
        words = link_reason(reason)
        retry_at = time.monotonic() + retry_in if retry_in > 0 else None
        if state != self.link_state or words != self.link_reason or retry_at:
            self.link_state, self.link_reason, self.link_retry_at = state, words, retry_at
            self.link_changed.emit(state)
        self._update_tray_state()

    def _update_tray_state(self) -> None:
        if self.link_state != "online":
            state = TrayState.OFFLINE
        elif any(r.state is State.RUNNING for r in self.transfers.rows()):
            state = TrayState.TRANSFERRING
        else:
            state = TrayState.ONLINE
        if state is not self._tray_state:
            self._tray_state = state
            self.tray_state_changed.emit(state)

    def link_text(self) -> str:
        """The link in one line: "Online", or "Offline: server unreachable (retrying in 4 s)"."""
        if self.link_state == "online":
            return "Online"
        if self.link_state == "connecting":
            return "Connecting…"
        text = f"Offline: {self.link_reason}"
        if self.link_retry_at is not None:
            left = math.ceil(self.link_retry_at - time.monotonic())
            text += f" (retrying in {left} s)" if left > 0 else " (retrying now)"
        return text

    @property
    def tray_state(self) -> TrayState:
        return self._tray_state

    # ------------------------------------------------------------ devices

    def refresh_devices(self) -> None:
        """Reload the device list; bursts of events cost one reload (plus one for late news)."""
        if self._refreshing is not None and not self._refreshing.done():
            self._refresh_again = True
            return
        self._refreshing = self.spawn(self._refresh(), "ui-devices")

    async def _refresh(self) -> None:
        while True:
            self._refresh_again = False
            agent = self.agent
            if agent is None:
                return
            try:
                views = await agent.devices()
            except UserError as exc:
                log.info("device list not refreshed: %s", exc.message)
                return
            paths = {p.device_id: p.path for p in agent.p2p_status().peers}
            entries = [
                DeviceEntry(v.id, v.name, v.user, v.platform, v.online, paths.get(v.id, ""))
                for v in views
                if v.id != agent.enrollment.device_id
            ]
            self.devices.set_devices(entries)
            self.transfers.set_peer_names(self.devices.names())
            if not self._refresh_again:
                return

    # ------------------------------------------------------------ actions

    def send(self, paths: list[str], device_id: str) -> TransferRow:
        """Send files and folders to a device; the row follows the transfer."""
        name = self.devices.names().get(device_id, device_id[:12])
        row = self.transfers.add_send(paths, device_id, name)
        self._start_send(row)
        return row

    def share_by_link(self, path: str) -> TransferRow:
        """Send ``path`` to whoever opens a one-time link; ``link_shared`` says its URL."""
        row = self.transfers.add_send([path], "", LINK_RECIPIENT, link=True)
        self._start_send(row)
        return row

    def _start_send(self, row: TransferRow) -> None:
        task = self.spawn(self._send(row), f"ui-send-{row.key}")
        self._sends[row.key] = task
        self._update_tray_state()

    async def _send(self, row: TransferRow) -> None:
        agent = self.agent
        if agent is None:
            self.transfers.happen(row, "failed", error="the agent is not running")
            return
        try:
            async for update in agent.send(list(row.paths), row.peer_id, link=row.link):
                if isinstance(update, SendReply):
                    self.transfers.happen(row, "completed")
                elif update.link_url:
                    self.link_shared.emit(row, update.link_url, update.link_expires_at or 0.0)
                elif update.link_guest:  # before the send: its events name this peer
                    row.peer_id = update.link_guest
                elif row.transfer_id is None and update.transfer_id:  # the row follows the bus
                    self.transfers.claim(row, update.transfer_id)
        except asyncio.CancelledError:
            self.transfers.happen(row, "cancelled", error="")
            raise
        except UserError as exc:
            happening = "declined" if exc.code == "declined" else "failed"
            self.transfers.happen(row, happening, error=exc.message)
        finally:
            self._sends.pop(row.key, None)
            self._update_tray_state()

    def cancel(self, row: TransferRow) -> None:
        task = self._sends.get(row.key)
        if task is not None:
            task.cancel()
            return
        agent = self.agent
        if agent is not None and row.transfer_id and row.transfer_id in agent.transfers.active:
            self.spawn(agent.transfers.cancel(row.transfer_id), "ui-cancel")
        elif row.state is State.ASKING and row.transfer_id:
            self.spawn(self.answer_offer(row.transfer_id, False), "ui-decline")

    def resume(self, row: TransferRow) -> None:
        """Send again: the receiver's verified chunks are kept, only the rest goes."""
        if row.link:
            self.error.emit("A share link is for one person: share the file again for a new link.")
            return
        if row.can_resume and self.transfers.happen(row, "restarted"):
            self._start_send(row)

    async def answer_offer(
        self,
        transfer_id: str,
        accept: bool,
        *,
        always: bool = False,
        destination: Path | None = None,
    ) -> None:
        """Answer an offer; ``destination``: the folder the user chose ("Save to"), or None."""
        agent = self.agent
        if agent is None:
            return
        row = self.transfers.find(transfer_id)
        if always and accept and row is not None:
            allow_always(self.ctx.config, row.peer_id)
        try:
            await agent.transfers.answer_offer(transfer_id, accept, destination)
        except UserError as exc:
            if row is not None:
                self.transfers.happen(row, "failed", error=exc.message)
            return
        if not accept and row is not None:
            self.transfers.happen(row, "declined")

    async def new_join_code(self) -> JoinCodeWithUrl | None:
        if self.join_code is None:
            return None
        self.join_code = await new_join_code(self.ctx, self.join_code.url)
        self.join_code_changed.emit(self.join_code)
        return self.join_code

    def online_devices(self) -> list[DeviceEntry]:
        return [d for d in self.devices.devices() if d.online]
