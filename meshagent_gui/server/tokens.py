"""Capability-token signing keys (Ed25519) and token issuance (JWT, ``typ: mesh-cap+jwt``).

The key file holds every key the server ever used: one ``active`` key signs, ``retired`` ones
stay published so tokens signed just before a rotation still verify. The file is written
atomically with mode 0600; a server that finds it changed on disk (``meshagent server
rotate-key`` run beside it) reloads it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshagent_gui.core.mesh.types import PublicKey
from meshagent_gui.core.protocol.captoken import certificate_binding

log = logging.getLogger(__name__)

TOKEN_TYPE: Final = "mesh-cap+jwt"
MAX_TTL: Final = 300
_FILE_VERSION: Final = 1

KeyStatus = Literal["active", "retired"]


class KeyFileError(Exception):
    """The key file is unreadable, corrupt or cannot be written."""


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class _SigningKey:
    kid: str
    status: KeyStatus
    created_at: float
    private_key: Ed25519PrivateKey

    @property
    def raw_public(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls, now: float) -> _SigningKey:
        private_key = Ed25519PrivateKey.generate()
        raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return cls(
            kid=_jwk_thumbprint(raw), status="active", created_at=now, private_key=private_key
        )

    def to_json(self) -> dict[str, Any]:
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return {
            "kid": self.kid,
            "status": self.status,
            "created_at": self.created_at,
            "private_key": pem.decode("ascii"),
        }

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> _SigningKey:
        private_key = serialization.load_pem_private_key(
            str(entry["private_key"]).encode("ascii"), password=None
        )
        if not isinstance(private_key, Ed25519PrivateKey):
            raise KeyFileError("a signing key is not an Ed25519 key")
        status = entry["status"]
        if status not in ("active", "retired"):
            raise KeyFileError(f"unknown key status {status!r}")
        return cls(
            kid=str(entry["kid"]),
            status=status,
            created_at=float(entry["created_at"]),
            private_key=private_key,
        )


def _jwk_thumbprint(raw_public: bytes) -> str:
    """RFC 7638 thumbprint of the OKP JWK: a kid that any party can recompute."""
    canonical = json.dumps(
        {"crv": "Ed25519", "kty": "OKP", "x": b64url(raw_public)},
        separators=(",", ":"),
        sort_keys=True,
    )
    return b64url(hashlib.sha256(canonical.encode("ascii")).digest())


class SigningKeys:
    """The server's token-signing keys, backed by one JSON file."""

    def __init__(
        self, path: Path, keys: list[_SigningKey], signature: tuple[int, int, int]
    ) -> None:
        self._path = path
        self._keys = keys
        self._signature = signature

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKeys:
        try:
            return cls._load(path)
        except FileNotFoundError:
            pass
        keys = [_SigningKey.generate(time.time())]
        try:
            _write_atomically(path, keys, exclusive=True)
        except FileExistsError:
            # Another process created it between our read and write: use theirs.
            return cls._load(path)
        return cls._load(path)

    @classmethod
    def _load(cls, path: Path) -> SigningKeys:
        try:
            with path.open("rb") as handle:
                signature = _signature(os.fstat(handle.fileno()))
                document = json.load(handle)
            keys = [_SigningKey.from_json(entry) for entry in document["keys"]]
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeyFileError(f"cannot read the signing keys in {path}: {exc}") from exc
        if sum(key.status == "active" for key in keys) != 1:
            raise KeyFileError(f"{path} must hold exactly one active signing key")
        return cls(path, keys, signature)

    @property
    def active_kid(self) -> str:
        return self._active().kid

    def rotate(self) -> str:
        """Make a new active key; the old ones stay published as retired. Returns the new kid."""
        self.reload_if_changed()
        retired = [replace(key, status="retired") for key in self._keys]
        new_key = _SigningKey.generate(time.time())
        keys = [*retired, new_key]
        _write_atomically(self._path, keys, exclusive=False)
        self._keys = keys
        with contextlib.suppress(OSError):
            self._signature = _signature(self._path.stat())
        return new_key.kid

    def reload_if_changed(self) -> bool:
        """Pick up a rotation made by another process (one stat call). True if reloaded."""
        try:
            signature = _signature(self._path.stat())
        except OSError:
            return False
        if signature == self._signature:
            return False
        try:
            fresh = self._load(self._path)
        except (KeyFileError, OSError):
            # Keep signing with what we have; the operator sees the error at the next CLI call.
            log.warning("ignoring an unreadable signing-key file %s", self._path, exc_info=True)
            return False
        self._keys, self._signature = fresh._keys, fresh._signature
        return True

    def public_keys(self) -> list[PublicKey]:
        return [
            PublicKey(kid=key.kid, x=b64url(key.raw_public), status=key.status)
            for key in self._keys
        ]

    def issue(
        self,
        *,
        issuer: str,
        holder: str,
        target: str,
        scope: str,
        resource: str,
        now: float,
        ttl: int = MAX_TTL,
        room: str | None = None,
    ) -> tuple[str, float]:
        """Sign a capability for ``holder`` (device id) toward ``target``; returns (jwt, exp).

        ``room`` is the room whose role granted it: a peer that shares a resource into some
        rooms only (a terminal session) accepts the token only if it names one of them.
        """
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        key = self._active()
        issued_at = int(now)
        expires_at = issued_at + min(ttl, MAX_TTL)
        claims = {
            "iss": issuer,
            "sub": holder,
            "aud": target,
            "scope": scope,
            "res": resource,
            "iat": issued_at,
            "nbf": issued_at,
            "exp": expires_at,
            "jti": b64url(secrets.token_bytes(16)),
            "cnf": {"x5t#S256": certificate_binding(holder)},
        }
        if room is not None:
            claims["room"] = room
        token = jwt.encode(
            claims,
            key.private_key,
            algorithm="EdDSA",
            headers={"typ": TOKEN_TYPE, "kid": key.kid},
        )
        return token, float(expires_at)

    def _active(self) -> _SigningKey:
        return next(key for key in self._keys if key.status == "active")


def _signature(status: os.stat_result) -> tuple[int, int, int]:
    # The inode changes on every atomic replace, even where mtimes are coarse.
    return (status.st_ino, status.st_mtime_ns, status.st_size)


def _write_atomically(path: Path, keys: list[_SigningKey], *, exclusive: bool) -> None:
    """Write the key file via a 0600 temp file and rename, so readers never see half a file."""
    document = json.dumps(
        {"version": _FILE_VERSION, "keys": [key.to_json() for key in keys]}, indent=2
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(document)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            # link() fails if the target exists: a concurrent creator wins cleanly.
            try:
                os.link(temp, path)
            except (NotImplementedError, PermissionError):  # filesystems without hard links
                if path.exists():
                    raise FileExistsError(path) from None
                os.replace(temp, path)
        else:
            os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
