"""The server store: users and personal rooms, join codes, sessions, rooms and the ACL."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshagent_gui.core.mesh.types import OWN_DEVICES_ONLY, ROLE_SCOPES, SCOPES, Role
from meshagent_gui.server import store as store_module
from meshagent_gui.server.store import (
    ACCESS_TTL,
    SCHEMA_VERSION,
    MembershipChange,
    Store,
    StoreError,
    new_join_code,
    normalize_join_code,
    secret_hash,
    user_name_from_device,
)
from tests.unit.server.conftest import new_device

NOW = 1_800_000_000.0


class _Refusal:
    """``with _Refusal("code"):`` expects a StoreError with that code."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, error: BaseException | None, _tb: object) -> bool:
        assert isinstance(error, StoreError), f"expected StoreError {self.code!r}, got {error!r}"
        assert error.code == self.code, error.message
        return True


def test_schema_is_versioned_and_reopens(tmp_path: Path) -> None:
    first = Store.open(tmp_path)
    server_id = first.server_id
    first.close()
    second = Store.open(tmp_path)
    assert second.server_id == server_id
    version = sqlite3.connect(tmp_path / "server.sqlite3").execute("PRAGMA user_version")
    assert version.fetchone()[0] == SCHEMA_VERSION
    second.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    Store.open(tmp_path).close()
    with sqlite3.connect(tmp_path / "server.sqlite3") as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with _Refusal("data_dir_unusable"):
        Store.open(tmp_path)


def test_every_user_owns_a_personal_room(store: Store) -> None:
    store.create_user("ann", "hash", now=NOW)
    [room] = store.rooms_of("ann")
    assert (room.name, room.role, room.members) == ("@ann", "owner", ("ann",))
    with _Refusal("user_exists"):
        store.create_user("ann", None, now=NOW)


@pytest.mark.parametrize("name", ["", "Ann", "-ann", "a" * 33, "ann smith", "@ann", "ann/x"])
def test_bad_user_names_are_refused(store: Store, name: str) -> None:
    with _Refusal("invalid_request"):
        store.create_user(name, None, now=NOW)


def test_join_code_is_human_typable_and_normalized() -> None:
    code = new_join_code()
    groups = code.split("-")
    assert [len(group) for group in groups] == [4, 4, 4, 4]
    assert normalize_join_code(code.lower().replace("-", " ")) == code
    assert normalize_join_code("oooo-iiii-llll-0000") == "0000-1111-1111-0000"
    assert normalize_join_code("UUUU-0000-0000-0000") is None  # U is not Crockford
    assert normalize_join_code("0000-0000-0000") is None


@given(st.text(max_size=40))
def test_normalize_join_code_never_crashes(typed: str) -> None:
    normalized = normalize_join_code(typed)
    assert normalized is None or normalize_join_code(normalized) == normalized


def test_join_code_is_single_use_and_stored_hashed(store: Store) -> None:
    store.create_user("ann", "hash", now=NOW)
    code, expires_at = store.create_join_code(user="ann", room=None, now=NOW)
    assert expires_at == NOW + 600
    dump = "\n".join(store._db.iterdump())
    assert code not in dump and secret_hash(code) in dump
    enrolment = store.enroll_with_join_code(code.lower(), new_device(), now=NOW + 1)
    assert enrolment.device.user == "ann"
    with _Refusal("join_code_used"):
        store.enroll_with_join_code(code, new_device(), now=NOW + 2)


def test_join_code_expiry_and_unknown_codes(store: Store) -> None:
    code, expires_at = store.create_join_code(user=None, room=None, ttl=60, now=NOW)
    with _Refusal("join_code_expired"):
        store.enroll_with_join_code(code, new_device(), now=expires_at)
    with _Refusal("join_code_unknown"):
        store.enroll_with_join_code(new_join_code(), new_device(), now=NOW)
    with _Refusal("join_code_unknown"):
        store.enroll_with_join_code("not a code", new_device(), now=NOW)


def test_a_failed_enrolment_does_not_spend_the_code(store: Store) -> None:
    store.create_user("ann", "hash", now=NOW)
    store.create_user("bob", "hash", now=NOW)
    device = new_device()
    store.enroll_user_device("ann", device, now=NOW)
    code, _ = store.create_join_code(user="bob", room=None, now=NOW)
    with _Refusal("forbidden"):  # ann's certificate cannot become bob's device
        store.enroll_with_join_code(code, device, now=NOW)
    assert store.enroll_with_join_code(code, new_device(), now=NOW).device.user == "bob"


def test_join_code_without_user_creates_a_unique_user_named_after_the_device(store: Store) -> None:
    store.create_user("ann-s-laptop", "hash", now=NOW)
    code, _ = store.create_join_code(user=None, room=None, now=NOW)
    enrolment = store.enroll_with_join_code(code, new_device("Ann's Laptop"), now=NOW)
    assert enrolment.device.user == "ann-s-laptop-2"
    user = store.user("ann-s-laptop-2")
    assert user is not None and not user.has_password and not user.admin
    assert [room.name for room in store.rooms_of("ann-s-laptop-2")] == ["@ann-s-laptop-2"]


@pytest.mark.parametrize(
    ("device_name", "user"),
    [("Ann's Laptop", "ann-s-laptop"), ("***", "device"), ("PC_01.home", "pc_01.home")],
)
def test_user_name_from_device(device_name: str, user: str) -> None:
    assert user_name_from_device(device_name) == user


def test_join_code_with_room_adds_member_and_creates_missing_room(store: Store) -> None:
    store.create_user("ann", "hash", now=NOW)
    store.create_user("bob", "hash", now=NOW)
    code, _ = store.create_join_code(user="ann", room="team", now=NOW)
    first = store.enroll_with_join_code(code, new_device(), now=NOW)
    assert first.membership is not None and first.membership.role == "owner"
    code, _ = store.create_join_code(user="bob", room="team", now=NOW)
    second = store.enroll_with_join_code(code, new_device(), now=NOW)
    assert second.membership is not None
    assert second.membership.role == "member"
    assert second.membership.newly_shared == {"ann"}
    assert store.room_for("team", "ann").members == ("ann", "bob")


def test_join_code_never_demotes_an_owner(store: Store) -> None:
    store.create_user("ann", "hash", now=NOW)
    code, _ = store.create_join_code(user="ann", room="@ann", now=NOW)
    assert store.enroll_with_join_code(code, new_device(), now=NOW).membership is None
    assert store.role("@ann", "ann") == "owner"


def test_join_code_arguments_are_checked(store: Store) -> None:
    with _Refusal("unknown_user"):
        store.create_join_code(user="nobody", room=None, now=NOW)
    with _Refusal("invalid_request"):
        store.create_join_code(user=None, room="bad room", now=NOW)
    with _Refusal("invalid_request"):
        store.create_join_code(user=None, room=None, ttl=10 * 86400, now=NOW)
    with _Refusal("unknown_room"):
        store.create_join_code(user=None, room="@nobody", now=NOW)


def test_access_token_authenticates_until_it_expires(store: Store) -> None:
    store.create_user("ann", "hash", admin=True, now=NOW)
    enrolment = store.enroll_user_device("ann", new_device(), now=NOW)
    principal = store.authenticate(enrolment.tokens.access_token, now=NOW + 10)
    assert principal is not None
    assert (principal.device_id, principal.user, principal.admin) == (
        enrolment.device.id,
        "ann",
        True,
    )
    assert store.authenticate(enrolment.tokens.access_token, now=NOW + ACCESS_TTL) is None
    assert store.authenticate("mesh_at_forged", now=NOW) is None


def test_refresh_rotates_and_a_reused_refresh_token_revokes_the_session(store: Store) -> None:
    store.create_user("ann", "hash", now=NOW)
    first = store.enroll_user_device("ann", new_device(), now=NOW).tokens
    second = store.refresh(first.refresh_token, now=NOW + 100)
    assert second.refresh_token != first.refresh_token
    assert store.authenticate(first.access_token, now=NOW + 100) is None
    assert store.authenticate(second.access_token, now=NOW + 100) is not None
    # The old refresh token comes back: someone copied it. Everything in the session dies.
    with _Refusal("invalid_refresh_token"):
        store.refresh(first.refresh_token, now=NOW + 200)
    assert store.authenticate(second.access_token, now=NOW + 200) is None
    with _Refusal("invalid_refresh_token"):
        store.refresh(second.refresh_token, now=NOW + 200)


def test_re_enrolling_a_certificate_keeps_the_device_and_replaces_its_tokens(store: Store) -> None:
    store.create_user("ann", "hash", now=NOW)
    device = new_device("old name")
    first = store.enroll_user_device("ann", device, now=NOW)
    renamed = type(device)(device.id, "new name", "linux", device.certificate)
    second = store.enroll_user_device("ann", renamed, now=NOW)
    assert second.device.id == first.device.id and second.device.name == "new name"
    assert store.authenticate(first.tokens.access_token, now=NOW) is None
    assert store.authenticate(second.tokens.access_token, now=NOW) is not None


def test_visible_devices_are_those_sharing_a_room(store: Store) -> None:
    for name in ("ann", "bob", "eve"):
        store.create_user(name, "hash", now=NOW)
    ann1 = store.enroll_user_device("ann", new_device("ann1"), now=NOW).device
    ann2 = store.enroll_user_device("ann", new_device("ann2"), now=NOW).device
    bob = store.enroll_user_device("bob", new_device("bob"), now=NOW).device
    store.enroll_user_device("eve", new_device("eve"), now=NOW)
    assert [(d.id, rooms) for d, rooms in store.visible_devices(ann1.id)] == [(ann2.id, ("@ann",))]
    store.create_room("team", "ann", now=NOW)
    assert store.invite("team", "bob", "viewer", by="ann", by_device=None, now=NOW)
    # Invited is not joined: nothing is shared until bob accepts.
    assert [d.id for d, _ in store.visible_devices(ann1.id)] == [ann2.id]
    store.accept_invitation("team", "bob", device=bob.id, now=NOW)
    visible = {d.id: rooms for d, rooms in store.visible_devices(ann1.id)}
    assert visible == {ann2.id: ("@ann", "team"), bob.id: ("team",)}
    assert store.peer_users("bob") == {"ann", "bob"}


def _join(store: Store, room: str, user: str, role: Role, *, by: str) -> MembershipChange:
    store.invite(room, user, role, by=by, by_device=None, now=NOW)
    return store.accept_invitation(room, user, device=None, now=NOW)


def test_room_membership_rules(store: Store) -> None:
    for name in ("ann", "bob", "cat"):
        store.create_user(name, "hash", now=NOW)
    store.create_room("team", "ann", now=NOW)
    with _Refusal("room_exists"):
        store.create_room("team", "bob", now=NOW)
    with _Refusal("invalid_request"):
        store.create_room("@team", "bob", now=NOW)
    change = _join(store, "team", "bob", "member", by="ann")
    assert change.members == {"ann", "bob"} and change.newly_shared == {"ann"}
    with _Refusal("forbidden"):  # a member is not an owner
        store.invite("team", "cat", "member", by="bob", by_device=None, now=NOW)
    with _Refusal("unknown_room"):  # outsiders cannot tell the room exists
        store.invite("team", "cat", "member", by="cat", by_device=None, now=NOW)
    with _Refusal("unknown_room"):
        store.invite("nope", "cat", "member", by="ann", by_device=None, now=NOW)
    # No user-name oracle: a missing user or a member is "invited" (nothing is stored).
    assert not store.invite("team", "nobody", "member", by="ann", by_device=None, now=NOW)
    assert not store.invite("team", "bob", "member", by="ann", by_device=None, now=NOW)
    with _Refusal("forbidden"):  # the last owner stays
        store.set_role("team", "ann", "member", by="ann", by_device=None, now=NOW)
    with _Refusal("unknown_user"):
        store.set_role("team", "cat", "member", by="ann", by_device=None, now=NOW)
    again = store.set_role("team", "bob", "owner", by="ann", by_device=None, now=NOW)
    assert again.newly_shared == frozenset() and again.role == "owner"
    store.set_role("team", "ann", "viewer", by="bob", by_device=None, now=NOW)
    assert store.role("team", "ann") == "viewer"


def test_leaving_reports_who_no_longer_shares_a_room(store: Store) -> None:
    for name in ("ann", "bob", "cat"):
        store.create_user(name, "hash", now=NOW)
    store.create_room("team", "ann", now=NOW)
    store.create_room("other", "ann", now=NOW)
    _join(store, "team", "bob", "member", by="ann")
    _join(store, "team", "cat", "member", by="ann")
    _join(store, "other", "cat", "member", by="ann")
    with _Refusal("forbidden"):  # members do not remove others
        store.remove_member("team", "cat", by="bob", by_device=None, now=NOW)
    with _Refusal("forbidden"):  # the last owner cannot leave while others remain
        store.remove_member("team", "ann", by="ann", by_device=None, now=NOW)
    left = store.remove_member("team", "cat", by="cat", by_device=None, now=NOW)
    assert left.role is None and left.members == {"ann", "bob"}
    assert left.no_longer_shared == {"bob"}  # cat still shares "other" with ann
    removed = store.remove_member("team", "bob", by="ann", by_device=None, now=NOW)
    assert removed.no_longer_shared == {"ann"}
    gone = store.remove_member("team", "ann", by="ann", by_device=None, now=NOW)
    assert gone.members == frozenset() and not store.room_exists("team")
    with _Refusal("forbidden"):
        store.remove_member("@ann", "ann", by="ann", by_device=None, now=NOW)


def test_room_join_codes_are_single_use_and_keep_roles(store: Store) -> None:
    for name in ("ann", "bob"):
        store.create_user(name, "hash", now=NOW)
    store.create_room("team", "ann", now=NOW)
    code, expires_at = store.create_room_join_code("team", by="ann", ttl=60, now=NOW)
    assert expires_at == NOW + 60
    change = store.join_with_code(code, "bob", device=None, now=NOW)
    assert (change.room, change.role) == ("team", "member")
    assert change.newly_shared == {"ann"}
    with _Refusal("join_code_used"):
        store.join_with_code(code, "bob", device=None, now=NOW)
    late, _ = store.create_room_join_code("team", by="ann", ttl=60, now=NOW)
    with _Refusal("join_code_expired"):
        store.join_with_code(late, "bob", device=None, now=NOW + 60)
    own, _ = store.create_room_join_code("team", by="ann", now=NOW)
    assert store.join_with_code(own, "ann", device=None, now=NOW).role == "owner"
    with _Refusal("forbidden"):
        store.create_room_join_code("team", by="bob", now=NOW)
    with _Refusal("unknown_room"):
        store.create_room_join_code("@bob", by="ann", now=NOW)


@pytest.mark.parametrize("role", ["owner", "member", "viewer"])
def test_acl_matrix(store: Store, role: str) -> None:
    for name in ("ann", "bob", "eve"):
        store.create_user(name, "hash", now=NOW)
    store.create_room("team", "bob", now=NOW)
    _join(store, "team", "ann", cast(Role, role), by="bob")
    for scope in SCOPES:
        if scope in ROLE_SCOPES[role]:
            assert store.grant_room("ann", "bob", scope, None) == "team"
            assert store.grant_room("ann", "bob", scope, "team") == "team"
        else:
            with _Refusal("not_allowed"):
                store.grant_room("ann", "bob", scope, None)
        # Toward one's own devices (personal room, owner): everything.
        assert store.grant_room("ann", "ann", scope, None) == "@ann"
        # Toward strangers: they do not exist.
        with _Refusal("unknown_device"):
            store.grant_room("ann", "eve", scope, None)
        # Bob owns the room: his role decides what he may ask of ann (no role gives
        # terminal:open: a shell opens only for one's own devices).
        if scope in OWN_DEVICES_ONLY:
            with _Refusal("not_allowed"):
                store.grant_room("bob", "ann", scope, None)
        else:
            assert store.grant_room("bob", "ann", scope, None) == "team"
    with _Refusal("unknown_room"):
        store.grant_room("ann", "bob", "p2p:connect", "@bob")


def test_one_room_decides_never_the_best_role_across_rooms(store: Store) -> None:
    for name in ("ann", "bob"):
        store.create_user(name, "hash", now=NOW)
    store.create_room("view", "bob", now=NOW)
    _join(store, "view", "ann", "viewer", by="bob")
    with _Refusal("not_allowed"):
        store.grant_room("ann", "bob", "share:file", None)
    # A room of ann's own that bob has not accepted gives her nothing.
    store.create_room("mine", "ann", now=NOW)
    store.invite("mine", "bob", "member", by="ann", by_device=None, now=NOW)
    with _Refusal("not_allowed"):
        store.grant_room("ann", "bob", "share:file", "mine")
    # Both rooms shared: the grant names the room whose role allowed it.
    store.create_room("work", "bob", now=NOW)
    _join(store, "work", "ann", "member", by="bob")
    assert store.grant_room("ann", "bob", "share:file", None) == "work"
    assert store.grant_room("ann", "bob", "terminal:view", None) == "view"  # first by name
    with _Refusal("not_allowed"):
        store.grant_room("ann", "bob", "share:file", "view")


def test_schema_2_migrates_a_version_1_database(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    legacy = sqlite3.connect(data / "server.sqlite3", isolation_level=None)
    # A version 1 database, as the previous release left it.
    for statement in store_module._MIGRATIONS[0]:
        legacy.execute(statement)
    legacy.execute("PRAGMA user_version = 1")
    legacy.close()
    opened = Store.open(data)
    try:
        opened.create_user("ann", None, now=NOW)
        opened.record("terminal.control", room="@ann", now=NOW)
        assert [e.kind for e in opened.audit_log("@ann", by="ann")] == ["terminal.control"]
    finally:
        opened.close()


def test_device_update_and_last_seen(store: Store) -> None:
    store.create_user("ann", "hash", now=NOW)
    device = store.enroll_user_device("ann", new_device(), now=NOW).device
    assert device.last_seen is None
    store.touch_device(device.id, now=NOW + 5)
    updated = store.update_device(device.id, name="desk", addresses=["192.0.2.1:4433"])
    assert (updated.name, updated.addresses, updated.last_seen) == (
        "desk",
        ("192.0.2.1:4433",),
        NOW + 5,
    )
    with _Refusal("unknown_device"):
        store.update_device("00" * 32, name="ghost")


def test_unwritable_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with _Refusal("data_dir_unusable"):
        Store.open(blocker / "data")
