"""The desktop app: one process, a QApplication on a qasync loop running the agent core.

`meshagent` and `meshagent gui` call :func:`run_gui`. One agent per home: a second launch asks
the first (IPC ``show``) to come to the front and exits 0. Quitting cancels every task: sends
tell their receivers, who keep verified partials, so a later send resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import traceback
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication, QMessageBox, QWidget

from meshagent_gui.compose.onboarding import JoinCodeWithUrl, needs_onboarding, run_agent
from meshagent_gui.context import Context
from meshagent_gui.core import ipc
from meshagent_gui.core.agent import Agent
from meshagent_gui.core.ipc_types import NoParams
from meshagent_gui.core.share.paths import unique_destination
from meshagent_gui.errors import UserError

from .bridge import AgentBridge
from .devices import DeviceEntry
from .first_run import Choice, FirstRunDialog, ask_first_run
from .main_window import MainWindow
from .resources import app_icon
from .rooms import Rooms
from .settings import SettingsDialog
from .sync import SyncUi
from .terminal_host_window import HostTerminalWindow
from .terminal_window import TerminalWindow
from .toasts import ToastSink
from .tray import ShareTerminal, Tray, tray_available

log = logging.getLogger(__name__)

NO_TRAY_NOTICE: Final = (
    "This desktop has no system tray, so Mesh Agent runs in this window: closing it quits the app."
)


class ErrorReporter:
    """sys.excepthook and the loop's exception handler: log, then show a dialog.

    Cancellation is how tasks end on shutdown, never an error: no dialog for CancelledError
    (qasync hands it to both hooks). Dialogs are not modal, so an error raised while one shows
    cannot nest event loops.
    """

    def __init__(self, log_file: str | None = None) -> None:
        self.log_file = log_file
        self.reported: list[BaseException] = []
        self.dialogs: list[QMessageBox] = []
        self.show_dialogs = True

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        sys.excepthook = self.excepthook
        loop.set_exception_handler(self.loop_handler)

    def excepthook(
        self, kind: type[BaseException], exc: BaseException, tb: TracebackType | None
    ) -> None:
        if issubclass(kind, asyncio.CancelledError):
            return
        if issubclass(kind, KeyboardInterrupt):
            app = QApplication.instance()
            if app is not None:
                app.quit()
            return
        self.report(exc, tb)

    def loop_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, asyncio.CancelledError):
            return
        if exc is None:
            log.error("event loop: %s", context.get("message"))
            return
        self.report(exc, exc.__traceback__, context.get("message"))

    def report(
        self, exc: BaseException, tb: TracebackType | None, where: str | None = None
    ) -> None:
        self.reported.append(exc)
        if isinstance(exc, UserError):
            log.warning("%s", exc.message)
            text = exc.message
        else:
            log.error(
                "unexpected error%s", f" ({where})" if where else "", exc_info=(type(exc), exc, tb)
            )
            text = f"{type(exc).__name__}: {exc}"
            if self.log_file:
                text += f"\n\nDetails are in {self.log_file}"
        if not self.show_dialogs or QApplication.instance() is None:
            return
        box = QMessageBox(QMessageBox.Icon.Critical, "Mesh Agent", "Something went wrong.")
        box.setInformativeText(text)
        box.setDetailedText("".join(traceback.format_exception(type(exc), exc, tb))[-4000:])
        box.setWindowModality(Qt.WindowModality.NonModal)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.finished.connect(lambda _=0, b=box: self._forget(b))
        self.dialogs.append(box)
        box.show()

    def _forget(self, box: QMessageBox) -> None:
        with contextlib.suppress(ValueError):
            self.dialogs.remove(box)


class GuiApp:
    """The app's parts and their lifetime: bridge, window, tray, toasts, the agent task."""

    def __init__(
        self,
        ctx: Context,
        *,
        use_tray: bool | None = None,
        share_terminal: ShareTerminal | None = None,
    ) -> None:
        self.ctx = ctx
        self.has_tray = tray_available() if use_tray is None else use_tray
        self.bridge = AgentBridge(ctx)
        self.window = MainWindow(self.bridge, keep_running_on_close=self.has_tray)
        self.window.settings_requested.connect(self.open_settings)
        self.window.open_terminal = self.open_terminal
        self.rooms = Rooms(self.bridge, parent_widget=self.window)
        self.window.rooms_requested.connect(self.rooms.open)
        self.sync = SyncUi(self.bridge, default_path=self._sync_default, parent_widget=self.window)
        self.window.sync_requested.connect(self.sync.open)
        self.window.sync_folder_with = self.sync.sync_with
        self.tray = Tray(
            self.bridge,
            ctx.paths,
            open_window=self.window.bring_to_front,
            quit_app=self.quit,
            choose_paths=self.window.choose_paths,
            share_terminal=share_terminal or self.share_terminal,
            parent_widget=self.window,
            open_rooms=self.rooms.open,
            open_sync=self.sync.open,
            sync_folder=self.sync.add_folder,
        )
        self.toasts = ToastSink(
            self.tray.icon if self.has_tray else None, without_tray=self.window.show_toast
        )
        self.rooms.toasts = self.toasts
        self.bridge.show_requested.connect(self.window.bring_to_front)
        self.window.share_terminal_requested.connect(self.tray.share_terminal_action.trigger)
        if not self.has_tray:
            # Without a tray the window is the app: closing it quits. Only it: a dialog closing
            # (first run's, a terminal's) is not the last window of an app that has a window.
            self.window.closed.connect(self.quit)
        self.agent_ready = asyncio.Event()
        self._quit = asyncio.Event()
        self._switched = asyncio.Event()  # enrolled with another server: restart the agent
        self._connecting: FirstRunDialog | None = None
        self._settings: SettingsDialog | None = None
        self.terminal_windows: list[QWidget] = []

    # ------------------------------------------------------------ lifetime

    async def run(self) -> int:
        """Until Quit (or the agent fails); 0, or 1 when the agent could not run."""
        local = False
        if needs_onboarding(self.ctx):
            asking = asyncio.ensure_future(self._first_run())
            quitting = asyncio.ensure_future(self._quit.wait())
            await asyncio.wait({asking, quitting}, return_when=asyncio.FIRST_COMPLETED)
            for task in (asking, quitting):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task  # Quit (or SIGTERM) while the dialog is open: it closes
            choice = None if asking.cancelled() else asking.result()
            if choice is None:
                return 0
            local = choice is Choice.LOCAL
            self.window.bring_to_front()  # show where things are (and the join code)
        if self.has_tray:
            self.tray.show()
        else:
            self.window.show_notice(NO_TRAY_NOTICE)
            self.window.bring_to_front()
            log.info("no system tray: the main window stands in for it")
        loop = asyncio.get_running_loop()
        quitting = loop.create_task(self._quit.wait(), name="ui-quit")
        agent_task = self._start_agent(local)
        try:
            while True:
                switched = loop.create_task(self._switched.wait(), name="ui-switch")
                try:
                    await asyncio.wait(
                        {agent_task, quitting, switched}, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    switched.cancel()
                if quitting.done() or agent_task.done():
                    break
                # Enrolled with another server (Settings): the agent starts again, on it.
                self._switched.clear()
                await self._stop_agent(agent_task)
                self.window.card.hide()  # a local mesh's join code no longer applies
                agent_task = self._start_agent(local=False)
        finally:
            quitting.cancel()
            try:
                await self._stop_agent(agent_task)  # raises what the agent failed with
            finally:
                with contextlib.suppress(asyncio.CancelledError):
                    await quitting
                self.tray.hide()
        return 0

    def _start_agent(self, local: bool) -> asyncio.Task[None]:
        self.agent_ready.clear()
        return asyncio.get_running_loop().create_task(
            run_agent(self.ctx, factory=self._make_agent, local=local, on_ready=self._ready),
            name="agent",
        )

    async def _stop_agent(self, agent_task: asyncio.Task[None]) -> None:
        await self.bridge.aclose()
        agent_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await agent_task

    async def _first_run(self) -> Choice | None:
        """The choice dialog; meanwhile a second launch can still bring it forward."""
        lock = ipc.AgentLock(self.ctx.paths.lock_file)
        lock.acquire()  # an agent already running for this home: one clear UserError
        server = ipc.IpcServer(
            self.ctx.paths.ipc_path, {"show": ipc.Route(NoParams, self._show_request)}
        )
        await server.start()
        try:
            return await ask_first_run(self.ctx)
        finally:
            await server.close()
            lock.release()

    async def _show_request(self, _: NoParams) -> dict[str, bool]:
        for widget in QApplication.topLevelWidgets():
            if widget.isVisible():
                widget.raise_()
                widget.activateWindow()
        return {"shown": True}

    def _make_agent(self, ctx: Context) -> Agent:
        return self.bridge.make_agent(ctx, notification_sinks=[self.toasts])

    def _ready(self, agent: Agent, join: JoinCodeWithUrl | None) -> None:
        self.bridge.attach(agent, join)
        if join is not None:
            self.window.bring_to_front()
        self.agent_ready.set()

    def quit(self) -> None:
        self._quit.set()

    # ------------------------------------------------------------ windows

    def open_settings(self) -> None:
        if self._settings is None:
            self._settings = SettingsDialog(self.ctx, self.window)
            self._settings.finished.connect(self._settings_closed)
            self._settings.connect_requested.connect(self.connect_to_another_server)
        self._settings.show()
        self._settings.raise_()

    def connect_to_another_server(self) -> FirstRunDialog:
        """Settings' "Connect to another server…": enrol there, then run the agent on it."""
        if self._connecting is None:
            dialog = FirstRunDialog(self.ctx, self._settings or self.window, switching=True)
            dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
            dialog.finished.connect(lambda _=0, d=dialog: self._connected(d))
            self._connecting = dialog
        self._connecting.show()
        self._connecting.raise_()
        return self._connecting

    def _connected(self, dialog: FirstRunDialog) -> None:
        self._connecting = None
        if dialog.choice is not Choice.CONNECTED:
            return  # cancelled: nothing changed
        if self.ctx.config["local.server"]:
            self.ctx.config.set("local.server", False)  # the embedded mesh is left behind
            self.ctx.config.save()
        if self._settings is not None:
            self._settings.server.setText(str(self.ctx.config["server.url"]))
        self._switched.set()

    def _sync_default(self, name: str) -> Path | None:
        """Where a peer's folder lands unless the user picks another place: a new folder in
        ``agent.sync_root()``, with the service's clash name if that one is taken."""
        agent = self.bridge.agent
        if agent is None:
            return None
        # Only shown (the service names the folder): still, a peer's name is no path.
        name = name.replace("/", "_").replace("\\", "_").strip()
        root = agent.sync_root()
        if name in ("", ".", ".."):
            return root
        try:
            return unique_destination(root / name)
        except UserError:
            return root / name

    def _settings_closed(self, _: int) -> None:
        if self._settings is not None:
            self._settings.deleteLater()
            self._settings = None

    def open_terminal(self, device: DeviceEntry) -> None:
        """The terminal viewer for a device's shared session."""
        agent = self.bridge.agent
        if agent is None:
            self.window.show_notice("Not connected yet.")
            return

        async def open_window() -> None:
            try:
                view = await agent.terminals.view(device.id)
            except UserError as exc:
                self.window.show_notice(exc.message)
                return
            self._keep(TerminalWindow(view))

        self.bridge.spawn(open_window(), "ui-terminal-view")

    async def share_terminal(self) -> None:
        """Share the user's shell in a window of its own (closing it stops sharing)."""
        agent = self.bridge.agent
        if agent is None:
            self.window.show_notice("Not connected yet.")
            return
        try:
            shared = agent.terminals.share(allow_control=True, cols=100, rows=30)
        except UserError as exc:
            self.window.show_notice(exc.message)
            return
        self._keep(HostTerminalWindow(shared))

    def _keep(self, window: TerminalWindow | HostTerminalWindow) -> None:
        """Show a terminal window and hold it until it is closed."""
        window.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        window.destroyed.connect(lambda _=None, w=window: self._forget_terminal(w))
        self.terminal_windows.append(window)
        window.show()

    def _forget_terminal(self, window: QWidget) -> None:
        with contextlib.suppress(ValueError):
            self.terminal_windows.remove(window)


async def _bring_forward_running(ctx: Context) -> bool:
    """True when an app already runs for this home (and was asked to come to the front)."""
    try:
        await ipc.call(ctx.paths.ipc_path, "show", timeout=5)
    except ipc.AgentNotRunning:
        return False
    except UserError as exc:
        if exc.code == "bad_request":  # `meshagent up` answers, but has no window
            raise UserError(
                "a headless agent (meshagent up) is running for this home;"
                " stop it to use the desktop app",
                code="agent_running",
            ) from None
        raise
    return True


def make_application(argv: list[str] | None = None) -> QApplication:
    existing = QApplication.instance()
    app = existing if isinstance(existing, QApplication) else QApplication(argv or sys.argv[:1])
    app.setApplicationName("Mesh Agent")
    app.setApplicationDisplayName("Mesh Agent")
    app.setDesktopFileName("meshagent")
    app.setWindowIcon(app_icon())
    return app


def run_gui(home: str | None = None, *, log_file: str | None = None) -> int:
    """The desktop app for ``home`` (None: MESHAGENT_HOME or the platform's folders)."""
    import qasync  # type: ignore[import-untyped]

    ctx = Context.open(home)
    if asyncio.run(_bring_forward_running(ctx)):
        return 0
    app = make_application()
    try:
        ctx.config.check()  # a bad hand-edited value: said where a desktop user sees it
    except UserError as exc:
        QMessageBox.critical(None, "Mesh Agent", exc.message)
        raise
    loop = qasync.QEventLoop(app)
    asyncio.set_event_loop(loop)
    reporter = ErrorReporter(log_file)
    reporter.install(loop)
    gui = GuiApp(ctx)
    # Quitting goes through gui.quit so that the agent shuts down before the loop stops; and
    # not on the last window closed, which the first-run dialog is while no tray shows.
    app.setQuitOnLastWindowClosed(False)
    if sys.platform != "win32":
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, gui.quit)
    try:
        with loop:
            code: int = loop.run_until_complete(gui.run())
            return code
    except UserError as exc:
        QMessageBox.critical(None, "Mesh Agent", exc.message)
        raise
    finally:
        asyncio.set_event_loop(None)
