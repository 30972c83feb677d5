"""First run: connect to a Mesh Server, or start a local mesh on this computer.

Connecting enrols this device exactly as `meshagent login` does (core/mesh/enroll.enroll). The
local mesh is started by the app afterwards (compose/onboarding.run_agent(local=True)): the embedded
server, this device enrolled as owner, and a join code shown in the main window.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import socket
import sys

from PySide6.QtCore import Qt
from PySide6.QtGui import QCloseEvent, QShowEvent
from PySide6.QtWidgets import (
    QCheckBox,
    QDialog,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from meshagent_gui.compose.local_mesh import DEFAULT_PORT, LOOPBACK
from meshagent_gui.context import Context
from meshagent_gui.core.mesh.discovery import FoundMesh, MeshBrowser
from meshagent_gui.core.mesh.enroll import enroll
from meshagent_gui.core.mesh.pairing import join, parse_pairing_code
from meshagent_gui.errors import UserError

from .main_window import named
from .resources import app_icon

log = logging.getLogger(__name__)

STYLE = """
#heading { font-size: 17pt; font-weight: 600; }
#lead { color: #55606b; }
#option { border: 1px solid #d6dde3; border-radius: 12px; background: palette(base); }
#optionTitle { font-size: 12pt; font-weight: 600; }
#hint { color: #66727d; }
#error { color: #c62828; }
QPushButton#primary { background: #2a9d8f; color: white; border: none; border-radius: 6px;
                      padding: 8px 18px; font-weight: 600; }
QPushButton#primary:disabled { background: #9cc9c3; }
QPushButton#secondary { padding: 7px 16px; }
"""


def port_free(host: str, port: int) -> bool:
    """Whether the embedded server can listen on ``port`` (bound as the server binds it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        if sys.platform != "win32":
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind((host, port))
        except OSError as exc:  # in use, most often; or reserved (EACCES)
            log.debug("port %s on %s: %s", port, host, exc)
            return False
    return True


def free_port_near(host: str, taken: int) -> int:
    """A free port close to ``taken`` (easy to tell other devices), else any free one."""
    for port in range(taken + 1, min(taken + 100, 65536)):
        if port_free(host, port):
            return port
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def answers_on_network(listen: str) -> bool:
    """Whether a local mesh listening on ``listen`` (``local.listen``) reaches other computers."""
    if listen in ("", "localhost"):
        return False
    try:
        return not ipaddress.ip_address(listen).is_loopback
    except ValueError:
        return False


class Choice(enum.Enum):
    CONNECTED = "connected"  # enrolled with a Mesh Server
    LOCAL = "local"  # start the embedded mesh


class FirstRunDialog(QDialog):
    """First run's choice; with ``switching``, only "Connect to a Mesh Server" (Settings'
    "Connect to another server…": this device enrols there, the app then runs on it)."""

    def __init__(
        self, ctx: Context, parent: QWidget | None = None, *, switching: bool = False
    ) -> None:
        super().__init__(parent)
        self.ctx = ctx
        self.choice: Choice | None = None
        self._task: asyncio.Task[bool] | None = None
        self.setWindowTitle("Connect to another server" if switching else "Welcome to Mesh Agent")
        self.setWindowIcon(app_icon())
        self.setStyleSheet(STYLE)
        self.setMinimumWidth(640)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(24, 20, 24, 18)
        layout.setSpacing(14)

        top = QHBoxLayout()
        logo = QLabel()
        logo.setPixmap(app_icon().pixmap(56, 56))
        words = QVBoxLayout()
        words.setSpacing(2)
        heading = "Connect to another server" if switching else "Welcome to Mesh Agent"
        words.addWidget(named(QLabel(heading), "heading"))
        lead = named(
            QLabel(
                f"This device leaves {ctx.config['server.url'] or 'its mesh'} and enrols with the"
                " server below; its files and settings stay."
                if switching
                else "Send files and folders peer to peer, share terminals and get notified."
                " Choose how this device joins a mesh."
            ),
            "lead",
        )
        lead.setWordWrap(True)
        words.addWidget(lead)
        top.addWidget(logo, 0, Qt.AlignmentFlag.AlignTop)
        top.addSpacing(8)
        top.addLayout(words, 1)
        layout.addLayout(top)

        local = named(QFrame(), "option")
        local_layout = QVBoxLayout(local)
        local_layout.setContentsMargins(16, 14, 16, 14)
        local_layout.addWidget(named(QLabel("Start a local mesh on this computer"), "optionTitle"))
        local_hint = named(
            QLabel(
                "Nothing else to install: the Mesh Server runs inside this app, this device becomes"
                " its owner, and you get a join code for your other devices."
            ),
            "hint",
        )
        local_hint.setWordWrap(True)
        local_layout.addWidget(local_hint)
        self.local_button = named(QPushButton("Start a local mesh"), "primary")
        self.local_button.clicked.connect(self.choose_local)
        self.on_network = QCheckBox("Let other computers on this network join")
        self.on_network.setToolTip(
            "The Mesh Server answers on this computer's network address, in plain HTTP, and"
            " other computers on this network find it by themselves (mDNS): use it on networks"
            " you trust (files and terminals stay end-to-end encrypted)."
        )
        self.on_network.setChecked(answers_on_network(str(ctx.config["local.listen"])))
        # Shown when the usual port is taken (another program, another mesh): a free one to
        # use instead, in the dialog, not a command to type.
        self.port_note = named(QLabel(), "error")
        self.port_note.setWordWrap(True)
        self.port = QSpinBox()
        self.port.setRange(1024, 65535)
        self.port.setToolTip("The port the Mesh Server inside this app listens on")
        self.port_row = QWidget()
        port_layout = QHBoxLayout(self.port_row)
        port_layout.setContentsMargins(0, 0, 0, 0)
        port_layout.addWidget(QLabel("Port"))
        port_layout.addWidget(self.port)
        port_layout.addStretch(1)
        self.port.valueChanged.connect(
            lambda value: self.local_button.setText(f"Start on port {value}")
        )
        self.port_note.hide()
        self.port_row.hide()
        local_layout.addWidget(self.port_note)
        local_layout.addWidget(self.port_row)
        row = QHBoxLayout()
        row.addWidget(self.on_network)
        row.addStretch(1)
        row.addWidget(self.local_button)
        local_layout.addLayout(row)
        layout.addWidget(local)
        local.setVisible(not switching)

        remote = named(QFrame(), "option")
        remote_layout = QVBoxLayout(remote)
        remote_layout.setContentsMargins(16, 14, 16, 14)
        remote_layout.addWidget(named(QLabel("Connect to a Mesh Server"), "optionTitle"))
        # Local meshes found on this network (mDNS): a click fills in the address; a code alone
        # is tried at what is found, as `meshagent join CODE` does.
        self.found_hint = named(QLabel("Looking for local meshes on this network…"), "hint")
        self.found_list = QListWidget()
        self.found_list.setAccessibleName("Local meshes found on this network")
        self.found_list.setMaximumHeight(self.fontMetrics().height() * 4 + 8)
        self.found_list.itemClicked.connect(self._use_found)
        self.found_list.hide()
        remote_layout.addWidget(self.found_hint)
        remote_layout.addWidget(self.found_list)
        self._browse_task: asyncio.Task[None] | None = None
        server_form = QFormLayout()
        self.url = QLineEdit()
        self.url.setPlaceholderText("https://mesh.example.org (empty: found on this network)")
        self.device_name = QLineEdit()
        self.device_name.setPlaceholderText(ctx.device_name)
        server_form.addRow("Server URL", self.url)
        server_form.addRow("Device name", self.device_name)
        remote_layout.addLayout(server_form)
        self.how = QTabWidget()
        code_page = QWidget()
        code_form = QFormLayout(code_page)
        self.join_code = QLineEdit()
        self.join_code.setPlaceholderText("ABCD-EFGH-IJKL-MNOP or mesh://host:port/ABCD-…")
        self.join_code.textChanged.connect(self._code_typed)
        code_form.addRow("Join code", self.join_code)
        password_page = QWidget()
        password_form = QFormLayout(password_page)
        self.user = QLineEdit()
        self.password = QLineEdit()
        self.password.setEchoMode(QLineEdit.EchoMode.Password)
        password_form.addRow("User", self.user)
        password_form.addRow("Password", self.password)
        self.how.addTab(code_page, "Join code")
        self.how.addTab(password_page, "User and password")
        remote_layout.addWidget(self.how)
        self.error = named(QLabel(), "error")
        self.error.setTextFormat(Qt.TextFormat.PlainText)  # messages quote servers and input
        self.error.setWordWrap(True)
        self.error.hide()
        remote_layout.addWidget(self.error)
        self.connect_button = named(QPushButton("Connect"), "secondary")
        self.connect_button.clicked.connect(self.start_connect)
        quit_button = named(QPushButton("Cancel" if switching else "Quit"), "secondary")
        quit_button.clicked.connect(self.reject)
        buttons = QHBoxLayout()
        buttons.addWidget(quit_button)
        buttons.addStretch(1)
        buttons.addWidget(self.connect_button)
        remote_layout.addLayout(buttons)
        layout.addWidget(remote)

    # ------------------------------------------------------------ choices

    def choose_local(self) -> None:
        """Start the local mesh; if its port is taken, offer a free one here and stay open."""
        config = self.ctx.config
        listen = "0.0.0.0" if self.on_network.isChecked() else LOOPBACK
        offered = not self.port_row.isHidden()
        port = self.port.value() if offered else int(config["local.port"] or 0) or DEFAULT_PORT
        if not port_free(listen, port):
            other = free_port_near(listen, port)
            self.port_note.setText(
                f"Port {port} is in use by another program. Mesh Agent can use port {other}"
                " instead: your other devices join with the address shown after the start."
            )
            self.port.setValue(other)
            self.port_note.show()
            self.port_row.show()
            return
        # The box decides, either way: the default answers on the network.
        config.set("local.listen", "0.0.0.0" if self.on_network.isChecked() else LOOPBACK)
        if offered:
            config.set("local.port", port)
        config.save()
        self.choice = Choice.LOCAL
        self.accept()

    def start_connect(self) -> None:
        if self._task is not None and not self._task.done():
            return
        self._task = asyncio.get_running_loop().create_task(self.connect_to_server())

    async def connect_to_server(self) -> bool:
        """Enrol with the server in the form; on failure say why and stay open."""
        url = self.url.text().strip()
        by_code = self.how.currentIndex() == 0
        if not url and not by_code:
            self.show_error("Enter the server's URL.")
            return False
        if by_code and not self.join_code.text().strip():
            self.show_error("Enter the join code you were given.")
            return False
        if not by_code and not (self.user.text().strip() and self.password.text()):
            self.show_error("Enter your user name and password.")
            return False
        self._busy(True)
        try:
            if by_code and not url:  # the code alone: at the local mesh that knows it
                await join(
                    self.ctx,
                    self.join_code.text(),
                    device_name=self.device_name.text().strip() or None,
                )
            else:
                await enroll(
                    self.ctx,
                    url,
                    join_code=self.join_code.text().strip() if by_code else None,
                    username=None if by_code else self.user.text().strip(),
                    password=None if by_code else self.password.text(),
                    device_name=self.device_name.text().strip() or None,
                )
        except UserError as exc:
            self.show_error(exc.message)
            return False
        finally:
            self._busy(False)
        self.choice = Choice.CONNECTED
        self.accept()
        return True

    # ------------------------------------------------------------ found on this network

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        if self._browse_task is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop (a bare widget test): nothing to browse with
            self._browse_task = loop.create_task(self._browse(), name="ui-first-run-browse")

    async def _browse(self) -> None:
        async with MeshBrowser() as browser:
            while True:
                await browser.changed.wait()
                browser.changed.clear()
                self.show_found(sorted(browser.found.values(), key=lambda m: m.name))

    def show_found(self, meshes: list[FoundMesh]) -> None:
        self.found_list.clear()
        for mesh in meshes:
            item = QListWidgetItem(mesh.label)
            item.setData(Qt.ItemDataRole.UserRole, mesh.url)
            item.setToolTip(f"{mesh.url}: click to join it with the code you were given")
            self.found_list.addItem(item)
        self.found_list.setVisible(bool(meshes))
        self.found_hint.setText(
            "Found on this network (the join code alone is enough; a click fills in the address):"
            if meshes
            else "No local mesh found on this network yet."
        )

    def _use_found(self, item: QListWidgetItem) -> None:
        self.url.setText(str(item.data(Qt.ItemDataRole.UserRole)))
        self.how.setCurrentIndex(0)
        self.join_code.setFocus()

    def _code_typed(self, text: str) -> None:
        """A pasted ``mesh://host:port/CODE`` fills in the address and leaves the code."""
        if "://" not in text:
            return
        try:
            pairing = parse_pairing_code(text)
        except UserError:
            return  # still typing, or not a code: Connect says what is wrong
        if pairing.url is not None:
            self.url.setText(pairing.url)
            self.join_code.setText(pairing.code)

    def show_error(self, text: str) -> None:
        self.error.setText(text)
        self.error.show()

    def _busy(self, busy: bool) -> None:
        self.connect_button.setEnabled(not busy)
        self.local_button.setEnabled(not busy)
        self.connect_button.setText("Connecting…" if busy else "Connect")

    def done(self, result: int) -> None:
        if self._task is not None and not self._task.done() and self.choice is None:
            self._task.cancel()
        if self._browse_task is not None:
            self._browse_task.cancel()  # closes its mDNS sockets as it ends
        super().done(result)

    async def stop_browsing(self) -> None:
        """End the mDNS browse and wait until its sockets are closed: a Quit (or SIGTERM) while
        the dialog is open must not leave the browse to be torn down after the loop stopped."""
        task = self._browse_task
        if task is None or task.done():
            return
        if not task.cancelling():  # done() may have asked already: a second cancel would cut
            task.cancel()  # its shielded close short (sockets closed under the loop's feet)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def closeEvent(self, event: QCloseEvent) -> None:
        self.reject()
        event.accept()


async def ask_first_run(ctx: Context, parent: QWidget | None = None) -> Choice | None:
    """Show the dialog and wait (without blocking the loop) for the user's choice."""
    dialog = FirstRunDialog(ctx, parent)
    finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def done(_: int) -> None:
        if not finished.done():
            finished.set_result(None)

    dialog.finished.connect(done)
    dialog.show()
    dialog.raise_()
    dialog.activateWindow()
    try:
        await finished
    finally:
        await dialog.stop_browsing()
        with contextlib.suppress(RuntimeError):
            dialog.hide()
            dialog.deleteLater()
    return dialog.choice
