"""The Rooms view: the list, the owner's actions, invitations (toast and dialog), one-line
errors; against a fake rooms API, and once against the real reference server."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication

from meshagent_gui.context import Context
from meshagent_gui.core.events import AnnouncementReceived, InvitationReceived
from meshagent_gui.core.mesh.client import MeshError
from meshagent_gui.core.mesh.types import AuditEntry, Invitation, JoinCode, Role, Room
from meshagent_gui.ui.app import GuiApp
from meshagent_gui.ui.bridge import AgentBridge
from meshagent_gui.ui.rooms import InvitationDialog, Rooms, RoomsWindow
from meshagent_gui.ui.toasts import ToastSink
from tests.integration.harness import AgentHome, Server

from .support import run


class FakeRooms:
    """The rooms API of one user (ann) on a tiny in-memory server; records every call.

    ``fail`` makes the next call raise it (and change nothing), as the real client does.
    """

    def __init__(self, user: str = "ann") -> None:
        self.user = user
        self.members: dict[str, dict[str, Role]] = {
            "@ann": {"ann": "owner"},
            "family": {"ann": "owner", "bob": "member"},
            "work": {"carol": "owner", "ann": "viewer"},
        }
        self.pending: dict[str, Invitation] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.fail: MeshError | None = None

    def invite_me(self, room: str, role: Role = "member", by: str = "dave") -> None:
        now = time.time()
        self.pending[room] = Invitation(
            room=room, role=role, invited_by=by, created_at=now, expires_at=now + 7 * 86400
        )

    def _call(self, *call: Any) -> None:
        self.calls.append(call)
        if self.fail is not None:
            fail, self.fail = self.fail, None
            raise fail

    def _room(self, name: str) -> Room:
        members = self.members[name]
        return Room(name=name, role=members[self.user], members=sorted(members))

    def _owned(self, room: str) -> dict[str, Role]:
        members = self.members.get(room)
        if members is None or self.user not in members:
            raise MeshError("no such room (or you are not in it)", code="unknown_room")
        if members[self.user] != "owner":
            raise MeshError("the server does not allow that", code="not_allowed")
        return members

    async def rooms(self) -> list[Room]:
        self._call("rooms")
        return [self._room(n) for n, m in self.members.items() if self.user in m]

    async def create_room(self, name: str) -> Room:
        self._call("create_room", name)
        self.members[name] = {self.user: "owner"}
        return self._room(name)

    async def invite(self, room: str, user: str, role: Role) -> None:
        self._call("invite", room, user, role)
        self._owned(room)

    async def invitations(self) -> list[Invitation]:
        self._call("invitations")
        return list(self.pending.values())

    async def accept_invitation(self, room: str) -> Room:
        self._call("accept_invitation", room)
        invitation = self.pending.pop(room)
        self.members.setdefault(room, {invitation.invited_by: "owner"})[self.user] = invitation.role
        return self._room(room)

    async def decline_invitation(self, room: str) -> None:
        self._call("decline_invitation", room)
        del self.pending[room]

    async def leave_room(self, room: str) -> None:
        self._call("leave_room", room)
        del self.members[room][self.user]

    async def set_role(self, room: str, user: str, role: Role) -> Room:
        self._call("set_role", room, user, role)
        self._owned(room)[user] = role
        return self._room(room)

    async def remove_member(self, room: str, user: str) -> None:
        self._call("remove_member", room, user)
        del self._owned(room)[user]

    async def room_join_code(self, room: str, ttl: int) -> JoinCode:
        self._call("room_join_code", room, ttl)
        self._owned(room)
        return JoinCode(code="ABCD-EFGH-JKMN-PQRS", expires_at=time.time() + ttl)

    async def join_room(self, code: str) -> Room:
        self._call("join_room", code)
        self.members["club"] = {"erin": "owner", self.user: "member"}
        return self._room("club")

    async def room_audit(self, room: str, limit: int) -> list[AuditEntry]:
        self._call("room_audit", room, limit)
        self._owned(room)
        return [
            AuditEntry(
                id=1, at=1.0, kind="room.invited", room=room, actor_user="ann", subject="bob"
            ),
            AuditEntry(id=2, at=2.0, kind="room.joined", room=room, actor_user="bob"),
        ]


@pytest.fixture
def fake() -> FakeRooms:
    return FakeRooms()


@pytest.fixture
def rooms(
    qtbot: Any, qloop: asyncio.AbstractEventLoop, gui_home: Context, fake: FakeRooms
) -> Rooms:
    bridge = AgentBridge(gui_home)
    made = Rooms(bridge, ToastSink(None), api=lambda: fake)
    made.model.me = lambda: "ann"
    return made


def open_window(qtbot: Any, rooms: Rooms) -> RoomsWindow:
    rooms.open()
    window = rooms.window
    assert window is not None
    qtbot.addWidget(window)
    qtbot.waitUntil(lambda: rooms.model.loaded, timeout=5000)
    return window


def table(widget: Any) -> list[list[str]]:
    return [
        [widget.item(r, c).text() for c in range(widget.columnCount())]
        for r in range(widget.rowCount())
    ]


def click(qtbot: Any, button: Any) -> None:
    assert button.isEnabled(), button.text()
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def selected(window: RoomsWindow) -> str | None:
    room = window.selected_room()
    return room.name if room is not None else None


def cli(qtbot: Any, agent: AgentHome, *args: str) -> str:
    """A CLI command of another agent, in a thread: the app's loop keeps running meanwhile (a
    blocked loop misses its WebSocket keepalive)."""
    return run(qtbot, asyncio.to_thread(agent.ok, *args), timeout=60)


def said(window: RoomsWindow) -> str:
    return window.message.text() if window.message.isVisible() else ""


def test_the_list_shows_rooms_roles_and_members(qtbot: Any, rooms: Rooms) -> None:
    window = open_window(qtbot, rooms)
    assert table(window.room_table) == [
        ["@ann", "owner", "1"],
        ["family", "owner", "2"],
        ["work", "viewer", "2"],
    ]
    window.select_room("family")
    assert window.room_title.text() == "family: you are owner"
    assert table(window.member_table) == [["ann (you)", "owner"], ["bob", ""]]
    assert window.owner_box.isVisibleTo(window) and window.leave_button.isEnabled()
    window.select_room("work")  # a viewer: no owner tools, no audit, may leave
    assert not window.owner_box.isVisibleTo(window) and window.leave_button.isEnabled()
    window.select_room("@ann")  # your own devices: nobody to invite, nothing to leave
    assert window.room_title.text() == "@ann: your own devices"
    assert not window.owner_box.isVisibleTo(window) and not window.leave_button.isEnabled()
    assert not window.invitations_box.isVisibleTo(window)


def test_create_invite_role_change_remove_and_leave_call_the_api_and_refresh(
    qtbot: Any, rooms: Rooms, fake: FakeRooms
) -> None:
    window = open_window(qtbot, rooms)

    async def yes(title: str, text: str) -> bool:
        asked.append(title)
        return True

    asked: list[str] = []
    window.confirm = yes

    def reloaded_after(call: tuple[Any, ...]) -> bool:
        return call in fake.calls and fake.calls[-1] == ("invitations",)

    window.new_room.setText("  team ")
    click(qtbot, window.create_button)
    qtbot.waitUntil(lambda: selected(window) == "team")
    assert ("create_room", "team") in fake.calls and window.new_room.text() == ""
    assert ["team", "owner", "1"] in table(window.room_table)
    assert said(window) == "Room team created."

    window.invite_user.setText("bob")
    window.invite_role.setCurrentText("viewer")
    fake.calls.clear()
    click(qtbot, window.invite_button)
    qtbot.waitUntil(lambda: reloaded_after(("invite", "team", "bob", "viewer")))
    qtbot.waitUntil(lambda: window.invite_user.text() == "")  # cleared once it succeeded
    assert "sent to bob" in said(window)

    window.select_room("family")
    window.member_table.selectRow(1)  # bob
    assert window.selected_member() == "bob"
    window.member_role.setCurrentText("viewer")
    fake.calls.clear()
    click(qtbot, window.role_button)
    qtbot.waitUntil(lambda: reloaded_after(("set_role", "family", "bob", "viewer")))
    assert said(window) == "bob is now viewer in family."

    window.member_table.selectRow(1)
    fake.calls.clear()
    click(qtbot, window.remove_button)
    qtbot.waitUntil(lambda: reloaded_after(("remove_member", "family", "bob")))
    assert asked == ["Remove member"]
    assert ["family", "owner", "1"] in table(window.room_table)

    window.member_table.selectRow(0)  # yourself: leave instead
    assert not window.remove_button.isEnabled() and not window.role_button.isEnabled()

    window.select_room("work")
    fake.calls.clear()
    click(qtbot, window.leave_button)
    qtbot.waitUntil(lambda: reloaded_after(("leave_room", "work")))
    assert asked == ["Remove member", "Leave room"]
    assert [row[0] for row in table(window.room_table)] == ["@ann", "family", "team"]
    assert said(window) == "You left work."


def test_leaving_asks_first_and_no_means_nothing_happens(
    qtbot: Any, rooms: Rooms, fake: FakeRooms
) -> None:
    window = open_window(qtbot, rooms)
    window.select_room("work")
    click(qtbot, window.leave_button)

    def prompt() -> Any:
        boxes = [w for w in QApplication.topLevelWidgets() if w.objectName() == "rooms-confirm"]
        return boxes[0] if boxes and boxes[0].isVisible() else None

    qtbot.waitUntil(lambda: prompt() is not None, timeout=5000)
    box = prompt()
    assert "Leave work?" in box.text()
    click(qtbot, box.buttons()[1] if box.buttons()[1].text() == "Cancel" else box.buttons()[0])
    qtbot.waitUntil(lambda: prompt() is None, timeout=5000)
    qtbot.wait(50)
    assert not any(call[0] == "leave_room" for call in fake.calls)
    assert "work" in [row[0] for row in table(window.room_table)]


def test_invitations_in_the_window_accept_and_decline(
    qtbot: Any, rooms: Rooms, fake: FakeRooms
) -> None:
    fake.invite_me("games", "viewer", by="dave")
    fake.invite_me("spam", "member", by="mallory")
    window = open_window(qtbot, rooms)
    assert window.invitations_box.isVisibleTo(window)
    assert [window.invitation_list.item(i).text() for i in range(2)] == [
        "games: dave invites you as viewer",
        "spam: mallory invites you as member",
    ]
    window.invitation_list.setCurrentRow(1)
    click(qtbot, window.decline_button)
    qtbot.waitUntil(lambda: window.invitation_list.count() == 1)
    assert ("decline_invitation", "spam") in fake.calls
    assert "spam" not in [row[0] for row in table(window.room_table)]
    rooms.handle(InvitationReceived(room="games", role="viewer", by="dave"))
    assert "games" in rooms.invitation_dialogs
    click(qtbot, window.accept_button)  # in the window: the dialog for it goes away
    qtbot.waitUntil(lambda: not window.invitations_box.isVisibleTo(window))
    qtbot.waitUntil(lambda: "games" not in rooms.invitation_dialogs)
    assert fake.calls.count(("accept_invitation", "games")) == 1
    assert ["games", "viewer", "2"] in table(window.room_table)
    assert said(window) == "You joined games."


def test_join_with_a_room_join_code_and_the_owner_tools(
    qtbot: Any, rooms: Rooms, fake: FakeRooms
) -> None:
    window = open_window(qtbot, rooms)
    window.join_code.setText(" WXYZ-0123 ")
    click(qtbot, window.join_button)
    qtbot.waitUntil(lambda: selected(window) == "club")
    assert ("join_room", "WXYZ-0123") in fake.calls and window.join_code.text() == ""
    assert said(window) == "You joined club."

    window.select_room("family")
    click(qtbot, window.join_code_button)
    qtbot.waitUntil(lambda: window.join_code_label.text() == "ABCD-EFGH-JKMN-PQRS")
    assert window.copy_code_button.isVisibleTo(window)
    window.select_room("work")  # the code belongs to family: not shown for another room
    assert window.join_code_label.text() == ""

    window.select_room("family")
    click(qtbot, window.audit_button)
    qtbot.waitUntil(lambda: "family" in window.audit_dialogs)
    dialog = window.audit_dialogs["family"]
    qtbot.waitUntil(dialog.isVisible)
    rows = table(dialog.table)
    assert [row[1] for row in rows] == ["room.joined", "room.invited"]  # newest first
    assert rows[1][2:5] == ["ann", "", "bob"]
    dialog.close()
    qtbot.waitUntil(lambda: "family" not in window.audit_dialogs)


def test_an_api_error_is_one_line_and_changes_nothing(
    qtbot: Any, rooms: Rooms, fake: FakeRooms
) -> None:
    window = open_window(qtbot, rooms)
    before = table(window.room_table)
    fake.fail = MeshError("the server does not allow that\n(check rooms and roles)", code="x")
    window.new_room.setText("team")
    click(qtbot, window.create_button)
    qtbot.waitUntil(lambda: bool(said(window)))
    assert said(window) == "the server does not allow that (check rooms and roles)"
    assert table(window.room_table) == before and window.new_room.text() == "team"
    assert fake.calls[-1] == ("create_room", "team")  # no reload after a failure

    window.select_room("work")  # not the owner: the server says no, one line
    task = rooms.model.set_role("work", "carol", "viewer")
    qtbot.waitUntil(task.done)
    assert task.result() is None
    assert said(window) == "the server does not allow that"
    assert table(window.room_table) == before

    # Empty input never reaches the server.
    calls = len(fake.calls)
    window.new_room.clear()
    click(qtbot, window.create_button)
    assert said(window) == "Enter a name for the new room."
    window.select_room("family")
    click(qtbot, window.invite_button)
    assert said(window) == "Enter the user name of the person to invite."
    qtbot.wait(20)
    assert len(fake.calls) == calls

    # No agent yet: one line, not a traceback.
    rooms.model._api = lambda: None
    click(qtbot, window.refresh_button)
    qtbot.waitUntil(lambda: said(window) == "Not connected to a Mesh Server yet.")


def test_an_invitation_is_a_toast_and_a_dialog_and_accept_joins(
    qtbot: Any, rooms: Rooms, fake: FakeRooms
) -> None:
    assert rooms.toasts is not None
    fake.invite_me("games", "viewer", by="dave")
    rooms.bridge.event_received.emit(InvitationReceived(room="games", role="viewer", by="dave"))
    dialog = rooms.invitation_dialogs["games"]
    qtbot.waitUntil(dialog.isVisible)
    assert dialog.text.text() == "dave invites you to the room “games” as viewer."
    qtbot.waitUntil(lambda: bool(rooms.toasts.shown))
    toast = rooms.toasts.shown[-1]
    assert (toast.kind, toast.title) == ("room_invited", "Invitation to a room")
    assert toast.message == "dave invites you to games as viewer."
    # The same invitation again (re-invited) reuses the dialog.
    rooms.handle(InvitationReceived(room="games", role="viewer", by="dave"))
    assert list(rooms.invitation_dialogs) == ["games"]
    click(qtbot, dialog.accept_button)
    qtbot.waitUntil(lambda: ("accept_invitation", "games") in fake.calls)
    qtbot.waitUntil(lambda: "games" not in rooms.invitation_dialogs)
    qtbot.waitUntil(lambda: rooms.model.room("games") is not None)


def test_declining_in_the_dialog_and_closing_it_is_no_answer(
    qtbot: Any, rooms: Rooms, fake: FakeRooms
) -> None:
    window = open_window(qtbot, rooms)
    fake.invite_me("spam", "member", by="mallory\n<b>x</b>")
    fake.invite_me("later", "member", by="erin")
    rooms.handle(InvitationReceived(room="spam", role="member", by="mallory\n<b>x</b>"))
    rooms.handle(InvitationReceived(room="later", role="member", by="erin"))
    spam = rooms.invitation_dialogs["spam"]
    assert spam.text.textFormat() == Qt.TextFormat.PlainText
    assert spam.text.text().startswith("mallory <b>x</b> invites you")  # one line, no markup
    qtbot.waitUntil(window.invitations_box.isVisible)  # the event reloaded the open window
    click(qtbot, spam.decline_button)
    qtbot.waitUntil(lambda: ("decline_invitation", "spam") in fake.calls)
    later = rooms.invitation_dialogs["later"]
    later.close()
    qtbot.waitUntil(lambda: "later" not in rooms.invitation_dialogs)
    qtbot.wait(20)
    assert not any(call[0] == "accept_invitation" for call in fake.calls)
    assert ("decline_invitation", "later") not in fake.calls
    qtbot.waitUntil(lambda: window.invitation_list.count() == 1)  # still waiting in the window


def test_membership_events_reload_an_open_view(qtbot: Any, rooms: Rooms, fake: FakeRooms) -> None:
    window = open_window(qtbot, rooms)
    fake.members["family"]["carol"] = "member"
    rooms.bridge.event_received.emit(AnnouncementReceived("room.joined", None, {"room": "family"}))
    qtbot.waitUntil(lambda: ["family", "owner", "3"] in table(window.room_table))


def test_errors_without_the_window_go_to_the_main_line(
    qtbot: Any, rooms: Rooms, fake: FakeRooms
) -> None:
    lines: list[str] = []
    rooms.bridge.error.connect(lines.append)
    fake.invite_me("games")
    dialog = rooms.invited(InvitationReceived(room="games", role="member", by="dave"))
    fake.fail = MeshError("no such room (or you are not in it)", code="unknown_room")
    click(qtbot, dialog.accept_button)
    qtbot.waitUntil(lambda: lines == ["no such room (or you are not in it)"])
    assert isinstance(dialog, InvitationDialog)
    assert run(qtbot, fake.invitations())[0].room == "games"  # nothing changed


def test_the_main_window_and_the_tray_open_the_rooms_view(
    qtbot: Any, qloop: asyncio.AbstractEventLoop, gui_home: Context
) -> None:
    gui = GuiApp(gui_home, use_tray=False)
    qtbot.addWidget(gui.window)
    assert gui.tray.rooms_action.isEnabled()
    gui.tray.rooms_action.trigger()
    window = gui.rooms.window
    assert window is not None
    qtbot.waitUntil(window.isVisible)
    # No agent yet: the view says so in one line.
    qtbot.waitUntil(lambda: said(window) == "Not connected to a Mesh Server yet.")
    window.close()
    click(qtbot, gui.window.rooms_button)
    qtbot.waitUntil(window.isVisible)
    assert gui.rooms.window is window
    window.close()


def test_two_users_invite_and_accept_through_the_real_server(
    qtbot: Any,
    qloop: asyncio.AbstractEventLoop,
    gui_home: Context,
    mesh: tuple[Server, AgentHome],
    make_agent: Any,
) -> None:
    """ann (this app) and bob (a `meshagent up` and its CLI) on the reference server: each
    invites the other, each accepts with their own act; the app shows it all."""
    server, _ = mesh
    server.add_user("bob")
    bob: AgentHome = make_agent("phone")
    bob.login(server, server.join_code("bob"))
    bob.up()
    gui = GuiApp(Context.open(gui_home.paths.home), use_tray=False)
    task = asyncio.ensure_future(gui.run())
    try:
        qtbot.waitUntil(lambda: gui.agent_ready.is_set() or task.done(), timeout=20_000)
        assert not task.done(), task.result()
        click(qtbot, gui.window.rooms_button)
        window = gui.rooms.window
        assert window is not None
        qtbot.waitUntil(lambda: gui.rooms.model.loaded, timeout=10_000)
        assert [row[:2] for row in table(window.room_table)] == [["@ann", "owner"]]

        # ann makes a room and invites bob: nothing of bob's shows until he accepts.
        window.new_room.setText("team")
        click(qtbot, window.create_button)
        qtbot.waitUntil(lambda: selected(window) == "team", timeout=10_000)
        window.invite_user.setText("bob")
        window.invite_role.setCurrentText("viewer")
        click(qtbot, window.invite_button)
        qtbot.waitUntil(lambda: "sent to bob" in said(window), timeout=10_000)
        assert ["team", "owner", "1"] in table(window.room_table)
        waiting = json.loads(cli(qtbot, bob, "rooms", "invitations", "--json"))
        assert (waiting["room"], waiting["role"], waiting["invited_by"]) == (
            "team",
            "viewer",
            "ann",
        )
        cli(qtbot, bob, "rooms", "accept", "team")
        # The server tells ann's agent (room.joined): the open view reloads by itself.
        qtbot.waitUntil(lambda: ["team", "owner", "2"] in table(window.room_table), timeout=10_000)
        window.select_room("team")
        assert [row[0] for row in table(window.member_table)] == ["ann (you)", "bob"]

        # bob invites ann: a toast and a dialog in the app; Accept joins.
        cli(qtbot, bob, "rooms", "create", "games")
        cli(qtbot, bob, "rooms", "invite", "games", "ann")
        qtbot.waitUntil(lambda: "games" in gui.rooms.invitation_dialogs, timeout=10_000)
        dialog = gui.rooms.invitation_dialogs["games"]
        assert dialog.text.text() == "bob invites you to the room “games” as member."
        qtbot.waitUntil(lambda: any(n.kind == "room_invited" for n in gui.toasts.shown))
        qtbot.waitUntil(window.invitations_box.isVisible, timeout=10_000)
        click(qtbot, dialog.accept_button)
        qtbot.waitUntil(
            lambda: ["games", "member", "2"] in table(window.room_table), timeout=10_000
        )
        assert not window.invitations_box.isVisible()
        listed = [
            json.loads(line) for line in cli(qtbot, bob, "rooms", "list", "--json").splitlines()
        ]
        assert {r["name"]: sorted(r["members"]) for r in listed}["games"] == ["ann", "bob"]

        # ann owns team: its audit log has the invitation and bob's acceptance.
        window.select_room("team")
        click(qtbot, window.audit_button)
        qtbot.waitUntil(lambda: "team" in window.audit_dialogs, timeout=10_000)
        kinds = [row[1] for row in table(window.audit_dialogs["team"].table)]
        assert "room.invited" in kinds and "room.joined" in kinds
        window.audit_dialogs["team"].close()
    finally:
        gui.quit()
        qtbot.waitUntil(task.done, timeout=15_000)
    assert task.result() == 0
