"""The reference server's database: plain sqlite3 in WAL mode, schema versioned by user_version.

Every method is synchronous and takes the current time as ``now`` (so expiry is testable
without a clock). The server runs them on one dedicated thread through :class:`AsyncStore`,
never on the event loop; the CLI calls them directly.

Secrets (access tokens, refresh tokens, join codes) are stored only as SHA-256 hashes: they are
random with at least 80 bits of entropy, so a fast hash is enough (passwords use argon2).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import re
import secrets
import sqlite3
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, Final, ParamSpec, TypeVar, cast

from meshagent_gui.core.mesh import types as wire
from meshagent_gui.core.mesh.types import ROLE_SCOPES, Role

DATABASE_NAME: Final = "server.sqlite3"
ACCESS_TTL: Final = 3600
REFRESH_TTL: Final = 30 * 86400
JOIN_CODE_TTL: Final = 600
MAX_JOIN_CODE_TTL: Final = 7 * 86400
MIN_JOIN_CODE_TTL: Final = 1  # the operator may; the REST API asks for >= 30
INVITATION_TTL: Final = 7 * 86400
# A flood of invitations must not bury the real ones (nor page the invitee's Gotify): beyond
# these, new invitations are dropped without telling the inviter (who must learn nothing).
MAX_PENDING_PER_INVITEE: Final = 64
MAX_PENDING_PER_INVITER: Final = 8  # pending invitations from one user to one invitee
AUDIT_RETENTION: Final = 90 * 86400
MAX_AUDIT_PAGE: Final = 500
MAX_OPEN_LINKS: Final = 32  # unclaimed, unexpired share links per sending device
# Guest users are named so that no real user can be (USER_NAME never starts with "~").
GUEST_USER_PREFIX: Final = "~guest-"

# Defined once with the wire types (the agent needs them too); the server takes them from here.
PERSONAL_ROOM_PREFIX: Final = wire.PERSONAL_ROOM_PREFIX
personal_room: Final = wire.personal_room

USER_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")
ROOM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# Crockford base32: no I, L, O, U, so what people read aloud is what they type.
_CODE_ALPHABET: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CODE_GROUPS: Final = 4
_CODE_GROUP_LENGTH: Final = 4
_CODE_LOOKALIKES: Final = str.maketrans({"O": "0", "I": "1", "L": "1"})

# Each migration is a list of statements, applied in one transaction with the version bump.
_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE users (
            name TEXT PRIMARY KEY,
            password_hash TEXT,
            admin INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL
        )""",
        """CREATE TABLE devices (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            platform TEXT NOT NULL,
            user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
            certificate TEXT NOT NULL,
            created_at REAL NOT NULL,
            last_seen REAL,
            addresses TEXT NOT NULL DEFAULT '[]'
        )""",
        "CREATE INDEX devices_by_user ON devices(user)",
        "CREATE TABLE rooms (name TEXT PRIMARY KEY, created_at REAL NOT NULL)",
        """CREATE TABLE room_members (
            room TEXT NOT NULL REFERENCES rooms(name) ON DELETE CASCADE,
            user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('owner', 'member', 'viewer')),
            PRIMARY KEY (room, user)
        )""",
        "CREATE INDEX room_members_by_user ON room_members(user)",
        """CREATE TABLE join_codes (
            hash TEXT PRIMARY KEY,
            user TEXT REFERENCES users(name) ON DELETE CASCADE,
            room TEXT,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            used_at REAL,
            used_by TEXT
        )""",
        """CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            device TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
            access_hash TEXT NOT NULL UNIQUE,
            access_expires_at REAL NOT NULL,
            refresh_hash TEXT NOT NULL UNIQUE,
            refresh_expires_at REAL NOT NULL,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX sessions_by_device ON sessions(device)",
        # Refresh tokens already exchanged: presenting one again means it leaked, so the whole
        # session is revoked (RFC 6819 5.2.2.3, refresh token rotation).
        """CREATE TABLE spent_refresh_tokens (
            hash TEXT PRIMARY KEY,
            session TEXT NOT NULL,
            spent_at REAL NOT NULL
        )""",
    ),
    # 2: consented rooms, the audit log, per-user notification settings.
    (
        # A pending invitation: nobody joins a room without accepting (or using a join code).
        """CREATE TABLE invitations (
            room TEXT NOT NULL REFERENCES rooms(name) ON DELETE CASCADE,
            user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('owner', 'member', 'viewer')),
            invited_by TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            PRIMARY KEY (room, user)
        )""",
        "CREATE INDEX invitations_by_user ON invitations(user)",
        # Codes an owner hands out; the joiner's use of one is the joiner's consent.
        """CREATE TABLE room_join_codes (
            hash TEXT PRIMARY KEY,
            room TEXT NOT NULL REFERENCES rooms(name) ON DELETE CASCADE,
            created_by TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            used_at REAL,
            used_by TEXT
        )""",
        # No foreign keys: an entry outlives the device or user it names. Entries of a room are
        # deleted with the room, so a later room of the same name starts with an empty log.
        """CREATE TABLE audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            kind TEXT NOT NULL,
            room TEXT,
            actor_user TEXT,
            actor_device TEXT,
            subject TEXT,
            detail TEXT NOT NULL DEFAULT '{}'
        )""",
        "CREATE INDEX audit_by_room ON audit(room, id)",
        "CREATE INDEX audit_by_time ON audit(at)",
        """CREATE TABLE user_notify (
            user TEXT PRIMARY KEY REFERENCES users(name) ON DELETE CASCADE,
            gotify_url TEXT NOT NULL,
            gotify_token TEXT
        )""",
    ),
    # 3: share links (issue 13). A claimed link names its guest device, whose user is
    # GUEST_USER_PREFIX + link id; that user is deleted (devices, sessions) once the link is old.
    (
        """CREATE TABLE links (
            id TEXT PRIMARY KEY,
            secret_hash TEXT NOT NULL,
            sender TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            size INTEGER NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            claimed_at REAL,
            guest TEXT UNIQUE
        )""",
        "CREATE INDEX links_by_sender ON links(sender)",
    ),
)
SCHEMA_VERSION: Final = len(_MIGRATIONS)


class StoreError(Exception):
    """A refused operation; ``code`` is the stable API error code (see docs/server-api.md)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class UserRecord:
    name: str
    admin: bool
    has_password: bool


@dataclass(frozen=True)
class DeviceRecord:
    id: str
    name: str
    platform: str
    user: str
    certificate: str
    last_seen: float | None
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class NewDevice:
    """A device presenting itself at enrolment; ``id`` is its certificate fingerprint."""

    id: str
    name: str
    platform: str
    certificate: str


@dataclass(frozen=True)
class RoomRecord:
    name: str
    role: Role  # the role of the user the room was looked up for
    members: tuple[str, ...]


@dataclass(frozen=True)
class Principal:
    """Who a valid access token speaks for."""

    device_id: str
    user: str
    admin: bool
    session_id: str
    access_expires_at: float  # sockets opened with this token close (4401) at this time
    guest_of: str | None = None  # a share link's guest: the one device it may reach


@dataclass(frozen=True)
class IssuedTokens:
    access_token: str
    access_expires_in: int
    refresh_token: str


@dataclass(frozen=True)
class MembershipChange:
    """``user`` joined ``room``, its role changed, or (``role`` None) it left or was removed.

    ``members`` are the room's members afterwards. ``newly_shared`` are the users who shared no
    room with ``user`` before: their devices and the user's devices can see each other from now
    on. ``no_longer_shared`` are the users who shared a room with ``user`` before and share none
    now: they must stop seeing each other.
    """

    room: str
    user: str
    role: Role | None
    members: frozenset[str]
    newly_shared: frozenset[str]
    no_longer_shared: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Enrolment:
    device: DeviceRecord
    tokens: IssuedTokens
    membership: MembershipChange | None = None
    revoked_sessions: tuple[str, ...] = ()  # the device's earlier sessions, now gone


class RefreshReuse(StoreError):
    """A spent refresh token came back: it leaked, and its session is revoked."""

    def __init__(self, revoked_sessions: tuple[str, ...], user: str | None) -> None:
        super().__init__("invalid_refresh_token", "The refresh token is not valid; enrol again.")
        self.revoked_sessions = revoked_sessions
        self.user = user  # whose session it was (to notify them), if it still existed


@dataclass(frozen=True)
class LinkRecord:
    id: str
    sender: str
    name: str
    size: int
    expires_at: float


@dataclass(frozen=True)
class LinkClaimRecord:
    link: LinkRecord
    guest: DeviceRecord
    sender: DeviceRecord
    tokens: IssuedTokens


@dataclass(frozen=True)
class InvitationRecord:
    room: str
    role: Role
    invited_by: str
    created_at: float
    expires_at: float


@dataclass(frozen=True)
class AuditRecord:
    id: int
    at: float
    kind: str
    room: str | None
    actor_user: str | None
    actor_device: str | None
    subject: str | None
    detail: dict[str, Any]


@dataclass(frozen=True)
class NotifyTarget:
    """A user's own Gotify: where the server posts what they must know at once."""

    url: str
    token: str | None

    def __repr__(self) -> str:  # never show the token
        return f"NotifyTarget({self.url!r}, token_set={self.token is not None})"


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def check_user_name(name: str) -> None:
    if not USER_NAME.fullmatch(name):
        raise StoreError(
            "invalid_request",
            f"{name!r} is not a valid user name: use 1-32 lowercase letters, digits, '.', '_' or "
            "'-', starting with a letter or digit.",
        )


def check_room_name(name: str) -> None:
    if not ROOM_NAME.fullmatch(name):
        raise StoreError(
            "invalid_request",
            f"{name!r} is not a valid room name: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit ('@' names are personal rooms).",
        )


def new_join_code() -> str:
    groups = (
        "".join(secrets.choice(_CODE_ALPHABET) for _ in range(_CODE_GROUP_LENGTH))
        for _ in range(_CODE_GROUPS)
    )
    return "-".join(groups)


def normalize_join_code(typed: str) -> str | None:
    """The canonical form of a code as a person typed it (any case, spaces, dashes, O for 0)."""
    compact = re.sub(r"[\s-]", "", typed).upper().translate(_CODE_LOOKALIKES)
    if len(compact) != _CODE_GROUPS * _CODE_GROUP_LENGTH:
        return None
    if any(char not in _CODE_ALPHABET for char in compact):
        return None
    step = _CODE_GROUP_LENGTH
    return "-".join(compact[i : i + step] for i in range(0, len(compact), step))


def user_name_from_device(device_name: str) -> str:
    """A valid user name derived from a device name ("Ann's Laptop" -> "ann-s-laptop")."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", device_name.lower()).strip("-._")[:32].strip("-._")
    return slug or "device"


class Store:
    """All persistent state of the reference server."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self.path = path
        self.server_id = self._ensure_server_id()

    @classmethod
    def open(cls, data_dir: Path) -> Store:
        """Open (creating and migrating as needed) the database in ``data_dir``."""
        try:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = data_dir / DATABASE_NAME
            # One connection, used from one thread at a time (the AsyncStore worker or the CLI).
            connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(
                "data_dir_unusable", f"Cannot open the server database in {data_dir}: {exc}"
            ) from exc
        try:
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = NORMAL")
            connection.execute("PRAGMA foreign_keys = ON")
            connection.execute("PRAGMA busy_timeout = 5000")
            _migrate(connection)
            return cls(connection, path)
        except sqlite3.Error as exc:
            connection.close()
            raise StoreError(
                "data_dir_unusable", f"Cannot use the server database {path}: {exc}"
            ) from exc

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _ensure_server_id(self) -> str:
        with self._transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'server_id'").fetchone()
            if row is not None:
                return str(row["value"])
            server_id = "srv-" + secrets.token_hex(8)
            db.execute("INSERT INTO meta (key, value) VALUES ('server_id', ?)", (server_id,))
            return server_id

    # ------------------------------------------------------------ users

    def create_user(
        self, name: str, password_hash: str | None, *, admin: bool = False, now: float
    ) -> UserRecord:
        check_user_name(name)
        with self._transaction() as db:
            self._insert_user(db, name, password_hash, admin=admin, now=now)
        return UserRecord(name=name, admin=admin, has_password=password_hash is not None)

    def _insert_user(
        self,
        db: sqlite3.Connection,
        name: str,
        password_hash: str | None,
        *,
        admin: bool,
        now: float,
    ) -> None:
        try:
            db.execute(
                "INSERT INTO users (name, password_hash, admin, created_at) VALUES (?, ?, ?, ?)",
                (name, password_hash, int(admin), now),
            )
        except sqlite3.IntegrityError:
            raise StoreError("user_exists", f"The user {name!r} already exists.") from None
        room = personal_room(name)
        db.execute("INSERT OR IGNORE INTO rooms (name, created_at) VALUES (?, ?)", (room, now))
        db.execute(
            "INSERT INTO room_members (room, user, role) VALUES (?, ?, 'owner')", (room, name)
        )

    def user(self, name: str) -> UserRecord | None:
        row = self._db.execute(
            "SELECT name, admin, password_hash FROM users WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            return None
        return UserRecord(
            name=row["name"],
            admin=bool(row["admin"]),
            has_password=row["password_hash"] is not None,
        )

    def password_hash(self, name: str) -> str | None:
        row = self._db.execute("SELECT password_hash FROM users WHERE name = ?", (name,)).fetchone()
        return None if row is None else cast(str | None, row["password_hash"])

    def _unique_user_name(self, db: sqlite3.Connection, base: str) -> str:
        candidate, counter = base, 1
        while db.execute("SELECT 1 FROM users WHERE name = ?", (candidate,)).fetchone():
            counter += 1
            suffix = f"-{counter}"
            candidate = base[: 32 - len(suffix)] + suffix
        return candidate

    # ------------------------------------------------------------ join codes

    def create_join_code(
        self,
        *,
        user: str | None,
        room: str | None,
        ttl: int = JOIN_CODE_TTL,
        now: float,
        room_owner: str | None = None,
    ) -> tuple[str, float]:
        """A one-time code; returns (code, expires_at). Only its hash is kept.

        ``user`` None: the enrolling device gets a new user. ``room``: the enrolled user joins
        it as a member. ``room_owner``: when the room does not exist yet it is created now,
        owned by this user (otherwise it is created at enrolment, owned by the enrolled user).
        """
        if not MIN_JOIN_CODE_TTL <= ttl <= MAX_JOIN_CODE_TTL:
            raise StoreError(
                "invalid_request",
                f"The join code lifetime must be {MIN_JOIN_CODE_TTL} to {MAX_JOIN_CODE_TTL} s.",
            )
        if room is not None and not room.startswith(PERSONAL_ROOM_PREFIX):
            check_room_name(room)
        code = new_join_code()
        expires_at = now + ttl
        with self._transaction() as db:
            if user is not None and not self._user_exists(db, user):
                raise StoreError("unknown_user", f"There is no user {user!r}.")
            if room is not None and not self._room_exists(db, room):
                if room.startswith(PERSONAL_ROOM_PREFIX):
                    raise StoreError("unknown_room", f"There is no room {room!r}.")
                if room_owner is not None:
                    self._insert_room(db, room, room_owner, now)
            db.execute(
                "INSERT INTO join_codes (hash, user, room, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (secret_hash(code), user, room, now, expires_at),
            )
        return code, expires_at

    def _redeem_join_code(self, db: sqlite3.Connection, typed: str, now: float) -> sqlite3.Row:
        code = normalize_join_code(typed)
        row = None
        if code is not None:
            row = db.execute(
                "SELECT hash, user, room, expires_at, used_at FROM join_codes WHERE hash = ?",
                (secret_hash(code),),
            ).fetchone()
        _check_code_row(row, now)
        assert row is not None
        db.execute("UPDATE join_codes SET used_at = ? WHERE hash = ?", (now, row["hash"]))
        return cast(sqlite3.Row, row)

    # ------------------------------------------------------------ enrolment and sessions

    def enroll_with_join_code(self, typed_code: str, device: NewDevice, *, now: float) -> Enrolment:
        with self._transaction() as db:
            code = self._redeem_join_code(db, typed_code, now)
            user: str | None = code["user"]
            if user is None:
                existing = self._device_owner(db, device.id)
                if existing is not None:
                    # The same certificate enrolling again keeps its user.
                    user = existing
                else:
                    user = self._unique_user_name(db, user_name_from_device(device.name))
                    self._insert_user(db, user, None, admin=False, now=now)
            db.execute(
                "UPDATE join_codes SET used_by = ? WHERE hash = ?", (device.id, code["hash"])
            )
            record = self._register_device(db, user, device, now)
            membership = None
            if code["room"] is not None:
                membership = self._join_room(db, code["room"], user, now)
            revoked = self._revoke_device_sessions(db, device.id, user, now, "re-enrolled")
            tokens = self._new_session(db, device.id, now, replace_existing=False)
        return Enrolment(
            device=record, tokens=tokens, membership=membership, revoked_sessions=revoked
        )

    def enroll_user_device(self, user: str, device: NewDevice, *, now: float) -> Enrolment:
        """Enrol a device for a user whose password the caller has already verified."""
        with self._transaction() as db:
            if not self._user_exists(db, user):
                raise StoreError("unknown_user", f"There is no user {user!r}.")
            record = self._register_device(db, user, device, now)
            revoked = self._revoke_device_sessions(db, device.id, user, now, "re-enrolled")
            tokens = self._new_session(db, device.id, now, replace_existing=False)
        return Enrolment(device=record, tokens=tokens, revoked_sessions=revoked)

    def _device_owner(self, db: sqlite3.Connection, device_id: str) -> str | None:
        row = db.execute("SELECT user FROM devices WHERE id = ?", (device_id,)).fetchone()
        return None if row is None else str(row["user"])

    def _register_device(
        self, db: sqlite3.Connection, user: str, device: NewDevice, now: float
    ) -> DeviceRecord:
        existing = self._device(db, device.id)
        if existing is not None and existing.user != user:
            raise StoreError("forbidden", "This device certificate is enrolled to another user.")
        if existing is not None and _kind(existing.platform) != _kind(device.platform):
            # A browser's enrolment proves no key: it must never take over (or revoke the
            # sessions of) an agent that happens to have, or is given, the same fingerprint.
            raise StoreError(
                "forbidden", "This fingerprint belongs to another kind of device (agent, browser)."
            )
        db.execute(
            "INSERT INTO devices (id, name, platform, user, certificate, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET name = excluded.name, platform = excluded.platform",
            (device.id, device.name, device.platform, user, device.certificate, now),
        )
        record = self._device(db, device.id)
        assert record is not None
        _audit(
            db,
            now,
            "device.enrolled",
            room=personal_room(user),
            actor_user=user,
            actor_device=device.id,
            subject=device.id,
            detail={
                "name": device.name,
                "platform": device.platform,
                "again": existing is not None,
            },
        )
        return record

    def _revoke_device_sessions(
        self, db: sqlite3.Connection, device_id: str, user: str, now: float, reason: str
    ) -> tuple[str, ...]:
        """Delete the device's sessions (a device enrols again when it lost its tokens: the old
        ones must stop working); returns their ids, for the sockets they opened."""
        rows = db.execute("SELECT id FROM sessions WHERE device = ?", (device_id,)).fetchall()
        revoked = tuple(str(row["id"]) for row in rows)
        if revoked:
            db.execute("DELETE FROM sessions WHERE device = ?", (device_id,))
            _audit(
                db,
                now,
                "session.revoked",
                room=personal_room(user),
                actor_device=device_id,
                subject=device_id,
                detail={"reason": reason, "sessions": len(revoked)},
            )
        return revoked

    def _new_session(
        self, db: sqlite3.Connection, device_id: str, now: float, *, replace_existing: bool
    ) -> IssuedTokens:
        if replace_existing:
            # A device enrols again when it lost its tokens: the old ones must stop working.
            db.execute("DELETE FROM sessions WHERE device = ?", (device_id,))
        access, refresh = _new_access_token(), _new_refresh_token()
        db.execute(
            "INSERT INTO sessions (id, device, access_hash, access_expires_at, refresh_hash, "
            "refresh_expires_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                secrets.token_hex(8),
                device_id,
                secret_hash(access),
                now + ACCESS_TTL,
                secret_hash(refresh),
                now + REFRESH_TTL,
                now,
            ),
        )
        return IssuedTokens(access, ACCESS_TTL, refresh)

    def authenticate(self, access_token: str, *, now: float) -> Principal | None:
        row = self._db.execute(
            "SELECT s.id, s.access_expires_at, d.id AS device, u.name AS user, u.admin, "
            "(SELECT l.sender FROM links l WHERE l.guest = d.id) AS guest_of "
            "FROM sessions s JOIN devices d ON d.id = s.device JOIN users u ON u.name = d.user "
            "WHERE s.access_hash = ?",
            (secret_hash(access_token),),
        ).fetchone()
        if row is None or row["access_expires_at"] <= now:
            return None
        return Principal(
            device_id=row["device"],
            user=row["user"],
            admin=bool(row["admin"]),
            session_id=row["id"],
            access_expires_at=float(row["access_expires_at"]),
            guest_of=row["guest_of"],
        )

    def refresh(self, refresh_token: str, *, now: float) -> IssuedTokens:
        """Exchange a refresh token for a new pair; the old refresh token is spent for good."""
        refused = StoreError(
            "invalid_refresh_token", "The refresh token is not valid; enrol again."
        )
        token_hash = secret_hash(refresh_token)
        with self._transaction() as db:
            db.execute("DELETE FROM spent_refresh_tokens WHERE spent_at < ?", (now - REFRESH_TTL,))
            spent = db.execute(
                "SELECT session FROM spent_refresh_tokens WHERE hash = ?", (token_hash,)
            ).fetchone()
            reuse = None if spent is None else self._revoke_reused(db, spent["session"], now)
        if reuse is not None:
            # Committed above: the revocation must survive the refusal.
            raise reuse
        with self._transaction() as db:
            row = db.execute(
                "SELECT id, refresh_expires_at FROM sessions WHERE refresh_hash = ?", (token_hash,)
            ).fetchone()
            if row is None or row["refresh_expires_at"] <= now:
                raise refused
            access, refresh = _new_access_token(), _new_refresh_token()
            db.execute(
                "INSERT INTO spent_refresh_tokens (hash, session, spent_at) VALUES (?, ?, ?)",
                (token_hash, row["id"], now),
            )
            db.execute(
                "UPDATE sessions SET access_hash = ?, access_expires_at = ?, refresh_hash = ?, "
                "refresh_expires_at = ? WHERE id = ?",
                (
                    secret_hash(access),
                    now + ACCESS_TTL,
                    secret_hash(refresh),
                    now + REFRESH_TTL,
                    row["id"],
                ),
            )
        return IssuedTokens(access, ACCESS_TTL, refresh)

    def _revoke_reused(self, db: sqlite3.Connection, session: str, now: float) -> RefreshReuse:
        row = db.execute(
            "SELECT d.id, d.user FROM sessions s JOIN devices d ON d.id = s.device WHERE s.id = ?",
            (session,),
        ).fetchone()
        if row is None:
            return RefreshReuse((), None)  # revoked already: nothing new to report
        db.execute("DELETE FROM sessions WHERE id = ?", (session,))
        _audit(
            db,
            now,
            "session.revoked",
            room=personal_room(row["user"]),
            actor_device=row["id"],
            subject=row["id"],
            detail={"reason": "refresh token reused", "sessions": 1},
        )
        return RefreshReuse((session,), str(row["user"]))

    # ------------------------------------------------------------ devices

    def device(self, device_id: str) -> DeviceRecord | None:
        return self._device(self._db, device_id)

    def _device(self, db: sqlite3.Connection, device_id: str) -> DeviceRecord | None:
        row = db.execute("SELECT * FROM devices WHERE id = ?", (device_id,)).fetchone()
        return None if row is None else _device_record(row)

    def update_device(
        self, device_id: str, *, name: str | None = None, addresses: list[str] | None = None
    ) -> DeviceRecord:
        with self._transaction() as db:
            if name is not None:
                db.execute("UPDATE devices SET name = ? WHERE id = ?", (name, device_id))
            if addresses is not None:
                db.execute(
                    "UPDATE devices SET addresses = ? WHERE id = ?",
                    (json.dumps(addresses), device_id),
                )
            record = self._device(db, device_id)
        if record is None:
            raise StoreError("unknown_device", "This device is not enrolled.")
        return record

    def touch_device(self, device_id: str, *, now: float) -> None:
        with self._transaction() as db:
            db.execute("UPDATE devices SET last_seen = ? WHERE id = ?", (now, device_id))

    def visible_devices(self, device_id: str) -> list[tuple[DeviceRecord, tuple[str, ...]]]:
        """Every other device sharing a room with ``device_id``, with the rooms they share."""
        rows = self._db.execute(
            "SELECT d.*, theirs.room AS shared_room "
            "FROM devices me "
            "JOIN room_members mine ON mine.user = me.user "
            "JOIN room_members theirs ON theirs.room = mine.room "
            "JOIN devices d ON d.user = theirs.user "
            "WHERE me.id = ? AND d.id != me.id ORDER BY d.name, d.id, theirs.room",
            (device_id,),
        ).fetchall()
        found: dict[str, tuple[DeviceRecord, list[str]]] = {}
        for row in rows:
            _, rooms = found.setdefault(row["id"], (_device_record(row), []))
            rooms.append(row["shared_room"])
        return [(record, tuple(rooms)) for record, rooms in found.values()]

    # ------------------------------------------------------------ rooms

    def _user_exists(self, db: sqlite3.Connection, user: str) -> bool:
        return db.execute("SELECT 1 FROM users WHERE name = ?", (user,)).fetchone() is not None

    def _room_exists(self, db: sqlite3.Connection, room: str) -> bool:
        return db.execute("SELECT 1 FROM rooms WHERE name = ?", (room,)).fetchone() is not None

    def _insert_room(self, db: sqlite3.Connection, name: str, owner: str, now: float) -> None:
        try:
            db.execute("INSERT INTO rooms (name, created_at) VALUES (?, ?)", (name, now))
        except sqlite3.IntegrityError:
            raise StoreError("room_exists", f"The room {name!r} already exists.") from None
        db.execute(
            "INSERT INTO room_members (room, user, role) VALUES (?, ?, 'owner')", (name, owner)
        )

    def room_exists(self, name: str) -> bool:
        return self._room_exists(self._db, name)

    def create_room(self, name: str, owner: str, *, now: float) -> RoomRecord:
        check_room_name(name)
        with self._transaction() as db:
            self._insert_room(db, name, owner, now)
        return RoomRecord(name=name, role="owner", members=(owner,))

    def role(self, room: str, user: str) -> Role | None:
        return self._role(self._db, room, user)

    def _role(self, db: sqlite3.Connection, room: str, user: str) -> Role | None:
        row = db.execute(
            "SELECT role FROM room_members WHERE room = ? AND user = ?", (room, user)
        ).fetchone()
        return None if row is None else cast(Role, row["role"])

    def rooms_of(self, user: str) -> list[RoomRecord]:
        rows = self._db.execute(
            "SELECT mine.room, mine.role, theirs.user AS member FROM room_members mine "
            "JOIN room_members theirs ON theirs.room = mine.room "
            "WHERE mine.user = ? ORDER BY mine.room, theirs.user",
            (user,),
        ).fetchall()
        rooms: dict[str, tuple[Role, list[str]]] = {}
        for row in rows:
            rooms.setdefault(row["room"], (row["role"], []))[1].append(row["member"])
        return [RoomRecord(name, role, tuple(members)) for name, (role, members) in rooms.items()]

    def room_for(self, room: str, user: str) -> RoomRecord:
        for record in self.rooms_of(user):
            if record.name == room:
                return record
        raise StoreError("unknown_room", f"There is no room {room!r}.")

    def add_member(self, room: str, user: str, role: Role, *, now: float) -> MembershipChange:
        """The server operator puts ``user`` into ``room`` with ``role`` (or changes its role).

        No consent is asked: only the operator's tools (and benchmarks) call this. Users go
        through :meth:`invite` + :meth:`accept_invitation`, or :meth:`join_with_code`.
        """
        with self._transaction() as db:
            if not self._room_exists(db, room):
                raise StoreError("unknown_room", f"There is no room {room!r}.")
            if not self._user_exists(db, user):
                raise StoreError("unknown_user", f"There is no user {user!r}.")
            if self._role(db, room, user) == "owner" and role != "owner":
                self._check_keeps_owner(db, room)
            change = self._set_member(db, room, user, role)
            _audit(db, now, "room.joined", room=room, subject=user, detail={"role": role})
            return change

    def _join_room(
        self, db: sqlite3.Connection, room: str, user: str, now: float
    ) -> MembershipChange | None:
        """Join-code membership: create the room (user as owner) or join as member."""
        if not self._room_exists(db, room):
            self._insert_room(db, room, user, now)
            change = MembershipChange(room, user, "owner", frozenset({user}), frozenset())
        elif self._role(db, room, user) is not None:
            return None  # already in: a join code never changes (or lowers) a role
        else:
            change = self._set_member(db, room, user, "member")
        _audit(
            db,
            now,
            "room.joined",
            room=room,
            actor_user=user,
            subject=user,
            detail={"role": change.role, "via": "enrolment join code"},
        )
        return change

    def _join_by_consent(
        self,
        db: sqlite3.Connection,
        room: str,
        user: str,
        role: Role,
        *,
        device: str | None,
        now: float,
        how: dict[str, Any],
    ) -> MembershipChange:
        """``user`` joins ``room`` as ``role`` by its own act (``how``: an invitation, a room join
        code), audited. Already in (joined meanwhile): the role stays, neither changed nor
        lowered."""
        current = self._role(db, room, user)
        if current is not None:
            return MembershipChange(room, user, current, self._members(db, room), frozenset())
        change = self._set_member(db, room, user, role)
        _audit(
            db,
            now,
            "room.joined",
            room=room,
            actor_user=user,
            actor_device=device,
            subject=user,
            detail={"role": role, **how},
        )
        return change

    def _set_member(
        self, db: sqlite3.Connection, room: str, user: str, role: Role
    ) -> MembershipChange:
        before = self._peer_users(db, user)
        db.execute(
            "INSERT INTO room_members (room, user, role) VALUES (?, ?, ?) "
            "ON CONFLICT (room, user) DO UPDATE SET role = excluded.role",
            (room, user, role),
        )
        members = self._members(db, room)
        return MembershipChange(room, user, role, members, members - before - {user})

    def _members(self, db: sqlite3.Connection, room: str) -> frozenset[str]:
        rows = db.execute("SELECT user FROM room_members WHERE room = ?", (room,)).fetchall()
        return frozenset(row["user"] for row in rows)

    def room_members(self, room: str) -> frozenset[str]:
        return self._members(self._db, room)

    def _owner_role(self, db: sqlite3.Connection, room: str, by: str, action: str) -> None:
        """Refuse unless ``by`` owns ``room``; a room one is not in does not exist for one."""
        role = self._role(db, room, by)
        if role is None:
            raise StoreError("unknown_room", f"There is no room {room!r}.")
        if role != "owner":
            raise StoreError("forbidden", f"Only an owner of {room!r} can {action}.")

    def _check_keeps_owner(self, db: sqlite3.Connection, room: str) -> None:
        owners = db.execute(
            "SELECT COUNT(*) FROM room_members WHERE room = ? AND role = 'owner'", (room,)
        ).fetchone()[0]
        if owners <= 1:
            raise StoreError("forbidden", f"The room {room!r} must keep an owner.")

    @staticmethod
    def _refuse_personal(room: str, action: str) -> None:
        if room.startswith(PERSONAL_ROOM_PREFIX):
            raise StoreError(
                "forbidden", f"{room!r} is a personal room: it holds only its user; {action}."
            )

    # ------------------------------------------------------------ consent: invitations

    def invite(
        self, room: str, user: str, role: Role, *, by: str, by_device: str | None, now: float
    ) -> bool:
        """An owner of ``room`` invites ``user``; True if a new invitation awaits the invitee.

        The caller's answer must not depend on the result: an invitation to a user that does
        not exist, or is already a member, looks exactly like one that was stored (no oracle).
        Re-inviting replaces the pending invitation (True only the first time, so a re-invite
        does not notify again).
        """
        with self._transaction() as db:
            self._owner_role(db, room, by, "invite")
            self._refuse_personal(room, "nobody can be invited to it")
            # The inviter's act is recorded whatever it leads to: recording only real
            # invitations would tell the room's owners which user names exist.
            _audit(
                db,
                now,
                "room.invited",
                room=room,
                actor_user=by,
                actor_device=by_device,
                subject=user,
                detail={"role": role},
            )
            if not self._user_exists(db, user) or self._role(db, room, user) is not None:
                return False
            db.execute("DELETE FROM invitations WHERE user = ? AND expires_at <= ?", (user, now))
            pending = db.execute(
                "SELECT invited_by FROM invitations WHERE room = ? AND user = ?", (room, user)
            ).fetchone()
            if pending is None and self._invitations_full(db, user, by):
                return False
            db.execute(
                "INSERT OR REPLACE INTO invitations "
                "(room, user, role, invited_by, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (room, user, role, by, now, now + INVITATION_TTL),
            )
            return pending is None

    def _invitations_full(self, db: sqlite3.Connection, user: str, by: str) -> bool:
        row = db.execute(
            "SELECT COUNT(*) AS total, SUM(invited_by = ?) AS mine FROM invitations WHERE user = ?",
            (by, user),
        ).fetchone()
        return bool(
            row["total"] >= MAX_PENDING_PER_INVITEE or (row["mine"] or 0) >= MAX_PENDING_PER_INVITER
        )

    def invitations_of(self, user: str, *, now: float) -> list[InvitationRecord]:
        """``user``'s pending invitations (those whose inviter still owns the room)."""
        rows = self._db.execute(
            f"{_VALID_INVITATIONS} AND i.user = ? ORDER BY i.created_at, i.room", (now, user)
        ).fetchall()
        return [_invitation_record(row) for row in rows]

    def accept_invitation(
        self, room: str, user: str, *, device: str | None, now: float
    ) -> MembershipChange:
        """``user`` accepts its invitation to ``room``: its consent, so it joins."""
        with self._transaction() as db:
            row = db.execute(
                f"{_VALID_INVITATIONS} AND i.user = ? AND i.room = ?", (now, user, room)
            ).fetchone()
            db.execute("DELETE FROM invitations WHERE room = ? AND user = ?", (room, user))
            if row is None:
                raise StoreError("unknown_room", f"You have no invitation to the room {room!r}.")
            return self._join_by_consent(
                db,
                room,
                user,
                row["role"],
                device=device,
                now=now,
                how={"via": "invitation", "invited_by": row["invited_by"]},
            )

    def decline_invitation(self, room: str, user: str, *, now: float) -> None:
        """Drop the invitation. The inviter is not told (only real users could decline)."""
        with self._transaction() as db:
            row = db.execute(
                f"{_VALID_INVITATIONS} AND i.user = ? AND i.room = ?", (now, user, room)
            ).fetchone()
            db.execute("DELETE FROM invitations WHERE room = ? AND user = ?", (room, user))
        if row is None:
            raise StoreError("unknown_room", f"You have no invitation to the room {room!r}.")

    # ------------------------------------------------------------ consent: room join codes

    def create_room_join_code(
        self, room: str, *, by: str, ttl: int = JOIN_CODE_TTL, now: float
    ) -> tuple[str, float]:
        """A one-time code whose user joins ``room`` as a member; returns (code, expires_at)."""
        if not MIN_JOIN_CODE_TTL <= ttl <= MAX_JOIN_CODE_TTL:
            raise StoreError(
                "invalid_request",
                f"The join code lifetime must be {MIN_JOIN_CODE_TTL} to {MAX_JOIN_CODE_TTL} s.",
            )
        code = new_join_code()
        with self._transaction() as db:
            self._owner_role(db, room, by, "make join codes for it")
            self._refuse_personal(room, "nobody can join it")
            db.execute(
                "INSERT INTO room_join_codes (hash, room, created_by, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (secret_hash(code), room, by, now, now + ttl),
            )
        return code, now + ttl

    def join_with_code(
        self, typed: str, user: str, *, device: str | None, now: float
    ) -> MembershipChange:
        """``user`` joins the room of a room join code (using it is the joiner's consent)."""
        with self._transaction() as db:
            code = normalize_join_code(typed)
            row = None
            if code is not None:
                row = db.execute(
                    "SELECT hash, room, created_by, expires_at, used_at FROM room_join_codes "
                    "WHERE hash = ?",
                    (secret_hash(code),),
                ).fetchone()
            _check_code_row(row, now)
            assert row is not None
            db.execute(
                "UPDATE room_join_codes SET used_at = ?, used_by = ? WHERE hash = ?",
                (now, user, row["hash"]),
            )
            return self._join_by_consent(
                db,
                str(row["room"]),
                user,
                "member",
                device=device,
                now=now,
                how={"via": "room join code", "code_by": row["created_by"]},
            )

    # ------------------------------------------------------------ members: roles, leaving

    def set_role(
        self, room: str, user: str, role: Role, *, by: str, by_device: str | None, now: float
    ) -> MembershipChange:
        """An owner changes the role of an existing member (never adds one)."""
        with self._transaction() as db:
            self._owner_role(db, room, by, "change roles")
            self._refuse_personal(room, "its role cannot change")
            current = self._role(db, room, user)
            if current is None:
                # Not a member: whether such a user exists is none of the caller's business.
                raise StoreError("unknown_user", f"{user!r} is not a member of {room!r}.")
            if current == "owner" and role != "owner":
                self._check_keeps_owner(db, room)
            change = self._set_member(db, room, user, role)
            if current != role:
                _audit(
                    db,
                    now,
                    "room.role_changed",
                    room=room,
                    actor_user=by,
                    actor_device=by_device,
                    subject=user,
                    detail={"from": current, "to": role},
                )
            return change

    def remove_member(
        self, room: str, user: str, *, by: str, by_device: str | None, now: float
    ) -> MembershipChange:
        """An owner removes ``user``, or a member leaves (``user == by``).

        The last owner cannot leave while others remain; a room left empty is deleted (with
        its log, so a later room of that name starts afresh).
        """
        with self._transaction() as db:
            by_role = self._role(db, room, by)
            if by_role is None:
                raise StoreError("unknown_room", f"There is no room {room!r}.")
            self._refuse_personal(room, "it cannot be left")
            if user != by and by_role != "owner":
                raise StoreError("forbidden", f"Only an owner of {room!r} can remove members.")
            current = self._role(db, room, user)
            if current is None:
                raise StoreError("unknown_user", f"{user!r} is not a member of {room!r}.")
            members = self._members(db, room)
            if current == "owner" and len(members) > 1:
                self._check_keeps_owner(db, room)
            before = self._peer_users(db, user)
            db.execute("DELETE FROM room_members WHERE room = ? AND user = ?", (room, user))
            after = self._peer_users(db, user)
            remaining = members - {user}
            if remaining:
                _audit(
                    db,
                    now,
                    "room.left",
                    room=room,
                    actor_user=by,
                    actor_device=by_device,
                    subject=user,
                    detail={"removed": user != by},
                )
            else:
                db.execute("DELETE FROM rooms WHERE name = ?", (room,))
                db.execute("DELETE FROM audit WHERE room = ?", (room,))
            return MembershipChange(
                room, user, None, remaining, frozenset(), before - after - {user}
            )

    # ------------------------------------------------------------ peers and capabilities

    def peer_users(self, user: str) -> frozenset[str]:
        """Users sharing at least one room with ``user`` (``user`` included)."""
        return self._peer_users(self._db, user) | {user}

    def _peer_users(self, db: sqlite3.Connection, user: str) -> frozenset[str]:
        rows = db.execute(
            "SELECT DISTINCT theirs.user FROM room_members mine "
            "JOIN room_members theirs ON theirs.room = mine.room WHERE mine.user = ?",
            (user,),
        ).fetchall()
        return frozenset(row["user"] for row in rows)

    def grant_room(self, holder_user: str, target_user: str, scope: str, room: str | None) -> str:
        """The room whose role lets ``holder_user`` ask for ``scope`` toward ``target_user``.

        One room decides, never the best role across rooms: both users must be members of it
        and the holder's role there must allow the scope (ROLE_SCOPES). ``room`` None: the
        holder's personal room for its own devices, else the first shared room (by name) whose
        role allows the scope. Raises ``unknown_device`` when the users share no room at all
        (devices one cannot see do not exist for one), ``unknown_room`` for a room the holder
        is not in, ``not_allowed`` otherwise.
        """
        shared = self._shared_rooms(holder_user, target_user)
        if not shared:
            raise StoreError("unknown_device", "There is no such device.")
        refused = StoreError("not_allowed", f"You may not ask for {scope!r} toward that device.")
        if room is not None:
            if self._role(self._db, room, holder_user) is None:
                raise StoreError("unknown_room", f"There is no room {room!r}.")
            role = shared.get(room)
            if role is None or scope not in ROLE_SCOPES[role]:
                raise refused
            return room
        if holder_user == target_user:
            return personal_room(holder_user)
        for name in sorted(shared):
            if scope in ROLE_SCOPES[shared[name]]:
                return name
        raise refused

    def _shared_rooms(self, holder_user: str, target_user: str) -> dict[str, Role]:
        rows = self._db.execute(
            "SELECT mine.room, mine.role FROM room_members mine "
            "JOIN room_members theirs ON theirs.room = mine.room "
            "WHERE mine.user = ? AND theirs.user = ?",
            (holder_user, target_user),
        ).fetchall()
        return {str(row["room"]): cast(Role, row["role"]) for row in rows}

    # ------------------------------------------------------------ audit log

    def record(
        self,
        kind: str,
        *,
        room: str | None,
        actor_user: str | None = None,
        actor_device: str | None = None,
        subject: str | None = None,
        detail: dict[str, Any] | None = None,
        now: float,
    ) -> None:
        """Add an audit entry for something that happened outside the store."""
        with self._transaction() as db:
            _audit(
                db,
                now,
                kind,
                room=room,
                actor_user=actor_user,
                actor_device=actor_device,
                subject=subject,
                detail=detail,
            )

    def record_terminal_control(
        self,
        *,
        session_id: str,
        host_user: str,
        host_device: str,
        controller_device: str | None,
        rooms: list[str],
        now: float,
    ) -> DeviceRecord | None:
        """Log a control change the host reports, in each room it shares the session in.

        The host must be in every room; the controller (None: nobody) must be a device of a
        member of one of them, since only those can hold a token for the session. Returns the
        controller's record.
        """
        with self._transaction() as db:
            for room in rooms:
                if self._role(db, room, host_user) is None:
                    raise StoreError("unknown_room", f"There is no room {room!r}.")
            controller = None
            if controller_device is not None:
                controller = self._device(db, controller_device)
                if controller is None or all(
                    self._role(db, room, controller.user) is None for room in rooms
                ):
                    raise StoreError("unknown_device", "There is no such device.")
            for room in rooms:
                _audit(
                    db,
                    now,
                    "terminal.control",
                    room=room,
                    actor_user=host_user,
                    actor_device=host_device,
                    subject=controller_device,
                    detail={
                        "session_id": session_id,
                        "controller_user": None if controller is None else controller.user,
                    },
                )
            return controller

    def audit_log(self, room: str, *, by: str, limit: int = 100) -> list[AuditRecord]:
        """The newest entries of ``room``'s log, newest first, for an owner of the room.

        A personal room's log holds its user's enrolments and revocations too.
        """
        self._owner_role(self._db, room, by, "read its audit log")
        rows = self._db.execute(
            "SELECT * FROM audit WHERE room = ? ORDER BY id DESC LIMIT ?",
            (room, max(1, min(limit, MAX_AUDIT_PAGE))),
        ).fetchall()
        return [_audit_record(row) for row in rows]

    # ------------------------------------------------------------ per-user notifications

    def set_notify(self, user: str, url: str | None, token: str | None) -> None:
        """Set (``url`` None: clear) the user's Gotify; a None token keeps the stored one."""
        with self._transaction() as db:
            if url is None:
                db.execute("DELETE FROM user_notify WHERE user = ?", (user,))
                return
            db.execute(
                "INSERT INTO user_notify (user, gotify_url, gotify_token) VALUES (?, ?, ?) "
                "ON CONFLICT (user) DO UPDATE SET gotify_url = excluded.gotify_url, "
                "gotify_token = COALESCE(excluded.gotify_token, user_notify.gotify_token)",
                (user, url, token),
            )

    def notify_target(self, user: str) -> NotifyTarget | None:
        row = self._db.execute(
            "SELECT gotify_url, gotify_token FROM user_notify WHERE user = ?", (user,)
        ).fetchone()
        return None if row is None else NotifyTarget(row["gotify_url"], row["gotify_token"])

    # ------------------------------------------------------------ share links

    def create_link(
        self, sender: str, *, name: str, size: int, ttl: int, now: float
    ) -> tuple[LinkRecord, str]:
        """A one-time share link from device ``sender``; returns it and its secret (kept
        hashed). Old links and their guests are deleted here, so they never pile up."""
        link_id, secret = secrets.token_urlsafe(12), secrets.token_urlsafe(24)
        with self._transaction() as db:
            self._forget_old_links(db, now)
            open_links = db.execute(
                "SELECT COUNT(*) FROM links WHERE sender = ? AND guest IS NULL AND expires_at > ?",
                (sender, now),
            ).fetchone()[0]
            if open_links >= MAX_OPEN_LINKS:
                raise StoreError(
                    "rate_limited",
                    f"This device has {MAX_OPEN_LINKS} share links open; wait for some to expire.",
                )
            db.execute(
                "INSERT INTO links (id, secret_hash, sender, name, size, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (link_id, secret_hash(secret), sender, name, size, now, now + ttl),
            )
        return LinkRecord(link_id, sender, name, size, now + ttl), secret

    def _forget_old_links(self, db: sqlite3.Connection, now: float) -> None:
        """Links past their TTL by more than a guest session's life go, with their guests."""
        cutoff = now - ACCESS_TTL
        old = db.execute("SELECT id FROM links WHERE expires_at < ?", (cutoff,)).fetchall()
        for row in old:
            guest_user = GUEST_USER_PREFIX + row["id"]
            db.execute("DELETE FROM users WHERE name = ?", (guest_user,))
            db.execute("DELETE FROM rooms WHERE name = ?", (personal_room(guest_user),))
            db.execute("DELETE FROM links WHERE id = ?", (row["id"],))

    def claim_link(
        self, link_id: str, secret: str, fingerprint: str, *, now: float
    ) -> LinkClaimRecord:
        """The page holding the link's secret becomes its guest (once): a device of its own
        user, with a session that may reach the sender only."""
        with self._transaction() as db:
            row = db.execute("SELECT * FROM links WHERE id = ?", (link_id,)).fetchone()
            if row is None or not hmac.compare_digest(row["secret_hash"], secret_hash(secret)):
                raise _unknown_link()
            if row["guest"] is not None:
                raise StoreError("link_claimed", "This share link has already been used.")
            if row["expires_at"] <= now:
                raise StoreError("link_expired", "This share link has expired.")
            if self._device_owner(db, fingerprint) is not None:
                raise StoreError(
                    "forbidden", "This fingerprint belongs to an enrolled device; make a new one."
                )
            user = GUEST_USER_PREFIX + link_id
            self._insert_user(db, user, None, admin=False, now=now)
            db.execute(
                "INSERT INTO devices (id, name, platform, user, certificate, created_at) "
                "VALUES (?, ?, ?, ?, '', ?)",
                (fingerprint, "guest", wire.GUEST_PLATFORM, user, now),
            )
            db.execute(
                "UPDATE links SET guest = ?, claimed_at = ? WHERE id = ?",
                (fingerprint, now, link_id),
            )
            tokens = self._new_session(db, fingerprint, now, replace_existing=False)
            guest, sender = self._device(db, fingerprint), self._device(db, row["sender"])
            assert guest is not None and sender is not None  # the link's sender cascades
            _audit(
                db,
                now,
                "link.claimed",
                room=personal_room(sender.user),
                actor_device=fingerprint,
                subject=sender.id,
                detail={"link": link_id, "name": row["name"]},
            )
        link = LinkRecord(link_id, sender.id, row["name"], row["size"], row["expires_at"])
        return LinkClaimRecord(link=link, guest=guest, sender=sender, tokens=tokens)

    def link_status(self, link_id: str, sender: str) -> tuple[LinkRecord, str | None]:
        """A link of ``sender``'s, and its guest once claimed (another device's: unknown)."""
        row = _sender_link(self._db, link_id, sender)
        link = LinkRecord(row["id"], sender, row["name"], row["size"], row["expires_at"])
        return link, row["guest"]

    def withdraw_link(self, link_id: str, sender: str, *, now: float) -> None:
        """``sender`` cancelled its send: nobody may claim the link any more (a claim then
        hears ``link_expired``). Another device's link is unknown; a claimed one, too late."""
        with self._transaction() as db:
            row = _sender_link(db, link_id, sender)
            if row["guest"] is not None:
                raise StoreError("link_claimed", "This share link has already been used.")
            if row["expires_at"] <= now:
                return  # expired or withdrawn already: nothing changes, nothing to log
            # Expiring it now (no column of its own) frees its place among the sender's open
            # links and lets the usual housekeeping delete it.
            db.execute("UPDATE links SET expires_at = ? WHERE id = ?", (now, link_id))
            device = self._device(db, sender)
            assert device is not None  # the link's sender cascades
            _audit(
                db,
                now,
                "link.withdrawn",
                room=personal_room(device.user),
                actor_device=sender,
                subject=sender,
                detail={"link": link_id, "name": row["name"]},
            )

    def guest_sender(self, guest: str) -> str | None:
        """The device a share link's guest may reach (None: ``guest`` is no guest)."""
        row = self._db.execute("SELECT sender FROM links WHERE guest = ?", (guest,)).fetchone()
        return None if row is None else str(row["sender"])

    # ------------------------------------------------------------ socket lifetime
    # (queries for server/hub.py and server/relay.py)

    def live_sessions(self, session_ids: Collection[str]) -> frozenset[str]:
        """Those of ``session_ids`` that still exist (not revoked, device not removed).

        The hub sweeps its sockets with this, so a revocation that no caller reported (or that
        raced a socket's authentication) still closes the socket within one sweep.
        """
        ids = list(session_ids)
        live: set[str] = set()
        for start in range(0, len(ids), _SESSION_CHUNK):
            chunk = ids[start : start + _SESSION_CHUNK]
            marks = ",".join("?" * len(chunk))
            # Only "?" placeholders are formatted in; the ids are bound parameters.
            query = f"SELECT id FROM sessions WHERE id IN ({marks})"  # noqa: S608
            rows = self._db.execute(query, chunk)
            live.update(row["id"] for row in rows)
        return frozenset(live)


_SESSION_CHUNK: Final = 500  # well under SQLite's limit of bound parameters per statement


# Pending invitations still valid: not expired, and their inviter still owns the room.
_VALID_INVITATIONS: Final = (
    "SELECT i.room, i.role, i.invited_by, i.created_at, i.expires_at FROM invitations i "
    "JOIN room_members m ON m.room = i.room AND m.user = i.invited_by AND m.role = 'owner' "
    "WHERE i.expires_at > ?"
)


def _check_code_row(row: sqlite3.Row | None, now: float) -> None:
    """Refuse an unknown, used or expired one-time code (enrolment or room join code)."""
    if row is None:
        raise StoreError("join_code_unknown", "This join code is not known to the server.")
    if row["used_at"] is not None:
        raise StoreError("join_code_used", "This join code has already been used.")
    if row["expires_at"] <= now:
        raise StoreError("join_code_expired", "This join code has expired.")


def _audit(
    db: sqlite3.Connection,
    now: float,
    kind: str,
    *,
    room: str | None,
    actor_user: str | None = None,
    actor_device: str | None = None,
    subject: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    # Pruned as it grows, so the log stays bounded without a separate job.
    db.execute("DELETE FROM audit WHERE at < ?", (now - AUDIT_RETENTION,))
    db.execute(
        "INSERT INTO audit (at, kind, room, actor_user, actor_device, subject, detail) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (now, kind, room, actor_user, actor_device, subject, json.dumps(detail or {})),
    )


def _invitation_record(row: sqlite3.Row) -> InvitationRecord:
    return InvitationRecord(
        room=row["room"],
        role=row["role"],
        invited_by=row["invited_by"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
    )


def _audit_record(row: sqlite3.Row) -> AuditRecord:
    return AuditRecord(
        id=row["id"],
        at=row["at"],
        kind=row["kind"],
        room=row["room"],
        actor_user=row["actor_user"],
        actor_device=row["actor_device"],
        subject=row["subject"],
        detail=dict(json.loads(row["detail"])),
    )


def _device_record(row: sqlite3.Row) -> DeviceRecord:
    return DeviceRecord(
        id=row["id"],
        name=row["name"],
        platform=row["platform"],
        user=row["user"],
        certificate=row["certificate"],
        last_seen=row["last_seen"],
        addresses=tuple(json.loads(row["addresses"])),
    )


def _sender_link(db: sqlite3.Connection, link_id: str, sender: str) -> sqlite3.Row:
    """The link ``link_id`` of device ``sender``; another device's link is as unknown as a
    missing one (no oracle for link ids)."""
    row = db.execute(
        "SELECT * FROM links WHERE id = ? AND sender = ?", (link_id, sender)
    ).fetchone()
    if row is None:
        raise _unknown_link()
    return row  # type: ignore[no-any-return]


def _unknown_link() -> StoreError:
    return StoreError("link_unknown", "This share link is not known to the server.")


def _kind(platform: str) -> str:
    """Which kind of device a platform names: browser, guest, or agent (every other)."""
    return platform if platform in wire.WEBRTC_PLATFORMS else "agent"


def _new_access_token() -> str:
    return "mesh_at_" + secrets.token_urlsafe(32)


def _new_refresh_token() -> str:
    return "mesh_rt_" + secrets.token_urlsafe(32)


def _migrate(connection: sqlite3.Connection) -> None:
    # The version is read inside the write transaction so two processes never migrate twice.
    connection.execute("BEGIN IMMEDIATE")
    try:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"the database has schema version {version}; this server knows up to "
                f"{SCHEMA_VERSION} (it was written by a newer version)"
            )
        for statements in _MIGRATIONS[version:]:
            for statement in statements:
                connection.execute(statement)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


P = ParamSpec("P")
T = TypeVar("T")


class AsyncStore:
    """Runs :class:`Store` methods on one worker thread, so SQLite never blocks the event loop.

    ``await db.call(Store.device, device_id)``: one thread also serialises all writes.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-server-db")

    async def call(
        self, method: Callable[Concatenate[Store, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, lambda: method(self.store, *args, **kwargs)
        )

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.store.close()
