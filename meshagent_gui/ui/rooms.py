"""The Rooms view: the rooms a person is in, their members and roles, and invitations.

Rooms are consented (docs/security.md): nobody is put into a room without their own act, so an
invitation is a question to its invitee (a toast and an Accept / Decline dialog), and a room join
code is something the joiner uses. This module stays thin (DESIGN §2):

- :class:`RoomsApi` is what the view needs of the core; the agent's ``MeshClient`` is one, the
  tests use a fake. :class:`RoomsModel` keeps what the server said last and runs the user's
  actions through it as tasks the bridge owns. A failed action is one line in the window and
  changes nothing; a successful one reloads the rooms and invitations.
- :class:`RoomsWindow` shows the model; :class:`InvitationDialog` asks about one invitation;
  :class:`AuditDialog` lists a room's audit log (owners).
- :class:`Rooms` wires them to the app: the bridge's events, the toasts, the dialogs.

Names shown here come from other people (room names, user names): labels are plain text.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar, cast, get_args

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtGui import QCloseEvent, QGuiApplication
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from meshagent_gui.core.events import AnnouncementReceived, InvitationReceived
from meshagent_gui.core.mesh.types import Role
from meshagent_gui.core.notify.router import Notification
from meshagent_gui.errors import UserError

from .resources import app_icon
from .widgets import (
    Spawn,
    answer_buttons,
    bring_to_front,
    one_line,
    plain_label,
    show_message,
    succeeded,
)

if TYPE_CHECKING:
    from meshagent_gui.core.mesh.types import AuditEntry, Invitation, JoinCode, Room

    from .bridge import AgentBridge
    from .toasts import ToastSink

log = logging.getLogger(__name__)

T = TypeVar("T")

ROLES: Final[tuple[str, ...]] = get_args(Role)
PERSONAL_PREFIX: Final = "@"  # a user's own room: their devices; nobody else can be invited
JOIN_CODE_TTL: Final = 24 * 3600  # seconds a room join code made here stays valid
AUDIT_LIMIT: Final = 200
INVITATION_PRIORITY: Final = 6  # a toast that stands out a little (Gotify scale, 7+ is loud)
# On top of the main window's style sheet (this window is its child): errors look like errors.
STYLE: Final = """
#banner[error="true"] { background: #fde8e8; color: #7a1f1f; border: 1px solid #f2b8b8; }
"""


def as_role(text: str) -> Role | None:
    return cast(Role, text) if text in ROLES else None


def is_personal(room: str) -> bool:
    return room.startswith(PERSONAL_PREFIX)


def when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(at))


class RoomsApi(Protocol):
    """The core's room calls (``meshagent_gui.core.mesh.client.MeshClient`` has them).

    Every failure the user can act on raises a ``UserError`` (``MeshError``) with one message.
    """

    async def rooms(self) -> list[Room]: ...

    async def create_room(self, name: str) -> Room: ...

    async def invite(self, room: str, user: str, role: Role) -> None: ...

    async def invitations(self) -> list[Invitation]: ...

    async def accept_invitation(self, room: str) -> Room: ...

    async def decline_invitation(self, room: str) -> None: ...

    async def leave_room(self, room: str) -> None: ...

    async def set_role(self, room: str, user: str, role: Role) -> Room: ...

    async def remove_member(self, room: str, user: str) -> None: ...

    async def room_join_code(self, room: str, ttl: int) -> JoinCode: ...

    async def join_room(self, code: str) -> Room: ...

    async def room_audit(self, room: str, limit: int) -> list[AuditEntry]: ...


# ---------------------------------------------------------------- the model


class RoomsModel(QObject):
    """What the server said last about the user's rooms, and the user's actions on them.

    Actions return the task that runs them (tests await it); its result is the API's answer, or
    None when it failed (the failure was emitted as ``error``, and nothing changed).
    """

    changed = Signal()  # rooms or invitations reloaded
    error = Signal(str)  # one line: an action failed, nothing changed
    notice = Signal(str)  # one line: an action succeeded
    join_code_made = Signal(str, object)  # room, JoinCode
    audit_loaded = Signal(str, object)  # room, list[AuditEntry]

    def __init__(
        self,
        api: Callable[[], RoomsApi | None],
        spawn: Spawn,
        *,
        me: Callable[[], str | None] = lambda: None,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self._api = api
        self._spawn = spawn
        self.me = me
        self.rooms: list[Room] = []
        self.invitations: list[Invitation] = []
        self.loaded = False
        self._reloading = asyncio.Lock()  # one reload at a time: the last one shows the newest

    def room(self, name: str) -> Room | None:
        return next((r for r in self.rooms if r.name == name), None)

    # ------------------------------------------------------------ reading

    def refresh(self) -> asyncio.Task[bool | None]:
        return self._spawn(self._act(self._reload, None, reload=False), "ui-rooms-refresh")

    async def _reload(self, api: RoomsApi) -> bool:
        async with self._reloading:
            rooms = await api.rooms()
            invitations = await api.invitations()
            self.rooms = sorted(rooms, key=lambda r: (not is_personal(r.name), r.name))
            self.invitations = list(invitations)
            self.loaded = True
        self.changed.emit()
        return True

    def handle(self, event: object) -> None:
        """A core event: an invitation or a membership change reloads (once loaded)."""
        membership = isinstance(event, AnnouncementReceived) and event.kind.startswith("room.")
        if self.loaded and (membership or isinstance(event, InvitationReceived)):
            self.refresh()

    # ------------------------------------------------------------ actions

    def create_room(self, name: str) -> asyncio.Task[Room | None]:
        name = name.strip()
        return self._start(
            "create",
            lambda api: api.create_room(name),
            f"Room {name} created.",
            check=None if name else "Enter a name for the new room.",
        )

    def invite(self, room: str, user: str, role: Role) -> asyncio.Task[bool | None]:
        user = user.strip()
        return self._start(
            "invite",
            lambda api: succeeded(api.invite(room, user, role)),
            # The server answers the same whether the user exists or not: so do we.
            f"Invitation to {room} sent to {user} (as {role}); they see it when they accept.",
            check=None if user else "Enter the user name of the person to invite.",
        )

    def accept(self, room: str) -> asyncio.Task[Room | None]:
        return self._start("accept", lambda api: api.accept_invitation(room), f"You joined {room}.")

    def decline(self, room: str) -> asyncio.Task[bool | None]:
        return self._start(
            "decline",
            lambda api: succeeded(api.decline_invitation(room)),
            f"Invitation to {room} declined.",
        )

    def leave(self, room: str) -> asyncio.Task[bool | None]:
        return self._start(
            "leave", lambda api: succeeded(api.leave_room(room)), f"You left {room}."
        )

    def set_role(self, room: str, user: str, role: Role) -> asyncio.Task[Room | None]:
        return self._start(
            "role", lambda api: api.set_role(room, user, role), f"{user} is now {role} in {room}."
        )

    def remove_member(self, room: str, user: str) -> asyncio.Task[bool | None]:
        return self._start(
            "remove",
            lambda api: succeeded(api.remove_member(room, user)),
            f"{user} removed from {room}.",
        )

    def join(self, code: str) -> asyncio.Task[Room | None]:
        code = code.strip()

        async def join(api: RoomsApi) -> Room:
            room = await api.join_room(code)
            self.notice.emit(one_line(f"You joined {room.name}."))
            return room

        return self._start(
            "join", join, None, check=None if code else "Enter the room join code you were given."
        )

    def make_join_code(self, room: str, ttl: int = JOIN_CODE_TTL) -> asyncio.Task[JoinCode | None]:
        async def make(api: RoomsApi) -> JoinCode:
            code = await api.room_join_code(room, ttl)
            self.join_code_made.emit(room, code)
            return code

        return self._start("join-code", make, None, reload=False)

    def load_audit(
        self, room: str, limit: int = AUDIT_LIMIT
    ) -> asyncio.Task[list[AuditEntry] | None]:
        async def load(api: RoomsApi) -> list[AuditEntry]:
            entries = await api.room_audit(room, limit)
            self.audit_loaded.emit(room, entries)
            return entries

        return self._start("audit", load, None, reload=False)

    # ------------------------------------------------------------ plumbing

    def _start(
        self,
        name: str,
        call: Callable[[RoomsApi], Awaitable[T]],
        done: str | None,
        *,
        check: str | None = None,
        reload: bool = True,
    ) -> asyncio.Task[T | None]:
        if check is not None:
            self.error.emit(check)
            return self._spawn(_nothing(), f"ui-rooms-{name}")
        return self._spawn(self._act(call, done, reload=reload), f"ui-rooms-{name}")

    async def _act(
        self, call: Callable[[RoomsApi], Awaitable[T]], done: str | None, *, reload: bool = True
    ) -> T | None:
        api = self._api()
        if api is None:
            self.error.emit("Not connected to a Mesh Server yet.")
            return None
        try:
            result = await call(api)
        except UserError as exc:
            self.error.emit(one_line(exc.message))
            return None
        if done is not None:
            self.notice.emit(one_line(done))
        if reload:
            try:
                await self._reload(api)
            except UserError as exc:
                self.error.emit(one_line(f"Done, but the room list did not reload: {exc.message}"))
        return result


async def _nothing() -> None:
    return None


# ---------------------------------------------------------------- dialogs


class InvitationDialog(QDialog):
    """Accept or decline one invitation; not modal, so it never blocks the app."""

    answered = Signal(str, bool)  # room, accept
    NO_ANSWER: Final = -1  # closed without Accept or Decline: the invitation stays open

    def __init__(self, room: str, role: str, by: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.room = room
        self.setObjectName("invitation-dialog")
        self.setWindowTitle("Invitation to a room")
        self.setWindowIcon(app_icon())
        layout = QVBoxLayout(self)
        layout.setContentsMargins(20, 18, 20, 16)
        layout.setSpacing(10)
        self.text = plain_label(f"{by} invites you to the room “{room}” as {role}.")
        self.detail = plain_label(
            "If you accept, the members of this room can see your devices and reach them as"
            " their role allows. Nothing of yours is visible to them before you accept."
        )
        self.detail.setObjectName("subtitle")
        buttons, self.accept_button, self.decline_button = answer_buttons(self)
        for widget in (self.text, self.detail, buttons):
            layout.addWidget(widget)
        self.setWindowModality(Qt.WindowModality.NonModal)
        self.finished.connect(self._finished)

    def closeEvent(self, event: QCloseEvent) -> None:
        # Closing the window is no answer: the invitation stays in the Rooms view.
        event.accept()
        self.done(self.NO_ANSWER)

    def _finished(self, result: int) -> None:
        if result == QDialog.DialogCode.Accepted:
            self.answered.emit(self.room, True)
        elif result == QDialog.DialogCode.Rejected:
            self.answered.emit(self.room, False)


class AuditDialog(QDialog):
    """A room's audit log, newest first (what the server recorded; owners only)."""

    COLUMNS: Final = ("When", "What", "Who", "Device", "Subject", "Detail")

    def __init__(self, room: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.room = room
        self.setObjectName("audit-dialog")
        self.setWindowTitle(f"Audit log: {room}")
        self.setWindowIcon(app_icon())
        self.resize(820, 420)
        layout = QVBoxLayout(self)
        self.table = QTableWidget(0, len(self.COLUMNS))
        self.table.setHorizontalHeaderLabels(list(self.COLUMNS))
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.verticalHeader().hide()
        self.table.horizontalHeader().setSectionResizeMode(
            len(self.COLUMNS) - 1, QHeaderView.ResizeMode.Stretch
        )
        self.empty = plain_label("Nothing recorded yet.")
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.close)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.empty)
        layout.addWidget(buttons)
        self.setWindowModality(Qt.WindowModality.NonModal)

    def show_entries(self, entries: list[AuditEntry]) -> None:
        rows = sorted(entries, key=lambda e: e.at, reverse=True)
        self.table.setRowCount(len(rows))
        for row, entry in enumerate(rows):
            detail = entry.detail if isinstance(entry.detail, str) else _detail(entry.detail)
            cells = (
                when(entry.at),
                entry.kind,
                entry.actor_user or "",
                (entry.actor_device or "")[:12],
                entry.subject or "",
                detail,
            )
            for column, text in enumerate(cells):
                self.table.setItem(row, column, QTableWidgetItem(one_line(str(text))))
        self.table.resizeColumnsToContents()
        self.empty.setVisible(not rows)


def _detail(detail: object) -> str:
    if isinstance(detail, dict):
        return ", ".join(f"{k}={v}" for k, v in detail.items())
    return "" if detail is None else str(detail)


async def confirm(parent: QWidget | None, title: str, text: str) -> bool:
    """Ask yes/no without a nested event loop (the agent keeps running while it is open)."""
    answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    box = QMessageBox(QMessageBox.Icon.Question, title, text, parent=parent)
    box.setObjectName("rooms-confirm")
    box.setTextFormat(Qt.TextFormat.PlainText)
    yes = box.addButton(title, QMessageBox.ButtonRole.AcceptRole)
    no = box.addButton("Cancel", QMessageBox.ButtonRole.RejectRole)
    box.setDefaultButton(no)
    box.setEscapeButton(no)
    box.setWindowModality(Qt.WindowModality.NonModal)

    def clicked(button: object) -> None:
        if not answer.done():
            answer.set_result(button is yes)

    def finished(_: int) -> None:
        if not answer.done():
            answer.set_result(False)

    box.buttonClicked.connect(clicked)
    box.finished.connect(finished)
    box.show()
    try:
        return await answer
    finally:
        box.buttonClicked.disconnect(clicked)
        box.finished.disconnect(finished)
        box.close()
        box.deleteLater()


# ---------------------------------------------------------------- the window


class RoomsWindow(QWidget):
    """Rooms on the left (yours first), the selected room's members and actions on the right."""

    def __init__(self, model: RoomsModel, spawn: Spawn, parent: QWidget | None = None) -> None:
        super().__init__(parent, Qt.WindowType.Window)
        self.model = model
        self._spawn = spawn
        self.confirm: Callable[[str, str], Awaitable[bool]] = lambda title, text: confirm(
            self, title, text
        )
        self.audit_dialogs: dict[str, AuditDialog] = {}
        self.setObjectName("rooms-window")
        self.setWindowTitle("Mesh Agent: rooms")
        self.setWindowIcon(app_icon())
        self.resize(960, 680)
        self.setStyleSheet(STYLE)
        self._build()
        model.changed.connect(self._show_model)
        model.error.connect(self.show_error)
        model.notice.connect(self.show_notice)
        model.join_code_made.connect(self._show_join_code)
        model.audit_loaded.connect(self._show_audit)
        self._show_model()

    # ------------------------------------------------------------ layout

    def _build(self) -> None:
        outer = QVBoxLayout(self)
        outer.setContentsMargins(16, 12, 16, 12)
        outer.setSpacing(10)

        header = QHBoxLayout()
        title = QLabel("Rooms")
        title.setObjectName("title")
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.clicked.connect(self.model.refresh)
        header.addWidget(title)
        header.addStretch(1)
        header.addWidget(self.refresh_button)
        outer.addLayout(header)
        explain = plain_label(
            "A room shares your devices with its members: owners and members may send files and"
            " control shared terminals, viewers may only watch. Nobody joins without accepting."
        )
        explain.setObjectName("subtitle")
        outer.addWidget(explain)

        self.message = QLabel()
        self.message.setObjectName("banner")
        self.message.setTextFormat(Qt.TextFormat.PlainText)
        self.message.setWordWrap(True)
        self.message.hide()
        outer.addWidget(self.message)

        self.invitations_box = QGroupBox("Invitations waiting for your answer")
        box = QHBoxLayout(self.invitations_box)
        self.invitation_list = QListWidget()
        self.invitation_list.setMaximumHeight(72)
        self.invitation_list.currentItemChanged.connect(self._update_buttons)
        answers = QVBoxLayout()
        self.accept_button = QPushButton("Accept")
        self.accept_button.clicked.connect(self._accept_selected)
        self.decline_button = QPushButton("Decline")
        self.decline_button.clicked.connect(self._decline_selected)
        answers.addWidget(self.accept_button)
        answers.addWidget(self.decline_button)
        answers.addStretch(1)
        box.addWidget(self.invitation_list, 1)
        box.addLayout(answers)
        self.invitations_box.hide()
        outer.addWidget(self.invitations_box)

        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.setChildrenCollapsible(False)

        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(0, 0, 6, 0)
        self.room_table = QTableWidget(0, 3)
        self.room_table.setHorizontalHeaderLabels(["Room", "Your role", "Members"])
        self.room_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.room_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.room_table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.room_table.verticalHeader().hide()
        self.room_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.room_table.itemSelectionChanged.connect(self._show_selected)
        left_layout.addWidget(self.room_table, 1)
        create = QHBoxLayout()
        self.new_room = QLineEdit()
        self.new_room.setPlaceholderText("new room name")
        self.new_room.returnPressed.connect(self._create)
        self.create_button = QPushButton("Create room")
        self.create_button.clicked.connect(self._create)
        create.addWidget(self.new_room, 1)
        create.addWidget(self.create_button)
        left_layout.addLayout(create)
        join = QHBoxLayout()
        self.join_code = QLineEdit()
        self.join_code.setPlaceholderText("room join code you were given")
        self.join_code.returnPressed.connect(self._join)
        self.join_button = QPushButton("Join room")
        self.join_button.clicked.connect(self._join)
        join.addWidget(self.join_code, 1)
        join.addWidget(self.join_button)
        left_layout.addLayout(join)

        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.setContentsMargins(6, 0, 0, 0)
        self.room_title = plain_label("Select a room.")
        self.room_title.setObjectName("sectionTitle")
        right_layout.addWidget(self.room_title)
        self.member_table = QTableWidget(0, 2)
        self.member_table.setHorizontalHeaderLabels(["Member", "Role"])
        self.member_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.member_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.member_table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.member_table.verticalHeader().hide()
        self.member_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.member_table.itemSelectionChanged.connect(self._update_buttons)
        right_layout.addWidget(self.member_table, 1)

        self.owner_box = QGroupBox("Owner")
        owner = QVBoxLayout(self.owner_box)
        invite = QHBoxLayout()
        self.invite_user = QLineEdit()
        self.invite_user.setPlaceholderText("user name")
        self.invite_user.returnPressed.connect(self._invite)
        self.invite_role = QComboBox()
        self.invite_role.addItems(list(ROLES))
        self.invite_role.setCurrentText("member")
        self.invite_button = QPushButton("Invite")
        self.invite_button.clicked.connect(self._invite)
        invite.addWidget(self.invite_user, 1)
        invite.addWidget(self.invite_role)
        invite.addWidget(self.invite_button)
        owner.addLayout(invite)
        member = QHBoxLayout()
        self.member_role = QComboBox()
        self.member_role.addItems(list(ROLES))
        self.member_role.setCurrentText("member")
        self.role_button = QPushButton("Change role")
        self.role_button.clicked.connect(self._change_role)
        self.remove_button = QPushButton("Remove member")
        self.remove_button.clicked.connect(self._remove)
        member.addWidget(plain_label("Selected member:"))
        member.addWidget(self.member_role)
        member.addWidget(self.role_button)
        member.addWidget(self.remove_button)
        member.addStretch(1)
        owner.addLayout(member)
        tools = QHBoxLayout()
        self.join_code_button = QPushButton("New join code")
        self.join_code_button.setToolTip("A code someone can use to join this room as a member")
        self.join_code_button.clicked.connect(self._make_join_code)
        self.audit_button = QPushButton("Audit log…")
        self.audit_button.clicked.connect(self._open_audit)
        self.join_code_label = QLabel()
        self.join_code_label.setObjectName("joinCode")
        self.join_code_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.copy_code_button = QPushButton("Copy")
        self.copy_code_button.clicked.connect(self._copy_join_code)
        self.copy_code_button.hide()
        tools.addWidget(self.join_code_button)
        tools.addWidget(self.join_code_label)
        tools.addWidget(self.copy_code_button)
        tools.addStretch(1)
        tools.addWidget(self.audit_button)
        owner.addLayout(tools)
        right_layout.addWidget(self.owner_box)

        bottom = QHBoxLayout()
        bottom.addStretch(1)
        self.leave_button = QPushButton("Leave room")
        self.leave_button.clicked.connect(self._leave)
        bottom.addWidget(self.leave_button)
        right_layout.addLayout(bottom)

        splitter.addWidget(left)
        splitter.addWidget(right)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([380, 500])
        outer.addWidget(splitter, 1)

    # ------------------------------------------------------------ showing the model

    def show_error(self, text: str) -> None:
        self._say(text, error=True)

    def show_notice(self, text: str) -> None:
        self._say(text, error=False)

    def _say(self, text: str, *, error: bool) -> None:
        show_message(self.message, text, error=error)

    def selected_room(self) -> Room | None:
        rows = self.room_table.selectionModel().selectedRows()
        if not rows:
            return None
        item = self.room_table.item(rows[0].row(), 0)
        return self.model.room(item.text()) if item is not None else None

    def selected_member(self) -> str | None:
        rows = self.member_table.selectionModel().selectedRows()
        if not rows:
            return None
        item = self.member_table.item(rows[0].row(), 0)
        return str(item.data(Qt.ItemDataRole.UserRole)) if item is not None else None

    def selected_invitation(self) -> Invitation | None:
        item = self.invitation_list.currentItem()
        if item is None:
            return None
        room = item.data(Qt.ItemDataRole.UserRole)
        return next((i for i in self.model.invitations if i.room == room), None)

    def select_room(self, name: str) -> None:
        for row in range(self.room_table.rowCount()):
            item = self.room_table.item(row, 0)
            if item is not None and item.text() == name:
                self.room_table.selectRow(row)
                return

    def _show_model(self) -> None:
        keep = self.selected_room()
        self.room_table.blockSignals(True)
        self.room_table.setRowCount(len(self.model.rooms))
        for row, room in enumerate(self.model.rooms):
            name = QTableWidgetItem(room.name)
            if is_personal(room.name):
                name.setToolTip("Your own devices")
            self.room_table.setItem(row, 0, name)
            self.room_table.setItem(row, 1, QTableWidgetItem(room.role))
            members = QTableWidgetItem(str(len(room.members)))
            members.setToolTip(", ".join(room.members))
            self.room_table.setItem(row, 2, members)
        self.room_table.blockSignals(False)
        if keep is not None and self.model.room(keep.name) is not None:
            self.select_room(keep.name)
        self.invitation_list.clear()
        for invitation in self.model.invitations:
            item = QListWidgetItem(
                one_line(
                    f"{invitation.room}: {invitation.invited_by} invites you as {invitation.role}"
                )
            )
            item.setData(Qt.ItemDataRole.UserRole, invitation.room)
            item.setToolTip(f"Open until {when(invitation.expires_at)}")
            self.invitation_list.addItem(item)
        if self.model.invitations:
            self.invitation_list.setCurrentRow(0)
        self.invitations_box.setVisible(bool(self.model.invitations))
        self._show_selected()

    def _show_selected(self) -> None:
        room = self.selected_room()
        self.member_table.blockSignals(True)
        if room is None:
            self.room_title.setText("Select a room." if self.model.rooms else "No rooms yet.")
            self.member_table.setRowCount(0)
        else:
            self.room_title.setText(
                f"{room.name}: your own devices"
                if is_personal(room.name)
                else f"{room.name}: you are {room.role}"
            )
            me = self.model.me()
            members = member_roles(room, me)
            self.member_table.setRowCount(len(members))
            for row, (user, role) in enumerate(members):
                item = QTableWidgetItem(f"{user} (you)" if user == me else user)
                item.setData(Qt.ItemDataRole.UserRole, user)
                self.member_table.setItem(row, 0, item)
                self.member_table.setItem(row, 1, QTableWidgetItem(role))
        self.member_table.blockSignals(False)
        if room is None or self.join_code_label.property("room") != room.name:
            self.join_code_label.clear()
            self.copy_code_button.hide()
        self._update_buttons()

    def _update_buttons(self, *_: Any) -> None:
        room = self.selected_room()
        owner = room is not None and room.role == "owner" and not is_personal(room.name)
        self.owner_box.setVisible(owner)
        member = self.selected_member()
        others = member is not None and member != self.model.me()
        for widget in (self.role_button, self.remove_button, self.member_role):
            widget.setEnabled(owner and others)
        self.audit_button.setEnabled(room is not None and room.role == "owner")
        self.leave_button.setEnabled(room is not None and not is_personal(room.name))
        has_invitation = self.invitation_list.currentItem() is not None
        self.accept_button.setEnabled(has_invitation)
        self.decline_button.setEnabled(has_invitation)

    def _show_join_code(self, room: str, code: JoinCode) -> None:
        self.join_code_label.setProperty("room", room)
        self.join_code_label.setText(code.code)
        self.join_code_label.setToolTip(f"Valid until {when(code.expires_at)}; one use.")
        self.copy_code_button.show()

    def _show_audit(self, room: str, entries: list[AuditEntry]) -> None:
        dialog = self.audit_dialogs.get(room)
        if dialog is None:
            dialog = AuditDialog(room, self)
            dialog.finished.connect(lambda _=0, r=room: self._forget_audit(r))
            self.audit_dialogs[room] = dialog
        dialog.show_entries(entries)
        dialog.show()
        dialog.raise_()

    def _forget_audit(self, room: str) -> None:
        dialog = self.audit_dialogs.pop(room, None)
        if dialog is not None:
            dialog.deleteLater()

    # ------------------------------------------------------------ actions

    def _create(self) -> None:
        task = self.model.create_room(self.new_room.text())
        task.add_done_callback(self._created)

    def _created(self, task: asyncio.Task[Room | None]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        room = task.result()
        if room is not None:
            self.new_room.clear()
            self.select_room(room.name)

    def _join(self) -> None:
        task = self.model.join(self.join_code.text())

        def joined(done: asyncio.Task[Room | None]) -> None:
            if not done.cancelled() and done.exception() is None and done.result() is not None:
                self.join_code.clear()
                room = done.result()
                assert room is not None
                self.select_room(room.name)

        task.add_done_callback(joined)

    def _invite(self) -> None:
        room = self.selected_room()
        if room is None:
            return
        role = as_role(self.invite_role.currentText())
        if role is None:
            return
        task = self.model.invite(room.name, self.invite_user.text(), role)

        def invited(done: asyncio.Task[bool | None]) -> None:
            if not done.cancelled() and done.exception() is None and done.result():
                self.invite_user.clear()

        task.add_done_callback(invited)

    def _change_role(self) -> None:
        room, member = self.selected_room(), self.selected_member()
        role = as_role(self.member_role.currentText())
        if room is not None and member is not None and role is not None:
            self.model.set_role(room.name, member, role)

    def _remove(self) -> None:
        room, member = self.selected_room(), self.selected_member()
        if room is not None and member is not None:
            self._spawn(self._confirmed_remove(room.name, member), "ui-rooms-remove-ask")

    async def _confirmed_remove(self, room: str, member: str) -> None:
        text = f"Remove {member} from {room}? Their devices stop seeing the room's devices."
        if await self.confirm("Remove member", text):
            await self.model.remove_member(room, member)

    def _leave(self) -> None:
        room = self.selected_room()
        if room is not None:
            self._spawn(self._confirmed_leave(room.name), "ui-rooms-leave-ask")

    async def _confirmed_leave(self, room: str) -> None:
        text = f"Leave {room}? Its members stop seeing your devices; to come back you need a new"
        text += " invitation or join code."
        if await self.confirm("Leave room", text):
            await self.model.leave(room)

    def _accept_selected(self) -> None:
        invitation = self.selected_invitation()
        if invitation is not None:
            self.model.accept(invitation.room)

    def _decline_selected(self) -> None:
        invitation = self.selected_invitation()
        if invitation is not None:
            self.model.decline(invitation.room)

    def _make_join_code(self) -> None:
        room = self.selected_room()
        if room is not None:
            self.model.make_join_code(room.name)

    def _copy_join_code(self) -> None:
        clipboard = QGuiApplication.clipboard()
        if clipboard is not None and self.join_code_label.text():
            clipboard.setText(self.join_code_label.text())

    def _open_audit(self) -> None:
        room = self.selected_room()
        if room is not None:
            self.model.load_audit(room.name)

    def bring_to_front(self) -> None:
        bring_to_front(self)


def member_roles(room: Room, me: str | None) -> list[tuple[str, str]]:
    """(user, role) of each member, you first; the server tells only your own role."""
    others = sorted(user for user in room.members if user != me)
    return [*([(me, room.role)] if me in room.members else []), *((u, "") for u in others)]


# ---------------------------------------------------------------- the app's part


class Rooms(QObject):
    """The Rooms view in the app: the model on the agent's client, the window (made when first
    opened), an invitation's toast and dialog."""

    def __init__(
        self,
        bridge: AgentBridge,
        toasts: ToastSink | None = None,
        *,
        api: Callable[[], RoomsApi | None] | None = None,
        parent_widget: QWidget | None = None,
    ) -> None:
        super().__init__()
        self.bridge = bridge
        self.toasts = toasts
        self._parent_widget = parent_widget
        self.model = RoomsModel(api or self._client, bridge.spawn, me=self._me, parent=self)
        self.window: RoomsWindow | None = None
        self.invitation_dialogs: dict[str, InvitationDialog] = {}
        self.model.error.connect(self._error)
        self.model.changed.connect(self._close_answered)
        bridge.event_received.connect(self.handle)

    def _error(self, text: str) -> None:
        # The Rooms window shows its own line; without it, the main window's line says it.
        if self.window is None or not self.window.isVisible():
            self.bridge.error.emit(text)

    def _close_answered(self) -> None:
        """A room joined some other way (the Rooms window, the CLI): its dialog is moot."""
        for room in [r for r in self.invitation_dialogs if self.model.room(r) is not None]:
            self.invitation_dialogs[room].done(InvitationDialog.NO_ANSWER)

    def _client(self) -> RoomsApi | None:
        agent = self.bridge.agent
        return agent.client if agent is not None else None

    def _me(self) -> str | None:
        agent = self.bridge.agent
        return agent.enrollment.user if agent is not None else None

    def open(self) -> None:
        """Show the Rooms window (made the first time) and reload what it shows."""
        if self.window is None:
            self.window = RoomsWindow(self.model, self.bridge.spawn, self._parent_widget)
        self.window.bring_to_front()
        self.model.refresh()

    def handle(self, event: object) -> None:
        self.model.handle(event)
        if isinstance(event, InvitationReceived):
            self.invited(event)

    def invited(self, event: InvitationReceived) -> InvitationDialog:
        room, role, by = one_line(event.room), one_line(event.role), one_line(event.by)
        if self.toasts is not None:
            note = Notification(
                "room_invited",
                "Invitation to a room",
                f"{by} invites you to {room} as {role}.",
                INVITATION_PRIORITY,
            )
            self.bridge.spawn(self.toasts.deliver(note), "ui-rooms-toast")
        dialog = self.invitation_dialogs.get(event.room)
        if dialog is None:
            dialog = InvitationDialog(room, role, by, self._parent_widget)
            dialog.room = event.room
            dialog.answered.connect(self._answered)
            dialog.finished.connect(lambda _=0, r=event.room: self._forget(r))
            self.invitation_dialogs[event.room] = dialog
        dialog.show()
        dialog.raise_()
        return dialog

    def _answered(self, room: str, accept: bool) -> None:
        if accept:
            self.model.accept(room)
        else:
            self.model.decline(room)

    def _forget(self, room: str) -> None:
        dialog = self.invitation_dialogs.pop(room, None)
        if dialog is not None:
            dialog.deleteLater()
